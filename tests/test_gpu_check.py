"""tests/gpu_check.sh's refusals: a wrong argument, an output file it cannot write, no CUDA device. Each is
one `error:` line on stderr and exit 2, before any step runs (the steps themselves: CI's dry run)."""
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "gpu_check.sh"


def check(*args):
    run = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    return run.returncode, run.stdout, run.stderr.splitlines()


@pytest.mark.parametrize("args, message", [
    (["--fast"], "error: usage: "),
    (["--dry-run", "a.txt", "b.txt"], "error: usage: "),
    (["--dry-run", "/no/such/folder/out.txt"], "error: cannot write /no/such/folder/out.txt"),
    (["--rehearse", "/"], "error: cannot write /"),
])
def test_a_wrong_call_is_one_error_line(args, message):
    code, out, err = check(*args)
    assert (code, out, len(err)) == (2, "", 1) and err[0].startswith(message), err


def test_no_cuda_device_is_one_error_line(tmp_path):
    """This machine has no CUDA device: the real run refuses before writing anything."""
    code, out, err = check(str(tmp_path / "out.txt"))
    assert (code, out, len(err)) == (2, "", 1) and err[0].startswith("error: no CUDA device"), err
    assert not (tmp_path / "out.txt").exists()

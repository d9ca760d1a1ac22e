"""Faults driven as a user meets them: a value out of range for every numeric flag, an input path of the
wrong kind (a folder, a dangling link, a FIFO, the wrong JSON, bytes that are not UTF-8, a non-float
checkpoint), output that cannot be written (/dev/full, a terminal gone, a read-only folder), signals during
generation and eval (during conversion: tests/test_convert.py), first runs converting at once after a
conversion killed with SIGKILL, and the embedded model's cache damaged or raced.

A check of a run asserts its exit code, a single `error:` line or silence, no traceback and nothing
half-written. A few call what lies below the command line instead, and assert what it gives and leaves: the
ends of the flags' ranges in torch, and convert_gguf.default_model_dir on a damaged or raced cache. A process
costs a torch import (seconds on a busy machine), so checks that only need the parser and the loaders call
run.main or convert_gguf.main in-process; processes run where only a process shows it (signals, standard
output, exit codes, races), several at once. The tiny random model stands in wherever the embedded one is not
needed.
"""
import io
import json
import math
import os
import re
import select
import shutil
import signal
import string
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models

import convert_gguf
import folder
import run
from conftest import TINY_CONFIG, write_checkpoint
from test_convert import fake_gguf  # noqa: F401 (a fixture: convert() writing a tiny folder, no GGUF read)

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINTS = ROOT / "tests" / "checkpoints"


def write_tiny_folder(path, **config):
    """A model folder run.py opens: TINY_CONFIG's random weights (no EOS, so a run goes its full length; a
    16k context) and a character-level tokenizer.json of 99 ids, written with the `tokenizers` library."""
    cfg = {k: v for k, v in TINY_CONFIG.items() if k != "eos_token_id"}
    write_checkpoint(path, {**cfg, "max_position_embeddings": 16384, **config})
    chars = [c for c in string.printable if c not in "\x0b\x0c"]
    tok = Tokenizer(models.BPE(vocab={"<unk>": 0, **{c: i for i, c in enumerate(chars, 1)}}, merges=[],
                               unk_token="<unk>"))
    tok.decoder = decoders.Fuse()  # the characters, joined
    tok.save(str(Path(path) / "tokenizer.json"))
    return Path(path)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_folder(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def error_of(argv, capsys):
    """run.main(argv) in-process: the one `error:` line it ends with (after eval's progress), exit code 2."""
    with pytest.raises(SystemExit) as e:
        run.main(argv)
    err = "".join(line for line in capsys.readouterr().err.splitlines(True) if not line.startswith("eval "))
    assert e.value.code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


# --- every numeric flag: out of its range ---------------------------------------------------------

def out_of_range(kind, low, high, low_open):
    """Values just outside a flag's range, and values of no range: nan, inf, words, fractions for ints."""
    step = 1 if kind is int else 1e-9
    values = [low if low_open else low - step, "nan", "inf", "-inf", "x", ""]
    if high < math.inf:  # (a huge whole number is in range for --max-new-tokens: the context refuses it)
        values += [high + step, "1" + "0" * 400]
    return values + (["1.5", "1e3"] if kind is int else [])


@pytest.mark.parametrize("flag", run.NUMBERS)
def test_every_numeric_flag_refuses_values_out_of_range(flag, capsys):
    command = ["eval"] if flag == "--limit" else []
    for value in out_of_range(*run.NUMBERS[flag]):
        assert f"argument {flag}: expected a " in error_of(command + [f"{flag}={value}"], capsys)


def test_ranges_are_what_the_layers_below_take():
    """The ends of the table are honoured where the value lands: all the machine's cores, the largest seed
    torch.Generator takes (one more does not fit it)."""
    top = ["demo", "--threads", str(os.cpu_count()), "--seed", str(2 ** 64 - 1)]
    args = run.build_parser().parse_args(top)
    torch.set_num_threads(args.threads)
    assert torch.get_num_threads() == os.cpu_count()
    torch.Generator().manual_seed(args.seed)
    with pytest.raises((RuntimeError, ValueError), match="Overflow"):
        torch.Generator().manual_seed(args.seed + 1)
    assert run.NUMBERS["--threads"][2] == os.cpu_count()  # 100000 threads crashed torch (a segfault)


@pytest.mark.parametrize("argv, says", [
    (["--threads", "100000"], "argument --threads: expected a whole number [1, "),
    (["--temperature", "0.001"], "--temperature: 0 (greedy) or at least 0.01"),
    (["--compile", "--temperature", "0.5"], "--compile is for CUDA"),
    (["--sirius", "--sparsity", "dense"], "needs a sparse model"),
])
def test_values_refused_before_the_model_is_read(argv, says, capsys):
    assert says in error_of(argv + ["--model", "/nonexistent"], capsys)  # refused before the folder is read


def test_requests_beyond_the_context_or_the_memory(tiny_dir, tmp_path, monkeypatch, capsys):
    """Refused after the config, before the weights: answers and Sirius's cache beyond the model's context,
    weights and cache beyond the memory. Plain decoding does not need Sirius's window."""
    model = ["--model", str(tiny_dir), "--prompt", "hi"]
    err = error_of(model + ["--max-new-tokens", "1" + "0" * 400], capsys)
    assert "exceeds the model's context of 16384 tokens" in err
    err = error_of(model + ["--period", "1024", "--width", "64"], capsys)
    assert "Sirius needs 65601 cache slots (prompt 2 + --max-new-tokens 128 - 1 + (--period 1024 - 1) x " \
           "--width 64), more than the model's context of 16384" in err
    run.main(model + ["--period", "1024", "--width", "64", "--sparsity", "dense", "--max-new-tokens", "2"])
    assert "--- dense ---" in capsys.readouterr().out
    huge = tmp_path / "huge"  # a config whose MLP would take 77 TB (its weights are never read)
    shutil.copytree(tiny_dir, huge)
    (huge / "config.json").write_text(json.dumps({**json.loads((tiny_dir / "config.json").read_text()),
                                                  "intermediate_size": 10 ** 11}))
    err = error_of(["--model", str(huge), "--prompt", "hi", "--max-new-tokens", "2"], capsys)
    mlp = 3 * 32 * 10 ** 11 * 2 * 4 / 2 ** 30  # gate, up, down: h x D each, 2 layers, 4 bytes: all but KBs
    assert re.search(rf"this request needs at least {mlp:.1f} GiB on cpu .* GiB are available$", err), err
    monkeypatch.setattr(folder, "available_memory", lambda device: 10 ** 5)  # and the cache counts too
    err = error_of(model + ["--max-new-tokens", "2"], capsys)
    assert "needs at least 0.0 GiB on cpu (weights, a KV cache of 18 slots" in err  # 2 + 2 - 1 + (16 - 1)


def test_a_mistral_window_under_a_llama_architecture(tmp_path, capsys):
    """Issue 25's fault: config.json says model_type mistral with a sliding_window, architectures Llama.
    transformers builds a Mistral (model_type decides), so a request whose cache reaches past the window is
    one error line naming sliding_window, before the weights; one within the window runs."""
    model = write_tiny_folder(tmp_path / "m", model_type="mistral", architectures=["LlamaForCausalLM"],
                              sliding_window=40)
    argv = ["--model", str(model), "--prompt", "hi", "--sparsity", "fine", "--period", "4", "--width", "2"]
    err = error_of(argv + ["--max-new-tokens", "34"], capsys)    # "hi" is 2 tokens: 2 + 34 - 1 + 3 x 2 = 41
    assert "this request needs 41 cache slots (prompt 2 + --max-new-tokens 34 - 1 + (--period 4 - 1) x " \
           "--width 2), past the model's sliding_window of 40, where attention is not implemented" in err, err
    run.main(argv + ["--max-new-tokens", "33"])                  # 40 slots: within the window
    assert "--- Sirius (fine, w=2) ---" in capsys.readouterr().out


# --- input paths of the wrong kind ----------------------------------------------------------------

@contextmanager
def fifo(path):
    """A FIFO at path. Opening one to read blocks until a writer comes: should the code under test do so,
    a writer opens it after 20 s so that the test fails instead of hanging."""
    os.mkfifo(path)

    def unblock():
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))  # ENXIO: nobody is reading, fine
        except OSError:
            pass
    timer = threading.Timer(20, unblock)
    timer.start()
    try:
        yield path
    finally:
        timer.cancel()


def wrong_kinds(path: Path):
    """path made, in turn, into each wrong kind of file; yields a name for each."""
    for kind in ("folder", "dangling link", "FIFO", "not UTF-8", "wrong JSON"):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        if kind == "folder":
            path.mkdir()
        elif kind == "dangling link":
            path.symlink_to(path.parent / "nowhere")
        elif kind == "not UTF-8":
            path.write_bytes(b'{\n"a": "caf\xe9"\n}\n')
        elif kind == "wrong JSON":
            path.write_text("[1, 2]\n")
        if kind == "FIFO":
            with fifo(path):
                yield kind
        else:
            yield kind


EXPECTED = {"folder": "not a regular file (a folder)", "dangling link": "a dangling symbolic link",
            "FIFO": "not a regular file (a FIFO)", "not UTF-8": "line 2 is not valid UTF-8"}


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "generation_config.json",
                                  "chat_template.jinja"])
def test_model_folder_files_of_the_wrong_kind(tiny_dir, tmp_path, name, capsys):
    model = tmp_path / "m"
    shutil.copytree(tiny_dir, model)
    for kind in wrong_kinds(model / name):
        if kind == "wrong JSON" and name == "chat_template.jinja":
            continue  # any text is a template
        err = error_of(["--model", str(model), "--prompt", "hi", "--max-new-tokens", "1"], capsys)
        assert str(model / name) in err, (kind, err)
        assert EXPECTED.get(kind, "") in err, (kind, err)


def test_config_and_weights_of_the_wrong_kind(tiny_dir, tmp_path, capsys):
    """config.json and the weights are checkpoint.py's: each wrong kind is one line naming the file and what
    is wrong with it, never "no config.json" or "no model.safetensors" for a file that is there."""
    model = tmp_path / "m"
    shutil.copytree(tiny_dir, model)
    says = {**EXPECTED, "wrong JSON": "expected a JSON object"}
    for kind in wrong_kinds(model / "config.json"):
        err = error_of(["--model", str(model), "--prompt", "hi"], capsys)
        assert err.startswith(f"error: {model / 'config.json'}: {says[kind]}"), (kind, err)
    shutil.copy(tiny_dir / "config.json", model)
    says = {**EXPECTED, "not UTF-8": "cannot read safetensors", "wrong JSON": "cannot read safetensors"}
    for kind in wrong_kinds(model / "model.safetensors"):
        err = error_of(["--model", str(model), "--prompt", "hi", "--max-new-tokens", "1"], capsys)
        assert err.startswith(f"error: {model / 'model.safetensors'}: {says[kind]}"), (kind, err)
    for kind in wrong_kinds(tmp_path / "not-a-folder"):
        err = error_of(["--model", str(tmp_path / "not-a-folder")], capsys)
        assert ("no config.json" if kind == "folder" else "model folder not found") in err, (kind, err)


# Chat templates and what they make of a prompt: a run, or an error naming the template's file.
TEMPLATE_OUTCOMES = {
    "renders nothing": ("{% if false %}{{ messages }}{% endif %}",
                        "the chat template renders an empty prompt"),
    "renders only the generation prompt": ("{% if add_generation_prompt %}A:{% endif %}", None),
    "renders blanks": ("{{ ' ' }}", None),
    "raises": ("{{ raise_exception('no system message') }}", "the chat template fails (TemplateError: no "),
    "reads an undefined name": ("{{ messages[5].content }}", "the chat template fails"),
    "rewrites the text": ("{{ messages[0].content | upper }}",
                          "the chat template rewrites the messages' text, which sirius-min must find in the "
                          "rendering to keep typed control tokens as text; use --no-chat"),
    "does not parse": ("{% for m in messages %}", "the chat template fails (TemplateSyntaxError"),
}


@pytest.mark.parametrize("outcome", TEMPLATE_OUTCOMES)
def test_every_outcome_of_a_chat_template_is_a_run_or_one_error_line(tiny_dir, tmp_path, outcome, capsys):
    template, says = TEMPLATE_OUTCOMES[outcome]
    model = tmp_path / "m"
    shutil.copytree(tiny_dir, model)
    (model / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    argv = ["--model", str(model), "--prompt", "hi", "--sparsity", "dense", "--max-new-tokens", "1"]
    if says is None:
        run.main(argv)
        assert "--- dense ---" in capsys.readouterr().out
    else:
        err = error_of(argv, capsys)
        assert err.startswith(f"error: {model / 'tokenizer_config.json'}: ") and says in err, err


def test_a_checkpoint_that_is_not_float_is_refused(tiny_dir, tmp_path, capsys):
    """int8 tensors (what quantized checkpoints store), or quantization metadata: refused, naming them."""
    for name, says in (("refused_int8", "has dtype int8: quantized checkpoints are not supported"),
                       ("refused_quant_config", "quantized checkpoints are not supported")):
        model = tmp_path / name
        shutil.copytree(CHECKPOINTS / name, model)
        tok = json.loads((tiny_dir / "tokenizer.json").read_text())  # cut to these checkpoints' 96 ids
        tok["model"]["vocab"] = {t: i for t, i in tok["model"]["vocab"].items() if i < 96}
        (model / "tokenizer.json").write_text(json.dumps(tok))
        assert says in error_of(["--model", str(model), "--prompt", "hi", "--max-new-tokens", "1"], capsys)


def test_eval_data_of_the_wrong_kind(tiny_dir, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    model = ["eval", "--model", str(tiny_dir), "--data", str(data)]
    for kind in wrong_kinds(data):
        err = error_of(model, capsys)
        assert err.startswith(f"error: {data}") and EXPECTED.get(kind, "") in err, (kind, err)
    data.write_bytes(b'{"question": "1 + 1?", "answer": "#### 2"}\n{"question": "caf\xe9?", '
                     b'"answer": "#### 3"}\n')
    assert f"{data}: line 2 is not valid UTF-8" in error_of(model, capsys)  # no longer read as "caf?"
    data.write_text('{"question": ["1 + 1?"], "answer": "#### 2"}\n')
    assert f"{data}:1: the question must be a non-empty string" in error_of(model, capsys)
    assert "/dev/zero: not a regular file (a device)" in error_of(model[:-1] + ["/dev/zero"], capsys)


def test_eval_data_lines_end_at_newline_only(tmp_path):
    """JSON Lines ends a line at a newline (a CR before it is part of the ending): U+2028, U+2029 and U+0085,
    line breaks to str.splitlines that JSON writes raw, are text in a question. A leading byte-order mark is
    dropped, as a prompt's is."""
    import bench

    questions = ["a\u2028b?", "c\x85d?", "e\x0bf\x0cg?", "h\x1ci\u2029j?"]
    rows = [json.dumps({"question": q, "answer": f"#### {n}"}, ensure_ascii=False)
            for n, q in enumerate(questions)]
    data = tmp_path / "d.jsonl"
    data.write_bytes(("\ufeff" + "\r\n".join(rows[:2]) + "\n" + "\n".join(rows[2:]) + "\r\n").encode())
    assert bench.load_gsm8k(data) == [(q, n) for n, q in enumerate(questions)]


def test_no_home_directory(monkeypatch, capsys):
    """HOME unset and no passwd entry for the user (a container's): the embedded model's cache has no place
    by default, so run.py and convert_gguf.py say so in one line, naming what to set."""
    import pwd

    def no_entry(uid):
        raise KeyError(f"getpwuid(): uid not found: {uid}")
    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.delenv("SIRIUS_MIN_CACHE", raising=False)
    monkeypatch.setattr(pwd, "getpwuid", no_entry)
    says = "no home directory to find ~ in: set HOME, or SIRIUS_MIN_CACHE"
    assert says in error_of(["--prompt", "hi"], capsys)
    assert convert_gguf.main([]) == 2
    err = capsys.readouterr().err
    assert says in err and err.startswith("error: ") and err.count("\n") == 1, err


def test_a_cache_that_is_not_a_folder(tmp_path, monkeypatch, capsys):
    """SIRIUS_MIN_CACHE naming a device, a file, or a path through one: one line saying which is not a
    folder, from run.py and convert_gguf.py; nothing is made."""
    (tmp_path / "file").write_text("x")
    file = tmp_path / "file"
    for cache, culprit in (("/dev/null", "/dev/null"), ("/dev/null/sub", "/dev/null"), (file, file),
                           (file / "a" / "b", file)):
        monkeypatch.setenv("SIRIUS_MIN_CACHE", str(cache))
        says = f"error: {culprit}: not a folder, so the model cache {cache} cannot be made there"
        assert error_of(["--prompt", "hi"], capsys).startswith(says)
        assert convert_gguf.main([]) == 2
        err = capsys.readouterr().err
        assert err.startswith(says) and err.count("\n") == 1, err
    assert [p.name for p in tmp_path.iterdir()] == ["file"] and (tmp_path / "file").read_text() == "x"


def test_closed_stdin_prompt(tiny_dir, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", None)
    assert "standard input is closed" in error_of(["--model", str(tiny_dir), "--prompt", "-"], capsys)


def read_only_folder(tmp_path):
    """A folder nobody may create files in: permissions do not stop root, so root gets /sys."""
    if os.geteuid() == 0:
        return Path("/sys")
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    return ro


def test_eval_out_that_cannot_be_written(tiny_dir, tmp_path, capsys):
    """--out is refused before the eval runs: a device (writing /dev/full by renaming over it would replace
    it), a FIFO, a folder nothing can be created in."""
    model = ["eval", "--model", str(tiny_dir), "--limit", "1", "--out"]
    assert "--out /dev/full: not a regular file" in error_of(model + ["/dev/full"], capsys)
    with fifo(tmp_path / "pipe"):
        assert "not a regular file" in error_of(model + [str(tmp_path / "pipe")], capsys)
    ro = read_only_folder(tmp_path)
    assert f"cannot write in {ro}" in error_of(model + [str(ro / "r.json")], capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"] + ["ro"] * (ro != Path("/sys"))


def test_a_cache_folder_nothing_can_be_written_in(tmp_path, monkeypatch, capsys):
    """The first run converts into $SIRIUS_MIN_CACHE: where nothing can be written, it says so at once (before
    reading the GGUF), after the line that says it converts."""
    cache = read_only_folder(tmp_path) / "cache"
    monkeypatch.setenv("SIRIUS_MIN_CACHE", str(cache))
    monkeypatch.setattr(convert_gguf, "open_gguf", lambda path: pytest.fail("the GGUF was read first"))
    with pytest.raises(SystemExit) as e:
        run.main(["--prompt", "hi"])
    notice, err = capsys.readouterr().err.splitlines()
    assert e.value.code == 2 and notice.startswith("sirius-min: converting the embedded GGUF once into")
    assert err.startswith(f"error: {cache}/") and "cannot write the converted model" in err


def test_convert_inputs_of_the_wrong_kind(tmp_path, monkeypatch, capsys):
    """convert_gguf.py: a GGUF path of each wrong kind; an OUT_DIR that is a file, or in a folder nothing
    can be created in, refused before the GGUF is read (seconds)."""
    gguf, out = tmp_path / "m.gguf", tmp_path / "out"
    for kind in wrong_kinds(gguf):
        assert convert_gguf.main(["--gguf", str(gguf), str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {gguf}: ") and err.count("\n") == 1, (kind, err)
    monkeypatch.setattr(convert_gguf, "open_gguf", lambda path: pytest.fail("the GGUF was read first"))
    (tmp_path / "file").write_text("x")
    for out, says in ((tmp_path / "file", "exists and is not a folder"),
                      (read_only_folder(tmp_path) / "model", "cannot write the converted model")):
        assert convert_gguf.main(["--gguf", str(gguf), str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {out}: {says}") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


# --- processes: output that cannot be written, signals, first runs at once -------------------------

def start(argv, env=None, stdout=subprocess.PIPE):
    return subprocess.Popen([sys.executable, "run.py", *argv], cwd=ROOT, stdout=stdout,
                            stderr=subprocess.PIPE, env=env)


def test_output_to_a_full_disk(tiny_dir):
    """`run.py > /dev/full` (ENOSPC): one error line, exit 2, no traceback."""
    with open("/dev/full", "wb") as full:
        proc = start(["--model", str(tiny_dir), "--prompt", "hi", "--max-new-tokens", "8"], stdout=full)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and err == b"error: cannot write the output (No space left on device)\n"


@pytest.mark.parametrize("command", [["--prompt", "hi"], ["eval", "--limit", "1"]], ids=["demo", "eval"])
def test_output_to_a_terminal_that_is_gone(tiny_dir, monkeypatch, capsys, command):
    """A terminal whose window was closed (a pty whose other end is closed: EIO), with standard output as
    run.py wraps it from the shell: one error line, and what is left goes nowhere instead of failing again.
    The demo fails at its first token (flushed with the header), eval at the end (its report is buffered):
    each makes one write, the demo's one token past its header, eval's the whole report."""
    terminal, gone = os.openpty()
    os.close(terminal)
    writes = []

    class Recorded(run.Stdout):
        def write(self, data):
            writes.append(bytes(data))
            return super().write(data)
    stdout = io.TextIOWrapper(io.BufferedWriter(Recorded(gone, "w", closefd=False)), "utf-8")
    monkeypatch.setattr(sys, "stdout", stdout)
    try:
        err = error_of(command + ["--model", str(tiny_dir), "--max-new-tokens", "4"], capsys)
        assert err == "error: cannot write the output (Input/output error)\n"
        assert len(writes) == 1, writes
        if command[0] == "eval":
            assert writes[0].startswith(b"\n1 questions") and b"\nmethod " in writes[0], writes
        else:  # the character-level tokenizer: one token is one character (two bytes if escaped: \\r)
            header = b"prompt: hi\n\n--- dense ---\n"
            assert writes[0].startswith(header) and 1 <= len(writes[0]) - len(header) <= 2, writes
        stdout.write("what is left")
        stdout.flush()
        assert len(writes) == 2 and writes[1].endswith(b"what is left")  # into /dev/null, not failing again
    finally:
        os.close(gone)


def c_locale():
    """The environment of a C locale without UTF-8 mode: Python reads argv and writes stdout as ASCII."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "LANG", "PYTHONIOENCODING"))}
    return {**env, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}


def test_output_the_terminal_cannot_encode(tiny_dir, tmp_path, monkeypatch, capsys):
    """Standard output in ASCII (PYTHONIOENCODING=ascii, a C locale), as run.py wraps it from the shell: a
    prompt beyond ASCII is shown escaped, no UnicodeEncodeError; the run goes on to its table."""
    with open(tmp_path / "out", "w", encoding="ascii") as ascii_out:
        monkeypatch.setattr(sys, "stdout", run.shell_stdout(ascii_out))
        run.main(["--model", str(tiny_dir), "--prompt", "caf\u00e9 \u2615?", "--sparsity", "dense",
                  "--max-new-tokens", "2"])
        sys.stdout.flush()
    out = (tmp_path / "out").read_bytes()
    assert out.startswith(b"prompt: caf\\xe9 \\u2615?\n") and b"\ndense " in out, out
    assert capsys.readouterr().err == ""


def test_a_prompt_reads_the_same_from_argv_and_stdin(tiny_dir):
    """In a C locale without UTF-8 mode (Python decodes argv as ASCII), a UTF-8 prompt in argv is read as the
    same bytes on stdin are: accepted, the same run. (Bytes that are not UTF-8 are refused from either:
    tests/test_run.py.)"""
    env = c_locale()
    argv = ["--model", str(tiny_dir), "--sparsity", "dense", "--max-new-tokens", "2", "--prompt"]
    prompt = "caf\u00e9?".encode()
    runs = [(start(argv + [prompt], env=env), None),
            (subprocess.Popen([sys.executable, "run.py", *argv, "-"], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env), prompt)]
    done = [(proc.communicate(stdin, timeout=120), proc.returncode) for proc, stdin in runs]
    untimed = [(out.split(b"\nmethod ")[0], err, code) for (out, err), code in done]  # (the table: timings)
    assert untimed[0] == untimed[1] and untimed[0][1:] == (b"", 0), untimed
    assert untimed[0][0].startswith(b"prompt: caf\\xe9?\n\n--- dense ---\n"), untimed


def signal_when(runs, timeout=90):
    """Send each process its signal once its marker shows on its stream: {stream: (proc, marker, sig)}."""
    seen, deadline = {stream: b"" for stream in runs}, time.monotonic() + timeout
    while seen:
        ready, _, _ = select.select(list(seen), [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            pytest.fail(f"not under way in time: {seen}")
        for stream in ready:
            chunk = os.read(stream.fileno(), 1 << 16)
            proc, marker, sig = runs[stream]
            if not chunk:
                pytest.fail(f"{proc.args} ended before {marker!r}: {seen[stream][-500:]!r}")
            seen[stream] += chunk
            if marker in seen[stream]:
                proc.send_signal(sig)
                del seen[stream]


def test_signals_during_generation_and_eval(tiny_dir, tmp_path):
    """Ctrl-C while the demo generates exits with 130; SIGHUP there (a closed terminal) and SIGTERM during
    an eval with --out end the process by that signal, after cleaning up. No traceback, no error line, no
    --out and no temporary file. (During conversion: tests/test_convert.py.) The three run at once, each
    signalled once under way: the demo when its first token is out (the header comes with it), eval after
    its first questions."""
    out = tmp_path / "r.json"
    demo = ["--model", str(tiny_dir), "--prompt", "hi", "--sparsity", "dense", "--max-new-tokens", "16000"]
    ev = ["eval", "--model", str(tiny_dir), "--limit", "20", "--max-new-tokens", "40", "--out", str(out)]
    procs = {signal.SIGINT: (start(demo), 130), signal.SIGHUP: (start(demo), -signal.SIGHUP),
             signal.SIGTERM: (start(ev), -signal.SIGTERM)}
    try:
        signal_when({proc.stderr if proc.args[2] == "eval" else proc.stdout:
                     (proc, b"eval " if proc.args[2] == "eval" else b"--- dense ---\n", sig)
                     for sig, (proc, _) in procs.items()})
        for sig, (proc, code) in procs.items():
            _, err = proc.communicate(timeout=60)
            progress = [line for line in err.decode().splitlines() if not line.startswith("eval ")]
            assert proc.returncode == code and progress == [], (sig, err)
    finally:
        for proc, _ in procs.values():
            proc.kill()
            proc.communicate()
    assert list(tmp_path.iterdir()) == []  # no --out, no temporary file


def test_first_runs_at_once_after_a_killed_conversion(tmp_path):
    """A conversion killed with SIGKILL mid-write leaves its temporary folder; then two first runs start at
    once on that cache, run.py and convert_gguf.py: at least one converts (usually both: the conversion takes
    seconds longer than run.py takes to reach its check of the cache, but a slow start may find it done),
    one folder wins, both succeed, and no temporary folder is left."""
    from test_convert import start_slow_writer  # convert_gguf.py writing (fake GGUF) until killed

    cache = tmp_path / "cache"
    killed = start_slow_writer(cache / convert_gguf.DEFAULT_MODEL_NAME)
    killed.kill()
    killed.communicate(timeout=30)
    assert len(list(cache.glob(".*.tmp-*"))) == 1
    env = {**os.environ, "SIRIUS_MIN_CACHE": str(cache)}
    model_dir = cache / convert_gguf.DEFAULT_MODEL_NAME
    firsts = [start(["--prompt", "Hi", "--sparsity", "dense", "--max-new-tokens", "2"], env=env),
              subprocess.Popen([sys.executable, "convert_gguf.py"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)]  # the other entry point that converts on first use
    converted = 0
    for proc, says in zip(firsts, (b"--- dense ---", f"{model_dir}\n".encode())):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0 and says in out, err
        assert err.decode() in ("", f"sirius-min: converting the embedded GGUF once into {model_dir} ...\n")
        converted += err != b""
    assert converted >= 1
    assert [p.name for p in cache.iterdir()] == [model_dir.name] and convert_gguf._is_converted(model_dir)


# --- the project's own cache, damaged by accident --------------------------------------------------

def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def garble_header(path):
    """One byte of the safetensors header's JSON changed: the file keeps its size."""
    with open(path, "r+b") as f:
        f.seek(9)  # just past the 8-byte length and the header's opening brace
        byte = f.read(1)
        f.seek(9)
        f.write(b"#" if byte != b"#" else b"$")


DAMAGES = {"model.safetensors cut short": ("model.safetensors", truncate),
           "its header garbled": ("model.safetensors", garble_header),
           "tokenizer.json removed": ("tokenizer.json", Path.unlink),
           "tokenizer.json changed, same size": ("tokenizer.json", lambda p: p.write_bytes(
               p.read_bytes().replace(b"{", b"[", 1)))}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_cache_is_converted_again(tmp_path, fake_gguf, monkeypatch, capsys, damage):
    """The cache folder is the project's: damaged, it is found so at the next start (the sizes and hashes
    in its stamp) and converted again, saying so in one line. The fake GGUF's weights are made "large" (the
    header hash only), as the embedded model's are."""
    monkeypatch.setattr(convert_gguf, "find_default_gguf", lambda: Path("unused.gguf"))
    monkeypatch.setattr(convert_gguf, "HASHED_AT_START", 16)
    folder_ = convert_gguf.default_model_dir(tmp_path)
    assert "header_sha256" in json.loads((folder_ / convert_gguf.STAMP).read_text())["files"][
        "model.safetensors"]
    capsys.readouterr()
    name, damage_it = DAMAGES[damage]
    damage_it(folder_ / name)
    assert convert_gguf.default_model_dir(tmp_path) == folder_
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        "sirius-min: converting the embedded GGUF again (the cached one is damaged: " + name), err
    assert convert_gguf._is_converted(folder_) and [p.name for p in tmp_path.iterdir()] == [folder_.name]
    assert convert_gguf.default_model_dir(tmp_path) == folder_ and capsys.readouterr().err == ""


def test_the_embedded_cache_cut_short_is_converted_again_but_a_users_folder_is_refused(smollm_dir, tmp_path,
                                                                                       capsys):
    """A copy of the converted cache with model.safetensors cut short. Given as --model it is the user's
    folder: refused in one `error:` line and left as it is. As the cache, run.py (from the shell) converts it
    again, saying so in one line, and answers."""
    model_dir = tmp_path / smollm_dir.name
    shutil.copytree(smollm_dir, model_dir)  # a copy: never a link to the shared cache's files
    truncate(model_dir / "model.safetensors")
    half = (model_dir / "model.safetensors").stat().st_size
    argv = ["--prompt", "Hi", "--sparsity", "dense", "--max-new-tokens", "2"]
    assert "model.safetensors" in error_of(argv + ["--model", str(model_dir)], capsys)
    assert (model_dir / "model.safetensors").stat().st_size == half
    proc = start(argv, env={**os.environ, "SIRIUS_MIN_CACHE": str(tmp_path)})
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and b"--- dense ---" in out, err
    full = (smollm_dir / "model.safetensors").stat().st_size
    assert err.decode() == (f"sirius-min: converting the embedded GGUF again (the cached one is damaged: "
                            f"model.safetensors is {half} bytes, not {full}) into {model_dir} ...\n")
    assert convert_gguf._is_converted(model_dir) and [p.name for p in tmp_path.iterdir()] == [model_dir.name]


def test_a_first_run_that_sees_the_cache_appear_mid_check(tmp_path, fake_gguf, monkeypatch, capsys):
    """Races with another first run, made to happen right after we find no stamp in an older cache (one
    without a stamp): (1) the other run swaps in its complete conversion: we take it, not "an older
    sirius-min" to convert again; (2) it has set the older folder aside: we convert into the empty place."""
    monkeypatch.setattr(convert_gguf, "find_default_gguf", lambda: Path("unused.gguf"))
    cache = tmp_path / "cache"
    done = convert_gguf.default_model_dir(tmp_path / "other")      # the other run's complete conversion
    model_dir = cache / done.name
    real_read, real_convert = Path.read_text, convert_gguf.convert

    def meanwhile(then):
        def read_text(path, *a, **k):
            if path == model_dir / convert_gguf.STAMP and not path.exists():
                monkeypatch.setattr(Path, "read_text", real_read)
                then()
                raise FileNotFoundError(path)                       # what our look found, before `then`
            return real_read(path, *a, **k)
        monkeypatch.setattr(Path, "read_text", read_text)

    def older_cache():
        shutil.rmtree(model_dir, ignore_errors=True)
        model_dir.mkdir(parents=True)
        (model_dir / "config.json").write_text("{}")

    older_cache()
    meanwhile(lambda: (shutil.rmtree(model_dir), os.replace(done, model_dir)))
    monkeypatch.setattr(convert_gguf, "convert", lambda *a, **k: pytest.fail("converted again"))
    capsys.readouterr()
    assert convert_gguf.default_model_dir(cache) == model_dir and capsys.readouterr().err == ""

    monkeypatch.setattr(convert_gguf, "convert", real_convert)
    older_cache()
    meanwhile(lambda: shutil.rmtree(model_dir))
    assert convert_gguf.default_model_dir(cache) == model_dir and convert_gguf._is_converted(model_dir)
    assert "converting the embedded GGUF once" in capsys.readouterr().err

"""run.py and bench.py: the demo end to end, the trace, eval and bench smoke runs, and the promise for bad
input: one `error:` line and exit 2 for a user's mistake, nothing half-written, 130 for Ctrl-C, a traceback
for a bug."""
import json
import math
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import bench
import folder
import run
import sirius_min
from conftest import TINY_CONFIG, write_checkpoint

ROOT = Path(__file__).resolve().parent.parent
NUMBER = re.compile(r"^-?\d+(\.\d+)?(/\d+)?%?$")


def test_demo_subprocess_three_answers_and_table(smollm_dir):
    out = subprocess.run([sys.executable, "run.py", "--prompt", "What is 2 + 3?", "--max-new-tokens", "20",
                          "--no-color"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for section in ("--- dense ---", "--- coarse sparse ---", "--- Sirius (coarse) ---"):
        assert section in text
    header = next(line for line in text.splitlines() if line.startswith("method"))
    assert header.split() == ["method", "tokens", "ms/token", "density", "AAL", "periods", "eff.", "density",
                              "corrections"]
    sirius_row = next(line for line in text.splitlines() if line.startswith("Sirius (coarse)"))
    assert all(NUMBER.match(x) or x == "nan/16" for x in sirius_row.split()[2:]), sirius_row
    assert "\x1b" not in text and "Traceback" not in out.stderr


def test_printer_colours_full_model_tokens(smollm, capsys):
    _, tok = smollm
    p = run.Printer(tok, color=True)
    for t, full in zip(tok.encode("Hello there").ids, [True, False]):
        p(t, full)
    out = capsys.readouterr().out
    assert out == f"{run.FULL}Hello{run.RESET}{run.DRAFT} there{run.RESET}"
    plain = run.Printer(tok, color=False)
    for t in tok.encode("café").ids:  # a multi-byte character split over tokens is printed once, whole
        plain(t, True)
    assert capsys.readouterr().out == "café"


# --- the trace --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo_prompt(smollm, smollm_dir):
    tok = smollm[1]
    prompting = folder.read_prompting(smollm_dir, tok)
    return torch.tensor(folder.chat_ids(tok, prompting, folder.few_shot(run.DEMO_PROMPT, bench.FEW_SHOT)))


@pytest.mark.parametrize("strict, width", [(False, 1), (True, 1), (False, 2)])
def test_trace_matches_the_run(smollm, demo_prompt, strict, width):
    """Every period's record agrees with what the loop emitted: kept drafts and appended token in order,
    probabilities in [0, 1], kept drafts plausible (strict: the full model's own choice)."""
    model, _ = smollm
    periods = []
    res = sirius_min.sirius(model, demo_prompt, 48, sparsity="coarse", width=width, strict=strict,
                            on_period=periods.append)
    assert len(periods) == len(res.advances)
    replay = [res.tokens[0]]
    for p in periods:
        assert p.window[0] == replay[-1] and 0 <= p.accepted <= len(p.window) - 1
        assert all(0.0 <= x <= 1.0 for x in p.probs) and len(p.probs) == len(p.window) - 1
        assert len(p.beams) == (width if len(p.window) > 1 else 1)  # a last 1-token window has no drafts
        assert p.beams[p.chosen] == p.accepted == max(p.beams)
        if not strict:
            assert all(x >= 0.1 for x in p.probs[:p.accepted])
            assert p.accepted == len(p.window) - 1 or p.probs[p.accepted] < 0.1
        replay += p.window[1:p.accepted + 1] + [p.appended]
    assert replay[:len(res.tokens)] == res.tokens  # the last period may be cut by the length budget
    assert sum(a for a in res.counted_advances) == sum(p.accepted + 1 for p in periods[:-1])
    if strict:  # kept drafts are the full model's argmax: the whole answer is dense greedy decoding
        assert res.tokens == sirius_min.generate(model, demo_prompt, 48).tokens


def test_no_trace_no_extra_work(smollm, demo_prompt, monkeypatch):
    """Without a trace, strict mode computes no softmax at all and the default rule one per verification;
    asking for the trace changes the work, never the tokens."""
    model, _ = smollm
    calls = []
    softmax = torch.softmax
    monkeypatch.setattr(torch, "softmax", lambda *a, **k: calls.append(1) or softmax(*a, **k))
    res = sirius_min.sirius(model, demo_prompt, 24, sparsity="coarse", period=8, strict=True)
    assert calls == []
    plain = sirius_min.sirius(model, demo_prompt, 24, sparsity="coarse", period=8)
    assert len(calls) == len(plain.advances)
    seen = []
    traced = sirius_min.sirius(model, demo_prompt, 24, sparsity="coarse", period=8, strict=True,
                               on_period=seen.append)
    assert traced.tokens == res.tokens and len(seen) == len(traced.advances)
    assert len(calls) > len(plain.advances)


def test_trace_printout(smollm_dir, capsys):
    run.main(["--sirius", "--trace", "--width", "2", "--max-new-tokens", "40", "--no-color"])
    out = capsys.readouterr().out
    blocks = re.findall(r"^period \d+, position \d+: kept (\d+)/(\d+), "
                        r"(?:then .* \((?:correction|bonus)\)|stopped at .*); "
                        r"beam \d/2, kept per beam \[\d+, \d+\]$",
                        out, re.M)
    assert blocks and all(int(a) <= int(n) for a, n in blocks)
    trace = out[out.index("period by period"):]
    assert max(len(line) for line in trace.splitlines()) <= 104 and "|" in trace


# --- bad input: one line, exit 2 ------------------------------------------------------------------

def error_of(argv, capsys):
    with pytest.raises(SystemExit) as e:
        run.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("argv, says", [
    (["--keep", "0"], "(0, 1]"), (["--keep", "1.5"], "(0, 1]"), (["--keep", "half"], "(0, 1]"),
    (["--sparsity", "medium"], "invalid choice"), (["eval", "--sparsity", "fine,dense"], "expected one of"),
    (["--period", "1"], "[2, 1024]"), (["--period", "x"], "whole number"),
    (["--period", "99999"], "[2, 1024]"), (["--threshold", "-0.1"], "[0, 1]"),
    (["--threshold", "nan"], "[0, 1]"), (["--threshold", "1.5"], "[0, 1]"),
    (["--threshold", "inf"], "[0, 1]"), (["--max-new-tokens", "0"], ">= 1"), (["--threads", "-2"], ">= 1"),
    (["--width", "0"], "[1, 64]"), (["eval", "--width", "1,x"], "whole number"),
    (["--dtype", "int8"], "invalid"),
    (["--device", "tpu"], "invalid choice"), (["--frobnicate"], "unrecognized arguments"),
    (["eval", "--limit", "0"], ">= 1"), (["bench", "--period", "1"], "[2, 1024]"),
    (["eval", "--out", ""], "expected a file name"), (["eval", "--out", "."], "not a folder"),
    (["eval", "--out", "/no/such/folder/r.json"], "its folder does not exist"),
    (["--dtype", "float16"], "float16 is very slow"),
])
def test_bad_flags(argv, says, capsys):
    assert says in error_of(argv, capsys)


def test_bad_inputs(smollm_dir, tmp_path, capsys):
    assert "needs a sparse model" in error_of(["--sirius", "--sparsity", "dense"], capsys)
    assert "model folder not found" in error_of(["--model", str(tmp_path / "nope")], capsys)
    assert "prompt is empty" in error_of(["--prompt", "   "], capsys)
    assert "exceeds the model's context" in error_of(["--prompt", "word " * 9000], capsys)
    assert "not valid UTF-8" in error_of(["--prompt", "caf\udce9"], capsys)  # how argv carries bad bytes
    if not torch.cuda.is_available():
        assert "no CUDA device" in error_of(["--device", "cuda"], capsys)


def test_bad_stdin_prompt(smollm_dir):
    out = subprocess.run([sys.executable, "run.py", "--prompt", "-"], cwd=ROOT, input=b"caf\xe9 au lait?",
                         capture_output=True, timeout=120)
    assert out.returncode == 2 and out.stderr.decode() == "error: the prompt on stdin is not valid UTF-8\n"


def test_bench_py_errors_from_the_shell(tmp_path):
    """eval and bench live in bench.py: their user errors, from the shell too, are one line."""
    for argv, says in ((["eval", "--out", str(tmp_path)], "not a folder"),
                       (["bench", "--keep", "0.5,0.25"], "bench times one kept fraction")):
        out = subprocess.run([sys.executable, "run.py", *argv], cwd=ROOT, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 2 and out.stderr.startswith("error: ") and out.stderr.count("\n") == 1
        assert says in out.stderr


@pytest.mark.parametrize("change, says", [
    ([1, 2], "expected a JSON object"),
    ({"max_position_embeddings": "long"}, "max_position_embeddings must be a positive whole number"),
    ({"num_attention_heads": 0}, "num_attention_heads must be"),
    ({"num_hidden_layers": -1}, "num_hidden_layers"),
    ({"hidden_size": {"a": 1}}, "hidden_size must be"), ({"eos_token_id": "2"}, "eos_token_id must be"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}}, "high_freq_factor"),
])
def test_bad_config_is_one_line_naming_the_file(tmp_path, capsys, change, says):
    write_checkpoint(tmp_path, TINY_CONFIG)
    (tmp_path / "config.json").write_text(json.dumps(change if isinstance(change, list) else
                                                     {**TINY_CONFIG, **change}))
    err = error_of(["--model", str(tmp_path)], capsys)
    assert str(tmp_path / "config.json") in err and says in err


def test_tokenizer_beyond_the_vocabulary(smollm_dir, tmp_path, capsys):
    write_checkpoint(tmp_path, TINY_CONFIG)  # vocabulary 100; SmolLM2's tokenizer has 49152 ids
    shutil.copy(smollm_dir / "tokenizer.json", tmp_path)
    assert "beyond the model's vocabulary (100)" in error_of(["--model", str(tmp_path)], capsys)


def test_odd_but_valid_prompt_runs(smollm_dir, capsys):
    """A BOM, a terminal escape code and chat control-token text are the user's text: shown harmlessly,
    encoded as text, and the run completes."""
    run.main(["--sirius", "--max-new-tokens", "8", "--prompt", "\ufeffred \x1b[31m text <|im_end|> ok?"])
    out = capsys.readouterr().out
    assert "\x1b[31m" not in out and "prompt: red \\x1b[31m text <|im_end|> ok?" in out


def test_no_import_cycle():
    """bench.py (eval and bench) and folder.py (opening a model folder) never import the command line."""
    out = subprocess.run([sys.executable, "-c", "import sys, bench, folder; print('run' in sys.modules)"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout == "False\n", out.stderr


def test_a_bug_keeps_its_traceback(smollm_dir, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("an internal bug")
    monkeypatch.setattr(run, "generate", broken)
    with pytest.raises(ValueError, match="an internal bug"):
        run.main(["--max-new-tokens", "4"])


def test_ctrl_c_while_starting_is_quiet(smollm_dir):
    p = subprocess.Popen([sys.executable, "run.py"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    maps = Path(f"/proc/{p.pid}/maps")
    deadline = time.time() + 30
    while "torch" not in maps.read_text() and time.time() < deadline:  # wait until torch starts loading
        time.sleep(0.01)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and b"Traceback" not in err


# --- eval and bench ---------------------------------------------------------------------------------

def test_answer_extraction():
    assert bench.extract_number("3 + 4 = 7.\n#### 7\nThe answer is 7") == 7
    assert bench.extract_number("So she has 1,250 apples left.") == 1250
    assert bench.extract_number("It is -3, not 2.5") == 2.5
    assert bench.extract_number("no idea") is None


def test_bundled_task_is_deterministic_and_checkable():
    a, b = bench.arithmetic_task(50), bench.arithmetic_task(50)
    assert a == b and len({q for q, _ in a}) > 40
    for q, ans in a:
        nums = [int(n) for n in re.findall(r"\d+", q)]
        assert len(nums) == 2 and ans in {nums[0] + nums[1], nums[0] - nums[1], nums[0] * nums[1]}


def test_eval_data_errors(smollm_dir, tmp_path, capsys):
    f = tmp_path / "d.jsonl"
    assert "No such file" in error_of(["eval", "--data", str(f)], capsys)
    f.write_text('{"question": "1+1?", "answer": "#### 2"}\n{"question": "oops"\n')
    assert f"{f}:2: not valid JSON" in error_of(["eval", "--data", str(f)], capsys)
    f.write_text('{"question": "1+1?", "answer": "#### 2"}\n{"question": "2+2?"}\n')
    assert f"{f}:2: needs the fields" in error_of(["eval", "--data", str(f)], capsys)
    f.write_text('{"question": "1+1?", "answer": "two"}\n')
    assert f"{f}:1: the answer does not end in" in error_of(["eval", "--data", str(f)], capsys)


def strict_json(text):
    def refuse(name):
        raise AssertionError(f"bare {name} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_eval_smoke(smollm_dir, tmp_path, capsys):
    out = tmp_path / "r.json"
    run.main(["eval", "--limit", "1", "--max-new-tokens", "20", "--width", "1,2", "--out", str(out)])
    text = capsys.readouterr().out
    for s in ("fine", "coarse"):
        for w in (1, 2):
            row = rf"^{s}\s+0\.5\s+{w}\s+\S+\s+\S+\s+0\.\d{{3}}\s+\S+\s+(\d+\.\d\d|nan)/16\s+\d+\s"
            assert re.search(row, text, re.M), text
    report = strict_json(out.read_text())
    assert report["questions"] == 1 and len(report["rows"]) == 4 and not list(tmp_path.glob("*.tmp"))
    assert {(r["sparsity"], r["width"]) for r in report["rows"]} == {(s, w) for s in ("fine", "coarse")
                                                                     for w in (1, 2)}
    assert set(report["methods"]) == {"dense", "CS fine 0.5", "CS coarse 0.5"} | {
        f"Sirius {s} 0.5 {w}" for s in ("fine", "coarse") for w in (1, 2)}
    for row in report["rows"]:  # numbers or null, never NaN
        assert all(v is None or isinstance(v, str) or math.isfinite(v) for v in row.values())


def test_eval_reads_gsm8k_jsonl(smollm_dir, tmp_path, capsys):
    data = tmp_path / "gsm8k.jsonl"
    data.write_text(json.dumps({"question": "What is 3 + 4?", "answer": "3 + 4 = 7\n#### 7"}) + "\n\n" +
                    json.dumps({"question": "What is 2 times 5?", "answer": "#### 10"}) + "\n")
    run.main(["eval", "--data", str(data), "--sparsity", "coarse", "--max-new-tokens", "8"])
    text = capsys.readouterr().out
    assert text.lstrip().startswith("2 questions") and re.search(r"^coarse\s", text, re.M)
    assert not re.search(r"^fine\s", text, re.M)


def test_bench_smoke(smollm_dir, capsys):
    run.main(["bench", "--quick", "--max-new-tokens", "16"])
    text = capsys.readouterr().out
    rows = [line.split() for line in text.splitlines()
            if line.split() and line.split()[0] in ("dense", "CS", "Sirius", "fine", "coarse", "1")]
    assert len(rows) >= 5 + 7 + 2  # 5 decode methods; dense + 2 modes x 3 fractions; the Sirius projection
    for row in rows:
        figures = [x for x in row if NUMBER.match(x)]
        assert figures and all(math.isfinite(float(x.split("/")[0])) for x in figures), row
    assert re.search(r"dense decode reaches \d+% of it", text)


def test_bench_mlp_plans_and_ideals():
    rows = bench.bench_mlp(32, 96, fractions=(0.75, 0.25), reps=2)
    assert [(r["mode"], r["f"], r["plan"]) for r in rows] == [
        ("dense", 1.0, "dense"), ("fine", 0.75, "stream"), ("coarse", 0.75, "coarse"),
        ("fine", 0.25, "gather"),
        ("coarse", 0.25, "coarse")]
    assert [r["ideal"] for r in rows] == [1.0, 1.0, 0.75, 0.5, 0.25]
    assert all(math.isfinite(r["ms"]) and r["ms"] > 0 for r in rows)


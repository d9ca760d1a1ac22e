"""run.py and bench.py: the demo end to end, the trace, eval and bench smoke runs, and the promise for bad
input: one `error:` line and exit 2 for a user's mistake, nothing half-written, 130 for Ctrl-C, a traceback
for a bug. The embedded model where its own tokenizer and chat template matter, else a tiny random one
(tests/test_faults.py: write_tiny_folder); more faults in tests/test_faults.py."""
import ast
import io
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
import tracing
from conftest import TINY_CONFIG, write_checkpoint
from test_faults import write_tiny_folder
from tracing import Trace

ROOT = Path(__file__).resolve().parent.parent
NUMBER = re.compile(r"^-?\d+(\.\d+)?(/\d+)?%?$")


@pytest.fixture(autouse=True)
def one_thread():
    """One thread: on a busy two-core machine two OpenMP threads make each step several times slower."""
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama folder with a character tokenizer, as run.py opens it (no EOS: runs go full
    length)."""
    return write_tiny_folder(tmp_path_factory.mktemp("tiny"))


def test_demo_subprocess_three_answers_and_table(smollm_dir):
    out = subprocess.run([sys.executable, "run.py", "--prompt", "What is 2 + 3?", "--max-new-tokens", "12",
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


def test_printer_colours_full_model_tokens(smollm_dir, capsys):
    tok = folder.load_tokenizer(smollm_dir)
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
def prompt():
    return torch.randint(0, TINY_CONFIG["vocab_size"], (12,), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("strict, width", [(False, 1), (True, 1), (False, 2)])
def test_trace_matches_the_run(tiny, prompt, strict, width):
    """Every period's record agrees with what the loop emitted: kept drafts and appended token in order,
    probabilities in [0, 1], kept drafts plausible (strict: the full model's own choice). Fine sparsity on
    the tiny model keeps whole windows in some periods and corrects others: both are checked."""
    periods = Trace()
    res = sirius_min.sirius(tiny, prompt, 48, sparsity="fine", width=width, strict=strict,
                            on_period=periods)
    assert len(periods) == len(res.advances)
    assert any(p.accepted > 0 for p in periods) and any(p.accepted < len(p.window) - 1 for p in periods)
    replay = [res.tokens[0]]
    for p in periods:
        assert p.window[0] == replay[-1] and 0 <= p.accepted <= len(p.window) - 1
        assert all(0.0 <= x <= 1.0 for x in p.probs) and len(p.probs) == len(p.window) - 1
        assert len(p.beams) == width
        assert p.beams[p.chosen] == p.accepted == max(p.beams)
        assert p.rule == ("argmax" if strict else "threshold")
        if not strict:
            assert all(x >= 0.1 for x in p.probs[:p.accepted])
            assert p.accepted == len(p.window) - 1 or p.probs[p.accepted] < 0.1
        replay += p.window[1:p.accepted + 1] + [p.appended]
    assert replay[:len(res.tokens)] == res.tokens  # the last period may be cut by the length budget
    assert sum(a for a in res.counted_advances) == sum(p.accepted + 1 for p in periods[:-1])
    if strict:  # kept drafts are the full model's argmax: the whole answer is dense greedy decoding
        assert res.tokens == sirius_min.generate(tiny, prompt, 48).tokens


def trace_errors(tiny, prompt, rule):
    """The largest difference between a trace's probabilities and the same recomputed here, without
    sirius_min: the full model's causal pass (a twin's fresh cache) over the verified text and the period's
    chosen path, its logits at each draft's parent (the path's previous node) in float64, softmax at 0.6
    (`probs`) and, sampling, at T (`target_probs`); q (`draft_probs`) from the sparse model stepping the path
    one token at a time after a dense prefill of the verified text, the fine MLP written out."""
    from conftest import twin
    from test_sirius import fine_mlp_by_hand

    T = 0.8 if rule == "speculative" else 0.0
    periods, width = Trace(), 2 if rule == "tree" else 1
    sirius_min.sirius(tiny, prompt, 30, sparsity="fine", keep=0.5, period=5, width=width,
                      strict=rule == "speculative", temperature=T, generator=torch.Generator().manual_seed(0),
                      on_period=periods)
    ref, verified, errors = twin(tiny), prompt.tolist(), []
    k = max(1, round(0.5 * TINY_CONFIG["intermediate_size"]))
    for p in periods:
        assert p.pos == len(verified) and len(p.probs) == len(p.window) - 1
        drafts = torch.tensor(p.window[1:])
        parents = ref(torch.tensor(verified + p.window), 0).double()[p.pos:-1]     # rows of d_1's parent, ..
        at = lambda probs: probs[torch.arange(len(drafts)), drafts]  # noqa: E731
        errors.append((at(torch.softmax(parents / 0.6, -1)) - torch.tensor(p.probs).double()).abs().max())
        if rule == "speculative":
            errors.append((at(torch.softmax(parents / T, -1)) - torch.tensor(p.target_probs)).abs().max())
            ref(torch.tensor(verified), 0)                                           # the verified prefix
            q = [torch.softmax(ref(torch.tensor([t]), p.pos + i, mlp=lambda j, x: fine_mlp_by_hand(
                x, tiny.layers[j], k))[0].double() / T, -1)[d] for i, (t, d) in enumerate(zip(p.window,
                                                                                        drafts.tolist()))]
            errors.append((torch.stack(q) - torch.tensor(p.draft_probs)).abs().max())
        verified += p.window[:p.accepted + 1]          # t0 and the kept drafts; the appended token is next t0
    assert len(periods) >= 5  # (every draft of a path is recorded and checked, kept or not)
    return float(max(errors))


@pytest.mark.parametrize("rule", ["threshold", "tree", "speculative"])
def test_trace_probabilities_are_the_full_models(tiny, prompt, rule):
    assert trace_errors(tiny, prompt, rule) < 1e-4


@pytest.mark.parametrize("plant, rule", [("temperature 1", "threshold"), ("own row", "threshold"),
                                         ("sampled p at T = 1", "speculative")])
def test_the_trace_check_catches_a_wrong_probability(tiny, prompt, monkeypatch, plant, rule):
    """Planted bugs the old check (the trace against the rule's own acceptance_probs) let through: p read at
    temperature 1, or from the draft's own row instead of its parent's; sampling's p and q at T = 1."""
    if plant == "temperature 1":
        monkeypatch.setattr(sirius_min, "ACCEPT_TEMPERATURE", 1.0)
    elif plant == "own row":
        real = sirius_min.acceptance_probs
        monkeypatch.setattr(sirius_min, "acceptance_probs",
                            lambda logits, parent, tokens: real(logits, torch.arange(len(tokens)), tokens))
    else:
        real = sirius_min.token_probs
        monkeypatch.setattr(sirius_min, "token_probs", lambda logits, sampling: real(
            logits, sirius_min.Sampling(1.0, sampling.top_p, sampling.generator)))
    assert trace_errors(tiny, prompt, rule) > 0.01


def test_no_trace_no_extra_work(tiny, prompt, monkeypatch):
    """Without a trace, strict mode computes no softmax at all and the default rule one per verification;
    asking for the trace changes the work, never the tokens."""
    calls = []
    for name in ("softmax", "log_softmax"):
        f = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, f=f, **k: calls.append(1) or f(*a, **k))
    res = sirius_min.sirius(tiny, prompt, 24, sparsity="fine", period=8, strict=True)
    assert calls == []
    plain = sirius_min.sirius(tiny, prompt, 24, sparsity="fine", period=8)
    assert len(calls) == len(plain.advances)
    seen = Trace()
    traced = sirius_min.sirius(tiny, prompt, 24, sparsity="fine", period=8, strict=True,
                               on_period=seen)
    assert traced.tokens == res.tokens and len(seen) == len(traced.advances)
    assert len(calls) > len(plain.advances)


def trace_of(out):
    trace = out[out.index("period by period"):]
    assert max(len(line) for line in trace.splitlines()) <= 104 and "|" in trace
    return trace


def test_trace_printout(tiny_dir, capsys):
    run.main(["--model", str(tiny_dir), "--prompt", "What is 2 + 3?", "--sparsity", "fine", "--sirius",
              "--trace", "--width", "2", "--max-new-tokens", "40", "--no-color"])
    trace = trace_of(capsys.readouterr().out)
    blocks = re.findall(r"^period \d+, position \d+: kept (\d+)/(\d+), "
                        r"(?:then .* \((correction|bonus)\)|stopped at .*); "
                        r"beam \d/2, kept per beam \[\d+, \d+\]$", trace, re.M)
    assert blocks and all(int(a) <= int(n) for a, n, _ in blocks)
    # each correction names the draft that failed and why: its probability below the threshold
    why = re.findall(r"^  draft .*: p (\S+) < 0\.1$", trace, re.M)
    assert len(why) == sum(kind == "correction" for *_, kind in blocks) > 0
    assert all(float(p) < 0.1 for p in why)


def test_trace_of_a_rejected_draft_the_full_model_writes_again(capsys):
    """The paper's rule on a flat row: after 2 the full model spreads its probability evenly, its own argmax
    3 barely ahead (p 0.092 < 0.1). In the first period the sparse draft 3 after 2 is rejected and the full
    model appends 3, the same token: counted as a correction, as the paper counts it, but the trace says
    what happened."""
    from types import SimpleNamespace
    from test_sirius import PROMPT, markov

    periods = Trace()
    res = sirius_min.sirius(markov({}, flat_rows=(2,)), PROMPT, 8, sparsity="fine", period=4,
                            on_period=periods)
    assert res.tokens == [1, 2, 3, 4, 5, 6, 7, 8] and res.from_full[2] and res.corrections == 1
    tok = SimpleNamespace(decode=lambda ids, skip_special_tokens: "".join(map(str, ids)))
    tracing.print_trace(tok, periods, SimpleNamespace(threshold=0.1, temperature=0.0), eos=[])
    trace = capsys.readouterr().out
    assert "period 1, position 2: kept 1/3, then '3' (rejected; the full model's token is the draft " \
           "itself)" in trace and "period 2, position 4: kept 3/3, then '7' (bonus)" in trace
    assert re.search(r"^  draft '3': p 0\.09\d+ < 0\.1$", trace, re.M) and "(correction)" not in trace


def test_sampled_trace_shows_p_and_q(tiny_dir, capsys):
    """--strict at T > 0 is speculative sampling: under each draft its p and q, and a rejected draft's
    chance of rejection 1 - p/q (rejection needs p < q)."""
    run.main(["--model", str(tiny_dir), "--prompt", "What is 2 + 3?", "--sparsity", "fine", "--sirius",
              "--trace", "--strict", "--temperature", "0.8", "--period", "6", "--max-new-tokens", "30"])
    out = capsys.readouterr().out
    assert out.startswith("prompt: What is 2 + 3?; sampled at T = 0.8, top-p 1.0, seed 0\n")
    trace = trace_of(out)
    assert "min(1, p/q)" in trace and "T = 0.8" in trace
    rows = trace.splitlines()
    for i, line in enumerate(rows):  # the window's three rows: tokens, then p, then q under each draft
        if line.startswith("  t0 ") or re.match(r"^  t0\s+\|", line):
            p = [float(x) for x in re.findall(r"p (\d\.\d{3})", line)]
            q = [float(x) for x in re.findall(r"q (\d\.\d{3})", rows[i + 1])]
            assert len(p) == len(q) == 5 and all(0 <= x <= 1 for x in p + q)
    rejected = re.findall(r"rejected with probability 1 - p/q = (\d\.\d{3})$", trace, re.M)
    assert rejected and all(0 <= float(r) <= 1 for r in rejected)


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
    (["--threshold", "inf"], "[0, 1]"), (["--max-new-tokens", "0"], ">= 1"), (["--threads", "-2"], "[1, "),
    (["--width", "0"], "[1, 64]"), (["eval", "--width", "1,x"], "whole number"),
    (["--dtype", "int8"], "invalid"),
    (["--device", "tpu"], "invalid choice"), (["--frobnicate"], "unrecognized arguments"),
    (["eval", "--limit", "0"], ">= 1"), (["bench", "--period", "1"], "[2, 1024]"),
    (["eval", "--out", ""], "expected a file name"), (["eval", "--out", "."], "not a folder"),
    (["eval", "--out", "/no/such/folder/r.json"], "its folder does not exist"),
    (["--dtype", "float16"], "float16 is very slow"),
    # sampling (issue 17): T >= 0 and finite, top-p in (0, 1], a whole seed; trees are not sampled
    (["--temperature", "-0.5"], "argument --temperature: expected a number >= 0"),
    (["--temperature", "nan"], "argument --temperature"), (["--temperature", "inf"], "--temperature"),
    (["--top-p", "0"], "argument --top-p: expected a number (0, 1]"), (["--top-p", "1.01"], "(0, 1]"),
    (["--top-p", "nan"], "(0, 1]"), (["--seed", "1.5"], "argument --seed: expected a whole number"),
    (["--seed", "x"], "argument --seed"), (["eval", "--seed", "-3"], "argument --seed"),
    (["--temperature", "0.7", "--width", "4"], "sampling drafts a chain: --width 1"),
    (["eval", "--temperature", "0.7", "--width", "1,2"], "sampling drafts a chain"),
    (["bench", "--temperature", "0.7"], "unrecognized arguments"),
    (["--compile"], "--compile is for CUDA"), (["eval", "--compile"], "--compile is for CUDA"),
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


def test_bad_stdin_prompt(smollm_dir, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"Tell me\ncaf\xe9 au lait?")))
    assert error_of(["--prompt", "-"], capsys) == "error: the prompt on stdin is not valid UTF-8 (line 2)\n"


def test_bench_py_errors_from_the_shell(tmp_path, capsys):
    """eval and bench live in bench.py: their user errors are one line, from the shell too (one process:
    each spends seconds importing torch; eval's are in test_bad_flags, and from the shell in test_faults)."""
    assert "--out" in error_of(["eval", "--out", str(tmp_path)], capsys)
    out = subprocess.run([sys.executable, "run.py", "bench", "--keep", "0.5,0.25"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr == "error: bench times one kept fraction (--keep F); its MLP " \
                                                 "table adds 0.75, 0.5 and 0.25\n"


@pytest.mark.parametrize("args, says", [
    (["HEAD", "--rounds", "0"], "error: argument --rounds: expected a whole number >= 1, got '0'\n"),
    (["no-such-rev"], "error: 'no-such-rev' is not a commit of this repository\n"),
])
def test_speed_against_refuses_what_it_cannot_run(args, says):
    """tests/speed_against.py refuses a count it cannot honour, or a revision git does not know, in one
    line before it makes a worktree (it imports no torch: fast)."""
    out = subprocess.run([sys.executable, "tests/speed_against.py", *args], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert (out.returncode, out.stderr, out.stdout) == (2, says, "")


@pytest.mark.parametrize("change, says", [
    ([1, 2], "expected a JSON object"),
    ({"max_position_embeddings": "long"}, "max_position_embeddings must be a whole number or null, got a "
                                          "string"),
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
    run.main(["--sirius", "--max-new-tokens", "4", "--prompt", "\ufeffred \x1b[31m text <|im_end|> ok?"])
    out = capsys.readouterr().out
    assert "\x1b[31m" not in out and "prompt: red \\x1b[31m text <|im_end|> ok?" in out


def test_no_import_cycle():
    """bench.py (eval and bench) and folder.py (opening a model folder) never import the command line: no
    import statement in them or in the repo's modules they import (at any depth, inside functions too)."""
    seen, todo = set(), ["bench", "folder"]
    while todo:
        name = todo.pop()
        if name in seen or not (ROOT / f"{name}.py").is_file():
            continue  # a library
        seen.add(name)
        for node in ast.walk(ast.parse((ROOT / f"{name}.py").read_text())):
            if isinstance(node, ast.Import):
                todo += [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                todo.append(node.module.split(".")[0])
    assert "run" not in seen and {"bench", "folder", "sirius_min", "checkpoint"} <= seen


def test_a_bug_keeps_its_traceback(tiny_dir, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("an internal bug")
    monkeypatch.setattr(run, "generate", broken)
    with pytest.raises(ValueError, match="an internal bug"):
        run.main(["--model", str(tiny_dir), "--max-new-tokens", "4"])


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
    assert f"{f}: no such file" in error_of(["eval", "--data", str(f)], capsys)
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


def test_eval_smoke(tiny_dir, tmp_path, capsys):
    out = tmp_path / "r.json"
    run.main(["eval", "--model", str(tiny_dir), "--limit", "1", "--max-new-tokens", "20", "--width", "1,2",
              "--out", str(out)])
    text = capsys.readouterr().out
    assert re.search(r"^1 questions, K = 16, threshold = 0.1, greedy;", text, re.M), text
    for s in ("fine", "coarse"):
        for w in (1, 2):
            row = rf"^{s}\s+0\.5\s+{w}\s+\S+\s+\S+\s+0\.\d{{3}}\s+\S+\s+(\d+\.\d\d|nan)/16\s+\d+\s"
            assert re.search(row, text, re.M), text
    report = strict_json(out.read_text())
    assert report["questions"] == 1 and len(report["rows"]) == 4 and list(tmp_path.iterdir()) == [out]
    assert (report["temperature"], report["top_p"], report["seed"]) == (0.0, 1.0, 0)
    assert {(r["sparsity"], r["width"]) for r in report["rows"]} == {(s, w) for s in ("fine", "coarse")
                                                                     for w in (1, 2)}
    assert set(report["methods"]) == {"dense", "CS fine 0.5", "CS coarse 0.5"} | {
        f"Sirius {s} 0.5 {w}" for s in ("fine", "coarse") for w in (1, 2)}
    for row in report["rows"]:  # numbers or null, never NaN
        assert all(v is None or isinstance(v, str) or math.isfinite(v) for v in row.values())


def test_eval_sampled_reproduces_with_its_seed(tiny_dir, tmp_path, capsys):
    """eval at T > 0 records T, top-p and the seed (header and JSON); the same seed gives the same report,
    another seed (almost surely) another one."""
    def report(seed):
        out = tmp_path / f"r{seed}.json"
        run.main(["eval", "--model", str(tiny_dir), "--limit", "2", "--max-new-tokens", "12", "--sparsity",
                  "fine", "--temperature", "1.5", "--top-p", "0.9", "--seed", str(seed), "--out", str(out)])
        assert "greedy" not in capsys.readouterr().out.split("questions")[1].splitlines()[0]
        return strict_json(out.read_text())
    first, again, other = report(7), report(7), report(8)
    assert (first["temperature"], first["top_p"], first["seed"]) == (1.5, 0.9, 7)
    assert first == again
    assert first["methods"] != other["methods"]


def test_eval_reads_gsm8k_jsonl(tiny_dir, tmp_path, capsys):
    data = tmp_path / "gsm8k.jsonl"
    data.write_text(json.dumps({"question": "What is 3 + 4?", "answer": "3 + 4 = 7\n#### 7"}) + "\n\n" +
                    json.dumps({"question": "What is 2 times 5?", "answer": "#### 10"}) + "\n")
    run.main(["eval", "--model", str(tiny_dir), "--data", str(data), "--sparsity", "coarse",
              "--max-new-tokens", "8"])
    text = capsys.readouterr().out
    assert text.lstrip().startswith("2 questions") and re.search(r"^coarse\s", text, re.M)
    assert not re.search(r"^fine\s", text, re.M)


def test_bench_smoke(tiny_dir, capsys):
    run.main(["bench", "--model", str(tiny_dir), "--quick", "--max-new-tokens", "16"])
    text = capsys.readouterr().out
    rows = [line.split() for line in text.splitlines()  # table rows: a name, then columns 2+ spaces apart
            if line.split() and line.split()[0] in ("dense", "CS", "Sirius", "fine", "coarse", "1")
            and len(re.split(r"\s{2,}", line.strip())) >= 3]
    assert len(rows) >= 5 + 7 + 2  # 5 decode methods; dense + 2 modes x 3 fractions; the Sirius projection
    for row in rows:
        figures = [x for x in row if NUMBER.match(x)]
        assert figures and all(math.isfinite(float(x.split("/")[0])) for x in figures), row
    assert re.search(r"dense decode reaches \d+% of it", text)


def test_bench_mlp_plans_and_ideals():
    rows = bench.bench_mlp(32, 96, fractions=(0.75, 0.25), reps=2)
    assert [(r["mode"], r["f"], r["plan"]) for r in rows] == [
        ("dense", 1.0, "dense"), ("fine", 0.75, "mask"), ("coarse", 0.75, "coarse"),
        ("fine", 0.25, "gather"),
        ("coarse", 0.25, "coarse")]
    assert [r["ideal"] for r in rows] == [1.0, 1.0, 0.75, 0.5, 0.25]
    assert all(math.isfinite(r["ms"]) and r["ms"] > 0 for r in rows)


"""run.py: the demo end to end, eval and bench smoke runs, and a one-line error for every bad value."""
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

import run

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
    assert header.split() == ["method", "tokens", "ms/token", "density", "AAL", "eff.", "density", "corrections"]
    sirius_row = next(line for line in text.splitlines() if line.startswith("Sirius (coarse)"))
    assert all(NUMBER.match(x) for x in sirius_row.split()[2:]), sirius_row
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


def error_of(argv, capsys):
    with pytest.raises(SystemExit) as e:
        run.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("argv, says", [
    (["--density", "0"], "density must be in (0, 1]"),
    (["--density", "1.5"], "density must be in (0, 1]"),
    (["--density", "half"], "expected a number"),
    (["--sparsity", "medium"], "invalid choice"),
    (["--period", "1"], "at least 2"),
    (["--period", "x"], "positive whole number"),
    (["--threshold", "-0.1"], ">= 0"),
    (["--threshold", "nan"], ">= 0"),
    (["--max-new-tokens", "0"], "positive whole number"),
    (["--threads", "-2"], "positive whole number"),
    (["--dtype", "int8"], "invalid choice"),
    (["--device", "tpu"], "invalid choice"),
    (["--frobnicate"], "unrecognized arguments"),
    (["eval", "--limit", "0"], "positive whole number"),
    (["bench", "--period", "1"], "at least 2"),
])
def test_bad_flags(argv, says, capsys):
    assert says in error_of(argv, capsys)


def test_bad_inputs(smollm_dir, tmp_path, capsys):
    assert "needs a sparse model" in error_of(["--sirius", "--sparsity", "none"], capsys)
    assert "model folder not found" in error_of(["--model", str(tmp_path / "nope")], capsys)
    assert "prompt is empty" in error_of(["--prompt", "   "], capsys)
    assert "exceeds the model's context" in error_of(["--prompt", "word " * 9000], capsys)
    if not __import__("torch").cuda.is_available():
        assert "no CUDA device" in error_of(["--device", "cuda"], capsys)


def test_eval_data_errors(smollm_dir, tmp_path, capsys):
    f = tmp_path / "d.jsonl"
    assert "no such file" in error_of(["eval", "--data", str(f)], capsys)
    f.write_text('{"question": "1+1?", "answer": "#### 2"}\n{"question": "oops"\n')
    assert f"{f}:2: not valid JSON" in error_of(["eval", "--data", str(f)], capsys)
    f.write_text('{"question": "1+1?", "answer": "#### 2"}\n{"question": "2+2?"}\n')
    assert f"{f}:2: needs the fields" in error_of(["eval", "--data", str(f)], capsys)
    assert "its folder does not exist" in error_of(["eval", "--out", str(tmp_path / "no" / "r.json")], capsys)
    f.write_text('{"question": "1+1?", "answer": "two"}\n')
    assert f"{f}:1: the answer does not end in" in error_of(["eval", "--data", str(f)], capsys)


def test_answer_extraction():
    assert run.extract_number("3 + 4 = 7.\n#### 7\nThe answer is 7") == 7
    assert run.extract_number("So she has 1,250 apples left.") == 1250
    assert run.extract_number("It is -3, not 2.5") == 2.5
    assert run.extract_number("no idea") is None


def test_bundled_task_is_deterministic_and_checkable():
    a, b = run.arithmetic_task(50), run.arithmetic_task(50)
    assert a == b and len({q for q, _ in a}) > 40
    for q, ans in a:
        nums = [int(n) for n in re.findall(r"\d+", q)]
        assert len(nums) == 2 and ans in {nums[0] + nums[1], nums[0] - nums[1], nums[0] * nums[1]}


def all_numbers_finite(obj):
    if isinstance(obj, dict):
        return all(all_numbers_finite(v) for v in obj.values())
    return not isinstance(obj, float) or math.isfinite(obj)


def test_eval_smoke(smollm_dir, tmp_path, capsys):
    out = tmp_path / "r.json"
    run.main(["eval", "--limit", "2", "--max-new-tokens", "24", "--out", str(out)])
    text = capsys.readouterr().out
    assert re.search(r"^fine\s+\S+\s+\S+\s+0\.\d{3}\s+\S+\s+\d+\.\d\d/16\s+\d\.\d{3}", text, re.M), text
    assert re.search(r"^coarse\s", text, re.M)
    report = json.loads(out.read_text())
    assert report["questions"] == 2 and set(report["sparsity"]) == {"fine", "coarse"}
    assert set(report["methods"]) == {"dense", "CS fine", "Sirius fine", "CS coarse", "Sirius coarse"}
    for s in report["sparsity"].values():  # 'recovered' is nan when sparsity lost nothing on 2 questions
        assert all(math.isfinite(v) for k, v in s.items() if k != "recovered")
    assert all_numbers_finite(report["methods"])


def test_bench_smoke(smollm_dir, capsys):
    run.main(["bench", "--quick", "--max-new-tokens", "16"])
    text = capsys.readouterr().out
    rows = [line.split() for line in text.splitlines()
            if line.split() and line.split()[0] in ("dense", "CS", "Sirius", "fine", "coarse")]
    assert len(rows) >= 5 + 7  # 5 decode methods; dense + 2 modes x 3 fractions of MLP rows
    for row in rows:
        figures = [x for x in row if NUMBER.match(x)]
        assert figures and all(math.isfinite(float(x.split("/")[0])) for x in figures), row


def test_eval_reads_gsm8k_jsonl(smollm_dir, tmp_path, capsys):
    data = tmp_path / "gsm8k.jsonl"
    data.write_text(json.dumps({"question": "What is 3 + 4?", "answer": "3 + 4 = 7\n#### 7"}) + "\n\n" +
                    json.dumps({"question": "What is 2 times 5?", "answer": "#### 10"}) + "\n")
    run.main(["eval", "--data", str(data), "--sparsity", "coarse", "--max-new-tokens", "16"])
    text = capsys.readouterr().out
    assert text.lstrip().startswith("2 questions") and re.search(r"^coarse\s", text, re.M)
    assert not re.search(r"^fine\s", text, re.M)


def test_bench_mlp_smoke():
    rows = run.bench_mlp(32, 96, fractions=(0.5, 0.25), reps=2)
    assert [(r["mode"], r["f"]) for r in rows] == [("dense", 1.0), ("fine", 0.5), ("coarse", 0.5),
                                                   ("fine", 0.25), ("coarse", 0.25)]
    for r in rows:
        assert all(math.isfinite(r[key]) and r[key] > 0 for key in ("ms", "ratio", "ideal"))

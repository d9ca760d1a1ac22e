"""bench.py's arithmetic: the eval's pooled AAL and recovered fraction, and the bench's period parts and
projection, on scripted results and scripted times (no real timing: what is checked is the bookkeeping)."""
import math
from types import SimpleNamespace

import pytest
import torch

import bench
from sirius_min import Result


def result(tokens, advances, density=0.7):
    return Result(tokens, [True] * len(tokens), density=density, period=4, advances=advances)


def test_eval_report_pools_periods_and_measures_what_sirius_recovered(capsys):
    """AAL pools the counted periods of every answer (not a mean of per-answer AALs); recovered is
    (Sirius - CS) / (full - CS) on accuracy; effective density uses the pooled AAL."""
    dense = [(True, 0.1, result([1, 2], [])), (True, 0.1, result([3], [])), (True, 0.1, result([4], [])),
             (False, 0.1, result([5], []))]                                         # accuracy 0.75
    cs = [(False, 0.5, result([9], [])), (True, 0.4, result([3], [])), (False, 0.5, result([9], [])),
          (False, 0.5, result([9], []))]                                            # accuracy 0.25
    sir = [(True, 0.2, result([1, 2], [4, 4, 1])), (True, 0.2, result([3], [2, 3])),  # counted: 4, 4 | 2
           (False, 0.2, result([7], [1])), (False, 0.2, result([5], []))]              # counted: none
    log = {"dense": dense, ("CS", "fine", 0.5): cs, ("Sirius", "fine", 0.5, 1): sir}
    args = SimpleNamespace(period=4, threshold=0.1, strict=False, width=[1], temperature=0.0, top_p=1.0,
                           seed=0)
    row = bench.eval_report(log, [("fine", 0.5)], args)["rows"][0]
    assert row["aal"] == pytest.approx(10 / 3) and row["periods"] == 3     # per-answer mean would be 3.0
    assert row["recovered"] == pytest.approx((0.5 - 0.25) / (0.75 - 0.25))
    assert row["effective_density"] == pytest.approx((3 * 0.7 + 1) / (10 / 3))
    assert "10/3" not in capsys.readouterr().out                           # printed as a number: 3.33/4


def scripted_timer(times):
    """bench.timer's stand-in: each call returns the next scripted number of seconds, and runs nothing."""
    it = iter(times)
    return lambda fn, reps, device: next(it)


def test_period_parts_and_projection(monkeypatch, capsys):
    """rest = period - root - (K-2)·draft - verify; projected ms/token = period / the AAL measured for the
    same width; the paper's AAL only beside the (sparsity, w) it was measured at."""
    K = 4
    steps = [0.010, 0.006, 0.008]                                  # dense, coarse, fine one-token steps
    parts = {1: [0.006, 0.006, 0.030, 0.100], 2: [0.006, 0.009, 0.040, 0.200]}   # root, draft, verify, period
    monkeypatch.setattr(bench, "timer", scripted_timer(steps + parts[1] + parts[2]))
    cfg = bench.llama3_8b_config(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=50)
    out = bench.bench_llama3_8b("cpu", torch.float32, 0.5, K, (1, 2), {1: 2.5, 2: 5.0}, reps=1, cfg=cfg,
                                context=8)
    for w, (root, draft, verify, period) in parts.items():
        assert out["parts"][w]["rest"] == pytest.approx(period - root - (K - 2) * draft - verify)
    printed = capsys.readouterr().out
    assert f"{0.100 / 2.5 * 1e3:.2f}" in printed and f"{0.200 / 5.0 * 1e3:.2f}" in printed
    assert "paper" not in printed.split("projected ms/token")[1]   # K = 4: no paper figure applies
    assert math.isclose(out["steps"]["coarse"], 0.006)

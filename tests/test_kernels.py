"""kernels.py: the fast sparse MLPs equal their masked-dense references; selection, scores, density, bench."""
import math
from types import SimpleNamespace

import pytest
import torch

from kernels import (GATHER_BELOW, coarse_mlp_reference, dense_mlp, density, fine_mlp,
                     fine_mlp_reference, griffin_scores, kept, mlp_bytes_ratio, select_coarse, select_fine,
                     slice_mlp, swiglu)

FRACTIONS = [0.25, 0.5, 0.75, 1.0]
LLAMA3_8B = SimpleNamespace(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                            num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False)


def random_mlp(h, D, T=1, seed=0, dtype=torch.float32):
    """x (T, h) and w_gate, w_up, w_down_t (D, h), weights ~ N(0, 0.02) as in a trained Llama."""
    g = torch.Generator().manual_seed(seed)
    w = [(0.02 * torch.randn(D, h, generator=g)).to(dtype) for _ in range(3)]
    return torch.randn(T, h, generator=g).to(dtype), w


@pytest.fixture(scope="module")
def llama3_layer():
    return random_mlp(4096, 14336)


def check_paths(x, w, f):
    """fine_mlp vs its reference and the sliced coarse MLP vs its masked reference, at kept fraction f."""
    D = w[0].shape[0]
    k = kept(D, f)
    assert (fine_mlp(x, *w, k) - fine_mlp_reference(x, *w, k)).abs().max() <= 1e-4
    idx = select_coarse(griffin_scores(swiglu(x, w[0], w[1])), k)
    assert (dense_mlp(x, *slice_mlp(*w, idx)) - coarse_mlp_reference(x, *w, idx)).abs().max() <= 1e-4


@pytest.mark.parametrize("f", FRACTIONS)
@pytest.mark.parametrize("T", [1, 5])
def test_fast_paths_match_references_small_odd_shape(f, T):
    x, w = random_mlp(37, 101, T)
    check_paths(x, w, f)


@pytest.mark.parametrize("f", FRACTIONS)
def test_fast_paths_match_references_llama3_8b_layer(llama3_layer, f):
    check_paths(*llama3_layer, f)


def test_every_fine_plan_is_exact(monkeypatch):
    """Each way fine_mlp reads the rows: stream and mask, gather W_up and W_down (fp32), gather W_down (bf16)."""
    x, w = random_mlp(64, 256)
    for below in (0.0, 2.0):
        monkeypatch.setattr("kernels.GATHER_BELOW", below)
        assert (fine_mlp(x, *w, 100) - fine_mlp_reference(x, *w, 100)).abs().max() <= 1e-5
    xb, wb = random_mlp(64, 256, dtype=torch.bfloat16)
    fast, ref = fine_mlp(xb, *wb, 100).float(), fine_mlp_reference(xb, *wb, 100).float()
    assert (fast - ref).abs().max() <= 1e-2 * ref.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [1, 4])
def test_full_density_is_dense(dtype, T):
    x, w = random_mlp(48, 120, T, dtype=dtype)
    dense = dense_mlp(x, *w).float()
    ref = ((torch.nn.functional.silu(x.double() @ w[0].double().T) * (x.double() @ w[1].double().T))
           @ w[2].double()).float()                                             # SwiGLU in float64
    tol = 1e-5 if dtype == torch.float32 else 2e-2 * ref.abs().max()
    assert (dense - ref).abs().max() <= tol
    everything = torch.arange(120)
    for out in (fine_mlp(x, *w, 120), fine_mlp_reference(x, *w, 120), dense_mlp(x, *slice_mlp(*w, everything)),
                coarse_mlp_reference(x, *w, everything)):
        assert (out.float() - dense).abs().max() <= (1e-5 if dtype == torch.float32 else 2e-2 * dense.abs().max())


def test_select_fine_is_top_abs():
    a = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    idx = select_fine(a, 12)
    for row, kept_row in zip(a, idx):
        brute = sorted(sorted(range(50), key=lambda j: -abs(row[j].item()))[:12])
        assert kept_row.tolist() == brute                                       # the same set, ascending


def test_select_coarse_is_sorted_top_scores():
    s = torch.rand(200, generator=torch.Generator().manual_seed(2))
    idx = select_coarse(s, 30)
    assert idx.tolist() == sorted(idx.tolist())
    assert set(idx.tolist()) == set(s.argsort(descending=True)[:30].tolist())


def test_griffin_scores_by_hand():
    x, (wg, wu, _) = random_mlp(5, 7, T=3, seed=3)
    z = [[0.0] * 7 for _ in range(3)]
    for t in range(3):
        for j in range(7):
            g = sum(x[t, c].item() * wg[j, c].item() for c in range(5))
            u = sum(x[t, c].item() * wu[j, c].item() for c in range(5))
            z[t][j] = g / (1 + math.exp(-g)) * u                                  # silu(g) * u
    for t in range(3):
        norm = math.sqrt(sum(v * v for v in z[t]))
        z[t] = [v / norm for v in z[t]]
    expected = [math.sqrt(sum(z[t][j] ** 2 for t in range(3))) for j in range(7)]
    scores = griffin_scores(swiglu(x, wg, wu))
    assert scores.dtype == torch.float32 and scores.shape == (7,)
    assert torch.allclose(scores, torch.tensor(expected), atol=1e-5)


def test_density_llama3_8b():
    got = [round(density(LLAMA3_8B, f, m), 3) for f in (0.5, 0.4) for m in ("coarse", "fine")]
    assert got == [0.649, 0.766, 0.579, 0.719]                     # the paper's 0.65 / 0.76 / 0.58 / 0.72
    assert density(LLAMA3_8B, 0.3, "dense") == 1.0
    for mode in ("coarse", "fine"):
        d = [density(LLAMA3_8B, f, mode) for f in (0.1, 0.25, 0.4, 0.5, 0.75, 1.0)]
        assert d == sorted(d) and len(set(d)) == len(d) and d[-1] == 1.0


def test_density_defaults_and_tying():
    cfg = SimpleNamespace(**{**vars(LLAMA3_8B), "head_dim": None})             # 4096 // 32 = 128 anyway
    assert density(cfg, 0.5, "coarse") == density(LLAMA3_8B, 0.5, "coarse")
    tied = SimpleNamespace(**{**vars(LLAMA3_8B), "tie_word_embeddings": True})
    assert density(tied, 0.5, "coarse") < density(LLAMA3_8B, 0.5, "coarse")     # MLP is a larger share


def test_kept_and_ideal_ratios():
    assert kept(14336, 0.5) == 7168 and kept(1536, 0.25) == 384 and kept(10, 0.01) == 1
    assert mlp_bytes_ratio(0.5, "coarse") == 0.5 and mlp_bytes_ratio(0.5, "fine") == pytest.approx(2 / 3)
    assert 0 < GATHER_BELOW <= 1


def test_param_count_llama3_8b():
    from kernels import param_count
    assert round(param_count(LLAMA3_8B) / 1e9, 2) == 8.03  # the published 8.03 B

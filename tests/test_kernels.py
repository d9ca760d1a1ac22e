"""kernels.py: the sparse MLPs against masked-dense products computed here, neuron selection, GRIFFIN scores,
and the density accounting.

Errors are measured against the output's scale (conftest.rel_err). Each comparison of a sparse product also
checks that its tolerance would catch a kept neuron dropped (`assert_exact`): a tolerance looser than one
neuron's contribution would pass a selection that is off by one.
"""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import kernels
from conftest import rel_err
from kernels import (GATHER_BELOW, coarse_mlp_reference, dense_mlp, density, fine_mlp, fine_mlp_reference,
                     fine_plan, griffin_scores, mlp_bytes_ratio, n_kept, param_count, select_coarse,
                     select_fine, slice_mlp, swiglu)

LLAMA3_8B = SimpleNamespace(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                            num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                            tie_word_embeddings=False)
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}   # relative; measured: ~2e-6 (fp32, 8B shape), ~5e-3 (bf16)


def random_mlp(h, D, T=1, seed=0, dtype=torch.float32):
    """x (T, h), w_gate_up (h, 2D) and w_down (D, h) in model.py's layout, weights ~ N(0, 0.02) as in a
    trained Llama."""
    g = torch.Generator().manual_seed(seed)
    w_gate_up, w_down = 0.02 * torch.randn(h, 2 * D, generator=g), 0.02 * torch.randn(D, h, generator=g)
    return torch.randn(T, h, generator=g).to(dtype), w_gate_up.to(dtype), w_down.to(dtype)


def masked_mlp(x, w_gate_up, w_down, idx):
    """The MLP with only neurons idx (k,), in float64 from the same inputs: what a sparse product owes."""
    D, x = w_down.shape[0], x.double()
    gate, up = x @ w_gate_up[:, idx].double(), x @ w_gate_up[:, D + idx].double()      # (T, k) each
    return (F.silu(gate) * up) @ w_down[idx].double()


def top_abs(a, k):
    """The k largest of |a| (D,), ascending, by sorting in Python: an independent top-k."""
    return sorted(sorted(range(len(a)), key=lambda j: -abs(float(a[j])))[:k])


def assert_exact(out, x, w_gate_up, w_down, idx):
    """out equals the masked MLP over idx within TOL of its scale, and TOL would catch one kept neuron
    dropped: the one with the weakest gate, where an off-by-one selection would go wrong."""
    want, tol = masked_mlp(x, w_gate_up, w_down, idx), TOL[x.dtype]
    assert rel_err(out, want) <= tol
    gate = F.silu(x.double() @ w_gate_up[:, idx].double())                     # (T, k)
    weakest = idx[gate.abs().sum(0).argmin()]
    dropped = masked_mlp(x, w_gate_up, w_down, idx[idx != weakest])
    assert rel_err(dropped, want) > tol, "the tolerance would not notice a dropped neuron"


def fine_taking(monkeypatch, *args):
    """fine_mlp(*args) and the path it took, seen by spying on the helpers that only one path calls:
    gather -> _kept_rows_dot, stream -> fine_mlp_reference, gather_down -> neither."""
    taken = []
    with monkeypatch.context() as m:
        for name, plan in (("_kept_rows_dot", "gather"), ("fine_mlp_reference", "stream")):
            real = getattr(kernels, name)
            m.setattr(kernels, name, lambda *a, real=real, plan=plan: taken.append(plan) or real(*a))
        out = kernels.fine_mlp(*args)
    return out, taken[0] if taken else "gather_down"


# --- fine sparsity: the fast paths, where they are taken ---------------------------------------------

@pytest.fixture(scope="module")
def llama3_layer():
    """One Llama-3-8B MLP (4096 x 14336), fp32, with W_up in neuron-major order as FineMLP holds it."""
    x, w_gate_up, w_down = random_mlp(4096, 14336)
    return x, w_gate_up, w_down, w_gate_up[:, 14336:].T.contiguous()


@pytest.mark.parametrize("keep", [0.25, 0.5])
def test_gather_llama3_8b_layer(monkeypatch, llama3_layer, keep):
    """A decode step at the 8B shape reads only the kept rows of W_up and W_down, and gets the masked MLP."""
    x, w_gate_up, w_down, up_rows = llama3_layer
    k = n_kept(14336, keep)
    assert fine_plan(x, k, 14336) == "gather"
    out, taken = fine_taking(monkeypatch, x, w_gate_up, w_down, k, up_rows)
    assert taken == "gather"
    idx = torch.tensor(top_abs(F.silu(x @ w_gate_up[:, :14336])[0], k))
    assert_exact(out, x, w_gate_up, w_down, idx)


@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("keep", [0.25, 0.5])
def test_gather_small_odd_shape(monkeypatch, T, keep):
    """An odd shape, one row (a decode step) or three (one depth of a Sirius tree, sharing one neuron set:
    the top k of sum over rows of |SiLU(gate)|). Without up_rows the W_down-only gather serves instead."""
    x, w_gate_up, w_down = random_mlp(37, 101, T, seed=T)
    k = n_kept(101, keep)
    a = F.silu(x @ w_gate_up[:, :101])
    idx = torch.tensor(top_abs(a.abs().sum(0), k))
    for up_rows, plan in ((w_gate_up[:, 101:].T.contiguous(), "gather"), (None, "gather_down")):
        out, taken = fine_taking(monkeypatch, x, w_gate_up, w_down, k, up_rows)
        assert taken == plan
        assert_exact(out, x, w_gate_up, w_down, idx)


def test_gather_down_bf16(monkeypatch):
    """bf16 on a CPU has no sampled_addmm: W_gate and W_up are read whole, only W_down's kept rows gathered.
    The set is the one bf16's own gate picks (bf16 rounding may reorder near-equal neurons)."""
    x, w_gate_up, w_down = random_mlp(64, 256, dtype=torch.bfloat16)
    k = n_kept(256, 0.25)
    assert fine_plan(x, k, 256) == "gather_down"
    out, taken = fine_taking(monkeypatch, x, w_gate_up, w_down, k, None)
    assert taken == "gather_down"
    idx = torch.tensor(top_abs(F.silu((x @ w_gate_up)[0, :256]), k))
    assert_exact(out, x, w_gate_up, w_down, idx)


def test_fine_plan_switches_at_gather_below(monkeypatch):
    """Keeping GATHER_BELOW * D neurons or more, scattered reads cost more than streaming everything: the
    reference (mask the dense activations) is then the product itself."""
    x, w_gate_up, w_down = random_mlp(16, 100)
    edge = math.ceil(GATHER_BELOW * 100)
    assert fine_plan(x, edge - 1, 100) == "gather" and fine_plan(x, edge, 100) == "stream"
    assert fine_plan(x.double(), 10, 100) == "gather" and fine_plan(x.half(), 10, 100) == "gather_down"
    _, taken = fine_taking(monkeypatch, x, w_gate_up, w_down, edge, w_gate_up[:, 100:].T.contiguous())
    assert taken == "stream"


@pytest.mark.parametrize("T", [1, 3])
def test_fine_reference_masks_the_top_gates(T):
    """The readable product, used where `stream` is the plan, against a mask built here."""
    x, w_gate_up, w_down = random_mlp(24, 90, T, seed=5)
    k = n_kept(90, 0.7)
    idx = torch.tensor(top_abs(F.silu(x @ w_gate_up[:, :90]).abs().sum(0), k))
    assert_exact(fine_mlp_reference(x, w_gate_up, w_down, k), x, w_gate_up, w_down, idx)


def test_rows_of_a_depth_share_one_set():
    """Several rows: one set, by sum over rows of |a|, which differs from each row's own top k (so a product
    that selected per row would fail the comparisons above)."""
    x, w_gate_up, w_down = random_mlp(37, 101, T=2, seed=2)
    k = n_kept(101, 0.25)
    a = F.silu(x @ w_gate_up[:, :101])
    shared = select_fine(a, k)
    assert shared.tolist() == top_abs(a.abs().sum(0), k)
    own = [select_fine(a[t:t + 1], k) for t in range(2)]
    assert all(o.tolist() == top_abs(a[t], k) for t, o in enumerate(own))
    assert all(not torch.equal(o, shared) for o in own)
    per_row = torch.cat([masked_mlp(x[t:t + 1], w_gate_up, w_down, own[t]) for t in range(2)])
    assert rel_err(fine_mlp(x, w_gate_up, w_down, k), per_row) > TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 4])
def test_keeping_every_neuron_is_dense(dtype, T):
    """keep = 1: every sparse product is the dense MLP, which is SwiGLU computed here in float64."""
    x, w_gate_up, w_down = random_mlp(48, 120, T, dtype=dtype)
    want = masked_mlp(x, w_gate_up, w_down, torch.arange(120))
    everything = torch.arange(120)
    for out in (dense_mlp(x, w_gate_up, w_down), fine_mlp(x, w_gate_up, w_down, 120),
                fine_mlp_reference(x, w_gate_up, w_down, 120),
                dense_mlp(x, *slice_mlp(w_gate_up, w_down, everything)),
                coarse_mlp_reference(x, w_gate_up, w_down, everything)):
        assert rel_err(out, want) <= TOL[dtype]


# --- coarse sparsity ---------------------------------------------------------------------------------

@pytest.mark.parametrize("keep", [0.25, 0.5])
@pytest.mark.parametrize("T", [1, 5])
def test_sliced_mlp_is_the_masked_mlp(T, keep):
    """The weights sliced once (a smaller dense MLP) give the MLP with the unkept neurons removed, for any
    number of rows; its reference does too. The neurons come from GRIFFIN scores of other (prompt) rows."""
    prompt, w_gate_up, w_down = random_mlp(37, 101, T=6, seed=3)
    x = torch.randn(T, 37, generator=torch.Generator().manual_seed(4))
    idx = select_coarse(griffin_scores(swiglu(prompt, w_gate_up)), n_kept(101, keep))
    small_gate_up, small_down = slice_mlp(w_gate_up, w_down, idx)
    assert small_gate_up.shape == (37, 2 * len(idx)) and small_down.shape == (len(idx), 37)
    assert_exact(dense_mlp(x, small_gate_up, small_down), x, w_gate_up, w_down, idx)
    assert_exact(coarse_mlp_reference(x, w_gate_up, w_down, idx), x, w_gate_up, w_down, idx)


def test_select_coarse_is_the_sorted_top_scores():
    s = torch.rand(200, generator=torch.Generator().manual_seed(2))
    assert select_coarse(s, 30).tolist() == sorted(s.argsort(descending=True)[:30].tolist())


def test_griffin_scores_by_hand():
    """Each prompt token's activation row normalised to unit length, then each neuron's column norm."""
    x, w_gate_up, _ = random_mlp(5, 7, T=3, seed=3)
    z = [[0.0] * 7 for _ in range(3)]
    for t in range(3):
        for j in range(7):
            g = sum(x[t, c].item() * w_gate_up[c, j].item() for c in range(5))
            u = sum(x[t, c].item() * w_gate_up[c, 7 + j].item() for c in range(5))
            z[t][j] = g / (1 + math.exp(-g)) * u                                  # silu(g) * u
    for t in range(3):
        norm = math.sqrt(sum(v * v for v in z[t]))
        z[t] = [v / norm for v in z[t]]
    expected = [math.sqrt(sum(z[t][j] ** 2 for t in range(3))) for j in range(7)]
    scores = griffin_scores(swiglu(x, w_gate_up))
    assert scores.dtype == torch.float32 and scores.shape == (7,)
    assert rel_err(scores, torch.tensor(expected)) <= 1e-5


# --- accounting --------------------------------------------------------------------------------------

def test_density_llama3_8b():
    """The paper's densities: coarse / fine 0.65 / 0.76 at keep 0.5 and 0.58 / 0.72 at keep 0.4."""
    got = [round(density(LLAMA3_8B, f, s), 3) for f in (0.5, 0.4) for s in ("coarse", "fine")]
    assert got == [0.649, 0.766, 0.579, 0.719]
    assert density(LLAMA3_8B, 0.3, "dense") == 1.0
    for sparsity in ("coarse", "fine"):
        d = [density(LLAMA3_8B, f, sparsity) for f in (0.1, 0.25, 0.4, 0.5, 0.75, 1.0)]
        assert d == sorted(d) and len(set(d)) == len(d) and d[-1] == 1.0


def test_density_defaults_and_tying():
    cfg = SimpleNamespace(**{**vars(LLAMA3_8B), "head_dim": None})             # 4096 // 32 = 128 anyway
    assert density(cfg, 0.5, "coarse") == density(LLAMA3_8B, 0.5, "coarse")
    tied = SimpleNamespace(**{**vars(LLAMA3_8B), "tie_word_embeddings": True})
    assert density(tied, 0.5, "coarse") < density(LLAMA3_8B, 0.5, "coarse")     # MLP is a larger share


@pytest.mark.parametrize("name", ["none", "sparse", "Fine", "cats", ""])
def test_density_rejects_unknown_sparsity(name):
    with pytest.raises(ValueError, match="unknown sparsity"):
        density(LLAMA3_8B, 0.5, name)


def test_param_count_llama3_8b():
    assert round(param_count(LLAMA3_8B) / 1e9, 2) == 8.03  # the published 8.03 B


def test_n_kept_rounds_once_and_checks_keep():
    assert n_kept(14336, 0.5) == 7168 and n_kept(1536, 0.25) == 384 and n_kept(10, 0.01) == 1
    assert n_kept(101, 0.25) == 25 and n_kept(7, 1.0) == 7
    assert n_kept(100, 0.257) == 26                                           # rounded, not floored
    for bad in (0, -0.5, 1.01, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="kept fraction"):
            n_kept(100, bad)


def test_mlp_bytes_ratio():
    """The share of an MLP's weights each plan reads: gather skips W_up and W_down rows, gather_down only
    W_down's, coarse all three."""
    assert mlp_bytes_ratio(0.5, "coarse") == 0.5 and mlp_bytes_ratio(0.5, "dense") == 1.0
    assert mlp_bytes_ratio(0.5, "gather") == pytest.approx(2 / 3)
    assert mlp_bytes_ratio(0.25, "gather_down") == pytest.approx(0.75)
    assert mlp_bytes_ratio(0.25, "stream") == 1.0

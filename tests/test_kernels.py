"""kernels.py: the sparse MLPs against masked-dense products computed here, the rows each plan reads, neuron
selection, GRIFFIN scores, and the density accounting.

Errors are measured against the output's scale (conftest.rel_err). Each comparison of a sparse product with
the masked MLP also checks that its tolerance would catch a kept neuron dropped (`assert_exact`): a tolerance
looser than one neuron's contribution would pass a selection that is off by one. The other comparisons (a
plan against another, keep = 1 against SwiGLU written out, per-row sets against the shared one) do not.
"""
import math
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kernels
from bench import mlp_bytes_ratio
from conftest import rel_err
from kernels import (GATHER_BELOW, MLPWeights, check_keep, dense_mlp, density, fine_mlp, fine_plan,
                     griffin_scores, n_kept, param_count, select_coarse, select_fine, slice_mlp, swiglu)
from sirius_min import reference_mlp

LLAMA3_8B = SimpleNamespace(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                            num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                            tie_word_embeddings=False)
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}   # relative; assert_exact checks it sees a dropped neuron
PLANS = ("gather", "gather_down", "mask")
aten = torch.ops.aten


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These products are small: on a busy machine, handing each one to a second thread can cost more time
    than the product itself. The count is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_mlp(h, D, T=1, seed=0, dtype=torch.float32, bias=False):
    """x (T, h) and MLPWeights in model.py's layout, weights ~ N(0, 0.02^2) (Llama's initialisation), up_rows
    (W_up neuron-major) for the gather plan, and biases (about a tenth of the pre-activations) if asked."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, std=0.02: (std * torch.randn(*shape, generator=g)).to(dtype)  # noqa: E731
    x, w_gate_up, w_down = r(T, h, std=1.0), r(h, 2 * D), r(D, h)
    mlp = MLPWeights(w_gate_up, w_down, up_rows=w_gate_up[:, D:].T.contiguous())
    if bias:
        mlp.b_gate_up, mlp.b_down = r(2 * D, std=0.02 * math.sqrt(h) / 10), r(h, std=0.01)
    return x, mlp


def silu(v):
    return v * torch.sigmoid(v)


def masked_mlp(x, mlp, idx, dtype=torch.float64):
    """The MLP with only neurons idx (k,), computed here from the same inputs (in float64 unless told):
    what a sparse product owes."""
    D, x = mlp.w_down.shape[0], x.to(dtype)
    gate, up = x @ mlp.w_gate_up[:, idx].to(dtype), x @ mlp.w_gate_up[:, D + idx].to(dtype)   # (T, k) each
    if mlp.b_gate_up is not None:
        gate, up = gate + mlp.b_gate_up[idx].to(dtype), up + mlp.b_gate_up[D + idx].to(dtype)
    out = (silu(gate) * up) @ mlp.w_down[idx].to(dtype)
    return out if mlp.b_down is None else out + mlp.b_down.to(dtype)


def gates(x, mlp, dtype=torch.float64):
    """|SiLU(gate)| summed over the rows (D,): what a fine selection ranks."""
    D = mlp.w_down.shape[0]
    gate = x.to(dtype) @ mlp.w_gate_up[:, :D].to(dtype)
    if mlp.b_gate_up is not None:
        gate = gate + mlp.b_gate_up[:D].to(dtype)
    return silu(gate).abs().sum(0)


def top_abs(a, k):
    """The k largest of |a| (D,), ascending, by sorting in Python: an independent top-k."""
    values = a.tolist()
    return torch.tensor(sorted(sorted(range(len(values)), key=lambda j: -abs(values[j]))[:k]))


def assert_exact(out, x, mlp, idx, dtype=torch.float64):
    """out equals the masked MLP over idx within TOL of its scale, and TOL would catch one kept neuron
    dropped: the one with the weakest gate, where an off-by-one selection would go wrong."""
    want, tol = masked_mlp(x, mlp, idx, dtype), TOL[x.dtype]
    assert rel_err(out, want) <= tol
    weakest = idx[gates(x, mlp, dtype)[idx].argmin()].view(1)
    its_term = masked_mlp(x, MLPWeights(mlp.w_gate_up, mlp.w_down, mlp.b_gate_up), weakest, dtype)
    assert rel_err(want - its_term, want) > tol, "the tolerance would not notice a dropped neuron"


# --- fine sparsity: every plan, and the plan taken ---------------------------------------------------

def test_fine_plan_by_device_dtype_and_keep():
    """CPU fp32/fp64 gathers below GATHER_BELOW and masks from it on; CPU bf16 gathers W_down's rows only;
    any other device (meta here, as CUDA would) masks."""
    x = torch.zeros(1, 16)
    edge = math.ceil(GATHER_BELOW * 100)
    assert fine_plan(x, edge - 1, 100) == "gather" and fine_plan(x, edge, 100) == "mask"
    assert fine_plan(x.double(), 10, 100) == "gather" and fine_plan(x.bfloat16(), 10, 100) == "gather_down"
    assert fine_plan(x.bfloat16(), 100, 100) == "gather_down"
    assert fine_plan(torch.zeros(1, 16, device="meta"), 10, 100) == "mask"


def test_gather_llama3_8b_layer():
    """A decode step at the 8B shape (4096 x 14336), keep 0.5, takes the gather plan and gets the masked MLP
    of the top gates. The reference is float32 here, by another route (index, then mm): float64 copies of
    this layer take seconds, and TOL still catches one dropped neuron."""
    x, mlp = random_mlp(4096, 14336)
    k = n_kept(14336, 0.5)
    assert fine_plan(x, k, 14336) == "gather"
    idx = top_abs(gates(x, mlp, torch.float32), k)
    assert_exact(fine_mlp(x, mlp, k), x, mlp, idx, torch.float32)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("keep", [0.25, 0.5, 0.9])
def test_every_plan_is_the_masked_mlp(T, keep, bias):
    """Every plan, forced, on an odd shape: one row (a decode step) or three (one depth of a Sirius tree,
    sharing one set: the top k of the sum over rows of |SiLU(gate)|), with and without biases (the gate
    bias enters the selection, the up bias counts for kept neurons, the down bias once). And sirius_min's
    reference, which gives each row its own set (a chain's sparse step is one row)."""
    x, mlp = random_mlp(37, 101, T, seed=T, bias=bias)
    k = n_kept(101, keep)
    idx = top_abs(gates(x, mlp), k)
    for plan in PLANS:
        assert_exact(fine_mlp(x, mlp, k, plan=plan), x, mlp, idx)
    own = [top_abs(gates(x[t:t + 1], mlp), k) for t in range(T)]
    assert_exact(reference_mlp(mlp, x[:1], k=k)[0], x[:1], mlp, own[0])
    per_row = torch.cat([masked_mlp(x[t:t + 1], mlp, own[t]) for t in range(T)])
    assert rel_err(reference_mlp(mlp, x, k=k)[0], per_row) <= TOL[torch.float32]
    if bias:                                                   # biases that change nothing would test nothing
        plain = MLPWeights(mlp.w_gate_up, mlp.w_down)
        assert rel_err(masked_mlp(x, plain, idx), masked_mlp(x, mlp, idx)) > TOL[torch.float32]


def test_gather_down_bf16():
    """bf16 on a CPU has no sampled_addmm: the plan taken reads W_gate and W_up whole and gathers only
    W_down's kept rows. The set is the one bf16's own gate picks (its rounding may reorder near-ties)."""
    x, mlp = random_mlp(64, 256, dtype=torch.bfloat16)
    k = n_kept(256, 0.25)
    assert fine_plan(x, k, 256) == "gather_down"
    gate = (x @ mlp.w_gate_up)[0, :256]
    assert_exact(fine_mlp(x, mlp, k), x, mlp, top_abs(silu(gate.double()), k))


def test_gather_needs_up_rows(monkeypatch):
    """Forced, the gather plan needs W_up neuron-major; chosen by fine_mlp for a model without it (a model
    that meets only sirius_min's contract), the plan that reads W_up whole is taken instead, same numbers."""
    x, mlp = random_mlp(16, 40)
    want = fine_mlp(x, mlp, 10, plan="gather")
    mlp.up_rows = None
    with pytest.raises(ValueError, match="up_rows"):
        fine_mlp(x, mlp, 10, plan="gather")
    taken, real = [], kernels.F.embedding_bag
    monkeypatch.setattr(kernels.F, "embedding_bag", lambda *a, **k: taken.append(1) or real(*a, **k))
    assert torch.allclose(fine_mlp(x, mlp, 10), want, rtol=1e-5, atol=1e-6) and taken


@pytest.mark.parametrize("plan", PLANS + (None,))
def test_gathering_plans_use_only_the_kept_rows(plan):
    """NaN in the unkept neurons' up rows (both copies: w_gate_up's and up_rows) and down rows. A plan that
    gathers the kept rows never lets them in: its result is finite and the masked MLP. The mask plan
    multiplies them by zero, and NaN * 0 is NaN: it reads everything. None: the plan fine_mlp takes (CPU,
    fp32, keep 0.25)."""
    x, mlp = random_mlp(24, 100, T=2, seed=7)
    k = n_kept(100, 0.25)
    kept = top_abs(gates(x, mlp), k)
    unkept = torch.tensor(sorted(set(range(100)) - set(kept.tolist())))
    w = MLPWeights(mlp.w_gate_up.clone(), mlp.w_down.clone(), up_rows=mlp.up_rows.clone())
    w.w_gate_up[:, 100 + unkept], w.up_rows[unkept], w.w_down[unkept] = math.nan, math.nan, math.nan
    out = fine_mlp(x, w, k, plan=plan)
    assert bool(out.isfinite().all()) == (plan != "mask")
    if plan != "mask":
        assert_exact(out, x, mlp, kept)


class WeightReads(TorchDispatchMode):
    """Counts the bytes of the given weights that the torch ops run under it read: an op reads all of each
    weight (or view of one) it is given, except the two gathers, which read the rows their indices name:
    embedding_bag's weight rows, and sampled_addmm's mat2 columns where its sparse pattern has entries."""

    def __init__(self, *weights):
        super().__init__()
        self.storages, self.bytes = {w.untyped_storage().data_ptr() for w in weights if w is not None}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for i, a in enumerate(args if not func.is_view else ()):          # a view reads nothing
            if not isinstance(a, torch.Tensor) or a.layout != torch.strided \
                    or a.untyped_storage().data_ptr() not in self.storages:
                continue
            if func.overloadpacket in (aten._embedding_bag, aten._embedding_bag_forward_only) and i == 0:
                read = args[1].unique().numel() * a.shape[1]               # rows named by the indices
            elif func.overloadpacket is aten.sparse_sampled_addmm and i == 2:
                read = args[0].col_indices().unique().numel() * a.shape[0]  # columns of mat2 in the pattern
            else:
                read = a.numel()
            self.bytes += read * a.element_size()
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("plan", ("dense", "coarse") + PLANS)
@pytest.mark.parametrize("keep", [0.25, 0.5])
def test_mlp_bytes_ratio_is_what_each_plan_reads(plan, keep):
    """The ideal ratio of a plan is the bytes of weights its decode step reads (counted op by op as it runs,
    each read counted, so reading a weight twice counts twice), over the dense MLP's weight bytes."""
    x, mlp = random_mlp(24, 100, seed=8)
    k = n_kept(100, keep)
    if plan == "coarse":
        mlp = slice_mlp(mlp, torch.arange(0, 100, 100 // k))
    with WeightReads(mlp.w_gate_up, mlp.w_down, mlp.up_rows) as reads:
        dense_mlp(x, mlp) if plan in ("dense", "coarse") else fine_mlp(x, mlp, k, plan=plan)
    assert reads.bytes / (3 * 24 * 100 * 4) == pytest.approx(mlp_bytes_ratio(keep, plan))


@pytest.mark.parametrize("plan", PLANS)
def test_selection_order_does_not_matter(monkeypatch, plan):
    """select_fine returns its set in no particular order; every plan gives the masked MLP whether the set
    comes ascending, descending or shuffled. Gather sorts it itself: a CSR pattern's column indices must be
    ascending (torch checks that only when asked, as here; its CPU kernel happens to accept them unsorted)."""
    x, mlp = random_mlp(37, 101, T=2, seed=4)
    k = n_kept(101, 0.4)
    idx = top_abs(gates(x, mlp), k)
    assert sorted(select_fine(silu(x @ mlp.w_gate_up[:, :101]), k).tolist()) == idx.tolist()
    real = kernels.select_fine
    shuffle = torch.randperm(k, generator=torch.Generator().manual_seed(1))
    for order in (lambda i: i.sort().values, lambda i: i.sort(descending=True).values, lambda i: i[shuffle]):
        monkeypatch.setattr(kernels, "select_fine", lambda a, k, order=order: order(real(a, k)))
        with torch.sparse.check_sparse_tensor_invariants():
            assert_exact(fine_mlp(x, mlp, k, plan=plan), x, mlp, idx)


def test_rows_of_a_depth_share_one_set():
    """Several rows: one set, by sum over rows of |a|, which differs from each row's own top k (so a product
    that selected per row would fail the comparisons above)."""
    x, mlp = random_mlp(37, 101, T=2, seed=2)
    k = n_kept(101, 0.25)
    a = silu(x @ mlp.w_gate_up[:, :101])
    shared = select_fine(a, k).sort().values
    assert shared.tolist() == top_abs(a.abs().sum(0), k).tolist()
    own = [select_fine(a[t:t + 1], k).sort().values for t in range(2)]
    assert all(o.tolist() == top_abs(a[t], k).tolist() for t, o in enumerate(own))
    assert all(not torch.equal(o, shared) for o in own)
    per_row = torch.cat([masked_mlp(x[t:t + 1], mlp, own[t]) for t in range(2)])
    assert rel_err(fine_mlp(x, mlp, k), per_row) > TOL[torch.float32]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 4])
def test_keeping_every_neuron_is_dense(dtype, T, bias):
    """keep = 1: the dense MLP, the fine MLP through the plan it takes and through each plan (but gather in
    bf16: a CPU has no bf16 sampled_addmm), sirius_min's reference MLP (k = D, and dense), and the MLP sliced
    to every neuron all equal SwiGLU written out here in float64."""
    x, mlp = random_mlp(48, 120, T, dtype=dtype, bias=bias)
    D = 120
    xd, w, wd = x.double(), mlp.w_gate_up.double(), mlp.w_down.double()
    gate, up = xd @ w[:, :D], xd @ w[:, D:]
    if bias:
        gate, up = gate + mlp.b_gate_up[:D].double(), up + mlp.b_gate_up[D:].double()
    want = (gate * torch.sigmoid(gate) * up) @ wd + (mlp.b_down.double() if bias else 0)
    outs = [dense_mlp(x, mlp), fine_mlp(x, mlp, D), reference_mlp(mlp, x, k=D)[0], reference_mlp(mlp, x)[0],
            dense_mlp(x, slice_mlp(mlp, torch.arange(D)))]
    outs += [fine_mlp(x, mlp, D, plan=p) for p in PLANS if dtype == torch.float32 or p != "gather"]
    for out in outs:
        assert rel_err(out, want) <= TOL[dtype]


# --- coarse sparsity ---------------------------------------------------------------------------------

@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("keep", [0.25, 0.5])
@pytest.mark.parametrize("T", [1, 5])
def test_sliced_mlp_is_the_masked_mlp(T, keep, bias):
    """The weights sliced once (a smaller dense MLP, biases sliced alike) give the MLP with the unkept
    neurons removed, for any number of rows. The neurons come from GRIFFIN scores of other (prompt) rows."""
    prompt, mlp = random_mlp(37, 101, T=6, seed=3, bias=bias)
    x = torch.randn(T, 37, generator=torch.Generator().manual_seed(4))
    idx = select_coarse(griffin_scores(swiglu(prompt, mlp)), n_kept(101, keep))
    small = slice_mlp(mlp, idx)
    assert small.w_gate_up.shape == (37, 2 * len(idx)) and small.w_down.shape == (len(idx), 37)
    assert small.w_gate_up.is_contiguous() and small.up_rows is None
    if bias:
        assert small.b_gate_up.shape == (2 * len(idx),) and small.b_down is mlp.b_down
    assert_exact(dense_mlp(x, small), x, mlp, idx)


def test_select_coarse_is_the_sorted_top_scores():
    s = torch.rand(200, generator=torch.Generator().manual_seed(2))
    assert select_coarse(s, 30).tolist() == sorted(s.argsort(descending=True)[:30].tolist())


def test_griffin_scores_by_hand():
    """Each prompt token's activation row normalised to unit length, then each neuron's column norm."""
    x, mlp = random_mlp(5, 7, T=3, seed=3)
    z = [[0.0] * 7 for _ in range(3)]
    for t in range(3):
        for j in range(7):
            g = sum(x[t, c].item() * mlp.w_gate_up[c, j].item() for c in range(5))
            u = sum(x[t, c].item() * mlp.w_gate_up[c, 7 + j].item() for c in range(5))
            z[t][j] = g / (1 + math.exp(-g)) * u                                  # silu(g) * u
    for t in range(3):
        norm = math.sqrt(sum(v * v for v in z[t]))
        z[t] = [v / norm for v in z[t]]
    expected = [math.sqrt(sum(z[t][j] ** 2 for t in range(3))) for j in range(7)]
    scores = griffin_scores(swiglu(x, mlp))
    assert scores.dtype == torch.float32 and scores.shape == (7,)
    assert rel_err(scores, torch.tensor(expected)) <= 1e-5


# --- accounting --------------------------------------------------------------------------------------

def test_density_llama3_8b():
    """Coarse / fine 0.649 / 0.766 at keep 0.5 and 0.579 / 0.719 at keep 0.4. The paper prints 0.65 / 0.76
    and 0.58 / 0.72: three of these rounded, and 0.76 where 0.766 rounds to 0.77."""
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


@pytest.mark.parametrize("attention_bias", [False, True])
@pytest.mark.parametrize("mlp_bias", [False, True])
def test_param_count_is_a_built_llama(attention_bias, mlp_bias):
    """param_count against the parameters of a Llama built here from torch.nn layers, as Hugging Face's
    LlamaForCausalLM lays them out (every projection with a bias where the config says so)."""
    h, D, L, heads, kv_heads, hd, V = 24, 40, 3, 4, 2, 8, 50
    cfg = SimpleNamespace(hidden_size=h, intermediate_size=D, num_hidden_layers=L, num_attention_heads=heads,
                          num_key_value_heads=kv_heads, head_dim=hd, vocab_size=V, tie_word_embeddings=False,
                          attention_bias=attention_bias, mlp_bias=mlp_bias)
    lin, norm = torch.nn.Linear, torch.nn.RMSNorm
    layer = [lin(h, heads * hd, attention_bias), lin(h, kv_heads * hd, attention_bias),       # q, k
             lin(h, kv_heads * hd, attention_bias), lin(heads * hd, h, attention_bias),       # v, o
             lin(h, D, mlp_bias), lin(h, D, mlp_bias), lin(D, h, mlp_bias),                   # gate, up, down
             norm(h), norm(h)]
    outside = [torch.nn.Embedding(V, h), lin(h, V, bias=False), norm(h)]                      # lm_head untied
    count = lambda modules: sum(p.numel() for m in modules for p in m.parameters())  # noqa: E731
    assert param_count(cfg) == count(outside) + L * count(layer)


def test_density_counts_the_biases_of_the_rows_read():
    """With mlp_bias, a neuron skipped skips its bias too: fine skips k fewer up rows and biases and down rows
    (2h + 1 each), coarse also the gate's (3h + 2)."""
    cfg = SimpleNamespace(**{**vars(LLAMA3_8B), "mlp_bias": True})
    h, D, L, total = 4096, 14336, 32, param_count(cfg)
    skipped = D - n_kept(D, 0.4)
    assert (1 - density(cfg, 0.4, "fine")) * total == pytest.approx(L * skipped * (2 * h + 1), rel=1e-9)
    assert (1 - density(cfg, 0.4, "coarse")) * total == pytest.approx(L * skipped * (3 * h + 2), rel=1e-9)


@pytest.mark.parametrize("name", ["none", "sparse", "Fine", "cats", ""])
def test_density_rejects_unknown_sparsity(name):
    with pytest.raises(ValueError, match="unknown sparsity"):
        density(LLAMA3_8B, 0.5, name)


def test_param_count_llama3_8b():
    assert round(param_count(LLAMA3_8B) / 1e9, 2) == 8.03  # the published 8.03 B


def test_n_kept_rounds_once():
    assert n_kept(14336, 0.5) == 7168 and n_kept(1536, 0.25) == 384 and n_kept(10, 0.01) == 1
    assert n_kept(101, 0.25) == 25 and n_kept(7, 1.0) == 7
    assert n_kept(100, 0.257) == 26                                           # rounded, not floored


@pytest.mark.parametrize("bad", [0, -0.5, 1.01, float("nan"), float("inf")])
def test_check_keep_rejects(bad):
    with pytest.raises(ValueError, match="kept fraction"):
        check_keep(bad)
    with pytest.raises(ValueError, match="kept fraction"):
        density(LLAMA3_8B, bad, "fine")
    for good in (1e-6, 0.5, 1.0):
        check_keep(good)

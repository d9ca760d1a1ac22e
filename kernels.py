"""The MLP products of Sirius's two sparse models, their neuron selection, and the density accounting.

Needs only torch: copy this file into another project as is. Weights are stored one neuron per row:
w_gate, w_up (D, h) as in Hugging Face, and w_down_t (D, h) = HF's down_proj (h, D) transposed, so a neuron's
down-projection is one contiguous row that a sparse step can read alone. x is (T, h); a decode step has T = 1.
Timings quoted below: one thread of a 2-core AMD EPYC (AVX2), fp32, Llama-3-8B layer (h 4096, D 14336).
"""
import warnings

import torch
import torch.nn.functional as F

GATHER_BELOW = 0.6  # kept fractions below this read only the kept rows; above, stream all and mask (fine_mlp)


def kept(D, f):
    """How many of D neurons a kept fraction f keeps: the one rounding rule used everywhere."""
    assert 0 < f <= 1, f"kept fraction must be in (0, 1], got {f}"
    return max(1, round(f * D))


def down_proj(c, w):
    """c (T, D) @ w (D, h): combine w's rows (w_down_t's neurons) with weights c.

    On a CPU without AVX512, torch multiplies bf16/fp16 in this layout with a generic loop, 5-40x slower than
    F.linear on the HF layout; embedding_bag sums rows with fp32 accumulation at full speed (one bag per token),
    and a multi-token pass is faster upcast to fp32 (faster even than bf16 F.linear on the HF layout).
    """
    if w.device.type != "cpu" or w.dtype in (torch.float32, torch.float64):
        return c @ w
    if c.shape[0] == 1:
        rows = torch.arange(w.shape[0], device=w.device)[None]        # (1, D)
        return F.embedding_bag(rows, w, per_sample_weights=c, mode="sum")
    return (c.float() @ w.float()).to(w.dtype)


def dense_mlp(x, w_gate, w_up, w_down_t):
    """SwiGLU: (silu(x Wg^T) * (x Wu^T)) @ W_down^T, with W_down^T stored as w_down_t (D, h).

    The transposed W_down makes a dense fp32 decode step 1-4 % slower at the 8B shape, ~8 % at h 576 (MKL's
    gemv is a little slower on it); it buys the fine path reading single neurons' rows. Multi-token passes
    run as fast as with the HF layout.
    """
    return down_proj(swiglu(x, w_gate, w_up), w_down_t)                # (T, D) @ (D, h)


def swiglu(x, w_gate, w_up):
    """The MLP's neuron activations (T, D): silu(x Wg^T) * (x Wu^T)."""
    return F.silu(F.linear(x, w_gate)) * F.linear(x, w_up)


# --- fine-grained (paper: FSparse, CATS-style): per token, the k neurons with the largest |SiLU(gate)| -------

def select_fine(a, k):
    """Indices of the k largest |a| along the last dim, ascending (sorted rows are read in memory order)."""
    return a.abs().topk(k, dim=-1, sorted=False).indices.sort(dim=-1).values


def fine_mlp_reference(x, w_gate, w_up, w_down_t, k):
    """The readable fine-sparse MLP for any T: the dense MLP with each token's unkept neurons zeroed."""
    a = F.silu(F.linear(x, w_gate))                                    # (T, D)
    keep = torch.zeros_like(a).scatter_(-1, select_fine(a, k), 1.0)    # (T, D) 0/1 mask, k ones per row
    return down_proj(a * keep * F.linear(x, w_up), w_down_t)        # (T, h)


def _fine_plan(x, k, D):
    """Which rows a fine decode step reads: "stream" (all, then mask), "gather" (only the kept rows of W_up and
    W_down) or "gather_down" (all of W_up, the kept rows of W_down)."""
    if k >= GATHER_BELOW * D:
        return "stream"
    return "gather" if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) else "gather_down"


def _kept_rows_dot(x, w, idx):
    """w[idx] @ x[0] (k,) without copying the rows: sampled_addmm takes x's dot product with w's rows only
    where a (1, D) CSR pattern has an entry."""
    k = idx.numel()
    with warnings.catch_warnings():                                    # torch warns once that CSR is "beta"
        warnings.simplefilter("ignore")
        pattern = torch.sparse_csr_tensor(torch.tensor([0, k]), idx, torch.zeros(k, dtype=x.dtype),
                                          (1, w.shape[0]), check_invariants=False)
    return torch.sparse.sampled_addmm(pattern, x, w.t(), beta=0.0).values()


def fine_mlp(x, w_gate, w_up, w_down_t, k):
    """The fine-sparse MLP of one decode token, reading only the kept rows of W_up and W_down.

    The gate is dense: the selection needs all of it. Measured ways to read the kept rows (Llama-3-8B layer,
    f = 0.5, time / dense): index_select W_up rows into a preallocated buffer, then mv: 1.25 (the copy writes
    as much as it reads; W_up[idx] @ x, allocating each step: 3.9); the same copy in L3-sized chunks: 1.00;
    dense up + embedding_bag down: 1.03; sampled_addmm up (x's dot product with the kept rows only, no copy)
    + embedding_bag down: 0.89, kept. A COO sparse.mm down is as fast here, slower at small shapes and
    inexact in bf16; sorting indices is within noise. A gathered row costs ~1.6x a streamed one (a jump, a
    fresh prefetch), so at f >= GATHER_BELOW streaming everything and masking wins. sampled_addmm is
    fp32/fp64 only: other dtypes compute up densely.
    """
    D = w_gate.shape[0]
    plan = _fine_plan(x, k, D)
    if x.shape[0] != 1 or plan == "stream":
        return fine_mlp_reference(x, w_gate, w_up, w_down_t, k)
    a = F.silu(F.linear(x, w_gate))[0]                                 # (D,) dense gate
    idx = select_fine(a, k)                                            # (k,) ascending
    u = _kept_rows_dot(x, w_up, idx) if plan == "gather" else F.linear(x, w_up)[0, idx]   # (k,)
    c = (a[idx] * u)[None]                                             # (1, k) weight of each kept row
    return F.embedding_bag(idx[None], w_down_t, per_sample_weights=c, mode="sum")   # (1, h)


# --- coarse-grained (paper: CSparse, GRIFFIN): neurons chosen once from the prompt ------------------------

def griffin_scores(z):
    """Per-neuron score (D,) fp32 from the MLP activations z (T, D) = swiglu(...) of the dense prompt prefill.

    Each token's activation row is normalised first, so every prompt token gets an equal vote; a neuron's
    score is then the L2 norm of its column: large if it fires strongly for many tokens.
    """
    z = z.float()
    z = z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)               # each token's row to unit length
    return z.norm(dim=0)                                               # (D,)


def select_coarse(scores, k):
    """The k best-scored neurons, ascending."""
    return scores.topk(k, sorted=False).indices.sort().values


def slice_mlp(w_gate, w_up, w_down_t, idx):
    """The kept neurons' rows as three new contiguous (k, h) matrices: the coarse model is a smaller dense MLP."""
    return tuple(w.index_select(0, idx) for w in (w_gate, w_up, w_down_t))


def coarse_mlp_reference(x, w_gate, w_up, w_down_t, idx):
    """The readable coarse-sparse MLP: the dense MLP with the same unkept neurons zeroed for every token."""
    keep = torch.zeros(w_gate.shape[0], dtype=x.dtype, device=x.device).index_fill_(0, idx, 1.0)   # (D,)
    return down_proj(swiglu(x, w_gate, w_up) * keep, w_down_t)


# --- accounting ------------------------------------------------------------------------------------------

def param_count(cfg):
    """All parameters of a Llama from its config: embeddings (and an untied lm_head), attention, MLP, norms."""
    h, D, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    hd = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    attn = 2 * h * hd * (cfg.num_attention_heads + cfg.num_key_value_heads)   # q, o and k, v projections
    embed = cfg.vocab_size * h * (1 if getattr(cfg, "tie_word_embeddings", False) else 2)
    return L * (attn + 3 * h * D + 2 * h) + h + embed                       # + 2 norms a layer, final norm


def density(cfg, f, mode):
    """Parameters read per generated token / all parameters (the paper's accounting, SIRIUS.md §2).

    Attention, norms, embeddings and lm_head (once if tied) are dense and counted; only MLP rows are skipped:
    coarse reads 3hk per layer, fine h*D (its dense gate) + 2hk, with k = kept(D, f). mode "none" = "dense".
    """
    h, D, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    k = D if mode in ("dense", "none") else kept(D, f)
    mlp_read = {"dense": 3 * h * D, "none": 3 * h * D, "coarse": 3 * h * k, "fine": h * D + 2 * h * k}[mode]
    total = param_count(cfg)
    return (total - L * (3 * h * D - mlp_read)) / total


def mlp_bytes_ratio(f, mode):
    """Ideal sparse/dense MLP decode time: weights read, since a batch-1 step is memory-bound (SIRIUS.md §6)."""
    return {"dense": 1.0, "coarse": f, "fine": (1 + 2 * f) / 3}[mode]

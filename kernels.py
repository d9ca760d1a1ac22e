"""The MLP products of Sirius's two sparse models, their neuron selection, and the density accounting.

Needs only torch: copy this file into another project as is. Weights follow model.py's one layout, (in, out),
applied as `x @ W`: w_gate_up (h, 2D) holds W_gate^T and W_up^T side by side, w_down (D, h) is W_down^T.
A row of w_down is one neuron's down-projection, so a sparse step can read a neuron's row alone. x is (T, h);
a decode step has T = 1. `keep` is the kept fraction f of the D MLP neurons; `density` is parameters read
per token over all parameters, a property of a whole model.
"""
import warnings

import torch
import torch.nn.functional as F

SPARSITIES = ("dense", "fine", "coarse")
GATHER_BELOW = 0.6  # fine_mlp reads only the kept rows when keep < this; above, streaming all rows is faster


def n_kept(D, keep):
    """How many of D neurons a kept fraction keeps: the one rounding rule used everywhere."""
    if not 0 < keep <= 1:
        raise ValueError(f"the kept fraction must be in (0, 1], got {keep}")
    return max(1, round(keep * D))


def swiglu(x, w_gate_up):
    """The MLP's neuron activations (T, D): silu(x W_gate^T) * (x W_up^T), both read in one product."""
    gate, up = (x @ w_gate_up).chunk(2, dim=-1)                        # (T, D) each
    return F.silu(gate) * up


def dense_mlp(x, w_gate_up, w_down):
    """SwiGLU MLP: (T, h) -> (T, h)."""
    return swiglu(x, w_gate_up) @ w_down                               # (T, D) @ (D, h)


# --- fine-grained (paper: FSparse): per token, the k neurons with the largest |SiLU(gate)| ------------------
# CATS, which the paper builds on, keeps neurons above a threshold calibrated offline; like the paper's code,
# we keep exactly the top k instead, so every step reads the same number of rows.

def select_fine(a, k):
    """The k neurons with the largest |a| (a: (T, D) gate activations), ascending.

    One row (a decode step) picks its own top k. Several rows (one depth of a Sirius tree) share one set, the
    top k of sum over rows of |a|, so that a level reads one set of rows for all its branches. Ascending order
    is what `_kept_rows_dot`'s sparse pattern requires (CSR column indices are sorted within a row).
    """
    return a.abs().sum(0).topk(k, sorted=False).indices.sort().values


def fine_mlp_reference(x, w_gate_up, w_down, k):
    """The readable fine-sparse MLP: the dense MLP with the unkept neurons zeroed."""
    D = w_down.shape[0]
    a = F.silu(x @ w_gate_up[:, :D])                                   # (T, D)
    keep = torch.zeros(D, dtype=x.dtype, device=x.device).index_fill_(0, select_fine(a, k), 1.0)
    return (swiglu(x, w_gate_up) * keep) @ w_down


def fine_plan(x, k, D):
    """How a fine step reads the weights, and so which ideal (bytes) ratio it can reach (`mlp_bytes_ratio`):
    "gather": only the kept rows of W_up and W_down (CPU, fp32/fp64, where sampled_addmm exists);
    "gather_down": all of W_gate and W_up in one product, the kept rows of W_down (other devices and dtypes);
    "stream": everything, then mask (when so many neurons are kept that scattered reads cost more)."""
    if k >= GATHER_BELOW * D:
        return "stream"
    return "gather" if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) else "gather_down"


def _kept_rows_dot(x, w_rows, idx):
    """(x @ w_rows[idx].T) (T, k) without copying the rows: sampled_addmm computes x's dot products with
    w_rows' rows only where a (T, D) CSR pattern has an entry (the same ascending idx in every row)."""
    T, k = x.shape[0], idx.numel()
    with warnings.catch_warnings():                                    # torch warns once that CSR is "beta"
        warnings.simplefilter("ignore")
        pattern = torch.sparse_csr_tensor(torch.arange(0, T * k + 1, k), idx.repeat(T),
                                          torch.zeros(T * k, dtype=x.dtype), (T, w_rows.shape[0]))
        return torch.sparse.sampled_addmm(pattern, x, w_rows.t(), beta=0.0).values().view(T, k)


def fine_mlp(x, w_gate_up, w_down, k, up_rows=None):
    """The fine-sparse MLP, reading only the kept neurons' rows where the machine allows (see `fine_plan`).

    The gate is dense: choosing the neurons needs all of it. `up_rows` is W_up in neuron-major (D, h) order,
    which the "gather" plan needs to read one neuron's up weights as one contiguous row (`FineMLP` in
    sirius_min.py holds it). Equal to `fine_mlp_reference` up to rounding.
    """
    D = w_down.shape[0]
    plan = fine_plan(x, k, D)
    if plan == "stream":
        return fine_mlp_reference(x, w_gate_up, w_down, k)
    if plan == "gather" and up_rows is not None:
        a = F.silu(x @ w_gate_up[:, :D])                               # (T, D): the gate half only
        idx = select_fine(a, k)                                        # (k,) ascending
        c = a[:, idx] * _kept_rows_dot(x, up_rows, idx)                # (T, k) kept activations
    else:                                                              # "gather_down"
        gate, up = (x @ w_gate_up).chunk(2, dim=-1)
        a = F.silu(gate)
        idx = select_fine(a, k)
        c = a[:, idx] * up[:, idx]
    # Sum of c-weighted rows of w_down, one bag per token: reads only the kept rows.
    return F.embedding_bag(idx.expand(x.shape[0], -1), w_down, per_sample_weights=c, mode="sum")


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
    """The k best-scored neurons, ascending (so sliced weights keep the model's neuron order)."""
    return scores.topk(k, sorted=False).indices.sort().values


def slice_mlp(w_gate_up, w_down, idx):
    """The kept neurons' weights as new contiguous matrices (h, 2k) and (k, h): a smaller dense MLP."""
    D = w_down.shape[0]
    return w_gate_up[:, torch.cat([idx, D + idx])].contiguous(), w_down.index_select(0, idx)


def coarse_mlp_reference(x, w_gate_up, w_down, idx):
    """The readable coarse-sparse MLP: the dense MLP with the same unkept neurons zeroed for every token."""
    keep = torch.zeros(w_down.shape[0], dtype=x.dtype, device=x.device).index_fill_(0, idx, 1.0)   # (D,)
    return (swiglu(x, w_gate_up) * keep) @ w_down


# --- accounting ------------------------------------------------------------------------------------------

def param_count(cfg):
    """All parameters of a Llama from its config: embeddings (and untied lm_head), attention, MLP, norms."""
    h, D, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    hd = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    attn = 2 * h * hd * (cfg.num_attention_heads + cfg.num_key_value_heads)   # q, o and k, v projections
    embed = cfg.vocab_size * h * (1 if getattr(cfg, "tie_word_embeddings", False) else 2)
    return L * (attn + 3 * h * D + 2 * h) + h + embed                       # + 2 norms a layer, final norm


def density(cfg, keep, sparsity):
    """Parameters read per generated token / all parameters: the paper's accounting of a sparse model.

    Attention, norms, embeddings and lm_head (once if tied) are dense and counted; only MLP rows are skipped:
    coarse reads 3hk per layer, fine h*D (its dense gate) + 2hk, with k = n_kept(D, keep).
    """
    if sparsity not in SPARSITIES:
        raise ValueError(f"unknown sparsity {sparsity!r}: expected one of {', '.join(SPARSITIES)}")
    h, D, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    k = D if sparsity == "dense" else n_kept(D, keep)
    mlp_read = {"dense": 3 * h * D, "coarse": 3 * h * k, "fine": h * D + 2 * h * k}[sparsity]
    total = param_count(cfg)
    return (total - L * (3 * h * D - mlp_read)) / total


def mlp_bytes_ratio(keep, plan):
    """Ideal sparse/dense time of one decode-step MLP: the share of its weights a plan reads (a batch-1 step
    is memory-bound). plan: "dense", "coarse" or one of `fine_plan`'s."""
    return {"dense": 1.0, "coarse": keep, "gather": (1 + 2 * keep) / 3, "gather_down": (2 + keep) / 3,
            "stream": 1.0}[plan]

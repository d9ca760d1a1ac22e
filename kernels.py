"""The MLP products of Sirius's two sparse models, their neuron selection, and the density accounting.

Needs only torch: copy this file into another project as is. Weights follow model.py's one layout, (in, out),
applied as `x @ W` (MLPWeights); a row of w_down is one neuron's, so a sparse step can read a neuron's row
alone. x is (T, h); a decode step has T = 1. `keep` is the kept fraction f of the D MLP neurons; `density` is
parameters read per token over all parameters, a property of a whole model.
"""
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SPARSITIES = ("dense", "fine", "coarse")
# fine_mlp on a CPU in fp32 gathers the kept rows while keep < GATHER_BELOW, else masks the dense product:
# 0.55, a fixed choice that gathers at the paper's f = 0.5. bench.py's bench_fine_plans measures both plans.
GATHER_BELOW = 0.55


@dataclass
class MLPWeights:
    """One layer's MLP weights, the `mlp` argument below. model.py's Block has the same attributes; any object
    with them will do (the last three may be None or absent)."""
    w_gate_up: torch.Tensor                   # (h, 2D): W_gate^T | W_up^T
    w_down: torch.Tensor                      # (D, h): W_down^T, one row per neuron
    b_gate_up: torch.Tensor | None = None     # (2D,): gate | up biases (checkpoints with mlp_bias)
    b_down: torch.Tensor | None = None        # (h,)
    up_rows: torch.Tensor | None = None       # (D, h): W_up neuron-major, for fine_mlp's "gather" plan


def _plus(y, bias):
    """y + bias, where a checkpoint without biases has None."""
    return y if bias is None else y + bias


def check_keep(keep):
    """A kept fraction must be in (0, 1]: raises ValueError otherwise (nan included)."""
    if not 0 < keep <= 1:
        raise ValueError(f"the kept fraction must be in (0, 1], got {keep}")


def n_kept(D, keep):
    """How many of D neurons a kept fraction keeps (see check_keep): the one rounding rule used everywhere."""
    return max(1, round(keep * D))


def gate_and_up(x, mlp):
    """The gate and up pre-activations (T, D) each, both read in one product."""
    return _plus(x @ mlp.w_gate_up, getattr(mlp, "b_gate_up", None)).chunk(2, dim=-1)


def swiglu(x, mlp):
    """The MLP's neuron activations (T, D): silu(x W_gate^T + b_gate) * (x W_up^T + b_up)."""
    gate, up = gate_and_up(x, mlp)
    return F.silu(gate) * up


def dense_mlp(x, mlp):
    """SwiGLU MLP: (T, h) -> (T, h)."""
    return _plus(swiglu(x, mlp) @ mlp.w_down, getattr(mlp, "b_down", None))         # (T, D) @ (D, h)


# --- fine-grained (paper: FSparse): per token, the k neurons with the largest |SiLU(gate)| ------------------
# CATS keeps neurons above a threshold calibrated offline; like the paper's code, we keep the top k instead.

def select_fine(act, k):
    """The k neurons (k,), in no particular order, with the largest |act| (act: (T, D), SiLU(gate)). Several
    rows (one depth of a Sirius tree) share one set, by the sum over rows of |act|: one set of rows read."""
    return act.abs().sum(0).topk(k, sorted=False).indices


def fine_plan(x, k, D):
    """How fine_mlp reads the weights, and so its ideal (bytes) ratio (bench.mlp_bytes_ratio). "gather" (CPU
    fp32/fp64, where sampled_addmm exists): all of W_gate, the kept rows of W_up and W_down. "gather_down"
    (CPU, other dtypes): W_gate and W_up whole, W_down's kept rows. "mask": every weight, unkept neurons
    zeroed: off the CPU (CUDA's embedding_bag, as its source reads, loops over all k rows for each output
    element), inside a captured graph, and on a CPU in fp32/fp64 from GATHER_BELOW."""
    if x.device.type != "cpu" or torch.compiler.is_compiling():    # sparse CSR is not traced: mask there
        return "mask"
    if x.dtype not in (torch.float32, torch.float64):
        return "gather_down"
    return "gather" if k < GATHER_BELOW * D else "mask"


def _kept_rows_dot(x, w_rows, idx):
    """(x @ w_rows[idx].T) (T, k) without copying the rows: sampled_addmm computes x's dot products with
    w_rows' rows only where a (T, D) CSR pattern has an entry (the same ascending idx in every row)."""
    T, k = x.shape[0], idx.numel()
    with warnings.catch_warnings():                                    # torch warns once that CSR is "beta"
        warnings.simplefilter("ignore")
        pattern = torch.sparse_csr_tensor(torch.arange(0, T * k + 1, k), idx.repeat(T),
                                          torch.zeros(T * k, dtype=x.dtype), (T, w_rows.shape[0]))
        return torch.sparse.sampled_addmm(pattern, x, w_rows.t(), beta=0.0).values().view(T, k)


def fine_mlp(x, mlp, k, *, plan=None):
    """The fine-sparse MLP (T, h), read as `fine_plan` says by a fixed rule (`plan` forces one): on a CPU in
    fp32, the kept neurons' rows gathered while keep < GATHER_BELOW, faster or not on the machine at hand.
    The gate is dense: choosing the neurons needs all of it. "gather" reads a neuron's up weights as one
    contiguous row of `mlp.up_rows` (W_up neuron-major, made once at load)."""
    D, b_down = mlp.w_down.shape[0], getattr(mlp, "b_down", None)
    if plan is None:
        plan = fine_plan(x, k, D)
        if plan == "gather" and getattr(mlp, "up_rows", None) is None:
            plan = "gather_down"                   # a model without W_up neuron-major reads W_up whole
    if plan == "gather":
        if getattr(mlp, "up_rows", None) is None:
            raise ValueError("fine_mlp's gather plan needs mlp.up_rows: W_up as (D, h) neuron rows")
        b_gate_up = getattr(mlp, "b_gate_up", None)
        b_gate, b_up = (None, None) if b_gate_up is None else b_gate_up.chunk(2)
        act = F.silu(_plus(x @ mlp.w_gate_up[:, :D], b_gate))          # (T, D): the gate half only
        idx = select_fine(act, k).sort().values                        # (k,) ascending, as CSR requires
        up = _plus(_kept_rows_dot(x, mlp.up_rows, idx), None if b_up is None else b_up[idx])   # (T, k)
    else:
        gate, up = gate_and_up(x, mlp)                                 # (T, D) each: W_gate, W_up whole
        act = F.silu(gate)
        if plan == "mask":
            kept = torch.zeros_like(act[0]).index_fill_(0, select_fine(act, k), 1.0)   # (D,): 1 if kept
            return _plus((act * up * kept) @ mlp.w_down, b_down)
        idx = select_fine(act, k)                                      # "gather_down": (k,)
        up = up[:, idx]                                                # (T, k)
    c = act[:, idx] * up                                               # (T, k) kept activations
    # Sum of c-weighted rows of w_down, one bag per token: reads only the kept rows.
    down = F.embedding_bag(idx.expand(x.shape[0], -1), mlp.w_down, per_sample_weights=c, mode="sum")
    return _plus(down, b_down)


# --- coarse-grained (paper: CSparse, GRIFFIN): neurons chosen once from the prompt ------------------------
def griffin_scores(z):
    """Per-neuron score (D,) fp32 from the activations z (T, D) of the dense prompt prefill: each token's row
    normalised (an equal vote each), then each neuron's column norm: large if it fires for many tokens."""
    z = z.float()
    z = z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)               # each token's row to unit length
    return z.norm(dim=0)                                               # (D,)


def select_coarse(scores, k):
    """The k best-scored neurons, ascending (so sliced weights keep the model's neuron order)."""
    return scores.topk(k, sorted=False).indices.sort().values


def slice_mlp(mlp, idx, out=None):
    """The neurons idx (k,) as a smaller dense MLP: contiguous weights (h, 2k) and (k, h), gate and up biases
    sliced alike, b_down unchanged: new tensors, or written in place into `out` (an MLPWeights of them)."""
    D, h = mlp.w_down.shape
    cols = torch.cat([idx, D + idx])                                   # gate | up columns of the kept neurons
    b_gate_up = getattr(mlp, "b_gate_up", None)
    if out is None:
        new = mlp.w_down.new_empty
        out = MLPWeights(new(h, len(cols)), new(len(idx), h), None if b_gate_up is None else new(len(cols)),
                         getattr(mlp, "b_down", None))
    torch.index_select(mlp.w_gate_up, 1, cols, out=out.w_gate_up)
    torch.index_select(mlp.w_down, 0, idx, out=out.w_down)
    if b_gate_up is not None:
        torch.index_select(b_gate_up, 0, cols, out=out.b_gate_up)
    return out


# --- accounting ------------------------------------------------------------------------------------------
def param_count(cfg):
    """All parameters of a Llama from its config: embeddings (and untied lm_head), attention, MLP, norms, the
    biases of attention_bias (q, k, v, o), qkv_bias (q, k, v), mlp_bias (gate, up, down), qk_norm's norms."""
    h, D, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    hd = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    q_o, k_v = hd * cfg.num_attention_heads, hd * cfg.num_key_value_heads
    o_bias, qk_norm = getattr(cfg, "attention_bias", False), getattr(cfg, "qk_norm", False)
    attn = 2 * h * (q_o + k_v) + (o_bias or getattr(cfg, "qkv_bias", False)) * (q_o + 2 * k_v) + o_bias * h
    attn += qk_norm * 2 * hd                                             # one (hd,) weight each for q and k
    mlp = 3 * h * D + getattr(cfg, "mlp_bias", False) * (2 * D + h)
    embed = cfg.vocab_size * h * (1 if getattr(cfg, "tie_word_embeddings", False) else 2)
    return L * (attn + mlp + 2 * h) + h + embed                          # + 2 norms a layer, final norm


def density(cfg, keep, sparsity):
    """Parameters read per generated token / all parameters, by the paper's accounting: all but the skipped
    MLP rows count as read, the whole embedding table too (once if tied; a token reads one row of an untied
    one). The MLP reads 3hk a layer coarse, h*D (its dense gate) + 2hk fine, k = n_kept(D, keep); biases count
    with their rows (all of b_gate for fine)."""
    if sparsity not in SPARSITIES:
        raise ValueError(f"unknown sparsity {sparsity!r}: expected one of {', '.join(SPARSITIES)}")
    if sparsity != "dense":
        check_keep(keep)
    h, D, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    k = D if sparsity == "dense" else n_kept(D, keep)
    gate, up, down = (D, k, k) if sparsity == "fine" else (k, k, k)   # neurons whose rows are read
    bias = getattr(cfg, "mlp_bias", False)
    mlp_read = h * (gate + up + down) + bias * (gate + up + h)
    mlp_all = 3 * h * D + bias * (2 * D + h)
    total = param_count(cfg)
    return (total - L * (mlp_all - mlp_read)) / total

"""A small Llama decoder in plain PyTorch (batch size 1) with a preallocated KV cache.

The network of Hugging Face's `LlamaForCausalLM`, without `transformers`; checkpoint.py reads a Hugging Face
folder into it. A forward pass takes a 1-D tensor of T token ids and returns (T, vocab) logits. The MLP is a seam: `forward(...,
mlp=fn)` swaps in another MLP (a sparse one) for that pass while attention stays as it is.

Slots and positions. The cache has `max_seq_len` slots; a slot holds one token's keys and values. A pass
writes its T tokens to slots start_pos .. start_pos+T-1 and attends to the slots below start_pos+T. By
default a token's RoPE position is its slot, so rolling back is calling forward again from an earlier
start_pos: nothing is copied or cropped. A Sirius tree is where they part: its nodes take scratch slots in a
row, a node's position is pos + its depth, a mask says which slots it sees (the prefix and its ancestors),
and `move_kv` copies the chosen path's keys and values back to the slots of their positions.

One layout: every matrix is stored (in, out) and applied as `x @ W` (HF's (out, in) transposed at load).
A decode step multiplies one vector by each matrix, which streams long rows fastest, so q/k/v are fused into
one (h, q+2kv) matrix, gate and up into one (h, 2D), and the lm_head is (h, vocab); a tied embedding is read
from the lm_head's columns (held once).
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.bias import CausalBias, causal_lower_right


@dataclass
class LlamaConfig:
    # Defaults are SmolLM2-135M-Instruct's. Field names follow Hugging Face's config.json.
    hidden_size: int = 576               # h: width of the residual stream
    intermediate_size: int = 1536        # D: MLP neurons per layer (what sparsity prunes)
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int = 3         # < num_attention_heads means grouped-query attention
    head_dim: int = 64
    vocab_size: int = 49152
    rms_norm_eps: float = 1e-5
    rope_theta: float = 100000.0
    rope_scaling: dict | None = None     # None, or {"rope_type": "linear" or "llama3", and its parameters}
    attention_bias: bool = False         # q, k, v and o projections have biases
    mlp_bias: bool = False               # gate, up and down projections have biases
    tie_word_embeddings: bool = True     # lm_head shares the embedding matrix
    max_position_embeddings: int = 8192  # the context the model was trained for
    eos_token_id: list = field(default_factory=lambda: [2])

def rope_tables(cfg: LlamaConfig, max_len: int):
    """cos/sin tables (max_len, head_dim), a row per position, for HF's rotate-half RoPE, rescaled."""
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).double() / cfg.head_dim)
    s = cfg.rope_scaling or {"rope_type": "default"}
    if s["rope_type"] == "linear":      # every wavelength stretched by `factor`: position p turns as p/factor
        inv_freq = inv_freq / s["factor"]
    if s["rope_type"] == "llama3":      # Llama 3.1: long wavelengths slowed by `factor`, short kept, a ramp
        wavelen, old = 2 * math.pi / inv_freq, s["original_max_position_embeddings"]
        lo, hi = s["low_freq_factor"], s["high_freq_factor"]
        ramp = ((old / wavelen - lo) / (hi - lo)).clamp(0, 1)
        scaled = (1 - ramp) * inv_freq / s["factor"] + ramp * inv_freq
        inv_freq = torch.where(wavelen > old / lo, inv_freq / s["factor"],
                               torch.where(wavelen < old / hi, inv_freq, scaled))
    angles = torch.outer(torch.arange(max_len).double(), inv_freq)        # (max_len, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)                          # (max_len, head_dim)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x, cos, sin):
    """x (heads, T, hd) rotated by position: the first and second halves of each head form the pairs."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def rms_norm(x, weight, eps):
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def linear(x, w, b=None):
    """x @ w, plus b where the layer has a bias: the one (in, out) layout."""
    return x @ w if b is None else torch.addmm(b, x, w)


def grouped_attention(q, k, v, mask):
    """softmax(q k^T / sqrt(hd)) v over the slots `mask` allows, each key/value head shared by g query heads.

    q (H, T, hd); k, v (Hkv, S, hd); mask None (every slot), a CausalBias (a chain) or bool (T, S).
    A chain keeps SDPA's own grouped heads (enable_gqa) and lower-right causal mask, which flash takes. Any
    other call folds each KV head's g query heads into the query length, (Hkv, g*T, hd), and repeats the mask
    per head: plain masked attention that SDPA's memory-efficient kernel takes (a bool mask with enable_gqa
    would leave only the math kernel, which copies K/V per query head). The same numbers either way.
    """
    if isinstance(mask, CausalBias):
        return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, enable_gqa=True)[0]
    (H, T, hd), g = q.shape, q.shape[0] // k.shape[0]
    folded = q.reshape(-1, g * T, hd)                       # row j*T + t: query head kv*g + j at token t
    if mask is not None:
        mask = mask.repeat(g, 1)                            # (g*T, S): the group's heads see the same slots
    out = F.scaled_dot_product_attention(folded[None], k[None], v[None], attn_mask=mask)[0]  # (Hkv, g*T, hd)
    return out.view(H, T, hd)


def weight(*shape, device=None, dtype=None):
    """An allocated, uninitialised parameter: filled by load_model or load_state_dict, never trained."""
    return nn.Parameter(torch.empty(shape, device=device, dtype=dtype), requires_grad=False)


class Block(nn.Module):
    """One decoder layer's weights, (in, out); the MLP's are what kernels.py's sparse MLPs read.

    attn_norm, mlp_norm (h,)            RMSNorm weights before attention and before the MLP
    wqkv (h, q+2kv), bqkv (q+2kv,)      [W_q^T | W_k^T | W_v^T] (q = heads * hd, kv = kv_heads * hd)
    wo (q, h), bo (h,)                  attention output projection
    w_gate_up (h, 2D), b_gate_up (2D,)  [W_gate^T | W_up^T]: gate and up read in one product
    w_down (D, h), b_down (h,)          W_down^T: row n is neuron n's contribution to the output
    up_rows (D, h)                      W_up, row n = neuron n's up weights: a copy made where kernels.py's
        fine "gather" plan reads single neurons' rows (CPU, float32/64; see `Llama.make_up_rows`), else None.
    A bias is None where the config has none (attention_bias, mlp_bias).
    """

    def __init__(self, cfg: LlamaConfig, device=None, dtype=None):
        super().__init__()
        h, D, w = cfg.hidden_size, cfg.intermediate_size, dict(device=device, dtype=dtype)
        q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        attn_bias, mlp_bias = cfg.attention_bias, cfg.mlp_bias
        self.attn_norm, self.mlp_norm = weight(h, **w), weight(h, **w)
        self.wqkv, self.bqkv = weight(h, q + 2 * kv, **w), weight(q + 2 * kv, **w) if attn_bias else None
        self.wo, self.bo = weight(q, h, **w), weight(h, **w) if attn_bias else None
        self.w_gate_up, self.b_gate_up = weight(h, 2 * D, **w), weight(2 * D, **w) if mlp_bias else None
        self.w_down, self.b_down = weight(D, h, **w), weight(h, **w) if mlp_bias else None
        self.register_buffer("up_rows", None, persistent=False)     # derived: not in the state_dict

    def mlp(self, x):
        """The layer's own dense SwiGLU MLP, (T, h) -> (T, h): down(silu(gate(x)) * up(x))."""
        gate, up = linear(x, self.w_gate_up, self.b_gate_up).chunk(2, dim=-1)     # (T, D) each
        return linear(F.silu(gate) * up, self.w_down, self.b_down)              # (T, h)


class Llama(nn.Module):
    """The decoder and its KV cache. checkpoint.load_model builds one from a HF folder; `Llama(cfg, max_seq_len)`
    allocates one with uninitialised weights, to fill with `load_state_dict` (names as in `state_dict()`)."""

    def __init__(self, cfg: LlamaConfig, max_seq_len: int = 2048, *, device=None, dtype=None):
        super().__init__()
        self.cfg, self.max_seq_len = cfg, max_seq_len
        h, V, w = cfg.hidden_size, cfg.vocab_size, dict(device=device, dtype=dtype)
        self.embed = None if cfg.tie_word_embeddings else weight(V, h, **w)   # (vocab, h); tied: lm_head's
        self.layers = nn.ModuleList(Block(cfg, **w) for _ in range(cfg.num_hidden_layers))
        self.norm, self.lm_head = weight(h, **w), weight(h, V, **w)          # (h,), (h, vocab)
        cos, sin = rope_tables(cfg, max_seq_len)                              # (max_seq_len, hd)
        self.register_buffer("cos", cos.to(**w), persistent=False)
        self.register_buffer("sin", sin.to(**w), persistent=False)
        # The KV cache (layers, kv_heads, slots, hd), shared by every pass: dense, sparse, verification, tree.
        kv = (cfg.num_hidden_layers, cfg.num_key_value_heads, max_seq_len, cfg.head_dim)
        self.register_buffer("cache_k", torch.zeros(kv, **w), persistent=False)
        self.register_buffer("cache_v", torch.zeros(kv, **w), persistent=False)
        self.register_load_state_dict_post_hook(Llama.make_up_rows)

    def make_up_rows(self, *_):
        """Each layer's `up_rows` where the fine "gather" plan reads it (CPU, float32/64), else None: after
        load_model and load_state_dict (as its post-hook: *_ takes the keys it passes). `.to()` carries a
        copy along, still right; call this to drop it where it is not used."""
        for layer in self.layers:
            w, D = layer.w_gate_up, self.cfg.intermediate_size
            used = w.device.type == "cpu" and w.dtype in (torch.float32, torch.float64)
            layer.up_rows = w[:, D:].T.contiguous() if used else None

    def embed_tokens(self, tokens):
        return self.embed[tokens] if self.embed is not None else self.lm_head[:, tokens].T   # (T, h)

    @torch.no_grad()
    def forward(self, tokens, start_pos, mlp=None, *, positions=None, mask=None, last_only=False):
        """Run tokens (T,) in cache slots start_pos .. start_pos+T-1; return their logits (T, vocab).

        Writes those slots' keys and values and attends to the slots below start_pos+T. `mlp(i, x)` replaces
        layer i's MLP for this pass. A tree passes `positions` (T,), each token's RoPE position (default: its
        slot), and `mask` (T, start_pos+T) bool, the slots each token sees (default: causal, every slot up to
        its own). last_only: the last token's logits only, (1, vocab), all a prefill needs.

        start_pos an int: attention reads the slots below start_pos+T. start_pos a 0-dim long tensor on the
        device: the static-shape path for graph capture (torch.compile): keys and values are written with
        index_copy_ and every pass reads all max_seq_len slots behind a mask (a given `mask` may be (T, n) for
        any n <= max_seq_len, slots from n on hidden), so no shape depends on the position. Neither path reads
        a value back to the host.
        """
        T, S, eps = tokens.shape[0], self.max_seq_len, self.cfg.rms_norm_eps
        if isinstance(start_pos, torch.Tensor):
            slots = start_pos + torch.arange(T, device=tokens.device)          # (T,) where this pass writes
            if mask is None:     # causal in slot order; later slots are unwritten (or stale): hidden
                mask = torch.arange(S, device=tokens.device) <= slots[:, None]              # (T, S)
            else:
                mask = F.pad(mask, (0, S - mask.shape[1]))                                   # (T, S)
            seen = S
        else:
            seen, slots = start_pos + T, slice(start_pos, start_pos + T)
            if seen > S:
                raise ValueError(f"slot {seen} is beyond the cache ({S}): load with more")
            if mask is None and T > 1:   # a chain: causal from the last slot back
                mask = causal_lower_right(T, seen)
        at = slots if positions is None else positions
        cos, sin = self.cos[at], self.sin[at]                                   # (T, hd)
        x = self.embed_tokens(tokens)                                           # (T, h)
        for i, layer in enumerate(self.layers):
            x = x + self.attention(i, rms_norm(x, layer.attn_norm, eps), cos, sin, slots, seen, mask)
            a = rms_norm(x, layer.mlp_norm, eps)
            x = x + (layer.mlp(a) if mlp is None else mlp(i, a))
        if last_only:
            x = x[-1:]                                                          # (1, h)
        return rms_norm(x, self.norm, eps) @ self.lm_head                       # (T, vocab)

    def attention(self, i, x, cos, sin, slots, seen, mask):
        """Layer i's attention on x (T, h): write this pass's keys/values to `slots`, read slots < seen."""
        layer, T, hd, n_q = self.layers[i], x.shape[0], self.cfg.head_dim, self.cfg.num_attention_heads
        n_qk = n_q + self.cfg.num_key_value_heads
        qkv = linear(x, layer.wqkv, layer.bqkv).view(T, -1, hd).transpose(0, 1)   # (H + 2 Hkv, T, hd)
        qk = apply_rope(qkv[:n_qk], cos, sin)                                     # q and k rotate together
        if isinstance(slots, slice):
            self.cache_k[i, :, slots], self.cache_v[i, :, slots] = qk[n_q:], qkv[n_qk:]
        else:
            self.cache_k[i].index_copy_(1, slots, qk[n_q:])
            self.cache_v[i].index_copy_(1, slots, qkv[n_qk:])
        out = grouped_attention(qk[:n_q], self.cache_k[i, :, :seen], self.cache_v[i, :, :seen], mask)
        return linear(out.transpose(0, 1).reshape(T, -1), layer.wo, layer.bo)   # (T, h)

    def move_kv(self, slots, start: int):
        """Copy the keys/values in cache `slots` (n,) to slots start..start+n-1 (a tree's chosen path)."""
        self.cache_k[:, :, start:start + len(slots)] = self.cache_k[:, :, slots]
        self.cache_v[:, :, start:start + len(slots)] = self.cache_v[:, :, slots]



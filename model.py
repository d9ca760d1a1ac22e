"""A small Llama decoder in plain PyTorch (batch size 1) with a preallocated KV cache.

The network of Hugging Face's `LlamaForCausalLM`, without `transformers`; checkpoint.py reads a Hugging
Face folder into it (Qwen2, Qwen3 and Mistral too: each differs by a config field or two, qkv_bias, qk_norm,
sliding_window). The MLP is a seam: `forward(..., mlp=fn)` swaps in another MLP (a sparse one) for that pass.

Slots and positions. The cache has `max_seq_len` slots; a slot holds one token's keys and values. A pass
writes its T tokens to slots start_pos .. start_pos+T-1 and attends to the slots below start_pos+T. By
default a token's RoPE position is its slot, so rolling back is calling forward again from an earlier
start_pos: nothing is copied or cropped. A Sirius tree is where they part: its nodes take scratch slots in a
row, a node's position is pos + its depth, a mask says which slots it sees (the prefix and its ancestors),
and `move_kv` copies the chosen path's keys and values back to the slots of their positions.

One layout: every matrix is stored (in, out) and applied as `x @ W` (HF's (out, in) transposed at load): a
decode step's vector-matrix products read long contiguous rows, so q/k/v are fused into one (h, q+2kv) matrix,
gate and up into one (h, 2D), the lm_head is (h, vocab), and a tied embedding is the lm_head's columns.
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


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
    qkv_bias: bool = False               # q, k and v only, not o (Qwen2)
    qk_norm: bool = False                # each head's q and k RMS-normed before RoPE (Qwen3's q_norm, k_norm)
    sliding_window: int | None = None    # attention sees only the last this many positions (Mistral, Qwen
                                         # where set): not implemented; a longer cache is refused (__init__)
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

    q (1, H, T, hd); k, v (1, Hkv, S, hd) (SDPA's batch of one); mask None (every slot), a CausalBias (a
    chain) or bool (T, S). Without a bool mask, SDPA's own grouped heads (enable_gqa), which flash takes. With
    one (a tree, the static path), each KV head's g query heads are folded into the query length, (1, Hkv,
    g*T, hd), and the mask repeated per head: plain masked attention, which SDPA's memory-efficient kernel
    takes (a bool mask with enable_gqa leaves only the math kernel, which copies K/V per query head)."""
    if mask is None or type(mask) is not torch.Tensor:      # None, or a chain's CausalBias (a subclass)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    _, H, T, hd = q.shape
    g = H // k.shape[1]
    folded = q.reshape(1, -1, g * T, hd)                    # row j*T + t: query head kv*g + j at token t
    out = F.scaled_dot_product_attention(folded, k, v, attn_mask=mask.repeat(g, 1))   # mask (g*T, S)
    return out.reshape(1, H, T, hd)


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
    q_norm, k_norm (hd,)                RMSNorm weights over each head's q and k (qk_norm), else None
    cache_k, cache_v (Hkv, S, hd)       the layer's KV cache (S = max_seq_len slots), buffers of its own: a
        compiled graph writing into a view of one big tensor would rebuild and copy back all of it.
    A bias is None where the config has none (attention_bias or qkv_bias, mlp_bias).
    """

    def __init__(self, cfg: LlamaConfig, max_seq_len, device=None, dtype=None):
        super().__init__()
        h, D, hd, w = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, dict(device=device, dtype=dtype)
        q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
        qkv_bias, o_bias, mlp_bias = cfg.attention_bias or cfg.qkv_bias, cfg.attention_bias, cfg.mlp_bias
        self.attn_norm, self.mlp_norm = weight(h, **w), weight(h, **w)
        self.wqkv, self.bqkv = weight(h, q + 2 * kv, **w), weight(q + 2 * kv, **w) if qkv_bias else None
        self.wo, self.bo = weight(q, h, **w), weight(h, **w) if o_bias else None
        self.q_norm, self.k_norm = (weight(hd, **w), weight(hd, **w)) if cfg.qk_norm else (None, None)
        self.w_gate_up, self.b_gate_up = weight(h, 2 * D, **w), weight(2 * D, **w) if mlp_bias else None
        self.w_down, self.b_down = weight(D, h, **w), weight(h, **w) if mlp_bias else None
        self.register_buffer("up_rows", None, persistent=False)     # derived: not in the state_dict
        for name in ("cache_k", "cache_v"):      # shared by every pass: dense, sparse, verification, tree
            self.register_buffer(name, torch.zeros(kv // hd, max_seq_len, hd, **w), persistent=False)
        self.n_heads, self.head_dim, self.eps = cfg.num_attention_heads, cfg.head_dim, cfg.rms_norm_eps

    def attention(self, x, cos, sin, slots, seen, mask):
        """Attention on x (T, h): this pass's keys and values go to `slots` of the layer's cache (Hkv, S, hd),
        queries read its slots below `seen`; cos, sin (T, hd) rotate by each token's position."""
        cache_k, cache_v = self.cache_k, self.cache_v
        T, hd, n_q, n_qk = x.shape[0], self.head_dim, self.n_heads, self.n_heads + cache_k.shape[0]
        qkv = linear(x, self.wqkv, self.bqkv).view(T, -1, hd).transpose(0, 1)    # (H + 2 Hkv, T, hd)
        if self.q_norm is not None:                                              # qk_norm (Qwen3)
            qkv = torch.cat([rms_norm(qkv[:n_q], self.q_norm, self.eps),
                             rms_norm(qkv[n_q:n_qk], self.k_norm, self.eps), qkv[n_qk:]])
        qk = apply_rope(qkv[:n_qk], cos, sin)                                    # q and k rotate together
        if isinstance(slots, slice):
            cache_k[:, slots], cache_v[:, slots] = qk[n_q:], qkv[n_qk:]
        else:       # static path, slots (T,): in place on the buffer itself, so a graph writes T slots only
            cache_k.index_copy_(1, slots, qk[n_q:])
            cache_v.index_copy_(1, slots, qkv[n_qk:])
        out = grouped_attention(qk[None, :n_q], cache_k[None, :, :seen], cache_v[None, :, :seen], mask)
        return linear(out.transpose(1, 2).reshape(T, -1), self.wo, self.bo)    # (1, H, T, hd) -> (T, h)

    def mlp(self, x):
        """The layer's own dense SwiGLU MLP, (T, h) -> (T, h): down(silu(gate(x)) * up(x))."""
        gate, up = linear(x, self.w_gate_up, self.b_gate_up).chunk(2, dim=-1)     # (T, D) each
        return linear(F.silu(gate) * up, self.w_down, self.b_down)              # (T, h)


class Llama(nn.Module):
    """The decoder and its KV cache. Made by checkpoint.load_model from a HF folder, or by `Llama(cfg,
    max_seq_len)` with uninitialised weights, to fill with `load_state_dict` (names as in `state_dict()`)."""

    def __init__(self, cfg: LlamaConfig, max_seq_len: int = 2048, *, device=None, dtype=None):
        super().__init__()
        self.cfg, self.max_seq_len = cfg, max_seq_len
        if cfg.sliding_window is not None and max_seq_len > cfg.sliding_window:   # see LlamaConfig
            raise ValueError(f"{max_seq_len} cache slots reach past sliding_window {cfg.sliding_window}")
        h, V, w = cfg.hidden_size, cfg.vocab_size, dict(device=device, dtype=dtype)
        self.embed = None if cfg.tie_word_embeddings else weight(V, h, **w)   # (vocab, h); tied: lm_head's
        self.layers = nn.ModuleList(Block(cfg, max_seq_len, **w) for _ in range(cfg.num_hidden_layers))
        self.norm, self.lm_head = weight(h, **w), weight(h, V, **w)          # (h,), (h, vocab)
        cos, sin = rope_tables(cfg, max_seq_len)                              # (max_seq_len, hd)
        self.register_buffer("cos", cos.to(**w), persistent=False)
        self.register_buffer("sin", sin.to(**w), persistent=False)
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

    def forward(self, tokens, start_pos, mlp=None, *, positions=None, mask=None, last_only=False):
        """Run tokens (T,) in cache slots start_pos .. start_pos+T-1 (see the module docstring); return their
        logits (T, vocab), or the last token's (1, vocab) with last_only, all a prefill needs. `mlp(i, x)`
        replaces layer i's MLP for this pass; a tree passes RoPE `positions` (T,) and a bool `mask` (T,
        start_pos+T). A 0-dim tensor start_pos takes the static-shape path for torch.compile: all max_seq_len
        slots behind a mask (a given one padded), so no shape depends on the position. No host reads."""
        T, S, static = tokens.shape[0], self.max_seq_len, isinstance(start_pos, torch.Tensor)
        if static:
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
            if mask is None and T > 1:   # a chain: causal from the last slot back (imported here: it loads
                from torch.nn.attention.bias import causal_lower_right    # torch._dynamo, 1.5 s at start)
                mask = causal_lower_right(T, seen)
        at = slots if positions is None else positions             # RoPE positions: by default, the slots
        eps = self.cfg.rms_norm_eps
        # No autograd on either path. Eager passes run in inference mode, the least work per op; the static
        # path, meant for torch.compile, under no_grad alone (inference mode there is not needed, nor tested).
        with torch.inference_mode(not static), torch.no_grad():
            cos, sin = self.cos[at], self.sin[at]                               # (T, hd)
            x = self.embed_tokens(tokens)                                       # (T, h)
            for i, layer in enumerate(self.layers):
                normed = rms_norm(x, layer.attn_norm, eps)
                x = x + layer.attention(normed, cos, sin, slots, seen, mask)
                normed = rms_norm(x, layer.mlp_norm, eps)
                x = x + (layer.mlp(normed) if mlp is None else mlp(i, normed))
            if last_only:
                x = x[-1:]                                                      # (1, h)
            return rms_norm(x, self.norm, eps) @ self.lm_head                   # (T, vocab)

    def move_kv(self, slots, start):
        """Copy the keys/values in cache `slots` (n,) to slots start..start+n-1 (a tree's chosen path).
        `start` is an int or a 0-dim tensor on the device: either way nothing is read back to the host."""
        to = start + torch.arange(len(slots), device=slots.device)             # (n,)
        for layer in self.layers:
            for cache in (layer.cache_k, layer.cache_v):
                cache.index_copy_(1, to, cache[:, slots])                      # the gather copies first



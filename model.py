"""A small Llama decoder in plain PyTorch, with a preallocated KV cache.

Loads Hugging Face `LlamaForCausalLM` checkpoints (config.json + safetensors) without `transformers`.
Batch size 1: a forward pass takes a 1-D tensor of T token ids and returns (T, vocab) logits.
The cache is addressed by absolute position, so "rolling back" is simply calling `forward` again
from an earlier `start_pos`: nothing is copied or cropped. The MLP is a seam: `forward(..., mlp=fn)`
swaps in another MLP (a sparse one) for that pass while attention stays as it is.

One weight layout: every matrix is stored (in, out) and applied as `x @ W`, converted from Hugging Face's
(out, in) at load. A decode step multiplies one vector by each matrix, and single-thread CPU matrix-vector
products stream long rows fastest, so q/k/v are fused into one (h, q+2kv) matrix, gate and up into one
(h, 2D), and the lm_head is (h, vocab); a tied embedding is read from the lm_head's columns (held once).
"""
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch.nn.attention.bias import causal_lower_right

from kernels import dense_mlp


class CheckpointError(Exception):
    """A model folder that cannot be used (missing, malformed or inconsistent files): the user's to fix."""


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
    rope_scaling: dict | None = None     # Llama-3.x "llama3" frequency scaling, else None
    tie_word_embeddings: bool = True     # lm_head shares the embedding matrix
    max_position_embeddings: int = 8192  # the context the model was trained for
    eos_token_id: list = field(default_factory=lambda: [2])

    @classmethod
    def from_hf(cls, hf) -> "LlamaConfig":
        """Read and check a config.json's fields: wrong types and ranges are reported, not crashed on."""
        if not isinstance(hf, dict):
            raise CheckpointError("expected a JSON object")
        if hf.get("model_type") != "llama" and "LlamaForCausalLM" not in (hf.get("architectures") or []):
            raise CheckpointError(f"describes a {hf.get('model_type')!r} model, not a Llama")

        def num(name, default=None, kind=int):
            v = hf.get(name) if hf.get(name) is not None else default
            if v is None:
                raise CheckpointError(f"lacks {name!r}")
            if isinstance(v, bool) or not isinstance(v, kind) or not (math.isfinite(v) and v > 0):
                whole = "whole " * (kind is int)
                raise CheckpointError(f"{name} must be a positive {whole}number, got {v!r}")
            return v

        h, n_heads, rope = num("hidden_size"), num("num_attention_heads"), hf.get("rope_parameters") or {}
        cfg = cls(hidden_size=h, intermediate_size=num("intermediate_size"),
                  num_hidden_layers=num("num_hidden_layers"), num_attention_heads=n_heads,
                  num_key_value_heads=num("num_key_value_heads", n_heads),
                  head_dim=num("head_dim", h // n_heads),
                  vocab_size=num("vocab_size"), rms_norm_eps=num("rms_norm_eps", 1e-5, (int, float)),
                  rope_theta=num("rope_theta", rope.get("rope_theta", 10000.0), (int, float)),
                  rope_scaling=hf.get("rope_scaling")
                  or (rope if rope.get("rope_type") == "llama3" else None),
                  tie_word_embeddings=hf.get("tie_word_embeddings") is True,
                  max_position_embeddings=num("max_position_embeddings", 2048))
        eos = hf.get("eos_token_id")
        cfg.eos_token_id = [] if eos is None else [eos] if isinstance(eos, int) else eos
        if not isinstance(cfg.eos_token_id, list) or not all(type(e) is int for e in cfg.eos_token_id):
            raise CheckpointError(f"eos_token_id must be a token id or a list of them, got {eos!r}")
        if n_heads % cfg.num_key_value_heads:
            raise CheckpointError("num_attention_heads must be a multiple of num_key_value_heads")
        s = cfg.rope_scaling
        kind = s.get("rope_type", s.get("type")) if isinstance(s, dict) else None
        if s is not None and kind not in ("llama3", "default"):
            raise CheckpointError(f"rope_scaling {s!r} is not supported (only type llama3)")
        if kind == "llama3" and not all(isinstance(s.get(k), (int, float)) and s[k] > 0
                                        for k in LLAMA3_ROPE_KEYS):
            raise CheckpointError(f"rope_scaling of type llama3 needs positive {', '.join(LLAMA3_ROPE_KEYS)}")
        return cfg


LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def rope_tables(cfg: LlamaConfig, max_len: int):
    """cos/sin tables (max_len, head_dim) for HF's rotate-half RoPE, with Llama-3 scaling if asked."""
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).double() / cfg.head_dim)
    s = cfg.rope_scaling
    if s and s.get("rope_type", s.get("type")) == "llama3":
        # Llama 3.1: long wavelengths are slowed down by `factor`, short ones kept, a smooth ramp between.
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


class Llama:
    """The decoder plus its KV cache. Build it with `load_model`; weights are plain tensors."""

    def __init__(self, cfg: LlamaConfig, weights: dict, max_seq_len: int = 2048):
        self.cfg, self.max_seq_len = cfg, max_seq_len
        self.norm, self.lm_head = weights["norm"], weights["lm_head"]     # (h,), (h, vocab)
        self.embed = weights.get("embed")                                  # (vocab, h), None if tied
        # layers[i]: attn_norm, mlp_norm (h,); wqkv (h, q+2kv); wo (q, h); w_gate_up (h, 2D); w_down (D, h).
        self.layers = [SimpleNamespace(**{k.split(".")[2]: v for k, v in weights.items()
                                          if k.startswith(f"layers.{i}.")})
                       for i in range(cfg.num_hidden_layers)]
        device, dtype = self.lm_head.device, self.lm_head.dtype
        cos, sin = rope_tables(cfg, max_seq_len)
        self.cos, self.sin = cos.to(device, dtype), sin.to(device, dtype)  # (max_seq_len, hd)
        # The KV cache: one slot per position, shared by every pass (dense, sparse, verification).
        kv = (cfg.num_hidden_layers, cfg.num_key_value_heads, max_seq_len, cfg.head_dim)
        self.cache_k = torch.zeros(kv, device=device, dtype=dtype)
        self.cache_v = torch.zeros(kv, device=device, dtype=dtype)

    def dense_mlp(self, i, x):
        """The default MLP seam: layer i's full SwiGLU MLP on x (T, h)."""
        return dense_mlp(x, self.layers[i].w_gate_up, self.layers[i].w_down)

    def embed_tokens(self, tokens):
        return self.embed[tokens] if self.embed is not None else self.lm_head[:, tokens].T   # (T, h)

    @torch.inference_mode()
    def forward(self, tokens, start_pos: int, mlp=None, *, positions=None, mask=None):
        """Run tokens (T,) in cache slots [start_pos, start_pos+T); return logits (T, vocab).

        Writes those slots' keys/values and attends to slots [0, start_pos+T): whatever the cache held
        beyond is ignored now and overwritten later. `mlp(i, x)` replaces layer i's MLP for this pass.
        By default slot = position and attention is causal. A Sirius tree passes `positions` (T,), each
        token's RoPE position, and `mask` (T, start_pos+T) bool: which slots each token may see.
        """
        cfg, T = self.cfg, tokens.shape[0]
        end, hd, n_q, n_kv = start_pos + T, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        if end > self.max_seq_len:
            raise ValueError(f"slot {end} is beyond the cache ({self.max_seq_len}): load with more")
        mlp = mlp or self.dense_mlp
        at = slice(start_pos, end) if positions is None else positions
        cos, sin = self.cos[at], self.sin[at]                                  # (T, hd)
        if mask is None and T > 1:
            mask = causal_lower_right(T, end)  # causal from the last slot back; SDPA's fused kernels take it
        x = self.embed_tokens(tokens)                                          # (T, h)
        for i, L in enumerate(self.layers):
            a = rms_norm(x, L.attn_norm, cfg.rms_norm_eps)
            qkv = (a @ L.wqkv).view(T, -1, hd).transpose(0, 1)                 # (H + 2 Hkv, T, hd)
            qk = apply_rope(qkv[:n_q + n_kv], cos, sin)                        # q and k heads rotate together
            self.cache_k[i, :, start_pos:end] = qk[n_q:]
            self.cache_v[i, :, start_pos:end] = qkv[n_q + n_kv:]
            att = F.scaled_dot_product_attention(                              # a batch of 1: fused kernels
                qk[None, :n_q], self.cache_k[None, i, :, :end], self.cache_v[None, i, :, :end],
                attn_mask=mask, enable_gqa=True)[0]                             # (H, T, hd)
            x = x + att.transpose(0, 1).reshape(T, -1) @ L.wo                   # (T, h)
            x = x + mlp(i, rms_norm(x, L.mlp_norm, cfg.rms_norm_eps))
        return rms_norm(x, self.norm, cfg.rms_norm_eps) @ self.lm_head          # (T, vocab)

    __call__ = forward

    def move_kv(self, slots, start: int):
        """Copy the keys/values in cache `slots` (n,) to slots start..start+n-1 (a tree's chosen path)."""
        self.cache_k[:, :, start:start + len(slots)] = self.cache_k[:, :, slots]
        self.cache_v[:, :, start:start + len(slots)] = self.cache_v[:, :, slots]


# --- loading a Hugging Face checkpoint ------------------------------------------------------------

def read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None


def read_config(model_dir) -> LlamaConfig:
    path = Path(model_dir) / "config.json"
    if not Path(model_dir).is_dir():
        raise CheckpointError(f"model folder not found: {model_dir}")
    if not path.is_file():
        raise CheckpointError(f"no config.json in {model_dir}")
    hf = read_json(path)                   # names the file in its own errors
    try:
        return LlamaConfig.from_hf(hf)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None


def safetensors_files(model_dir: Path) -> dict:
    """HF tensor name -> the file holding it, for a single file or a sharded checkpoint."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        data = read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise CheckpointError(f"{index}: needs a 'weight_map' from tensor names to file names")
        return {name: model_dir / f for name, f in weight_map.items()}
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {model_dir}")
    try:
        with safe_open(single, "pt") as f:
            return {name: single for name in f.keys()}
    except (SafetensorError, OSError) as e:  # a corrupt or truncated header
        raise CheckpointError(f"{single}: cannot read safetensors ({e})") from None


def load_model(model_dir, max_seq_len: int = 2048, dtype=torch.float32, device="cpu") -> Llama:
    """Read a HF Llama folder; every tensor is checked by name, shape and finiteness before it is used."""
    model_dir = Path(model_dir)
    cfg = read_config(model_dir)
    h, D, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    shapes = {"input_layernorm": (h,), "post_attention_layernorm": (h,), "self_attn.q_proj": (q, h),
              "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h), "self_attn.o_proj": (h, q),
              "mlp.gate_proj": (D, h), "mlp.up_proj": (D, h), "mlp.down_proj": (h, D)}
    files, handles = safetensors_files(model_dir), {}

    def get(name, shape):  # one HF tensor, checked, in the HF layout
        if name not in files:
            raise CheckpointError(f"{model_dir}: tensor {name} is missing")
        try:
            if files[name] not in handles:
                handles[files[name]] = safe_open(files[name], "pt")
            t = handles[files[name]].get_tensor(name)
        except (OSError, RuntimeError, SafetensorError) as e:   # unreadable, truncated or corrupt shard
            raise CheckpointError(f"{model_dir}: cannot read weights ({e})") from None
        if tuple(t.shape) != shape:
            raise CheckpointError(f"{model_dir}: tensor {name} has shape {tuple(t.shape)}, expected {shape}")
        if not torch.isfinite(t).all():
            raise CheckpointError(f"{model_dir}: tensor {name} holds NaN or infinite values")
        return t.to(device=device, dtype=dtype)

    embed = get("model.embed_tokens.weight", (cfg.vocab_size, h))
    head = embed if cfg.tie_word_embeddings else get("lm_head.weight", (cfg.vocab_size, h))
    weights = {"norm": get("model.norm.weight", (h,)), "lm_head": head.T.contiguous()}
    if not cfg.tie_word_embeddings:
        weights["embed"] = embed
    for i in range(cfg.num_hidden_layers):
        w = {n: get(f"model.layers.{i}.{n}.weight", s) for n, s in shapes.items()}
        weights.update({f"layers.{i}.{ours}": t.contiguous() for ours, t in {  # HF (out, in) -> (in, out)
            "attn_norm": w["input_layernorm"], "mlp_norm": w["post_attention_layernorm"],
            "wqkv": torch.cat([w["self_attn.q_proj"], w["self_attn.k_proj"], w["self_attn.v_proj"]]).T,
            "wo": w["self_attn.o_proj"].T, "w_gate_up": torch.cat([w["mlp.gate_proj"], w["mlp.up_proj"]]).T,
            "w_down": w["mlp.down_proj"].T}.items()})
    return Llama(cfg, weights, max_seq_len)

"""A small Llama decoder in plain PyTorch, with a preallocated KV cache.

Loads Hugging Face `LlamaForCausalLM` checkpoints (config.json + safetensors) without `transformers`.
Batch size 1: a forward pass takes a 1-D tensor of T token ids and returns (T, vocab) logits.
The cache is addressed by absolute position, so "rolling back" is simply calling `forward` again
from an earlier `start_pos`: nothing is copied or cropped. The MLP is a seam: `forward(..., mlp=fn)`
swaps in another MLP (a sparse one) for that pass while attention stays as it is.
"""
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open

from kernels import dense_mlp


@dataclass
class LlamaConfig:
    # Field names follow Hugging Face's config.json so `kernels.density(cfg, ...)` works on either.
    hidden_size: int = 576               # h: width of the residual stream
    intermediate_size: int = 1536        # D: MLP neurons per layer (what sparsity prunes)
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int = 3         # < num_attention_heads means grouped-query attention
    head_dim: int = 64
    vocab_size: int = 49152
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None     # Llama-3.x "llama3" frequency scaling, else None
    tie_word_embeddings: bool = False    # lm_head shares the embedding matrix
    max_position_embeddings: int = 2048
    eos_token_id: list = field(default_factory=list)

    @classmethod
    def from_hf(cls, hf: dict) -> "LlamaConfig":
        if hf.get("model_type") != "llama" and "LlamaForCausalLM" not in hf.get("architectures", []):
            raise ValueError(f"config.json describes a {hf.get('model_type')!r} model, not a Llama")
        try:
            h, n_heads = hf["hidden_size"], hf["num_attention_heads"]
            eos = hf.get("eos_token_id")
            rope = hf.get("rope_parameters") or {}  # newer configs nest theta and scaling here
            scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type") == "llama3" else None)
            return cls(
                hidden_size=h, intermediate_size=hf["intermediate_size"],
                num_hidden_layers=hf["num_hidden_layers"], num_attention_heads=n_heads,
                num_key_value_heads=hf.get("num_key_value_heads") or n_heads,
                head_dim=hf.get("head_dim") or h // n_heads, vocab_size=hf["vocab_size"],
                rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
                rope_theta=hf.get("rope_theta") or rope.get("rope_theta", 10000.0),
                rope_scaling=scaling, tie_word_embeddings=hf.get("tie_word_embeddings", False),
                max_position_embeddings=hf.get("max_position_embeddings", 2048),
                eos_token_id=[] if eos is None else [eos] if isinstance(eos, int) else list(eos))
        except KeyError as e:
            raise ValueError(f"config.json lacks {e.args[0]!r}") from None


def rope_tables(cfg: LlamaConfig, max_len: int):
    """cos/sin tables (max_len, head_dim) for HF's rotate-half RoPE, with Llama-3 scaling if asked."""
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).double() / cfg.head_dim)
    s = cfg.rope_scaling
    if s and s.get("rope_type", s.get("type")) == "llama3":
        # Llama 3.1: long wavelengths are slowed down by `factor`, short ones kept, a smooth ramp between.
        wavelen = 2 * math.pi / inv_freq
        lo, hi = s["original_max_position_embeddings"] / s["low_freq_factor"], \
            s["original_max_position_embeddings"] / s["high_freq_factor"]
        ramp = ((s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"])
                / (s["high_freq_factor"] - s["low_freq_factor"])).clamp(0, 1)
        scaled = (1 - ramp) * inv_freq / s["factor"] + ramp * inv_freq
        inv_freq = torch.where(wavelen > lo, inv_freq / s["factor"], torch.where(wavelen < hi, inv_freq, scaled))
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
        self.embed, self.norm = weights["embed"], weights["norm"]          # (vocab, h), (h,)
        self.lm_head = weights["embed"] if cfg.tie_word_embeddings else weights["lm_head"]
        # layers[i]: attn_norm, mlp_norm (h,); wq, wk, wv, wo (out, in) as in HF; w_gate, w_up, w_down_t (D, h).
        # MLP rows are neurons in all three: down_proj is kept transposed so a sparse step reads just the kept
        # neurons' rows (see kernels.py). The block's computation is in `forward`, in one place.
        self.layers = [SimpleNamespace(**{k.split(".")[2]: v for k, v in weights.items()
                                          if k.startswith(f"layers.{i}.")}) for i in range(cfg.num_hidden_layers)]
        device, dtype = self.embed.device, self.embed.dtype
        cos, sin = rope_tables(cfg, max_seq_len)
        self.cos, self.sin = cos.to(device, dtype), sin.to(device, dtype)  # (max_seq_len, hd)
        # causal[q, k]: may the query at position q see the key at position k?
        self.causal = torch.ones(max_seq_len, max_seq_len, dtype=torch.bool, device=device).tril()
        # The KV cache: one slot per absolute position, shared by every pass (dense, sparse, verification).
        kv = (cfg.num_hidden_layers, cfg.num_key_value_heads, max_seq_len, cfg.head_dim)
        self.cache_k = torch.zeros(kv, device=device, dtype=dtype)
        self.cache_v = torch.zeros(kv, device=device, dtype=dtype)

    def dense_mlp(self, i, x):
        """The default MLP seam: layer i's full SwiGLU MLP on x (T, h)."""
        L = self.layers[i]
        return dense_mlp(x, L.w_gate, L.w_up, L.w_down_t)

    @torch.inference_mode()
    def forward(self, tokens, start_pos: int, mlp=None):
        """Run tokens (T,) placed at positions [start_pos, start_pos+T); return logits (T, vocab).

        Writes those positions' keys/values into the cache and attends to [0, start_pos+T): whatever
        the cache held beyond that is ignored now and overwritten later. `mlp(i, x)` replaces layer
        i's MLP for this pass (default: the dense one).
        """
        cfg, T = self.cfg, tokens.shape[0]
        end = start_pos + T
        assert end <= self.max_seq_len, f"position {end} beyond the cache ({self.max_seq_len})"
        mlp = mlp or self.dense_mlp
        cos, sin = self.cos[start_pos:end], self.sin[start_pos:end]        # (T, hd)
        mask = None if T == 1 else self.causal[start_pos:end, :end]        # (T, end); one query sees all
        x = self.embed[tokens]                                              # (T, h)
        for i, L in enumerate(self.layers):
            a = rms_norm(x, L.attn_norm, cfg.rms_norm_eps)
            q = F.linear(a, L.wq).view(T, -1, cfg.head_dim).transpose(0, 1)  # (H, T, hd)
            k = F.linear(a, L.wk).view(T, -1, cfg.head_dim).transpose(0, 1)  # (Hkv, T, hd)
            v = F.linear(a, L.wv).view(T, -1, cfg.head_dim).transpose(0, 1)  # (Hkv, T, hd)
            self.cache_k[i, :, start_pos:end] = apply_rope(k, cos, sin)
            self.cache_v[i, :, start_pos:end] = v
            att = F.scaled_dot_product_attention(                          # batch of 1 for the fused kernels
                apply_rope(q, cos, sin)[None], self.cache_k[None, i, :, :end], self.cache_v[None, i, :, :end],
                attn_mask=mask, enable_gqa=True)[0]                         # (H, T, hd)
            x = x + F.linear(att.transpose(0, 1).reshape(T, -1), L.wo)      # (T, h)
            x = x + mlp(i, rms_norm(x, L.mlp_norm, cfg.rms_norm_eps))
        return F.linear(rms_norm(x, self.norm, cfg.rms_norm_eps), self.lm_head)  # (T, vocab)

    __call__ = forward


# --- loading a Hugging Face checkpoint ------------------------------------------------------------

def read_config(model_dir) -> LlamaConfig:
    path = Path(model_dir) / "config.json"
    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"model folder not found: {model_dir}")
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {model_dir}")
    try:
        return LlamaConfig.from_hf(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None


def safetensors_files(model_dir: Path) -> dict:
    """HF tensor name -> the file holding it, for a single file or a sharded checkpoint."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return {name: model_dir / f for name, f in json.loads(index.read_text())["weight_map"].items()}
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {model_dir}")
    try:
        with safe_open(single, "pt") as f:
            return {name: single for name in f.keys()}
    except SafetensorError as e:  # a corrupt or truncated header
        raise ValueError(f"{single}: cannot read safetensors ({e})") from None


def load_model(model_dir, max_seq_len: int = 2048, dtype=torch.float32, device="cpu") -> Llama:
    """Read a HF Llama folder; every tensor is checked by name and shape before the model is built."""
    model_dir = Path(model_dir)
    cfg = read_config(model_dir)
    h, D, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    per_layer = {  # our name -> (HF name within the layer, HF shape)
        "attn_norm": ("input_layernorm", (h,)), "mlp_norm": ("post_attention_layernorm", (h,)),
        "wq": ("self_attn.q_proj", (q, h)), "wk": ("self_attn.k_proj", (kv, h)), "wv": ("self_attn.v_proj", (kv, h)),
        "wo": ("self_attn.o_proj", (h, q)), "w_gate": ("mlp.gate_proj", (D, h)), "w_up": ("mlp.up_proj", (D, h)),
        "w_down_t": ("mlp.down_proj", (h, D))}  # stored transposed below
    wanted = {"embed": ("model.embed_tokens.weight", (cfg.vocab_size, h)), "norm": ("model.norm.weight", (h,))}
    if not cfg.tie_word_embeddings:
        wanted["lm_head"] = ("lm_head.weight", (cfg.vocab_size, h))
    for i in range(cfg.num_hidden_layers):
        wanted.update({f"layers.{i}.{ours}": (f"model.layers.{i}.{hf}.weight", shape)
                       for ours, (hf, shape) in per_layer.items()})
    files, handles, weights = safetensors_files(model_dir), {}, {}
    try:
        for ours, (hf, shape) in wanted.items():
            if hf not in files:
                raise ValueError(f"{model_dir}: tensor {hf} is missing")
            if files[hf] not in handles:
                handles[files[hf]] = safe_open(files[hf], "pt")
            t = handles[files[hf]].get_tensor(hf)
            if tuple(t.shape) != shape:
                raise ValueError(f"{model_dir}: tensor {hf} has shape {tuple(t.shape)}, expected {shape}")
            if ours.endswith("w_down_t"):
                t = t.T
            if not torch.isfinite(t).all():
                raise ValueError(f"{model_dir}: tensor {hf} holds NaN or infinite values")
            weights[ours] = t.to(device=device, dtype=dtype).contiguous()
    except (OSError, RuntimeError, SafetensorError) as e:  # unreadable, truncated or corrupt shard
        raise ValueError(f"{model_dir}: cannot read weights ({e})") from None
    return Llama(cfg, weights, max_seq_len)

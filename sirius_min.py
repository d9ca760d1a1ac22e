"""Generation with contextual sparsity, and Sirius: the sparse model writes, the full model corrects.

Greedy decoding, batch 1. Works with any model that has `forward(tokens, start_pos, mlp=None)` over a
KV cache addressed by absolute position, `cfg` (HF config names) and `layers[i].w_gate / w_up /
w_down_t` — see model.py. The sparse model is the same weights with a sparse MLP passed as `mlp`.
Read top to bottom: sparse MLPs, prefill, plain greedy decoding, then the Sirius period loop.
"""
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kernels import (density as density_of, dense_mlp, down_proj, fine_mlp, griffin_scores, kept, select_coarse,
                     slice_mlp, swiglu)

ACCEPT_TEMPERATURE = 0.6  # the paper's code scores drafts with softmax(logits / 0.6); fixed, not tuned


# --- the two sparse MLPs (drop-in for the model's MLP seam) ----------------------------------------

class FineMLP:
    """Fine-grained sparsity: every token, every layer keeps its own top-k neurons by |SiLU(gate)|."""

    def __init__(self, model, density: float):
        self.model, self.k = model, kept(model.cfg.intermediate_size, density)

    def __call__(self, i, x):
        L = self.model.layers[i]
        return fine_mlp(x, L.w_gate, L.w_up, L.w_down_t, self.k)


class CoarseMLP:
    """Coarse-grained sparsity (GRIFFIN): neurons chosen once from the prompt, weights sliced once.

    `idx[i]` is layer i's selection for the whole request; every sparse step is then a smaller dense MLP.
    """

    def __init__(self, model, scores: list, density: float):
        k = kept(model.cfg.intermediate_size, density)
        self.idx = [select_coarse(s, k) for s in scores]
        self.weights = [slice_mlp(L.w_gate, L.w_up, L.w_down_t, idx) for L, idx in zip(model.layers, self.idx)]

    def __call__(self, i, x):
        return dense_mlp(x, *self.weights[i])


def prefill(model, prompt, sparsity="none", density=0.5):
    """The dense pass over the prompt: its last logits, and the request's sparse MLP (None if dense).

    For coarse sparsity this is where the neurons are chosen, from this pass's MLP inputs, once: later
    multi-token passes (Sirius verification) are dense and never re-select.
    """
    if sparsity == "none":
        return model(prompt, 0)[-1], None
    if sparsity == "fine":
        return model(prompt, 0)[-1], FineMLP(model, density)
    scores = [None] * len(model.layers)

    def scoring_mlp(i, x):  # the dense MLP, keeping each layer's neuron scores on the way
        L = model.layers[i]
        z = swiglu(x, L.w_gate, L.w_up)                                   # (T, D)
        scores[i] = griffin_scores(z)
        return down_proj(z, L.w_down_t)

    logits = model(prompt, 0, mlp=scoring_mlp)
    return logits[-1], CoarseMLP(model, scores, density)


# --- results -------------------------------------------------------------------------------------

@dataclass
class Result:
    tokens: list                                  # generated ids (EOS included if it was generated)
    from_full: list                               # per token: did the full model supply it?
    density: float = 1.0                          # parameters read per sparse step / all parameters
    period: int = 1                               # K; 1 for plain decoding
    advances: list = field(default_factory=list)  # tokens emitted by each full verification (Sirius)
    corrections: int = 0                          # verifications that rejected a draft and replaced it
    decode_s: float = 0.0                         # wall clock after the prefill

    @property
    def ms_per_token(self):
        return 1000 * self.decode_s / max(1, len(self.tokens) - 1)  # the first token comes from prefill

    @property
    def aal(self):
        return average_advance_length(self.advances)

    @property
    def effective_density(self):
        return effective_density(self.density, self.period, self.aal) if self.advances else self.density


def average_advance_length(advances):
    """AAL: tokens gained per full-model verification, out of the period K."""
    return sum(advances) / len(advances)


def effective_density(density, period, aal):
    """K-1 sparse steps plus one K-token full pass (costing about one dense step), spread over AAL tokens."""
    return ((period - 1) * density + 1) / aal


def full_model_nll(model, prompt, tokens):
    """Mean negative log-likelihood of `tokens` after `prompt` under the full model: how plausible the
    full model finds a continuation, whoever wrote it (lower is closer to what it would have said)."""
    seq = torch.cat([prompt, torch.tensor(tokens, device=prompt.device)])
    logits = model(seq[:-1], 0)[len(prompt) - 1:]                         # predictions for `tokens`
    return float(F.cross_entropy(logits.float(), seq[len(prompt):]))


# --- plain greedy decoding (dense or sparse) ------------------------------------------------------

def generate(model, prompt, max_new_tokens, eos_ids=(), sparsity="none", density=0.5, on_token=None):
    """Greedy decoding, one token per forward pass, dense or with a sparse MLP after the dense prefill."""
    logits, mlp = prefill(model, prompt, sparsity, density)
    start = time.perf_counter()
    tok, pos, out = int(logits.argmax()), len(prompt), []
    while True:
        out.append(tok)
        if on_token:
            on_token(tok, mlp is None or len(out) == 1)
        if tok in eos_ids or len(out) == max_new_tokens:
            break
        tok = int(model(torch.tensor([tok], device=prompt.device), pos, mlp=mlp)[-1].argmax())
        pos += 1
    return Result(out, [True] + [mlp is None] * (len(out) - 1), density_of(model.cfg, density, sparsity),
                  decode_s=time.perf_counter() - start)


# --- Sirius ---------------------------------------------------------------------------------------

def accept_length(logits, drafts, threshold, strict=False, temperature=ACCEPT_TEMPERATURE):
    """How many drafts the full model keeps, and the token it adds after them.

    logits (n, V): the full model's logits at the n window positions; drafts (n-1,): d_1..d_{n-1},
    where d_i was drafted after position i-1. A draft is plausible if the full model gives it
    probability >= threshold at temperature 0.6 (strict: if it is the full model's argmax). The
    longest plausible prefix d_1..d_a is kept; the full model's argmax after it is appended: a
    correction if a < n-1, a bonus token if every draft was kept.
    """
    z = logits.float()
    if strict:
        ok = z[:-1].argmax(-1) == drafts
    else:
        p = torch.softmax(z[:-1] / temperature, dim=-1).gather(-1, drafts[:, None])[:, 0]  # (n-1,)
        ok = p >= threshold
    a = int(ok.int().cumprod(0).sum())
    return a, int(z[a].argmax())


def sirius_period(model, mlp, window, pos, threshold, strict):
    """One period: the sparse model drafts into `window`, the full model checks it in one pass.

    window (n,) holds t0 (the last emitted token, not yet in the cache) at position pos; the sparse
    model fills window[1:] greedily, writing sparse KV at pos..pos+n-2. The full model's pass then
    rewrites all n KV slots with its own keys/values. Returns (kept drafts, next token). The cache is
    valid through t0 and the kept drafts; the caller "rolls back" by starting the next window right
    after them, so the rest is overwritten later (interval KV rollback: nothing is copied).
    """
    n = window.shape[0]
    for j in range(1, n):
        window[j] = model(window[j - 1:j], pos + j - 1, mlp=mlp)[-1].argmax()  # no host sync here
    logits = model(window, pos)                                                 # full model, (n, V)
    a, nxt = accept_length(logits, window[1:], threshold, strict)
    return window[1:a + 1].tolist(), nxt


def sirius(model, prompt, max_new_tokens, eos_ids=(), sparsity="fine", density=0.5, period=16,
           threshold=0.1, strict=False, on_token=None):
    """Sirius generation: sparse drafts, corrected every `period` tokens by one full-model pass."""
    assert sparsity in ("fine", "coarse") and period >= 2 and threshold >= 0
    logits, mlp = prefill(model, prompt, sparsity, density)
    start = time.perf_counter()
    res = Result([], [], density_of(model.cfg, density, sparsity), period)
    window = torch.empty(period, dtype=torch.long, device=prompt.device)  # reused every period
    tok, pos = int(logits.argmax()), len(prompt)                          # first token: full model

    def emit(t, full):
        res.tokens.append(t)
        res.from_full.append(full)
        if on_token:
            on_token(t, full)
        return t in eos_ids or len(res.tokens) == max_new_tokens  # True: stop

    done = emit(tok, True)
    while not done:
        # Draft no more than the budget allows: the period emits at most n tokens (n-1 drafts + 1).
        n = min(period, max_new_tokens - len(res.tokens))
        window[0] = tok
        drafts, tok = sirius_period(model, mlp, window[:n], pos, threshold, strict)
        emitted = 0
        for d in drafts:
            emitted += 1
            if done := emit(d, False):
                break
        if not done:
            emitted += 1
            res.corrections += len(drafts) < n - 1
            done = emit(tok, True)
        res.advances.append(emitted)
        pos += 1 + len(drafts)  # roll back: the cache is valid through t0 and the kept drafts
    res.decode_s = time.perf_counter() - start
    return res

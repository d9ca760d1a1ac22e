"""Generation with contextual sparsity, and Sirius: the sparse model writes, the full model corrects.

Greedy decoding, batch 1. Works with any model that has `forward(tokens, start_pos, mlp=None, *,
positions=None, mask=None)` over a KV cache addressed by absolute position (slot), `move_kv(slots, start)`,
`cfg` (Hugging Face config names) and `layers[i].w_gate_up / w_down` (model.py's layout). The sparse model
is the same weights with a sparse MLP passed as `mlp`.
Read top to bottom: the sparse MLPs and the prefill, plain greedy decoding, the metrics, the acceptance
rule, one Sirius period (a chain for width 1, a tree for wider), and the loop over periods.
"""
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kernels import (SPARSITIES, dense_mlp, density, fine_mlp, griffin_scores, n_kept, select_coarse,
                     slice_mlp, swiglu)

ACCEPT_TEMPERATURE = 0.6  # the paper's code scores drafts with softmax(logits / 0.6); fixed, not tuned


# --- the two sparse MLPs (drop-in for the model's MLP seam) ----------------------------------------

class FineMLP:
    """Fine-grained sparsity: every token, every layer keeps its own top-k neurons by |SiLU(gate)|.

    On a CPU a decode step reads only the kept neurons' up rows (kernels.fine_plan), which needs W_up a
    second time in neuron-major (D, h) order: the first FineMLP of a model adds it to every layer as
    `up_rows`, and later requests reuse it. Elsewhere the fused (h, 2D) matrix is used and nothing is added.
    """

    def __init__(self, model, keep: float):
        self.model, self.k = model, n_kept(model.cfg.intermediate_size, keep)
        D, w = model.cfg.intermediate_size, model.layers[0].w_gate_up
        if w.device.type == "cpu" and w.dtype in (torch.float32, torch.float64):
            for L in model.layers:
                if getattr(L, "up_rows", None) is None:
                    L.up_rows = L.w_gate_up[:, D:].T.contiguous()                 # (D, h)

    def __call__(self, i, x):
        L = self.model.layers[i]
        return fine_mlp(x, L.w_gate_up, L.w_down, self.k, getattr(L, "up_rows", None))


class CoarseMLP:
    """Coarse-grained sparsity (GRIFFIN): neurons chosen once from the prompt, weights sliced once.

    `idx[i]` is layer i's selection for the whole request; every sparse step is then a smaller dense MLP.
    """

    def __init__(self, model, scores: list, keep: float):
        k = n_kept(model.cfg.intermediate_size, keep)
        self.idx = [select_coarse(s, k) for s in scores]
        self.weights = [slice_mlp(L.w_gate_up, L.w_down, idx) for L, idx in zip(model.layers, self.idx)]

    def __call__(self, i, x):
        return dense_mlp(x, *self.weights[i])


def prefill(model, prompt, sparsity="dense", keep=0.5):
    """The dense pass over the prompt: its last logits, and the request's sparse MLP (None if dense).

    For coarse sparsity this is where the neurons are chosen, once, from the SwiGLU activations of every
    prompt token: later multi-token passes (Sirius verification) are dense and never re-select.
    """
    if sparsity not in SPARSITIES:
        raise ValueError(f"unknown sparsity {sparsity!r}: expected one of {', '.join(SPARSITIES)}")
    if len(prompt) < 1:
        raise ValueError("the prompt is empty")
    n_kept(model.cfg.intermediate_size, keep)                             # checks keep
    if sparsity != "coarse":
        return model(prompt, 0)[-1], FineMLP(model, keep) if sparsity == "fine" else None
    scores = [None] * len(model.layers)

    def scoring_mlp(i, x):  # the dense MLP, keeping each layer's neuron scores on the way
        z = swiglu(x, model.layers[i].w_gate_up)                           # (T, D)
        scores[i] = griffin_scores(z)
        return z @ model.layers[i].w_down

    logits = model(prompt, 0, mlp=scoring_mlp)
    return logits[-1], CoarseMLP(model, scores, keep)


def clock(device):
    """Wall time after the device's queued work is done (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


# --- results and metrics -------------------------------------------------------------------------

@dataclass
class Result:
    tokens: list                                  # generated ids (EOS included if it was generated)
    from_full: list                               # per token: did the full model supply it?
    density: float = 1.0                          # parameters read per sparse step / all parameters
    period: int = 1                               # K; 1 for plain decoding
    width: int = 1                                # tree width w (1: a chain of drafts)
    advances: list = field(default_factory=list)  # tokens gained by each full verification, a + 1
    corrections: int = 0                          # verifications that rejected a draft and replaced it
    decode_s: float = 0.0                         # wall clock after the prefill

    @property
    def ms_per_token(self):
        return 1000 * self.decode_s / max(1, len(self.tokens) - 1)  # the first token comes from prefill

    @property
    def counted_advances(self):
        """The periods AAL counts: all but the last, which EOS or the length budget may have cut short."""
        return self.advances[:-1]

    @property
    def aal(self):
        return average_advance_length(self.counted_advances)

    @property
    def effective_density(self):
        return effective_density(self.density, self.period, self.aal) if self.period > 1 else self.density


def average_advance_length(advances):
    """AAL: tokens gained per full-model verification, out of the period K (nan with no period to count)."""
    return sum(advances) / len(advances) if advances else float("nan")


def effective_density(density, period, aal):
    """K-1 sparse steps plus one K-token full pass (costing about one dense step when decoding is
    memory-bound), spread over the AAL tokens a period gains. The tree's width does not enter it."""
    return ((period - 1) * density + 1) / aal


def full_model_nll(model, prompt, tokens):
    """Mean negative log-likelihood of `tokens` after `prompt` under the full model: how plausible the
    full model finds a continuation, whoever wrote it (lower is closer to what it would have said)."""
    seq = torch.cat([prompt, torch.tensor(tokens, device=prompt.device)])
    logits = model(seq[:-1], 0)[len(prompt) - 1:]                         # predictions for `tokens`
    return float(F.cross_entropy(logits.float(), seq[len(prompt):]))


# --- plain greedy decoding (dense or sparse) ------------------------------------------------------

def generate(model, prompt, max_new_tokens, *, eos_ids=(), sparsity="dense", keep=0.5, on_token=None):
    """Greedy decoding, one token per forward pass, dense or with a sparse MLP after the dense prefill."""
    if type(max_new_tokens) is not int or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a whole number >= 1, got {max_new_tokens!r}")
    logits, mlp = prefill(model, prompt, sparsity, keep)
    tok, pos, out = int(logits.argmax()), len(prompt), []
    start = clock(prompt.device)
    while True:
        out.append(tok)
        if on_token:
            on_token(tok, mlp is None or len(out) == 1)
        if tok in eos_ids or len(out) == max_new_tokens:
            break
        tok = int(model(torch.tensor([tok], device=prompt.device), pos, mlp=mlp)[-1].argmax())
        pos += 1
    return Result(out, [True] + [mlp is None] * (len(out) - 1), density(model.cfg, keep, sparsity),
                  decode_s=clock(prompt.device) - start)


# --- Sirius ---------------------------------------------------------------------------------------

def accept_length(logits, drafts, threshold, strict=False, temperature=ACCEPT_TEMPERATURE):
    """How many drafts the full model keeps, the token it adds after them, and the drafts' probabilities.

    logits (n, V): the full model's logits at the n window positions; drafts (n-1,): d_1..d_{n-1},
    where d_i was drafted after position i-1. A draft is plausible if the full model gives it
    probability >= threshold at temperature 0.6 (strict: if it is the full model's argmax). The
    longest plausible prefix d_1..d_a is kept; the full model's argmax after it is appended: a
    correction if a < n-1, a bonus token if every draft was kept. Returns (a, appended, p); p is None
    in strict mode, which needs no softmax.
    """
    z, p = logits.float(), None
    if strict:
        ok = z[:-1].argmax(-1) == drafts
    else:
        p = torch.softmax(z[:-1] / temperature, dim=-1).gather(-1, drafts[:, None])[:, 0]  # (n-1,)
        ok = p >= threshold
    a = int(ok.int().cumprod(0).sum())
    return a, int(z[a].argmax()), p


@dataclass
class Period:
    """One verification, for a trace (`on_period`): the chosen path and what the full model made of it."""
    pos: int             # the cache slot (and position) of t0
    window: list         # t0, then the chosen beam's drafts d_1..d_{n-1}
    probs: list          # the full model's p(d_i) at the acceptance temperature
    accepted: int        # a: drafts kept
    appended: int        # the full model's token after them: a correction if a < n-1, else a bonus
    beams: list          # a of each of the w beams (one entry for a chain)
    chosen: int          # index of the chosen beam


def draft_tree(model, mlp, t0, pos, n, width):
    """The sparse model drafts a fixed-width tree of depth n-1 below t0, with one pass per depth.

    Node j sits in cache slot pos+j: the root t0 is node 0, depth d holds nodes 1+(d-1)w .. d*w. Depth d
    comes from running the sparse model on depth d-1 (all of its w nodes in one pass, each seeing the
    verified prefix and its own ancestors): each node proposes its top-w children by log_softmax(z / 0.6),
    and of those w*w, the w with the highest cumulative log-probability survive, best first. With w = 1
    this is plain greedy drafting. Returns the nodes' tokens (N,) and ancestor matrix (N, N) bool:
    anc[i, j] = node j is node i or one of its ancestors. Stays on the device: no host synchronisation.
    """
    N, dev = 1 + (n - 1) * width, t0.device
    tokens, anc = t0.repeat(N), torch.eye(N, dtype=torch.bool, device=dev)
    score = torch.zeros(1, device=dev)                                   # cumulative log-prob of each leaf
    for d in range(1, n):
        lo, hi = (0, 1) if d == 1 else (1 + (d - 2) * width, 1 + (d - 1) * width)   # depth d-1's nodes
        z = model(tokens[lo:hi], pos + lo, mlp=mlp, **tree_attention(anc, pos, lo, hi, width))   # (hi-lo, V)
        logp, child = torch.log_softmax(z.float() / ACCEPT_TEMPERATURE, -1).topk(width, dim=-1)  # (hi-lo, w)
        cand = (score[:, None] + logp).flatten()                           # ((hi-lo)*w,) candidates
        score, best = cand.topk(width)                                     # the best w, best first
        new = slice(1 + (d - 1) * width, 1 + d * width)
        tokens[new] = child.flatten()[best]
        anc[new] |= anc[lo + best // width]                                # inherit the parent's ancestors
    return tokens, anc


def tree_attention(anc, pos, lo, hi, width):
    """forward()'s `positions` and `mask` for nodes lo..hi-1 in slots pos+lo..: RoPE position = pos + depth,
    sight = the verified prefix + the node's ancestors. A chain (w = 1) is plain causal order: no mask."""
    if width == 1:
        return {}
    depth = anc[lo:hi, :hi].sum(-1) - 1
    prefix = torch.ones(hi - lo, pos, dtype=torch.bool, device=anc.device)
    return {"positions": pos + depth, "mask": torch.cat([prefix, anc[lo:hi, :hi]], dim=-1)}


def sirius_period(model, mlp, t0, pos, n, *, width=1, threshold=0.1, strict=False, record=False):
    """One period: the sparse model drafts, the full model checks every draft in one pass, a path is kept.

    t0 (the last emitted token, not yet in the cache) goes to slot pos; the drafts go after it, writing
    sparse KV. The full model's pass rewrites all those slots with its own keys and values. Of the w
    beams (root-to-leaf paths), the one with the longest accepted prefix wins (ties: the likelier beam);
    its nodes' keys and values move to slots pos..pos+a (for a chain they are already there). Returns
    (kept drafts, next token, Period or None). The cache is then valid through t0 and the kept drafts:
    the caller "rolls back" by starting the next window right after them (nothing is copied).
    """
    tokens, anc = draft_tree(model, mlp, t0.view(1), pos, n, width)
    logits = model(tokens, pos, **tree_attention(anc, pos, 0, len(tokens), width))    # full model, (N, V)
    leaves = anc[len(tokens) - width:] if n > 1 else anc                   # the deepest nodes, best first
    paths = leaves.nonzero()[:, 1].view(len(leaves), n)                    # (w, n) node ids, root first
    checks = [accept_length(logits[path], tokens[path[1:]], threshold, strict) for path in paths]
    b = max(range(len(paths)), key=lambda i: checks[i][0])                 # first longest: likelier beam
    a, nxt, p = checks[b]
    path = paths[b]
    if width > 1:
        model.move_kv(pos + path[:a + 1], pos)                             # the back-gather
    period = None
    if record:  # only for a trace: the probabilities strict mode skipped, and host-side lists
        if p is None:
            p = accept_length(logits[path], tokens[path[1:]], threshold)[2]
        period = Period(pos, tokens[path].tolist(), p.tolist(), a, nxt, [c[0] for c in checks], b)
    return tokens[path[1:a + 1]].tolist(), nxt, period


def sirius(model, prompt, max_new_tokens, *, eos_ids=(), sparsity="fine", keep=0.5, period=16, width=1,
           threshold=0.1, strict=False, on_token=None, on_period=None):
    """Sirius generation: sparse drafts, corrected every `period` tokens by one full-model pass.

    on_token(token, from_full) sees every emitted token; on_period(Period) sees every verification.
    The cache needs prompt + max_new_tokens + (period-1)*(width-1) slots (`cache_slots`).
    """
    if sparsity not in ("fine", "coarse"):
        raise ValueError(f"Sirius corrects a sparse model: sparsity must be fine or coarse, got {sparsity!r}")
    if any(type(n) is not int for n in (max_new_tokens, period, width)) or max_new_tokens < 1 or period < 2 \
            or width < 1 or not 0 <= threshold <= 1:
        raise ValueError("need whole numbers max_new_tokens >= 1, period >= 2, width >= 1 and a threshold in "
                         f"[0, 1]; got {max_new_tokens}, {period}, {width}, {threshold}")
    if cache_slots(len(prompt), max_new_tokens, period, width) > model.max_seq_len:
        raise ValueError(f"the model's cache ({model.max_seq_len}) is too small for this request")
    logits, mlp = prefill(model, prompt, sparsity, keep)
    res = Result([], [], density(model.cfg, keep, sparsity), period, width)
    tok, pos = int(logits.argmax()), len(prompt)                          # first token: full model
    start = clock(prompt.device)

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
        t0 = torch.tensor(tok, device=prompt.device)
        drafts, tok, record = sirius_period(model, mlp, t0, pos, n, width=width, threshold=threshold,
                                            strict=strict, record=on_period is not None)
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
        if on_period:
            on_period(record)
        pos += 1 + len(drafts)  # roll back: the cache is valid through t0 and the kept drafts
    res.decode_s = clock(prompt.device) - start
    return res


def cache_slots(prompt_len, max_new_tokens, period=1, width=1):
    """KV-cache slots a request needs: its positions, plus the scratch slots a tree's extra branches take."""
    return prompt_len + max_new_tokens + (period - 1) * (width - 1)

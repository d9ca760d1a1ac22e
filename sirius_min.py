"""Generation with contextual sparsity, and Sirius: the sparse model writes, the full model corrects.

Batch 1, greedy (as in the paper) or sampled. The sparse model is the full model's weights with a sparse MLP
passed through the model's MLP seam, so both share one KV cache. Read first: what this file needs of a model
(`Model`), then `sirius_reference`, Sirius as the paper describes it. Then the fast path, depth a reader may
skip: choosing a token, the sparse MLPs, metrics, plain decoding, the acceptance rules, drafting (a chain, or
a tree of width w), one period (one host sync), the loop. graphs.capture(model) makes every decode pass a
graph (greedy: the verification with its verdict).
"""
import time
import weakref
from functools import partial
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import torch
import torch.nn.functional as F

from kernels import SPARSITIES, MLPWeights, check_keep, dense_mlp, density, fine_mlp, griffin_scores, \
    n_kept, select_coarse, slice_mlp, swiglu

ACCEPT_TEMPERATURE = 0.6  # the paper's code scores drafts with softmax(logits / 0.6); fixed, not tuned


class Model(Protocol):
    """What sirius_min.py needs of a model: a decoder over a KV cache addressed by slot, and an MLP seam.

    `model(tokens, start_pos, mlp, positions=, mask=, last_only=)` runs tokens (T,) in cache slots
    start_pos.., writing their keys and values, and returns logits (T, V) ((1, V) with last_only); slots
    beyond start_pos+T are ignored, so rolling back is starting the next pass earlier. `mlp(i, x)` replaces
    layer i's MLP. A tree passes each token's RoPE `positions` (T,) and a bool `mask` (T, start_pos+T).
    `move_kv(slots, start)` copies cached keys and values. `layers[i]` holds the MLP weights kernels.py reads
    (w_gate_up, w_down; optional biases, up_rows); `cfg` the config fields kernels.density counts. A model
    may bring its own `verify` (graphs.Captured.verify: verify_period as one graph), used when greedy.
    CoarseMLPs are kept per model in a WeakKeyDictionary: the model must be hashable and weakly referable."""
    cfg: Any
    max_seq_len: int
    layers: Sequence[Any]

    def __call__(self, tokens, start_pos, mlp=None, *, positions=None, mask=None, last_only=False): ...

    def move_kv(self, slots, start): ...


# --- Sirius as the paper describes it: the reference, sharing nothing with the fast path below but the
# model's forward. The oracle of the chain (eager, captured), strict trees, fine_mlp and CoarseMLP.

def reference_mlp(layer, x, kept=None, k=None):
    """Layer's SwiGLU MLP (T, h) with only some neurons: those where the 0/1 mask `kept` (D,) is 1, or each
    token's own k with the largest |SiLU(gate)| (fine sparsity); all of them with neither. And the
    activations (T, D) before the cut."""
    b_gate_up, b_down = getattr(layer, "b_gate_up", None), getattr(layer, "b_down", None)
    gate, up = (x @ layer.w_gate_up + (0 if b_gate_up is None else b_gate_up)).chunk(2, dim=-1)  # (T, D)
    z = F.silu(gate) * up
    if k is not None:
        kept = torch.zeros_like(z).scatter_(-1, F.silu(gate).abs().topk(k).indices, 1)          # (T, D)
    return (z if kept is None else z * kept) @ layer.w_down + (0 if b_down is None else b_down), z


def reference_prefill(model, prompt, sparsity, keep):
    """The dense prefill's last logits (1, V), and the request's sparse MLP (i, x) as the paper defines it,
    k = f·D neurons a layer. Fine: each token's own k (reference_mlp). Coarse (GRIFFIN), chosen once from
    the prompt: the k whose activations over the prompt tokens have the largest norm, each token's
    activations scaled to norm 1 first (so that every token gets an equal vote)."""
    k, acts = max(1, round(keep * model.cfg.intermediate_size)), []

    def recording(i, x):                                   # the dense MLP, keeping each layer's activations
        out, z = reference_mlp(model.layers[i], x)
        acts.append(z)
        return out

    logits = model(prompt, 0, mlp=recording, last_only=True)
    if sparsity == "fine":
        return logits, lambda i, x: reference_mlp(model.layers[i], x, k=k)[0]
    unit = [z.float() / z.float().norm(dim=-1, keepdim=True) for z in acts]   # (T, D) rows of norm 1
    best = [u.norm(dim=0).topk(k).indices for u in unit]                      # (k,) a layer: by column norm
    masks = [torch.zeros_like(z[0]).index_fill_(0, idx, 1) for z, idx in zip(acts, best)]
    return logits, lambda i, x: reference_mlp(model.layers[i], x, masks[i])[0]


def sirius_reference(model, prompt, max_new_tokens, *, sparsity, keep=0.5, period=16, threshold=0.1,
                     strict=False, eos_ids=()):
    """Greedy Sirius, a chain: the tokens and each verification's advance a + 1 (sirius(..., width=1)'s).
    A draft is kept while p = softmax(z / 0.6)[draft] >= threshold; strict: while it is the argmax of z."""
    logits, sparse_mlp = reference_prefill(model, prompt, sparsity, keep)          # dense prefill
    tokens, advances, pos = [int(logits[-1].argmax())], [], len(prompt)            # t0: the full model's
    while tokens[-1] not in eos_ids and len(tokens) < max_new_tokens:
        window = [tokens[-1]]                    # t0: emitted, not yet in the cache; it goes to slot pos
        for i in range(period - 1):              # K-1 sparse steps, one token at a time: drafts d_1..d_{K-1}
            z = model(torch.tensor(window[-1:], device=prompt.device), pos + i, mlp=sparse_mlp)   # (1, V)
            window.append(int(z[-1].argmax()))
        z = model(torch.tensor(window, device=prompt.device), pos)   # the full model, one pass: (K, V), and
        p = torch.softmax(z.float() / ACCEPT_TEMPERATURE, dim=-1)    # its keys and values over the sparse
        a = 0                                        # the longest plausible prefix: z[a] judges window[a + 1]
        while a < period - 1 and (int(z[a].argmax()) == window[a + 1] if strict
                                  else float(p[a, window[a + 1]]) >= threshold):
            a += 1
        for t in window[1:a + 1] + [int(z[a].argmax())]:           # the kept drafts, then the full model's
            tokens.append(t)                                       # token (a correction or a bonus)
            if t in eos_ids or len(tokens) == max_new_tokens:
                break
        advances.append(a + 1)
        pos += a + 1                           # roll back: the next window starts right after the kept drafts
    return tokens, advances


# --- choosing a token: the argmax, or a sample from a distribution ---------------------------------
@dataclass
class Sampling:
    """How tokens are chosen: greedy at temperature 0, else sampled at temperature T from the nucleus."""
    temperature: float = 0.0
    top_p: float = 1.0
    generator: torch.Generator | None = None  # on the logits' device; None: torch's global one

    @property
    def greedy(self):
        return self.temperature == 0


def token_probs(logits, sampling: Sampling):
    """What a token is sampled from (..., V), fp32: softmax(logits / T) cut to the nucleus, renormalised."""
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs                   # mass of the likelier tokens
        sorted_probs = sorted_probs.masked_fill(before >= sampling.top_p, 0)  # the likeliest always stays
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(probs, generator):
    """One token per row of probs (..., V), without waiting for the device: the index of the largest
    p_i / E_i with E_i ~ Exp(1) is token i with probability p_i (the "exponential race")."""
    race = torch.empty_like(probs).exponential_(generator=generator).clamp_min_(1e-20)
    return (probs / race).argmax(-1)


def choose_token(logits, sampling: Sampling):
    """Logits (..., V) -> token ids (...): the argmax when greedy, else a sample from `token_probs`."""
    if sampling.greedy:
        return logits.argmax(-1)
    return sample(token_probs(logits, sampling), sampling.generator)


def check_sampling(temperature, top_p, generator) -> Sampling:
    """The options checked. With no generator, sampling draws from torch's global one (torch.manual_seed)."""
    if not (isinstance(temperature, (int, float)) and (temperature == 0 or 0.01 <= temperature < 1e9)):
        raise ValueError(f"temperature must be 0 (greedy) or at least 0.01 (finite), got {temperature!r}")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    return Sampling(float(temperature), float(top_p), generator)


# --- the two sparse MLPs (drop-in for the model's MLP seam) ----------------------------------------
class FineMLP:
    """Fine-grained sparsity: each step, in each layer, its own top-k neurons by |SiLU(gate)|."""

    def __init__(self, model, keep: float):
        self.layers, self.k = model.layers, n_kept(model.cfg.intermediate_size, keep)

    def __call__(self, i, x):
        return fine_mlp(x, self.layers[i], self.k)


class CoarseMLP(torch.nn.Module):
    """Coarse-grained sparsity (GRIFFIN): neurons chosen once from the prompt (`select`: idx[i] in layer i),
    their weights sliced once, so a sparse step is a smaller dense MLP. The slices are buffers, one set per
    model (`_coarse_mlps`), refilled by each request so that a captured graph reads them in place."""

    def __init__(self, model, k: int):
        super().__init__()
        L, h, like = len(model.layers), model.cfg.hidden_size, model.layers[0].w_down
        has_bias = getattr(model.layers[0], "b_gate_up", None) is not None
        self.register_buffer("w_gate_up", like.new_empty(L, h, 2 * k), persistent=False)
        self.register_buffer("w_down", like.new_empty(L, k, h), persistent=False)
        self.register_buffer("b_gate_up", like.new_empty(L, 2 * k) if has_bias else None, persistent=False)
        # Layer i's slices as the MLPWeights kernels.py reads: views of the buffers (b_down is the model's).
        self.sliced = [MLPWeights(self.w_gate_up[i], self.w_down[i], None if self.b_gate_up is None
                                  else self.b_gate_up[i], getattr(layer, "b_down", None))
                       for i, layer in enumerate(model.layers)]
        self.k, self.idx = k, []

    def select(self, model, scores: list):
        """This request's neurons, the k best-scored of every layer, their weights copied into the slices."""
        self.idx = [select_coarse(s, self.k) for s in scores]
        for i, (layer, idx) in enumerate(zip(model.layers, self.idx)):
            slice_mlp(layer, idx, out=self.sliced[i])
        return self

    def forward(self, i, x):
        return dense_mlp(x, self.sliced[i])

    __call__ = forward      # called once a layer, every pass: without nn.Module's hook machinery


_coarse_mlps = weakref.WeakKeyDictionary()   # model -> its CoarseMLP (at the last request's k)


def prefill_and_sparse_mlp(model, prompt, sparsity="dense", keep=0.5):
    """The dense pass over the prompt: its last logits (1, V), and the request's sparse MLP (None if dense).
    Coarse sparsity chooses its neurons here, once: Sirius's verification passes are dense and never do."""
    if sparsity not in SPARSITIES:
        raise ValueError(f"unknown sparsity {sparsity!r}: expected one of {', '.join(SPARSITIES)}")
    if len(prompt) < 1:
        raise ValueError("the prompt is empty")
    check_keep(keep)
    if sparsity != "coarse":
        sparse_mlp = FineMLP(model, keep) if sparsity == "fine" else None
        return model(prompt, 0, last_only=True), sparse_mlp
    scores = [None] * len(model.layers)

    def scoring_mlp(i, x):  # layer i's dense MLP, keeping its neuron scores on the way
        layer = model.layers[i]
        z = swiglu(x, layer)                                               # (T, D) activations
        scores[i] = griffin_scores(z)
        out = z @ layer.w_down
        return out if getattr(layer, "b_down", None) is None else out + layer.b_down

    logits = model(prompt, 0, mlp=scoring_mlp, last_only=True)
    coarse, k = _coarse_mlps.get(model), n_kept(model.cfg.intermediate_size, keep)
    if coarse is None or coarse.k != k:
        coarse = _coarse_mlps[model] = CoarseMLP(model, k)
    return logits, coarse.select(model, scores)


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
    density: float = 1.0                          # kernels.density: the paper's share read per sparse step
    period: int = 1                               # K; 1 for plain decoding
    width: int = 1                                # tree width w (1: a chain of drafts)
    advances: list = field(default_factory=list)  # tokens gained by each full verification, a + 1
    corrections: int = 0                          # verifications that rejected a draft (even if re-written)
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
    """The paper's accounting: K-1 sparse steps and one full pass, counted as one dense step (true only
    where decoding is memory-bound), over the AAL tokens a period gains; a tree counts as a chain."""
    return ((period - 1) * density + 1) / aal


# --- plain decoding (dense or sparse) ------------------------------------------------------------
def check_request(model, max_new_tokens, slots_needed):
    if type(max_new_tokens) is not int or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a whole number >= 1, got {max_new_tokens!r}")
    if slots_needed > model.max_seq_len:
        raise ValueError(f"the request needs {slots_needed} cache slots; the model has {model.max_seq_len}")


def generate(model, prompt, max_new_tokens, *, eos_ids=(), sparsity="dense", keep=0.5, temperature=0.0,
             top_p=1.0, generator=None, on_token=None):
    """Decoding one token per forward pass, dense or with a sparse MLP after the dense prefill.
    on_token(token, from_full) sees every token as it is chosen; the host waits for each (one sync)."""
    check_request(model, max_new_tokens, cache_slots(len(prompt), max_new_tokens))
    sampling = check_sampling(temperature, top_p, generator)
    logits, sparse_mlp = prefill_and_sparse_mlp(model, prompt, sparsity, keep)
    token, pos, out = choose_token(logits[-1], sampling), len(prompt), []
    start = clock(prompt.device)
    while True:
        out.append(int(token))                                             # the host waits here
        if on_token:
            on_token(out[-1], sparse_mlp is None or len(out) == 1)
        if out[-1] in eos_ids or len(out) == max_new_tokens:
            break
        logits = model(token.view(1), pos, sparse_mlp)                         # (1, V)
        token, pos = choose_token(logits[-1], sampling), pos + 1
    return Result(out, [True] + [sparse_mlp is None] * (len(out) - 1), density(model.cfg, keep, sparsity),
                  decode_s=clock(prompt.device) - start)


# --- Sirius: which drafts the full model keeps -----------------------------------------------------
# Draft d_i, proposed after node i-1 of its path, is judged by the full model's logits z_{i-1} there:
#   threshold (the paper's, lossy by design): keep d_i if softmax(z_{i-1} / 0.6)[d_i] >= threshold.
#   argmax (strict, greedy): keep d_i if it is argmax z_{i-1}: the output is dense greedy decoding, up to
#       floating-point near-ties between passes of different lengths.
#   speculative (strict, sampling): keep d_i with probability min(1, p(d_i) / q(d_i)), p the full and q the
#       sparse model's sampling distributions: the output is distributed exactly as full-model sampling.
# The longest kept prefix d_1..d_a stands; then the full model adds one token of its own.

def acceptance_probs(logits, parent, tokens):
    """p(d) at the acceptance temperature 0.6 for every node (N,): the full model's probability of each
    node's token, read from its parent's logits (the root's own entry is meaningless and never used)."""
    logp = torch.log_softmax(logits.float() / ACCEPT_TEMPERATURE, dim=-1)  # (N, V)
    return logp[parent, tokens].exp()


def keep_drafts(logits, parent, tokens, rule, threshold, sampling, draft_probs=None):
    """Which nodes' drafts pass the rule (N,) bool, and for "speculative" the full model's p at the
    sampling temperature (N, V), which the correction is sampled from."""
    if rule == "threshold":
        return acceptance_probs(logits, parent, tokens) >= threshold, None
    if rule == "argmax":
        return logits[parent].argmax(-1) == tokens, None
    p = token_probs(logits, sampling)                                      # (N, V) full model
    p_draft, q_draft = p[parent, tokens], draft_probs.gather(-1, tokens[:, None])[:, 0]
    u = torch.rand(len(tokens), device=logits.device, generator=sampling.generator)
    return u * q_draft < p_draft, p                                        # u < p/q, without dividing


def longest_kept_prefix(kept_along_path):
    """(w, K-1) bool -> (w,) a: how many drafts of each path are kept before its first rejected one."""
    return kept_along_path.int().cumprod(dim=-1).sum(dim=-1)


def next_token_distribution(p, q, accepted):
    """Speculative sampling's next token, as a distribution: after a rejection at node `accepted`'s child,
    normalise(max(0, p - q)) at that node (the residual); after every draft was kept, p itself."""
    residual = (p[:-1] - q).clamp_min(0)                                   # (K-1, V)
    residual = residual / residual.sum(-1, keepdim=True).clamp_min(1e-20)
    return torch.cat([residual, p[-1:]]).index_select(0, accepted.view(1))[0]


# --- Sirius: drafting a chain or a tree -----------------------------------------------------------
# The window of one period holds N = 1 + (K-1)·w nodes: node 0 is t0 (the last emitted token) and depth d
# (1 .. K-1) holds nodes 1 + (d-1)·w .. d·w. Node j sits in cache slot pos + j and has RoPE position
# pos + depth(j). A chain is the tree with w = 1: node j is at depth j and its parent is node j-1.

def depth_nodes(depth, width):
    """The node ids at `depth` (a range): the root alone at depth 0, else w nodes."""
    return range(0, 1) if depth == 0 else range(1 + (depth - 1) * width, 1 + depth * width)


def tree_pass_args(sees, pos, nodes, depth_of_node, width):
    """forward()'s `positions` (pos + depth) and `mask` (the verified prefix and the node's ancestors) for
    `nodes` (a range) in slots pos + nodes. A chain needs neither (causal is right), nor does the root."""
    if width == 1 or nodes.stop == 1:
        return {}
    prefix = torch.ones(len(nodes), pos, dtype=torch.bool, device=sees.device)
    return {"positions": pos + depth_of_node[nodes.start:nodes.stop],
            "mask": torch.cat([prefix, sees[nodes.start:nodes.stop, :nodes.stop]], dim=-1)}


@dataclass
class Tree:
    tokens: torch.Tensor          # (N,) node tokens
    parent: torch.Tensor          # (N,) each node's parent (the root points at itself)
    depth: torch.Tensor           # (N,) each node's depth
    sees: torch.Tensor            # (N, N) bool: sees[i, j] if node j is node i or one of its ancestors
    draft_probs: torch.Tensor | None = None  # (N, V) sampled: row j is what node j was drawn from


def draft_tree(model, sparse_mlp, t0, pos, period, width, sampling: Sampling, keep_probs=False):
    """The sparse model drafts K-1 depths below t0, a pass per depth over the previous one. A chain (w = 1)
    appends the sparse model's chosen token (greedy or sampled). A tree keeps a beam: each node of a depth
    proposes its top-w children by log_softmax(z / 0.6); the w best paths by cumulative log-probability
    are the next depth, best first."""
    N, device = 1 + (period - 1) * width, t0.device
    # A chain's parents (node j-1) and ancestors (nodes 0..j) are known up front; a tree's are filled below.
    flags = dict(dtype=torch.bool, device=device)
    sees = torch.ones(N, N, **flags).tril() if width == 1 else torch.eye(N, **flags)
    tree = Tree(tokens=t0.view(1).repeat(N), parent=(torch.arange(N, device=device) - 1).clamp_min(0),
                depth=(torch.arange(N, device=device) + width - 1) // width, sees=sees,   # depth: ceil(j / w)
                draft_probs=torch.zeros(N, model.cfg.vocab_size, device=device) if keep_probs else None)
    beam_score = torch.zeros(1, device=device)          # cumulative log-prob of each node of the last depth
    for d in range(1, period):
        above, below = depth_nodes(d - 1, width), depth_nodes(d, width)   # run `above`, fill `below`
        tokens = tree.tokens[above.start:above.stop]
        if width == 1:  # a chain: the sparse model's own next token, greedy or sampled
            logits = model(tokens, pos + above.start, sparse_mlp)                                 # (1, V)
            tree.tokens[below.start:below.stop] = choose_token(logits, sampling)
            if keep_probs:
                tree.draft_probs[below.start] = token_probs(logits[0], sampling)
        else:           # a tree: of the w·w children of depth d-1, the w likeliest paths
            logits = model(tokens, pos + above.start, mlp=sparse_mlp,
                           **tree_pass_args(tree.sees, pos, above, tree.depth, width))   # (w, V)
            logp, proposals = torch.log_softmax(logits.float() / ACCEPT_TEMPERATURE, -1).topk(width, dim=-1)
            path_score = (beam_score[:, None] + logp).flatten()              # (len(above) * w,) candidates
            beam_score, best = path_score.topk(width)                         # the best w, best first
            parents = above.start + best // width                             # the row it came from
            tree.tokens[below.start:below.stop] = proposals.flatten()[best]
            tree.parent[below.start:below.stop] = parents
            tree.sees[below.start:below.stop] |= tree.sees[parents]       # a child sees what its parent sees
    return tree


def root_to_leaf_paths(tree, period, width):
    """(w, K) node ids, a row per path from the root to a deepest node, best beam first (leaves upwards)."""
    paths = torch.zeros(width, period, dtype=torch.long, device=tree.tokens.device)
    deepest = depth_nodes(period - 1, width)
    paths[:, -1] = torch.arange(deepest.start, deepest.stop, device=tree.tokens.device)
    for d in range(period - 1, 0, -1):
        paths[:, d - 1] = tree.parent[paths[:, d]]
    return paths


# --- Sirius: one period -----------------------------------------------------------------------------
def judge_period(logits, tree, *, period, width, rule, threshold, sampling):
    """The device part of a verification: which drafts pass, each path's a, the best path, the next token.
    Fixed shapes, no host read (graphs.host_reads checks): captured, it runs in the verification's graph.
    Returns `packed` (the chosen path's index, a, the next token, its K-1 drafts: what the host reads), and
    for the rest of the period the path (K,) and next token on the device, each path's a (w,), and p_full."""
    kept, p_full = keep_drafts(logits, tree.parent, tree.tokens, rule, threshold, sampling, tree.draft_probs)
    paths = root_to_leaf_paths(tree, period, width)                        # (w, K)
    accepted = longest_kept_prefix(kept[paths[:, 1:]])                     # (w,) a per path
    best = accepted.argmax().view(1)                                       # first longest: likelier path
    path, a = paths.index_select(0, best)[0], accepted.index_select(0, best)
    if rule == "speculative":
        q = tree.draft_probs[path[1:]]                                     # (K-1, V)
        next_token = sample(next_token_distribution(p_full[path], q, a), sampling.generator).view(1)
    else:                                                                  # from the last kept node's logits
        next_token = choose_token(logits.index_select(0, path.index_select(0, a)), sampling)
    packed = torch.cat([best, a, next_token, tree.tokens[path[1:]]])      # (3 + K-1,)
    return packed, path, next_token, accepted, p_full


def verify_period(model, tree, pos, **rule):
    """The full model's pass over the window (N, V), and judge_period's verdict on it."""
    nodes = range(0, len(tree.tokens))
    logits = model(tree.tokens, pos, **tree_pass_args(tree.sees, pos, nodes, tree.depth, rule["width"]))
    return logits, *judge_period(logits, tree, **rule)


def sirius_period(model, sparse_mlp, t0, pos, *, period, width=1, threshold=0.1, strict=False,
                  sampling=None, verify=None, on_period=None):
    """One period: draft, verify every draft in one full-model pass, keep the best path, add one token.

    t0 (a device tensor: the last emitted token, not yet in the cache) goes to slot pos, the drafts after it;
    the sparse passes write keys and values for all but the deepest drafts, and the full model's pass
    rewrites all those slots with its own. Of the w paths the one with the longest kept prefix wins (ties:
    the likelier path); its nodes' keys and values move to slots pos..pos+a (a chain's are already there).
    Returns (kept drafts, next token as int and as a device tensor); the cache is then valid through t0 and
    the kept drafts, and the next period starts right after them ("roll back"). `verify`: a captured model's
    verify_period (one graph), or None. on_period, if given, gets what the period computed on the device
    (tracing.py reads it), valid until the next pass."""
    sampling = sampling or Sampling()
    rule = "threshold" if not strict else "argmax" if sampling.greedy else "speculative"
    tree = draft_tree(model, sparse_mlp, t0, pos, period, width, sampling, rule == "speculative")
    verify = verify or partial(verify_period, model)
    logits, packed, path, next_token, accepted, p_full = verify(
        tree, pos, period=period, width=width, rule=rule, threshold=threshold, sampling=sampling)
    b, a, appended, *drafts = packed.tolist()                              # the one host sync
    if width > 1:
        model.move_kv(pos + path[:a + 1], pos)                             # the back-gather
    if on_period is not None:
        on_period(pos=pos, tree=tree, logits=logits, path=path, accepted=accepted, chosen=b,
                  appended=appended, p_full=p_full, rule=rule)
    return drafts[:a], appended, next_token


def sirius(model, prompt, max_new_tokens, *, eos_ids=(), sparsity="fine", keep=0.5, period=16, width=1,
           threshold=0.1, strict=False, temperature=0.0, top_p=1.0, generator=None, on_token=None,
           on_period=None):
    """Sirius: sparse drafts, corrected every `period` tokens by one full-model pass. Every window is a full
    K-token window, as in the paper's code: what the last gains beyond max_new_tokens is dropped. on_token
    (token, from_full) sees every emitted token; on_period every verification (tracing.Trace reads them)."""
    if sparsity not in ("fine", "coarse"):
        raise ValueError(f"Sirius corrects a sparse model: sparsity must be fine or coarse, got {sparsity!r}")
    if type(period) is not int or period < 2:
        raise ValueError(f"period must be a whole number >= 2, got {period!r}")
    if type(width) is not int or width < 1:
        raise ValueError(f"width must be a whole number >= 1, got {width!r}")
    if not (isinstance(threshold, (int, float)) and 0 <= threshold <= 1):
        raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
    sampling = check_sampling(temperature, top_p, generator)
    if not sampling.greedy and width > 1:
        raise ValueError("sampling drafts a chain: width must be 1 when temperature > 0")
    check_request(model, max_new_tokens, cache_slots(len(prompt), max_new_tokens, period, width))
    logits, sparse_mlp = prefill_and_sparse_mlp(model, prompt, sparsity, keep)
    verify = getattr(model, "verify", None) if sampling.greedy else None
    res = Result([], [], density(model.cfg, keep, sparsity), period, width)
    t0, pos = choose_token(logits[-1], sampling), len(prompt)              # the first token: full model
    start = clock(prompt.device)

    def emit(token, from_full):
        res.tokens.append(token)
        res.from_full.append(from_full)
        if on_token:
            on_token(token, from_full)
        return token in eos_ids or len(res.tokens) == max_new_tokens      # True: stop

    done = emit(int(t0), True)
    while not done:
        drafts, token, t0 = sirius_period(
            model, sparse_mlp, t0, pos, period=period, width=width, threshold=threshold, strict=strict,
            sampling=sampling, verify=verify, on_period=on_period)
        for d in drafts:
            if done := emit(d, False):
                break
        if not done:                                   # the full model's token: a correction or a bonus
            res.corrections += len(drafts) < period - 1
            done = emit(token, True)
        res.advances.append(len(drafts) + 1)
        pos += 1 + len(drafts)  # roll back: the cache is valid through t0 and the kept drafts
    res.decode_s = clock(prompt.device) - start
    return res


def cache_slots(prompt_len, max_new_tokens, period=1, width=1):
    """KV-cache slots a request needs. Plain decoding (period 1) never runs its last token: prompt +
    max_new_tokens - 1. Sirius may start a full window of 1 + (K-1)·w nodes at the last token's slot."""
    return prompt_len + max_new_tokens - 1 + (period - 1) * width

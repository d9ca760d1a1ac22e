"""sirius_min.py: the acceptance rule, the period loop (EOS, length, AAL), the tree (beam, mask, back-gather,
shared fine set), argument checks, and quality on SmolLM2.

Three kinds of model: a scripted one (`FakeModel`, logits we choose, for the rules), the tiny random Llama
(conftest), and the embedded SmolLM2 where the issue asks for a real model. Logit and KV comparisons are
relative to their scale (conftest.rel_err).
"""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import sirius_min
from conftest import PROMPTS, encode_chat, rel_err, twin
from kernels import dense_mlp, griffin_scores, n_kept, swiglu
from sirius_min import (ACCEPT_TEMPERATURE, Result, accept_length, cache_slots, draft_tree, effective_density,
                        full_model_nll, generate, prefill, sirius, tree_attention)

# --- the acceptance rule on fixed logits, no model --------------------------------------------------


def logits_from_probs(rows):
    """Logits whose softmax at the acceptance temperature is exactly `rows`."""
    return torch.log(torch.tensor(rows)) * ACCEPT_TEMPERATURE


def test_accept_all_gives_bonus():
    z = logits_from_probs([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.05, 0.15, 0.8]])
    a, appended, p = accept_length(z, torch.tensor([0, 1]), 0.1)
    assert (a, appended) == (2, 2)                       # both kept, bonus = argmax of the last row
    assert p.tolist() == pytest.approx([0.7, 0.8])       # the drafts' probabilities, whole vocabulary


def test_first_rejected_gives_correction():
    z = logits_from_probs([[0.05, 0.15, 0.8], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]])
    assert accept_length(z, torch.tensor([0, 1]), 0.1)[:2] == (0, 2)  # p(d1)=0.05 < 0.1: corrected to 2


def test_plausible_but_not_top1_is_kept():
    """The rule is lossy by design: a plausible draft is kept though the full model prefers another."""
    z = logits_from_probs([[0.6, 0.3, 0.1], [0.2, 0.75, 0.05], [0.9, 0.05, 0.05]])
    assert accept_length(z, torch.tensor([1, 2]), 0.1)[:2] == (1, 1)  # d1 (p=.3) kept, d2 (p=.05) -> 1
    assert accept_length(z, torch.tensor([1, 2]), 0.1, strict=True) == (0, 0, None)  # strict wants the argmax


def test_flat_distribution_rejects_even_the_argmax():
    V = 50
    z = torch.zeros(3, V)
    z[0, 7] = 0.01  # a barely preferred argmax: p ~ 1/50 < 0.1
    assert accept_length(z, torch.tensor([7, 7]), 0.1)[:2] == (0, 7)


def test_acceptance_temperature_is_the_papers():
    """p is taken at temperature 0.6: after logits (2, 0), token 1 has p = 0.034 and is rejected (at
    temperature 1 it would have p = 0.12 and be kept)."""
    z = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    a, _, p = accept_length(z, torch.tensor([1]), 0.1)
    assert a == 0 and p.item() == pytest.approx(1 / (1 + math.exp(2 / 0.6)))


def test_threshold_edges():
    z = logits_from_probs([[0.02, 0.98], [0.98, 0.02], [0.5, 0.5]])
    assert accept_length(z, torch.tensor([0, 1]), 0.0)[0] == 2   # threshold 0 keeps anything
    assert accept_length(z, torch.tensor([1, 0]), 1.0)[0] == 0   # 1 keeps only a certainty
    assert accept_length(z[:1], torch.tensor([], dtype=torch.long), 0.1)[:2] == (0, 1)  # no drafts: one step


def test_effective_density_matches_paper():
    assert round(effective_density(0.65, 16, 15.22), 3) == 0.706
    assert round(effective_density(0.76, 16, 15.37), 3) == 0.807


def test_aal_leaves_out_the_last_period():
    """As the paper's code counts: the last period, which EOS or the length budget may cut, is left out."""
    res = Result([], [], density=0.5, period=16, advances=[16, 12, 7])
    assert res.counted_advances == [16, 12] and res.aal == 14
    assert res.effective_density == pytest.approx((15 * 0.5 + 1) / 14)
    one = Result([], [], density=0.5, period=16, advances=[9])
    assert one.counted_advances == [] and math.isnan(one.aal) and math.isnan(one.effective_density)


# --- a scripted model: logits we choose --------------------------------------------------------------

V, EOS, JUNK = 12, 9, 11
PROMPT = torch.tensor([0, 0])  # positions 0, 1; the first generated token sits at position 2


class FakeModel:
    """A model whose logits are a function of what each token sees: `full(context)` or `sparse(context)`
    (sparse when an MLP is passed), context = the tokens in the slots its mask lets it see, itself last.

    Like a real model it keeps a cache, of tokens: a pass writes its tokens into their slots, `move_kv` copies
    slots. It checks what a real model cannot: that each token's RoPE position is its depth in what it sees,
    and that no slot beyond the cache is touched. Has what prefill and FineMLP read (cfg, one layer).
    """

    def __init__(self, full, sparse, max_seq_len=64):
        self.full, self.sparse, self.max_seq_len = full, sparse, max_seq_len
        self.cfg = SimpleNamespace(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                   num_attention_heads=1, num_key_value_heads=1, head_dim=8, vocab_size=V,
                                   tie_word_embeddings=True)
        self.layers = [SimpleNamespace(w_gate_up=torch.zeros(8, 32), w_down=torch.zeros(16, 8))]
        self.slots, self.highest = [None] * max_seq_len, -1

    def __call__(self, tokens, start_pos, mlp=None, *, positions=None, mask=None):
        T, end = len(tokens), start_pos + len(tokens)
        assert end <= self.max_seq_len, f"slot {end - 1} is beyond the cache"
        self.slots[start_pos:end], self.highest = tokens.tolist(), max(self.highest, end - 1)
        if mask is None:
            mask = torch.ones(T, end, dtype=torch.bool).tril(start_pos)          # causal
        positions = torch.arange(start_pos, end) if positions is None else positions
        assert mask.shape == (T, end)
        rows = []
        for i in range(T):
            context = tuple(self.slots[j] for j in mask[i].nonzero()[:, 0].tolist())
            assert mask[i, start_pos + i] and int(positions[i]) == len(context) - 1, "position != depth"
            rows.append((self.full if mlp is None else self.sparse)(context))
        return torch.stack(rows)

    def move_kv(self, slots, start):
        moved = [self.slots[s] for s in slots.tolist()]
        self.slots[start:start + len(moved)] = moved


def sure(token):
    """Logits that put (almost) all probability on one token."""
    z = torch.zeros(V)
    z[token] = 20.0
    return z


def chain(full, wrong=()):
    """A position-keyed script for a chain (width 1): `full` is the full model's text, prompt included: after
    seeing full[:p] it says full[p]. The sparse model says the same except at the positions in `wrong`
    ({position: its token}). The script checks the tokens it is fed: a correct loop only ever shows the models
    the text itself, or the text up to a wrong draft followed by later drafts (both models then say JUNK).
    Any other context means the loop fed a token it should not have: the model fails the test."""
    wrong = dict(wrong)

    def model(sparse):
        def script(context):
            n = len(context)
            if list(context) == full[:n]:
                return sure(wrong.get(n, full[n]) if sparse else full[n])
            m = next(i for i in range(n) if context[i] != full[i])
            assert context[m] == wrong.get(m) and set(context[m + 1:]) <= {JUNK}, f"fed {context}"
            return sure(JUNK)
        return script

    return FakeModel(model(False), model(True))


def run(model, max_new=20, period=4, width=1, **kw):
    return sirius(model, PROMPT, max_new, eos_ids=[EOS], sparsity="fine", period=period, width=width, **kw)


def test_scripted_runs_to_length_mid_period():
    full = [0, 0] + [1, 2, 3, 4, 5, 6, 7, 8] * 10
    res = run(chain(full, {5: 7}), max_new=11, period=4)           # one wrong draft, at position 5
    assert res.tokens == full[2:13]
    assert res.advances == [3, 4, 3]    # a correction after 2 drafts, a full period, a short last window
    assert res.corrections == 1
    assert res.from_full == [True, False, False, True] + [False, False, False, True] + [False, False, True]


def test_scripted_drafted_eos_accepted():
    full = [0, 0, 1, 2, EOS, 3] + [4] * 20
    res = run(chain(full))                 # drafts 2, EOS, 3 all accepted: emission stops right after EOS
    assert res.tokens == [1, 2, EOS] and res.from_full == [True, False, False]


def test_scripted_drafted_eos_rejected():
    full = [0, 0, 1, 2, 3, 4, 5, 6, 7, 8, EOS] + [1] * 20
    res = run(chain(full, {4: EOS}), period=4)   # the sparse model wants to stop early, the full one does not
    assert res.tokens == [1, 2, 3, 4, 5, 6, 7, 8, EOS]
    assert res.from_full[2] is True and res.from_full[-1] is False


def test_scripted_full_model_eos():
    res = run(chain([0, 0, 1, 2, EOS] + [3] * 20, {4: 3}))
    assert res.tokens == [1, 2, EOS] and res.from_full == [True, False, True]


def test_scripted_first_token_eos():
    res = run(chain([0, 0, EOS] + [1] * 10))
    assert res.tokens == [EOS] and res.advances == [] and math.isnan(res.aal)


def test_scripted_nothing_accepted_period_2():
    """Every draft wrong: each period gains one token, the full model's, and the output is its text."""
    full = [0, 0] + [1, 2, 3, 4, 5, 6, 7, 8] * 3
    wrong = {p: (full[p] % 8) + 1 for p in range(3, len(full))}
    res = run(chain(full, wrong), max_new=10, period=2)
    assert res.tokens == full[2:12] and all(res.from_full)
    assert res.advances == [1] * 9 and res.aal == 1 and res.corrections == 8  # the last window had no draft


def test_scripted_aal_counts_complete_periods():
    """Every draft right: full periods of K = 4, then a short last one, which AAL leaves out."""
    full = [0, 0] + list(range(1, 9)) * 4
    res = run(chain(full), max_new=15, period=4)
    assert res.tokens == full[2:17] and res.advances == [4, 4, 4, 2] and res.aal == 4
    assert res.effective_density == pytest.approx((3 * res.density + 1) / 4)
    assert math.isnan(run(chain(full), max_new=3, period=4).aal)            # one period: nothing to count


def test_scripted_generate():
    """Plain decoding: the first token from the dense prefill, then the sparse model on its own, until EOS."""
    full = [0, 0, 1, 2, 3, 4, 5, 6, EOS] + [1] * 10
    sparse = generate(chain(full, {4: 7}), PROMPT, 6, eos_ids=[EOS], sparsity="fine")
    assert sparse.tokens == [1, 2, 7, JUNK, JUNK, JUNK] and sparse.from_full == [True] + [False] * 5
    dense = generate(chain(full), PROMPT, 20, eos_ids=[EOS])
    assert dense.tokens == [1, 2, 3, 4, 5, 6, EOS] and all(dense.from_full) and dense.density == 1.0


# --- the tree on scripted logits ---------------------------------------------------------------------

def table(rows):
    """A script from a table {context: {token: probability at the acceptance temperature}}, the rest of the
    probability spread evenly. A context not in the table was not expected: the test fails."""
    def script(context):
        assert context in rows, f"fed {context}"
        p = torch.full((V,), (1 - sum(rows[context].values())) / (V - len(rows[context])) + 1e-9)
        for token, q in rows[context].items():
            p[token] = q
        return torch.log(p) * ACCEPT_TEMPERATURE
    return script


def test_beam_by_hand():
    """w nodes per depth, best first by cumulative log-probability (not by each child's own), each node's
    ancestors marked. Tree attention gives each node its depth as RoPE position (FakeModel checks). Width 2:
        depth 1: t0 = 1 -> 2 (p .7), 3 (.2)
        depth 2: 2 -> 4 (.5), 5 (.4); 3 -> 6 (.9), 7 (.05).
    Cumulative: 1,2,4 = .35 > 1,2,5 = .28 > 1,3,6 = .18, so both survivors hang under 2, though 6 is the
    likeliest child on its own."""
    sparse = table({(0, 0, 1): {2: 0.7, 3: 0.2}, (0, 0, 1, 2): {4: 0.5, 5: 0.4},
                    (0, 0, 1, 3): {6: 0.9, 7: 0.05}})
    model = FakeModel(table({(0,): {0: 1.0}, (0, 0): {1: 1.0}}), sparse)
    model(PROMPT, 0)
    tokens, anc = draft_tree(model, "sparse", torch.tensor([1]), 2, 3, 2)
    assert tokens.tolist() == [1, 2, 3, 4, 5]
    paths = [tokens[row].tolist() for row in anc]                  # each node's root-to-node path
    assert paths == [[1], [1, 2], [1, 3], [1, 2, 4], [1, 2, 5]]
    assert model.slots[2:5] == [1, 2, 3]            # node j was run in slot pos + j (the leaves are not run)


# After the prompt (0, 0) the full model says 1 (t0). The sparse model's tree, width 2, depth 2 (period 3),
# with a drafted EOS as a node like any other:
#   depth 1: 1 -> 2 (p .5), EOS (.4)
#   depth 2: 2 -> 3 (.5), 4 (.3); EOS -> 5 (.9), 6 (.05).
#   Cumulative: 1,EOS,5 = .36 > 1,2,3 = .25 > 1,2,4 = .15.
#   Nodes: 0:1 | 1:2 2:EOS | 3:5 (under EOS) 4:3 (under 2); beam 0 = 1,EOS,5 and beam 1 = 1,2,3.
SPARSE_TREE = {(0, 0, 1): {2: 0.5, EOS: 0.4}, (0, 0, 1, 2): {3: 0.5, 4: 0.3},
               (0, 0, 1, EOS): {5: 0.9, 6: 0.05}}


def tree_model(after_t0):
    """The full model of the tree tests: after t0 it says `after_t0` ({token: p}), then agrees with both
    beams."""
    return FakeModel(table({(0,): {0: 1.0}, (0, 0): {1: 1.0}, (0, 0, 1): after_t0, (0, 0, 1, 2): {3: 1.0},
                            (0, 0, 1, EOS): {5: 1.0}, (0, 0, 1, 2, 3): {6: 1.0},
                            (0, 0, 1, EOS, 5): {6: 1.0}}),
                     table(SPARSE_TREE))


@pytest.mark.parametrize("after_t0, tokens, beams, chosen", [
    ({EOS: 1.0}, [1, EOS], [2, 0], 0),                 # the EOS beam is kept: emission stops right after EOS
    ({2: 1.0}, [1, 2, 3, 6], [0, 2], 1),               # EOS rejected, the second beam wins: no EOS emitted
    ({2: 0.6, EOS: 0.4}, [1, EOS], [2, 2], 0),         # both kept whole: the tie goes to the likelier beam
], ids=["eos-accepted", "eos-rejected", "tie"])
def test_tree_period_chooses_a_beam(after_t0, tokens, beams, chosen):
    """One period of width 2: each beam's accepted length, the longest wins, its drafts are emitted, then the
    full model's token after them; its nodes' slots are gathered back to pos.. (the back-gather)."""
    model, periods = tree_model(after_t0), []
    res = run(model, max_new=4, period=3, width=2, on_period=periods.append)
    assert res.tokens == tokens and len(periods) == 1
    assert periods[0].beams == beams and periods[0].chosen == chosen
    kept = periods[0].accepted
    assert model.slots[2:3 + kept] == periods[0].window[:kept + 1]     # t0 and the kept drafts, in order


def random_script(seed):
    """Fixed random logits per context: a sparse model with no ties to hide a wrong order."""
    def script(context):
        return 3 * torch.randn(V, generator=torch.Generator().manual_seed(hash((seed, context)) % 2 ** 31))
    return script


@pytest.mark.parametrize("width, n", [(2, 5), (3, 4), (4, 3)])
def test_beam_matches_brute_force(width, n):
    """Each depth keeps the w best paths of all children of the previous depth (every token of the
    vocabulary considered here), by cumulative log_softmax(z / 0.6), best first."""
    script = random_script(width)
    model = FakeModel(script, script)
    model(PROMPT, 0)
    tokens, anc = draft_tree(model, "sparse", torch.tensor([1]), 2, n, width)
    assert tokens.shape == (1 + (n - 1) * width,) and anc.shape == (len(tokens), len(tokens))
    beams = [((1,), 0.0)]
    for d in range(1, n):
        beams = sorted(((path + (t,), s + float(logp[t])) for path, s in beams
                        for logp in [F.log_softmax(script((0, 0) + path) / ACCEPT_TEMPERATURE, -1)]
                        for t in range(V)), key=lambda c: -c[1])[:width]
        nodes = range(1 + (d - 1) * width, 1 + d * width)
        assert [tuple(tokens[anc[j]].tolist()) for j in nodes] == [path for path, _ in beams], f"depth {d}"


# --- argument checks -----------------------------------------------------------------------------------

@pytest.mark.parametrize("call, kwargs, match", [
    (generate, {"sparsity": "none"}, "unknown sparsity"),
    (generate, {"sparsity": "sparse"}, "unknown sparsity"),
    (generate, {"sparsity": "fine", "keep": 0}, "kept fraction"),
    (generate, {"sparsity": "coarse", "keep": 1.5}, "kept fraction"),
    (sirius, {"sparsity": "dense"}, "fine or coarse"),
    (sirius, {"sparsity": "Fine"}, "fine or coarse"),
    (sirius, {"keep": 0.0}, "kept fraction"),
    (sirius, {"keep": float("nan")}, "kept fraction"),
    (sirius, {"period": 1}, "period"),
    (sirius, {"width": 0}, "width"),
    (sirius, {"threshold": -0.1}, "threshold"),
    (sirius, {"threshold": 1.5}, "threshold"),
    (sirius, {"threshold": float("inf")}, "threshold"),
    (sirius, {"threshold": float("nan")}, "threshold"),
    (sirius, {"period": 200, "width": 2}, "cache"),
    (sirius, {"period": 8, "width": 20}, "cache"),
], ids=lambda v: getattr(v, "__name__", None) if callable(v) else None)
def test_bad_arguments_raise_value_error(tiny, call, kwargs, match):
    with pytest.raises(ValueError, match=match):
        call(tiny, torch.arange(10), 20, **kwargs)


@pytest.mark.parametrize("call", [generate, sirius])
@pytest.mark.parametrize("max_new", [0, -1])
def test_no_new_tokens(tiny, call, max_new):
    """max_new_tokens < 1 asks for nothing: an empty answer or a ValueError that says so, not a run until the
    cache overflows (generate) or a negative tensor size (sirius)."""
    try:
        res = call(tiny, torch.arange(10), max_new)
    except ValueError as e:
        assert "max_new_tokens" in str(e)
    else:
        assert res.tokens == []


def test_cache_slots_is_enough_for_the_widest_tree():
    """A request fits in cache_slots(...) slots even in the worst case: nothing accepted, so one tree of
    (K-1)*w scratch slots starts as late as it can. The sparse model here never proposes the full model's
    token, so strict acceptance rejects every draft."""
    full = random_script(0)
    sparse = lambda c: full(c) - 100 * F.one_hot(full(c).argmax(), V)  # noqa: E731
    slots = cache_slots(len(PROMPT), 20, 4, 3)
    model = FakeModel(full, sparse, max_seq_len=slots)
    res = sirius(model, PROMPT, 20, sparsity="fine", period=4, width=3, strict=True)
    assert len(res.tokens) == 20 and res.aal == 1
    assert slots - 2 <= model.highest < slots                 # the bound was reached, within one slot


# --- the tree on real weights ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def prompts(smollm):
    return [encode_chat(smollm[1], p) for p in PROMPTS]


def model_and_prompt(request, name):
    """The tiny random Llama with 15 random tokens, or SmolLM2 with a chat prompt (fixtures fetched
    lazily, so a tiny-only test does not load SmolLM2)."""
    if name == "tiny":
        return request.getfixturevalue("tiny"), torch.randint(0, 100, (15,),
                                                              generator=torch.Generator().manual_seed(7))
    return request.getfixturevalue("smollm")[0], request.getfixturevalue("prompts")[3]


@pytest.mark.parametrize("name", ["tiny", "smollm"])
def test_tree_attention_is_exact(request, name):
    """In one tree pass (each depth's sparse drafting pass, then the full verification pass over all nodes),
    every node's logits equal a plain causal pass over the prefix and that node's root-to-node path, run in a
    twin with its own cache. Coarse sparsity, as its MLP treats rows independently like the dense one."""
    model, prefix = model_and_prompt(request, name)
    reference, pos, width, n = twin(model), len(prefix), 3, 4
    logits, mlp = prefill(model, prefix, "coarse", 0.5)
    reference(prefix, 0)
    tokens, anc = draft_tree(model, mlp, logits.argmax().view(1), pos, n, width)
    paths = [row.nonzero()[:, 0] for row in anc]

    def check(z, nodes, mlp):
        for j, row in zip(nodes, z):
            want = reference(tokens[paths[j]], pos, mlp=mlp)[-1]   # the path in slots pos.., causally
            assert rel_err(row, want) <= 1e-4, f"node {j}"

    for d in range(n):                                           # the sparse passes, depth by depth
        lo, hi = (0, 1) if d == 0 else (1 + (d - 1) * width, 1 + d * width)
        z = model(tokens[lo:hi], pos + lo, mlp=mlp, **tree_attention(anc, pos, lo, hi, width))
        check(z, range(lo, hi), mlp)
    full = model(tokens, pos, **tree_attention(anc, pos, 0, len(tokens), width))
    check(full, range(len(tokens)), None)
    # Not vacuous: without the tree mask the deepest nodes would see other branches and get other logits.
    assert rel_err(reference(tokens, pos)[-1], full[-1]) > 1e-2


def test_tree_depth_shares_one_fine_neuron_set(tiny, monkeypatch):
    """With fine sparsity the w rows of a depth go through the MLP together and use one neuron set: the top k
    of sum over the rows of |SiLU(gate)|. Checked on every MLP call of a real tree, against products here."""
    calls, real = [], sirius_min.fine_mlp
    monkeypatch.setattr(sirius_min, "fine_mlp", lambda *a: calls.append((a, real(*a))) or calls[-1][1])
    prompt = torch.randint(0, 100, (12,), generator=torch.Generator().manual_seed(3))
    logits, mlp = prefill(tiny, prompt, "fine", 0.25)
    draft_tree(tiny, mlp, logits.argmax().view(1), 12, 4, 3)
    assert [len(args[0]) for args, _ in calls] == [1, 1, 3, 3, 3, 3]   # depth 0, 1, 2; two layers each

    def masked(x, w_gate_up, w_down, idx):
        gate, up = (x.double() @ w_gate_up.double()).chunk(2, dim=-1)
        return (F.silu(gate) * up)[:, idx] @ w_down.double()[idx]

    for (x, w_gate_up, w_down, k, _), out in calls[2:]:
        a = F.silu(x @ w_gate_up[:, :64])
        shared = a.abs().sum(0).argsort(descending=True)[:k]
        own = torch.cat([masked(x[t:t + 1], w_gate_up, w_down, a[t].abs().argsort(descending=True)[:k])
                         for t in range(3)])
        assert rel_err(out, masked(x, w_gate_up, w_down, shared)) <= 1e-5
        assert rel_err(out, own) > 1e-3                           # per-row sets would give another answer


def test_coarse_selection_is_the_prompts_griffin_top_k(tiny, monkeypatch):
    """prefill(coarse) keeps, in every layer, the top k GRIFFIN scores of the prompt's SwiGLU activations, in
    a pass whose logits are the dense model's. Sirius selects once per request (its verification passes are
    dense), and another prompt selects differently."""
    g = torch.Generator().manual_seed(5)
    prompt, other = torch.randint(0, 100, (20,), generator=g), torch.randint(0, 100, (20,), generator=g)
    acts = []

    def recording(i, x):
        acts.append(swiglu(x, tiny.layers[i].w_gate_up))
        return dense_mlp(x, tiny.layers[i].w_gate_up, tiny.layers[i].w_down)

    dense_logits = tiny(prompt, 0, mlp=recording)[-1]
    logits, mlp = prefill(tiny, prompt, "coarse", 0.25)
    assert rel_err(logits, dense_logits) <= 1e-6
    k = n_kept(64, 0.25)
    assert [i.tolist() for i in mlp.idx] == [sorted(griffin_scores(z).argsort(descending=True)[:k].tolist())
                                             for z in acts]
    made = []

    class Spy(sirius_min.CoarseMLP):
        def __init__(self, *args):
            super().__init__(*args)
            made.append(self)

    monkeypatch.setattr(sirius_min, "CoarseMLP", Spy)
    res = sirius(tiny, prompt, 30, sparsity="coarse", keep=0.25, period=4)
    assert len(res.advances) >= 3 and len(made) == 1
    assert all(torch.equal(a, b) for a, b in zip(made[0].idx, mlp.idx))
    _, another = prefill(tiny, other, "coarse", 0.25)
    assert any(not torch.equal(a, b) for a, b in zip(another.idx, mlp.idx))


# --- the loop on SmolLM2 -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dense(smollm, prompts):
    """Dense greedy answers (64 tokens) to the first three prompts: what the lossless cases must match."""
    return [generate(smollm[0], p, 64).tokens for p in prompts[:3]]


@pytest.fixture(scope="module")
def fine_answers(smollm, prompts):
    """Sirius's answers (fine, keep 0.5, K = 8, w = 1; 64 tokens) to the first three prompts."""
    return [sirius(smollm[0], p, 64, sparsity="fine", keep=0.5, period=8) for p in prompts[:3]]


def plain_loop(model, prompt, max_new, *, sparsity, keep, period, threshold=0.1):
    """Sirius as a chain, written out: K-1 greedy sparse steps one token at a time, one full pass over the
    window, the longest plausible prefix of drafts plus the full model's next token, roll back. Returns the
    tokens and each period's advance."""
    logits, mlp = prefill(model, prompt, sparsity, keep)
    out, pos, advances = [int(logits.argmax())], len(prompt), []
    while len(out) < max_new:
        window = [out[-1]]
        for j in range(min(period, max_new - len(out)) - 1):
            window.append(int(model(torch.tensor(window[-1:]), pos + j, mlp=mlp)[-1].argmax()))
        a, nxt, _ = accept_length(model(torch.tensor(window), pos), torch.tensor(window[1:]), threshold)
        out += window[1:a + 1] + [nxt]
        advances.append(a + 1)
        pos += a + 1                     # the next window starts after the kept drafts: the rest is stale
    return out, advances


@pytest.mark.parametrize("sparsity, keep, period", [("fine", 0.5, 8), ("coarse", 0.9, 8)])
def test_width_one_is_the_plain_loop(smollm, prompts, fine_answers, sparsity, keep, period):
    """w = 1: the tree code is the loop above, token for token and period for period."""
    model, _ = smollm
    for i, prompt in enumerate(prompts[:3]):
        res = fine_answers[i] if sparsity == "fine" else \
            sirius(model, prompt, 64, sparsity=sparsity, keep=keep, period=period, width=1)
        tokens, advances = plain_loop(model, prompt, 64, sparsity=sparsity, keep=keep, period=period)
        assert res.tokens == tokens and len(tokens) == 64
        assert res.advances == advances and res.corrections > 0


@pytest.mark.parametrize("sparsity, width", [("fine", 2), ("coarse", 4)])
def test_strict_tree_is_dense_greedy(smollm, prompts, dense, sparsity, width):
    """Strict acceptance keeps a draft only if it is the full model's argmax: any width then reproduces dense
    greedy decoding (up to floating-point near-ties between passes of different lengths)."""
    model, _ = smollm
    periods = []
    for prompt, reference in zip(prompts[:2], dense):
        res = sirius(model, prompt, 32, sparsity=sparsity, keep=0.5, period=4, width=width, strict=True,
                     on_period=periods.append)
        assert res.tokens == reference[:32]
        assert res.corrections > 0                  # the sparse model went wrong: strict mode had work to do
    assert any(p.chosen > 0 for p in periods)         # and a side beam won at least once: the tree mattered


@pytest.mark.parametrize("name, sparsity, width",
                         [("tiny", "coarse", 1), ("tiny", "fine", 3), ("smollm", "fine", 3)])
def test_cache_holds_full_kv_after_every_period(request, monkeypatch, name, sparsity, width):
    """After each verification (and, for a tree, the back-gather) the cache holds, in slots 0.., the full
    model's keys and values of the prompt and every verified token: as a fresh prefill in a twin computes."""
    model, prompt = model_and_prompt(request, name)
    fresh, seq, checks = twin(model), prompt.tolist(), []
    original = sirius_min.sirius_period

    def checked_period(model, mlp, t0, pos, n, **kw):
        nonlocal seq
        assert len(seq) == pos                                 # rolled back to exactly the verified length
        drafts, nxt, record = original(model, mlp, t0, pos, n, **kw)
        seq = seq + [int(t0)] + drafts
        fresh(torch.tensor(seq), 0)
        L = len(seq)
        checks.append(max(rel_err(model.cache_k[:, :, :L], fresh.cache_k[:, :, :L]),
                          rel_err(model.cache_v[:, :, :L], fresh.cache_v[:, :, :L])))
        return drafts, nxt, record

    monkeypatch.setattr(sirius_min, "sirius_period", checked_period)
    res = sirius(model, prompt, 32, sparsity=sparsity, keep=0.5, period=6, width=width)
    assert len(checks) == len(res.advances) >= 3
    assert len(seq) - len(prompt) - len(res.advances) > 0      # drafts were kept: slots had to be gathered
    assert seq[len(prompt):] == res.tokens[:len(seq) - len(prompt)]
    assert max(checks) <= 1e-4


@pytest.mark.parametrize("sparsity", ["fine", "coarse"])
def test_keeping_every_neuron_accepts_every_draft(smollm, prompts, dense, sparsity):
    """keep = 1: the sparse model is the full one, so every draft is accepted: AAL = K over the counted
    periods, and the output is dense greedy."""
    model, _ = smollm
    res = sirius(model, prompts[0], 49, sparsity=sparsity, keep=1.0, period=16)
    assert res.tokens == dense[0][:49]
    assert res.advances == [16, 16, 16] and res.aal == 16 and res.effective_density == 1.0


def test_sparsity_hurts_and_sirius_repairs(smollm, prompts, dense, fine_answers):
    """Full-model NLL of the answers (how plausible the full model finds them): dense <= Sirius < sparse,
    Sirius recovering >= 60% of the way from sparse to dense, with an AAL above 4 of 8."""
    model, _ = smollm
    nll = {"dense": [], "sparse": [], "sirius": []}
    for prompt, reference, res in zip(prompts, dense, fine_answers):
        for name, tokens in [("dense", reference), ("sirius", res.tokens),
                             ("sparse", generate(model, prompt, 64, sparsity="fine", keep=0.5).tokens)]:
            nll[name].append(full_model_nll(model, prompt, tokens))
    mean = {k: sum(v) / len(v) for k, v in nll.items()}
    recovered = (mean["sparse"] - mean["sirius"]) / (mean["sparse"] - mean["dense"])
    aal = sum(res.aal for res in fine_answers) / len(fine_answers)
    print(f"mean full-model NLL {mean}, recovered {recovered:.0%}, AAL {aal:.2f}/8")
    assert mean["dense"] <= mean["sirius"] < mean["sparse"]
    assert recovered >= 0.6 and aal > 4


def test_fine_mlp_reads_kept_rows_from_one_lasting_copy(tiny, monkeypatch):
    """On a CPU in fp32 FineMLP gives every layer W_up in neuron-major order once, reused by later requests,
    and its steps take the gather plan with it (not the W_down-only fallback)."""
    for L in tiny.layers:
        L.up_rows = None
    first = sirius_min.FineMLP(tiny, 0.25)
    D = tiny.cfg.intermediate_size
    copies = [L.up_rows for L in tiny.layers]
    assert all(torch.equal(c, L.w_gate_up[:, D:].T) for c, L in zip(copies, tiny.layers))
    sirius_min.FineMLP(tiny, 0.5)
    assert all(L.up_rows is c for c, L in zip(copies, tiny.layers))
    seen = []
    real = sirius_min.fine_mlp
    monkeypatch.setattr(sirius_min, "fine_mlp", lambda *a: seen.append(a[4]) or real(*a))
    first(0, torch.randn(1, tiny.cfg.hidden_size))
    assert seen and seen[0] is copies[0]

"""sirius_min.py: the acceptance rule, the period loop (EOS, length, AAL), the tree (beam, mask, back-gather,
shared fine set), argument checks, and quality on SmolLM2.

Four kinds of model: a scripted one (`FakeModel`, logits we choose, for the rules), the tiny random Llama
(conftest, in fp32; once in bf16), the embedded SmolLM2 where the issue asks for a real model, and `StandIn`,
the smallest model written only to sirius_min's `Model` contract. Logit and KV comparisons are relative to
their scale (conftest.rel_err).
"""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import kernels
import sirius_min
from conftest import PROMPTS, encode_chat, kv, rel_err, twin
from kernels import MLPWeights, dense_mlp, griffin_scores, n_kept, swiglu
from bench import full_model_nll
from tracing import Trace
from sirius_min import (ACCEPT_TEMPERATURE, Sampling, cache_slots, depth_nodes, draft_tree, effective_density,
                        generate, keep_drafts, longest_kept_prefix, prefill_and_sparse_mlp,
                        root_to_leaf_paths, sirius, tree_pass_args)

GREEDY = Sampling()

# --- the acceptance rules on fixed logits, no model ---------------------------------------------------


def logits_from_probs(rows):
    """Logits whose softmax at the acceptance temperature is exactly `rows`."""
    return torch.log(torch.tensor(rows)) * ACCEPT_TEMPERATURE


def accept(z, drafts, threshold=0.1, strict=False):
    """The rule on a chain window: z (n, V) the full model's logits at t0, d_1, ..; drafts d_1..d_{n-1}.
    Returns (a, the full model's argmax after the kept drafts)."""
    n = len(z)
    parent = torch.tensor([0] + list(range(n - 1)))               # node i's parent is node i-1
    tokens = torch.tensor([0] + list(drafts))
    kept, _ = keep_drafts(z, parent, tokens, "argmax" if strict else "threshold", threshold, GREEDY)
    a = int(longest_kept_prefix(kept[None, 1:])[0])
    return a, int(z[a].argmax())


def test_accept_all_gives_bonus():
    z = logits_from_probs([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.05, 0.15, 0.8]])
    assert accept(z, [0, 1]) == (2, 2)                   # both kept, bonus = argmax of the last row


def test_first_rejected_gives_correction():
    z = logits_from_probs([[0.05, 0.15, 0.8], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]])
    assert accept(z, [0, 1]) == (0, 2)                   # p(d1)=0.05 < 0.1: corrected to 2


def test_a_kept_draft_after_a_rejected_one_does_not_count():
    z = logits_from_probs([[0.7, 0.2, 0.1], [0.05, 0.15, 0.8], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]])
    assert accept(z, [0, 0, 1]) == (1, 2)                # d3 (p=.8) would pass, but d2 (p=.05) failed first


def test_plausible_but_not_top1_is_kept():
    """The rule is lossy by design: a plausible draft is kept though the full model prefers another."""
    z = logits_from_probs([[0.6, 0.3, 0.1], [0.2, 0.75, 0.05], [0.9, 0.05, 0.05]])
    assert accept(z, [1, 2]) == (1, 1)                   # d1 (p=.3) kept, d2 (p=.05) corrected to 1
    assert accept(z, [1, 2], strict=True) == (0, 0)      # strict wants the argmax


def test_flat_distribution_rejects_even_the_argmax():
    z = torch.zeros(3, 50)
    z[0, 7] = 0.01  # a barely preferred argmax: p ~ 1/50 < 0.1
    assert accept(z, [7, 7]) == (0, 7)


def test_acceptance_temperature_is_the_papers():
    """p is taken at temperature 0.6: after logits (2, 0), token 1 has p = 0.034 and is rejected (at
    temperature 1 it would have p = 0.12 and be kept)."""
    z = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    assert accept(z, [1])[0] == 0
    p = sirius_min.acceptance_probs(z, torch.tensor([0, 0]), torch.tensor([0, 1]))[1]
    assert float(p) == pytest.approx(1 / (1 + math.exp(2 / 0.6)))


def test_threshold_edges():
    z = logits_from_probs([[0.02, 0.98], [0.98, 0.02], [0.5, 0.5]])
    assert accept(z, [0, 1], threshold=0.0)[0] == 2      # threshold 0 keeps anything
    assert accept(z, [1, 0], threshold=1.0)[0] == 0      # 1 keeps only a certainty


def test_threshold_boundary_is_kept():
    """p == threshold keeps the draft (the rule is >=): two equal logits give p = 0.5 exactly, also in
    float32. Threshold 0.5 keeps it, the next float32 above 0.5 rejects it; on fixed logits, and through
    sirius() on a script whose full model is evenly split between the draft and another token."""
    z, above = torch.zeros(2, 2), float(torch.nextafter(torch.tensor(0.5), torch.tensor(1.0)))
    assert float(sirius_min.acceptance_probs(z, torch.tensor([0, 0]), torch.tensor([0, 1]))[1]) == 0.5
    assert accept(z, [1], threshold=0.5)[0] == 1 and accept(z, [1], threshold=above)[0] == 0
    split = torch.full((V,), -math.inf)
    split[[2, 3]] = 0.0                                       # p(2) = p(3) = 0.5 at any temperature
    model = FakeModel(lambda c: sure(1) if len(c) == 2 else split, lambda c: sure(3))
    for threshold, advances in ((0.5, [2]), (above, [1])):
        res = sirius(model, PROMPT, 3, sparsity="fine", period=2, threshold=threshold)
        assert res.tokens[:2] == [1, 3 if advances == [2] else 2] and res.advances[:1] == advances


def test_effective_density_matches_paper():
    assert round(effective_density(0.65, 16, 15.22), 3) == 0.706
    assert round(effective_density(0.76, 16, 15.37), 3) == 0.807


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

    def __init__(self, full, sparse, max_seq_len=64, vocab=V):
        self.full, self.sparse, self.max_seq_len = full, sparse, max_seq_len
        self.cfg = SimpleNamespace(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                   num_attention_heads=1, num_key_value_heads=1, head_dim=8, vocab_size=vocab,
                                   tie_word_embeddings=True)
        self.layers = [MLPWeights(w_gate_up=torch.zeros(8, 32), w_down=torch.zeros(16, 8))]
        self.slots, self.highest = [None] * max_seq_len, -1

    def __call__(self, tokens, start_pos, mlp=None, *, positions=None, mask=None, last_only=False):
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
        return torch.stack(rows[-1:] if last_only else rows)

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
    model = chain(full, {5: 7})
    res = run(model, max_new=11, period=4)                         # one wrong draft, at position 5
    assert res.tokens == full[2:13]
    # a correction after 2 drafts, a full period, then a full last window cut to the budget: its 3 drafts
    # verified, kept and emitted, only its bonus dropped
    assert res.advances == [3, 4, 4]
    assert res.corrections == 1
    assert res.from_full == [True, False, False, True] + [False, False, False, True] + [False, False, False]
    assert model.highest == 9 + 3  # the last window (t0 in slot 9) ran all its K - 1 = 3 drafts


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
    assert res.advances == [1] * 9 and res.aal == 1 and res.corrections == 9


def test_scripted_aal_counts_complete_periods():
    """AAL leaves out the last period, which EOS or the length budget may cut. The periods with t0 at
    positions 2, 6 and 10 keep their 3 drafts and add a bonus; the one with t0 at 14 keeps the draft at 15,
    the draft at 16 is wrong, so that period gains 2 (a draft and the correction); then full periods again,
    the last cut from 4 tokens to 3 by the budget of 30."""
    full = [0, 0] + list(range(1, 9)) * 6
    res = run(chain(full, {16: 3}), max_new=30, period=4)        # full[16] is 7
    assert res.tokens == full[2:32]
    assert res.advances == [4, 4, 4, 2, 4, 4, 4, 4] and res.corrections == 1
    assert res.aal == pytest.approx(26 / 7)
    assert res.effective_density == pytest.approx((3 * res.density + 1) / (26 / 7))
    assert math.isnan(run(chain(full), max_new=3, period=4).aal)            # one period: nothing to count


def test_scripted_generate():
    """Plain decoding: the first token from the dense prefill, then the sparse model on its own, until EOS."""
    full = [0, 0, 1, 2, 3, 4, 5, 6, EOS] + [1] * 10
    sparse = generate(chain(full, {4: 7}), PROMPT, 6, eos_ids=[EOS], sparsity="fine")
    assert sparse.tokens == [1, 2, 7, JUNK, JUNK, JUNK] and sparse.from_full == [True] + [False] * 5
    dense = generate(chain(full), PROMPT, 20, eos_ids=[EOS])
    assert dense.tokens == [1, 2, 3, 4, 5, 6, EOS] and all(dense.from_full) and dense.density == 1.0


# --- the threshold rule through sirius(): a script whose acceptances are known -------------------------
# A Markov script: each model's next token depends on the last token only, so every context is defined. The
# full model's likeliest token after x is x + 1 (mod 10), with p = 0.6 at the acceptance temperature; the
# sparse model says the same except after 3, where it says 7 (p = 0.3: plausible, kept though not the
# argmax), and after 8, where it says 5 (p = 0.05: rejected). Every other token has p <= 0.4 / 11 ~ 0.036.

def markov(special, flat_rows=(), V=12):
    """Full-model logits by row: p 0.6 on x + 1, special {x: (token, p)}, the rest spread evenly (a row in
    flat_rows: an even spread with x + 1 barely ahead). Sparse: sure of its token."""
    def full(context):
        x = context[-1]
        if x in flat_rows:
            row = torch.full((V,), 1 / V)
            row[(x + 1) % 10] += 0.01
            return torch.log(row / row.sum()) * ACCEPT_TEMPERATURE
        row, (tok, p) = torch.zeros(V), special.get(x, ((x + 1) % 10, 0.6))
        row[(x + 1) % 10], row[tok] = 0.6, p
        rest = row == 0
        row[rest] = (1 - row.sum()) / rest.sum()
        return torch.log(row) * ACCEPT_TEMPERATURE
    sparse = lambda context: sure(special.get(context[-1], ((context[-1] + 1) % 10,))[0])  # noqa: E731
    return FakeModel(full, sparse)


SPECIAL = {3: (7, 0.3), 8: (5, 0.05)}


def test_the_threshold_rule_on_a_script_with_known_acceptances():
    """Worked by hand (K = 4, prompt ending in 0): the prefill gives 1. Period 1, t0 = 1: drafts 2, 3, 7
    (p .6, .6, .3) all kept, bonus 8. Period 2, t0 = 8: draft 5 (p .05) rejected, corrected to 9. Period 3,
    t0 = 9: 0, 1, 2 kept, bonus 3. Period 4, t0 = 3: 7 and 8 kept, then 5 rejected, corrected to 9 (a kept
    draft, then a rejection). Period 5, t0 = 9: 0, 1, 2 kept, and the budget of 16 is reached. The strict rule
    rejects the 7 and writes the full model's own text, 1, 2, 3, ..."""
    res = sirius(markov(SPECIAL), PROMPT, 16, sparsity="fine", period=4)   # no EOS: 9 is text here
    assert res.tokens == [1, 2, 3, 7, 8, 9, 0, 1, 2, 3, 7, 8, 9, 0, 1, 2]
    assert res.from_full == [True, False, False, False, True, True, False, False, False, True, False, False,
                             True, False, False, False]
    assert res.advances == [4, 1, 4, 3, 4] and res.corrections == 2
    strict = sirius(markov(SPECIAL), PROMPT, 16, sparsity="fine", period=4, strict=True)
    assert strict.tokens == [(1 + i) % 10 for i in range(16)] and strict.corrections > 0


def test_a_seed_reproduces_a_sampled_run_and_the_correction_is_sampled():
    """Sampling under the paper's rule, on the script with its full model sure of x + 1 everywhere but
    after 8: the prefill gives 8 (after 7), the sparse model's draft 5 is rejected (p .05 at 0.6), and the
    token appended is sampled from the full model at T = 1, softmax(z / 1) with z = 0.6 log p: by hand,
    9 with probability 0.6^0.6 / (0.6^0.6 + 0.05^0.6 + 10 x 0.035^0.6) = 0.33 (the argmax would give 9 every
    time). 600 runs from one generator; 3.5 standard errors (a false alarm in about 2000 seeds). A seed gives
    the same run again, another seed another."""
    model = markov({x: ((x + 1) % 10, 1.0) for x in range(10) if x != 8} | {8: (5, 0.05)})
    g = torch.Generator().manual_seed(0)
    firsts, tokens = set(), []
    for _ in range(600):
        res = sirius(model, torch.tensor([0, 7]), 2, sparsity="fine", period=2, temperature=1.0, generator=g)
        firsts.add(res.tokens[0])
        tokens.append(res.tokens[1])
    p9 = 0.6 ** 0.6 / (0.6 ** 0.6 + 0.05 ** 0.6 + 10 * 0.035 ** 0.6)
    assert firsts == {8} and p9 == pytest.approx(0.33, abs=0.005)
    assert abs(tokens.count(9) / 600 - p9) < 3.5 * math.sqrt(p9 * (1 - p9) / 600)

    def run_with(seed, **kw):
        return sirius(model, torch.tensor([0, 7]), 12, sparsity="fine", period=2, temperature=1.0,
                      generator=torch.Generator().manual_seed(seed), **kw).tokens
    assert run_with(1) == run_with(1) and len({tuple(run_with(s)) for s in range(8)}) > 1


def test_the_papers_rule_samples_its_drafts():
    """With a temperature the paper's rule samples its drafts from the sparse model (and only then judges
    them). After t0 = 1 the sparse model gives 2 with p .7 and 3 with .3 at T = 1; the full model finds both
    plausible (p .5 each at 0.6), so the draft is kept either way and is the second token. 400 runs from one
    generator: 3 about .3 of the time, within 3.5 standard errors (drafting greedily would give 2 always)."""
    def probs(*pairs):
        row = torch.zeros(V)
        for token, p in pairs:
            row[token] = p
        return row

    full = lambda c: sure(1) if len(c) == 2 else torch.log(probs((2, .5), (3, .5))) * 0.6  # noqa: E731
    model = FakeModel(full, lambda c: torch.log(probs((2, .7), (3, .3))))
    g = torch.Generator().manual_seed(0)
    runs = [sirius(model, PROMPT, 2, sparsity="fine", period=2, temperature=1.0, generator=g)
            for _ in range(400)]
    assert all(r.tokens[0] == 1 and r.tokens[1] in (2, 3) and r.from_full == [True, False] for r in runs)
    threes = sum(r.tokens[1] == 3 for r in runs) / 400
    assert abs(threes - 0.3) < 3.5 * math.sqrt(0.3 * 0.7 / 400)


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
    tree = draft_tree(model, "sparse", torch.tensor([1]), 2, 3, 2, GREEDY)
    assert tree.tokens.tolist() == [1, 2, 3, 4, 5]
    assert tree.parent.tolist() == [0, 0, 0, 1, 1] and tree.depth.tolist() == [0, 1, 1, 2, 2]
    paths = [tree.tokens[row].tolist() for row in tree.sees]       # each node's root-to-node path
    assert paths == [[1], [1, 2], [1, 3], [1, 2, 4], [1, 2, 5]]
    assert root_to_leaf_paths(tree, 3, 2).tolist() == [[0, 1, 3], [0, 1, 4]]
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
    model, periods = tree_model(after_t0), Trace()
    res = run(model, max_new=4, period=3, width=2, on_period=periods)
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
    tree = draft_tree(model, "sparse", torch.tensor([1]), 2, n, width, GREEDY)
    tokens, anc = tree.tokens, tree.sees
    assert tokens.shape == (1 + (n - 1) * width,) and anc.shape == (len(tokens), len(tokens))
    beams = [((1,), 0.0)]
    for d in range(1, n):
        beams = sorted(((path + (t,), s + float(logp[t])) for path, s in beams
                        for logp in [F.log_softmax(script((0, 0) + path) / ACCEPT_TEMPERATURE, -1)]
                        for t in range(V)), key=lambda c: -c[1])[:width]
        assert [tuple(tokens[anc[j]].tolist()) for j in depth_nodes(d, width)] == [path for path, _ in beams]


# --- argument checks -----------------------------------------------------------------------------------

@pytest.mark.parametrize("call, kwargs, match", [
    (generate, {"sparsity": "none"}, "^unknown sparsity 'none'"),
    (generate, {"sparsity": "sparse"}, "^unknown sparsity 'sparse'"),
    (generate, {"sparsity": "fine", "keep": 0}, "kept fraction"),
    (generate, {"sparsity": "coarse", "keep": 1.5}, "kept fraction"),
    (generate, {"max_new_tokens": 0}, "^max_new_tokens must"),
    (generate, {"max_new_tokens": -1}, "^max_new_tokens must"),
    (generate, {"max_new_tokens": 200}, "cache slots"),
    (generate, {"temperature": -0.5}, "^temperature must"),
    (generate, {"temperature": float("nan")}, "^temperature must"),
    (generate, {"top_p": 0.0}, "^top_p must"),
    (sirius, {"sparsity": "dense"}, "fine or coarse"),
    (sirius, {"sparsity": "Fine"}, "fine or coarse"),
    (sirius, {"keep": 0.0}, "kept fraction"),
    (sirius, {"keep": float("nan")}, "kept fraction"),
    (sirius, {"max_new_tokens": 0}, "^max_new_tokens must"),
    (sirius, {"period": 1}, "^period must"),
    (sirius, {"period": 4.0}, "^period must"),
    (sirius, {"width": 0}, "^width must"),
    (sirius, {"threshold": -0.1}, "^threshold must"),
    (sirius, {"threshold": 1.5}, "^threshold must"),
    (sirius, {"threshold": float("inf")}, "^threshold must"),
    (sirius, {"threshold": float("nan")}, "^threshold must"),
    (sirius, {"top_p": 1.5}, "^top_p must"),
    (sirius, {"temperature": float("inf")}, "^temperature must"),
    (sirius, {"temperature": 0.7, "width": 2}, "width must be 1"),
    (sirius, {"period": 200, "width": 2}, "cache slots"),
    (sirius, {"period": 8, "width": 20}, "cache slots"),
], ids=lambda v: getattr(v, "__name__", None) if callable(v) else None)
def test_bad_arguments_raise_value_error(tiny, call, kwargs, match):
    """Each check names what it checks (the match is anchored where the message starts with the name)."""
    kwargs = {"max_new_tokens": 20, **kwargs}
    with pytest.raises(ValueError, match=match):
        call(tiny, torch.arange(10), **kwargs)


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
    assert model.highest == slots - 1                          # the last slot was used: the bound is tight


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
    logits, mlp = prefill_and_sparse_mlp(model, prefix, "coarse", 0.5)
    reference(prefix, 0)
    tree = draft_tree(model, mlp, logits.argmax().view(1), pos, n, width, GREEDY)
    paths = [row.nonzero()[:, 0] for row in tree.sees]

    def check(z, nodes, mlp):
        for j, row in zip(nodes, z):
            want = reference(tree.tokens[paths[j]], pos, mlp=mlp)[-1]   # the path in slots pos.., causally
            assert rel_err(row, want) <= 1e-4, f"node {j}"

    for d in range(n):                                           # the sparse passes, depth by depth
        nodes = depth_nodes(d, width)
        z = model(tree.tokens[nodes.start:nodes.stop], pos + nodes.start, mlp=mlp,
                  **tree_pass_args(tree.sees, pos, nodes, tree.depth, width))
        check(z, nodes, mlp)
    every = range(len(tree.tokens))
    full = model(tree.tokens, pos, **tree_pass_args(tree.sees, pos, every, tree.depth, width))
    check(full, every, None)
    # Not vacuous: without the tree mask the deepest nodes would see other branches and get other logits.
    assert rel_err(reference(tree.tokens, pos)[-1], full[-1]) > 1e-2


def test_tree_depth_shares_one_fine_neuron_set(tiny, monkeypatch):
    """With fine sparsity the w rows of a depth go through the MLP together and use one neuron set: the top k
    of sum over the rows of |SiLU(gate)|. Checked on every MLP call of a real tree, against products here;
    on the 3-row calls (depths 1 and 2) per-row sets are shown to give another answer."""
    calls, real = [], sirius_min.fine_mlp
    monkeypatch.setattr(sirius_min, "fine_mlp", lambda *a: calls.append((a, real(*a))) or calls[-1][1])
    prompt = torch.randint(0, 100, (12,), generator=torch.Generator().manual_seed(3))
    logits, mlp = prefill_and_sparse_mlp(tiny, prompt, "fine", 0.25)
    draft_tree(tiny, mlp, logits.argmax().view(1), 12, 4, 3, GREEDY)
    assert [len(args[0]) for args, _ in calls] == [1, 1, 3, 3, 3, 3]   # depth 0, 1, 2; two layers each

    def masked(x, layer, idx):
        gate, up = (x.double() @ layer.w_gate_up.double()).chunk(2, dim=-1)
        return (F.silu(gate) * up)[:, idx] @ layer.w_down.double()[idx]

    for (x, layer, k), out in calls:
        a = F.silu(x @ layer.w_gate_up[:, :64])
        shared = a.abs().sum(0).argsort(descending=True)[:k]
        assert rel_err(out, masked(x, layer, shared)) <= 1e-5
        if len(x) > 1:                                             # per-row sets would give another answer
            own = torch.cat([masked(x[t:t + 1], layer, a[t].abs().argsort(descending=True)[:k])
                             for t in range(len(x))])
            assert rel_err(out, own) > 1e-3


def test_coarse_selection_is_the_prompts_griffin_top_k(tiny, monkeypatch):
    """The coarse prefill keeps, in every layer, the top k GRIFFIN scores of the prompt's SwiGLU activations,
    in a pass whose logits are the dense model's. Sirius selects once per request (its verification passes
    are dense), and another prompt selects differently."""
    g = torch.Generator().manual_seed(5)
    prompt, other = torch.randint(0, 100, (20,), generator=g), torch.randint(0, 100, (20,), generator=g)
    acts = []

    def recording(i, x):
        acts.append(swiglu(x, tiny.layers[i]))
        return dense_mlp(x, tiny.layers[i])

    dense_logits = tiny(prompt, 0, mlp=recording)[-1]
    logits, mlp = prefill_and_sparse_mlp(tiny, prompt, "coarse", 0.25)
    assert logits.shape == (1, 100) and rel_err(logits[0], dense_logits) <= 1e-6
    k = n_kept(64, 0.25)
    assert [sorted(i.tolist()) for i in mlp.idx] == \
        [sorted(griffin_scores(z).argsort(descending=True)[:k].tolist()) for z in acts]
    mlp_idx = [i.tolist() for i in mlp.idx]                 # the next request refills the same object
    chosen, address = [], mlp.w_gate_up.data_ptr()
    original = sirius_min.CoarseMLP.select

    def spy(self, model, scores):
        chosen.append(original(self, model, scores).idx)
        return self

    monkeypatch.setattr(sirius_min.CoarseMLP, "select", spy)
    res = sirius(tiny, prompt, 30, sparsity="coarse", keep=0.25, period=4)
    assert len(res.advances) >= 3 and len(chosen) == 1                 # once a request, not once a period
    assert all(torch.equal(a, b) for a, b in zip(chosen[0], [torch.tensor(i) for i in mlp_idx]))
    _, another = prefill_and_sparse_mlp(tiny, other, "coarse", 0.25)
    assert any(a.tolist() != b for a, b in zip(another.idx, mlp_idx))
    # Every request's slices are written into the same buffers: a captured graph reads them in place.
    assert another is mlp and another.w_gate_up.data_ptr() == address
    assert torch.equal(another.w_down[0], tiny.layers[0].w_down[another.idx[0]])


# --- the fast paths against sirius_reference ------------------------------------------------------------

@pytest.mark.parametrize("strict", [False, True], ids=["threshold", "strict"])
@pytest.mark.parametrize("sparsity, keep, plan", [("fine", 0.25, "gather"), ("fine", 0.25, "gather_down"),
                                                  ("fine", 0.25, "mask"), ("fine", 0.75, None),
                                                  ("coarse", 0.5, None)])
def test_the_fast_paths_are_the_reference(tiny, monkeypatch, sparsity, keep, plan, strict):
    """On the tiny Llama, greedy: sirius() at w = 1 with each of fine_mlp's plans forced (None: the plan
    it takes, mask at keep 0.75) and with the sliced CoarseMLP gives sirius_reference's tokens and
    advances, with drafts rejected along the way (so the sparse MLP decides something). A strict tree
    (w = 3) gives the strict reference's tokens: dense greedy decoding."""
    if plan is not None:
        monkeypatch.setattr(kernels, "fine_plan", lambda *args: plan)
    prompt, options = torch.arange(10), dict(sparsity=sparsity, keep=keep, period=4, strict=strict)
    tokens, advances = sirius_min.sirius_reference(tiny, prompt, 30, **options)
    res = sirius(tiny, prompt, 30, **options)
    assert (res.tokens, res.advances) == (tokens, advances) and res.corrections > 0
    if strict:
        assert sirius(tiny, prompt, 30, width=3, **options).tokens == tokens


# --- the loop on SmolLM2 -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dense(smollm, prompts):
    """Dense greedy answers (48 tokens) to the first three prompts: what the lossless cases must match."""
    return [generate(smollm[0], p, 48).tokens for p in prompts[:3]]


@pytest.fixture(scope="module")
def fine_answers(smollm, prompts):
    """Sirius's answers (fine, keep 0.5, K = 8, w = 1; 48 tokens) to the first three prompts."""
    return [sirius(smollm[0], p, 48, sparsity="fine", keep=0.5, period=8) for p in prompts[:3]]


def fine_mlp_by_hand(x, layer, k):
    """The reference's fine-sparse MLP, each row its own top k by |SiLU(gate)| (tests/test_run.py's q)."""
    return sirius_min.reference_mlp(layer, x, k=k)[0]


@pytest.mark.parametrize("sparsity", ["fine", "coarse"])
def test_width_one_is_the_reference(smollm, prompts, fine_answers, sparsity):
    """w = 1 on SmolLM2, the paper's rule: sirius() is sirius_reference, token for token and period for
    period (fine: the gather plan, keep 0.5 < GATHER_BELOW; coarse: the sliced CoarseMLP)."""
    model, prompt = smollm[0], prompts[0]
    res = fine_answers[0] if sparsity == "fine" else sirius(model, prompt, 48, sparsity="coarse", period=8)
    tokens, advances = sirius_min.sirius_reference(model, prompt, 48, sparsity=sparsity, keep=0.5, period=8)
    assert res.tokens == tokens and len(tokens) == 48
    assert res.advances == advances and res.corrections > 0


@pytest.mark.parametrize("sparsity, width", [("fine", 2), ("coarse", 4)])
def test_strict_tree_is_dense_greedy(smollm, prompts, dense, sparsity, width):
    """Strict acceptance keeps a draft only if it is the full model's argmax: any width then reproduces dense
    greedy decoding (up to floating-point near-ties between passes of different lengths)."""
    model, _ = smollm
    periods = Trace()
    for prompt, reference in zip(prompts[:2], dense):
        res = sirius(model, prompt, 32, sparsity=sparsity, keep=0.5, period=4, width=width, strict=True,
                     on_period=periods)
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

    def checked_period(model, mlp, t0, pos, **kw):
        nonlocal seq
        assert len(seq) == pos                                 # rolled back to exactly the verified length
        drafts, nxt, nxt_tensor = original(model, mlp, t0, pos, **kw)
        seq = seq + [int(t0)] + drafts
        fresh(torch.tensor(seq), 0)
        L = len(seq)
        (k, v), (fresh_k, fresh_v) = kv(model), kv(fresh)
        checks.append(max(rel_err(k[:, :, :L], fresh_k[:, :, :L]), rel_err(v[:, :, :L], fresh_v[:, :, :L])))
        return drafts, nxt, nxt_tensor

    monkeypatch.setattr(sirius_min, "sirius_period", checked_period)
    res = sirius(model, prompt, 24, sparsity=sparsity, keep=0.5, period=6, width=width)
    assert len(checks) == len(res.advances) >= 3
    assert len(seq) - len(prompt) - len(res.advances) > 0      # drafts were kept: slots had to be gathered
    verified = seq[len(prompt):]                                 # the last window may run past the budget
    assert verified[:len(res.tokens)] == res.tokens[:len(verified)]
    assert max(checks) <= 1e-4


@pytest.mark.parametrize("sparsity", ["fine", "coarse"])
def test_keeping_every_neuron_accepts_every_draft(smollm, prompts, dense, sparsity):
    """keep = 1: the sparse model is the full one, so every draft is accepted: AAL = K over the counted
    periods, and the output is dense greedy."""
    model, _ = smollm
    res = sirius(model, prompts[0], 33, sparsity=sparsity, keep=1.0, period=16)
    assert res.tokens == dense[0][:33]
    assert res.advances == [16, 16] and res.aal == 16 and res.effective_density == 1.0


def test_sparsity_hurts_and_sirius_repairs(smollm, prompts, dense, fine_answers):
    """Full-model NLL of the answers (how plausible the full model finds them): dense <= Sirius < sparse,
    Sirius recovering >= 60% of the way from sparse to dense, with an AAL above 4 of 8."""
    model, _ = smollm
    nll = {"dense": [], "sparse": [], "sirius": []}
    for prompt, reference, res in zip(prompts, dense, fine_answers):
        for name, tokens in [("dense", reference), ("sirius", res.tokens),
                             ("sparse", generate(model, prompt, 48, sparsity="fine", keep=0.5).tokens)]:
            nll[name].append(full_model_nll(model, prompt, tokens))
    mean = {k: sum(v) / len(v) for k, v in nll.items()}
    recovered = (mean["sparse"] - mean["sirius"]) / (mean["sparse"] - mean["dense"])
    aal = sum(res.aal for res in fine_answers) / len(fine_answers)
    print(f"mean full-model NLL {mean}, recovered {recovered:.0%}, AAL {aal:.2f}/8")
    assert mean["dense"] <= mean["sirius"] < mean["sparse"]
    assert recovered >= 0.6 and aal > 4


def test_full_model_nll_by_hand(tiny):
    """full_model_nll is the mean of -log p(token | everything before it), each from its own causal pass."""
    prompt, tokens = torch.tensor([5, 6, 7]), [8, 9, 10]
    by_hand = []
    for i, t in enumerate(tokens):
        seq = torch.cat([prompt, torch.tensor(tokens[:i], dtype=torch.long)])
        by_hand.append(-float(torch.log_softmax(tiny(seq, 0)[-1].double(), -1)[t]))
    assert full_model_nll(tiny, prompt, tokens) == pytest.approx(sum(by_hand) / 3, rel=1e-5)


# --- the contract: a minimal stand-in model ----------------------------------------------------------

class StandIn:
    """The smallest model sirius_min can drive, written only against its `Model` contract: copy this shape
    to plug in your own model. An embedding plus a position signal, a "cache" of one vector per slot that
    each token averages over the slots it may see (attention without weights), one SwiGLU MLP (the seam the
    sparse models replace) and an unembedding."""

    def __init__(self, vocab=16, h=8, D=32, max_seq_len=64, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.cfg = SimpleNamespace(hidden_size=h, intermediate_size=D, num_hidden_layers=1, vocab_size=vocab,
                                   num_attention_heads=1, num_key_value_heads=1, head_dim=h,
                                   tie_word_embeddings=False)
        self.max_seq_len = max_seq_len
        self.layers = [MLPWeights(w_gate_up=torch.randn(h, 2 * D, generator=g) / h ** 0.5,
                                  w_down=torch.randn(D, h, generator=g) / D ** 0.5)]
        self.embed, self.unembed = torch.randn(vocab, h, generator=g), torch.randn(h, vocab, generator=g)
        self.cache = torch.zeros(max_seq_len, h)

    def __call__(self, tokens, start_pos, mlp=None, *, positions=None, mask=None, last_only=False):
        T, end = len(tokens), start_pos + len(tokens)
        if positions is None:
            positions = torch.arange(start_pos, end)
        if mask is None:
            mask = torch.ones(T, end, dtype=torch.bool).tril(start_pos)       # causal
        x = self.embed[tokens] + torch.sin(positions[:, None] * torch.arange(1, self.cfg.hidden_size + 1))
        self.cache[start_pos:end] = x
        x = x + (mask.float() @ self.cache[:end]) / mask.sum(-1, keepdim=True)
        x = x + (mlp(0, x) if mlp is not None else dense_mlp(x, self.layers[0]))
        logits = x @ self.unembed
        return logits[-1:] if last_only else logits

    def move_kv(self, slots, start):
        self.cache[start:start + len(slots)] = self.cache[slots]


@pytest.mark.parametrize("sparsity", ["fine", "coarse"])
@pytest.mark.parametrize("width", [1, 3])
def test_sirius_runs_on_a_model_written_to_the_contract(sparsity, width):
    """Strict Sirius on the stand-in is its own dense greedy decoding, chain and tree. The paper's rule,
    checked on a fresh causal pass over its answer: every kept draft has p >= 0.1 at 0.6 where it stands,
    every token of the full model's is its argmax there, and some draft was kept that the full model would
    not have written. Both against sirius_reference: strict, its tokens at any width; the paper's rule, a
    chain's tokens and advances."""
    model, prompt = StandIn(), torch.tensor([1, 2, 3, 4])
    dense = generate(model, prompt, 40).tokens
    strict = sirius(model, prompt, 40, sparsity=sparsity, keep=0.25, period=4, width=width, strict=True)
    assert strict.tokens == dense and strict.corrections > 0
    lossy = sirius(model, prompt, 40, sparsity=sparsity, keep=0.25, period=4, width=width)
    z = model(torch.cat([prompt, torch.tensor(lossy.tokens)]), 0).double()[len(prompt) - 1:-1]  # before each
    p = torch.softmax(z / 0.6, -1)[torch.arange(40), lossy.tokens]
    full = torch.tensor(lossy.from_full)
    assert (p[~full] >= 0.1).all() and (z[full].argmax(-1) == torch.tensor(lossy.tokens)[full]).all()
    assert (z[~full].argmax(-1) != torch.tensor(lossy.tokens)[~full]).any()           # lossy: not dense
    options = dict(sparsity=sparsity, keep=0.25, period=4)
    assert strict.tokens == sirius_min.sirius_reference(model, prompt, 40, strict=True, **options)[0]
    if width == 1:
        assert (lossy.tokens, lossy.advances) == sirius_min.sirius_reference(model, prompt, 40, **options)


# --- host synchronisations: one per period, one per token --------------------------------------------

SYNCING = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy")


@pytest.fixture
def syncs(monkeypatch):
    """Counts the calls that make the host wait for the device: reading a tensor's value (item, tolist,
    int(), bool(), ...), nonzero (its size depends on the data), and torch.tensor (a copy from the host)."""
    counts = {}

    def spy(name, real):
        def call(*args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            return real(*args, **kwargs)
        return call

    for name in SYNCING:
        monkeypatch.setattr(torch.Tensor, name, spy(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch, "tensor", spy("torch.tensor", torch.tensor))
    return counts


@pytest.mark.parametrize("sparsity, width, strict, temperature, top_p",
                         [("fine", 1, False, 0.0, 1.0), ("coarse", 3, False, 0.0, 1.0),
                          ("fine", 2, True, 0.0, 1.0), ("coarse", 1, True, 0.8, 1.0),
                          ("fine", 1, False, 0.8, 1.0),
                          ("coarse", 1, True, 0.8, 0.9), ("fine", 1, False, 0.8, 0.9)])
def test_one_host_sync_per_period(tiny, syncs, sparsity, width, strict, temperature, top_p):
    """sirius() waits for the device once for the first token and once per period: the packed read-back.
    Sampled with top-p < 1 too: the nucleus cut runs on the device."""
    prompt = torch.arange(10)
    res = sirius(tiny, prompt, 40, sparsity=sparsity, keep=0.5, period=6, width=width, strict=strict,
                 temperature=temperature, top_p=top_p, generator=torch.Generator().manual_seed(0))
    assert len(res.advances) >= 3
    assert syncs == {"__int__": 1, "tolist": len(res.advances)}


@pytest.mark.parametrize("sparsity", ["dense", "fine", "coarse"])
def test_one_host_sync_per_token(tiny, syncs, sparsity):
    res = generate(tiny, torch.arange(10), 30, sparsity=sparsity, keep=0.5)
    assert syncs == {"__int__": len(res.tokens)} and len(res.tokens) == 30


# --- sampling ---------------------------------------------------------------------------------------

def test_top_p_never_leaves_the_nucleus():
    """Logits with probabilities .5, .3, .1, .06, .04 at T = 1: top_p .75 keeps the two likeliest (.5 + .3
    reach .75), renormalised to .625 / .375; thousands of samples land only there, in that proportion."""
    z = torch.log(torch.tensor([0.06, 0.5, 0.04, 0.3, 0.1]))
    sampling = Sampling(1.0, 0.75, torch.Generator().manual_seed(0))
    assert sirius_min.token_probs(z, sampling).tolist() == pytest.approx([0, 0.625, 0, 0.375, 0])
    draws = sirius_min.choose_token(z.expand(20000, -1), sampling)
    assert set(draws.tolist()) == {1, 3}
    assert float((draws == 1).float().mean()) == pytest.approx(0.625, abs=0.015)
    assert set(sirius_min.choose_token(z.expand(2000, -1), Sampling(1.0, 1.0, sampling.generator))
               .tolist()) == {0, 1, 2, 3, 4}                                          # top-p off: all of them


def p_by_a_fresh_pass(model, prompt, periods):
    """p(d_i) at 0.6 of each traced period's chosen drafts, computed here and not read from the trace: a
    causal pass of the full model (a twin, with its own cache) over the verified text and the period's
    window, its logits before each draft, softmax at 0.6 in float64. Checks each period starts where the
    verified text ends (t0 and the kept drafts of the periods before)."""
    fresh, verified, probs = twin(model), prompt.tolist(), []
    for p in periods:
        assert p.pos == len(verified)
        z = fresh(torch.tensor(verified + p.window), 0).double()[p.pos:-1]      # (K-1, V): before d_1, ..
        probs.append(torch.softmax(z / 0.6, -1)[torch.arange(len(z)), p.window[1:]].tolist())
        verified += p.window[:p.accepted + 1]
    return probs


def assert_the_papers_rule(model, prompt, periods, threshold=0.1, slack=1.0):
    """Each period kept exactly the drafts before the first with p < threshold (p by p_by_a_fresh_pass),
    within a factor `slack` (bf16 logits differ between a window pass and a causal pass)."""
    for p, probs in zip(periods, p_by_a_fresh_pass(model, prompt, periods), strict=True):
        assert p.rule == "threshold" and all(x >= threshold / slack for x in probs[:p.accepted]), probs
        assert p.accepted == len(probs) or probs[p.accepted] < threshold * slack, probs


def test_paper_rule_with_sampling_keeps_only_plausible_drafts(tiny):
    """The paper's rule with sampled drafts: every kept draft has p >= threshold at temperature 0.6 under the
    full model, and the first rejected one has less."""
    g, seen = torch.Generator().manual_seed(0), []
    for _ in range(4):
        periods = Trace()
        sirius(tiny, torch.arange(10), 40, sparsity="fine", keep=0.25, period=4, temperature=1.0, generator=g,
               on_period=periods)
        assert_the_papers_rule(tiny, torch.arange(10), periods)
        seen += [p.accepted for p in periods]
    assert min(seen) < 3 and max(seen) > 0


# Exact speculative sampling, checked statistically: under strict Sirius at temperature T the joint
# distribution of the first n = 4 tokens must be the full model's own. The first token comes from the prefill;
# the rest from periods of K = 3, whose accepted count a is 0 (a correction at once), 1 (a kept draft, then a
# rejection: the residual at the second node) or 2 (a bonus). Period 2 could never show the middle case. The
# reference is computed here, in float64, from the full script's logits: softmax(z / T) cut to the nucleus,
# and the product along each sequence; nothing of sirius_min's is used for it. A script of three tokens keeps
# the joint small (81 sequences); the sparse model is another random script, so drafts are often rejected.
# Pearson's chi-square at p = 0.001 with a fixed seed: a correct rule fails it for one seed in a thousand.

def chi_square_critical(df, z=3.09):
    """The chi-square quantile at p = 0.001 (z = 3.09), Wilson-Hilferty's approximation."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def three_token_script(seed):
    def script(context):
        g = torch.Generator().manual_seed(hash((seed, context)) % 2 ** 31)
        return 1.5 * torch.randn(3, generator=g)
    return script


def sampling_distribution(z, temperature, top_p):
    """By hand, in float64: softmax(z / T), then the smallest set of likeliest tokens whose mass reaches
    top_p (ties: the lower id first), renormalised."""
    e = [math.exp(x / temperature) for x in z.double().tolist()]
    probs = [x / sum(e) for x in e]
    order, kept, mass = sorted(range(len(probs)), key=lambda i: -probs[i]), [], 0.0
    for i in order:
        if mass >= top_p:
            break
        kept.append(i)
        mass += probs[i]
    return [probs[i] / mass if i in kept else 0.0 for i in range(len(probs))]


def chi_square(temperature, top_p, samples=2000, n=4, period=3):
    """Pearson's statistic of `samples` strict Sirius runs against the exact joint distribution of
    sampling the full model alone, the critical value it must stay under, and the accepted counts seen."""
    torch.set_num_threads(1)  # thousands of tiny runs: a second thread only waits (conftest restores it)
    full, g = three_token_script(1), torch.Generator().manual_seed(0)
    model = FakeModel(full, three_token_script(2), vocab=3)
    exact = {(): 1.0}
    for _ in range(n):
        exact = {seq + (t,): p * q for seq, p in exact.items()
                 for t, q in enumerate(sampling_distribution(full(tuple(PROMPT.tolist()) + seq), temperature,
                                                             top_p))}
    counts, accepted = {}, set()
    for _ in range(samples):
        seq = tuple(sirius(model, PROMPT, n, sparsity="fine", period=period, strict=True,
                           temperature=temperature, top_p=top_p, generator=g,
                           on_period=lambda **p: accepted.add(int(p["accepted"][p["chosen"]]))).tokens)
        counts[seq] = counts.get(seq, 0) + 1
    assert all(exact[s] > 0 for s in counts)                              # nothing impossible was sampled
    cells = [s for s, p in exact.items() if p * samples >= 5]             # rare sequences pooled into one
    observed = [counts.get(s, 0) for s in cells] + [samples - sum(counts.get(s, 0) for s in cells)]
    expected = [exact[s] * samples for s in cells] + [samples * (1 - sum(exact[s] for s in cells))]
    terms = [(o - e) ** 2 / e for o, e in zip(observed, expected) if e > 1e-9]   # the pool may be empty
    return sum(terms), chi_square_critical(len(terms) - 1), accepted


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.8)])
def test_strict_sampling_is_exact_speculative_sampling(temperature, top_p):
    stat, critical, accepted = chi_square(temperature, top_p)
    print(f"chi-square {stat:.1f}, critical value (p = 0.001) {critical:.1f}")
    assert accepted == {0, 1, 2}          # a correction at once, after a kept draft, and a bonus all occur
    assert stat < critical


RIGHT_NEXT_TOKEN_DISTRIBUTION = sirius_min.next_token_distribution


def residual_from_the_first_draft(p, q, accepted):
    """A planted bug: the residual max(0, p - q) at the rejection's node, but with the first draft's q
    wherever the rejection is. Right when a = 0 (and a bonus is p itself), so period 2 cannot see it."""
    return RIGHT_NEXT_TOKEN_DISTRIBUTION(p, q[:1].expand_as(q), accepted)


@pytest.mark.parametrize("wrong, factor", [
    (lambda p, q, accepted: p.index_select(0, accepted.view(1))[0], 3),   # p itself, not the residual
    (residual_from_the_first_draft, 1)])
def test_the_exactness_check_catches_a_wrong_rule(monkeypatch, wrong, factor):
    """The same check fails for plausible mistakes: after a rejection, sampling the replacement from the
    full model's p instead of the residual over-weights the tokens the sparse model likes; the residual
    taken with the wrong draft's q is wrong only after a kept draft (0 < a < K - 1)."""
    monkeypatch.setattr(sirius_min, "next_token_distribution", wrong)
    stat, critical, _ = chi_square(1.0, 1.0)
    print(f"wrong rule: chi-square {stat:.1f}, critical value (p = 0.001) {critical:.1f}")
    assert stat > factor * critical


BF16_SLACK = 1.1  # p within 10 % (logits 0.057 apart at 0.6): bf16 passes of other lengths round otherwise


def test_sirius_in_bfloat16(tmp_path):
    """The whole loop in bf16 (the GPU default), chain and tree. Strict mode gives the model's own greedy
    decoding up to a near-tie: where the two first differ, the dense model's logits of the two tokens are
    within a few bf16 rounding steps (2^-8 of the logits' scale each) of each other. The paper's rule gains
    more than one token per period, and each period keeps exactly the drafts before the first one whose p
    (at 0.6, from a fresh causal pass of the bf16 model, within BF16_SLACK) is below the threshold."""
    from conftest import TINY_CONFIG, write_checkpoint
    from checkpoint import load_model
    model = load_model(write_checkpoint(tmp_path, TINY_CONFIG), 128, torch.bfloat16)
    prompt = torch.arange(10)
    dense = generate(model, prompt, 30).tokens
    for sparsity, width in (("fine", 1), ("coarse", 3)):
        strict = sirius(model, prompt, 30, sparsity=sparsity, keep=0.25, period=4, width=width, strict=True)
        assert strict.corrections > 0
        differ = next((i for i, (x, y) in enumerate(zip(strict.tokens, dense)) if x != y), None)
        if differ is not None:
            z = model(torch.cat([prompt, torch.tensor(dense[:differ])]), 0)[-1].float()
            gap = abs(float(z[dense[differ]] - z[strict.tokens[differ]]))
            assert gap <= 4 * 2 ** -8 * float(z.abs().max()), f"not a near-tie at {differ}: {gap}"
        periods = Trace()
        lossy = sirius(model, prompt, 30, sparsity=sparsity, keep=0.25, period=4, width=width,
                       on_period=periods)
        assert lossy.aal > 1
        assert_the_papers_rule(model, prompt, periods, slack=BF16_SLACK)

"""Captured decoding (graphs.py), checked on a CPU under a model of CUDA graph trees' rules: what a graph
copies on every replay, that no graph reads memory an earlier iteration owned, that nothing compiles again
once warm, that no graph waits for the host, that the tokens are eager's (for the chain, the reference's),
and that a KV-cache write stays in place.

graphs.InputLog is a torch.compile backend that runs each graph as it is and applies the rules of torch's
torch/_inductor/cudagraph_trees.py (see its docstring): every pass begins an iteration (graphs.Captured marks
it), inputs other than weights, buffers and static tensors are copied before each replay, and the outputs of
an earlier iteration are freed (a graph reading one raises). The same capture code runs under Inductor on a
GPU: only the backend differs.
"""
import dataclasses

import pytest
import torch
import torch._dynamo

import bench
import graphs
import sirius_min
from model import Llama
from sirius_min import generate, judge_period, sirius

PROMPTS = (torch.arange(1, 12), torch.arange(7, 30))   # two requests: other lengths, other positions
CASES = [  # (name, method, options); K = 8 for Sirius
    ("dense", generate, dict(sparsity="dense")),
    ("coarse", generate, dict(sparsity="coarse")),
    ("fine", generate, dict(sparsity="fine")),
    ("chain, threshold", sirius, dict(sparsity="fine", period=8)),
    ("chain, strict", sirius, dict(sparsity="coarse", period=8, strict=True)),
    ("tree w=4, threshold", sirius, dict(sparsity="coarse", period=8, width=4)),
    ("tree w=4, strict", sirius, dict(sparsity="fine", period=8, width=4, strict=True)),
]


def first_layers(model, n):
    """A real checkpoint cut to its first n layers (its own weights, shapes and tied head): a model whose
    graphs trace in seconds."""
    cut = Llama(dataclasses.replace(model.cfg, num_hidden_layers=n), 128)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("layers.")
             or int(k.split(".")[1]) < n}
    cut.load_state_dict(state)
    return cut


@pytest.fixture(scope="module", params=["SmolLM2, 2 layers", "8B stand-in, 2 layers"])
def model(request, smollm):
    if request.param.startswith("SmolLM2"):
        return first_layers(smollm[0], 2)
    shape = bench.llama3_8b_config(hidden_size=256, intermediate_size=896, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, vocab_size=4096)
    model = bench.random_llama(shape, "cpu", torch.float32, max_seq_len=128)
    with torch.no_grad():       # peaked next-token distributions: the paper's rule then keeps some drafts
        model.lm_head.mul_(15)
    return model


@pytest.fixture(scope="module")
def logged(model):
    """Every case, two requests each, through one captured model: the second round (other prompts, more
    periods) may compile nothing. Returns the log and, per case, the captured results."""
    log, results = graphs.InputLog(), {}
    captured = graphs.capture(model, log)
    for round_, (prompt, n) in enumerate(zip(PROMPTS, (24, 40))):
        with torch._dynamo.config.patch(error_on_recompile=round_ == 1):
            for name, method, kw in CASES:
                results.setdefault(name, []).append(method(captured, prompt, n, **kw))
        if round_ == 0:
            warm = log.graphs
    assert log.graphs == warm                        # nothing new on the second request
    return log, results


def test_every_replay_copies_little_and_reads_no_freed_memory(logged):
    """At most 64 KB copied into a graph per replay (token ids, positions, a tree's parents: int64 vectors
    no longer than a window); weights, KV cache, coarse slices and masks are read in place; no graph input
    was made in an earlier iteration; no graph waits for the host."""
    log, _ = logged
    assert log.stale_reads == [] and log.host_reads == []
    assert max(size for _, size, _ in log.calls) <= 64 * 1024
    copied = {d for _, _, inputs in log.calls for d in inputs}
    # a position (), a step's 1 or w = 4 tokens or positions, a window's K = 8 or 1 + 7·4 = 29 nodes
    assert copied <= {"() torch.int64", *(f"({n},) torch.int64" for n in (1, 4, 8, 29))}, copied


def test_captured_tokens_are_the_reference_s(model, logged):
    """The graphs decode what eager code decodes: plain decoding and the chain as sirius_reference writes
    the period (threshold and strict), the tree as the eager tree (same advances too), strict trees as
    dense greedy up to near-ties (none at these sizes). Under the paper's rule drafts are both kept and
    rejected: the comparison is not between two runs that ignore the drafts."""
    _, results = logged
    threshold = [r for name, _, kw in CASES if "threshold" in name for r in results[name]]
    assert any(max(r.advances) > 1 for r in threshold) and any(r.corrections > 0 for r in threshold)
    for name, method, kw in CASES:
        for (prompt, n), got in zip(zip(PROMPTS, (24, 40)), results[name]):
            if method is generate:
                assert got.tokens == generate(model, prompt, n, **kw).tokens, name
                continue
            if kw.get("width", 1) == 1:
                tokens, advances = sirius_min.sirius_reference(model, prompt, n, **kw)
                assert (got.tokens, got.advances) == (tokens, advances), name
            else:
                eager = sirius(model, prompt, n, **kw)
                assert (got.tokens, got.advances) == (eager.tokens, eager.advances), name
                if kw.get("strict"):
                    assert got.tokens == generate(model, prompt, n).tokens, name


def test_a_read_across_iterations_is_caught(tiny, monkeypatch):
    """The log can fail for the right reason. Before any cudagraph_mark_step_begin() every call of a compiled
    function begins an iteration, so the judge compiled as a graph of its own after the verification pass
    (rather than inside graphs.Captured.verify) frees the pass's logits and then reads them: InputLog raises
    as CUDA graph trees do, and names the input; an eager read finds them overwritten."""
    from torch._inductor.cudagraph_trees import MarkStepBox
    monkeypatch.setattr(MarkStepBox, "mark_step_counter", 0)             # no mark made yet
    log = graphs.InputLog()
    captured = graphs.capture(tiny, log)
    judge = torch.compile(judge_period, backend=log, fullgraph=True)
    logits0, mlp = sirius_min.prefill_and_sparse_mlp(tiny, torch.arange(10), "fine", 0.5)
    tree = sirius_min.draft_tree(tiny, mlp, logits0.argmax(-1), 10, 4, 1, sirius_min.Sampling())
    logits = captured.graph(tree.tokens, captured.slot_ids[10], None, None, None)   # verification, (4, V)
    rule = dict(period=4, width=1, rule="argmax", threshold=0.1, sampling=sirius_min.Sampling())
    with pytest.raises(RuntimeError, match="overwritten by a subsequent run"):
        judge(logits, tree, **rule)
    assert log.stale_reads == [(log.graphs - 1, ["(4, 100) torch.float32"])]
    assert logits.isnan().all()                                           # what an eager read would see


def test_no_graph_waits_for_the_host(tiny):
    """The same check that finds no host read above flags a function that reads the device (planted: a
    slice as long as a, in the judge)."""
    log = graphs.InputLog()

    def reads_the_host(logits, tree, **rule):
        packed = judge_period(logits, tree, **rule)[0]
        return packed[: int(packed[1]) + 3]
    logits0, mlp = sirius_min.prefill_and_sparse_mlp(tiny, torch.arange(10), "fine", 0.5)
    tree = sirius_min.draft_tree(tiny, mlp, logits0.argmax(-1), 10, 4, 1, sirius_min.Sampling())
    rule = dict(period=4, width=1, rule="argmax", threshold=0.1, sampling=sirius_min.Sampling())
    torch.compile(reads_the_host, backend=log, fullgraph=True)(tiny(tree.tokens, 10), tree, **rule)
    assert len(log.host_reads) >= 1


def test_the_log_counts_what_a_graph_would_copy(tiny):
    """Coarse slices held as plain tensors made for the request (not CoarseMLP's buffers) are inputs a CUDA
    graph copies on every replay, and the log names them: four fp32 slices beside the token and position."""
    from kernels import dense_mlp, slice_mlp

    class FreshSlices:
        def __init__(self, model, idx):
            self.sliced = [slice_mlp(layer, i) for layer, i in zip(model.layers, idx)]

        def __call__(self, i, x):
            return dense_mlp(x, self.sliced[i])

    log = graphs.InputLog()
    graphs.capture(tiny, log)(torch.tensor([5]), 10, FreshSlices(tiny, [torch.arange(0, 64, 2)] * 2))
    h, k = 32, 32                                                          # k = 32 of D = 64
    _, size, inputs = log.calls[-1]
    assert inputs == ["(1,) torch.int64", "() torch.int64",
                      *[f"({h}, {2 * k}) torch.float32", f"({k}, {h}) torch.float32"] * 2]
    assert size == 2 * (h * 2 * k + k * h) * 4 + 2 * 8


def test_a_compiled_pass_writes_only_its_slots():
    """Inductor (its CPU backend: whether a write is in place is decided by its device-independent graph
    passes, only code generation differs) compiles the one-token step so that it
    writes T slots of each layer's KV cache in place: no loop in its generated code runs over a whole cache
    (a copy-back of a rebuilt cache would), at two cache sizes."""
    import re

    from torch._inductor.utils import run_and_get_code

    shape = bench.llama3_8b_config(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=64)
    for slots in (64, 96):
        model = bench.random_llama(shape, "cpu", torch.float32, max_seq_len=slots)
        step = torch.compile(model, **graphs.compile_options("inductor") | dict(mode=None))
        _, code = run_and_get_code(step, torch.tensor([3]), torch.tensor(5))
        bounds = [int(n) for n in re.findall(r"<static_cast<int64_t>\((\d+)L\);", "\n".join(code))]
        cache = shape.num_key_value_heads * slots * shape.head_dim                 # one layer's keys
        assert bounds and max(bounds) < cache, (slots, max(bounds))

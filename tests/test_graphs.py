"""Captured decoding (graphs.py), proven on a CPU: what a CUDA graph would copy on every replay, that nothing
compiles again once warm, that the device part of a period has no host read, and the same tokens as eager.

graphs.InputLog is a torch.compile backend that runs each graph as it is and logs the inputs a CUDA graph
would copy before a replay (neither a Parameter, nor marked static, nor an earlier graph's output). The first
test names every such input, graph by graph: token ids, the 0-dim position, RoPE positions, a tree's tokens
and parents, all int64 and none longer than a pass (at most 168 bytes a replay here). A copied weight, slice,
KV cache or mask would show up as a float or bool input the expected list lacks, however small the model.
"""
import pytest
import torch
import torch._dynamo

import graphs
import sirius_min
from kernels import dense_mlp, slice_mlp
from sirius_min import Sampling, draft_tree, generate, judge_period, sirius, tree_pass_args


def run_twice(tiny, method, **kw):
    """Two requests with one InputLog: a warm-up, then (no compiling allowed) a longer prompt at other
    positions, through more periods. Returns the log, the graphs the warm-up made, and both results."""
    log = graphs.InputLog()
    first = method(graphs.capture(tiny, log), torch.arange(10), 24, **kw)
    warm = log.graphs
    with torch._dynamo.config.patch(error_on_recompile=True):
        second = method(graphs.capture(tiny, log), torch.arange(3, 20), 40, **kw)
    return log, warm, first, second


def ids(n):
    """How InputLog describes a copied int64 vector of n token ids, RoPE positions or parents."""
    return f"({n},) torch.int64"


POS = "() torch.int64"           # the pass's start position: a 0-dim view into Captured.slot_ids
STEP = (ids(1), POS)             # the one-token step (plain decoding's, a chain's draft step)


@pytest.mark.parametrize("method, kw, copied", [
    (generate, dict(sparsity="dense"), {0: STEP}),
    (generate, dict(sparsity="coarse"), {0: STEP}),
    # the draft step; the verify window: 4 tokens, the position; the judge: the tree's tokens and parents
    (sirius, dict(sparsity="fine", period=4, width=1, strict=True), {0: STEP, 1: (ids(4), POS),
                                                                      2: (ids(4), ids(4))}),
    # + the tree's w-token step (tokens, position, RoPE positions); the window is 1 + 3·3 = 10 nodes
    (sirius, dict(sparsity="coarse", period=4, width=3, strict=True), {0: STEP, 1: (ids(3), POS, ids(3)),
                                                                        2: (ids(10), POS, ids(10)),
                                                                        3: (ids(10), ids(10))}),
])
def test_every_graph_reads_in_place_and_none_compiles_again(tiny, method, kw, copied):
    """Each graph copies exactly the int64 inputs listed (weights, slices, KV cache and masks are read in
    place), the second request compiles nothing, no graph reads the host, and the tokens are eager's."""
    log, warm, first, second = run_twice(tiny, method, **kw)
    assert warm == log.graphs == len(copied)                              # nothing new on the second request
    assert {(number, tuple(inputs)) for number, _, inputs in log.calls} == set(copied.items())
    assert max(size for _, size, _ in log.calls) <= 168                   # bytes copied per replay
    assert log.host_reads == []
    eager = [method(tiny, p, n, **kw).tokens for p, n in ((torch.arange(10), 24), (torch.arange(3, 20), 40))]
    assert [first.tokens, second.tokens] == eager                         # and the graphs decode the same
    if method is sirius:
        assert len(second.advances) >= 3 and second.corrections > 0         # several periods, and corrections


def test_the_log_counts_what_a_graph_would_copy(tiny):
    """The check above can fail: coarse slices held as plain tensors made for the request (the design
    before CoarseMLP's buffers) are inputs a CUDA graph copies on every replay, and the log names them. The
    one-token step then copies 24,592 bytes, its 16 plus four fp32 slices, which neither the expected list
    nor the 168-byte bound above admits."""
    class FreshSlices:
        def __init__(self, model, idx):
            self.sliced = [slice_mlp(layer, i) for layer, i in zip(model.layers, idx)]

        def __call__(self, i, x):
            return dense_mlp(x, self.sliced[i])

    log = graphs.InputLog()
    model = graphs.capture(tiny, log)
    model(torch.tensor([5]), 10, FreshSlices(tiny, [torch.arange(0, 64, 2)] * 2))      # k = 32 of D = 64
    h, k, layers = 32, 32, 2
    _, size, inputs = log.calls[-1]
    assert inputs == [*STEP, *[f"({h}, {2 * k}) torch.float32", f"({k}, {h}) torch.float32"] * layers]
    assert size == layers * (h * 2 * k + k * h) * 4 + 2 * 8 == 24592      # fp32 slices, token, position


def test_no_graph_waits_for_the_host(tiny):
    """A fine tree's graphs under the threshold rule (draft steps, verify window, judge) are free of values
    the host must wait for (test_every_graph_reads_in_place_and_none_compiles_again checks plain decoding and
    the argmax rule, on a fine chain and a coarse tree); the same check flags a function that reads the
    device (planted: a slice as long as a)."""
    log = graphs.InputLog()
    sirius(graphs.capture(tiny, log), torch.arange(10), 24, sparsity="fine", period=4, width=3)
    assert log.graphs == 4 and log.host_reads == []

    def reads_the_host(logits, tree, **kw):
        packed = judge_period(logits, tree, **kw)[0]
        return packed[: int(packed[1]) + 3]
    logits0, mlp = sirius_min.prefill_and_sparse_mlp(tiny, torch.arange(10), "fine", 0.5)
    tree = draft_tree(tiny, mlp, logits0.argmax(-1), 10, 4, 3, Sampling())
    logits = tiny(tree.tokens, 10, **tree_pass_args(tree.sees, 10, range(len(tree.tokens)), tree.depth, 3))
    kw = dict(period=4, width=3, rule="argmax", threshold=0.1, sampling=Sampling())
    torch.compile(reads_the_host, backend=log, fullgraph=True)(logits, tree, **kw)
    assert len(log.host_reads) >= 1

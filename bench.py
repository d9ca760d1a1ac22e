"""The measurements: `python run.py eval` (accuracy, AAL, effective density: the paper's Table 2 columns)
and `python run.py bench` (decode speed beside the ideal bytes-read ratios, and Sirius's cost projected at
the Llama-3-8B shape on a GPU that holds it, else one layer of it (--quick: a small stand-in), from
measured parts). Accuracy and speed
share this file, the command line and the generation code (bench decodes greedily, eagerly, EOS ignored).
"""
import json
import math
import os
import random
import re
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

import kernels
from model import Llama, LlamaConfig
from folder import UsageError, encode, load_weights, open_model_folder, read_text
from sirius_min import (Sampling, Tree, average_advance_length, effective_density, generate,
                        prefill_and_sparse_mlp, sirius, sirius_period, tree_pass_args, verify_period)

def full_model_nll(model, prompt, tokens):
    """Mean negative log-likelihood of `tokens` after `prompt` under the full model: how plausible the
    full model finds a continuation, whoever wrote it (lower is closer to what it would have said)."""
    sequence = torch.cat([prompt, torch.tensor(tokens, device=prompt.device)])
    logits = model(sequence[:-1], 0)[len(prompt) - 1:]                     # the predictions of `tokens`
    return float(torch.nn.functional.cross_entropy(logits.float(), sequence[len(prompt):]))


# --- eval: the paper's Table 2 on a task with checkable answers ------------------------------------

# Worked examples shown before every question (as earlier chat turns), in GSM8K's "The answer is N" style; the
# demo shows them too.
FEW_SHOT = [("What is 12 + 7?", "12 + 7 = 19. The answer is 19."),
            ("What is 15 - 6?", "15 - 6 = 9. The answer is 9."),
            ("What is 4 times 3?", "4 * 3 = 12. The answer is 12."),
            ("Tom has 7 cards. Tom buys 4 more cards. How many cards does Tom have now?",
             "Tom has 7 + 4 = 11 cards. The answer is 11.")]

NAMES = ["Sara", "Ben", "Ana", "Omar", "Lily", "Leo", "Mia", "Sam"]
ITEMS = ["apples", "pencils", "stickers", "marbles", "cookies", "books", "shells", "coins"]


def arithmetic_task(n=200, seed=0):
    """Seeded problems for a 135M model (SmolLM2 solved 0.600 of the first 40 in the README's run): +, - and
    x of small numbers, bare or as a one-line story. The answer is checked as a number (extract_number)."""
    rng, problems = random.Random(seed), []
    for i in range(n):
        a, b = rng.randint(2, 20), rng.randint(2, 9)
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        problems.append([(f"What is {a} + {b}?", a + b), (f"What is {a + 10} - {b}?", a + 10 - b),
                         (f"What is {b} times {a % 8 + 2}?", b * (a % 8 + 2)),
                         (f"{name} has {b} {item}. {name} buys {a} more {item}. How many {item} does {name} "
                          f"have now?", a + b)][i % 4])
    return problems


def load_gsm8k(path):
    """GSM8K's jsonl: {"question": ..., "answer": "... #### 42"} per line, UTF-8 (refused naming the line).
    JSON Lines ends a line at a newline (or CR LF) only: U+2028 and U+0085, which str.splitlines also
    breaks at, are text inside a question. A leading byte-order mark is dropped, as from a prompt."""
    problems = []
    text = read_text(path, UsageError).removeprefix("\ufeff")
    for n, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not {"question", "answer"} <= row.keys():
            raise UsageError(f"{path}:{n}: needs the fields 'question' and 'answer'")
        if not isinstance(row["question"], str) or not row["question"].strip():
            raise UsageError(f"{path}:{n}: the question must be a non-empty string")
        answer = extract_number(str(row["answer"])) if "####" in str(row["answer"]) else None
        if answer is None:
            raise UsageError(f"{path}:{n}: the answer does not end in '#### <number>'")
        problems.append((row["question"], answer))
    if not problems:
        raise UsageError(f"{path}: no questions in the file")
    return problems


def extract_number(text):
    """The answer a model gave: the last number after its last '####' (None if none follows it); with no
    '####', the last number in its text."""
    numbers = re.findall(r"-?\d+(?:\.\d+)?", text.split("####")[-1].replace(",", ""))
    return float(numbers[-1]) if numbers else None


def check_out_path(out) -> Path:
    """--out, checked before an eval that may run for an hour: a regular file or none yet, in a folder where
    a file can be created (tried: permissions alone do not tell, e.g. for root or a read-only disk). Returns
    the path to write; behind a symbolic link, its target."""
    p = Path(out).resolve()
    if not out or p.is_dir():
        raise UsageError(f"--out {out!r}: expected a file name, not a folder")
    if p.exists() and not p.is_file():  # a device (/dev/full), a FIFO: replacing it is not writing it
        raise UsageError(f"--out {out}: not a regular file")
    if not p.parent.is_dir():
        raise UsageError(f"--out {out}: its folder does not exist")
    if p.exists() and not os.access(p, os.W_OK):
        raise UsageError(f"--out {out}: not writable")
    try:
        open(temp_beside(p), "x").close()
    except OSError as e:
        raise UsageError(f"--out {out}: cannot write in {p.parent} ({e.strerror})") from None
    temp_beside(p).unlink()
    return p


def temp_beside(out: Path) -> Path:
    return out.with_name(f".{out.name}.{os.getpid()}.tmp")  # this process's own: runs at once do not meet


def write_json(report, out: Path):
    """The report into a temporary file beside `out`, renamed over it once complete: `out` is whole or
    untouched, whatever stops the writing (a full disk, a signal)."""
    try:  # NaN (no period counted) is written as null: bare NaN is not JSON
        temp_beside(out).write_text(json.dumps(nan_to_null(report), indent=2) + "\n", encoding="utf-8")
        os.replace(temp_beside(out), out)
    except OSError as e:
        raise UsageError(f"--out {out}: {e.strerror or e}") from None
    finally:
        temp_beside(out).unlink(missing_ok=True)


def decoding_options(args):
    """generate()'s and sirius()'s sampling options for one method, in the demo or a whole eval: a
    generator of its own, seeded, so each method's samples reproduce whatever else runs."""
    return dict(temperature=args.temperature, top_p=args.top_p,
                generator=torch.Generator(args.device).manual_seed(args.seed))


def evaluate(args):
    out = check_out_path(args.out) if args.out is not None else None
    folder = open_model_folder(args)
    cfg, tok = folder.cfg, folder.tok
    problems = load_gsm8k(args.data) if args.data else arithmetic_task()
    problems = problems[:args.limit] if args.limit else problems
    prompts = [encode(args, folder, q, FEW_SHOT) for q, _ in problems]
    model = load_weights(args, cfg, max(len(p) for p in prompts))
    eos, n = folder.stop_ids, args.max_new_tokens
    settings = [(s, f) for s in args.sparsity for f in args.keep]
    runs = {"dense": lambda p, o=decoding_options(args): generate(model, p, n, eos_ids=eos, **o)}
    for s, f in settings:  # each method its own options (o), made once: its generator runs through the eval
        runs[("CS", s, f)] = lambda p, s=s, f=f, o=decoding_options(args): generate(
            model, p, n, eos_ids=eos, sparsity=s, keep=f, **o)
        for w in args.width:
            runs[("Sirius", s, f, w)] = lambda p, s=s, f=f, w=w, o=decoding_options(args): sirius(
                model, p, n, eos_ids=eos, sparsity=s, keep=f, period=args.period, width=w,
                threshold=args.threshold, strict=args.strict, **o)
    log = {m: [] for m in runs}  # per question: (correct, full-model NLL, Result)
    started = time.perf_counter()
    for i, ((_, answer), prompt) in enumerate(zip(problems, prompts), 1):
        for m, run in runs.items():
            res = run(prompt)
            log[m].append((extract_number(tok.decode(res.tokens)) == answer,
                           full_model_nll(model, prompt, res.tokens), res))
        elapsed, tty, last = time.perf_counter() - started, sys.stderr.isatty(), i == len(problems)
        if tty or last or i % max(1, len(problems) // 10) == 0:  # a pipe or a log gets a line per tenth
            left = elapsed / i * (len(problems) - i)
            print("\r" * tty + f"eval {i}/{len(problems)}, {elapsed:.0f} s, about {left:.0f} s left",
                  end="\n" if last or not tty else "", file=sys.stderr, flush=True)
    report = eval_report(log, settings, args)
    if out is not None:
        write_json(report, out)


def nan_to_null(x):
    if isinstance(x, (dict, list)):
        return {k: nan_to_null(v) for k, v in x.items()} if isinstance(x, dict) else list(map(nan_to_null, x))
    return None if isinstance(x, float) and math.isnan(x) else x


def eval_report(log, settings, args):
    """Print the paper's columns, one row per (sparsity, f, w), then quality beside dense; return a dict."""
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    acc = {m: mean([c for c, _, _ in rows]) for m, rows in log.items()}
    table, report = [], {"questions": len(log["dense"]), "period": args.period, "threshold": args.threshold,
                         "strict": args.strict, "temperature": args.temperature, "top_p": args.top_p,
                         "seed": args.seed, "full": acc["dense"], "rows": []}
    for s, f in settings:
        for w in args.width:
            results = [r for _, _, r in log[("Sirius", s, f, w)]]
            counted = [a for r in results for a in r.counted_advances]
            aal, d = average_advance_length(counted), results[0].density
            lost, cs, sir = acc["dense"] - acc[("CS", s, f)], acc[("CS", s, f)], acc[("Sirius", s, f, w)]
            row = dict(sparsity=s, keep=f, width=w, cs=cs, cs_density=d, sirius=sir, aal=aal,
                       periods=len(counted), effective_density=effective_density(d, args.period, aal),
                       recovered=(sir - cs) / lost if lost > 0 else float("nan"))
            report["rows"].append(row)
            table.append([s, f, w, f"{acc['dense']:.3f}", f"{cs:.3f}", f"{d:.3f}", f"{sir:.3f}",
                          f"{aal:.2f}/{args.period}", len(counted), f"{row['effective_density']:.3f}",
                          f"{row['recovered']:.0%}" if lost > 0 else "-"])
    sampled = f"sampled at T = {args.temperature}, top-p {args.top_p}, seed {args.seed}"
    print(f"\n{len(log['dense'])} questions, K = {args.period}, threshold = {args.threshold}"
          f"{', strict' if args.strict else ''}, {sampled if args.temperature > 0 else 'greedy'}; AAL counts "
          f"every period but each answer's last")
    print_table(["sparsity", "f", "w", "full", "CS", "CS density", "Sirius", "AAL", "periods", "eff. density",
                 "recovered"], table)
    name = lambda m: m if m == "dense" else " ".join(map(str, m))  # noqa: E731
    same = {m: mean([r.tokens == d.tokens for (_, _, r), (_, _, d) in zip(rows, log["dense"])])
            for m, rows in log.items()}
    nll = {m: mean([x for _, x, _ in rows]) for m, rows in log.items()}
    print()
    print_table(["method (sparsity, f, w)", "accuracy", "full-model NLL", "same as dense"],
                [[name(m), f"{acc[m]:.3f}", f"{nll[m]:.3f}", f"{same[m]:.0%}"] for m in log])
    report["methods"] = {name(m): {"accuracy": acc[m], "nll": nll[m], "same_as_dense": same[m]} for m in log}
    return report


def print_table(header, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for i, row in enumerate([header, *rows]):
        print("  ".join(f"{x:>{w}}" if j else f"{x:<{w}}" for j, (x, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))


# --- bench: measured speed beside the ideal (bytes read) ratio ---------------------------------------

BENCH_PROMPT = "Explain step by step how a bicycle works, part by part, for a curious ten-year-old."


def timer(fn, reps, device):
    """Median seconds of fn() over reps runs, after one warm-up; waits for the device each time."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def gemv_ceilings(model, reps=5):
    """Two ceilings for a decode step, in GB/s: torch's vector-matrix product on one large (256 MB) matrix,
    and on this model's own matrices (every weight once, as one decode step reads them)."""
    dt, dev = model.lm_head.dtype, model.lm_head.device
    big = torch.randn(8192, 8192 * 32 // torch.finfo(dt).bits, dtype=dt, device=dev)
    mats = [w for L in model.layers for w in (L.wqkv, L.wo, L.w_gate_up, L.w_down)] + [model.lm_head]
    xs = {n: torch.randn(1, n, dtype=dt, device=dev) for n in {w.shape[0] for w in mats + [big]}}
    gbytes = lambda ws: sum(w.numel() * w.element_size() for w in ws) / 1e9  # noqa: E731
    step = lambda: [xs[w.shape[0]] @ w for w in mats]  # noqa: E731
    return {"one large matrix": gbytes([big]) / timer(lambda: xs[big.shape[0]] @ big, reps, dev),
            "this model's matrices": gbytes(mats) / timer(step, reps, dev)}


def mlp_bytes_ratio(keep, plan):
    """Ideal sparse/dense time of one decode-step MLP: the share of its weights a plan reads (a batch-1 step
    is memory-bound; biases left out). plan: "dense", "coarse" or one of kernels.fine_plan's."""
    return {"dense": 1.0, "coarse": keep, "gather": (1 + 2 * keep) / 3, "gather_down": (2 + keep) / 3,
            "mask": 1.0}[plan]


def random_mlps(hidden, intermediate, dtype, device, g):
    """As many random MLPs (<= 64, weights ~ N(0, 0.02), up_rows where model.py makes them) as make 256 MB,
    so that, as in a decode step, each layer's weights come from memory, not cache."""
    layers = min(64, -(-(256 << 20) // (3 * hidden * intermediate * torch.finfo(dtype).bits // 8)))
    rand = lambda *s: (0.02 * torch.randn(*s, generator=g)).to(device, dtype)  # noqa: E731
    mlps = [kernels.MLPWeights(rand(hidden, 2 * intermediate), rand(intermediate, hidden))
            for _ in range(layers)]
    if device.type == "cpu" and dtype in (torch.float32, torch.float64):
        for w in mlps:
            w.up_rows = w.w_gate_up[:, intermediate:].T.contiguous()               # (D, h)
    return mlps


def time_cases(cases, layers, reps, seconds, device):
    """Median seconds per layer of each case (a list of runs, one per layer). One untimed pass of every case
    first (first touch of every buffer, one-time allocations); then every round times all cases back to back,
    so machine noise hits them alike. reps=None: as many rounds as fit in `seconds` (5 to 300)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    for runs in cases:
        for run in runs:
            run()
    sync()
    reps = reps or max(5, min(300, int(seconds / (time.perf_counter() - start))))
    times = [[] for _ in cases]
    for _ in range(reps):
        for t, runs in zip(times, cases):
            t0 = time.perf_counter()
            for run in runs:
                run()
            sync()
            t.append((time.perf_counter() - t0) / layers)
    return [statistics.median(t) for t in times]


def bench_mlp(hidden, intermediate, fractions=(0.75, 0.5, 0.25), dtype=torch.float32, reps=None, seconds=3.0,
              device="cpu"):
    """ms per decode-step MLP (T = 1) for dense, fine and coarse at each kept fraction f, on random weights;
    a timing is one pass over all layers / their number (see random_mlps, time_cases). Rows: mode, f, the
    plan taken, ms, ratio to dense, and that plan's ideal ratio."""
    g, dev = torch.Generator().manual_seed(0), torch.device(device)
    mlps = random_mlps(hidden, intermediate, dtype, dev, g)
    x, prompt = [torch.randn(t, hidden, generator=g).to(dev, dtype) for t in (1, 16)]   # a step, a prompt
    rows = [("dense", 1.0, "dense", [lambda w=w: kernels.dense_mlp(x, w) for w in mlps])]
    scores = [kernels.griffin_scores(kernels.swiglu(prompt, w)) for w in mlps]
    for f in fractions:
        k = kernels.n_kept(intermediate, f)
        sliced = [kernels.slice_mlp(w, kernels.select_coarse(s, k)) for w, s in zip(mlps, scores)]
        rows.append(("fine", f, kernels.fine_plan(x, k, intermediate),
                     [lambda w=w, k=k: kernels.fine_mlp(x, w, k) for w in mlps]))
        rows.append(("coarse", f, "coarse", [lambda s=s: kernels.dense_mlp(x, s) for s in sliced]))
    secs = time_cases([runs for *_, runs in rows], len(mlps), reps, seconds, dev)
    return [dict(mode=m, f=f, plan=p, ms=t * 1e3, ratio=t / secs[0], ideal=mlp_bytes_ratio(f, p))
            for (m, f, p, _), t in zip(rows, secs)]


def bench_fine_plans(hidden, intermediate, fractions=(0.5, 0.6, 0.7, 0.8, 0.9), reps=None, seconds=3.0):
    """The two plans kernels.GATHER_BELOW chooses between, measured: ms per decode-step fine MLP, CPU fp32,
    with the gather and the mask plan forced, at each kept fraction f, on random weights (as bench_mlp). Rows:
    f, gather ms, mask ms, their ratio, and the plan fine_plan takes."""
    g, dev = torch.Generator().manual_seed(0), torch.device("cpu")
    mlps = random_mlps(hidden, intermediate, torch.float32, dev, g)
    x = torch.randn(1, hidden, generator=g)
    cases = [[lambda w=w, k=kernels.n_kept(intermediate, f), p=plan: kernels.fine_mlp(x, w, k, plan=p)
              for w in mlps] for f in fractions for plan in ("gather", "mask")]
    secs = time_cases(cases, len(mlps), reps, seconds, dev)
    return [dict(f=f, gather=secs[2 * i] * 1e3, mask=secs[2 * i + 1] * 1e3,
                 plan=kernels.fine_plan(x, kernels.n_kept(intermediate, f), intermediate))
            for i, f in enumerate(fractions)]


def decode_rows(model, prompt, n, args, rounds):
    """ms/token of dense, sparse and Sirius decoding (each width), interleaved `rounds` times (medians)."""
    runs = {"dense": lambda: generate(model, prompt, n)}
    for s in args.sparsity:
        runs[f"CS {s}"] = lambda s=s: generate(model, prompt, n, sparsity=s, keep=args.keep[0])
        for w in args.width:
            runs[f"Sirius {s} w={w}"] = lambda s=s, w=w: sirius(
                model, prompt, n, sparsity=s, keep=args.keep[0], period=args.period, width=w,
                threshold=args.threshold, strict=args.strict)
    times, last = {m: [] for m in runs}, {}
    for _ in range(rounds):
        for m, run in runs.items():
            last[m] = run()
            times[m].append(last[m].ms_per_token)
    gbytes = kernels.param_count(model.cfg) * model.lm_head.element_size() / 1e9
    rows, dense = [], statistics.median(times["dense"])
    for m, res in last.items():
        ms, ideal = statistics.median(times[m]), res.effective_density
        aal = f"{res.aal:.2f}/{res.period}" if res.period > 1 else "-"
        rows.append([m, f"{ms:.1f}", f"{ms / dense:.3f}", f"{ideal:.3f}", f"{ms / dense / ideal:.2f}", aal,
                     f"{gbytes * ideal / ms * 1e3:.1f}"])
    return rows, {m: r.aal for m, r in last.items()}


# --- Sirius at the Llama-3-8B shape, from measured parts ------------------------------------------

# The paper's AAL (Llama-3-8B-Instruct, GSM8K, K = 16) by (sparsity, width): a projection uses it only for
# the setting it was measured in.
PAPER_AAL = {("coarse", 8): 15.22, ("fine", 4): 15.37}   # Llama-3-8B-Instruct, GSM8K, K = 16


def llama3_8b_config(**changes):
    """Llama-3-8B's shape (its config.json), or a stand-in with some fields changed (fewer layers, say)."""
    shape = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, head_dim=128, vocab_size=128256, rope_theta=5e5,
                 tie_word_embeddings=False, max_position_embeddings=8192)
    return LlamaConfig(**{**shape, **changes})


@torch.no_grad()
def random_llama(cfg, device, dtype, max_seq_len=512, seed=0):
    """A Llama of a shape we have no checkpoint of, with random weights: allocated on `device` in `dtype` and
    filled there in place by a seeded generator on that device (the 8B shape's 16 GB never pass through the
    host). Matrices ~ N(0, 0.02), norm weights 1, biases 0."""
    model = Llama(cfg, max_seq_len, device=device, dtype=dtype)
    g = torch.Generator(device).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() > 1:
            p.normal_(0.0, 0.02, generator=g)
        else:
            p.fill_(1.0 if name.endswith("norm") else 0.0)
    model.make_up_rows()                   # the fine "gather" plan's copy, where that plan runs
    return model


def side_by_side_chains(period, width, device):
    """Node depths (N,) and `sees` (N, N) of a tree of w chains under one root, N = 1 + (K-1)·w, numbered
    as sirius_min numbers a tree (depth d holds nodes 1+(d-1)·w .. d·w). It stands in for whatever tree
    the drafts grow on the assumption (not timed) that a pass's cost depends on its mask's shape only: SDPA
    scores every query against every key whatever the bool mask holds."""
    n = 1 + (period - 1) * width
    depth = torch.tensor([0] + [d for d in range(1, period) for _ in range(width)])
    sees = torch.eye(n, dtype=torch.bool)                   # every node sees itself
    sees[1:1 + width, 0] = True                             # depth 1: children of the root
    for node in range(1 + width, n):                        # deeper: the parent is the node w before
        sees[node] |= sees[node - width]
    return depth.to(device), sees.to(device)


def sirius_parts(model, sparse_mlp, t0, pos, *, period, width, threshold, strict, reps):
    """Seconds of one Sirius period and of its parts, each pass with the positions and mask the period gives
    it (sirius_min.tree_pass_args): the root's draft step (one token), a draft step over one depth (w tokens),
    the verification (sirius_min.verify_period: the full pass over 1 + (K-1)·w tokens and the verdict; one
    graph on a captured model) and a whole `sirius_period`. "rest" is the period minus root, K-2 draft steps
    and the verification: choosing draft tokens, the read-back, the back-gather."""
    dev = t0.device
    depth, sees = side_by_side_chains(period, width, dev)
    tokens = t0.view(1).repeat(len(depth))                  # the tokens do not change a pass's cost
    parent = torch.tensor([0] + [max(0, j - width) for j in range(1, len(depth))], device=dev)
    tree = Tree(tokens, parent, depth, sees)
    rule = dict(period=period, width=width, threshold=threshold, sampling=Sampling(),
                rule="argmax" if strict else "threshold")
    verify = getattr(model, "verify", None) or partial(verify_period, model)

    def step(nodes, mlp):                                   # one pass over `nodes`, as sirius_period runs it
        return model(tokens[nodes.start:nodes.stop], pos + nodes.start, mlp,
                     **tree_pass_args(sees, pos, nodes, depth, width))

    middle = range(1 + (period // 2 - 1) * width, 1 + period // 2 * width)   # the nodes of one depth
    t = dict(root=timer(lambda: step(range(0, 1), sparse_mlp), reps, dev),
             draft=timer(lambda: step(middle, sparse_mlp), reps, dev),
             verify=timer(lambda: verify(tree, pos, **rule), reps, dev),
             period=timer(lambda: sirius_period(model, sparse_mlp, t0.view(1), pos, period=period,
                                                width=width, threshold=threshold, strict=strict,
                                                verify=getattr(model, "verify", None)),
                          reps, dev))
    t["rest"] = t["period"] - (t["root"] + (period - 2) * t["draft"] + t["verify"])
    return t


def bench_llama3_8b(device="cuda", dtype=torch.bfloat16, keep=0.5, period=16, widths=(1, 4, 8), aals=None,
                    reps=10, *, sparsity="coarse", cfg=None, context=512, threshold=0.1, strict=False,
                    aal_source="passed in", compile=False):
    """Decode steps and Sirius periods of a random-weight Llama of Llama-3-8B's shape (or `cfg`), after a
    `context`-token prompt; every time a median of `reps` after one untimed run, waiting for the device.

    Prints and returns: one-token steps (dense, coarse, fine at f = keep) beside their ideals; per width w,
    the parts of a `sparsity` Sirius period (sirius_parts); and projected ms/token = period / AAL, where
    `aals` {w: AAL} were measured elsewhere for the same w (`aal_source` says where) and the paper's AAL
    appears only for the (sparsity, w, K = 16) it was measured at. Ideals: "density" is the paper's
    accounting (kernels.density); "plan" the share of all weights this code's plan reads in a step.
    compile (True, or a torch.compile backend's name): every decode pass and the verification with its
    verdict replayed as captured graphs (graphs.capture; fine left out to save compilations): the one-token
    steps after 4 untimed runs (3 to compile and record, then timer's), the period's parts after one, as
    eagerly.
    """
    dev, cfg, aals = torch.device(device), cfg or llama3_8b_config(), aals or {}
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    model = random_llama(cfg, dev, dtype, max_seq_len=context + 1 + (period - 1) * max(widths))
    g = torch.Generator(dev).manual_seed(1)
    prompt = torch.randint(cfg.vocab_size, (context,), device=dev, generator=g)
    pos, t0 = context, prompt[-1:]                        # the next token goes to slot `context`
    weights_gb = kernels.param_count(cfg) * model.lm_head.element_size() / 1e9
    print(f"Random weights, {cfg.num_hidden_layers} layers, h {cfg.hidden_size}, D {cfg.intermediate_size}, "
          f"{cfg.num_attention_heads}/{cfg.num_key_value_heads} heads, vocabulary {cfg.vocab_size}: "
          f"{weights_gb:.2f} GB in {dtype} on {dev}; {context}-token context, f = {keep}, "
          f"K = {period}, {reps} timed runs (medians) after one untimed run"
          + ("; every decode pass graph-captured (torch.compile)" if compile else ""))

    D, L, total = cfg.intermediate_size, cfg.num_hidden_layers, kernels.param_count(cfg)
    k = kernels.n_kept(D, keep)
    plans = {"dense": "dense", "coarse": "coarse",
             "fine": kernels.fine_plan(torch.empty(1, cfg.hidden_size, device=dev, dtype=dtype), k, D)}
    if compile:
        del plans["fine"]
    # the share of all weights a one-token step reads under each plan (only MLP weights are skipped; the
    # embedding table counts whole, as in kernels.density, though a step reads one row of an untied one)
    reads = {s: 1 - L * 3 * cfg.hidden_size * D * (1 - mlp_bytes_ratio(keep, p)) / total
             for s, p in plans.items()}
    dens = {s: kernels.density(cfg, keep, s) for s in plans}
    mlps = {"dense": None}
    for s in ("coarse", "fine"):       # each prefill rewrites the same prompt slots with the same keys/values
        if s in plans or s == sparsity:
            mlps[s] = prefill_and_sparse_mlp(model, prompt, s, keep)[1]
    if compile:
        import graphs  # here: it imports torch._dynamo (seconds), which only compile needs
    step = graphs.capture(model, compile) if compile else model      # the model, or its passes as graphs
    if compile:
        for s in plans:
            for _ in range(3):                     # compile, then let the graph be recorded
                step(t0, pos, mlps[s])
    steps = {s: timer(lambda s=s: step(t0, pos, mlps[s]), reps, dev) for s in plans}
    dense = steps["dense"]
    name = {"dense": "dense", "coarse": "coarse", "fine": f"fine (plan {plans.get('fine')})"}
    step_rows = [[name[s] + " (graph)" * bool(compile), f"{steps[s] * 1e3:.2f}", f"{steps[s] / dense:.3f}",
                  f"{dens[s]:.3f}", f"{reads[s]:.3f}"] for s in plans]
    print_table(["one-token step", "ms", "/ dense", "ideal: density", "ideal: plan"], step_rows)

    parts, proj_rows, part_rows = {}, [], []
    d = dens[sparsity]
    for w in widths:
        t = parts[w] = sirius_parts(step, mlps[sparsity], t0, pos, period=period, width=w,
                                    threshold=threshold, strict=strict, reps=reps)
        part_rows.append([w, 1 + (period - 1) * w] + [f"{t[p] * 1e3:.2f}" for p in
                                                       ("root", "draft", "verify", "rest", "period")]
                         + [f"{t['draft'] / dense:.2f}", f"{t['verify'] / dense:.2f}",
                            f"{t['period'] / dense:.2f}", f"{(period - 1) * d + 1:.2f}"])
        paper = PAPER_AAL.get((sparsity, w)) if period == 16 else None
        for aal, source in ((aals.get(w), aal_source),
                            (paper, f"paper: Llama-3-8B-Instruct, GSM8K, {sparsity}, w = {w}")):
            if aal is None or math.isnan(aal):
                continue
            proj_rows.append([w, f"{aal:.2f}/{period}", source, f"{t['period'] / aal * 1e3:.2f}",
                              f"{t['period'] / aal / dense:.3f}", f"{effective_density(d, period, aal):.3f}"])
    print(f"\nA Sirius period's parts in ms ({sparsity}, f = {keep}, K = {period}), each pass with its tree "
          f"positions and mask; verify = the full pass and its verdict; rest = period - root - "
          f"(K-2)·draft - verify (choosing draft tokens, read-back, back-gather); ideal period = "
          f"(K-1)·density + 1 dense steps")
    print_table(["w", "verify tokens", "root step", "draft step", "verify", "rest", "period",
                 "draft / dense", "verify / dense", "period / dense", "ideal period"], part_rows)
    print(f"\nprojected ms/token = period / AAL, the AAL measured for the same w; ideal = effective density "
          f"((K-1)·density + 1) / AAL; dense step {dense * 1e3:.2f} ms")
    if proj_rows:
        print_table(["w", "AAL", "AAL measured on", "ms/token", "/ dense", "ideal"], proj_rows)
    else:
        print("(no AAL measured for these widths: no projection)")
    peak = torch.cuda.max_memory_allocated(dev) / 2 ** 30 if dev.type == "cuda" else None
    if peak is not None:
        print(f"peak memory allocated: {peak:.2f} GiB (weights {weights_gb / 1.073741824:.2f} GiB)")
    return dict(steps=steps, plans=plans, density=dens, reads=reads, parts=parts, peak_gib=peak)


def bench(args):
    if len(args.keep) > 1:
        raise UsageError("bench times one kept fraction (--keep F); its MLP table adds 0.75, 0.5 and 0.25")
    folder = open_model_folder(args)
    cfg = folder.cfg
    prompt = encode(args, folder, BENCH_PROMPT)
    n, rounds, reps = args.max_new_tokens, *((1, 3) if args.quick else (3, 7))
    model = load_weights(args, cfg, len(prompt))
    dtype, f = model.lm_head.dtype, args.keep[0]
    rule = "strict" if args.strict else f"threshold = {args.threshold}"
    print(f"{args.threads} thread(s), {dtype}, f = {f}, K = {args.period}, {rule}, "
          f"widths {args.width}; {n} tokens per run, EOS ignored so every run decodes the same length")
    gb = kernels.param_count(cfg) * model.lm_head.element_size() / 1e9
    print(f"\n1. end-to-end decode, {Path(args.model).name} ({gb:.2f} GB of weights; GB/s = ideal x all "
          f"weights, per token / time; ideal = density, or effective density for Sirius)")
    rows, aals = decode_rows(model, prompt, n, args, rounds)
    print_table(["method", "ms/token", "ratio to dense", "ideal", "ratio / ideal", "AAL", "GB/s"], rows)
    for name, bw in gemv_ceilings(model).items():
        print(f"torch GEMV on {name}: {bw:.1f} GB/s; dense decode reaches {float(rows[0][-1]) / bw:.0%} "
              f"of it")
    del model
    shapes = [(cfg.hidden_size, cfg.intermediate_size, Path(args.model).name)]
    shapes += [] if args.quick else [(4096, 14336, "Llama-3-8B layer")]
    for h, D, name in shapes:
        print(f"\n2. MLP of one decode step, {name} (h {h}, D {D}): time / dense beside the share of weights "
              f"its plan reads")
        fractions = sorted({0.75, 0.5, 0.25, f}, reverse=True)
        rows = bench_mlp(h, D, fractions, dtype=dtype, reps=3 if args.quick else None, device=args.device)
        print_table(["mode", "f", "plan", "ms", "ratio", "ideal", "ratio / ideal"],
                    [[r["mode"], r["f"], r["plan"], f"{r['ms']:.3f}", f"{r['ratio']:.3f}",
                      f"{r['ideal']:.3f}", f"{r['ratio'] / r['ideal']:.2f}"] for r in rows])
        if torch.device(args.device).type == "cpu":
            print(f"fine MLP, fp32, each plan forced: where gathering the kept rows stops paying "
                  f"(kernels.GATHER_BELOW = {kernels.GATHER_BELOW})")
            rows = bench_fine_plans(h, D, reps=3 if args.quick else None)
            print_table(["f", "gather ms", "mask ms", "gather / mask", "plan taken"],
                        [[r["f"], f"{r['gather']:.3f}", f"{r['mask']:.3f}", f"{r['gather'] / r['mask']:.3f}",
                          r["plan"]] for r in rows])
    # 3. Llama-3-8B's shape where the device holds it; else one of its layers (a CPU); --quick: a stand-in
    full, dev = llama3_8b_config(), torch.device(args.device)
    need = 1.5 * kernels.param_count(full) * torch.finfo(dtype).bits / 8   # weights, coarse slices, cache
    if args.quick:
        shape = llama3_8b_config(hidden_size=256, intermediate_size=896, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=4008)
        what = "a small stand-in decoder (--quick: h 256, D 896, 1 layer), not Llama-3-8B's shape"
    elif dev.type == "cuda" and torch.cuda.mem_get_info(dev)[0] > need:
        shape, what = full, "Llama-3-8B's shape (32 layers, vocabulary 128256)"
    else:
        shape = llama3_8b_config(num_hidden_layers=1, vocab_size=128256 // 32)
        what = ("one layer of Llama-3-8B's shape, vocabulary / 32 (so embeddings weigh per layer what they "
                "do in the 8B model)")
    print(f"\n3. Sirius's period from measured parts: {what}, random weights")
    aal = {int(m.split("w=")[1]): a for m, a in aals.items() if m.startswith("Sirius coarse")}
    bench_llama3_8b(args.device, dtype, f, args.period, args.width, aal, reps, sparsity="coarse", cfg=shape,
                    context=64 if args.quick else 512, threshold=args.threshold, strict=args.strict,
                    aal_source=f"{Path(args.model).name}, section 1 (coarse, same w)")

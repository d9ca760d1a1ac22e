"""The measurements: `python run.py eval` (accuracy, AAL, effective density: the paper's Table 2 columns)
and `python run.py bench` (decode speed beside the ideal bytes-read ratios, and Sirius's cost projected at
the Llama-3-8B shape from measured parts). Accuracy and speed share this file, the command line and the
generation code, so they always measure the same thing.
"""
import json
import math
import os
import random
import re
import statistics
import sys
import time
from pathlib import Path

import torch

import kernels
from model import Llama, LlamaConfig
from folder import UsageError, encode, load_weights, open_model_folder
from sirius_min import (average_advance_length, effective_density, full_model_nll, generate, prefill,
                        sirius, sirius_period)

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
    """Seeded problems a 135M model solves about 60 % of the time: +, - and x of small numbers, bare or
    as a one-line story. The answer is checked as a number (see extract_number)."""
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
    """GSM8K's jsonl: {"question": ..., "answer": "... #### 42"} per line."""
    try:
        lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as e:
        raise UsageError(f"{path}: {e.strerror or e}") from None
    problems = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not {"question", "answer"} <= row.keys():
            raise UsageError(f"{path}:{n}: needs the fields 'question' and 'answer'")
        answer = extract_number(str(row["answer"])) if "####" in str(row["answer"]) else None
        if answer is None:
            raise UsageError(f"{path}:{n}: the answer does not end in '#### <number>'")
        problems.append((str(row["question"]), answer))
    if not problems:
        raise UsageError(f"{path}: no questions in the file")
    return problems


def extract_number(text):
    """The answer a model gave: the number after '####' if it wrote one, else the last number in its text."""
    numbers = re.findall(r"-?\d+(?:\.\d+)?", text.split("####")[-1].replace(",", ""))
    return float(numbers[-1]) if numbers else None


def check_out_path(out):
    """--out is checked before an eval that may run for an hour: a writable file in an existing folder."""
    p = Path(out)
    if not out or p.is_dir():
        raise UsageError(f"--out {out!r}: expected a file name, not a folder")
    if not p.resolve().parent.is_dir():
        raise UsageError(f"--out {out}: its folder does not exist")
    if not os.access(p.resolve().parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise UsageError(f"--out {out}: not writable")


def evaluate(args):
    if args.out is not None:
        check_out_path(args.out)
    folder = open_model_folder(args)
    cfg, tok = folder.cfg, folder.tok
    problems = load_gsm8k(args.data) if args.data else arithmetic_task()
    problems = problems[:args.limit] if args.limit else problems
    prompts = [encode(args, folder, q, FEW_SHOT) for q, _ in problems]
    model = load_weights(args, cfg, max(len(p) for p in prompts))
    eos, settings = folder.stop_ids, [(s, f) for s in args.sparsity for f in args.keep]
    runs = {"dense": lambda p: generate(model, p, args.max_new_tokens, eos_ids=eos)}
    for s, f in settings:
        runs[("CS", s, f)] = lambda p, s=s, f=f: generate(model, p, args.max_new_tokens, eos_ids=eos,
                                                          sparsity=s, keep=f)
        for w in args.width:
            runs[("Sirius", s, f, w)] = lambda p, s=s, f=f, w=w: sirius(
                model, p, args.max_new_tokens, eos_ids=eos, sparsity=s, keep=f, period=args.period, width=w,
                threshold=args.threshold, strict=args.strict)
    log = {m: [] for m in runs}  # per question: (correct, full-model NLL, Result)
    started = time.perf_counter()
    for n, ((_, answer), prompt) in enumerate(zip(problems, prompts), 1):
        for m, run in runs.items():
            res = run(prompt)
            log[m].append((extract_number(tok.decode(res.tokens)) == answer,
                           full_model_nll(model, prompt, res.tokens), res))
        elapsed, tty, last = time.perf_counter() - started, sys.stderr.isatty(), n == len(problems)
        if tty or last or n % max(1, len(problems) // 10) == 0:  # a pipe or a log gets a line per tenth
            left = elapsed / n * (len(problems) - n)
            print("\r" * tty + f"eval {n}/{len(problems)}, {elapsed:.0f} s, about {left:.0f} s left",
                  end="\n" if last or not tty else "", file=sys.stderr, flush=True)
    report = eval_report(log, settings, args)
    if args.out is not None:
        tmp = Path(f"{args.out}.tmp")
        try:  # NaN (no period counted) is written as null: bare NaN is not JSON
            tmp.write_text(json.dumps(nan_to_null(report), indent=2))
            tmp.replace(args.out)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise UsageError(f"--out {args.out}: {e.strerror or e}") from None


def nan_to_null(x):
    if isinstance(x, (dict, list)):
        return {k: nan_to_null(v) for k, v in x.items()} if isinstance(x, dict) else list(map(nan_to_null, x))
    return None if isinstance(x, float) and math.isnan(x) else x


def eval_report(log, settings, args):
    """Print the paper's columns, one row per (sparsity, f, w), then quality beside dense; return a dict."""
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    acc = {m: mean([c for c, _, _ in rows]) for m, rows in log.items()}
    table, report = [], {"questions": len(log["dense"]), "period": args.period, "threshold": args.threshold,
                         "strict": args.strict, "full": acc["dense"], "rows": []}
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
    print(f"\n{len(log['dense'])} questions, K = {args.period}, threshold = {args.threshold}"
          f"{', strict' if args.strict else ''}; AAL counts every period but each answer's last")
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
    return [dict(mode=m, f=f, plan=p, ms=t * 1e3, ratio=t / secs[0], ideal=kernels.mlp_bytes_ratio(f, p))
            for (m, f, p, _), t in zip(rows, secs)]


def bench_fine_plans(hidden, intermediate, fractions=(0.5, 0.6, 0.7, 0.8, 0.9), reps=None, seconds=3.0):
    """The measurement behind kernels.GATHER_BELOW: ms per decode-step fine MLP, CPU fp32, with each of the
    plans forced, at each kept fraction f, on random weights (as bench_mlp). Rows: f, gather ms, mask ms,
    their ratio, and the plan fine_plan takes."""
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


def random_llama(cfg, device, dtype, max_seq_len=512, seed=0):
    """A Llama with random weights (std 0.02) in model.py's layout: shapes we have no checkpoint of."""
    g = torch.Generator().manual_seed(seed)
    h, D, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads * cfg.head_dim, \
        cfg.num_key_value_heads * cfg.head_dim
    r = lambda *shape: 0.02 * torch.randn(*shape, generator=g)  # noqa: E731
    w = {"embed": r(cfg.vocab_size, h), "lm_head": r(h, cfg.vocab_size), "norm": torch.ones(h)}
    for i in range(cfg.num_hidden_layers):
        w.update({f"layers.{i}.{n}": t for n, t in dict(
            attn_norm=torch.ones(h), mlp_norm=torch.ones(h), wqkv=r(h, q + 2 * kv), wo=r(q, h),
            w_gate_up=r(h, 2 * D), w_down=r(D, h)).items()})
    return Llama(cfg, {k: v.to(device, dtype) for k, v in w.items()}, max_seq_len)


def sirius_parts(m8, args, aals, reps):
    """Sirius at the Llama-3-8B shape from measured parts: the sparse steps and the verification pass of one
    period (per width), the rest of the period (acceptance, bookkeeping), and the ms/token they imply."""
    dev, K, pos = m8.lm_head.device, args.period, 64
    prompt = torch.arange(pos, device=dev)
    one = lambda t, mlp=None: m8(torch.arange(t, device=dev), pos, mlp)  # noqa: E731  a t-token pass
    dense = timer(lambda: one(1), reps, dev)
    _, coarse = prefill(m8, prompt, "coarse", args.keep[0])
    rows = []
    for w in args.width:
        sparse_1 = timer(lambda: one(1, coarse), reps, dev)
        sparse_w = timer(lambda: one(w, coarse), reps, dev)
        verify = timer(lambda: one(1 + (K - 1) * w), reps, dev)
        t0 = torch.tensor(1, device=dev)
        period = timer(lambda: sirius_period(m8, coarse, t0, pos, K, width=w, threshold=args.threshold,
                                             strict=args.strict), reps, dev)
        parts = sparse_1 + (K - 2) * sparse_w + verify
        measured = aals.get(w, float("nan"))
        for label, aal in ((f"AAL {measured:.2f} (measured)", measured), ("AAL 15.22 (paper)", 15.22)):
            rest = (period - parts) * 1e3
            rows.append([w, f"{sparse_w / dense:.2f}", f"{verify / dense:.2f}", f"{rest:.1f}",
                         label, f"{period / aal * 1e3:.1f}", f"{dense * 1e3:.1f}",
                         f"{period / aal / dense:.3f}"])
    return rows


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
    print(f"\n1. end-to-end decode, {Path(args.model).name} ({gb:.2f} GB of weights; GB/s = weights read per "
          f"token / time; ideal = density, or effective density for Sirius)")
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
    big = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=1, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=128, vocab_size=128256 // 32, rope_theta=5e5,
                      tie_word_embeddings=False)
    if args.quick:
        big = LlamaConfig(hidden_size=256, intermediate_size=896, num_hidden_layers=1, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=128, vocab_size=4008, tie_word_embeddings=False)
    print(f"\n3. Sirius's period from measured parts, a Llama-3-8B-shaped decoder (h {big.hidden_size}, "
          f"D {big.intermediate_size}), 1 layer, random weights, vocabulary / 32 (so embeddings weigh what\n"
          f"they do per layer in the 8B model), coarse f = {f}, K = {args.period}; "
          f"projected ms/token = period / AAL")
    m8 = random_llama(big, args.device, dtype)
    aal = {int(m.split("w=")[1]): a for m, a in aals.items() if m.startswith("Sirius coarse")}
    print_table(["w", "sparse step (dense steps)", "verify pass (dense steps)", "rest of period (ms)", "at",
                 "projected ms/token", "dense ms/token", "ratio"], sirius_parts(m8, args, aal, reps))
    print("A GPU runs a w-wide sparse step and the verify pass in about one dense step each (memory-bound); "
          "this CPU is compute-bound there.")

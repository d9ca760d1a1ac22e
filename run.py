"""sirius-min from the shell: watch contextual sparsity go wrong and Sirius put it right.

    python run.py                       # one reasoning prompt: dense, sparse, Sirius, and a table
    python run.py --prompt "..." --sirius --sparsity coarse --density 0.4
    python run.py eval --limit 20       # the paper's table on a bundled arithmetic task (or --data GSM8K)
    python run.py bench                 # ms/token and MLP kernel times against their ideal ratios

Every mistake a user can make ends in one line on stderr and exit code 2.
"""
import argparse
import json
import random
import re
import statistics
import sys
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer

import kernels
from model import Llama, LlamaConfig, load_model, read_config
from sirius_min import average_advance_length, effective_density, full_model_nll, generate, sirius

DEMO_PROMPT = "Mia buys 4 packs of stickers with 6 stickers in each pack. How many stickers does she have?"


class UsageError(Exception):
    """A bad value given by the user: reported in one line, exit code 2."""


# --- arguments ------------------------------------------------------------------------------------

def positive_int(s):
    if not s.lstrip("-").isdigit() or int(s) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {s!r}")
    return int(s)


def fraction(s):
    try:
        f = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {s!r}") from None
    if not 0 < f <= 1:
        raise argparse.ArgumentTypeError(f"density must be in (0, 1], got {s}")
    return f


def period(s):
    k = positive_int(s)
    if k < 2:
        raise argparse.ArgumentTypeError(f"the period must be at least 2, got {s}")
    return k


def threshold(s):
    try:
        t = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {s!r}") from None
    if not t >= 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"the threshold must be >= 0, got {s}")
    return t


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse would also print the whole usage)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def build_parser(command="demo"):
    """One parser per command (demo, eval, bench), sharing the model and sparsity options."""
    p = Parser(prog=f"run.py{'' if command == 'demo' else ' ' + command}",
               description=__doc__.split("\n\n")[0] if command == "demo" else COMMANDS[command],
               epilog=__doc__.split("\n\n")[1] if command == "demo" else None,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--model", metavar="DIR", help="a Hugging Face Llama folder (default: the embedded SmolLM2-135M-Instruct)")
    m.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="(default: %(default)s)")
    m.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights and activations (default: float32 on cpu, bfloat16 on cuda)")
    m.add_argument("--threads", type=positive_int, default=1, help="CPU threads (default: %(default)s; ratios are cleanest at 1)")
    m.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                   help="wrap prompts in the model's chat format (default: on)")
    s = p.add_argument_group("sparsity and Sirius")
    s.add_argument("--sparsity", default="both" if command == "eval" else "coarse",
                   choices=["fine", "coarse", "both"] if command == "eval" else ["none", "fine", "coarse"],
                   help="MLP contextual sparsity: fine = top-k per token, coarse = GRIFFIN, chosen once from the "
                        "prompt; none = dense only (default: %(default)s)")
    s.add_argument("--density", type=fraction, default=0.5, help="kept fraction of MLP neurons (default: %(default)s)")
    s.add_argument("--period", type=period, default=16, help="Sirius period K: tokens per full-model check (default: %(default)s)")
    s.add_argument("--threshold", type=threshold, default=0.1,
                   help="Sirius keeps a draft while the full model gives it at least this probability (default: %(default)s)")
    s.add_argument("--strict", action="store_true", help="keep a draft only if it is the full model's own choice (lossless)")
    s.add_argument("--max-new-tokens", type=positive_int, default=128 if command == "demo" else 160, help="(default: %(default)s)")
    if command == "demo":
        p.add_argument("--prompt", default=DEMO_PROMPT, help="the prompt, or - to read it from stdin (default: a short word problem)")
        p.add_argument("--few-shot", action=argparse.BooleanOptionalAction,
                       help="show the prompt after eval's four worked examples (default: on for the built-in prompt only)")
        p.add_argument("--sirius", action="store_true", help="run Sirius only (default: dense, sparse and Sirius one under the other)")
        p.add_argument("--no-color", action="store_true", help="plain text even on a terminal")
    if command == "eval":
        p.add_argument("--data", metavar="FILE.jsonl", help="GSM8K-format questions (default: the bundled arithmetic task)")
        p.add_argument("--limit", type=positive_int, help="use only the first N questions")
        p.add_argument("--out", metavar="FILE.json", help="also write the results as JSON")
    if command == "bench":
        p.add_argument("--quick", action="store_true", help="fewer tokens and repeats, no Llama-3-8B shapes (a smoke test)")
    return p


COMMANDS = {"eval": "Accuracy, AAL and effective density on a task: the paper's Table 2 columns.",
            "bench": "Decode speed and MLP kernel times, each beside its ideal (bytes read) ratio to dense."}


# --- loading --------------------------------------------------------------------------------------

def open_model_folder(args):
    """Threads, device and the model folder's config and tokenizer (the weights come later)."""
    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    if getattr(args, "sirius", False) and args.sparsity == "none":
        raise UsageError("--sirius needs a sparse model to correct: --sparsity fine or coarse")
    if args.model is None:
        from convert_gguf import default_model_dir
        args.model = default_model_dir()
    return read_config(args.model), load_tokenizer(args.model)


def load_tokenizer(model_dir) -> Tokenizer:
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer.json in {model_dir}")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library raises a bare Exception on a malformed file
        raise ValueError(f"{path}: cannot read tokenizer ({e})") from None


def chat_prompt(tok: Tokenizer, user: str, examples=()) -> str:
    """One user turn in the model's chat format (Llama-3 headers, ChatML as in SmolLM2, or none), after
    optional worked examples given as earlier (question, answer) turns: few-shot prompting."""
    vocab, turns = tok.get_vocab(), [*examples, (user, None)]
    if "<|start_header_id|>" in vocab:
        turn = lambda role, text: f"<|start_header_id|>{role}<|end_header_id|>\n\n{text}<|eot_id|>"  # noqa: E731
        head, open_reply = "<|begin_of_text|>", "<|start_header_id|>assistant<|end_header_id|>\n\n"
    elif "<|im_start|>" in vocab:
        turn = lambda role, text: f"<|im_start|>{role}\n{text}<|im_end|>\n"  # noqa: E731
        head = turn("system", "You are a helpful AI assistant named SmolLM, trained by Hugging Face")
        open_reply = "<|im_start|>assistant\n"
    else:
        return "".join(f"{q}\n{a}\n\n" for q, a in examples) + user
    return head + "".join(turn("user", q) + (turn("assistant", a) if a else "") for q, a in turns) + open_reply


def stop_ids(cfg, tok: Tokenizer) -> list:
    """Token ids that end an answer: the config's EOS plus the chat end-of-turn markers the vocabulary has."""
    vocab = tok.get_vocab()
    return sorted(set(cfg.eos_token_id) | {vocab[t] for t in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>",
                                                               "<|end_of_text|>") if t in vocab})


def load_weights(args, cfg, longest_prompt):
    """Load the weights with a KV cache just long enough for the longest request (+ one window)."""
    dtype = torch.bfloat16 if args.dtype == "auto" and args.device == "cuda" else \
        torch.float32 if args.dtype == "auto" else getattr(torch, args.dtype)
    return load_model(args.model, longest_prompt + args.max_new_tokens + args.period, dtype, args.device)


def encode(args, tok, cfg, text, examples=()):
    if not text.strip():
        raise UsageError("the prompt is empty")
    ids = tok.encode(chat_prompt(tok, text, examples) if args.chat else text).ids
    if len(ids) + args.max_new_tokens + args.period > cfg.max_position_embeddings:
        raise UsageError(f"the prompt is {len(ids)} tokens; with --max-new-tokens {args.max_new_tokens} it "
                         f"exceeds the model's context of {cfg.max_position_embeddings} tokens")
    return torch.tensor(ids, device=args.device)


# --- the demo -------------------------------------------------------------------------------------

FULL, DRAFT, RESET = "\033[1;33m", "\033[32m", "\033[0m"


class Printer:
    """Streams generated tokens as text; colours the full model's tokens apart from kept sparse drafts."""

    def __init__(self, tok, color):
        self.tok, self.color, self.ids, self.text = tok, color, [], ""

    def __call__(self, token, from_full):
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return  # half of a multi-byte character: wait for the rest
        new, self.text = text[len(self.text):], text
        if self.color:
            new = (FULL if from_full else DRAFT) + new + RESET
        print(new, end="", flush=True)


def demo(args):
    cfg, tok = open_model_folder(args)
    text = sys.stdin.read() if args.prompt == "-" else args.prompt
    few_shot = args.prompt == DEMO_PROMPT if args.few_shot is None else args.few_shot
    prompt = encode(args, tok, cfg, text, FEW_SHOT if few_shot else ())
    model = load_weights(args, cfg, len(prompt))
    color = sys.stdout.isatty() and not args.no_color
    eos = stop_ids(cfg, tok)
    runs = []
    if not args.sirius:
        runs.append(("dense", lambda cb: generate(model, prompt, args.max_new_tokens, eos, on_token=cb)))
    if not args.sirius and args.sparsity != "none":
        runs.append((f"{args.sparsity} sparse", lambda cb: generate(
            model, prompt, args.max_new_tokens, eos, args.sparsity, args.density, on_token=cb)))
    if args.sparsity != "none":
        runs.append((f"Sirius ({args.sparsity})", lambda cb: sirius(
            model, prompt, args.max_new_tokens, eos, args.sparsity, args.density, args.period,
            args.threshold, args.strict, on_token=cb)))
    print(f"prompt: {text.strip()}" + (f"  (after {len(FEW_SHOT)} worked examples)" if few_shot else ""))
    rows = []
    for name, run in runs:
        print(f"\n--- {name} ---")
        res = run(Printer(tok, color and name.startswith("Sirius")))
        print()
        rows.append((name, res))
    if color and any(name.startswith("Sirius") for name, _ in runs):
        print(f"\n{DRAFT}green{RESET}: sparse drafts the full model kept; "
              f"{FULL}yellow{RESET}: tokens the full model wrote (first token, corrections, bonus tokens)")
    print()
    print_table(["method", "tokens", "ms/token", "density", "AAL", "eff. density", "corrections"],
                [[name, len(r.tokens), f"{r.ms_per_token:.1f}", f"{r.density:.3f}",
                  f"{r.aal:.2f}/{r.period}" if r.advances else "-",
                  f"{r.effective_density:.3f}", r.corrections if r.advances else "-"] for name, r in rows])


def print_table(header, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for i, row in enumerate([header, *rows]):
        print("  ".join(str(x).ljust(w) if j == 0 else str(x).rjust(w) for j, (x, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))


# --- eval: the paper's Table 2 on a task with checkable answers ------------------------------------

# Worked examples shown before every question (as earlier chat turns), in GSM8K's "The answer is N" style.
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
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{path}: no such file")
    problems = []
    for n, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not {"question", "answer"} <= row.keys():
            raise UsageError(f"{path}:{n}: needs the fields 'question' and 'answer'")
        answer = extract_number(str(row["answer"]).split("####")[-1]) if "####" in str(row["answer"]) else None
        if answer is None:
            raise UsageError(f"{path}:{n}: the answer does not end in '#### <number>'")
        problems.append((str(row["question"]), answer))
    if not problems:
        raise UsageError(f"{path}: no questions in the file")
    return problems


def extract_number(text):
    """The answer a model gave: the number after '####' if it wrote one, else the last number in its text."""
    text = text.split("####")[-1].replace(",", "")
    numbers = re.findall(r"-?\d+(?:\.\d+)?", text)
    return float(numbers[-1]) if numbers else None


class Progress:
    """A one-line progress bar with an ETA on stderr (a line per tenth when stderr is not a terminal)."""

    def __init__(self, total, label):
        self.total, self.label, self.start, self.tty = total, label, time.perf_counter(), sys.stderr.isatty()

    def update(self, done):
        elapsed = time.perf_counter() - self.start
        eta = elapsed / done * (self.total - done)
        bar = "#" * (20 * done // self.total) + "." * (20 - 20 * done // self.total)
        line = f"{self.label} [{bar}] {done}/{self.total}  {elapsed:.0f}s elapsed, ETA {eta:.0f}s"
        if self.tty:
            print("\r" + line, end="\n" if done == self.total else "", file=sys.stderr, flush=True)
        elif done == self.total or done % max(1, self.total // 10) == 0:
            print(line, file=sys.stderr, flush=True)


def evaluate(args):
    if args.out and not Path(args.out).resolve().parent.is_dir():
        raise UsageError(f"--out {args.out}: its folder does not exist")
    cfg, tok = open_model_folder(args)
    problems = load_gsm8k(args.data) if args.data else arithmetic_task()
    problems = problems[:args.limit] if args.limit else problems
    prompts = [encode(args, tok, cfg, q, FEW_SHOT) for q, _ in problems]
    model = load_weights(args, cfg, max(len(p) for p in prompts))
    eos, sparsities = stop_ids(cfg, tok), ["fine", "coarse"] if args.sparsity == "both" else [args.sparsity]
    methods = ["dense"] + [f"{m} {s}" for s in sparsities for m in ("CS", "Sirius")]
    log = {m: [] for m in methods}  # per question: (correct, full-model NLL, tokens, Result)
    bar = Progress(len(problems), "eval")
    for n, ((_, answer), prompt) in enumerate(zip(problems, prompts), 1):
        for m in methods:
            kind, _, sparsity = m.partition(" ")
            res = sirius(model, prompt, args.max_new_tokens, eos, sparsity, args.density, args.period,
                         args.threshold, args.strict) if kind == "Sirius" else \
                generate(model, prompt, args.max_new_tokens, eos, sparsity or "none", args.density)
            log[m].append((extract_number(tok.decode(res.tokens)) == answer,
                           full_model_nll(model, prompt, res.tokens), res.tokens, res))
        bar.update(n)
    report = eval_report(log, sparsities, args)
    if args.out:
        write_json_atomically(args.out, report)
def eval_report(log, sparsities, args):
    """Print the paper's columns, then quality beside dense; return everything as a dict for --out."""
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    acc = {m: mean([c for c, *_ in rows]) for m, rows in log.items()}
    nll = {m: mean([x for _, x, *_ in rows]) for m, rows in log.items()}
    same = {m: mean([t == d[2] for (*_, t, _), d in zip(rows, log["dense"])]) for m, rows in log.items()}
    table, report = [], {"questions": len(log["dense"]), "density_f": args.density, "period": args.period,
                         "threshold": args.threshold, "strict": args.strict, "sparsity": {}}
    for s in sparsities:
        results = [r for *_, r in log[f"Sirius {s}"]]
        advances = [a for r in results for a in r.advances]
        aal = average_advance_length(advances) if advances else float("nan")
        cs_density = results[0].density
        eff = effective_density(cs_density, args.period, aal)
        lost = acc["dense"] - acc[f"CS {s}"]
        recovered = (acc[f"Sirius {s}"] - acc[f"CS {s}"]) / lost if lost > 0 else float("nan")
        table.append([s, f"{acc['dense']:.3f}", f"{acc[f'CS {s}']:.3f}", f"{cs_density:.3f}",
                      f"{acc[f'Sirius {s}']:.3f}", f"{aal:.2f}/{args.period}", f"{eff:.3f}",
                      f"{recovered:.0%}" if lost > 0 else "-"])
        report["sparsity"][s] = {"full": acc["dense"], "cs": acc[f"CS {s}"], "cs_density": cs_density,
                                 "sirius": acc[f"Sirius {s}"], "aal": aal, "effective_density": eff,
                                 "recovered": recovered}
    print(f"\n{len(log['dense'])} questions, f = {args.density}, K = {args.period}, threshold = {args.threshold}"
          f"{', strict' if args.strict else ''}")
    print_table(["sparsity", "full", "CS", "CS density", "Sirius", "AAL", "eff. density", "recovered"], table)
    print()
    print_table(["method", "accuracy", "full-model NLL", "same as dense"],
                [[m, f"{acc[m]:.3f}", f"{nll[m]:.3f}", f"{same[m]:.0%}"] for m in log])
    report["methods"] = {m: {"accuracy": acc[m], "nll": nll[m], "same_as_dense": same[m]} for m in log}
    return report


def write_json_atomically(path, obj):
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)


# --- bench: measured speed beside the ideal (bytes read) ratio ------------------------------------------

BENCH_PROMPT = "Explain step by step how a bicycle works, part by part, for a curious ten-year-old."


def gemv_ceilings(model, reps=5):
    """Two one-thread ceilings for a decode step, in GB/s: torch's matrix-vector product on one large
    (256 MB) matrix, and on this model's own matrices (every weight once, as one decode step reads them)."""
    dt, dev = model.embed.dtype, model.embed.device
    big = torch.randn(8192, 8192 * 32 // torch.finfo(dt).bits, dtype=dt, device=dev)
    mats = [w for L in model.layers for w in (L.wq, L.wk, L.wv, L.wo, L.w_gate, L.w_up)] + [model.lm_head]
    down = [L.w_down_t for L in model.layers]  # stored (D, h): multiplied from the left
    xs = {n: torch.randn(1, n, dtype=dt, device=dev) for n in {w.shape[1] for w in mats + [big]} | {down[0].shape[0]}}

    def model_step():
        for w in mats:
            torch.nn.functional.linear(xs[w.shape[1]], w)
        for w in down:
            xs[w.shape[0]] @ w
        return float(xs[down[0].shape[0]][0, 0])  # wait for the device

    def big_step():
        return float(torch.nn.functional.linear(xs[big.shape[1]], big)[0, 0])

    gbytes = lambda ws: sum(w.numel() * w.element_size() for w in ws) / 1e9  # noqa: E731
    return {"large matrix": gbytes([big]) / median_time(big_step, reps),
            "this model's matrices": gbytes(mats + down) / median_time(model_step, reps)}


def median_time(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[reps // 2]


def bench_mlp(hidden, intermediate, fractions=(0.75, 0.5, 0.25), dtype=torch.float32, reps=None, seconds=3.0,
              device="cpu"):
    """ms per decode-step MLP (T = 1; one thread on a CPU) for dense, fine and coarse at each kept fraction f.

    Random weights, as many layers (<= 64) as make 256 MB so that, as in a decode step, each layer's weights
    come from memory, not cache; a timing is one pass over all layers / their number. Every round times all
    variants back to back, so machine noise hits them alike; medians. reps=None: as many rounds as fit in
    `seconds` (5 to 300). Rows: mode, f, ms, ratio (to dense) and ideal (kernels.mlp_bytes_ratio).
    """
    g = torch.Generator().manual_seed(0)
    layers = min(64, -(-(256 << 20) // (3 * hidden * intermediate * torch.finfo(dtype).bits // 8)))
    ws = [[(0.02 * torch.randn(intermediate, hidden, generator=g)).to(device, dtype) for _ in range(3)]
          for _ in range(layers)]
    x = torch.randn(1, hidden, generator=g).to(device, dtype)
    prompt = torch.randn(16, hidden, generator=g).to(device, dtype)
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    cases = [("dense", 1.0, [lambda w=w: kernels.dense_mlp(x, *w) for w in ws])]
    for f in fractions:
        k = kernels.kept(intermediate, f)
        scores = [kernels.griffin_scores(kernels.swiglu(prompt, w[0], w[1])) for w in ws]
        sliced = [kernels.slice_mlp(*w, kernels.select_coarse(s, k)) for w, s in zip(ws, scores)]
        cases.append(("fine", f, [lambda w=w, k=k: kernels.fine_mlp(x, *w, k) for w in ws]))
        cases.append(("coarse", f, [lambda s=s: kernels.dense_mlp(x, *s) for s in sliced]))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        for *_, runs in cases:                                         # warm-up (first touch of every buffer)
            for run in runs:
                run()
        sync()
        reps = reps or max(5, min(300, int(seconds / (time.perf_counter() - start))))
        times = [[] for _ in cases]
        for _ in range(reps):
            for t, (*_, runs) in zip(times, cases):
                t0 = time.perf_counter()
                for run in runs:                                       # one decode step through all layers
                    run()
                sync()
                t.append((time.perf_counter() - t0) / layers)
    finally:
        torch.set_num_threads(threads)
    ms = [statistics.median(t) * 1e3 for t in times]
    return [dict(mode=m, f=f, ms=t, ratio=t / ms[0], ideal=kernels.mlp_bytes_ratio(f, m))
            for (m, f, _), t in zip(cases, ms)]


def decode_rows(model, prompt, n, args, rounds, with_sirius=True):
    """ms/token of dense, sparse and Sirius decoding, interleaved `rounds` times (medians), as table rows."""
    runs = {"dense": lambda: generate(model, prompt, n)}
    for s in ("fine", "coarse"):
        runs[f"CS {s}"] = lambda s=s: generate(model, prompt, n, (), s, args.density)
        if with_sirius:
            runs[f"Sirius {s}"] = lambda s=s: sirius(model, prompt, n, (), s, args.density, args.period, args.threshold)
    times, last = {m: [] for m in runs}, {}
    for _ in range(rounds):
        for m, run in runs.items():
            last[m] = run()
            times[m].append(last[m].ms_per_token)
    gbytes = kernels.param_count(model.cfg) * model.embed.element_size() / 1e9
    rows = []
    for m, res in last.items():
        ms = sorted(times[m])[len(times[m]) // 2]
        ideal = res.effective_density
        ratio = ms / sorted(times["dense"])[len(times["dense"]) // 2]
        rows.append([m, f"{ms:.1f}", f"{ratio:.3f}", f"{ideal:.3f}", f"{ratio / ideal:.2f}",
                     f"{res.aal:.2f}/{res.period}" if res.advances else "-", f"{gbytes * ideal / ms * 1e3:.1f}"])
    return rows


DECODE_HEADER = ["method", "ms/token", "ratio to dense", "ideal", "ratio / ideal", "AAL", "GB/s"]


def random_llama(cfg, device, dtype, seed=0):
    """A Llama with random weights (std 0.02), for timing shapes we have no checkpoint of."""
    g = torch.Generator().manual_seed(seed)
    h, D, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads * cfg.head_dim, \
        cfg.num_key_value_heads * cfg.head_dim
    r = lambda *shape: 0.02 * torch.randn(*shape, generator=g)  # noqa: E731
    w = {"embed": r(cfg.vocab_size, h), "lm_head": r(cfg.vocab_size, h), "norm": torch.ones(h)}
    for i in range(cfg.num_hidden_layers):
        w.update({f"layers.{i}.{n}": t for n, t in dict(
            attn_norm=torch.ones(h), mlp_norm=torch.ones(h), wq=r(q, h), wk=r(kv, h), wv=r(kv, h), wo=r(h, q),
            w_gate=r(D, h), w_up=r(D, h), w_down_t=r(D, h)).items()})
    return Llama(cfg, {k: v.to(device, dtype) for k, v in w.items()}, max_seq_len=256)


def bench(args):
    cfg, tok = open_model_folder(args)
    prompt = encode(args, tok, cfg, BENCH_PROMPT)
    n = 24 if args.quick else args.max_new_tokens
    model = load_weights(args, cfg, len(prompt))
    dtype = model.embed.dtype
    torch.set_num_threads(args.threads)
    print(f"{args.threads} thread(s), {dtype}, f = {args.density}, K = {args.period}, threshold = {args.threshold}; "
          f"{n} tokens per run, EOS ignored so every run decodes the same length")
    print(f"\n1. end-to-end decode, {Path(args.model).name} ({kernels.param_count(cfg) * model.embed.element_size() / 1e9:.2f} "
          f"GB of weights; GB/s = weights read per token / time)")
    rows = decode_rows(model, prompt, n, args, 1 if args.quick else 3)
    print_table(DECODE_HEADER, rows)
    for name, bw in gemv_ceilings(model).items():
        print(f"torch GEMV on {name}: {bw:.1f} GB/s; dense decode reaches {float(rows[0][-1]) / bw:.0%} of it")
    del model
    shapes = [(cfg.hidden_size, cfg.intermediate_size, Path(args.model).name)]
    if not args.quick:
        shapes.append((4096, 14336, "Llama-3-8B layer"))
    for h, D, name in shapes:
        print(f"\n2. MLP of one decode step, {name} (h {h}, D {D}): time / dense beside the bytes it must read")
        rows = bench_mlp(h, D, dtype=dtype, reps=3 if args.quick else None, device=args.device)
        print_table(["mode", "f", "ms", "ratio", "ideal", "ratio / ideal"],
                    [[r["mode"], r["f"], f"{r['ms']:.3f}", f"{r['ratio']:.3f}", f"{r['ideal']:.3f}",
                      f"{r['ratio'] / r['ideal']:.2f}"] for r in rows])
    if not args.quick:
        big = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=1, num_attention_heads=32,
                          num_key_value_heads=8, head_dim=128, vocab_size=128256 // 32, rope_theta=5e5)
        print("\n3. a Llama-3-8B-shaped decoder, 1 layer, random weights, vocabulary / 32 so embeddings weigh what "
              "they do per layer in the 8B model; Sirius with random weights has no meaningful AAL, so it is left out")
        m8 = random_llama(big, args.device, dtype)
        print_table(DECODE_HEADER, decode_rows(m8, torch.arange(32, device=args.device), 16, args, 3, with_sirius=False))
        one = median_time(lambda: float(m8(torch.tensor([5], device=args.device), 40)[0, 0]), 5)
        window = median_time(lambda: float(m8(torch.arange(args.period, device=args.device), 40)[0, 0]), 5)
        print(f"one full {args.period}-token verification pass costs {window / one:.2f} dense decode steps "
              f"(effective density assumes 1)")


# --- entry point ----------------------------------------------------------------------------------

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv and argv[0] in COMMANDS else "demo"
    args = build_parser(command).parse_args(argv[1:] if command != "demo" else argv)
    try:
        {"demo": demo, "eval": evaluate, "bench": bench}[command](args)
    except (UsageError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()

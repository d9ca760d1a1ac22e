"""sirius-min from the shell: watch contextual sparsity go wrong and Sirius put it right.

    python run.py                       # one reasoning prompt: dense, sparse, Sirius, and a table
    python run.py --prompt "..." --sirius --trace --sparsity coarse --keep 0.4 --width 4
    python run.py eval --limit 20       # the paper's table on a bundled arithmetic task (or --data GSM8K)
    python run.py bench                 # ms/token and MLP kernel times against their ideal ratios (bench.py)

A mistake in the command (a value out of range, a file of the wrong kind, a model folder, a prompt, a request
too big for the model's context or the memory) and output that cannot be written end in one `error:` line on
stderr and exit code 2, with nothing half-written on disk; Ctrl-C exits with 130; SIGTERM and SIGHUP clean
up, then end the process by the same signal; anything else is a bug and shows its traceback.
"""
import signal
import sys

if __name__ == "__main__":  # Ctrl-C while torch is still importing: leave as quietly as later on
    signal.signal(signal.SIGINT, lambda *_: sys.exit(130))
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `run.py | head` ends quietly, like other shell tools

import argparse  # noqa: E402
import io  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402

import torch  # noqa: E402

import bench  # noqa: E402
from bench import FEW_SHOT, decoding_options, print_table  # noqa: E402
from folder import UsageError, encode, load_weights, open_model_folder, read_prompt  # noqa: E402
from checkpoint import CheckpointError  # noqa: E402
from sirius_min import generate, sirius  # noqa: E402
from tracing import Trace, print_trace  # noqa: E402

DEMO_PROMPT = "Mia buys 4 packs of stickers with 6 stickers in each pack. How many stickers does she have?"


# --- what the command line accepts ----------------------------------------------------------------
# Every number a flag takes, with the values the code below can honour: (kind, lowest, highest, lowest
# excluded). argparse refuses the rest, nan and inf too. What depends on the model (its context, the memory)
# is checked once its config is read, before its weights: folder.encode and folder.load_weights.
NUMBERS = {
    "--threads": (int, 1, os.cpu_count() or 1, False),   # torch.set_num_threads crashes far above the cores
    "--keep": (float, 0, 1, True),             # f, a fraction of the MLP's neurons (at least one is kept)
    "--period": (int, 2, 1024, False),         # K: a full pass per K-1 drafts (and the context bounds it)
    "--width": (int, 1, 64, False),            # w: drafts per depth, 1 + (K-1)·w cache slots per window
    "--threshold": (float, 0, 1, False),       # a probability
    "--max-new-tokens": (int, 1, math.inf, False),  # the prompt and the answer fit the context (encode)
    "--limit": (int, 1, math.inf, False),      # more than the task holds: all of it
    "--temperature": (float, 0, math.inf, False),   # 0: greedy; not in (0, 0.01), see RULES
    "--top-p": (float, 0, 1, True),            # 1: off
    "--seed": (int, 0, 2 ** 64 - 1, False),    # what torch.Generator.manual_seed takes
}


def runs_sirius(a):  # the demo does not with --sparsity dense
    return a.command != "demo" or a.sparsity != "dense"


# Values refused together, before the model folder is read: (refused if, why).
RULES = [
    (lambda a: a.device == "cuda" and not torch.cuda.is_available(), "--device cuda: no CUDA device found"),
    (lambda a: a.device == "cpu" and a.dtype == "float16",
     "--dtype float16 is very slow in PyTorch's CPU products: use float32 or bfloat16"),
    (lambda a: a.compile and a.device == "cpu", "--compile is for CUDA: it captures CUDA graphs (--device "
     "cuda); on a CPU the eager path is the one this project measures and tunes"),
    (lambda a: 0 < a.temperature < 0.01, "--temperature: 0 (greedy) or at least 0.01 (below, sampling is "
     "greedy in all but name: softmax(logits / T) is one-hot but for near-ties)"),
    (lambda a: a.temperature > 0 and runs_sirius(a)
     and max([a.width] if a.command == "demo" else a.width) > 1,
     "sampling drafts a chain: --width 1 with --temperature > 0 (sampling from a tree is another algorithm)"),
    (lambda a: a.command == "demo" and a.sirius and a.sparsity == "dense",
     "--sirius needs a sparse model to correct: --sparsity fine or coarse"),
]


def number(kind, low, high=math.inf, low_open=False):
    """An argparse type: a number of `kind` in [low, high] ((low, high] if low_open), nan and inf refused."""
    def parse(s):
        try:
            x = kind(s)
        except ValueError:
            x = None
        if x is None or not (low < x if low_open else low <= x) or not x <= high or x == math.inf:
            where = f"{'(' if low_open else '['}{low}, {high}]" if high < math.inf else f">= {low}"
            raise argparse.ArgumentTypeError(f"expected a {'whole ' * (kind is int)}number {where}: {s!r}")
        return x
    return parse


def listed(parse=str, names=()):
    """An argparse type: comma-separated values, each parsed (and one of `names`, if given)."""
    def parse_all(s):
        values = [parse(x) for x in s.split(",")]
        if names and not set(values) <= set(names):
            raise argparse.ArgumentTypeError(f"expected one of {', '.join(names)}, comma-separated: {s!r}")
        return values
    return parse_all


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse would also print the whole usage)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)

    def exit(self, status=0, message=None):  # after --help: its text may fail to be written (see Stdout)
        sys.stdout.flush()
        super().exit(status, message)


def build_parser():
    """Three commands (demo is the default) sharing the model and sparsity options."""
    num = lambda flag: number(*NUMBERS[flag])  # noqa: E731
    shared = argparse.ArgumentParser(add_help=False)
    m = shared.add_argument_group("model")
    m.add_argument("--model", metavar="DIR", help="a Hugging Face Llama folder (default: SmolLM2)")
    m.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="(default: %(default)s)")
    m.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights and activations (default: float32 on cpu, bfloat16 on cuda)")
    m.add_argument("--threads", type=num("--threads"), default=1,
                   help=f"CPU threads, 1 to {NUMBERS['--threads'][2]} (1: clean ratios)")
    m.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                   help="render prompts with the folder's chat template, if it has one (default: on)")
    s = shared.add_argument_group("sparsity and Sirius")
    s.add_argument("--period", type=num("--period"), default=16, help="K: tokens per full check (16)")
    s.add_argument("--threshold", type=num("--threshold"), default=0.1,
                   help="keep a draft while the full model gives it at least this probability at "
                        "temperature 0.6 (0.1)")
    s.add_argument("--strict", action="store_true", help="keep a draft only if it is the full model's argmax "
                   "(with --temperature > 0: exact speculative sampling)")
    p = Parser(prog="run.py", description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n")[1],
               formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", parser_class=Parser)
    demo = commands.add_parser("demo", parents=[shared], help="(default) one prompt, three ways")
    ev = commands.add_parser("eval", parents=[shared], help="accuracy, AAL and effective density on a task")
    bench = commands.add_parser("bench", parents=[shared], help="decode speed beside ideal ratios")
    bench.set_defaults(temperature=0.0, top_p=1.0, seed=0, compile=False)  # bench decodes greedily, eagerly
    for c, sparsity, n in ((demo, "coarse", 128), (ev, "fine,coarse", 160), (bench, "fine,coarse", 128)):
        g = c.add_argument_group("what to run")
        if c is demo:
            g.add_argument("--sparsity", default=sparsity, choices=["dense", "fine", "coarse"],
                           help="fine: top-k per token; coarse: GRIFFIN, once per prompt (coarse)")
            g.add_argument("--keep", type=num("--keep"), default=0.5,
                           help="f: the kept fraction of MLP neurons (0.5)")
            g.add_argument("--width", type=num("--width"), default=1, help="w: tree width (1: a chain)")
        else:
            g.add_argument("--sparsity", type=listed(names=("fine", "coarse")), default=sparsity.split(","),
                           help=f"comma-separated: fine, coarse (default: {sparsity})")
            g.add_argument("--keep", type=listed(num("--keep")), default=[0.5],
                           help="comma-separated kept fractions f (default: 0.5)")
            g.add_argument("--width", type=listed(num("--width")), default=[1],
                           help="comma-separated tree widths w (default: 1)")
        g.add_argument("--max-new-tokens", type=num("--max-new-tokens"), default=n, help=f"(default: {n})")
        if c is bench:
            continue
        g.add_argument("--compile", action="store_true", help="CUDA only: replay every decode pass as a CUDA "
                       "graph (graphs.py; the first tokens wait for torch.compile)")
        g = c.add_argument_group("sampling (default: greedy, the paper's setting)")
        g.add_argument("--temperature", type=num("--temperature"), default=0.0, metavar="T",
                       help="0: greedy (default); else sample at T (at least 0.01; Sirius: --width 1)")
        g.add_argument("--top-p", type=num("--top-p"), default=1.0, metavar="P",
                       help="sample from the smallest set of likeliest tokens holding P of the mass (1: off)")
        g.add_argument("--seed", type=num("--seed"), default=0, metavar="S",
                       help="seeds each method's own generator, so a run reproduces (default: 0)")
    demo.add_argument("--prompt", default=DEMO_PROMPT, help="the prompt, or - to read it (UTF-8) from stdin")
    demo.add_argument("--few-shot", action=argparse.BooleanOptionalAction,
                      help="show eval's worked examples first (default: for the built-in prompt)")
    demo.add_argument("--sirius", action="store_true", help="Sirius only (default: dense, CS, Sirius)")
    demo.add_argument("--trace", action="store_true", help="after the answer, show every Sirius period")
    demo.add_argument("--no-color", action="store_true", help="plain text even on a terminal")
    ev.add_argument("--data", metavar="FILE.jsonl", help="GSM8K-format questions (default: the bundled task)")
    ev.add_argument("--limit", type=num("--limit"), help="use only the first N questions")
    ev.add_argument("--out", metavar="FILE.json", help="also write the results as JSON")
    bench.add_argument("--quick", action="store_true", help="a smoke test: one round, no Llama-3-8B shapes")
    return p


def printable(text):
    """User text for the terminal: control characters (escape codes) shown as escapes, not obeyed."""
    return "".join(c if c.isprintable() or c in "\n\t" else ascii(c)[1:-1] for c in text)


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
        new, self.text = printable(text[len(self.text):]), text
        if self.color:
            new = (FULL if from_full else DRAFT) + new + RESET
        print(new, end="", flush=True)


def demo(args):
    folder = open_model_folder(args)
    tok, eos, n = folder.tok, folder.stop_ids, args.max_new_tokens
    text = read_prompt(args.prompt)
    few_shot = args.prompt == DEMO_PROMPT if args.few_shot is None else args.few_shot
    prompt = encode(args, folder, text, FEW_SHOT if few_shot else ())
    model = load_weights(args, folder.cfg, len(prompt), sirius=runs_sirius(args))
    color, periods = sys.stdout.isatty() and not args.no_color, Trace()
    runs = [] if args.sirius else ["dense"] + [f"{args.sparsity} sparse"] * runs_sirius(args)
    runs += [f"Sirius ({args.sparsity}{f', w={args.width}' * (args.width > 1)})"] * runs_sirius(args)
    sampled = f"; sampled at T = {args.temperature}, top-p {args.top_p}, seed {args.seed}"
    print(f"prompt: {printable(text.strip())}" + f"  (after {len(FEW_SHOT)} worked examples)" * few_shot
          + sampled * (args.temperature > 0))
    rows = []
    for name in runs:
        print(f"\n--- {name} ---")
        opts = dict(eos_ids=eos, keep=args.keep, on_token=Printer(tok, color and name.startswith("Sirius")),
                    **decoding_options(args))
        if name.startswith("Sirius"):
            res = sirius(model, prompt, n, sparsity=args.sparsity, period=args.period, width=args.width,
                         threshold=args.threshold, strict=args.strict,
                         on_period=periods if args.trace else None, **opts)
        else:
            res = generate(model, prompt, n, sparsity=name.split()[0], **opts)
        print()
        rows.append((name, res))
    if color and args.sparsity != "dense":
        print(f"\n{DRAFT}green{RESET}: sparse drafts the full model kept; "
              f"{FULL}yellow{RESET}: tokens the full model wrote (first token, corrections, bonus tokens)")
    print()
    print_table(["method", "tokens", "ms/token", "density", "AAL", "periods", "eff. density", "corrections"],
                [[name, len(r.tokens), f"{r.ms_per_token:.1f}", f"{r.density:.3f}", *(
                    [f"{r.aal:.2f}/{r.period}", len(r.counted_advances), f"{r.effective_density:.3f}",
                     r.corrections] if r.period > 1 else ["-", "-", f"{r.density:.3f}", "-"])]
                 for name, r in rows])
    if args.trace and periods:
        print_trace(tok, periods, args, eos)


# --- entry point ----------------------------------------------------------------------------------

class Stdout(io.FileIO):
    """Standard output from the shell: a write that fails (a full disk, /dev/full, a terminal gone) is a
    UsageError, and the rest goes to /dev/null so that exiting does not fail on it again. (A closed pipe
    never gets here: SIGPIPE ends the process quietly.)"""

    def write(self, data):
        try:
            return super().write(data)
        except OSError as e:
            os.dup2(os.open(os.devnull, os.O_WRONLY), self.fileno())
            raise UsageError(f"cannot write the output ({e.strerror or e})") from None


def shell_stdout(out):
    """Standard output (`out`) as run.py writes it: through Stdout, and with text its encoding cannot spell
    (PYTHONIOENCODING=ascii, a C locale) shown escaped (\\xe9), not ending in a UnicodeEncodeError."""
    return io.TextIOWrapper(io.BufferedWriter(Stdout(out.fileno(), "w", closefd=False)), out.encoding,
                            "backslashreplace", line_buffering=out.line_buffering)


class Signalled(BaseException):
    """SIGTERM or SIGHUP, raised where the program was, so that `finally` blocks remove what is half-written
    (the first run's conversion, eval's --out); a BaseException, so no `except Exception` takes it."""


def unwind(signum, frame):
    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, signal.SIG_IGN)  # a second signal must not cut the cleanup short
    raise Signalled(signum)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in ("demo", "eval", "bench", "-h", "--help"):
        argv = ["demo", *argv]
    commands = {"demo": demo, "eval": bench.evaluate, "bench": bench.bench}  # the measurements: bench.py
    try:
        args = build_parser().parse_args(argv)
        for refused, why in RULES:
            if refused(args):
                raise UsageError(why)
        commands[args.command](args)
        sys.stdout.flush()  # output to a file is buffered: a full disk shows here
    except (UsageError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, unwind)
    if sys.stdout is None:  # started with standard output closed (`>&-`)
        print("error: cannot write the output (standard output is closed)", file=sys.stderr)
        sys.exit(2)
    sys.stdout = shell_stdout(sys.stdout)
    try:
        main()
    except Signalled as e:  # cleaned up: now end by the signal, so the parent sees what it sent
        signal.signal(e.args[0], signal.SIG_DFL)
        os.kill(os.getpid(), e.args[0])

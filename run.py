"""sirius-min from the shell: watch contextual sparsity go wrong and Sirius put it right.

    python run.py                       # one reasoning prompt: dense, sparse, Sirius, and a table
    python run.py --prompt "..." --sirius --trace --sparsity coarse --keep 0.4 --width 4
    python run.py eval --limit 20       # the paper's table on a bundled arithmetic task (or --data GSM8K)
    python run.py bench                 # ms/token and MLP kernel times against their ideal ratios (bench.py)

A mistake in the command (a flag, a file, a model folder, a prompt) ends in one `error:` line on stderr and
exit code 2, with nothing half-written on disk; Ctrl-C exits with 130; anything else is a bug and shows
its traceback.
"""
import signal
import sys

if __name__ == "__main__":  # Ctrl-C while torch is still importing: leave as quietly as later on
    signal.signal(signal.SIGINT, lambda *_: sys.exit(130))
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `run.py | head` ends quietly, like other shell tools

import argparse  # noqa: E402
import math  # noqa: E402

import bench  # noqa: E402
from bench import FEW_SHOT, print_table  # noqa: E402
from folder import UsageError, encode, load_weights, open_model_folder  # noqa: E402
from checkpoint import CheckpointError  # noqa: E402
from sirius_min import generate, sirius  # noqa: E402

DEMO_PROMPT = "Mia buys 4 packs of stickers with 6 stickers in each pack. How many stickers does she have?"


# --- arguments ------------------------------------------------------------------------------------

def number(kind, low, high=math.inf, low_open=False):
    """An argparse type: a number of `kind` in [low, high] ((low, high] if low_open), nan and inf refused."""
    def parse(s):
        try:
            x = kind(s)
        except ValueError:
            x = None
        if x is None or not (low < x if low_open else low <= x) or not x <= high or not math.isfinite(x):
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


def build_parser():
    """Three commands (demo is the default) sharing the model and sparsity options."""
    shared = argparse.ArgumentParser(add_help=False)
    m = shared.add_argument_group("model")
    m.add_argument("--model", metavar="DIR", help="a Hugging Face Llama folder (default: SmolLM2)")
    m.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="(default: %(default)s)")
    m.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights and activations (default: float32 on cpu, bfloat16 on cuda)")
    m.add_argument("--threads", type=number(int, 1), default=1, help="CPU threads (1: clean ratios)")
    m.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                   help="render prompts with the folder's chat template, if it has one (default: on)")
    s = shared.add_argument_group("sparsity and Sirius")
    s.add_argument("--period", type=number(int, 2, 1024), default=16, help="K: tokens per full check (16)")
    s.add_argument("--threshold", type=number(float, 0, 1), default=0.1,
                   help="keep a draft while the full model gives it at least this probability (0.1)")
    s.add_argument("--strict", action="store_true", help="keep a draft only if it is the full model's argmax")
    p = Parser(prog="run.py", description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n")[1],
               formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", parser_class=Parser)
    demo = commands.add_parser("demo", parents=[shared], help="(default) one prompt, three ways")
    ev = commands.add_parser("eval", parents=[shared], help="accuracy, AAL and effective density on a task")
    bench = commands.add_parser("bench", parents=[shared], help="decode speed beside ideal ratios")
    for c, sparsity, n in ((demo, "coarse", 128), (ev, "fine,coarse", 160), (bench, "fine,coarse", 128)):
        g = c.add_argument_group("what to run")
        if c is demo:
            g.add_argument("--sparsity", default=sparsity, choices=["dense", "fine", "coarse"],
                           help="fine: top-k per token; coarse: GRIFFIN, once per prompt (coarse)")
            g.add_argument("--keep", type=number(float, 0, 1, True), default=0.5,
                           help="f: the kept fraction of MLP neurons (0.5)")
            g.add_argument("--width", type=number(int, 1, 64), default=1, help="w: tree width (1: a chain)")
        else:
            g.add_argument("--sparsity", type=listed(names=("fine", "coarse")), default=sparsity.split(","),
                           help=f"comma-separated: fine, coarse (default: {sparsity})")
            g.add_argument("--keep", type=listed(number(float, 0, 1, True)), default=[0.5],
                           help="comma-separated kept fractions f (default: 0.5)")
            g.add_argument("--width", type=listed(number(int, 1, 64)), default=[1],
                           help="comma-separated tree widths w (default: 1)")
        g.add_argument("--max-new-tokens", type=number(int, 1), default=n, help=f"(default: {n})")
    demo.add_argument("--prompt", default=DEMO_PROMPT, help="the prompt, or - to read it (UTF-8) from stdin")
    demo.add_argument("--few-shot", action=argparse.BooleanOptionalAction,
                      help="show eval's worked examples first (default: for the built-in prompt)")
    demo.add_argument("--sirius", action="store_true", help="Sirius only (default: dense, CS, Sirius)")
    demo.add_argument("--trace", action="store_true", help="after the answer, show every Sirius period")
    demo.add_argument("--no-color", action="store_true", help="plain text even on a terminal")
    ev.add_argument("--data", metavar="FILE.jsonl", help="GSM8K-format questions (default: the bundled task)")
    ev.add_argument("--limit", type=number(int, 1), help="use only the first N questions")
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
    tok = folder.tok
    if args.sirius and args.sparsity == "dense":
        raise UsageError("--sirius needs a sparse model to correct: --sparsity fine or coarse")
    text = args.prompt
    if text == "-":
        try:
            text = sys.stdin.buffer.read().decode("utf-8")
        except UnicodeDecodeError:
            raise UsageError("the prompt on stdin is not valid UTF-8") from None
    text = text.removeprefix("\ufeff")  # a byte-order mark some editors put first is not part of the prompt
    few_shot = args.prompt == DEMO_PROMPT if args.few_shot is None else args.few_shot
    prompt = encode(args, folder, text, FEW_SHOT if few_shot else ())
    model = load_weights(args, folder.cfg, len(prompt))
    color, eos, periods = sys.stdout.isatty() and not args.no_color, folder.stop_ids, []
    n, opts = args.max_new_tokens, dict(eos_ids=eos, sparsity=args.sparsity, keep=args.keep)
    runs = [] if args.sirius else [("dense", lambda cb: generate(model, prompt, n, eos_ids=eos, on_token=cb))]
    if not args.sirius and args.sparsity != "dense":
        runs.append((f"{args.sparsity} sparse", lambda cb: generate(model, prompt, n, **opts, on_token=cb)))
    if args.sparsity != "dense":
        runs.append((f"Sirius ({args.sparsity}{f', w={args.width}' * (args.width > 1)})", lambda cb: sirius(
            model, prompt, n, **opts, period=args.period, width=args.width,
            threshold=args.threshold, strict=args.strict, on_token=cb,
            on_period=periods.append if args.trace else None)))
    print(f"prompt: {printable(text.strip())}" + f"  (after {len(FEW_SHOT)} worked examples)" * few_shot)
    rows = []
    for name, go in runs:
        print(f"\n--- {name} ---")
        res = go(Printer(tok, color and name.startswith("Sirius")))
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


def print_trace(tok, periods, args, eos, width=104):
    """One block per period: t0 and the drafts of the chosen path, each draft's probability under the full
    model at temperature 0.6, a bar where the kept run ends, and what the full model appended."""
    rule = "argmax" if args.strict else f"threshold {args.threshold}"
    print(f"\nSirius, period by period ({rule}; | marks the end of the kept drafts)")
    for n, p in enumerate(periods, 1):
        kind = "bonus" if p.accepted == len(p.window) - 1 else "correction"
        beams = f"; beam {p.chosen + 1}/{len(p.beams)}, kept per beam {p.beams}" if len(p.beams) > 1 else ""
        show = lambda t: printable(repr(tok.decode([t], skip_special_tokens=False)))  # noqa: E731
        stop = next((t for t in p.window[1:p.accepted + 1] if t in eos), None)
        then = f"stopped at {show(stop)}" if stop is not None else f"then {show(p.appended)} ({kind})"
        print(f"\nperiod {n}, position {p.pos}: kept {p.accepted}/{len(p.window) - 1}, {then}{beams}")
        cells = [(show(t), "t0" if i == 0 else f"{p.probs[i - 1]:.3f}")
                 for i, t in enumerate(p.window)]
        cells.insert(p.accepted + 1, ("|", "|"))
        lines, line = [], []
        for cell in cells:
            if line and sum(max(map(len, c)) + 2 for c in line + [cell]) > width:  # 2 spaces before each
                lines.append(line)
                line = []
            line.append(cell)
        for line in lines + [line]:
            w = [max(map(len, c)) for c in line]
            print("  " + "  ".join(c[0].ljust(x) for c, x in zip(line, w)).rstrip())
            print("  " + "  ".join(c[1].ljust(x) for c, x in zip(line, w)).rstrip())


# --- entry point ----------------------------------------------------------------------------------

def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in ("demo", "eval", "bench", "-h", "--help"):
        argv = ["demo", *argv]
    args = build_parser().parse_args(argv)
    commands = {"demo": demo, "eval": bench.evaluate, "bench": bench.bench}  # the measurements: bench.py
    try:
        commands[args.command](args)
    except (UsageError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()

"""Eager CPU decoding speed of this checkout against another revision, measured in one run.

    python tests/speed_against.py REV [--rounds 6] [--tokens 48] [--reps 3] [--methods 'sirius fine' ...]

REV is checked out into a temporary git worktree. Each round runs the same requests (SmolLM2-135M, fp32, one
thread; the demo's question, run.py's DEMO_PROMPT copied here, encoded as raw text: no chat template, no
few-shot examples; dense, coarse and fine plain decoding, fine and coarse Sirius) in each checkout, in a
fresh process each, alternating which goes first, so the machine's noise falls on both alike; a process times
each method `--reps` times after a warm-up and keeps the fastest. Prints, per method, the median over rounds
of each, new / old (below 1: this checkout is faster) with the range of the rounds' paired ratios, and
whether both gave the same tokens. Uses only sirius_min's generate() and sirius(), checkpoint.load_model,
convert_gguf.default_model_dir and the tokenizers package reading the folder's tokenizer.json, which both
checkouts must have.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METHODS = [("generate", "dense"), ("generate", "coarse"), ("generate", "fine"), ("sirius", "fine"),
           ("sirius", "coarse")]
PROMPT = "Mia buys 4 packs of stickers with 6 stickers in each pack. How many stickers does she have?"

# Run inside a checkout (its own cache of the embedded model: revisions may stamp it differently).
CHILD = """
import json, sys, torch
torch.set_num_threads(1)
import sirius_min
from checkpoint import load_model
from convert_gguf import default_model_dir
from tokenizers import Tokenizer
folder = default_model_dir()                                    # converts it on the first round
prompt = torch.tensor(Tokenizer.from_file(str(folder / "tokenizer.json")).encode({prompt!r}).ids)
model = load_model(folder, 512)
out = {{}}
for method, sparsity in {methods!r}:
    run = getattr(sirius_min, method)
    run(model, prompt, 8, sparsity=sparsity)                                     # warm-up
    results = [run(model, prompt, {tokens}, sparsity=sparsity) for _ in range({reps})]
    out[method + " " + sparsity] = [min(r.ms_per_token for r in results), results[0].tokens]  # least noisy
print(json.dumps(out))
"""


def measure(checkout, cache, tokens, methods, reps):
    code = CHILD.format(prompt=PROMPT, methods=methods, tokens=tokens, reps=reps)
    env = {**os.environ, "SIRIUS_MIN_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=checkout, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"error: the run in {checkout} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def positive(text):
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.error = lambda message: p.exit(2, f"error: {message}\n")          # one line, no usage block
    p.add_argument("rev", help="the revision to compare with (a commit, a tag, a branch)")
    p.add_argument("--rounds", type=positive, default=6)
    p.add_argument("--tokens", type=positive, default=48)
    p.add_argument("--reps", type=positive, default=3,
                   help="timed runs of a method in a process (the fastest counts)")
    p.add_argument("--methods", nargs="+", choices=[f"{m} {s}" for m, s in METHODS],
                   metavar="'METHOD SPARSITY'",
                   help="only these, e.g. 'sirius fine' (default: all five)")
    args = p.parse_args()
    methods = [m for m in METHODS if args.methods is None or f"{m[0]} {m[1]}" in args.methods]
    known = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", "-q", args.rev + "^{commit}"],
                           capture_output=True)
    if known.returncode:
        p.exit(2, f"error: {args.rev!r} is not a commit of this repository\n")
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "old"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(old), args.rev],
                       check=True)
        try:
            caches = {"old": Path(tmp) / "old-cache", "new": Path(tmp) / "new-cache"}
            runs = {"old": [], "new": []}
            for r in range(args.rounds):
                order = [("old", old), ("new", ROOT)][:: 1 if r % 2 == 0 else -1]
                for name, checkout in order:
                    runs[name].append(measure(checkout, caches[name], args.tokens, methods, args.reps))
                print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], check=True)
    print(f"ms/token, medians over {args.rounds} rounds of the fastest of {args.reps} runs, SmolLM2-135M "
          f"fp32, one thread, {args.tokens} tokens; old = {args.rev}, new = this checkout")
    print(f"{'method':<16} {'old':>7} {'new':>7} {'new / old':>10}  {'per round':>11}  same tokens")
    for key in runs["new"][0]:
        old_ms = statistics.median(run[key][0] for run in runs["old"])
        new_ms = statistics.median(run[key][0] for run in runs["new"])
        same = all(run[key][1] == runs["new"][0][key][1] for run in runs["old"] + runs["new"])
        paired = [n[key][0] / o[key][0] for o, n in zip(runs["old"], runs["new"])]     # new / old, each round
        spread = f"{min(paired):.2f}-{max(paired):.2f}"
        print(f"{key:<16} {old_ms:7.2f} {new_ms:7.2f} {new_ms / old_ms:10.3f}  {spread:>11}  "
              f"{'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()

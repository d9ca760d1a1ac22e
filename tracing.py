"""Sirius period by period: each verification read back from the device, and printed (`run.py --trace`).

sirius_min.sirius(..., on_period=fn) hands fn, after each verification, what the period computed on the
device: the tree, the full model's logits over it, each path's a (drafts kept), the chosen path. Nothing is
read back unless someone asks, so the hot path keeps its one host sync a period; `Trace` asks, after every
period.
(Not named trace.py: that is a module of Python's standard library.)
"""
from dataclasses import dataclass

import sirius_min


@dataclass
class PeriodTrace:
    """One verification: the chosen path and what the full model made of it."""
    pos: int             # the cache slot (and position) of t0
    window: list         # t0, then the chosen path's drafts d_1..d_{K-1}
    probs: list          # the full model's p(d_i) at the acceptance temperature 0.6
    accepted: int        # a: drafts kept
    appended: int        # the full model's token after them: a correction if a < K-1, else a bonus
    beams: list          # a of each of the w paths (one entry for a chain)
    chosen: int          # index of the chosen path
    rule: str            # "threshold", "argmax" or "speculative"
    target_probs: list | None = None   # speculative: p(d_i), the full model at the sampling temperature
    draft_probs: list | None = None    # speculative: q(d_i), the sparse model that drafted it


class Trace(list):
    """on_period= for sirius(): reads each period back into a PeriodTrace and keeps it (a list of them)."""

    def __call__(self, *, pos, tree, logits, path, accepted, chosen, appended, p_full, rule):
        drafts = tree.tokens[path[1:]]                                   # (K-1,) along the chosen path
        beams = accepted.tolist()
        p06 = sirius_min.acceptance_probs(logits, tree.parent, tree.tokens)[path[1:]]   # at each parent
        period = PeriodTrace(pos, tree.tokens[path].tolist(), p06.tolist(), beams[chosen], appended, beams,
                             chosen, rule)
        if rule == "speculative":
            period.target_probs = p_full[path[:-1], drafts].tolist()
            period.draft_probs = tree.draft_probs[path[1:], drafts].tolist()
        self.append(period)


RULE = {  # the trace's header: how a draft was judged
    "threshold": "the paper's rule: a draft is kept while the full model gives it p >= {threshold} at "
                 "temperature 0.6",
    "argmax": "strict: a draft is kept while it is the full model's argmax (p: its probability at 0.6)",
    "speculative": "strict, sampled: a draft is kept with probability min(1, p/q), p and q its probability "
                   "at T = {temperature}\nunder the full and the sparse model (exact speculative sampling)"}


def rejected(p, threshold):
    """Why the first draft after the kept ones failed its rule (i: its index among the drafts)."""
    i = p.accepted
    if p.rule == "threshold":  # 4 digits: 0.0999 must not read as 0.100 < 0.1
        return f"p {p.probs[i]:.4g} < {threshold}"
    if p.rule == "argmax":
        return "not the full model's argmax"
    return f"rejected with probability 1 - p/q = {1 - p.target_probs[i] / p.draft_probs[i]:.3f}"


def print_trace(tok, periods, args, eos, width=104):
    """One block per period: t0 and the drafts of the chosen path with what the rule judged each by, a bar
    where the kept run ends, why the next draft was rejected, and what the full model appended."""
    print("\nSirius, period by period (| marks the end of the kept drafts)\n"
          + RULE[periods[0].rule].format(**vars(args)))
    for n, p in enumerate(periods, 1):
        kind = "bonus" if p.accepted == len(p.window) - 1 else "correction" if p.appended != p.window[
            p.accepted + 1] else "rejected; the full model's token is the draft itself"  # a flat p
        beams = f"; beam {p.chosen + 1}/{len(p.beams)}, kept per beam {p.beams}" if len(p.beams) > 1 else ""
        show = lambda t: repr(tok.decode([t], skip_special_tokens=False))  # noqa: E731 (escapes controls)
        stop = next((t for t in p.window[1:p.accepted + 1] if t in eos), None)
        then = f"stopped at {show(stop)}" if stop is not None else f"then {show(p.appended)} ({kind})"
        print(f"\nperiod {n}, position {p.pos}: kept {p.accepted}/{len(p.window) - 1}, {then}{beams}")
        judged = ([(f"p {x:.3f}", f"q {y:.3f}") for x, y in zip(p.target_probs, p.draft_probs)]
                  if p.rule == "speculative" else [(f"{x:.3f}",) for x in p.probs])  # what the rule read
        cells = [(show(t), *j) for t, j in zip(p.window, [("t0", "", "")[:len(judged[0])]] + judged)]
        cells.insert(p.accepted + 1, ("|",) * len(cells[0]))
        lines, line = [], []
        for cell in cells:
            if line and sum(max(map(len, c)) + 2 for c in line + [cell]) > width:  # 2 spaces before each
                lines.append(line)
                line = []
            line.append(cell)
        for line in lines + [line]:
            w = [max(map(len, c)) for c in line]
            for row in range(len(cells[0])):
                print("  " + "  ".join(c[row].ljust(x) for c, x in zip(line, w)).rstrip())
        if kind != "bonus" and stop is None:
            print(f"  draft {show(p.window[p.accepted + 1])}: {rejected(p, args.threshold)}")

"""Where a sampled thread spent its time: the folded stacks a server wrote with
`--dualpath-stack-sample FILE` (sglang_plugin/stack_sampler.py), summarized.

  python -m dualpath.bench.stacks FILE [--top 25] [--match scheduler.py]

Prints the share of samples per function as the innermost frame ("self") and anywhere on the
stack ("inclusive", counted once per sample), functions named `file:function` (lines merged).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path


def read_folded(path: Path) -> Counter[str]:
    """stack -> samples, from `root;...;leaf count` lines (bad lines are an error)."""
    out: Counter[str] = Counter()
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            raise ValueError(f"{path}:{i}: expected 'frame;frame;... count', got {line!r}")
        out[stack] += int(n)
    return out


def window(after: Counter[str], before: Counter[str]) -> Counter[str]:
    """The samples taken between two reads of the same (cumulative) file."""
    return Counter({k: n - before.get(k, 0) for k, n in after.items()
                    if n - before.get(k, 0) > 0})


def write_folded(stacks: Counter[str], path: Path) -> None:
    path.write_text("".join(f"{k} {n}\n" for k, n in stacks.most_common()))


def _func(frame: str) -> str:
    return frame.rsplit(":", 1)[0] if frame.count(":") >= 2 else frame


def summarize(stacks: Counter[str], match: str = "") -> tuple[int, Counter, Counter]:
    """(samples, self counts, inclusive counts) per function; with `match`, only the samples
    whose stack contains it."""
    total, self_c, incl = 0, Counter(), Counter()
    for stack, n in stacks.items():
        if match and match not in stack:
            continue
        frames = [_func(f) for f in stack.split(";")]
        total += n
        self_c[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    return total, self_c, incl


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("file", type=Path)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--match", default="", help="only samples whose stack contains this")
    args = ap.parse_args(argv)
    try:
        total, self_c, incl = summarize(read_folded(args.file), args.match)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not total:
        print("no samples")
        return 1
    print(f"{total} samples")
    for title, c in (("self (innermost frame)", self_c), ("inclusive", incl)):
        print(f"\n{title}:")
        for f, n in c.most_common(args.top):
            print(f"  {100 * n / total:6.2f}%  {n:8d}  {f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`python -m dualpath.sim bounds --g 8 --s 1 [--mem-over-storage 10]`: the paper's
bottleneck-free P:D range for a cluster shape, which resource sets it, and small node ratios
inside it. (Trace-driven advice needs the simulator, which is not built yet.)"""

from __future__ import annotations

import argparse
from fractions import Fraction

from dualpath.sim.bounds import as_fraction, pd_bounds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dualpath.sim", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bounds", help="bottleneck-free P:D range (paper §4.2)")
    b.add_argument("--g", type=int, required=True, help="GPUs (compute NICs) per node")
    b.add_argument("--s", type=float, required=True,
                   help="node storage bandwidth / one compute NIC's bandwidth")
    b.add_argument("--mem-over-storage", type=float,
                   help="node memory bandwidth / node storage bandwidth (M / Bs)")
    b.add_argument("--max-nodes", type=int, default=8, help="largest P or D to list")
    args = ap.parse_args(argv)
    try:
        r = pd_bounds(args.g, args.s, args.mem_over_storage)
    except ValueError as e:
        ap.error(str(e))
    print(f"P/D range: {as_fraction(r.lower)} ({r.lower:.3f}) .. {as_fraction(r.upper)} "
          f"({r.upper:.3f}); set by {r.binding()}")
    for name, v in sorted(r.limits.items(), key=lambda kv: kv[1]):
        print(f"  upper bound from {name}: {v:.3f}")
    if not r.feasible:
        print("no P:D ratio avoids every bottleneck for this shape")
        return 1
    ratios = sorted({Fraction(p, d) for p in range(1, args.max_nodes + 1)
                     for d in range(1, args.max_nodes + 1) if r.admits(p, d)})
    print("node ratios inside:", ", ".join(f"{x.numerator}P{x.denominator}D" for x in ratios))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

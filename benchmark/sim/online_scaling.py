#!/usr/bin/env python3
"""Online capacity in the simulator: the highest agent arrival rate (APS) each cluster serves
within the SLO, for the basic baseline and DualPath, over cluster sizes; and the paper's
large-scale check (Table 3): the smallest cluster at its capacity vs 22x the nodes at 22x the
rate (paper: 2P4D at 0.4 APS vs 44P88D at 8.8 APS, near-equal TTFT and TPOT).

Method, as the paper's §7.8 and compare_1p1d's online runs: agents arrive as a Poisson process
and each replays its whole trajectory (no tool time); a rate is within the SLO when mean TTFT
<= 4 s and mean TPOT <= 50 ms over all its turns. Capacity is found by bisection on the rate,
each cluster's search starting from the smallest cluster's capacity scaled by its node count.
The trajectories are cut to --max-turns and arrivals last --duration-s, so each run reaches a
steady state in minutes of simulated time (the cut is stated in every row). Engine speeds:
--perf (calibrate's output) or the defaults, which are not calibrated: the shape (capacity
linear in nodes; DualPath vs basic), not the absolute APS, is the result.

  python benchmark/sim/online_scaling.py [--clusters 2x4,4x8,8x16] [--big] [--perf M.json]
      [--out FILE.jsonl] [--plot FILE.png]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
try:
    import dualpath  # noqa: F401
except ImportError:
    sys.path.insert(0, str(ROOT / "python"))

from dualpath.bench.compare_1p1d import make_trace  # noqa: E402
from dualpath.sim.capacity import max_aps, within_slo  # noqa: E402
from dualpath.sim.des import simulate  # noqa: E402
from dualpath.sim.model import PerfModel, SimCluster  # noqa: E402
from dualpath.version import git_sha  # noqa: E402


def run(p: int, d: int, policy: str, aps: float, args, perf) -> dict:
    agents = max(1, round(aps * args.duration_s))
    trajs = make_trace(argparse.Namespace(preset=args.preset, scale=1.0, initial=None,
                                          agents=agents, max_turns=args.max_turns),
                       aps, seed=args.seed)
    t0 = time.perf_counter()
    r = simulate(SimCluster(p, d, policy=policy, schedule_interval_s=args.schedule_interval_s),
                 perf, trajs, online=True)
    ok = within_slo(r.ttft_mean, r.tpot_mean)
    row = {"prefill_nodes": p, "decode_nodes": d, "policy": policy, "aps": round(aps, 4),
           "agents": agents, "max_turns": args.max_turns, "duration_s": args.duration_s,
           "turns": r.turns, "ttft_mean": round(r.ttft_mean, 3), "ttft_p90": round(r.ttft_p90, 3),
           "tpot_mean": round(r.tpot_mean, 4), "slo_attainment": round(r.slo_attainment, 3),
           "storage_busy_pe": round(r.storage_busy_pe, 3),
           "storage_busy_de": round(r.storage_busy_de, 3), "within_slo": ok,
           "sim_wall_s": round(time.perf_counter() - t0, 1)}
    print(f"{p}P{d}D {policy:8} {aps:7.3f} APS {agents:6d} agents: TTFT mean "
          f"{r.ttft_mean:7.2f} s p90 {r.ttft_p90:7.2f} s, TPOT {1e3 * r.tpot_mean:5.1f} ms, "
          f"storage busy {r.storage_busy_pe:.2f}/{r.storage_busy_de:.2f} -> "
          f"{'within' if ok else 'over'} ({row['sim_wall_s']} s)", flush=True)
    return row


def capacity(p: int, d: int, policy: str, guess: float, args, perf, emit) -> float:
    """Highest APS within the SLO, to --tolerance (dualpath.sim.capacity.max_aps)."""
    return max_aps(lambda aps: emit(run(p, d, policy, aps, args, perf))["within_slo"], guess,
                   args.tolerance)


def plot(caps: dict, path: Path, caption: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for policy, marker in (("basic", "o"), ("dualpath", "s")):
        pts = sorted((p, c) for (p, _, pol), c in caps.items() if pol == policy)
        if pts:
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker=marker, label=policy)
            x0, y0 = pts[0]
            ax.plot([x for x, _ in pts], [y0 * x / x0 for x, _ in pts], ls=":", color="gray")
    ax.set_xlabel("prefill nodes (P:D = 1:2, 8 GPUs per node)")
    ax.set_ylabel("max APS within SLO")
    ax.set_title(caption, fontsize=7)
    ax.legend(title="dotted: linear from the smallest")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clusters", default="2x4,4x8,8x16", help="PxD node counts")
    ap.add_argument("--policies", default="basic,dualpath")
    ap.add_argument("--preset", default="64k")
    ap.add_argument("--max-turns", type=int, default=40)
    ap.add_argument("--duration-s", type=float, default=900.0, help="seconds of arrivals")
    ap.add_argument("--guess", type=float, default=0.5, help="first APS tried (smallest)")
    ap.add_argument("--tolerance", type=float, default=0.08)
    ap.add_argument("--big", action="store_true",
                    help="also 44P88D at 22x the smallest cluster's capacity (Table 3)")
    ap.add_argument("--perf", type=Path)
    ap.add_argument("--schedule-interval-s", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--plot", type=Path)
    args = ap.parse_args(argv)
    perf = PerfModel.load(args.perf) if args.perf else PerfModel()
    meta = {"date": time.strftime("%Y-%m-%d"), "git_sha": git_sha(), "cores": os.cpu_count(),
            "preset": args.preset, "perf": asdict(perf), "calibrated": bool(args.perf)}

    def emit(row: dict) -> dict:
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps({**row, **meta}) + "\n")
        return row

    clusters = [tuple(int(x) for x in c.split("x")) for c in args.clusters.split(",")]
    caps: dict[tuple[int, int, str], float] = {}
    for policy in args.policies.split(","):
        first = None
        for p, d in clusters:
            guess = args.guess if first is None else first[1] * p / first[0]
            c = capacity(p, d, policy, guess, args, perf, emit)
            caps[(p, d, policy)] = c
            first = first or (p, c)
            emit({"summary": "capacity", "prefill_nodes": p, "decode_nodes": d,
                  "policy": policy, "max_aps_within_slo": round(c, 4)})
    print("\ncapacity (max APS within SLO):")
    for (p, d, policy), c in sorted(caps.items()):
        base = caps.get((p, d, "basic"))
        ratio = f"  {c / base:.2f}x basic" if base and policy != "basic" else ""
        print(f"  {p}P{d}D {policy:8} {c:7.3f}{ratio}")
    if args.big:
        (p0, d0), pol = clusters[0], args.policies.split(",")[-1]
        c0 = caps[(p0, d0, pol)]
        small = run(p0, d0, pol, c0, args, perf)
        big = run(22 * p0, 22 * d0, pol, 22 * c0, args, perf)
        emit({"summary": "table3", "policy": pol, "small": small, "big": big})
        print(f"\n{p0}P{d0}D at {c0:.3f} APS vs {22 * p0}P{22 * d0}D at {22 * c0:.3f} APS: TTFT "
              f"{small['ttft_mean']:.2f} vs {big['ttft_mean']:.2f} s, TPOT "
              f"{1e3 * small['tpot_mean']:.1f} vs {1e3 * big['tpot_mean']:.1f} ms")
    if args.plot:
        plot(caps, args.plot, f"simulated, {args.preset} trace cut to {args.max_turns} turns, "
                              f"{'calibrated' if args.perf else 'default'} engine speeds, "
                              f"{meta['date']} {meta['git_sha']}")
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

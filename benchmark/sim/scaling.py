#!/usr/bin/env python3
"""The paper's scaling shape in the simulator: offline JCT of 2P4D with N agents vs 48P96D with
24 N agents (the paper: near-equal JCT), for the basic baseline and DualPath, plus the wall time
of each simulation on this machine. Engine speeds: --perf (calibrate's output) or the defaults
(not calibrated: the shape, not the seconds, is the result).

  python benchmark/sim/scaling.py [--agents 2000] [--big] [--perf MODEL.json] [--out FILE.jsonl]
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
try:  # the installed package (with its native module _C) over the source tree
    import dualpath  # noqa: F401
except ImportError:  # a checkout without an install
    sys.path.insert(0, str(ROOT / "python"))

from dualpath.bench.trace import PRESETS, generate  # noqa: E402
from dualpath.sim.des import simulate  # noqa: E402
from dualpath.sim.model import PerfModel, SimCluster  # noqa: E402
from dualpath.version import git_sha  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--agents", type=int, default=2000, help="agents of the 2P4D run")
    ap.add_argument("--preset", default="64k")
    ap.add_argument("--big", action="store_true", help="also 48P96D with 24x the agents")
    ap.add_argument("--policies", default="basic,dualpath")
    ap.add_argument("--perf", type=Path)
    ap.add_argument("--schedule-interval-s", type=float, default=0.05)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--plot", type=Path, help="PNG of the JCT per cluster and policy")
    ap.add_argument("--plot-from", type=Path,
                    help="plot the rows of an earlier --out file instead of simulating")
    args = ap.parse_args()
    if args.plot_from:
        rows = [json.loads(x) for x in args.plot_from.read_text().splitlines() if x.strip()]
        plot(rows, args.plot or args.plot_from.with_suffix(".png"))
        return 0
    perf = PerfModel.load(args.perf) if args.perf else PerfModel()
    shapes = [(2, 4, args.agents)] + ([(48, 96, 24 * args.agents)] if args.big else [])
    meta = {"date": time.strftime("%Y-%m-%d"), "git_sha": git_sha(), "cores": os.cpu_count(),
            "preset": args.preset, "perf": asdict(perf),
            "schedule_interval_s": args.schedule_interval_s}
    rows = []
    for p, d, n in shapes:
        t0 = time.time()
        trajs = generate(PRESETS[args.preset], n, seed=0)
        gen_s = time.time() - t0
        for policy in args.policies.split(","):
            t0 = time.time()
            r = simulate(SimCluster(p, d, policy=policy,
                                    schedule_interval_s=args.schedule_interval_s), perf, trajs)
            row = {"prefill_nodes": p, "decode_nodes": d, "agents": n, "policy": policy,
                   **asdict(r), "sim_wall_s": round(time.time() - t0, 1),
                   "trace_gen_s": round(gen_s, 1), **meta}
            print(f"{p}P{d}D {n} agents {policy}: JCT {r.jct_s:.0f} s, {r.turns} turns, "
                  f"storage busy PE {r.storage_busy_pe:.2f} DE {r.storage_busy_de:.2f}, "
                  f"simulated in {row['sim_wall_s']} s", flush=True)
            rows.append(row)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
    if args.plot:
        plot(rows, args.plot)
    return 0


def plot(rows: list[dict], path: Path) -> None:
    """Offline JCT per cluster (agents in the label), one bar per policy: the paper's shape is
    equal bars across clusters, DualPath's lower than basic's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clusters = sorted({(r["prefill_nodes"], r["decode_nodes"], r["agents"]) for r in rows})
    policies = sorted({r["policy"] for r in rows})
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    width = 0.8 / max(1, len(policies))
    for k, pol in enumerate(policies):
        jct = [next((r["jct_s"] for r in rows if (r["prefill_nodes"], r["decode_nodes"],
                                                    r["agents"]) == c and r["policy"] == pol), 0)
               for c in clusters]
        ax.bar([i + k * width for i in range(len(clusters))], jct, width, label=pol)
    ax.set_xticks([i + width * (len(policies) - 1) / 2 for i in range(len(clusters))],
                  [f"{p}P{d}D\n{n:,} agents" for p, d, n in clusters])
    ax.set_ylabel("simulated offline JCT (s)")
    r0 = rows[0]
    speeds = (r0.get("perf") or {}).get("source", "?")
    ax.set_title(f"{r0.get('preset')} trace, engine speeds: {speeds}, {r0.get('date')} "
                 f"{r0.get('git_sha')}", fontsize=7)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    raise SystemExit(main())

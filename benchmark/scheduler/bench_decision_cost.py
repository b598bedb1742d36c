#!/usr/bin/env python3
"""Decision cost of the global scheduler per request vs the number of engines (CPU).

Two patterns: `online` (the router: one request arrives, schedule() runs, the plan is
dispatched) and `batch` (a fetch: 256 waiting requests scheduled in one call). Engines are split
1:2 between prefill and decode (the paper's 48P96D ratio), 8 engines per node, one group per
node. Engines start with random loads; every request gets a PE and a DE, so each timed call
does the full work (Algorithm 1, both DE phases, read side, commit).

  python benchmark/scheduler/bench_decision_cost.py [--engines 10,100,1000,2000] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
try:  # the installed package (with its native module _C) over the source tree
    import dualpath  # noqa: F401
except ImportError:  # a checkout without an install
    sys.path.insert(0, str(ROOT / "python"))

from dualpath.config import SchedulerConfig  # noqa: E402
from dualpath.scheduler import EngineSpec, GlobalScheduler, Request  # noqa: E402
from dualpath.version import git_sha  # noqa: E402


def build(n_engines: int, seed: int) -> GlobalScheduler:
    n_pe = max(1, n_engines // 3)
    n_de = max(1, n_engines - n_pe)
    pe = [EngineSpec(f"p{i}", f"pn{i // 8}", f"pg{i // 8}") for i in range(n_pe)]
    de = [EngineSpec(f"d{i}", f"dn{i // 8}", f"dg{i // 8}", kv_capacity=10**9)
          for i in range(n_de)]
    s = GlobalScheduler(pe, de, SchedulerConfig(initial_prefill_tokens_per_s=10**9))
    rng = random.Random(seed)
    s.pe.tok[:] = [rng.randrange(0, 50_000) for _ in range(n_pe)]
    s.de.tok[:] = [rng.randrange(0, 500_000) for _ in range(n_de)]
    s.de.seq[:] = [rng.randrange(0, 64) for _ in range(n_de)]
    s.pe_read_q[:] = [rng.randrange(0, 400_000) for _ in range(len(s.pe_read_q))]
    s.de_read_q[:] = [rng.randrange(0, 400_000) for _ in range(len(s.de_read_q))]
    s.refresh()
    return s


def run(n_engines: int, mode: str, requests: int, seed: int = 0) -> dict:
    s = build(n_engines, seed)
    rng = random.Random(seed + 1)
    reqs = [Request(f"r{i}", rng.randrange(2048, 65536), hit_len=0, max_new_tokens=256)
            for i in range(requests)]
    for r in reqs:  # stored prefix = all but the last page
        object.__setattr__(r, "hit_len", (r.prompt_len - 1) // 64 * 64)
    per_req = []
    if mode == "online":
        for r in reqs:
            t0 = time.perf_counter()
            s.submit(r)
            plans = s.schedule()
            per_req.append(time.perf_counter() - t0)
            assert len(plans) == 1
    else:
        batch = 256
        for i in range(0, requests, batch):
            chunk = reqs[i:i + batch]
            t0 = time.perf_counter()
            for r in chunk:
                s.submit(r)
            plans = s.schedule()
            dt = time.perf_counter() - t0
            assert len(plans) == len(chunk)
            per_req += [dt / len(chunk)] * len(chunk)
    us = sorted(x * 1e6 for x in per_req)
    return {"engines": n_engines, "mode": mode, "requests": requests,
            "median_us": round(statistics.median(us), 2),
            "p99_us": round(us[int(0.99 * (len(us) - 1))], 2),
            "mean_us": round(statistics.mean(us), 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engines", default="10,30,100,300,1000,2000")
    ap.add_argument("--requests", type=int, default=2048)
    ap.add_argument("--out", type=Path, help="append one JSON row per case to this file")
    args = ap.parse_args()
    sha = git_sha()
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text()
                .splitlines() if ln.startswith("model name")), platform.machine())
    meta = {"git_sha": sha, "cpu": cpu, "cores": os.cpu_count(),
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}
    print(f"{'engines':>8} {'mode':>7} {'median us':>10} {'p99 us':>8}")
    for n in [int(x) for x in args.engines.split(",")]:
        for mode in ("online", "batch"):
            row = {**run(n, mode, args.requests), **meta}
            print(f"{row['engines']:>8} {mode:>7} {row['median_us']:>10} {row['p99_us']:>8}")
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
    print(f"repro: python {Path(__file__).relative_to(ROOT)} --engines {args.engines} "
          f"--requests {args.requests}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

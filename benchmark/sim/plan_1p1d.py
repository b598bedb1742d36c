#!/usr/bin/env python3
"""Which 1P1D run on the GPU host would be storage-bound? The calibrated simulator, asked before
spending device time.

The 16-agent runs of 2026-11-27 were latency-bound: each agent's turns run one after another,
16 agents did not fill either storage NIC, and DualPath's second NIC had little to add. This
sweeps the knobs of `scripts/bench_1p1d.sh` that set how much work is in flight (agents, trace
scale, the prefill's GPU pool and host staging, the cap) and prints, per point, the simulated
offline JCT with DualPath off (basic: prefill-side reads) and on (the scheduler's reads), their
ratio, and how busy each storage NIC was. Ideal hits (every turn's stored prefix is loaded, not
recomputed). The decode pool is sized to hold every agent's context, as the runs would have to.

  python benchmark/sim/plan_1p1d.py [--perf benchmark/results/2026-11-27_sim-perf_2xH100.json]
      [--agents 16,32,48,64] [--scales 0.125,0.25] [--caps 3,6.25] [--pools 32768,65536]
      [--max-turns 8] [--out FILE.jsonl]
      [--online [--duration-s 180] | --at-rates off=0.38/0.42,on=0.76] [--decode-pool 300000]

Caveat (README of benchmark/results, session 14): at 6.25 GB/s the simulator put the measured
`on` runs 17-27% too fast and `off` 5-8% too slow, so read the ratios as upper bounds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
try:
    import dualpath  # noqa: F401
except ImportError:
    sys.path.insert(0, str(ROOT / "python"))

from dualpath.bench.compare_1p1d import make_trace  # noqa: E402
from dualpath.config import PluginConfig  # noqa: E402
from dualpath.sim.capacity import max_aps, within_slo  # noqa: E402
from dualpath.sim.des import simulate  # noqa: E402
from dualpath.sim.model import PerfModel, SimCluster  # noqa: E402

DEFAULT_PERF = ROOT / "benchmark/results/2026-11-27_sim-perf_2xH100.json"


def floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x]


def cluster(args, nic: float, pool: int, cap: float, policy: str, side: str) -> SimCluster:
    return SimCluster(1, 1, gpus_per_node=1, compute_nic_gbps=nic, storage_ratio=cap / nic,
                      decode_kv_tokens=args.decode_pool, prefill_kv_tokens=pool,
                      prefill_staging_tokens=int(pool * args.hicache_ratio) - pool,
                      prefill_loads=args.prefill_loads,
                      read_batch_bytes=int(args.read_batch_mib * 2**20),
                      prefill_batch=args.prefill_batch, h2d_gbps=args.h2d_gbps, policy=policy,
                      read_side=side)


ARMS = (("off", "basic", "pe"), ("on", "dualpath", "shorter"))  # (config, policy, read side)


def online_run(args, c: SimCluster, perf: PerfModel, scale: float, initial: int, aps: float):
    """One simulated online run: agents arriving at `aps` for --duration-s."""
    ns = argparse.Namespace(preset=args.preset, scale=scale, initial=initial,
                            agents=max(1, round(aps * args.duration_s)),
                            max_turns=args.max_turns)
    return ns.agents, simulate(c, perf, make_trace(ns, aps, seed=0), online=True)


def online(args) -> int:
    perf = PerfModel.load(args.perf) if args.perf and args.perf.exists() else PerfModel()
    nic = args.pd_gbps or perf.pd_gbps or 50.0
    print(f"perf: {args.perf} (PD link {nic} GB/s); arrivals for {args.duration_s:.0f} s, "
          f"{args.max_turns} turns per agent")
    for scale in floats(args.scales):
        initial = args.initial or int(8192 * scale / 0.25)
        for pool in (int(x) for x in args.pools.split(",")):
            for cap in floats(args.caps):
                row = {"online": True, "scale": scale, "initial": initial, "prefill_pool": pool,
                       "cap_gbps": cap, "max_turns": args.max_turns,
                       "duration_s": args.duration_s}
                for name, policy, side in ARMS:
                    c = cluster(args, nic, pool, cap, policy, side)

                    def within(aps, c=c, scale=scale, initial=initial):
                        _, r = online_run(args, c, perf, scale, initial, aps)
                        return within_slo(r.ttft_mean, r.tpot_mean)
                    row[name] = round(max_aps(within, 0.5), 3)
                row["ratio"] = round(row["on"] / row["off"], 2) if row["off"] else None
                print(f"scale {scale} pool {pool} cap {cap}: max APS within SLO off "
                      f"{row['off']}, on {row['on']} ({row['ratio']}x)", flush=True)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(json.dumps(row) + "\n")
    return 0


def at_rates(args) -> int:
    """Each config at the given rates (no search): mean TTFT / TPOT, within the SLO, and when
    the run's last turn ends (what a device call must hold), per rate."""
    from dualpath.bench.compare_1p1d import aps_of, parse_aps

    perf = PerfModel.load(args.perf) if args.perf and args.perf.exists() else PerfModel()
    nic = args.pd_gbps or perf.pd_gbps or 50.0
    spec = parse_aps(args.at_rates)
    scale = floats(args.scales)[0]
    initial = args.initial or int(8192 * scale / 0.25)
    pool = int(args.pools.split(",")[0])
    cap = floats(args.caps)[0]
    print(f"perf: {args.perf} (PD link {nic} GB/s); scale {scale}, initial {initial}, pool "
          f"{pool}, cap {cap} GB/s, arrivals for {args.duration_s:.0f} s, {args.max_turns} turns")
    for name, policy, side in ARMS:
        c = cluster(args, nic, pool, cap, policy, side)
        for aps in aps_of(spec, name):
            agents, r = online_run(args, c, perf, scale, initial, aps)
            print(f"{name:>4} {aps:6.3f} APS {agents:4d} agents: TTFT mean {r.ttft_mean:5.2f}"
                  f" s, TPOT mean {1e3 * r.tpot_mean:5.1f} ms, within the SLO "
                  f"{within_slo(r.ttft_mean, r.tpot_mean)!s:5}, last turn ends at "
                  f"{r.jct_s:4.0f} s", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--perf", type=Path, default=DEFAULT_PERF)
    ap.add_argument("--preset", default="64k")
    ap.add_argument("--agents", default="16,32,48,64")
    ap.add_argument("--scales", default="0.125,0.25")
    ap.add_argument("--caps", default="3,6.25")
    ap.add_argument("--pools", default="32768,65536", help="prefill GPU pool (tokens)")
    ap.add_argument("--hicache-ratio", type=float, default=4.0,
                    help="prefill host pool / GPU pool (staging = host - GPU pool)")
    ap.add_argument("--max-turns", type=int, default=8)
    ap.add_argument("--initial", type=int, default=None,
                    help="mean initial context (default: the scaled preset's, halved per 0.125)")
    ap.add_argument("--prefill-loads", type=int, default=PluginConfig.prefetch_io_threads,
                    help="loads in flight per prefill (the plugin's prefetch IO threads)")
    ap.add_argument("--read-batch-mib", type=float, default=0.0,
                    help="reads take turns a batch of this many MiB each (sim validate -h)")
    ap.add_argument("--prefill-batch", type=int, default=1,
                    help="turns per prefill batch at most (see sim validate --prefill-batch)")
    ap.add_argument("--h2d-gbps", type=float, default=26.0)
    ap.add_argument("--pd-gbps", type=float, default=None,
                    help="PD link / DE->PE forward rate (default: the calibrated pd_gbps; NIXL "
                         "moved a warm 2 GB prompt's KV in ~50 ms on 2x H100, i.e. ~40 GB/s)")
    ap.add_argument("--online", action="store_true",
                    help="instead of offline JCT: the max agent arrival rate within the SLO "
                         "(mean TTFT <= 4 s, TPOT <= 50 ms) off and on, arrivals for "
                         "--duration-s (the APS points an online GPU sweep should bracket)")
    ap.add_argument("--duration-s", type=float, default=300.0)
    ap.add_argument("--at-rates", metavar="RATES",
                    help="instead of the search: these rates (compare_1p1d's --online-aps "
                         "syntax, e.g. 'off=0.38/0.42,on=0.76'), each run's TTFT, TPOT and "
                         "when its last turn ends; first scale, pool and cap only")
    ap.add_argument("--decode-pool", type=int, default=10_000_000,
                    help="decode KV pool (tokens); the GPU runs use 300000 "
                         "(bench_1p1d --decode-max-total-tokens)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.at_rates:
        return at_rates(args)
    if args.online:
        return online(args)
    perf = PerfModel.load(args.perf) if args.perf and args.perf.exists() else PerfModel()
    nic = args.pd_gbps or perf.pd_gbps or 50.0
    print(f"perf: {args.perf} (PD link {nic} GB/s)")
    print(f"{'agents':>6} {'scale':>5} {'pool':>6} {'cap':>5} {'ctx':>6} {'JCT off':>8} "
          f"{'JCT on':>8} {'on/off':>6} {'PE busy off':>11} {'PE/DE busy on':>13} {'sim s':>5}")
    for agents in (int(x) for x in args.agents.split(",")):
        for scale in floats(args.scales):
            initial = args.initial or int(8192 * scale / 0.25)
            ns = argparse.Namespace(preset=args.preset, scale=scale, initial=initial,
                                    agents=agents, max_turns=args.max_turns)
            trajs = make_trace(ns, seed=0)
            ctx = max(max(t.prompt_lengths()) for t in trajs)  # the longest prompt
            for pool in (int(x) for x in args.pools.split(",")):
                staging = int(pool * args.hicache_ratio) - pool
                for cap in floats(args.caps):
                    row = {"agents": agents, "scale": scale, "initial": initial,
                           "prefill_pool": pool, "staging": staging, "cap_gbps": cap,
                           "max_turns": args.max_turns}
                    t0 = time.perf_counter()
                    for name, policy, side in ARMS:
                        c = cluster(args, nic, pool, cap, policy, side)
                        r = simulate(c, perf, trajs)
                        row[name] = {"jct_s": round(r.jct_s, 2),
                                     "pe_busy": round(r.storage_busy_pe, 3),
                                     "de_busy": round(r.storage_busy_de, 3),
                                     "prefill_busy": round(r.prefill_busy, 3)}
                    row["speedup"] = round(row["off"]["jct_s"] / row["on"]["jct_s"], 3)
                    print(f"{agents:>6} {scale:>5} {pool:>6} {cap:>5} {ctx:>6} "
                          f"{row['off']['jct_s']:>8.1f} {row['on']['jct_s']:>8.1f} "
                          f"{row['speedup']:>6.2f} {row['off']['pe_busy']:>11.2f} "
                          f"{row['on']['pe_busy']:>6.2f}/{row['on']['de_busy']:<6.2f} "
                          f"{time.perf_counter() - t0:>5.1f}", flush=True)
                    if args.out:
                        with open(args.out, "a") as f:
                            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

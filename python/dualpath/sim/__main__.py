"""`python -m dualpath.sim`: the cluster simulator and the paper's P:D bounds.

  bounds    --g 8 --s 1 [--mem-over-storage 10]        bottleneck-free P:D range (paper §4.2)
  run       --prefill-nodes 2 --decode-nodes 4 --trace T.jsonl | --preset 64k --agents 512
            [--policy dualpath|basic] [--read-side shorter|split|pe|de] [--perf MODEL.json]
            [--online]                                  simulate one cluster, print the metrics
  calibrate RESULT.json [...] --out MODEL.json          fit engine speeds from GPU-host runs
            (dualpath.bench.compare_1p1d results: prefill from TTFT, decode from TPOT)
  advise    --g 8 --s 1 --nodes 12 --preset 64k --agents 512 [--perf MODEL.json]
            simulate every P:D split of N nodes inside the bounds; recommend the fastest
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from fractions import Fraction
from pathlib import Path

from dualpath.sim.bounds import as_fraction, pd_bounds


def _trace(args):
    from dualpath.bench.trace import PRESETS, generate, read_jsonl

    if args.trace:
        return read_jsonl(args.trace)
    shape = PRESETS[args.preset].scaled(args.scale)
    return generate(shape, args.agents, args.seed, args.arrival_rate)


def _perf(args):
    from dualpath.sim.model import PerfModel

    return PerfModel.load(args.perf) if args.perf else PerfModel()


def _trace_args(p: argparse.ArgumentParser, cluster: bool = True) -> None:
    p.add_argument("--trace", type=Path, help="trajectories (JSONL); else generated")
    p.add_argument("--preset", default="64k", choices=["32k", "48k", "64k"])
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--agents", type=int, default=512)
    p.add_argument("--arrival-rate", type=float, help="agents/s (online traces)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--perf", type=Path, help="engine speeds (calibrate's output)")
    p.add_argument("--compute-nic-gbps", type=float, default=50.0)
    p.add_argument("--schedule-interval-s", type=float, default=0.02,
                   help="the scheduler's tick (TTFT granularity; larger simulates faster)")
    if cluster:
        p.add_argument("--gpus-per-node", type=int, default=8)
        p.add_argument("--storage-ratio", type=float, default=1.0,
                       help="s: node storage NIC / one compute NIC")


def cmd_bounds(args) -> int:
    try:
        r = pd_bounds(args.g, args.s, args.mem_over_storage)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
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


def cmd_run(args) -> int:
    from dualpath.sim.des import simulate
    from dualpath.sim.model import SimCluster

    c = SimCluster(args.prefill_nodes, args.decode_nodes, gpus_per_node=args.gpus_per_node,
                   storage_ratio=args.storage_ratio, compute_nic_gbps=args.compute_nic_gbps,
                   policy=args.policy, read_side=args.read_side,
                   schedule_interval_s=args.schedule_interval_s)
    trajs = _trace(args)
    t0 = time.time()
    r = simulate(c, _perf(args), trajs, online=args.online)
    out = {"cluster": asdict(c), "perf": asdict(_perf(args)), "online": args.online,
           **asdict(r), "wall_s": round(time.time() - t0, 2)}
    print(json.dumps(out, indent=1))
    return 0


def cmd_calibrate(args) -> int:
    """Fit the prefill and decode models to measured 1P1D runs (sim/calibrate.py says how);
    the fit and its inputs are printed."""
    import numpy as np

    from dualpath.bench.compare_report import load_result
    from dualpath.sim.calibrate import samples
    from dualpath.sim.model import PerfModel, fit_decode, fit_prefill

    pre, dec, rates = samples((load_result(p) for p in args.results),
                              args.kv_bytes_per_token)
    if len(pre) < 3 or len(dec) < 3:
        print("error: need >= 3 prefill and decode samples from 'off' runs", file=sys.stderr)
        return 2
    p = fit_prefill(*(np.array(c) for c in zip(*pre, strict=True)))
    d = fit_decode(*(np.array(c) for c in zip(*dec, strict=True)))
    pd = float(np.median(rates)) if rates else 0.0
    model = PerfModel(*p, *d, pd_gbps=round(pd, 3),
                      source=f"calibrated from {', '.join(map(str, args.results))} "
                             f"({len(pre)} prefill, {len(dec)} decode, {len(rates)} PD "
                             "transfer samples)")
    model.save(args.out)
    print(json.dumps(asdict(model), indent=1))
    return 0


def measured_hits(run: dict) -> dict[tuple[int, int], int]:
    """(agent, turn) -> the prefix tokens the measured turn reused (SGLang's cached tokens as
    the client saw them: the decode's with DualPath on, which restores the prefix it read)."""
    return {(r["agent"], r["turn"]): r.get("cached_tokens") or 0
            for r in run.get("turn_records") or [] if not r.get("error")}


def storage_share(run: dict) -> float:
    """Of the prefix tokens the measured prefill reused, the share its storage prefetches
    loaded (`pe_pf_loaded_tokens`, either read side); the rest it found in its own pools. 1
    for runs without that counter."""
    from dualpath.bench.compare_report import loaded_share

    share = loaded_share(run, "cached_input_len")
    return 1.0 if share is None else min(1.0, share)


def measured_prefill_hits(run: dict) -> dict[tuple[int, int], int]:
    """(agent, turn) -> the prefix tokens the measured prefill reused: its request stats
    (`stage_records`, from the server log, no request ids) matched to the turns by prompt
    length, in order of the turns' start."""
    by_len: dict[int, list[int]] = {}
    for s in run.get("stage_records") or ():
        if s.get("type") == "prefill" and s.get("input_len") is not None:
            by_len.setdefault(int(s["input_len"]), []).append(int(s.get("cached_input_len")
                                                                  or 0))
    out = {}
    for r in sorted(run.get("turn_records") or (), key=lambda r: r.get("start_s", 0.0)):
        got = by_len.get(int(r["prompt_len"]))
        if got and not r.get("error"):
            out[(r["agent"], r["turn"])] = got.pop(0)
    return out


def _measured_prefill_busy_s(run: dict) -> float | None:
    """Seconds the measured prefill had a forward running (its request timeline's span less
    the share with none), or None without the timeline."""
    tl = run.get("prefill_timeline") or {}
    if not tl.get("span_s") or tl.get("no_forward_share") is None:
        return None
    return round(tl["span_s"] * (1 - tl["no_forward_share"]), 2)


def cmd_validate(args) -> int:
    """Simulate the trace, cluster and caps of a measured 1P1D comparison and print measured vs
    simulated offline JCT per configuration (issue target: within 10%)."""
    from dualpath.bench.compare_1p1d import make_trace
    from dualpath.bench.compare_report import load_result
    from dualpath.sim.des import simulate
    from dualpath.sim.model import SimCluster

    res = load_result(args.result)
    tr = res["trace"]
    ns = argparse.Namespace(preset=tr["preset"], scale=tr["scale"], initial=tr.get("initial"),
                            agents=tr["agents"], max_turns=tr["max_turns"])
    trajs = make_trace(ns, seed=tr.get("seed", 0))
    perf = _perf(args)
    rows = []
    nic, nic_from = run_pd_gbps(res), "the run's own (its off config's median KV send rate)"
    if args.compute_nic_gbps:
        nic, nic_from = args.compute_nic_gbps, "--compute-nic-gbps"
    elif not nic:
        nic, nic_from = perf.pd_gbps or 50.0, "the calibration" if perf.pd_gbps else "default"
    print(f"PD link {nic:.2f} GB/s: {nic_from}", flush=True)
    for cfg in res["configs"]:
        if cfg.get("oracle") or not (cfg.get("offline") or {}).get("jct_s"):
            continue
        runs = [(res["snic_gbps"], cfg["offline"])] + [
            (x["snic_gbps"], x) for x in cfg.get("sweep", []) if x.get("jct_s")]
        # the host pool less its mirror of the GPU pool (write-through) stages the loads
        staging = max(0, (res.get("host_pool_tokens") or 0) - (res.get("device_pool_tokens") or 0))
        for cap, run in runs:
            measured = run["jct_s"]
            hits = measured_hits(run) if args.hits == "measured" else None
            c = SimCluster(1, 1, gpus_per_node=1, compute_nic_gbps=nic,
                           storage_ratio=cap / nic,
                           decode_kv_tokens=res.get("decode_pool_tokens") or 1_000_000,
                           # measured hits already count what the prefill's pools held
                           pe_cache_tokens=0 if hits else (res.get("device_pool_tokens") or 0)
                           + (res.get("host_pool_tokens") or 0),
                           prefill_kv_tokens=(res.get("device_pool_tokens") or 0)
                           if args.prefill_kv == "pool" else 0,
                           prefill_staging_tokens=staging if args.prefill_kv == "pool" else 0,
                           prefill_loads=(args.prefill_loads if args.prefill_loads is not None
                                          else res.get("prefetch_io_threads") or 4),
                           read_batch_bytes=int(args.read_batch_mib * 2**20),
                           prefill_batch=args.prefill_batch,
                           h2d_gbps=args.h2d_gbps,
                           policy="dualpath" if cfg.get("dual_path") or args.router_prefill_rate
                           else "basic",
                           read_side=cfg.get("read_side") or "shorter",
                           router_prefill_tokens_per_s=args.router_prefill_rate,
                           schedule_interval_s=args.schedule_interval_s)
            pre_hits = measured_prefill_hits(run) if hits else None
            share = storage_share(run) if hits else 1.0
            # each turn found the run's share of its reuse in the prefill's own pools
            held = {k: int(v * (1 - share)) for k, v in pre_hits.items()} if hits else None
            out = simulate(c, perf, trajs, hits=hits, prefill_hits=pre_hits, held=held)
            sim = out.jct_s
            rows.append({"config": cfg["config"], "snic_gbps": cap, "measured_jct_s": measured,
                         "simulated_jct_s": round(sim, 2), "hits": args.hits,
                         "storage_share": round(share, 3),
                         "prefill_kv": args.prefill_kv,
                         "error": round((sim - measured) / measured, 3),
                         # where the simulated time went, beside what the run measured
                         "sim_prefill_busy_s": round(out.prefill_busy * sim, 2),
                         "sim_nic_busy_s": [round(out.storage_busy_pe * sim, 2),
                                            round(out.storage_busy_de * sim, 2)],
                         "measured_prefill_busy_s": _measured_prefill_busy_s(run)})
            print(f"{cfg['config']:>8} cap {cap:6.2f} GB/s  measured {measured:8.2f} s  "
                  f"simulated {sim:8.2f} s  error {rows[-1]['error']:+.1%}  prefill busy "
                  f"{rows[-1]['sim_prefill_busy_s']} s simulated, "
                  f"{rows[-1]['measured_prefill_busy_s']} s measured", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"result": str(args.result), "perf": asdict(perf),
                                        "pd_gbps": nic, "pd_gbps_from": nic_from,
                                        "rows": rows}, indent=1) + "\n")
    return 0 if rows else 2


def run_pd_gbps(res: dict) -> float | None:
    """The PD link rate the run itself measured: the median of SGLang's KV send rates of its
    off config's prefills (>= 100 MB each; the DualPath arm sends only new tokens' KV), over
    all its offline runs; None without such sends. The calibrated rate came from other runs
    (session 16, 2x H100: 12.4 GB/s) and the link's rate moves with the backend, the card and
    the load (4x H200, da1f10d: 79-95 GB/s), while at a high storage cap the PD send of every
    turn's whole context is what an agent's turns wait on."""
    import statistics

    from dualpath.sim.calibrate import pd_transfer_gbps

    off = next((c for c in res.get("configs", []) if c.get("config") == "off"), None)
    if off is None:
        return None
    rates = [g for run in [off.get("offline") or {}, *off.get("sweep", [])]
             for g in pd_transfer_gbps(run)]
    return round(statistics.median(rates), 2) if rates else None


def cmd_advise(args) -> int:
    from dualpath.sim.des import simulate
    from dualpath.sim.model import SimCluster

    r = pd_bounds(args.g, args.s, args.mem_over_storage)
    trajs, perf = _trace(args), _perf(args)
    rows = []
    for p in range(1, args.nodes):
        d = args.nodes - p
        inside = r.admits(p, d)
        if not inside and not args.all:
            continue
        c = SimCluster(p, d, gpus_per_node=args.g, storage_ratio=args.s,
                       compute_nic_gbps=args.compute_nic_gbps,
                       schedule_interval_s=args.schedule_interval_s)
        res = simulate(c, perf, trajs)
        rows.append((p, d, inside, res))
        print(f"{p}P{d}D  inside bounds: {'yes' if inside else 'no '}  JCT {res.jct_s:9.1f} s  "
              f"turns/s {res.turns_per_s:8.2f}  TTFT p90 {res.ttft_p90:7.2f} s  storage busy "
              f"PE {res.storage_busy_pe:.2f} DE {res.storage_busy_de:.2f}", flush=True)
    if not rows:
        print("no P:D split of these nodes is inside the bounds (use --all)")
        return 1
    best = min(rows, key=lambda x: x[3].jct_s)
    print(f"recommended: {best[0]}P{best[1]}D (JCT {best[3].jct_s:.1f} s; bounds "
          f"{r.lower:.3f} .. {r.upper:.3f})")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dualpath.sim", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bounds", help="bottleneck-free P:D range (paper §4.2)")
    b.add_argument("--g", type=int, required=True, help="GPUs (compute NICs) per node")
    b.add_argument("--s", type=float, required=True,
                   help="node storage bandwidth / one compute NIC's bandwidth")
    b.add_argument("--mem-over-storage", type=float,
                   help="node memory bandwidth / node storage bandwidth (M / Bs)")
    b.add_argument("--max-nodes", type=int, default=8, help="largest P or D to list")
    r = sub.add_parser("run", help="simulate one cluster")
    r.add_argument("--prefill-nodes", type=int, required=True)
    r.add_argument("--decode-nodes", type=int, required=True)
    r.add_argument("--policy", choices=["dualpath", "basic"], default="dualpath")
    r.add_argument("--read-side", choices=["shorter", "split", "pe", "de"], default="shorter")
    r.add_argument("--online", action="store_true", help="honour the trace's arrival times")
    _trace_args(r)
    cal = sub.add_parser("calibrate", help="fit engine speeds from GPU-host results")
    cal.add_argument("results", nargs="+", type=Path)
    cal.add_argument("--out", type=Path, required=True)
    cal.add_argument("--kv-bytes-per-token", type=int, default=131072)
    val = sub.add_parser("validate", help="measured vs simulated JCT of a 1P1D comparison")
    val.add_argument("result", type=Path, help="compare_1p1d's result.json")
    val.add_argument("--perf", type=Path, help="engine speeds (calibrate's output)")
    val.add_argument("--compute-nic-gbps", type=float,
                     help="GPU-to-GPU KV rate of the host (PD transfer, DE -> PE forward); "
                          "default: the run's own (its off config's median KV send rate), else "
                          "the calibrated pd_gbps, else 50")
    val.add_argument("--schedule-interval-s", type=float, default=0.02)
    val.add_argument("--hits", choices=["measured", "trace"], default="measured",
                     help="each turn's stored prefix: what the measured turn reused (default) or "
                          "the whole earlier context (the trace's ideal)")
    val.add_argument("--prefill-kv", choices=["pool", "unlimited"], default="pool",
                     help="prefill pools: the run's GPU pool (turns wait to fit) and host pool "
                          "less its GPU mirror as the staging of loads (reads wait for room), "
                          "or neither")
    val.add_argument("--router-prefill-rate", type=float, default=0.0,
                     help="the router's fixed prefill rate (tokens/s) behind beta, both "
                          "configurations through the global scheduler (off: its read side, "
                          "'pe'); 20000 = dualpath.router before 7dc4052, which was never told "
                          "the measured rate. 0: off round-robin, on the model's rate")
    val.add_argument("--prefill-batch", type=int, default=1,
                     help="turns per prefill batch at most, p0 paid per batch (1: one at a "
                          "time, as the calibrated models assume)")
    val.add_argument("--prefill-loads", type=int, default=None,
                     help="loads in flight per prefill (the plugin's prefetch IO threads; "
                          "default: the run's, else 4, the plugin's default until b106b34; "
                          "0 = unlimited)")
    val.add_argument("--read-batch-mib", type=float, default=0.0,
                     help="reads take turns a batch of this many MiB each on a storage NIC "
                          "(1024: SGLang's 128-page batches in a first-in-first-out read pool, "
                          "the plugin before 9d24f5f); 0 = first come first served, whole reads")
    val.add_argument("--h2d-gbps", type=float, default=26.0,
                     help="host -> GPU prefix load of the prefill (SGLang's one-layer load "
                          "measured 20-30 GB/s on H100)")
    val.add_argument("--out", type=Path, help="write the rows as JSON")
    adv = sub.add_parser("advise", help="recommend a P:D split of N nodes")
    adv.add_argument("--g", type=int, default=8)
    adv.add_argument("--s", type=float, default=1.0)
    adv.add_argument("--mem-over-storage", type=float)
    adv.add_argument("--nodes", type=int, required=True, help="prefill + decode nodes")
    adv.add_argument("--all", action="store_true", help="also simulate splits outside bounds")
    _trace_args(adv, cluster=False)
    args = ap.parse_args(argv)
    return {"bounds": cmd_bounds, "run": cmd_run, "calibrate": cmd_calibrate,
            "advise": cmd_advise, "validate": cmd_validate}[args.cmd](args)


if __name__ == "__main__":
    raise SystemExit(main())

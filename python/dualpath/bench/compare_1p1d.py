"""The 1P1D comparison on a 2-GPU host: the same agentic trace, DualPath off and on.

For each configuration: boot prefill (GPU 0) + decode (GPU 1) with `python -m
dualpath.launch_server` and the router, sample GPU utilisation (NVML) and both nodes' path
counters (storage reads, DE->PE forwards) every 0.5 s, replay the trace offline (all agents at
t=0: JCT), then optionally an online sweep (Poisson agent arrivals at each APS, a fresh token
seed per run so nothing is reused across runs: TTFT/TPOT percentiles and SLO attainment),
stop. Configurations: `off` (stock PD + HiCache, our store at the prefill, PE-side reads),
`on` (--enable-dual-path, the router's read-side rule), `oracle` (reads skipped: the ceiling;
outputs meaningless), the forced `de` / `split` ablations, and `stock` (`off` with SGLang's own
prefetch admission: a prefetch that finds the budget taken is dropped and the prefix recomputed;
every other config queues it, --dualpath-prefetch-queue). Prints a side-by-side table and
writes result.json (config, trace shape and scaling, working set vs pools, card, commit, caps,
summaries, per-interval samples, per-turn records). Plots: `python -m dualpath.bench.plots`.
Run on the GPU host through scripts/bench_1p1d.sh.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import shutil
import sys
import threading
import time
from pathlib import Path

from dualpath.bench import client, gpu_profile
from dualpath.bench.compare_report import online_table, outputs_match, sweep_table, table
from dualpath.bench.pd_cluster import (
    ClusterSpec,
    PDCluster,
    agent_stats,
    clear_blocks,
    path_bytes,
    set_snic_cap,
)
from dualpath.bench.prefill_timeline import turn_breakdown
from dualpath.bench.replay import replay
from dualpath.bench.run_evidence import (
    admission_mean,
    archive_logs,
    gil_delta,
    gil_snapshots,
    kv_bytes_per_token,
    prefill_timeline_or_none,
    profile_summaries,
    router_admission,
    stack_files,
    stacks_of_replay,
    storage_util,
    store_room_warning,
)
from dualpath.bench.samplers import agents_sampler, gpu_sampler, mean_util, rates
from dualpath.bench.servers import ServerError, stop_servers_on_sigterm
from dualpath.bench.smoke import DEFAULT_MODEL, gpu_facts
from dualpath.bench.stage_stats import LogCursor, parse_lines, summarize_records
from dualpath.bench.trace import PRESETS, Trajectory, describe, generate
from dualpath.config import PluginConfig
from dualpath.version import git_sha

log = logging.getLogger("dualpath.compare_1p1d")
# name -> (dual path, router read side, oracle, prefetch queue)
CONFIGS = {"off": (False, "pe", False, True), "on": (True, "shorter", False, True),
           "de": (True, "de", False, True), "split": (True, "split", False, True),
           "oracle": (False, "pe", True, True), "stock": (False, "pe", False, False)}
SLO_TTFT_S, SLO_TPOT_S = 4.0, 0.050  # the paper's online SLO
# no turn finished for this long: the replay stops and says why (2x H100, 17ce76c: an "on"
# replay sat at 271/289 turns for 140 s until the call's watchdog killed it, and left nothing)
STALL_S = 90.0


def make_trace(args, arrival_rate: float | None = None, seed: int = 0) -> list[Trajectory]:
    shape = PRESETS[args.preset].scaled(args.scale)
    if args.initial:
        shape = dataclasses.replace(shape, initial_mean=float(args.initial))
    trajs = generate(shape, args.agents, seed, arrival_rate)
    for t in trajs:
        t.turns = t.turns[:args.max_turns]
    return trajs


def within_slo(run: dict) -> bool:
    """An online run is within the SLO when its mean TTFT and mean TPOT meet it, no turn
    failed and the replay did not stop it (the paper stops a run once TTFT passes 4 s)."""
    ttft, tpot = run.get("ttft_s_mean"), run.get("tpot_s_mean")
    return (not run.get("errors") and run.get("stopped_at_s") is None and ttft is not None
            and ttft <= SLO_TTFT_S and (tpot or 0.0) <= SLO_TPOT_S)


def max_aps_within_slo(online: list[dict]) -> float | None:
    """The highest arrival rate whose run met the SLO (None without online runs)."""
    if not online:
        return None
    return max((r["aps"] for r in online if within_slo(r)), default=0.0)


def slo_attainment(records) -> float | None:
    done = [r for r in records if not r.error and r.ttft_s is not None]
    if not records:
        return None
    ok = [r for r in done if r.ttft_s <= SLO_TTFT_S and (r.tpot_s or 0) <= SLO_TPOT_S]
    return round(len(ok) / len(records), 4)


def _flush(url: str) -> None:
    for _ in range(60):
        if client.post_json(url + "/flush_cache")[0] == 200:
            return
        time.sleep(0.5)


def stall_report(c: PDCluster, log_lines: int = 60) -> dict:
    """What the servers say when a replay stalls: each agent's stats and each log's tail."""
    out = {}
    for role, port in (("pe", c.pre.port), ("de", c.dec.port)):
        try:
            out[f"{role}_stats"] = agent_stats(port, 5)
        except Exception as e:  # a hung server is part of the answer
            out[f"{role}_stats"] = {"error": f"{type(e).__name__}: {e}"}
    for role, proc in (("prefill", c.pre), ("decode", c.dec), ("router", c.router)):
        out[f"{role}_log_tail"] = proc.log_tail(log_lines)
    return out


def run_once(c: PDCluster, trajs, online: bool, seed: int, cap_gbps: float,
             stall_s: float | None = None, gil_monitor: bool = False) -> dict:
    logs = [LogCursor(p.log_path) for p in (c.pre, c.dec)]
    admitted0 = router_admission(c.url)
    ports = {"pe": c.pre.port, "de": c.dec.port}
    gil0 = gil_snapshots(ports) if gil_monitor else {}
    gpus = gpu_sampler().start()
    agents = agents_sampler({"pe": lambda: agent_stats(c.pre.port, 2),
                             "de": lambda: agent_stats(c.dec.port, 2)}, path_bytes).start()
    summary, records = asyncio.run(replay(c.url, trajs, online=online, seed=seed,
                                          stop_ttft_s=SLO_TTFT_S,  # the paper's stop rule
                                          stall_s=stall_s, on_stall=lambda: stall_report(c)))
    g_rows, a_rows = gpus.stop(), agents.stop()
    gil = ({k: gil_delta(gil0.get(k), v) for k, v in gil_snapshots(ports).items()}
           if gil_monitor else None)
    stages = parse_lines(x for cur in logs for x in cur.new_lines())
    wall = summary["wall_s"]
    out = {**summary, "slo_attainment": slo_attainment(records),
           "gpus": list(c.gpus),  # (prefill, decode) GPU indices of the samples
           "gpu_util_mean": {"prefill": mean_util(g_rows, c.gpus[0], 0, wall),
                             "decode": mean_util(g_rows, c.gpus[1], 0, wall)},
           "sampler_errors": {"gpu": gpus.error, "agents": agents.error},
           "stages": summarize_records(stages), "stage_records": stages,
           "prefill_timeline": prefill_timeline_or_none(stages),
           "router_admission_wait_s_mean": admission_mean(admitted0, router_admission(c.url)),
           "turn_breakdown": turn_breakdown([dataclasses.asdict(r) for r in records], stages,
                                            summary["t0_wall"]),
           "samples": {"gpu": g_rows, "agents": a_rows}, "gil": gil,
           "turn_records": [dataclasses.asdict(r) for r in records]}
    if a_rows:
        first, last = a_rows[0][1], a_rows[-1][1]
        span = max(1e-9, a_rows[-1][0] - a_rows[0][0])
        out["bytes"] = {k: last.get(k, 0) - first.get(k, 0) for k in last
                        if not k.endswith("_now")}
        # gauges (sampled levels, e.g. SGLang's prefetch budget in use): their peak
        out["gauges_peak"] = {k: max(row.get(k, 0) for _, row in a_rows) for k in last
                              if k.endswith("_now")}
        for node in ("pe", "de"):
            r = rates(a_rows, f"{node}_read_bytes")
            out[f"{node}_read_gbps_mean"] = round(out["bytes"].get(f"{node}_read_bytes", 0)
                                                  / span / 1e9, 3)
            out[f"{node}_read_gbps_peak"] = round(max((x for _, x in r), default=0.0), 3)
        out["storage_util"] = storage_util(a_rows, cap_gbps)
    return out


def fresh(c: PDCluster, root: Path) -> None:
    """Empty both servers' device and host caches and the store: the next run reads only what
    it wrote itself."""
    _flush(c.pre.url)
    _flush(c.dec.url)
    time.sleep(1.0)  # write-through backups still in flight land before the store is emptied
    clear_blocks(root)


def set_cap(c: PDCluster, dual: bool, cap: float) -> None:
    ok = set_snic_cap(c.pre.port, cap) and (not dual or set_snic_cap(c.dec.port, cap))
    if not ok:
        raise RuntimeError(f"could not set the storage-NIC cap to {cap} GB/s")


def warm_up(c: PDCluster, root: Path, args) -> float:
    """A short replay of the same trace shape (other token ids) before the measured one, then
    empty caches and store: first-use compiles (Triton kernels per new shape, JIT modules) and
    allocator growth stay out of the measured JCT (METHOD.md: warm up before timing)."""
    ns = argparse.Namespace(**{**vars(args), "agents": args.warmup_agents,
                               "max_turns": args.warmup_turns})
    trajs = make_trace(ns, seed=args.seed + 7919)
    t0 = time.perf_counter()
    summary, _ = asyncio.run(replay(c.url, trajs, online=False, seed=args.seed + 7919,
                                    progress_s=None))
    took = time.perf_counter() - t0
    log.info("warm-up replay: %d turns in %.1f s (%d errors), then caches and store emptied",
             summary["turns"], took, summary["errors"])
    fresh(c, root)
    return round(took, 2)


def profile_later(c: PDCluster, out: Path, args) -> threading.Timer | None:
    """With --torch-profile N: `--profile-after` seconds into the replay, record the prefill's
    next N forward batches and the decode's next 10 N (its steps are ~10x shorter) with SGLang's
    profiler (GPU activity only), traces under out/<role>."""
    if not args.torch_profile:
        return None

    def go():
        for role, url, steps in (("prefill", c.pre.url, args.torch_profile),
                                 ("decode", c.dec.url, 10 * args.torch_profile)):
            try:
                gpu_profile.start(url, out / role, steps)
                log.info("torch profile of the %s: next %d forward batches", role, steps)
            except OSError as e:
                log.warning("torch profile of the %s did not start: %s", role, e)

    timer = threading.Timer(args.profile_after, go)
    timer.daemon = True
    timer.start()
    return timer


def make_cluster(name: str, args, out: Path, res: dict, slot: int = 0) -> PDCluster:
    """The (not yet started) cluster of config `name` on GPU pair `slot`, its store emptied;
    `res` gets the config's description."""
    dual, side, oracle, queue = CONFIGS[name]
    root = Path(args.store_dir) / name
    shutil.rmtree(root, ignore_errors=True)
    spec = ClusterSpec(slot=slot, model=args.model, root=root, dual_path=dual, read_side=side,
                       snic_gbps=args.snic_gbps, max_total_tokens=args.max_total_tokens,
                       mem_fraction=args.mem_fraction, pd_backend=args.pd_backend,
                       stack_sample=args.stack_sample, h2d_kernel=args.h2d_kernel,
                       gil_monitor=args.gil_monitor,
                       host_cache_tokens=args.host_cache_tokens,
                       device_cache_tokens=args.device_cache_tokens,
                       refetch_host_hits=args.refetch_host_hits,
                       async_page_indices=args.async_page_indices,
                       decode_max_total_tokens=args.decode_max_total_tokens,
                       decode_hicache_ratio=args.decode_hicache_ratio,
                       buffer_gb=args.buffer_gb, hicache_ratio=args.hicache_ratio,
                       decode_cuda_graph_max_bs=args.decode_cuda_graph_max_bs, oracle=oracle,
                       prefill_cuda_graph=args.prefill_cuda_graph,
                       prefetch_queue=queue,
                       extra=["--dualpath-prefetch-io-threads", str(args.prefetch_io_threads),
                              "--dualpath-store-capacity-gb", str(args.store_capacity_gb)])
    res.update({"config": name, "dual_path": dual, "read_side": side, "oracle": oracle,
                "prefetch_queue": queue,
                "sweep": [], "online": []})
    return PDCluster(spec, out / name, args.health_timeout)


def start_all(clusters: list[PDCluster]) -> None:
    """Start clusters at once (each waits for its servers' health); if one fails, all are
    stopped and its error raised."""
    errors: list[BaseException] = []

    def go(c: PDCluster) -> None:
        try:
            c.start()
        except BaseException as e:  # noqa: BLE001  (re-raised below, on the main thread)
            errors.append(e)

    t0 = time.time()
    threads = [threading.Thread(target=go, args=(c,), daemon=True) for c in clusters]
    for t in threads:
        t.start()
    try:
        for t in threads:
            t.join()
    except BaseException:  # interrupted (SIGTERM/Ctrl-C) while they start
        errors.append(None)
    if errors:
        for c in clusters:  # their health waits then fail fast; stop what they started after
            c.stop()
        for t in threads:
            t.join(30)
        for c in clusters:
            c.stop()
        if errors[0] is None:
            raise KeyboardInterrupt("interrupted while the clusters started")
        raise errors[0]
    log.info("%d clusters started at once in %.0f s", len(clusters), time.time() - t0)


def run_config(name: str, args, out: Path, trajs, res: dict, save,
               started: PDCluster | None = None) -> dict:
    """Fill `res` (already in the result) step by step, calling `save()` after each run. With
    `started`, measure on that running cluster (parallel start) instead of starting one; it
    is stopped afterwards either way."""
    c = started or make_cluster(name, args, out, res, slot=args.slot)
    root = c.spec.root
    try:
        if started is None:
            c.start()
        res["startup_s"] = c.startup_s
        if args.warmup_agents > 0:
            res["warmup_s"] = warm_up(c, root, args)
        if args.no_offline:
            res["offline"] = {}
        elif not offline(name, c, args, out, trajs, res, save):
            return res
        online_runs(name, c, args, res, save)
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)  # the store lives in /dev/shm
    return res


def offline(name: str, c: PDCluster, args, out: Path, trajs, res: dict, save) -> bool:
    """The main offline replay, then the cap sweep; False when the replay stalled (the
    config's other runs are skipped)."""
    dual, root = CONFIGS[name][0], c.spec.root
    log.info("%s: offline replay of %d agents", name, len(trajs))
    timer = profile_later(c, out / name / "torch_profile", args)
    stacks_before = stack_files(out / name) if args.stack_sample else None
    try:
        res["offline"] = run_once(c, trajs, False, args.seed, args.snic_gbps,
                                   args.stall_s or None, args.gil_monitor)
    finally:
        if timer is not None:
            timer.cancel()
    if stacks_before is not None:
        stacks_of_replay(out / name, stacks_before)
    if timer is not None:
        res["offline"]["gpu_profile"] = profile_summaries(out / name / "torch_profile")
    if res["offline"].get("stall"):
        log.error("%s: the replay stalled and was ended; the servers' state is in the "
                  "result's offline.stall; the config's other runs are skipped (its "
                  "servers still hold the stuck requests)", name)
        save()
        return False
    log.info("%s offline: JCT %s s, errors %d, storage %s", name,
             res["offline"]["jct_s"], res["offline"]["errors"],
             res["offline"].get("storage_util"))
    save()
    for k, cap in enumerate(args.snic_sweep):  # same trace, fresh token ids
        set_cap(c, dual, cap)
        fresh(c, root)
        run = run_once(c, trajs, False, args.seed + 100 + k, cap, args.stall_s or None,
                       args.gil_monitor)
        res["sweep"].append({"snic_gbps": cap, **run})
        log.info("%s offline at %.2f GB/s: JCT %s s, errors %d, storage %s", name, cap,
                 run["jct_s"], run["errors"], run.get("storage_util"))
        save()
    if args.snic_sweep:
        set_cap(c, dual, args.snic_gbps)
    return True


def online_runs(name: str, c: PDCluster, args, res: dict, save) -> None:
    """The online runs of config `name`: Poisson agent arrivals at each of its APS, a fresh
    store and token seed per run; with --online-duration-s, arrivals for that long (agents =
    APS x duration), else --agents agents."""
    for k, aps in enumerate(aps_of(args.online_aps, name)):
        fresh(c, c.spec.root)
        ns = args
        if args.online_duration_s:
            ns = argparse.Namespace(**{**vars(args), "agents": max(
                1, round(aps * args.online_duration_s))})
        run = run_once(c, make_trace(ns, aps, seed=args.seed + 1 + k), True,
                       args.seed + 1 + k, args.snic_gbps, args.stall_s or None,
                       args.gil_monitor)
        res["online"].append({"aps": aps, "agents": ns.agents, **run,
                              "within_slo": within_slo(run)})
        res["max_aps_within_slo"] = max_aps_within_slo(res["online"])
        if run.get("stall"):
            log.error("%s online %.3f APS stalled and was ended; its later rates are skipped "
                      "(the servers still hold the stuck requests)", name, aps)
            save()
            return
        log.info("%s online %.3f APS (%d agents): TTFT mean %s s, TPOT mean %s s, stopped at "
                 "%s s, within the SLO: %s", name, aps, ns.agents, run.get("ttft_s_mean"),
                 run.get("tpot_s_mean"), run.get("stopped_at_s"), within_slo(run))
        save()


def final_contexts(trajs) -> list[int]:
    """Each agent's context after its last turn (its prompt plus that turn's output): what it
    leaves in the store."""
    return [t.prompt_lengths()[-1] + t.turns[-1][1] for t in trajs if t.turns]


def store_written_gb(args, trajs) -> float:
    """About how many GiB one config's largest run writes to its store: every agent's final
    context (offline: the trace; online: APS x duration agents of the trace's mean size)."""
    per_token = kv_bytes_per_token(args.model) or 131072
    contexts = final_contexts(trajs)
    mean = sum(contexts) / max(1, len(contexts))
    runs = [] if args.no_offline else [sum(contexts)]
    for aps in {a for per_config in args.online_aps.values() for a in per_config}:
        agents = round(aps * args.online_duration_s) if args.online_duration_s else args.agents
        runs.append(max(1, agents) * mean)
    return max(runs, default=0.0) * per_token / 2**30  # GiB, as --store-capacity-gb


def parse_aps(text: str) -> dict[str | None, list[float]]:
    """--online-aps: '0.4,0.8' (every config) or 'off=0.35/0.4,on=0.7' (per config; a bare
    number still applies to every config). Rates must be > 0."""
    out: dict[str | None, list[float]] = {}
    for tok in filter(None, (t.strip() for t in text.split(","))):
        name, _, rates = tok.rpartition("=")
        if name and name not in CONFIGS:
            raise argparse.ArgumentTypeError(f"unknown config {name!r} in --online-aps")
        vals = [float(x) for x in rates.split("/") if x]
        if not vals or min(vals) <= 0:
            raise argparse.ArgumentTypeError(f"APS must be > 0: {tok!r}")
        out.setdefault(name or None, []).extend(vals)
    return out


def aps_of(spec: dict[str | None, list[float]], name: str) -> list[float]:
    return spec.get(None, []) + spec.get(name, [])


def main(argv: list[str] | None = None) -> int:
    # no abbreviations: --concurrent rewrites its children's options by their full names
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--configs", default="off,on", help=f"from {sorted(CONFIGS)}")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="64k")
    ap.add_argument("--scale", type=float, default=0.25, help="trace length scaling (stated "
                                                              "with every result)")
    ap.add_argument("--initial", type=int, default=8192,
                    help="mean initial context (tokens), overriding the scaled preset's")
    ap.add_argument("--agents", type=int, default=16)
    ap.add_argument("--max-turns", type=int, default=20, help="turns kept per trajectory")
    ap.add_argument("--online-aps", type=parse_aps, default={},
                    help="agent arrival rates (agents/s) of the online runs: '0.4,0.8' for "
                         "every config, or per config 'off=0.35/0.4,on=0.7'")
    ap.add_argument("--online-duration-s", type=float, default=0.0,
                    help="online runs: agents arrive for this long (APS x duration agents, "
                         "as the simulator's plan); 0 = --agents agents at every rate")
    ap.add_argument("--no-offline", action="store_true",
                    help="skip the offline replay (and --snic-sweep): online runs only")
    ap.add_argument("--snic-gbps", type=float, default=6.25,
                    help="storage-NIC cap per node (GB/s) of the main runs")
    ap.add_argument("--snic-sweep", type=lambda s: [float(x) for x in s.split(",") if x],
                    default=[], help="comma-separated caps (GB/s) of extra offline runs of the "
                                     "same trace (cap changed at run time, no restart)")
    ap.add_argument("--host-cache-tokens", type=int, default=ClusterSpec.host_cache_tokens,
                    help="prefill: host-only prefix pages its host pool may keep (-1 = no "
                         "limit); with a large --hicache-ratio the pool stages loads without "
                         "caching a share of the scaled-down working set")
    ap.add_argument("--device-cache-tokens", type=int, default=ClusterSpec.device_cache_tokens,
                    help="prefill: unlocked prefix tokens its GPU radix cache may keep (-1 = no "
                         "limit; 0 = the paper's PE, whose HBM holds only requests in flight, "
                         "so every turn's hit is read from storage), both arms alike")
    ap.add_argument("--refetch-host-hits", action="store_true",
                    help="prefill: a prefix matched in its host pool only is read from storage "
                         "again (the paper's setting: no DRAM cache), both arms alike")
    ap.add_argument("--async-page-indices", action="store_true",
                    help="prefill: KV page indices read without waiting for the next forward "
                         "(--dualpath-async-page-indices), both arms alike")
    ap.add_argument("--prefetch-io-threads", type=int,
                    default=PluginConfig.prefetch_io_threads,
                    help="storage loads (requests) in flight per server, both arms "
                         "(--dualpath-prefetch-io-threads; a DE-side pull holds one on the "
                         "prefill for its whole read and forward)")
    ap.add_argument("--stack-sample", action="store_true",
                    help="profile both schedulers' threads: OUT/<config>/stacks_<role>.txt "
                         "(whole server life) and stacks_<role>_replay.txt (the measured "
                         "replay only); python -m dualpath.bench.stacks FILE")
    ap.add_argument("--gil-monitor", action="store_true",
                    help="both servers time their GIL hand-overs (--dualpath-gil-monitor): "
                         "each run's stalls and GC pauses per node in its 'gil'")
    ap.add_argument("--warmup-agents", type=int, default=4,
                    help="agents of a short unmeasured replay (other token ids) before each "
                         "config's measured one, caches and store emptied after it; 0 = none")
    ap.add_argument("--warmup-turns", type=int, default=2)
    ap.add_argument("--h2d-kernel", choices=["sglang", "ours"], default=ClusterSpec.h2d_kernel,
                    help="HiCache's host -> GPU prefix load of both servers: SGLang's kernel or "
                         "dualpath.ops.copy_kv (--dualpath-h2d-kernel)")
    ap.add_argument("--torch-profile", type=int, default=0, metavar="STEPS",
                    help="profile the GPUs during the main offline replay with SGLang's "
                         "profiler: the prefill's next STEPS forward batches (the decode's "
                         "10x STEPS), summarized into the result (dualpath.bench.gpu_profile); "
                         "0 = off. Tracing slows the servers: not for timing runs")
    ap.add_argument("--profile-after", type=float, default=8.0,
                    help="seconds into the replay when --torch-profile starts")
    ap.add_argument("--pd-backend", choices=["nixl", "dualpath"], default=ClusterSpec.pd_backend,
                    help="PD KV transfer of every configuration: SGLang's NIXL (UCX) or our "
                         "engine under SGLang's Mooncake backend (CUDA IPC over NVLink)")
    ap.add_argument("--mem-fraction", type=float, default=ClusterSpec.mem_fraction,
                    help="SGLang --mem-fraction-static of both servers (raise it with the pools)")
    ap.add_argument("--max-total-tokens", type=int, default=32768,
                    help="prefill KV pool (tokens): small, so the prefixes come from storage")
    ap.add_argument("--hicache-ratio", type=float, default=2.0,
                    help="prefill host pool / device pool: a staging buffer, small vs the "
                         "working set, so turns read storage rather than DRAM (write-through "
                         "keeps the device pool's pages in it too: 2 leaves one pool's worth "
                         "for prefetches)")
    ap.add_argument("--decode-cuda-graph-max-bs", type=int, default=32,
                    help="CUDA graphs on the decode up to this batch (0 = off)")
    ap.add_argument("--prefill-cuda-graph", choices=["disabled", "breakable", "full"],
                    default="disabled",
                    help="the prefill's CUDA graph backend (SGLang's --cuda-graph-backend-"
                         "prefill); eager prefills spent 37%% of their scheduler thread in "
                         "the forward's Python on 2x H100")
    ap.add_argument("--decode-max-total-tokens", type=int, default=163840,
                    help="decode KV pool (tokens): room for every agent's context at once")
    ap.add_argument("--decode-hicache-ratio", type=float, default=1.25,
                    help="decode host pool / device pool (decode HiCache: dual path only)")
    ap.add_argument("--buffer-gb", type=float, default=16.0, help="DE buffer (GiB)")
    ap.add_argument("--store-dir", default="/dev/shm/dualpath-1p1d")
    ap.add_argument("--store-capacity-gb", type=float, default=0.0,
                    help="each config's store cap in GiB, least recently used blocks deleted "
                         "past it (--dualpath-store-capacity-gb; 0 = none): online runs write "
                         "every arriving agent's context, more than a tmpfs holds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--health-timeout", type=float, default=400)
    ap.add_argument("--stall-s", type=float, default=STALL_S,
                    help="end a replay in which no turn finished for this long while turns "
                         "were in flight: those turns become errors, and the result's "
                         "'stall' names them with both agents' stats and the logs' tails "
                         "(0 = wait for the HTTP timeout)")
    ap.add_argument("--parallel-start", action="store_true",
                    help="start every config's servers at once, config k on GPUs 2k and 2k+1 "
                         "(2 GPUs per config), then run the configs one after another, each "
                         "stopped after its runs: one server start-up (~90 s on H100) instead "
                         "of one per config; the configs waiting for their turn sit idle")
    ap.add_argument("--concurrent", action="store_true",
                    help="run the configs at the same time, each in its own process on GPU "
                         "pair k (2 GPUs per config): one call's wall time for all of them; "
                         "the host's CPUs and memory are shared while they run "
                         "(dualpath.bench.concurrent); results merged into OUT/result.json")
    ap.add_argument("--slot", type=int, default=0,
                    help="GPU pair and port block of the (first) config: GPUs 2 SLOT, "
                         "2 SLOT + 1")
    ap.add_argument("--setup-s", type=float)
    args = ap.parse_args(argv)
    if args.concurrent and args.parallel_start:
        ap.error("--concurrent and --parallel-start: pick one")
    if args.slot < 0:
        ap.error("--slot must be >= 0")
    if args.online_duration_s < 0:
        ap.error("--online-duration-s must be >= 0")
    names = args.configs.split(",")
    if args.no_offline and not all(aps_of(args.online_aps, n) for n in names):
        ap.error("--no-offline needs online rates for every config in --configs (a config "
                 "without them would start its servers and run nothing)")
    stray = set(args.online_aps) - {None, *names}
    if stray:
        ap.error(f"--online-aps names configs not in --configs: {sorted(stray)}")
    unknown = set(names) - set(CONFIGS)
    if unknown:
        ap.error(f"unknown configs {sorted(unknown)}")
    if args.prefetch_io_threads < 1:
        ap.error("--prefetch-io-threads must be >= 1")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.concurrent:
        from dualpath.bench import concurrent

        return concurrent.run(list(sys.argv[1:] if argv is None else argv), args)
    logging.basicConfig(level=logging.INFO, format="[1p1d %(asctime)s] %(message)s",
                        datefmt="%H:%M:%S", handlers=[logging.StreamHandler(sys.stdout)])
    trajs = make_trace(args, seed=args.seed)
    shape = describe(trajs)
    working_set = sum(final_contexts(trajs))
    result = {"date": time.strftime("%Y-%m-%d"), "git_sha": git_sha(), **gpu_facts(),
              "model": args.model.name, "setup_s": args.setup_s, "snic_gbps": args.snic_gbps,
              "trace": {"preset": args.preset, "scale": args.scale, "initial": args.initial,
                        "seed": args.seed,
                        "agents": args.agents, "max_turns": args.max_turns, **shape},
              "working_set_tokens": working_set,
              "device_pool_tokens": args.max_total_tokens,
              "host_pool_tokens": int(args.hicache_ratio * args.max_total_tokens),
              "decode_pool_tokens": args.decode_max_total_tokens,
              "decode_host_pool_tokens": int(args.decode_hicache_ratio
                                             * args.decode_max_total_tokens),
              "mem_fraction": args.mem_fraction, "pd_backend": args.pd_backend,
              "prefill_cuda_graph": args.prefill_cuda_graph,
              "host_cache_tokens": args.host_cache_tokens,
              "device_cache_tokens": args.device_cache_tokens,
              "refetch_host_hits": args.refetch_host_hits,
              "async_page_indices": args.async_page_indices,
              "prefetch_io_threads": args.prefetch_io_threads,
              "online_duration_s": args.online_duration_s or None,
              "store_capacity_gb": args.store_capacity_gb or None,
              "buffer_gb": args.buffer_gb, "slo": {"ttft_s": SLO_TTFT_S,
                                                                     "tpot_s": SLO_TPOT_S},
              "configs": [], "ok": False}
    rc = 1
    room = store_room_warning(args.store_dir, 1, args.store_capacity_gb,
                              store_written_gb(args, trajs))
    if room:
        log.warning("%s", room)
        result["warnings"] = [room]

    def save() -> None:
        (args.out / "result.json").write_text(json.dumps(result) + "\n")

    started: list[PDCluster | None] = [None] * len(names)
    try:
        need = 2 * (args.slot + (len(names) if args.parallel_start else 1))
        if len(result["gpus"]) < need:
            raise RuntimeError(f"{len(names)} configs from slot {args.slot} "
                               f"({'parallel' if args.parallel_start else 'one at a time'}) "
                               f"need {need} GPUs, this host has {len(result['gpus'])}")
        for k, name in enumerate(names):
            res: dict = {}
            result["configs"].append(res)
            if args.parallel_start:
                started[k] = make_cluster(name, args, args.out, res, slot=args.slot + k)
        if args.parallel_start:
            stop_servers_on_sigterm()  # servers started from threads install no handler
            start_all([c for c in started if c is not None])
        for name, res, c in zip(names, result["configs"], started, strict=True):
            run_config(name, args, args.out, trajs, res, save, started=c)
        base = next((r for r in result["configs"] if r["config"] == "off"), None)
        for r in result["configs"]:
            if base is not None and r is not base and not r["oracle"] and not args.no_offline:
                r["outputs_match_off"] = outputs_match(base["offline"], r["offline"])
        result["ok"] = all(r["offline"].get("errors", 0) == 0 and all(
            x["errors"] == 0 for x in r["sweep"] + r["online"]) for r in result["configs"])
        rc = 0 if result["ok"] else 1
        if not args.no_offline:
            print(table(result["configs"]), flush=True)
        if any(r["online"] for r in result["configs"]):
            print(online_table(result["configs"]), flush=True)
        if args.snic_sweep and not args.no_offline:
            print(sweep_table(result["configs"], args.snic_gbps), flush=True)
    except (ServerError, OSError, RuntimeError) as e:
        result["failure"] = f"{type(e).__name__}: {e}"
        log.error("FAIL %s", result["failure"])
    finally:
        for c in started:
            if c is not None:
                c.stop()
        save()
        archive_logs(args.out)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())

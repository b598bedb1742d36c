"""PD KV transfer on a 2-GPU host: SGLang's NIXL backend vs our transfer engine under SGLang's
Mooncake backend (`--dualpath-pd-engine`), in one run, on the same prompts.

For each backend: boot 1P1D (+ router), send each prompt length (default 4k, 16k, 32k tokens;
fresh random ids, so nothing is cached) `--repeats` times, greedy ("cold": the KV send overlaps
the chunked prefill), then the first of those prompts `--repeats` times again ("warm": the
prefill finds it in its GPU cache and computes one page, the decode holds nothing, so the
prefill's forward + send is the KV transfer of the whole prompt), and record per request the
TTFT and SGLang's own stage times (prefill forward + KV send; decode's wait for the KV), then
stop. Checks that both backends give the same greedy tokens for the same prompt. Writes
result.json. Run through scripts/gpu_pd_transfer.sh.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import statistics
import time
from pathlib import Path

from dualpath.bench import client
from dualpath.bench.pd_cluster import ClusterSpec, PDCluster, run_args, start_run
from dualpath.bench.run_evidence import archive_logs, gil_delta, gil_snapshots
from dualpath.bench.servers import ServerError
from dualpath.bench.smoke import DEFAULT_MODEL, prompt
from dualpath.bench.stage_stats import LogCursor, parse_lines

log = logging.getLogger("dualpath.pd_transfer")


ENGINE_RE = re.compile(r"pd engine: (\d+) descriptors, ([\d.]+) MB to \S+: prepare ([\d.]+) ms, "
                       r"copy ([\d.]+) ms")


SENDER_RE = re.compile(r"pd send room \S+: ([\d.]+) ms from the last chunk queued to success"
                       r"(?:.*; wait ([\d.]+) ms, kv send ([\d.]+) ms, after ([\d.]+) ms)?")


def engine_times(lines) -> dict:
    """Our PD engine's own account of a request's transfers (its log lines for >= 256 MiB,
    transfer/mooncake_compat.py): descriptors, MB, preparation and copy time; and the Mooncake
    sender's time from the last chunk queued to success (sglang_plugin/pd_send.py); {} for
    NIXL."""
    rows = [m.groups() for m in map(ENGINE_RE.search, lines) if m]
    sender = [m for m in map(SENDER_RE.search, lines) if m]
    out = {}
    if sender:  # the slowest rank, and where its time went (wait / kv send / after)
        m = max(sender, key=lambda m: float(m.group(1)))
        out["sender_ms"] = round(float(m.group(1)), 2)
        if m.group(2) is not None:
            out.update(sender_wait_ms=float(m.group(2)), sender_kv_ms=float(m.group(3)),
                       sender_after_ms=float(m.group(4)))
    if not rows:
        return out
    return {"engine_descriptors": sum(int(r[0]) for r in rows),
            "engine_mb": round(sum(float(r[1]) for r in rows), 1),
            "engine_prepare_ms": round(sum(float(r[2]) for r in rows), 2),
            "engine_copy_ms": round(sum(float(r[3]) for r in rows), 2), **out}


def sglang_transfer_s(pre: dict) -> float | None:
    """The KV send as SGLang's prefill timed it, inside forward + send: its transfer_total
    (MiB) over transfer_speed (GiB/s, SGLang 0.5.17 req_time_stats: MiB / 1024 / latency), the
    backend's transfer latency (or, where the backend sets none, its last chunk's); None
    without both fields."""
    mb, gbps = pre.get("transfer_total_mb"), pre.get("transfer_speed_gbps")
    if not mb or not gbps:
        return None
    return round(mb / 1024 / gbps, 5)


def run_backend(name: str, args, out: Path) -> dict:
    root = Path(args.store_dir) / name
    shutil.rmtree(root, ignore_errors=True)
    spec = ClusterSpec(model=args.model, root=root, pd_backend=name,
                       max_total_tokens=args.max_total_tokens, snic_gbps=0.0,
                       decode_max_total_tokens=args.max_total_tokens,
                       stack_sample=args.stack_sample, gil_monitor=args.gil_monitor)
    res: dict = {"backend": name, "requests": []}
    try:
        with PDCluster(spec, out / name, args.health_timeout) as c:
            res["startup_s"] = c.startup_s
            client.generate(c.url, prompt(1, 1024), 4)  # warm-up: first-use compiles
            for n in args.lengths:
                cold = args.repeats if args.cold_repeats is None else args.cold_repeats
                for phase, k in ([("cold", k) for k in range(max(cold, 1))]
                                 + [("warm", k) for k in range(args.repeats if args.warm else 0)]):
                    seed = 1000 * n + (k if phase == "cold" else 0)  # warm: cold #0 again
                    cur = [LogCursor(p.log_path) for p in (c.pre, c.dec)]
                    ports = {"pe": c.pre.port, "de": c.dec.port}
                    gil0 = gil_snapshots(ports) if args.gil_monitor else {}
                    g = client.generate(c.url, prompt(seed, n), args.output_len)
                    time.sleep(0.5)  # the stats lines follow the response
                    gil = ({k: gil_delta(gil0.get(k), v) for k, v in gil_snapshots(ports).items()}
                           if args.gil_monitor else None)
                    lines = [x for cu in cur for x in cu.new_lines()]
                    stages = parse_lines(lines)
                    engine = engine_times(lines)
                    pre = next((r for r in stages if r["type"] == "prefill"), {})
                    dec = next((r for r in stages if r["type"] == "decode"), {})
                    res["requests"].append({
                        "prompt_len": n, "phase": phase, "repeat": k,
                        "ttft_s": round(g.ttft_s, 4), "output_ids": g.output_ids,
                        "prefill_cached": pre.get("cached_input_len"),
                        "prefill_forward_s": pre.get("forward_s"),
                        "prefill_transfer_s": sglang_transfer_s(pre),
                        "kv_mb": pre.get("transfer_total_mb"),
                        "decode_transfer_s": dec.get("transfer_s"), **engine, "gil": gil})
                    log.info("%s %d tokens %s #%d: TTFT %.3f s, prefill cached %s, fwd+send %s "
                             "s, decode waited %s s for %s MB", name, n, phase, k, g.ttft_s,
                             pre.get("cached_input_len"), pre.get("forward_s"),
                             dec.get("transfer_s"), pre.get("transfer_total_mb"))
                    for role, d in (gil or {}).items():
                        if d:
                            log.info("  %s GIL: %s stalls >= 5 ms, %.1f ms stalled, %d in a GC",
                                     role, d["stalls_ge_ms"].get("5"), 1e3 * d["stalled_s"],
                                     d["stalls_in_gc"])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return res


def summarize(res: dict) -> dict:
    """Medians per prompt length: cold TTFT / forward+send / decode wait, and the warm
    forward+send (the whole prompt's KV transfer; None without warm requests) with the part
    SGLang timed as the send ('send') and, for our engine, the Mooncake sender's time from
    the last chunk queued to success ('sender')."""
    by: dict[int, dict] = {}
    for r in res["requests"]:
        d = by.setdefault(r["prompt_len"], {"ttft": [], "fwd": [], "wait": [], "xfer": [],
                                            "send": [], "sender": []})
        if r.get("phase", "cold") == "warm":
            if r["prefill_forward_s"] is not None:
                d["xfer"].append(r["prefill_forward_s"])
            if r.get("prefill_transfer_s") is not None:
                d["send"].append(r["prefill_transfer_s"])
            if r.get("sender_ms") is not None:  # ours: queued -> success, in seconds
                d["sender"].append(r["sender_ms"] / 1e3)
            continue
        d["ttft"].append(r["ttft_s"])
        if r["prefill_forward_s"] is not None:
            d["fwd"].append(r["prefill_forward_s"])
        if r["decode_transfer_s"] is not None:
            d["wait"].append(r["decode_transfer_s"])
    return {n: {k: round(statistics.median(v), 4) if v else None for k, v in d.items()}
            for n, d in sorted(by.items())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--backends", default="nixl,dualpath")
    ap.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")],
                    default=[4096, 16384, 32768])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cold-repeats", type=int, default=None,
                    help="cold requests per length (default --repeats; at least 1: the warm "
                         "requests repeat cold #0)")
    ap.add_argument("--output-len", type=int, default=8)
    ap.add_argument("--no-warm", dest="warm", action="store_false",
                    help="skip the warm requests (prefill cache hit: forward + send = transfer)")
    ap.add_argument("--max-total-tokens", type=int, default=131072)
    ap.add_argument("--stack-sample", action="store_true",
                    help="sample both schedulers' stacks (all threads), per backend; with the "
                         "servers' logs in OUT/logs.tar.xz")
    ap.add_argument("--gil-monitor", action="store_true",
                    help="both servers time their GIL hand-overs (--dualpath-gil-monitor): "
                         "each request's stalls and GC pauses per server in its 'gil'")
    run_args(ap, "/dev/shm/dualpath-pd-transfer")
    args, head = start_run(ap, argv, "pd-transfer")
    result = {**head, "backends": [], "ok": False}
    rc = 1
    try:
        for name in args.backends.split(","):
            res = run_backend(name, args, args.out)
            res["summary"] = summarize(res)
            result["backends"].append(res)
            (args.out / "result.json").write_text(json.dumps(result) + "\n")
        outs = [{(r["prompt_len"], r.get("phase"), r["repeat"]): r["output_ids"]
                 for r in b["requests"]} for b in result["backends"]]
        result["outputs_match"] = all(o == outs[0] for o in outs[1:])
        result["ok"] = result["outputs_match"] and all(
            len(r["output_ids"]) == args.output_len for b in result["backends"]
            for r in b["requests"])
        print(f"{'tokens':>8}" + "".join(f"{b['backend'] + ' TTFT':>16}{'fwd+send':>10}"
                                          f"{'dec wait':>10}{'warm xfer':>10}"
                                          f"{'of: send':>10}{'sender':>10}"
                                          for b in result["backends"]))
        for n in args.lengths:
            line = f"{n:>8}"
            for b in result["backends"]:
                s = b["summary"].get(n, {})
                line += (f"{s.get('ttft')!s:>16}{s.get('fwd')!s:>10}{s.get('wait')!s:>10}"
                         f"{s.get('xfer')!s:>10}{s.get('send')!s:>10}"
                         f"{s.get('sender')!s:>10}")
            print(line)
        print("greedy outputs equal across backends:", result["outputs_match"], flush=True)
        rc = 0 if result["ok"] else 1
    except (ServerError, OSError, RuntimeError) as e:
        result["failure"] = f"{type(e).__name__}: {e}"
        log.error("FAIL %s", result["failure"])
    finally:
        (args.out / "result.json").write_text(json.dumps(result) + "\n")
        archive_logs(args.out)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())

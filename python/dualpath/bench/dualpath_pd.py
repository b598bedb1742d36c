"""The dual path on a 2-GPU host: 1P1D through the router, flag off and on, same multi-turn turns.

For each configuration it starts a prefill (GPU 0) and a decode (GPU 1) with
`python -m dualpath.launch_server` (each its own storage "node" with the storage-NIC cap), the
router in front, and replays one agent's turns: every turn is the previous context + the
server's greedy output + new tokens, and before every turn both servers' device and host caches
are flushed, so the stored prefix must come from the store. Configurations:
- `off`: stock PD + HiCache with the DualPath store at the prefill (router --read-side pe);
- `de`: --enable-dual-path, the router sends every stored prefix to the decode side;
- `split`: --enable-dual-path, each request's blocks are divided between both sides.
Checks: the same greedy outputs in every configuration; with the flag on, the decode node's
storage meter carries reads (and both nodes' in `split`). Records per-path bytes per turn.
Writes logs and summary.json to --out. Run through scripts/gpu_dualpath_pd.sh.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

from dualpath.bench import client
from dualpath.bench.pd_cluster import (
    DEC_PORT,
    PRE_PORT,
    ClusterSpec,
    PDCluster,
    agent_stats,
    run_args,
    start_run,
)
from dualpath.bench.pd_cluster import path_bytes as meters
from dualpath.bench.servers import ServerError
from dualpath.bench.smoke import DEFAULT_MODEL, SmokeFailure, check, prompt

log = logging.getLogger("dualpath.dualpath_pd")
READ_SIDE = {"off": "pe", "de": "de", "split": "split"}


def flush(url: str) -> None:
    for _ in range(60):  # refused while requests are in flight
        status, _ = client.post_json(url + "/flush_cache")
        if status == 200:
            return
        time.sleep(0.5)
    raise SmokeFailure(f"{url}/flush_cache kept refusing")


def run_config(name: str, args, out: Path) -> dict:
    on = name != "off"
    root = Path(args.store_dir) / name
    shutil.rmtree(root, ignore_errors=True)
    spec = ClusterSpec(model=args.model, root=root, dual_path=on, read_side=READ_SIDE[name],
                       snic_gbps=args.snic_gbps, max_total_tokens=args.max_total_tokens,
                       pd_backend=args.pd_backend)
    res: dict = {"config": name, "dual_path": on, "turns": []}
    with PDCluster(spec, out / name, args.health_timeout) as c:
        res["startup_s"] = c.startup_s
        pre, dec, router = c.pre, c.dec, c.router
        ctx = prompt(7, args.first_len)
        for turn in range(args.turns):
            if turn:
                flush(pre.url)
                flush(dec.url)
            before = {r: meters(agent_stats(p)) for r, p in (("pe", PRE_PORT),
                                                               ("de", DEC_PORT))}
            g = client.generate(router.url, ctx, args.output_len)
            time.sleep(args.settle_s)  # write-through to the store is asynchronous
            after = {r: meters(agent_stats(p)) for r, p in (("pe", PRE_PORT), ("de", DEC_PORT))}
            delta = {r: {k: after[r][k] - before[r][k] for k in after[r]} for r in after}
            res["turns"].append({"turn": turn, "prompt_len": len(ctx),
                                 "ttft_s": round(g.ttft_s, 4), "e2e_s": round(g.e2e_s, 4),
                                 "cached_tokens_details": g.cached_tokens_details,
                                 "bytes": delta, "output_ids": g.output_ids})
            log.info("%s turn %d: %d tokens, TTFT %.3f s, cached %s, bytes %s", name, turn,
                     len(ctx), g.ttft_s, g.cached_tokens_details, delta)
            check(len(g.output_ids) == args.output_len, f"{name} turn {turn}: full output")
            ctx = ctx + g.output_ids + prompt(100 + turn, args.append_len)
        res["agents"] = {"pe": agent_stats(PRE_PORT), "de": agent_stats(DEC_PORT)}
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--configs", default="off,de,split")
    ap.add_argument("--pd-backend", default="nixl")
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--first-len", type=int, default=4096)
    ap.add_argument("--append-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--max-total-tokens", type=int, default=32768)
    ap.add_argument("--snic-gbps", type=float, default=6.25,
                    help="storage-NIC cap per node (the issue's acceptance setting)")
    ap.add_argument("--settle-s", type=float, default=1.5)
    run_args(ap, "/dev/shm/dualpath-pd")
    args, head = start_run(ap, argv, "dualpath_pd")
    summary = {**head, "snic_gbps": args.snic_gbps,
               "turns": args.turns, "first_len": args.first_len, "append_len": args.append_len,
               "output_len": args.output_len, "configs": [], "ok": False}
    try:
        for name in args.configs.split(","):
            summary["configs"].append(run_config(name, args, args.out))
        outs = {c["config"]: [t["output_ids"] for t in c["turns"]] for c in summary["configs"]}
        first = next(iter(outs))
        for name, o in outs.items():
            check(o == outs[first], f"greedy outputs of '{name}' equal those of '{first}'")
        for c in summary["configs"]:
            de_read = sum(t["bytes"]["de"]["read_bytes"] for t in c["turns"])
            pe_read = sum(t["bytes"]["pe"]["read_bytes"] for t in c["turns"])
            c["read_bytes"] = {"pe": pe_read, "de": de_read, "total": pe_read + de_read}
            c["forwarded_bytes"] = sum(t["bytes"]["de"]["forwarded_bytes"] for t in c["turns"])
            c["write_bytes"] = {r: sum(t["bytes"][r]["write_bytes"] for t in c["turns"])
                                for r in ("pe", "de")}
            if c["config"] == "de":
                check(de_read > 0, f"'de': the decode node read {de_read} bytes from storage")
            if c["config"] == "split":
                check(de_read > 0 and pe_read > 0,
                      f"'split': both nodes read (pe {pe_read}, de {de_read} bytes)")
        summary["ok"] = True
    except (SmokeFailure, ServerError, OSError, RuntimeError) as e:
        summary["failure"] = f"{type(e).__name__}: {e}"
        log.error("FAIL %s", summary["failure"])
    finally:
        (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        brief = {k: v for k, v in summary.items() if k != "configs"}
        log.info("summary: %s", json.dumps(brief))
        for c in summary["configs"]:
            log.info("%s: read %s; turns %s", c["config"], c.get("read_bytes"),
                     [(t["ttft_s"], t["cached_tokens_details"], t["bytes"]) for t in c["turns"]])
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

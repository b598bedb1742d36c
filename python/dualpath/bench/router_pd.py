"""1P1D stock SGLang behind the DualPath router, on a 2-GPU host: the chat API through the router,
then `python -m sglang.benchmark.serving` against the router, which must finish with every
request successful. Writes logs, the benchmark's JSONL and summary.json to --out.

Run through scripts/gpu_router_pd.sh (installs the bundle first).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from dualpath.bench import client
from dualpath.bench.servers import ServerError, ServerProcess
from dualpath.bench.smoke import (
    DEFAULT_MODEL,
    SmokeFailure,
    check,
    gpu_facts,
    pd_pair,
    start_pd,
)
from dualpath.version import git_sha

log = logging.getLogger("dualpath.router_pd")


def run(args, out: Path, summary: dict) -> None:
    boot = 8998
    pre, dec = pd_pair(args.model, args.pd_backend, out, 30010, 30020, boot)
    router = ServerProcess("router", ["-m", "dualpath.router", "--prefill", pre.url, str(boot),
                                      "--decode", dec.url, "--port", str(args.router_port),
                                      "--policy", args.policy],
                           args.router_port, out / "router.log")
    procs = [pre, dec, router]
    try:
        summary["startup_pd_s"] = start_pd(pre, dec, args.health_timeout)
        router.start()
        router.wait_healthy(60)
        status, resp = client.post_json(router.url + "/v1/chat/completions", {
            "model": str(args.model), "max_tokens": 16, "temperature": 0.0,
            "messages": [{"role": "user", "content": "Name three prime numbers."}]}, 300)
        check(status == 200, f"chat through the router answered 200 ({status}: {str(resp)[:200]})")
        summary["chat_usage"] = resp.get("usage")
        bench_out = out / "bench_serving.jsonl"
        cmd = [sys.executable, "-m", "dualpath.bench.sglang_serving", "--backend", "sglang",
               "--base-url", router.url, "--model", str(args.model),
               "--tokenizer", str(args.model), "--dataset-name", "random-ids",
               "--num-prompts", str(args.num_prompts), "--random-input-len",
               str(args.input_len), "--random-output-len", str(args.output_len),
               "--random-range-ratio", "0.5", "--max-concurrency", str(args.concurrency),
               "--output-file", str(bench_out), "--seed", "1"]
        log.info("bench: %s", " ".join(cmd))
        t0 = time.time()
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.bench_timeout)
        (out / "bench_serving.log").write_text(res.stdout + res.stderr)
        summary["bench_wall_s"] = round(time.time() - t0, 1)
        check(res.returncode == 0, f"sglang.benchmark.serving exited {res.returncode}")
        m = re.search(r"Successful requests:\s+(\d+)", res.stdout)
        ok = int(m.group(1)) if m else -1
        summary["bench"] = {"successful": ok, "num_prompts": args.num_prompts,
                            **_bench_numbers(res.stdout)}
        check(ok == args.num_prompts, f"{ok} of {args.num_prompts} requests succeeded")
        with urllib.request.urlopen(router.url + "/metrics", timeout=10) as r:
            metrics = r.read().decode()
        summary["router_requests"] = re.findall(r'dualpath_router_requests_total\{[^}]*\} \S+',
                                                metrics)
    finally:
        for p in reversed(procs):
            p.stop()


def _bench_numbers(text: str) -> dict:
    keys = {"Request throughput (req/s)": "req_s", "Output token throughput (tok/s)": "out_tok_s",
            "Mean TTFT (ms)": "ttft_mean_ms", "Median TTFT (ms)": "ttft_p50_ms",
            "Mean TPOT (ms)": "tpot_mean_ms", "Benchmark duration (s)": "duration_s"}
    out = {}
    for label, key in keys.items():
        m = re.search(re.escape(label) + r":\s+([\d.]+)", text)
        if m:
            out[key] = float(m.group(1))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--policy", default="dualpath", choices=["dualpath", "round_robin", "random"])
    ap.add_argument("--pd-backend", default="nixl")
    ap.add_argument("--router-port", type=int, default=8000)
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=2048)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--health-timeout", type=float, default=400)
    ap.add_argument("--bench-timeout", type=float, default=300)
    ap.add_argument("--setup-s", type=float, help="install time to record in the summary")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="[router_pd %(asctime)s] %(message)s",
                        datefmt="%H:%M:%S", handlers=[logging.StreamHandler(sys.stdout)])
    summary = {"date": time.strftime("%Y-%m-%d"), "git_sha": git_sha(), **gpu_facts(),
               "model": args.model.name, "policy": args.policy, "setup_s": args.setup_s,
               "ok": False}
    try:
        run(args, args.out, summary)
        summary["ok"] = True
    except (SmokeFailure, ServerError, subprocess.TimeoutExpired) as e:
        summary["failure"] = str(e)
        log.error("FAIL %s", e)
    finally:
        (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        log.info("summary: %s", json.dumps(summary))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env bash
# The DualPath router in front of stock SGLang 1P1D on a 2-GPU host: prefill on GPU 0, decode on
# GPU 1 (PD over NIXL), router on :8000. Checks the chat API through the router, then runs
# `python -m sglang.benchmark.serving` (random-ids, 64 prompts) against the router and requires
# every request to succeed. Writes logs, the benchmark output and summary.json to --out
# (default .cache/router_pd).
#
#   bash scripts/gpu_router_pd.sh [--out DIR] [--policy dualpath|round_robin|random]
#        [setup/cache options: scripts/gpu_run.sh] [python -m dualpath.bench.router_pd -h]
set -euo pipefail
case " $* " in *" -h "*|*" --help "*) sed -n '2,/^set -e/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;; esac
exec bash "$(dirname "$0")/gpu_run.sh" dualpath.bench.router_pd "$@"

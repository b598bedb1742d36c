#!/usr/bin/env bash
# The 1P1D agentic comparison on a 2-GPU host (one call, < 10 minutes with the defaults):
# installs the bundle, boots prefill (GPU 0) + decode (GPU 1) + router with DualPath off, replays
# the trace (offline JCT, optional online sweep), stops, boots with DualPath on, replays the same
# trace, prints a side-by-side table (JCT, turns/s, TTFT/TPOT percentiles, storage GB/s per
# node) and writes result.json to --out (default .cache/compare_1p1d). Plot it anywhere with
# `python -m dualpath.bench.plots OUT/result.json`.
#
#   bash scripts/bench_1p1d.sh [--configs off,on,oracle] [--agents 16] [--max-turns 20]
#        [--online-aps 0.5,1,2 | off=0.35/0.4,on=0.7] [--online-duration-s 180] [--no-offline]
#        [--store-capacity-gb 80] [--snic-gbps 6.25] [--warmup-agents 4] [--torch-profile N]
#        [--h2d-kernel sglang|ours] [--parallel-start | --concurrent] [--out DIR]
#        [setup/cache options: scripts/gpu_run.sh] [python -m dualpath.bench.compare_1p1d -h]
#
# On a 4-GPU host, --parallel-start boots both configs at once and measures them one after
# the other; --concurrent also measures them at the same time (one process per config, the
# host's CPUs shared): the online runs of both arms in one call.
set -euo pipefail
case " $* " in *" -h "*|*" --help "*) sed -n '2,/^set -e/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;; esac
exec bash "$(dirname "$0")/gpu_run.sh" dualpath.bench.compare_1p1d "$@"

#!/usr/bin/env bash
# Smoke test of stock SGLang 0.5.17 on a GPU host, from a fresh checkout plus the offline bundle:
# installs the bundle and dualpath (scripts/gpu_setup.sh), starts one server (dummy weights,
# triton attention, HiCache with the `file` L3 backend on /dev/shm), sends a 4k-token prompt,
# flushes the cache, sends it again and asserts it was served from storage with the same greedy
# output; checks the chat API. With --pd (2 GPUs) also runs a prefill + a decode server over NIXL.
# Prints startup time, TTFT and decode tok/s; writes logs and summary.json to --out
# (default .cache/smoke).
#
#   bash scripts/gpu_smoke.sh [--pd] [--out DIR] [--bundle DIR] [--target DIR] [--skip-setup]
#        [--cache-dir DIR] [--load-cache FILE] [--save-cache FILE]
#        [smoke options: python -m dualpath.bench.smoke -h]
#
# With --l3-backend dualpath the same checks run with the DualPath block store as SGLang's L3
# (issue 4's GPU check: --l3-backend dualpath --prompt-len 8192).
# Setup and compile-cache options: scripts/gpu_run.sh. Exit status 0 = all checks passed.
set -euo pipefail
case " $* " in *" -h "*|*" --help "*) sed -n '2,/^set -e/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;; esac
exec bash "$(dirname "$0")/gpu_run.sh" dualpath.bench.smoke "$@"

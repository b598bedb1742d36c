#!/usr/bin/env bash
# The transfer engine on a GPU host (2 GPUs for the peer cases): test/transfer on the GPU (every
# backend built, the cuda backend with device memory and CUDA IPC), then
# benchmark/transfer/bench_cuda.py (1 GiB GPU->GPU and pinned H2D vs torch copies; scattered
# 16-128 KiB chunks: batched kernel vs a cudaMemcpyAsync per chunk; submit overhead). Logs,
# JSONL and summary.json go to --out (default .cache/gpu_transfer).
#
#   bash scripts/gpu_transfer.sh [--out DIR] [--bench-args "--repeats 5"]
#        [setup/cache options: scripts/gpu_run.sh]
set -euo pipefail
case " $* " in *" -h "*|*" --help "*) sed -n '2,/^set -e/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;; esac
exec bash "$(dirname "$0")/gpu_run.sh" dualpath.bench.gpu_transfer "$@"

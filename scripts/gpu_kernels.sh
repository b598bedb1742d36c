#!/usr/bin/env bash
# The KV copy kernels on a GPU host: byte-exact tests on the GPU (test/ops with larger odd
# sizes), then benchmark/kernels/bench_copy_kv.py (GB/s, fraction of the copy and PCIe peaks
# measured in the same run, SGLang's kvcacheio kernels as the peer). Logs, JSONL and
# summary.json go to --out (default .cache/gpu_kernels).
#
#   bash scripts/gpu_kernels.sh [--out DIR] [--bench-args "--models 8b --pages 64"] [--ncu]
#        [setup/cache options: scripts/gpu_run.sh]
#
# --ncu: after the benchmark, profile one copy_kv launch with the command below (8B, 64-token
# pages, 64 pages, d2d gather, CUDA kernel; sections SpeedOfLight and MemoryWorkloadAnalysis);
# the report goes to OUT/ncu.txt and its outcome into summary.json (also when ncu is missing
# or may not read the GPU's counters).
#
# Profile one launch under Nsight Compute (the GPU host has ncu):
#   source .site/env.sh && ncu --clock-control none --target-processes all -k regex:copy_kv \
#     -c 1 python3 benchmark/kernels/bench_copy_kv.py --models 8b --page-sizes 64 --pages 64 \
#     --moves d2d_gather
set -euo pipefail
case " $* " in *" -h "*|*" --help "*) sed -n '2,/^set -e/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;; esac
exec bash "$(dirname "$0")/gpu_run.sh" dualpath.bench.gpu_kernels "$@"

#!/usr/bin/env bash
# The dual path on a 2-GPU host (issue 7's GPU check): 1P1D behind the DualPath router, started
# with `python -m dualpath.launch_server`, flag off (baseline), then on with every stored prefix
# read by the decode side, then on with split reads; the same multi-turn turns each time with
# the caches flushed between turns; storage-NIC cap 6.25 GB/s per node. Passes when the greedy
# outputs agree and the decode node's storage meter carries reads. Logs and summary.json (per
# turn: TTFT, cached tokens by tier, bytes read per node and forwarded DE->PE) go to --out
# (default .cache/dualpath_pd).
#
#   bash scripts/gpu_dualpath_pd.sh [--out DIR] [--configs off,de,split] [--turns N]
#        [setup/cache options: scripts/gpu_run.sh] [python -m dualpath.bench.dualpath_pd -h]
set -euo pipefail
case " $* " in *" -h "*|*" --help "*) sed -n '2,/^set -e/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;; esac
exec bash "$(dirname "$0")/gpu_run.sh" dualpath.bench.dualpath_pd "$@"

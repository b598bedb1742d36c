#!/usr/bin/env bash
# PD KV transfer on a 2-GPU host: SGLang's NIXL backend vs our transfer engine under SGLang's
# Mooncake backend (--dualpath-pd-engine), same prompts (4k/16k/32k tokens), per-request TTFT
# and SGLang's stage times (the send apart), greedy outputs compared. result.json and
# logs.tar.xz (servers' logs; stack samples with --stack-sample) go to --out (default
# .cache/pd_transfer).
#
#   bash scripts/gpu_pd_transfer.sh [--backends nixl,dualpath] [--lengths 4096,16384,32768]
#        [--repeats 3] [--cold-repeats N] [--stack-sample] [--gil-monitor]
#        [setup/cache options: scripts/gpu_run.sh]
set -euo pipefail
case " $* " in *" -h "*|*" --help "*) sed -n '2,/^set -e/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;; esac
exec bash "$(dirname "$0")/gpu_run.sh" dualpath.bench.pd_transfer "$@"

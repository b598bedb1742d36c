#!/usr/bin/env bash
# Run one of dualpath's GPU-host checks from a fresh checkout plus the offline bundle: installs
# the bundle and dualpath (scripts/gpu_setup.sh), points the compile caches at --cache-dir,
# sources the environment, then runs `python3 -m MODULE --out OUT --setup-s SECONDS [ARGS]`.
#
#   bash scripts/gpu_run.sh MODULE [--out DIR] [--bundle DIR] [--target DIR] [--skip-setup]
#        [--cache-dir DIR] [--load-cache FILE] [--save-cache FILE] [module options]
#
# --cache-dir (default .cache/jit) holds the Triton, tvm-ffi and torch-extension compile caches.
# --save-cache FILE packs it (tar.xz, ~2 MiB) after the run; --load-cache FILE unpacks one into
# it first: carry that file to a fresh host of the same GPU model to skip first-start compiles.
# Exit status: the module's (0 = all its checks passed); 2 for bad arguments or a bad host.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
[ $# -ge 1 ] && [ "${1#-}" = "$1" ] || { sed -n '2,/^set -e/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 2; }
MODULE=$1; shift
NAME=${MODULE##*.}
OUT=$REPO/.cache/$NAME
CACHE=$REPO/.cache/jit
TARGET=$REPO/.site
SETUP=(--target "$TARGET")
SKIP_SETUP=0
LOAD_CACHE="" SAVE_CACHE=""
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=$2; shift 2 ;;
    --bundle) SETUP+=(--bundle "$2"); shift 2 ;;
    --target) TARGET=$2; SETUP+=(--target "$2"); shift 2 ;;
    --cache-dir) CACHE=$2; shift 2 ;;
    --load-cache) LOAD_CACHE=$2; shift 2 ;;
    --save-cache) SAVE_CACHE=$2; shift 2 ;;
    --skip-setup) SKIP_SETUP=1; shift ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
mkdir -p "$OUT" "$CACHE"
if [ -n "$LOAD_CACHE" ]; then
  [ -f "$LOAD_CACHE" ] || { echo "error: --load-cache $LOAD_CACHE: no such file" >&2; exit 2; }
  tar -C "$CACHE" -xJf "$LOAD_CACHE"
  echo "gpu_run: compile caches from $LOAD_CACHE -> $CACHE ($(du -sh "$CACHE" | cut -f1))"
fi
export TRITON_CACHE_DIR=$CACHE/triton TVM_FFI_CACHE_DIR=$CACHE/tvm-ffi \
       TORCH_EXTENSIONS_DIR=$CACHE/torch_extensions PYTHONUNBUFFERED=1
T0=$(date +%s)
if [ $SKIP_SETUP = 0 ]; then
  bash "$REPO/scripts/gpu_setup.sh" "${SETUP[@]}"
fi
T1=$(date +%s)
[ -f "$TARGET/env.sh" ] || { echo "error: $TARGET/env.sh missing: run without --skip-setup" >&2; exit 2; }
# shellcheck disable=SC1091
source "$TARGET/env.sh"
rc=0
# in the background + wait, so that a TERM/INT sent to this script (e.g. by `timeout`) reaches
# the module, which then stops its servers (they run in their own sessions) before it exits
python3 -m "$MODULE" --out "$OUT" --setup-s $((T1 - T0)) ${ARGS[@]+"${ARGS[@]}"} &
CHILD=$!
trap 'kill -TERM $CHILD 2>/dev/null' TERM
trap 'kill -INT $CHILD 2>/dev/null' INT
while :; do
  wait $CHILD && { rc=0; break; } || rc=$?
  kill -0 $CHILD 2>/dev/null || break  # exited (not just a trapped signal ending the wait)
done
trap - TERM INT
if [ -n "$SAVE_CACHE" ]; then
  tar -C "$CACHE" -cf - . | xz -T0 -6 > "$SAVE_CACHE"
  echo "gpu_run: compile caches saved to $SAVE_CACHE ($(du -h "$SAVE_CACHE" | cut -f1))"
fi
echo "gpu_run: $MODULE: setup $((T1 - T0)) s, run $(( $(date +%s) - T1 )) s, exit $rc; summary: $OUT/summary.json"
exit $rc

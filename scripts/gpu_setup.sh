#!/usr/bin/env bash
# Install the serving stack on an air-gapped GPU host from the offline bundle, with no package
# index: SGLang 0.5.17 and its pins from the bundle, then this checkout's dualpath package
# (built here, with CUDA when nvcc and torch's CUDA are present), then check the imports.
#
#   bash scripts/gpu_setup.sh [--bundle DIR] [--target DIR | --venv VENV] [--python PY]
#                             [--no-project] [--no-check] [--no-hash-ext]
#   source <target>/env.sh        # PYTHONPATH and offline settings for every later command
#
# --target DIR (default .site/): everything goes into DIR, which env.sh puts on PYTHONPATH.
# --venv VENV: an existing virtualenv that has the host's torch; the bundle goes into
#   VENV/dualpath-bundle (put on its sys.path by a .pth file, ahead of system site-packages),
#   dualpath is pip-installed into the venv, and env.sh (VENV/dualpath-bundle/env.sh) activates it.
#
# The host must have Python 3.12 and torch 2.11.0 built for CUDA 13 (the bundle checks and names
# any mismatch), plus g++, cmake and nvcc to build dualpath. Build the bundle elsewhere with
# scripts/make_gpu_bundle.py. Exit status: 0 ok, 2 bad bundle or host, 1 anything else.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
BUNDLE=$REPO/.bundle
TARGET=$REPO/.site
PY=python3
VENV=""
PROJECT=1 CHECK=1 HASH_EXT=1
usage() { sed -n '2,/^set -e/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --bundle) BUNDLE=$2; shift 2 ;;
    --target) TARGET=$2; shift 2 ;;
    --python) PY=$2; shift 2 ;;
    --venv) VENV=$2; shift 2 ;;
    --no-project) PROJECT=0; shift ;;
    --no-check) CHECK=0; shift ;;
    --no-hash-ext) HASH_EXT=0; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_setup.sh: unknown argument $1" >&2; usage >&2; exit 1 ;;
  esac
done
if [ -n "$VENV" ]; then
  [ -x "$VENV/bin/python" ] || {
    echo "error: --venv $VENV has no bin/python: create it first, with torch installed" >&2; exit 2; }
  VENV=$(cd "$VENV" && pwd)
  PY=$VENV/bin/python
  TARGET=$VENV/dualpath-bundle
fi
command -v "$PY" >/dev/null || { echo "error: Python interpreter '$PY' not found" >&2; exit 2; }
T0=$(date +%s)
step() { echo "[gpu_setup +$(( $(date +%s) - T0 ))s] $*"; }

step "install bundle $BUNDLE -> $TARGET"
# Runs under the target interpreter, before anything is on PYTHONPATH: it checks Python, torch
# and every part's sha256 first, and exits 2 with a message naming what is wrong.
env -u PYTHONPATH "$PY" "$REPO/python/dualpath/deploy/bundle.py" install --bundle "$BUNDLE" \
  --target "$TARGET"
TARGET=$(cd "$TARGET" && pwd)
if [ -n "$VENV" ]; then
  SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "$TARGET" > "$SITE/dualpath-bundle.pth"
fi

# ---- the environment every later command needs ----
ENVSH=$TARGET/env.sh
{
  echo "# written by scripts/gpu_setup.sh on $(date -u +%FT%TZ); source it before running SGLang"
  if [ -n "$VENV" ]; then
    echo "source \"$VENV/bin/activate\""
  else
    echo "export PYTHONPATH=\"$TARGET\${PYTHONPATH:+:\$PYTHONPATH}\""
  fi
  echo "export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1"
  # Bytecode cache in a directory we own. Without it, on hosts that set PYTHONDONTWRITEBYTECODE
  # and ship no .pyc (our GPU host), every SGLang process (server, scheduler, detokenizer)
  # recompiles torch, sympy, transformers and sglang from source: ~20 s per process start.
  echo "export PYTHONPYCACHEPREFIX=\"$TARGET/_pycache\""
  echo "unset PYTHONDONTWRITEBYTECODE"
  # SGLang's HiCache hash extension is JIT-compiled with <openssl/sha.h> and -lcrypto.
  if [ ! -f /usr/include/openssl/sha.h ] && [ -d "$TARGET/_extras/openssl-include" ]; then
    echo "export CPATH=\"$TARGET/_extras/openssl-include\${CPATH:+:\$CPATH}\""
  fi
  if ! ls /usr/lib/x86_64-linux-gnu/libcrypto.so /usr/lib64/libcrypto.so >/dev/null 2>&1; then
    so=$(ls /usr/lib/x86_64-linux-gnu/libcrypto.so.* /usr/lib64/libcrypto.so.* 2>/dev/null | head -1 || true)
    if [ -n "$so" ]; then
      mkdir -p "$TARGET/_extras/lib" && ln -sf "$so" "$TARGET/_extras/lib/libcrypto.so"
      echo "export LIBRARY_PATH=\"$TARGET/_extras/lib\${LIBRARY_PATH:+:\$LIBRARY_PATH}\""
    fi
  fi
} > "$ENVSH"
# shellcheck disable=SC1090
source "$ENVSH"

PRECOMPILE_PID=""
if [ $CHECK = 1 ]; then
  # Bytecode for the stack on every core while dualpath builds: the import check and every
  # server process then find it under PYTHONPYCACHEPREFIX. Alone, the import check compiled it
  # on one core (~35 s of a ~90 s setup on the GPU host). Errors only cost that time back.
  TORCH_DIR=$(env -u PYTHONPATH "$PY" -c 'import importlib.util as u
s = u.find_spec("torch"); print(s.submodule_search_locations[0] if s else "")' 2>/dev/null || true)
  ( "$PY" -m compileall -q -j 0 -x '/_pycache/' "$TARGET" ${TORCH_DIR:+"$TORCH_DIR"} \
      > "$TARGET/_compileall.log" 2>&1 || true ) &
  PRECOMPILE_PID=$!
fi

if [ $PROJECT = 1 ]; then
  step "build and install dualpath from $REPO"
  for tool in cmake g++; do
    command -v $tool >/dev/null || { echo "error: $tool is needed to build dualpath" >&2; exit 2; }
  done
  where=(--target "$TARGET")
  [ -n "$VENV" ] && where=()
  if ! "$PY" -m pip install --no-deps --no-build-isolation --no-index --no-cache-dir \
       --disable-pip-version-check --upgrade ${where[@]+"${where[@]}"} "$REPO" \
       > "$TARGET/_build.log" 2>&1
  then
    tail -40 "$TARGET/_build.log" >&2
    echo "error: building dualpath failed (full log: $TARGET/_build.log)" >&2
    exit 1
  fi
  grep -m1 "dualpath: CUDA sources" "$TARGET/_build.log" || true
fi

# the shipped model dirs keep tokenizer.json xz-compressed (python/dualpath/models.py)
"$PY" "$REPO/python/dualpath/models.py" "$REPO"/configs/models/*/

if [ $CHECK = 1 ]; then
  step "bytecode (compileall, all cores)"
  wait "$PRECOMPILE_PID" || true
  step "import check"
  no_project=()
  [ $PROJECT = 1 ] || no_project=(--no-project)
  "$PY" "$REPO/python/dualpath/deploy/bundle.py" check-imports ${no_project[@]+"${no_project[@]}"}
  [ $PROJECT = 1 ] && "$PY" -m dualpath
  if [ $HASH_EXT = 1 ]; then
    step "build SGLang's HiCache hash extension (JIT; cached in TORCH_EXTENSIONS_DIR)"
    "$PY" -c "from sglang.srt.mem_cache.cpp_utils.native_hash import _load_native_hash_module as f; f()"
  fi
fi
step "done: run 'source $ENVSH' before starting servers"

#!/usr/bin/env bash
# The project's test command (CPU only; what CI runs): makes a virtualenv (default .venv, kept
# between runs), installs dualpath with its [dev] extra, then runs ruff and pytest.
# Extra arguments go to pytest, e.g.  bash scripts/run_tests.sh -k bundle -x
# Env: VENV (virtualenv dir), PYTHON (interpreter that creates it, default python3),
# DUALPATH_TEST_SGLANG (default 1: install SGLang without its GPU dependencies so that
# test/sglang_plugin runs; 0: don't, and those tests skip).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -U pip
# torch first, pinned to a CPU build where one is at hand (the CI machines keep torch 2.13.0 CPU
# on disk); left alone if the venv already has a torch. Otherwise [dev]'s "torch" could pull a
# multi-GB CUDA build onto a CPU-only machine.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "torch==2.13.0"
fi
# SGLang 0.5.17 for test/sglang_plugin (skipped without it), CPU only: the wheel with --no-deps
# (its metadata pins a CUDA torch, flashinfer, sglang-kernel, ...) plus what importing the hooked
# modules needs (test/requirements-sglang-cpu.txt), under a constraint that holds torch at the
# venv's build. Before [dev], which then finds SGLang's transformers pin already satisfying it.
# Skipped when the venv already imports sglang 0.5.17, or with DUALPATH_TEST_SGLANG=0.
test_sglang=$("$VENV/bin/python" -c '
import importlib.util, sys
spec = importlib.util.spec_from_file_location("_dualpath_env", "python/dualpath/env.py")
env = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(env)
print(int(env.TEST_SGLANG.get()))')
if [ "$test_sglang" = 1 ] && ! "$VENV/bin/python" -c \
    'import sys, sglang; sys.exit(sglang.__version__ != "0.5.17")' >/dev/null 2>&1; then
  started=$SECONDS
  pip_q=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
  constraints=$(mktemp)
  trap 'rm -f "$constraints"' EXIT
  "$VENV/bin/python" -c 'import importlib.metadata as m; print("torch==" + m.version("torch"))' \
    >"$constraints"
  "${pip_q[@]}" -c "$constraints" -r test/requirements-sglang-cpu.txt
  rm -f "$constraints"
  # torchvision (sglang.srt.utils imports torchvision.io): the release paired with the venv's
  # torch (2.N -> 0.N+15), --no-deps since it pins torch exactly. PyPI has only its CUDA build,
  # whose C++ ops cannot load against a CPU torch; torchvision then skips its ops, except two
  # fake-kernel registrations for nms/qnms that fail the import. Those are switched to the
  # guarded register_meta the other ops use, only when the import fails.
  if ! "$VENV/bin/python" -c 'import importlib.metadata as m; m.version("torchvision")' \
      2>/dev/null; then
    tv_minor=$(( $("$VENV/bin/python" -c \
      'import importlib.metadata as m; print(m.version("torch").split(".")[1])') + 15 ))
    "${pip_q[@]}" --no-deps "torchvision==0.$tv_minor.*"
  fi
  if ! "$VENV/bin/python" -c 'import torchvision' >/dev/null 2>&1; then
    tv_dir=$("$VENV/bin/python" -c \
      'import importlib.util as u; print(u.find_spec("torchvision").submodule_search_locations[0])')
    sed -i -E 's/^@torch\.library\.register_fake\("torchvision::(q?nms)"\)$/@register_meta("\1")/' \
      "$tv_dir/_meta_registrations.py"
    "$VENV/bin/python" -W ignore -c 'import torchvision'
  fi
  "${pip_q[@]}" --no-deps sglang==0.5.17
  "$VENV/bin/python" -W ignore -c 'import sglang.srt.managers.scheduler'
  echo "run_tests.sh: sglang 0.5.17 (CPU, no GPU deps) installed in $((SECONDS - started))s"
fi
# (with SGLang in the venv, pip would list its unmet GPU pins as conflicts on every install)
dev_flags=()
if [ "$test_sglang" = 1 ]; then dev_flags=(--no-warn-conflicts); fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "${dev_flags[@]}" -e '.[dev]'
"$VENV/bin/python" -m ruff check .
"$VENV/bin/python" python/dualpath/models.py  # unpack configs/models/*/tokenizer.json
exec "$VENV/bin/python" -m pytest "$@"

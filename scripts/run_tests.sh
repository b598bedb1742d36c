#!/usr/bin/env bash
# The project's test command (CPU only; what CI runs): makes a virtualenv (default .venv, kept
# between runs), installs dualpath with its [dev] extra, then runs ruff and pytest.
# Extra arguments go to pytest, e.g.  bash scripts/run_tests.sh -k bundle -x
# Env: VENV (virtualenv dir), PYTHON (interpreter that creates it, default python3).
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
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[dev]'
"$VENV/bin/python" -m ruff check .
exec "$VENV/bin/python" -m pytest "$@"

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
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[dev]'
"$VENV/bin/python" -m ruff check .
exec "$VENV/bin/python" -m pytest "$@"

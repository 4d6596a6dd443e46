#!/usr/bin/env bash
# Set up a virtual environment on a fresh machine and run the default (fast) test suite.
# Usage: bash scripts/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ALTLORA_VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --disable-pip-version-check "pip<=25.3"
# The CPU build of torch must come first: a bare `torch` requirement pulls CUDA wheels.
"$PY" -m pip install -q torch==2.13.0
"$PY" -m pip install -q -e ".[dev]"
exec "$PY" -m pytest -q "$@"

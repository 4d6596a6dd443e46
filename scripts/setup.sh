#!/usr/bin/env bash
# Create (or reuse) the virtual environment and install the package with the given extras.
# Usage: bash scripts/setup.sh [EXTRAS]   e.g. `bash scripts/setup.sh dev`; ALTLORA_VENV picks the folder.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ALTLORA_VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
# pip <= 25.3: newer pip refuses to download the bigbench sdist that holds the arithmetic task.
"$PY" -m pip install -q --disable-pip-version-check "pip<=25.3"
# The CPU build of torch must come first: a bare `torch` requirement pulls CUDA wheels.
"$PY" -m pip install -q torch==2.13.0
"$PY" -m pip install -q -e ".${1:+[$1]}"

#!/usr/bin/env bash
# Set up a virtual environment on a fresh machine and run the default (fast) test suite.
# Usage: bash scripts/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
exec "${ALTLORA_VENV:-.venv}/bin/python" -m pytest -q "$@"

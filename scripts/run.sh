#!/usr/bin/env bash
# The main command: on a fresh machine, set everything up (virtual environment, CPU torch,
# dependencies, offline assets) and run the default job: fine-tune SmolLM2-135M on BIG-bench
# arithmetic (2-digit addition and subtraction) with AltLoRA+, about 4.5 minutes on 2 idle CPU cores.
# Usage: bash scripts/run.sh [altlora train flags]   e.g. --optimizer lora --lr 1e-3
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh train
ALTLORA="${ALTLORA_VENV:-.venv}/bin/altlora"
"$ALTLORA" assets fetch smollm2-135m arithmetic
exec "$ALTLORA" train --output_dir "runs/arithmetic-$(date +%Y%m%d-%H%M%S)" "$@"

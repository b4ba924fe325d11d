#!/usr/bin/env bash
# The main job (README): set up, then `flowkern demo`: align the tiny flow model that ships inside the package
# to a pixel reward with VGG-Flow, through the same Trainer, SD3 adapter and fused ops as a real SD3 run, and write
# a report folder (reward curve, before/after grid, diversity, prior preservation, metrics.json).
# Extra arguments go to the demo, e.g. `bash scripts/main.sh --methods all` for every method side by side.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/setup.sh
"$PY" -m flowkern demo --out runs/demo "$@"

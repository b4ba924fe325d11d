#!/usr/bin/env bash
# The main job (README): setup, then the op benchmarks side by side at SD3-medium 512px, B=4
# (flowkern backends vs eager PyTorch vs torch.compile), JSON under benchmarks/results/local/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/setup.sh
mkdir -p benchmarks/results/local
out="benchmarks/results/local/$(date +%Y%m%d-%H%M%S).json"
"$PY" -m pytest benchmarks -q -p no:cacheprovider -k "B4" --benchmark-json "$out" \
  --benchmark-columns=median,iqr,rounds --benchmark-sort=fullname --benchmark-group-by=param:case,param:mode,param:dtype "$@"
"$PY" benchmarks/plot.py --strip "$out"

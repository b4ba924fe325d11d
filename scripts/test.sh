#!/usr/bin/env bash
# The test command (README, .ci/run): setup, lint, the test suite, benchmark smoke, CUDA compile-check.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/setup.sh
"$PY" -m ruff check .
"$PY" -m ruff format --check .
"$PY" -m pytest tests -m "not gpu" -q -p no:cacheprovider
"$PY" -m pytest benchmarks --benchmark-disable -q -p no:cacheprovider
# the GPU proof's plumbing on the CPU (scripts/gpu_check.sh, docs/gpu_check.md): tiny shapes, torch + Triton interpreter
dry=$(mktemp -d)
PYTHON="$PY" bash scripts/gpu_check.sh "$dry" --dry-run
rm -rf "$dry"
if command -v nvcc >/dev/null 2>&1; then
  bash scripts/cuda_compile_check.sh
else
  echo "nvcc not found: CUDA compile-check skipped"
fi

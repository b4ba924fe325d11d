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
if command -v nvcc >/dev/null 2>&1; then
  # CPU-only machines can compile-check the torch-free kernel headers (design.md section 4)
  nvcc -c -std=c++20 -gencode arch=compute_90a,code=sm_90a -I csrc/include csrc/compile_check/kernels.cu -o /tmp/flowkern_kernels.o
  echo "nvcc sm_90a compile-check of csrc/cuda/*_kernel.cuh: ok"
fi

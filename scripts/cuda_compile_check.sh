#!/usr/bin/env bash
# Compile-check the CUDA sources for Hopper (sm_90a) on a machine without a GPU (design.md section 4):
# 1. the torch-free kernel headers, all instantiations (csrc/compile_check/kernels.cu), ~5 s;
# 2. the launchers csrc/cuda/*.cu against torch's headers. A CPU-only torch wheel lacks one generated
#    header (c10/cuda/impl/cuda_cmake_macros.h); an empty stand-in in a temp dir is enough to compile
#    (never to link). Two launchers at a time, ~30 s each.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
ARCH="-gencode arch=compute_90a,code=sm_90a"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
nvcc -c -std=c++20 $ARCH -I csrc/include csrc/compile_check/kernels.cu -o "$tmp/kernels.o"
echo "nvcc sm_90a: csrc/cuda/*_kernel.cuh ok"
mkdir -p "$tmp/stub/c10/cuda/impl"
echo "#pragma once" >"$tmp/stub/c10/cuda/impl/cuda_cmake_macros.h"
torch_inc=$("$PY" -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-I' + p for p in include_paths()))")
export ARCH torch_inc tmp
ls csrc/cuda/*.cu | xargs -P "${MAX_JOBS:-2}" -I{} sh -c \
  'nvcc -c -std=c++20 $ARCH -DFLOWKERN_WITH_CUDA -w -I "$tmp/stub" -I csrc/include -I csrc $torch_inc {} -o "$tmp/$(basename {}).o" || { echo "nvcc failed: {}"; exit 255; }'
echo "nvcc sm_90a: csrc/cuda/*.cu launchers ok ($(ls csrc/cuda/*.cu | wc -l) files)"

#!/usr/bin/env bash
# Compile-check the CUDA sources for Hopper (sm_90a) on a machine without a GPU (docs/ops.md):
# 1. the torch-free kernels (flowkern/ops/*/kernel.cuh), every instantiation (csrc/compile_check/kernels.cu);
# 2. their SASS: every kernel with a 16-byte path (template flag true) that writes element data must contain
#    128-bit stores (STG.E.128); kernels that only write per-tile partials are exempt. cuobjdump/nvdisasm come from
#    PyPI (nvidia-cuda-cuobjdump, nvidia-cuda-nvdisasm) when not on PATH;
# 3. the launchers flowkern/ops/*/cuda.cu and csrc/cuda/*.cu against torch's headers. A CPU-only torch wheel lacks
#    one generated header (c10/cuda/impl/cuda_cmake_macros.h); an empty stand-in in a temp dir is enough to compile
#    (never to link: CUDA torch builds link them);
# 4. the registration code with the CUDA kernels registered (g++ -DFLOWKERN_WITH_CUDA -fsyntax-only).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
ARCH="-gencode arch=compute_90a,code=sm_90a"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
nvcc -c -std=c++20 -O3 $ARCH -I csrc/include csrc/compile_check/kernels.cu -o "$tmp/kernels.o"
echo "nvcc sm_90a: flowkern/ops/*/kernel.cuh ok"

if ! command -v cuobjdump >/dev/null 2>&1; then
  bin=$("$PY" -c "import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], 'cu13', 'bin'))" 2>/dev/null || true)
  if [ -z "$bin" ] || [ ! -x "$bin/cuobjdump" ] || [ ! -x "$bin/nvdisasm" ]; then
    "$PY" -m pip install --disable-pip-version-check -q "nvidia-cuda-cuobjdump>=13.2" "nvidia-cuda-nvdisasm>=13.2"
    bin=$("$PY" -c "import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], 'cu13', 'bin'))")
  fi
  export PATH="$bin:$PATH"
fi
cuobjdump -sass "$tmp/kernels.o" >"$tmp/kernels.sass"
"$PY" - "$tmp/kernels.sass" <<'PYEOF'
import re, sys
text = open(sys.argv[1]).read()
bad, vector_kernels, stores128 = [], 0, 0
for block in re.split(r"\n\s*Function : ", text)[1:]:
    name = block.split("\n", 1)[0].strip()
    # the 16-byte path is the instantiation whose vector flag is true: the bool template argument after the element
    # types (the last of three for cfg_euler/adjoint_step forwards, the first otherwise); partial-only kernels exempt
    flags = re.findall(r"Lb([01])E", name.split("EEv")[0])
    if not flags or re.search(r"reduce|sumsq|norms_kernel", name):
        continue
    if (flags[2] if len(flags) == 3 else flags[0]) != "1":
        continue
    vector_kernels += 1
    n128 = len(re.findall(r"STG\.E\.128", block))
    stores128 += n128
    if n128 == 0 and re.search(r"\bSTG\.E", block):
        bad.append(name)
print(f"SASS: {vector_kernels} kernels with a 16-byte path, {stores128} STG.E.128 in all")
if bad:
    sys.exit("no 128-bit stores (STG.E.128) in:\n  " + "\n  ".join(bad))
PYEOF

mkdir -p "$tmp/stub/c10/cuda/impl"
echo "#pragma once" >"$tmp/stub/c10/cuda/impl/cuda_cmake_macros.h"
torch_inc=$("$PY" -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-I' + p for p in include_paths()))")
export ARCH torch_inc tmp
ls flowkern/ops/*/cuda.cu csrc/cuda/*.cu | xargs -P "${MAX_JOBS:-2}" -I{} sh -c \
  'nvcc -c -std=c++20 $ARCH -DFLOWKERN_WITH_CUDA -w -I "$tmp/stub" -I csrc/include -I csrc $torch_inc {} -o "$tmp/$(echo {} | tr / _).o" || { echo "nvcc failed: {}"; exit 255; }'
echo "nvcc sm_90a: flowkern/ops/*/cuda.cu, csrc/cuda/*.cu launchers ok ($(ls flowkern/ops/*/cuda.cu csrc/cuda/*.cu | wc -l) files)"

# 4. the registration code with the CUDA kernels registered (op.cpp, csrc/*.cpp under FLOWKERN_WITH_CUDA): plain C++
#    against the CPU-only torch headers (generic c10 APIs only), so it is checked here too (syntax and templates).
py_inc=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
export py_inc
ls flowkern/ops/*/op.cpp csrc/*.cpp | xargs -P "${MAX_JOBS:-2}" -I{} sh -c \
  'g++ -std=c++20 -fsyntax-only -DFLOWKERN_WITH_CUDA -I csrc/include -I csrc -I "$py_inc" $torch_inc {} || { echo "g++ failed: {}"; exit 255; }'
echo "g++ -DFLOWKERN_WITH_CUDA: flowkern/ops/*/op.cpp, csrc/*.cpp registrations ok"

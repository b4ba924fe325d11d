#!/usr/bin/env bash
# Compile-check the CUDA sources for Hopper (sm_90a) on a machine without a GPU (docs/ops.md). Every source is compiled
# once, all of them in one pool of MAX_JOBS (default: every core) parallel jobs, nothing cached across runs:
# 1. the launchers flowkern/ops/*/cuda.cu and csrc/cuda/*.cu against torch's headers (nvcc -O3). Each instantiates
#    every kernel of its kernel.cuh that it dispatches (all element types, 16-byte and scalar paths). A CPU-only torch
#    wheel lacks one generated header (c10/cuda/impl/cuda_cmake_macros.h); an empty stand-in in a temp dir is enough to
#    compile (never to link: CUDA torch builds link them);
# 2. the registration code with the CUDA kernels registered (op.cpp, csrc/*.cpp under FLOWKERN_WITH_CUDA): plain C++
#    against the CPU-only torch headers (generic c10 APIs only), g++ -fsyntax-only;
# 3. the SASS of the launchers' kernels: every kernel with a 16-byte path (template flag true) that writes element
#    data must contain 128-bit stores (STG.E.128); kernels that only write per-tile partials are exempt.
#    cuobjdump/nvdisasm come from PyPI (nvidia-cuda-cuobjdump, nvidia-cuda-nvdisasm) when not on PATH.
# The ops' argument structs (args.h) are generated from their schemas first (csrc/gen_op_args.py), as setup.py does.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
start=$(date +%s)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" csrc/gen_op_args.py "$tmp/generated" >/dev/null
mkdir -p "$tmp/stub/c10/cuda/impl"
echo "#pragma once" >"$tmp/stub/c10/cuda/impl/cuda_cmake_macros.h"
torch_inc=$("$PY" -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-I' + p for p in include_paths()))")
py_inc=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
ARCH="-gencode arch=compute_90a,code=sm_90a"
INC="-I csrc/include -I csrc -I $tmp/generated"
export ARCH INC torch_inc py_inc tmp

cuda_sources=$(ls flowkern/ops/*/cuda.cu csrc/cuda/*.cu)
cpp_sources=$(ls flowkern/ops/*/op.cpp csrc/*.cpp)
# the slowest (nvcc) first, so the pool ends with the short g++ jobs
printf '%s\n' $cuda_sources $cpp_sources | xargs -P "${MAX_JOBS:-$(nproc)}" -I{} sh -c '
  case {} in
    *.cu) nvcc -c -std=c++20 -O3 $ARCH -DFLOWKERN_WITH_CUDA -w -I "$tmp/stub" $INC $torch_inc {} \
            -o "$tmp/$(echo {} | tr / _).o" || { echo "nvcc failed: {}"; exit 255; } ;;
    *) g++ -std=c++20 -fsyntax-only -DFLOWKERN_WITH_CUDA -w $INC -I "$py_inc" $torch_inc {} \
         || { echo "g++ failed: {}"; exit 255; } ;;
  esac'
echo "nvcc sm_90a: $(echo $cuda_sources | wc -w) CUDA sources ok; g++ -DFLOWKERN_WITH_CUDA: $(echo $cpp_sources | wc -w) registration sources ok"

if ! command -v cuobjdump >/dev/null 2>&1; then
  bin=$("$PY" -c "import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], 'cu13', 'bin'))" 2>/dev/null || true)
  if [ -z "$bin" ] || [ ! -x "$bin/cuobjdump" ] || [ ! -x "$bin/nvdisasm" ]; then
    "$PY" -m pip install --disable-pip-version-check -q "nvidia-cuda-cuobjdump>=13.2" "nvidia-cuda-nvdisasm>=13.2"
    bin=$("$PY" -c "import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], 'cu13', 'bin'))")
  fi
  export PATH="$bin:$PATH"
fi
for o in "$tmp"/*.o; do cuobjdump -sass "$o"; done >"$tmp/kernels.sass"
"$PY" - "$tmp/kernels.sass" <<'PYEOF'
import re, sys
text = open(sys.argv[1]).read()
bad, vector_kernels, stores128, seen = [], 0, 0, set()
for block in re.split(r"\n\s*Function : ", text)[1:]:
    name = block.split("\n", 1)[0].strip()
    if name in seen:  # a kernel two launchers instantiate (a shared header): counted once
        continue
    seen.add(name)
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
print(f"SASS: {len(seen)} kernels, {vector_kernels} with a 16-byte path, {stores128} STG.E.128 in all")
if bad:
    sys.exit("no 128-bit stores (STG.E.128) in:\n  " + "\n  ".join(bad))
PYEOF
echo "cuda_compile_check: $(($(date +%s) - start)) s"

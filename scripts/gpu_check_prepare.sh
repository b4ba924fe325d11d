#!/usr/bin/env bash
# Prepare what scripts/gpu_check.sh carries to the GPU machine (offline, Python 3.12, torch 2.11 + CUDA 13.0), on
# this machine, before a lease. Everything lands in ignored folders (never commit them); the lease's `carry` names
# them. Steps (each skipped with a message when its tools are missing):
#   wheels      .whl/: diffusers and the dependencies the GPU image lacks, for CPython 3.12 manylinux (the device
#               README's `pip download` recipe); gpu_check.sh installs them with --no-index into /tmp/site.
#   prebuilt    .gpu_prebuilt/: flowkern._C for cp312 with the CUDA kernels (sm_90a), compiled and linked against
#               a CUDA build of torch 2.11 in a throwaway venv outside the repo ($VENV_CU, default /work/venv-cu;
#               `scripts/gpu_check_prepare.sh venv` makes it), plus sources.sha256, the hash of the sources it was
#               built from: gpu_check.py uses the .so only when the tree's sources still hash the same, else builds.
#   predictions .gpu_prebuilt/planner.json: the memory planner's prediction for every update row (when
#               `python -m flowkern plan` exists).
#     scripts/gpu_check_prepare.sh [venv] [wheels] [prebuilt] [predictions]   (default: wheels prebuilt predictions)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
VENV_CU=${VENV_CU:-/work/venv-cu}
TORCH_GPU=2.11.0  # what the GPU machine's python3 has (device KINDS.md)
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(wheels prebuilt predictions)

# diffusers and what the GPU image lacks of its requirements (KINDS.md's package list has the rest: filelock,
# huggingface-hub, numpy, regex, requests, safetensors, pillow, zipp). One version each: two stop the install.
WHEELS=(diffusers==0.42.1 importlib_metadata==10.2.0 lazy-importer==0.1.0)

for step in "${steps[@]}"; do
  case $step in
  venv)
    # A CUDA build of torch 2.11 for CPython 3.12 (the GPU machine's ABI), outside the repo; ~3 GiB.
    command -v python3.12 >/dev/null || { echo "python3.12 not found (apt-get install python3.12 or uv)"; exit 1; }
    [ -x "$VENV_CU/bin/python" ] || python3.12 -m venv "$VENV_CU"
    "$VENV_CU/bin/python" -m pip install -q "torch==$TORCH_GPU" --index-url https://download.pytorch.org/whl/cu130
    "$VENV_CU/bin/python" -m pip install -q ninja setuptools numpy
    ;;
  wheels)
    mkdir -p .whl
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl "${WHEELS[@]}"
    for w in .whl/*.whl; do  # what each needs, for a reviewer to check against KINDS.md's list
      echo "$(basename "$w"): $(unzip -p "$w" '*/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' \
        | sed 's/Requires-Dist: //' | tr '\n' ' ')"
    done
    du -sh .whl
    ;;
  prebuilt)
    if [ ! -x "$VENV_CU/bin/python" ] || ! command -v nvcc >/dev/null; then
      echo "prebuilt: no CUDA torch venv at $VENV_CU or no nvcc: gpu_check.sh will build on the GPU machine"
      continue
    fi
    tag=$("$VENV_CU/bin/python" -c "import torch, sys; print(torch.__version__, torch.version.cuda, sys.version_info[:2])")
    echo "prebuilt: torch/cuda/python of $VENV_CU: $tag"
    build=${FLOWKERN_PREBUILD_DIR:-/tmp/flowkern-prebuild}  # outside the repo; kept for incremental rebuilds
    mkdir -p "$build"
    git ls-files -z | tar --null -T - -cf - | tar -xf - -C "$build"  # the tracked tree, as it is now
    hash=$("$PY" scripts/gpu_check.py --sources-hash)  # what gpu_check.py compares
    (cd "$build" && CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=9.0a FLOWKERN_BUILD_EXT=1 \
      MAX_JOBS=${MAX_JOBS:-2} NVCC_THREADS=${NVCC_THREADS:-1} "$VENV_CU/bin/python" setup.py -q build_ext --inplace)
    so=$(ls "$build"/flowkern/_C.cpython-312-*.so)
    mkdir -p .gpu_prebuilt
    strip --strip-debug -o ".gpu_prebuilt/$(basename "$so")" "$so"
    echo "$hash" >.gpu_prebuilt/sources.sha256
    echo "$tag" >.gpu_prebuilt/built_with.txt
    nm -D --defined-only ".gpu_prebuilt/$(basename "$so")" | grep -c ' T ' >/dev/null
    ls -la .gpu_prebuilt
    ;;
  predictions)
    mkdir -p .gpu_prebuilt
    "$PY" scripts/gpu_check_updates.py --predict .gpu_prebuilt/planner.json
    ;;
  *)
    echo "unknown step $step (venv, wheels, prebuilt, predictions)"
    exit 2
    ;;
  esac
done

#!/usr/bin/env bash
# Idempotent setup on a machine with Python >= 3.10 and pip. Keeps an installed torch (e.g. a CUDA
# build); otherwise installs torch==2.13.0 (the CPU wheel on CPU-only machines) and the triton it pins.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

if ! "$PY" -c "import torch" 2>/dev/null; then
  pip_install "torch==2.13.0"
fi
if ! "$PY" -c "import triton" 2>/dev/null; then
  pip_install "triton==3.7.1"  # the version CUDA torch 2.13 pins; on CPU it runs in the interpreter
fi
pip_install setuptools wheel ninja "pybind11>=2.12"
# --no-build-isolation: compile flowkern._C against the torch installed above (design.md section 4)
MAX_JOBS=${MAX_JOBS:-2} pip_install --no-build-isolation -e ".[test,diffusers,quant]"
"$PY" -c "import flowkern.ops.backend as b; print('flowkern installed; extension:', 'built' if b.HAS_EXT else 'missing (' + str(b.EXT_IMPORT_ERROR) + ')', '| CUDA kernels:', b.HAS_CUDA_EXT)"

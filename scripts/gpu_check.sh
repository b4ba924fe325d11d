#!/usr/bin/env bash
# GPU proof in one lease (issue 19): scripts/gpu_check.sh OUTDIR [--dry-run] [--budget S] [--stages ...]
# Installs the carried wheels (.whl/, from scripts/gpu_check_prepare.sh; offline: --no-index) into /tmp/site, then
# runs scripts/gpu_check.py, which does the stages within the budget (default 540 s on the GPU; docs/gpu_check.md).
# The clock starts here, so the wheels' install counts. Exit status: 0 when every stage is ok.
set -uo pipefail
export FLOWKERN_GPU_CHECK_T0=${FLOWKERN_GPU_CHECK_T0:-$(date +%s.%N)}
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ $# -ge 1 ] || { echo "usage: scripts/gpu_check.sh OUTDIR [--dry-run] [--budget S] [--stages ...]" >&2; exit 2; }
dry=0
for a in "$@"; do [ "$a" = --dry-run ] && dry=1; done
if [ $dry = 0 ] && compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_check: installing .whl/*.whl failed" >&2; exit 3; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$PY" scripts/gpu_check.py "$@"

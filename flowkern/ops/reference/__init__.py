"""Compatibility: the references moved to flowkern/ops/<op>/reference.py (one folder per op).

`flowkern.ops.reference.<op>` still resolves (to the op's reference module) for callers that import it.
"""

import importlib
import sys

for _op in (
    "adjoint_matching_loss",
    "adjoint_step",
    "cfg_euler",
    "consistency_probes",
    "consistency_residual",
    "reward_grad_clip",
    "vggflow_matching_loss",
):
    sys.modules[f"{__name__}.{_op}"] = importlib.import_module(f"flowkern.ops.{_op}.reference")

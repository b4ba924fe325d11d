"""flowkern: fused kernels and memory-lean adjoints for reward fine-tuning of flow-matching models.

Lazy facade (design.md section 1): `import flowkern` is cheap; each public name imports its
module on first use, so the ops never pull in diffusers and nothing touches the Triton driver.
"""

from __future__ import annotations

import importlib

from flowkern._import_noise import silence_torchao_import_noise

silence_torchao_import_noise()  # before any entry point imports diffusers, peft, transformers or torchao

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "use_backend": "flowkern.ops.backend",
    "available_backends": "flowkern.ops.backend",
    "BackendUnavailableError": "flowkern.ops.backend",
    "vggflow_matching_loss": "flowkern.ops.vggflow_matching_loss",
    "consistency_probes": "flowkern.ops.consistency_probes",
    "consistency_residual": "flowkern.ops.consistency_residual",
    "consistency_residual_exact": "flowkern.ops.consistency_residual",
    "time_probe": "flowkern.ops.consistency_residual",
    "reward_grad_clip": "flowkern.ops.reward_grad_clip",
    "adjoint_matching_loss": "flowkern.ops.adjoint_matching_loss",
    "truncated_backprop": "flowkern.adjoint",
    "lean_adjoint": "flowkern.adjoint",
    "terminal_reward_grad": "flowkern.adjoint",
    "cfg_euler": "flowkern.ops.cfg_euler",
    "adjoint_step": "flowkern.ops.adjoint_step",
    # @@exports (one line per public name)
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'flowkern' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__

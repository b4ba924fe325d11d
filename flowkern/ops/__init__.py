"""Fused ops (math.md section 8), one folder per op (docs/ops.md); native ops `torch.ops.flowkern.<name>`."""

from flowkern.ops.adjoint_matching_loss import adjoint_matching_loss
from flowkern.ops.adjoint_step import adjoint_step
from flowkern.ops.backend import BackendUnavailableError, available_backends, use_backend
from flowkern.ops.cfg_euler import cfg_euler
from flowkern.ops.consistency_probes import consistency_probes
from flowkern.ops.consistency_residual import consistency_residual, consistency_residual_exact, time_probe
from flowkern.ops.reward_grad_clip import reward_grad_clip
from flowkern.ops.vggflow_matching_loss import vggflow_matching_loss

__all__ = [
    "BackendUnavailableError",
    "adjoint_matching_loss",
    "adjoint_step",
    "available_backends",
    "cfg_euler",
    "consistency_probes",
    "consistency_residual",
    "consistency_residual_exact",
    "reward_grad_clip",
    "time_probe",
    "use_backend",
    "vggflow_matching_loss",
]

"""Fused ops (math.md section 8), each a torch.library custom op `flowkern::<name>`."""

from flowkern.ops.backend import BackendUnavailableError, available_backends, use_backend
from flowkern.ops.vggflow_matching_loss import vggflow_matching_loss

from flowkern.ops.consistency_probes import consistency_probes
from flowkern.ops.consistency_residual import consistency_residual, consistency_residual_exact, time_probe
from flowkern.ops.adjoint_matching_loss import adjoint_matching_loss
from flowkern.ops.reward_grad_clip import reward_grad_clip
from flowkern.ops.cfg_euler import cfg_euler
from flowkern.ops.adjoint_step import adjoint_step
# @@ops (one import per op)

__all__ = [
    "adjoint_step",
    "cfg_euler",
    "adjoint_matching_loss",
    "reward_grad_clip",
    "BackendUnavailableError",
    "available_backends",
    "consistency_probes",
    "consistency_residual",
    "consistency_residual_exact",
    "time_probe",
    "use_backend",
    "vggflow_matching_loss",
]

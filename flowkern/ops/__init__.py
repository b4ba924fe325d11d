"""Fused ops (math.md section 8), each a torch.library custom op `flowkern::<name>`."""

from flowkern.ops.backend import BackendUnavailableError, available_backends, use_backend
from flowkern.ops.vggflow_matching_loss import vggflow_matching_loss

# @@ops (one import per op)

__all__ = [
    "BackendUnavailableError",
    "available_backends",
    "use_backend",
    "vggflow_matching_loss",
]

"""`reward_grad_clip`: per-sample norm clip of the reward gradient (M8).

    n_b    = ||grad_b||                               (L2 over all non-batch elements, fp32)
    rho_b  = min(n_b, tau) / max(n_b, 1e-12)
    ghat_b = rho_b * grad_b                           (grad's dtype)

Shapes: grad [B, ...] (any layout); tau a positive finite float. Returns (ghat like grad, norms fp32 [B];
fp64 for fp64 input). The norms feed the tau update of (M9).
Not differentiable: the clipped reward gradient is a stop-gradient input everywhere it is used (M15, M21),
so the outputs never require grad (the op's autograd spec has no differentiable argument).
Two passes: fp32 partial sums of squares per (sample, fixed chunk), summed per sample in a fixed order
(deterministic, batch-invariant), then the scaling pass. A sample of <= FUSED_MAX_D elements is
handled by one program that reads it once (it stays on chip).
Traffic: 1R (norms) + 1R + 1W (scale) = 3D elements; 2D when a sample stays on chip.
Files: reference.py (torch backend, oracle), triton.py, op.cpp (schema, checks), cpu.cpp, cuda.cu.
"""

from __future__ import annotations

import torch

from flowkern.ops import _validate as V
from flowkern.ops._autograd import register_fake, schema_call
from flowkern.ops.backend import HAS_TRITON, backend_for, implementations, native_op
from flowkern.ops.reward_grad_clip.reference import reward_grad_clip as reference

OP = "reward_grad_clip"
SCHEMA = (
    "reward_grad_clip(Tensor grad, float tau) -> (Tensor ghat, Tensor norms)"  # C++ reads it as args::RewardGradClip
)


def bytes_moved(grad: torch.Tensor) -> int:
    """Minimal HBM traffic of one call (math.md section 8): 3D (a sample does not fit on chip)."""
    return grad.numel() * grad.element_size() * 3


if HAS_TRITON:
    from flowkern.ops.reward_grad_clip.triton import reward_grad_clip as _triton_launch

    _triton = schema_call(_triton_launch, SCHEMA)
else:  # pragma: no cover
    _triton = None

IMPLS = implementations(reference, _triton, native_op(OP))


@register_fake(SCHEMA)
def _(a):
    out = torch.empty_like(a.grad, memory_format=torch.contiguous_format)
    return out, a.grad.new_empty((a.grad.shape[0],), dtype=V.loss_dtype(a.grad))


def reward_grad_clip(grad: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip each sample of the reward gradient to L2 norm <= tau (M8).

    Args:
        grad: reward gradient grad r at x_hat1 [B, ...] (fp32/bf16/fp16; fp64 accepted).
        tau: clip threshold, a positive finite float (M9 updates it from the returned norms).

    Returns:
        (ghat, norms): ghat = min(n_b, tau)/max(n_b, 1e-12) * grad_b in grad's dtype, and the
        unclipped per-sample norms n_b, fp32 [B] (fp64 for fp64 input).

    Not differentiable: the outputs never require grad (backward through them raises PyTorch's "does not require
    grad" error).
    """
    backend = backend_for(OP, IMPLS, "grad", grad)
    if backend in V.NATIVE:  # every check in C++ (op.cpp)
        try:
            return IMPLS[backend](grad, tau)
        except RuntimeError as error:
            V.raise_type_error(error)
            raise
    V.check_tensors(grad, "grad")
    tau = V.check_float("tau", tau, positive=True)
    if backend == "torch":
        return reference(grad, tau)
    return IMPLS[backend](grad.detach(), tau)

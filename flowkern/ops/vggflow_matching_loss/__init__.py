"""`vggflow_matching_loss`: the VGG-Flow matching loss (M16) with its gradient in one pass.

    T    = v_base + beta * eta_t * ghat - c_phi          (c_phi = value_out = beta * nu_phi)
    loss = mean((v_ft - T)^2)                            (mean over all B*D elements, fp32)
    dloss/dv_ft = 2 (v_ft - T) / (B*D)                   (written in the forward pass, v_ft's dtype)

Shapes: v_ft, v_base, reward_grad, value_out [B, ...] (any layout; same shape); t float, [] or [B].
Gradient flows to v_ft only (the target is stop-gradient). Saved for backward: the gradient, which the backward
scales by the loss cotangent in place (no pass at all for loss.backward()). Traffic: 4R + 1W = 5D (4R without it).
Files: reference.py (torch backend, oracle), triton.py, op.cpp (schema, checks, autograd), cpu.cpp, cuda.cu.
"""

from __future__ import annotations

import torch

from flowkern.ops import _validate as V
from flowkern.ops._autograd import register_fake, saved_gradient_loss
from flowkern.ops.backend import HAS_TRITON, backend_for, implementations, native_op
from flowkern.ops.vggflow_matching_loss.reference import vggflow_matching_loss as reference

OP = "vggflow_matching_loss"
# The native op's arguments, written once (C++ reads them from a struct generated from this: docs/ops.md).
SCHEMA = (
    "vggflow_matching_loss(Tensor v_ft, Tensor v_base, Tensor reward_grad, Tensor value_out, Tensor? t, "
    "float t_value, float beta, str eta_mode, bool compute_grad=False) -> (Tensor loss, Tensor grad)"
)


def bytes_moved(v_ft: torch.Tensor, compute_grad: bool = True) -> int:
    """Minimal HBM traffic of one call (math.md section 8)."""
    return v_ft.numel() * v_ft.element_size() * (5 if compute_grad else 4)


if HAS_TRITON:
    from flowkern.ops.vggflow_matching_loss.triton import vggflow_matching_loss as _triton_forward

    _triton = saved_gradient_loss(_triton_forward, SCHEMA, grad_arg="v_ft")
else:  # pragma: no cover
    _triton = None

IMPLS = implementations(reference, _triton, native_op(OP))


@register_fake(SCHEMA)
def _(a):
    loss = a.v_ft.new_empty((), dtype=V.loss_dtype(a.v_ft))
    grad = torch.empty_like(a.v_ft, memory_format=torch.contiguous_format) if a.compute_grad else a.v_ft.new_empty(0)
    return loss, grad


def vggflow_matching_loss(
    v_ft: torch.Tensor,
    v_base: torch.Tensor,
    reward_grad: torch.Tensor,
    value_out: torch.Tensor,
    t: torch.Tensor | float,
    beta: float,
    eta_mode: str = "quad",
) -> torch.Tensor:
    """VGG-Flow matching loss (M16): mean((v_ft - v_base - beta*eta_t*reward_grad + value_out)^2), fp32.

    Args:
        v_ft: fine-tuned (CFG-combined) velocity [B, ...]; the only input that receives a gradient.
        v_base: base velocity, same shape. reward_grad: clipped reward gradient ghat at x_hat1 (M8).
        value_out: value-net output c_phi = beta*nu_phi (velocity units, M14/M15).
        t: paper time per sample ([B] or scalar). beta: 1/lambda > 0.
        eta_mode: 'quad' (t^2, default), 'linear' (t) or 'constant' (1).
    """
    backend = backend_for(OP, IMPLS, "v_ft", v_ft)
    if backend in V.NATIVE:  # every check in C++ (op.cpp)
        try:
            return IMPLS[backend](v_ft, v_base, reward_grad, value_out, *V.native_coefficients(t), beta, eta_mode)[0]
        except RuntimeError as error:
            V.raise_type_error(error)
            raise
    V.check_tensors(v_ft, "v_ft", v_base=v_base, reward_grad=reward_grad, value_out=value_out)
    beta = V.check_float("beta", beta, positive=True)
    V.eta_code(eta_mode)
    t_pair = V.coefficient("t", t, v_ft)
    if backend == "torch":
        return reference(v_ft, v_base, reward_grad, value_out, t, beta, eta_mode)
    return IMPLS[backend](v_ft, v_base, reward_grad, value_out, *t_pair, beta, eta_mode)[0]

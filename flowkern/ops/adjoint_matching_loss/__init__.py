"""`adjoint_matching_loss`: the (deterministic / memoryless) adjoint matching loss with its gradient in one op.

`adjoint` is the paired lean adjoint a = a~_{i+1} (M27); v_base and adjoint receive no gradient.

'elementwise' (M26 with c(u) = (1/p) sum_j |u_j|^p, M28 for one step):
    u*_j = -sign(a_j) |a_j / lam|^(1/(p-1))              (p = 2: u* = -a/lam, computed exactly)
    loss = mean((v_ft - v_base - u*)^2),  dloss/dv_ft = 2 (v_ft - v_base - u*) / D
'norm' (M26 with c(u) = (1/p) ||u||^p): omega = a/lam, ||omega_b|| per sample (floored at 1e-12 when the
    exponent is negative, p > 2), u* = -omega ||omega_b||^((2-p)/(p-1)); then the same loss and gradient.
'memoryless' (M32; lam and p unused): d = (2/sigma_b)(v_ft - v_base) + sigma_b a, s_b = sum_j d_j^2,
    loss = (1/B) sum_b min(s_b, lct),  dloss/dv_ft = 1[s_b < lct] (4/sigma_b) d / B.

Shapes: v_ft, v_base, adjoint [B, ...] (any layout; same shape); sigma fp32 [B] or []. loss fp32 [] (fp64 for
fp64 inputs); the gradient is produced in the forward pass in v_ft's dtype. Saved for backward: that gradient
(the backward scales it by the incoming scalar). Double backward is not supported.
Reductions: fp32 partials per (sample, fixed chunk), summed in a fixed order (deterministic).
Files: reference.py (torch backend, oracle), triton.py, op.cpp (schema, checks, autograd), cpu.cpp, cuda.cu.
Traffic: elementwise 3R + 1W = 4D; norm 1R + 3R + 1W = 5D; memoryless 3R, then 3R + 1W = 7D (4D when a
sample stays on chip). Without the gradient: 3D, 4D, 3D.
"""

from __future__ import annotations

import math

import torch

from flowkern.ops import _validate as V
from flowkern.ops._autograd import register_fake, saved_gradient_loss
from flowkern.ops.adjoint_matching_loss.reference import ELEMENTWISE, MEMORYLESS, MODES, NORM
from flowkern.ops.adjoint_matching_loss.reference import adjoint_matching_loss as reference
from flowkern.ops.backend import HAS_TRITON, backend_for, implementations, native_op

OP = "adjoint_matching_loss"
# The native op's arguments, written once (C++ reads them from a struct generated from this: docs/ops.md).
SCHEMA = (
    "adjoint_matching_loss(Tensor v_ft, Tensor v_base, Tensor adjoint, float lam, float p, str mode, Tensor? sigma, "
    "float sigma_value, float lct, bool compute_grad=False) -> (Tensor loss, Tensor grad)"
)
_TRAFFIC = {ELEMENTWISE: (3, 4), NORM: (4, 5), MEMORYLESS: (3, 7)}  # (without, with) the gradient, in D


def bytes_moved(v_ft: torch.Tensor, mode: str = "elementwise", compute_grad: bool = True) -> int:
    """Minimal HBM traffic of one call (math.md section 8), assuming a sample does not fit on chip."""
    return v_ft.numel() * v_ft.element_size() * _TRAFFIC[MODES[mode]][int(compute_grad)]


if HAS_TRITON:
    from flowkern.ops.adjoint_matching_loss.triton import adjoint_matching_loss as _triton_forward

    _triton = saved_gradient_loss(_triton_forward, SCHEMA, grad_arg="v_ft")
else:  # pragma: no cover
    _triton = None

IMPLS = implementations(reference, _triton, native_op(OP))


@register_fake(SCHEMA)
def _(a):
    loss = a.v_ft.new_empty((), dtype=V.loss_dtype(a.v_ft))
    grad = torch.empty_like(a.v_ft, memory_format=torch.contiguous_format) if a.compute_grad else a.v_ft.new_empty(0)
    return loss, grad


def _check_mode_arguments(mode: object, sigma: object, lct: object) -> None:
    """sigma and lct are given for mode='memoryless' (M32) and only then."""
    if mode == "memoryless":
        if sigma is None:
            raise ValueError("sigma is required for mode='memoryless' (M32)")
        if lct is None:
            raise ValueError("lct is required for mode='memoryless' (M32); float('inf') disables the clamp")
        return
    for name, value in (("sigma", sigma), ("lct", lct)):
        if value is not None:
            raise ValueError(f"{name} is only used by mode='memoryless', got mode={mode!r}")


def adjoint_matching_loss(
    v_ft: torch.Tensor,
    v_base: torch.Tensor,
    adjoint: torch.Tensor,
    lam: float,
    p: float = 2.0,
    mode: str = "elementwise",
    sigma: torch.Tensor | float | None = None,
    lct: float | None = None,
) -> torch.Tensor:
    """Adjoint matching loss for one step, fp32 (see the module docstring for the math).

    Args:
        v_ft: fine-tuned (CFG-combined) velocity [B, ...]; the only input that receives a gradient.
        v_base: base velocity, same shape (no gradient).
        adjoint: the paired lean adjoint a~_{i+1} (M25, M27; M31 for memoryless), same shape (no gradient).
        lam: lambda > 0 of (M24), finite ('elementwise' and 'norm'; validated but unused by 'memoryless').
        p: cost exponent of (M26), finite and > 1 (default 2: u* = -adjoint/lam).
        mode: 'elementwise' (DAM, c = (1/p) sum |u_j|^p), 'norm' (c = (1/p)||u||^p) or 'memoryless' (AM, M32).
        sigma: memoryless only (required there): sigma_i per sample, > 0 ([B], 0-dim or float).
        lct: memoryless only (required there): the loss clamp LCT > 0; float('inf') disables the clamp.
    """
    backend = backend_for(OP, IMPLS, "v_ft", v_ft)
    if (sigma is None) != (mode != "memoryless") or (lct is None) != (mode != "memoryless"):
        _check_mode_arguments(mode, sigma, lct)
    sigma_pair, lct_value = ((None, 0.0), math.inf) if sigma is None else (V.native_coefficients(sigma), lct)
    if backend in V.NATIVE:  # every other check in C++ (op.cpp)
        try:
            return IMPLS[backend](v_ft, v_base, adjoint, lam, p, mode, *sigma_pair, lct_value)[0]
        except RuntimeError as error:
            V.raise_type_error(error)
            raise
    V.check_tensors(v_ft, "v_ft", v_base=v_base, adjoint=adjoint)
    lam = V.check_float("lam", lam, positive=True)
    p = V.check_float("p", p, minimum=1.0)
    V.check_choice("mode", mode, tuple(MODES))
    if mode == "memoryless":
        sigma_pair = V.coefficient("sigma", sigma, v_ft, positive=True)
        lct_value = V.check_float("lct", lct, minimum=0.0, finite=False)
    if backend == "torch":
        return reference(v_ft, v_base, adjoint, lam, p, mode, sigma, lct)
    return IMPLS[backend](v_ft, v_base, adjoint, lam, p, mode, *sigma_pair, lct_value)[0]

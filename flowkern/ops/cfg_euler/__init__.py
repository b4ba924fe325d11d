"""`cfg_euler`: classifier-free guidance, one Euler step and the one-step prediction x_hat1 in one pass.

    v       = v_u + w (v_c - v_u)  = (1 - w) v_u + w v_c                  (M5; v = v_c without v_uncond)
    x_next  = x + h v                                                     ('ode', M2)
            = x + h (2 v - kappa x) + sqrt(h) sigma xi                    ('memoryless', M30; xi = noise)
    x_hat1  = x + (1 - t) sg(v)                                           (M6; sg only if stopgrad_xhat)

Shapes: v_uncond, v_cond, x, noise [B, ...] (any layout, same shape); w, h, t, kappa, sigma fp32 [B]
(fp64 for fp64 inputs; Python floats and 0-dim tensors are broadcast). v is in v_cond's dtype, x_next and
x_hat1 in x's dtype; arithmetic fp32.
Backward from (g_v, g_n, g_h), nothing saved but the [B] coefficients:
    gbar = g_v + c_n g_n + (1 - t) g_h [not stopgrad_xhat],   c_n = h ('ode') | 2h ('memoryless')
    d v_c = w gbar,  d v_u = (1 - w) gbar (none if detach_uncond),  d x = a_n g_n + g_h,  a_n = 1 | 1 - h kappa
and nothing to w, h, t, kappa, sigma, noise. Absent cotangents are never materialised.
Traffic: forward 3R + 3W = 6D (+1R memoryless, -1R without CFG); backward <= 6D, 2D in training (g_v only,
uncond detached: read g_v, write d v_c).
Files: reference.py (torch backend, oracle), triton.py (+ its autograd), op.cpp (schemas, checks, autograd), cpu.cpp,
cuda.cu.
"""

from __future__ import annotations

import torch

from flowkern.ops import _validate as V
from flowkern.ops._autograd import register_fake, schema_call
from flowkern.ops.backend import HAS_TRITON, backend_for, implementations, native_op
from flowkern.ops.cfg_euler.reference import MODES
from flowkern.ops.cfg_euler.reference import cfg_euler as reference

OP = "cfg_euler"
# The native ops' arguments, written once (C++ reads them from structs generated from these: docs/ops.md).
SCHEMA = (
    "cfg_euler(Tensor? v_uncond, Tensor v_cond, Tensor x, Tensor? w, float w_value, Tensor? h, float h_value, "
    "Tensor? t, float t_value, Tensor? kappa, float kappa_value, Tensor? sigma, float sigma_value, Tensor? noise, "
    "str mode, bool stopgrad_xhat) -> (Tensor v, Tensor x_next, Tensor x_hat1)"
)
BACKWARD_SCHEMA = (
    "cfg_euler_backward(Tensor? grad_v, Tensor? grad_next, Tensor? grad_hat, Tensor? w, float w_value, Tensor? h, "
    "float h_value, Tensor? t, float t_value, Tensor? kappa, float kappa_value, str mode, bool stopgrad_xhat, "
    "bool need_uncond, bool need_cond, bool need_x) -> (Tensor d_uncond, Tensor d_cond, Tensor d_x)"
)


def bytes_moved(
    v_cond: torch.Tensor, x: torch.Tensor, cfg: bool = True, mode: str = "ode", backward: bool = False
) -> int:
    """Minimal HBM traffic of one call (math.md section 8); `backward` adds the training-case backward
    (g_v only, uncond detached: read g_v, write d v_cond)."""
    n, v_size, x_size = x.numel(), v_cond.element_size(), x.element_size()
    reads = n * (v_size * (2 if cfg else 1) + x_size * (2 if mode == "memoryless" else 1))
    writes = n * (v_size + 2 * x_size)
    return reads + writes + (2 * n * v_size if backward else 0)


if HAS_TRITON:
    from flowkern.ops.cfg_euler.triton import cfg_euler as _triton_launch

    _triton = schema_call(_triton_launch, SCHEMA)
else:  # pragma: no cover
    _triton = None

IMPLS = implementations(reference, _triton, native_op(OP))


def _velocity_state_types(velocity: torch.dtype, state: torch.dtype) -> tuple[torch.dtype, torch.dtype]:
    """The kernels' (velocity, state) element types (kernel.h: velocity_state_types)."""
    if velocity == state or (state == torch.float32 and velocity in (torch.bfloat16, torch.float16)):
        return velocity, state
    common = torch.float64 if torch.float64 in (velocity, state) else torch.float32
    return common, common


@register_fake(SCHEMA)
def _(a):
    contiguous = lambda y: torch.empty_like(y, memory_format=torch.contiguous_format)
    return contiguous(a.v_cond), contiguous(a.x), contiguous(a.x)


@register_fake(BACKWARD_SCHEMA)
def _(a):
    like = next(g for g in (a.grad_v, a.grad_next, a.grad_hat) if g is not None)
    state = [g.dtype for g in (a.grad_next, a.grad_hat) if g is not None]
    tx = (
        state[0]
        if len(set(state)) == 1
        else (torch.float64 if torch.float64 in state else torch.float32)
        if state
        else None
    )
    tv = a.grad_v.dtype if a.grad_v is not None else tx
    if tx is None:
        tx = torch.float32 if tv in (torch.bfloat16, torch.float16) else tv
    tv, tx = _velocity_state_types(tv, tx)
    out = lambda need, dtype: like.new_empty(like.shape if need else (0,), dtype=dtype)
    return out(a.need_uncond, tv), out(a.need_cond, tv), out(a.need_x, tx)


def _check_mode_arguments(mode: object, kappa: object, sigma: object, noise: object) -> None:
    """kappa, sigma and noise are given for mode='memoryless' (M30) and only then."""
    V.check_choice("mode", mode, tuple(MODES))
    for name, value in (("kappa", kappa), ("sigma", sigma), ("noise", noise)):
        if mode == "memoryless" and value is None:
            raise ValueError(f"{name} is required with mode='memoryless' (M30)")
        if mode == "ode" and value is not None:
            raise ValueError(f"{name} is only used with mode='memoryless', got mode='ode'")


def cfg_euler(
    v_uncond: torch.Tensor | None,
    v_cond: torch.Tensor,
    x: torch.Tensor,
    w: torch.Tensor | float | None,
    h: torch.Tensor | float,
    t: torch.Tensor | float,
    detach_uncond: bool = True,
    stopgrad_xhat: bool = True,
    *,
    mode: str = "ode",
    kappa: torch.Tensor | float | None = None,
    sigma: torch.Tensor | float | None = None,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CFG combine + Euler step + one-step prediction (M5, M2, M6; memoryless step M30) -> (v, x_next, x_hat1).

    Args:
        v_uncond: unconditional velocity [B, ...], or None for no CFG (v = v_cond, w ignored).
        v_cond: conditional velocity, same shape; v comes out in its dtype.
        x: current state x_i, same shape; x_next and x_hat1 come out in its dtype.
        w: guidance scale; h: step t_{i+1} - t_i; t: paper time t_i. Each a float, 0-dim or [B] tensor.
        detach_uncond: no gradient to v_uncond (M5: its parameter path is detached in training).
        stopgrad_xhat: x_hat1 = x + (1 - t) sg(v) (M6); its gradient to x is kept either way.
        mode: 'ode' (M2) or 'memoryless' (M30: x + h(2v - kappa x) + sqrt(h) sigma noise).
        kappa, sigma: per-sample coefficients of the memoryless step (M29); noise: xi ~ N(0, I) like x.
    """
    backend = backend_for(OP, IMPLS, "v_cond", v_cond)
    if not (mode == "ode" and kappa is None and sigma is None and noise is None):
        _check_mode_arguments(mode, kappa, sigma, noise)
    if type(detach_uncond) is not bool or type(stopgrad_xhat) is not bool:
        for name, flag in (("detach_uncond", detach_uncond), ("stopgrad_xhat", stopgrad_xhat)):
            if type(flag) is not bool:
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    if v_uncond is None:
        w = 1.0  # unused by the forward; makes d v_cond = 1 * gbar in the backward
    elif w is None:
        raise ValueError("w is required when v_uncond is given")
    elif detach_uncond and v_uncond.requires_grad:
        v_uncond = v_uncond.detach()
    if backend in V.NATIVE:  # every other check in C++ (op.cpp)
        try:
            coefs = V.native_coefficients(w, h, t, kappa, sigma)
            return IMPLS[backend](v_uncond, v_cond, x, *coefs, noise, mode, stopgrad_xhat)
        except RuntimeError as error:
            V.raise_type_error(error)
            raise
    V.check_tensors(v_cond, "v_cond", x=x, v_uncond=v_uncond, noise=noise)
    coefs = [V.coefficient(name, value, v_cond) for name, value in (("w", w), ("h", h), ("t", t))]
    if mode == "memoryless":
        coefs += [V.coefficient("kappa", kappa, v_cond), V.coefficient("sigma", sigma, v_cond)]
    else:
        coefs += [(None, 0.0), (None, 0.0)]
    if backend == "torch":
        return reference(v_uncond, v_cond, x, w, h, t, stopgrad_xhat, mode, kappa, sigma, noise)
    return IMPLS[backend](v_uncond, v_cond, x, *(c for pair in coefs for c in pair), noise, mode, stopgrad_xhat)

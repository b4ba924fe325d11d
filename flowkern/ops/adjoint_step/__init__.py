"""`adjoint_step`: one step of the discrete (lean) adjoint from the VJPs of a CFG velocity.

    JTa    = (1 - w) vjp_u + w vjp_c       (M5: J~ = (1-w) J_u + w J_c; vjp_u alone without vjp_c)
    a_new  = a + h JTa                      ('ode', M23/M25)
           = a + h (2 JTa - kappa a)        ('memoryless', M31)
    cot    = [a_new; a_new]                 (cotangent of the next VJP on the [2B] CFG batch; a_new without CFG)

The VJPs are taken with cotangent [a; a] on the [2B] CFG batch (uncond first), so vjp_u = J_u^T a and
vjp_c = J_c^T a. Shapes: a, vjp_u, vjp_c [B, ...] (any layout, same shape); h, w, kappa fp32 [B] (fp64 for
fp64 a). a_new is fp32 (fp64 for fp64 a) whatever the input dtypes, since it accumulates K updates; cot is
in vjp_u's dtype, [2B, ...] with CFG, [B, ...] without, or empty when not asked for.
Linear, hence differentiable; backward from (g_a, g_cot), nothing saved but the [B] coefficients:
    G = g_a + g_cot[:B] + g_cot[B:] (g_cot alone without CFG)
    d a = G ('ode') | (1 - h kappa) G,  d vjp_u = c (1 - w) G,  d vjp_c = c w G,  c = h | 2h
Traffic: 3R + 1W = 4D (3D without CFG), +2W (+1W without CFG) with cot.
Files: reference.py (torch backend, oracle), triton.py (+ its autograd), op.cpp (schemas, checks, autograd), cpu.cpp,
cuda.cu.
"""

from __future__ import annotations

import torch

from flowkern.ops import _validate as V
from flowkern.ops._autograd import register_fake, schema_call
from flowkern.ops.adjoint_step.reference import MODES
from flowkern.ops.adjoint_step.reference import adjoint_step as reference
from flowkern.ops.backend import HAS_TRITON, backend_for, implementations, native_op
from flowkern.ops.cfg_euler import _velocity_state_types

OP = "adjoint_step"
MODE_ODE, MODE_MEMORYLESS = MODES["ode"], MODES["memoryless"]
# The native ops' arguments, written once (C++ reads them from structs generated from these: docs/ops.md).
SCHEMA = (
    "adjoint_step(Tensor a, Tensor vjp_u, Tensor? vjp_c, Tensor? h, float h_value, Tensor? w, float w_value, "
    "Tensor? kappa, float kappa_value, int mode, bool return_cot) -> (Tensor a_new, Tensor cot)"
)
BACKWARD_SCHEMA = (
    "adjoint_step_backward(Tensor? grad_a_new, Tensor? grad_cot, int batch, Tensor? h, float h_value, Tensor? w, "
    "float w_value, Tensor? kappa, float kappa_value, int mode, bool cfg, bool need_a, bool need_u, bool need_c) "
    "-> (Tensor d_a, Tensor d_vjp_u, Tensor d_vjp_c)"
)


def bytes_moved(a: torch.Tensor, vjp_u: torch.Tensor, cfg: bool = True, return_cot: bool = False,
                backward: bool = False) -> int:  # fmt: skip
    """Minimal HBM traffic of one call (math.md section 8). `backward` adds the backward from g_a alone:
    read g_a, write d vjp_u (and d vjp_c with CFG); d a = g_a in 'ode' moves nothing."""
    n, v_size, a_size = a.numel(), vjp_u.element_size(), a.element_size()
    new_size = 8 if a.dtype == torch.float64 else 4
    n_vjp = 2 if cfg else 1
    total = n * (a_size + n_vjp * v_size + new_size)
    if return_cot:
        total += n * n_vjp * v_size
    if backward:
        total += n * (new_size + n_vjp * v_size)
    return total


if HAS_TRITON:
    from flowkern.ops.adjoint_step.triton import adjoint_step as _triton_launcher

    _triton = schema_call(_triton_launcher, SCHEMA)
else:  # pragma: no cover
    _triton = None

IMPLS = implementations(reference, _triton, native_op(OP))


@register_fake(SCHEMA)
def _(a):
    a_new = a.a.new_empty(a.a.shape, dtype=V.loss_dtype(a.a))
    cot_shape = (((2 if a.vjp_c is not None else 1) * a.a.shape[0]), *a.a.shape[1:]) if a.return_cot else (0,)
    return a_new, a.vjp_u.new_empty(cot_shape)


@register_fake(BACKWARD_SCHEMA)
def _(a):
    like = a.grad_a_new if a.grad_a_new is not None else a.grad_cot
    tv = a.grad_cot.dtype if a.grad_cot is not None else None
    tx = (
        a.grad_a_new.dtype
        if a.grad_a_new is not None
        else (torch.float32 if tv in (torch.bfloat16, torch.float16) else tv)
    )
    tv, tx = _velocity_state_types(tv if tv is not None else tx, tx)
    shape = (a.batch, *like.shape[1:])
    out = lambda need, dtype: like.new_empty(shape if need else (0,), dtype=dtype)
    return out(a.need_a, tx), out(a.need_u, tv), out(a.need_c, tv)


def adjoint_step(
    a: torch.Tensor,
    vjp_u: torch.Tensor,
    h: torch.Tensor | float,
    vjp_c: torch.Tensor | None = None,
    w: torch.Tensor | float | None = None,
    kappa: torch.Tensor | float | None = None,
    mode: str = "ode",
    return_cot: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One adjoint step from VJPs (M23, M25; memoryless M31) -> (a_new, cot).

    Args:
        a: adjoint a_{i+1} [B, ...] (fp32 in practice).
        vjp_u: J_u^T a, the VJP of the unconditional (or only) velocity with cotangent a, same shape.
        h: step h_i (float, 0-dim or [B] tensor).
        vjp_c: J_c^T a of the conditional velocity (CFG), or None; then w must be None.
        w: guidance scale, required with vjp_c: J~^T a = (1 - w) vjp_u + w vjp_c (M5).
        kappa: memoryless drift coefficient kappa_i (M29), required with mode='memoryless'.
        mode: 'ode' (a + h J~^T a) or 'memoryless' (a + h (2 J~^T a - kappa a)).
        return_cot: also return cot = [a_new; a_new] ([2B, ...] with CFG, else a_new; vjp_u's dtype), the
            cotangent of the next VJP; otherwise cot is an empty tensor.

    a_new is fp32 (fp64 for fp64 a). Differentiable (linear) in a, vjp_u, vjp_c, through both outputs.
    """
    backend = backend_for(OP, IMPLS, "a", a)
    V.check_tensors(a, "a", vjp_u=vjp_u, vjp_c=vjp_c)
    if type(return_cot) is not bool:
        raise TypeError(f"return_cot must be a bool, got {type(return_cot).__name__}")
    code = MODES.get(mode) if isinstance(mode, str) else None
    if code is None:
        V.check_choice("mode", mode, tuple(MODES))
    h_pair = V.coefficient("h", h, a)
    if vjp_c is None:
        if w is not None:
            raise ValueError("w is only used with vjp_c (CFG); pass vjp_c or drop w")
        w_pair = (None, 0.0)
    elif w is None:
        raise ValueError("w is required when vjp_c is given (CFG)")
    else:
        w_pair = V.coefficient("w", w, a)
    if code == MODE_MEMORYLESS:
        if kappa is None:
            raise ValueError("kappa is required with mode='memoryless' (M31)")
        kappa_pair = V.coefficient("kappa", kappa, a)
    elif kappa is not None:
        raise ValueError("kappa is only used with mode='memoryless', got mode='ode'")
    else:
        kappa_pair = (None, 0.0)
    if backend == "torch":
        return reference(a, vjp_u, h, vjp_c, w, kappa, mode, return_cot)
    try:
        return IMPLS[backend](a, vjp_u, vjp_c, *h_pair, *w_pair, *kappa_pair, code, return_cot)
    except RuntimeError as error:  # a Python value of the wrong type for the native op (vjp_u=None)
        V.raise_type_error(error)
        raise

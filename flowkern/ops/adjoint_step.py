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
"""

from __future__ import annotations

import torch

from flowkern.ops import _validate as V
from flowkern.ops.backend import HAS_TRITON, ext_function, implementations, select_backend
from flowkern.ops.cfg_euler import _cast, _coef, _common, _dtype, ext_dtypes
from flowkern.ops.reference.adjoint_step import MODE_MEMORYLESS, MODE_ODE
from flowkern.ops.reference.adjoint_step import adjoint_step as reference
from flowkern.ops.reference.adjoint_step import adjoint_step_backward as reference_backward

OP = "adjoint_step"
MODES = {"ode": MODE_ODE, "memoryless": MODE_MEMORYLESS}


def _a_new_dtype(a: torch.Tensor | torch.dtype) -> torch.dtype:
    dtype = a if isinstance(a, torch.dtype) else a.dtype
    return torch.float64 if dtype == torch.float64 else torch.float32


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


# ---------------------------------------------------------------- Triton
if HAS_TRITON:
    import triton
    import triton.language as tl

    from flowkern.ops._triton_layout import reduction_layout

    @triton.jit
    def _adjoint_step_fwd_kernel(
        a_ptr, u_ptr, c_ptr, h_ptr, w_ptr, kappa_ptr, out_ptr, cot_ptr,
        d, chunk, cot_half,
        CFG: tl.constexpr, MEMORYLESS: tl.constexpr, COT: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1).to(tl.int64)
        h = tl.load(h_ptr + b).to(ACC)
        if CFG:
            w = tl.load(w_ptr + b).to(ACC)
            one_minus_w = 1 - w
        if MEMORYLESS:
            kappa = tl.load(kappa_ptr + b).to(ACC)
        start = c * chunk
        for off in range(0, chunk, BLOCK):
            idx = start + off + tl.arange(0, BLOCK)
            mask = idx < d
            ptr = b * d + idx
            # upcast right after every load (the interpreter miscomputes raw bf16)
            jta = tl.load(u_ptr + ptr, mask=mask, other=0).to(ACC)
            if CFG:  # (M5)
                jta = one_minus_w * jta + w * tl.load(c_ptr + ptr, mask=mask, other=0).to(ACC)
            av = tl.load(a_ptr + ptr, mask=mask, other=0).to(ACC)
            if MEMORYLESS:  # (M31)
                a_new = av + h * (2 * jta - kappa * av)
            else:  # (M25)
                a_new = av + h * jta
            tl.store(out_ptr + ptr, a_new.to(out_ptr.dtype.element_ty), mask=mask)
            if COT:
                cot = a_new.to(cot_ptr.dtype.element_ty)
                tl.store(cot_ptr + ptr, cot, mask=mask)
                if CFG:
                    tl.store(cot_ptr + cot_half + ptr, cot, mask=mask)

    @triton.jit
    def _adjoint_step_bwd_kernel(
        ga_ptr, gcot_ptr, h_ptr, w_ptr, kappa_ptr, da_ptr, du_ptr, dc_ptr,
        d, chunk, cot_half,
        HAS_GA: tl.constexpr, HAS_GCOT: tl.constexpr, CFG: tl.constexpr, MEMORYLESS: tl.constexpr,
        NEED_A: tl.constexpr, NEED_U: tl.constexpr, NEED_C: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1).to(tl.int64)
        h = tl.load(h_ptr + b).to(ACC)
        if MEMORYLESS:
            step = 2 * h
            keep = 1 - h * tl.load(kappa_ptr + b).to(ACC)  # d a_new / d a = 1 - h kappa (M31)
        else:
            step = h
        if CFG:
            w = tl.load(w_ptr + b).to(ACC)
            coef_u = step * (1 - w)
            coef_c = step * w
        else:
            coef_u = step
        start = c * chunk
        for off in range(0, chunk, BLOCK):
            idx = start + off + tl.arange(0, BLOCK)
            mask = idx < d
            ptr = b * d + idx
            g = tl.zeros([BLOCK], dtype=ACC)
            if HAS_GA:
                g += tl.load(ga_ptr + ptr, mask=mask, other=0).to(ACC)
            if HAS_GCOT:  # cot = [a_new; a_new]: both halves flow back into a_new
                g += tl.load(gcot_ptr + ptr, mask=mask, other=0).to(ACC)
                if CFG:
                    g += tl.load(gcot_ptr + cot_half + ptr, mask=mask, other=0).to(ACC)
            if NEED_A:
                if MEMORYLESS:
                    tl.store(da_ptr + ptr, (keep * g).to(da_ptr.dtype.element_ty), mask=mask)
                else:
                    tl.store(da_ptr + ptr, g.to(da_ptr.dtype.element_ty), mask=mask)
            if NEED_U:
                tl.store(du_ptr + ptr, (coef_u * g).to(du_ptr.dtype.element_ty), mask=mask)
            if NEED_C:
                tl.store(dc_ptr + ptr, (coef_c * g).to(dc_ptr.dtype.element_ty), mask=mask)

    def _acc_tl(*tensors):
        return tl.float64 if any(x is not None and x.dtype == torch.float64 for x in tensors) else tl.float32

    def _triton_forward(a, vjp_u, vjp_c, h, w, kappa, mode, return_cot):
        a, vjp_u = a.contiguous(), vjp_u.contiguous()
        vjp_c = vjp_c.contiguous() if vjp_c is not None else None
        batch, d = a.shape[0], a.numel() // a.shape[0]
        cfg, memoryless = vjp_c is not None, mode == MODE_MEMORYLESS
        assert vjp_u.shape == a.shape and (vjp_c is None or vjp_c.shape == a.shape)
        assert h.numel() == batch and (not cfg or w.numel() == batch) and (not memoryless or kappa.numel() == batch)
        a_new = torch.empty(a.shape, dtype=_a_new_dtype(a), device=a.device)
        cot_shape = ((2 if cfg else 1) * batch, *a.shape[1:]) if return_cot else (0,)
        cot = torch.empty(cot_shape, dtype=vjp_u.dtype, device=a.device)
        block, chunk, n_chunks = reduction_layout(d)
        _adjoint_step_fwd_kernel[(batch, n_chunks)](
            a, vjp_u, vjp_c if cfg else vjp_u, h, w if cfg else h, kappa if memoryless else h,
            a_new, cot if return_cot else a_new, d, chunk, batch * d,
            CFG=cfg, MEMORYLESS=memoryless, COT=return_cot, BLOCK=block, ACC=_acc_tl(a, vjp_u, vjp_c),
        )  # fmt: skip
        return a_new, cot

    def _triton_backward(
        grad_a_new, grad_cot, h, w, kappa, mode, cfg, need_a, need_u, need_c, a_dtype, u_dtype, c_dtype
    ):
        grad_a_new = grad_a_new.contiguous() if grad_a_new is not None else None
        grad_cot = grad_cot.contiguous() if grad_cot is not None else None
        batch = h.shape[0]
        like = grad_a_new if grad_a_new is not None else grad_cot[:batch]
        d = like.numel() // batch
        assert grad_cot is None or grad_cot.numel() == (2 if cfg else 1) * batch * d
        assert grad_a_new is None or grad_a_new.numel() == batch * d
        out = lambda need, dtype: torch.empty(like.shape if need else (0,), dtype=dtype, device=like.device)
        d_a, d_u, d_c = out(need_a, a_dtype), out(need_u, u_dtype), out(need_c, c_dtype)
        block, chunk, n_chunks = reduction_layout(d)
        dummy = grad_a_new if grad_a_new is not None else grad_cot
        _adjoint_step_bwd_kernel[(batch, n_chunks)](
            dummy if grad_a_new is None else grad_a_new, dummy if grad_cot is None else grad_cot,
            h, w if cfg else h, kappa if mode == MODE_MEMORYLESS else h,
            d_a if need_a else dummy, d_u if need_u else dummy, d_c if need_c else dummy, d, chunk, batch * d,
            HAS_GA=grad_a_new is not None, HAS_GCOT=grad_cot is not None, CFG=cfg,
            MEMORYLESS=mode == MODE_MEMORYLESS, NEED_A=need_a, NEED_U=need_u, NEED_C=need_c,
            BLOCK=block, ACC=_acc_tl(grad_a_new, grad_cot, h),
        )  # fmt: skip
        return d_a, d_u, d_c
else:  # pragma: no cover
    _triton_forward = _triton_backward = None


# ---------------------------------------------------------------- C++ / CUDA (flowkern._C)
_ext_fwd = ext_function("adjoint_step_fwd")
_ext_bwd = ext_function("adjoint_step_bwd")


def _ext_forward(a, vjp_u, vjp_c, h, w, kappa, mode, return_cot):
    # element types (velocity, state) = (VJPs, a); a_new comes out in the state's accumulation type
    tv, tx = ext_dtypes(_common(vjp_u.dtype, _dtype(vjp_c)), a.dtype)
    h, w, kappa = (_coef(c, tx) for c in (h, w, kappa))
    a_new, cot = _ext_fwd(_cast(a, tx), _cast(vjp_u, tv), _cast(vjp_c, tv), h, w, kappa, mode, return_cot)
    return a_new.to(_a_new_dtype(a)), cot.to(vjp_u.dtype)


def _ext_backward(grad_a_new, grad_cot, h, w, kappa, mode, cfg, need_a, need_u, need_c, a_dtype, u_dtype, c_dtype):
    tv, tx = ext_dtypes(_common(_dtype(grad_cot), u_dtype, c_dtype if cfg else None), a_dtype)
    acc = torch.float64 if tx == torch.float64 else torch.float32
    h, w, kappa = (_coef(c, tx) for c in (h, w, kappa))
    d_a, d_u, d_c = _ext_bwd(
        _cast(grad_a_new, acc), _cast(grad_cot, tv), h, w, kappa, mode, cfg, need_a, need_u, need_c, tv, tx
    )
    return d_a.to(a_dtype), d_u.to(u_dtype), d_c.to(c_dtype)


IMPLS = implementations(reference, _triton_forward, _ext_forward if _ext_fwd else None)
BACKWARD_IMPLS = implementations(reference_backward, _triton_backward, _ext_backward if _ext_bwd else None)


# ---------------------------------------------------------------- custom ops
@torch.library.custom_op("flowkern::adjoint_step", mutates_args=())
def _op(
    a: torch.Tensor,
    vjp_u: torch.Tensor,
    vjp_c: torch.Tensor | None,
    h: torch.Tensor,
    w: torch.Tensor | None,
    kappa: torch.Tensor | None,
    mode: int,
    return_cot: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    impl = select_backend(OP, IMPLS, a.device)
    return impl(a, vjp_u, vjp_c, h, w, kappa, mode, return_cot)


@_op.register_fake
def _(a, vjp_u, vjp_c, h, w, kappa, mode, return_cot):
    torch._check(vjp_u.shape == a.shape)
    torch._check(vjp_c is None or vjp_c.shape == a.shape)
    torch._check(h.shape == (a.shape[0],))
    torch._check(vjp_c is None or (w is not None and w.shape == (a.shape[0],)))
    torch._check(mode in (MODE_ODE, MODE_MEMORYLESS))
    torch._check(mode == MODE_ODE or kappa is not None)
    a_new = a.new_empty(a.shape, dtype=_a_new_dtype(a))
    cot_shape = (((2 if vjp_c is not None else 1) * a.shape[0]), *a.shape[1:]) if return_cot else (0,)
    return a_new, vjp_u.new_empty(cot_shape)


@torch.library.custom_op("flowkern::adjoint_step_backward", mutates_args=())
def _backward_op(
    grad_a_new: torch.Tensor | None,
    grad_cot: torch.Tensor | None,
    h: torch.Tensor,
    w: torch.Tensor | None,
    kappa: torch.Tensor | None,
    mode: int,
    cfg: bool,
    need_a: bool,
    need_u: bool,
    need_c: bool,
    a_dtype: torch.dtype,
    u_dtype: torch.dtype,
    c_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    device = (grad_a_new if grad_a_new is not None else grad_cot).device
    impl = select_backend(OP, BACKWARD_IMPLS, device)
    return impl(grad_a_new, grad_cot, h, w, kappa, mode, cfg, need_a, need_u, need_c, a_dtype, u_dtype, c_dtype)


@_backward_op.register_fake
def _(grad_a_new, grad_cot, h, w, kappa, mode, cfg, need_a, need_u, need_c, a_dtype, u_dtype, c_dtype):
    torch._check(grad_a_new is not None or grad_cot is not None)
    batch = h.shape[0]
    if grad_a_new is not None:
        shape = grad_a_new.shape
        torch._check(shape[0] == batch)
        like = grad_a_new
    else:
        torch._check(grad_cot.shape[0] == (2 if cfg else 1) * batch)
        shape = (batch, *grad_cot.shape[1:])
        like = grad_cot
    out = lambda need, dtype: like.new_empty(shape if need else (0,), dtype=dtype)
    return out(need_a, a_dtype), out(need_u, u_dtype), out(need_c, c_dtype)


def _setup_context(ctx, inputs, output):
    a, vjp_u, vjp_c, h, w, kappa, mode, return_cot = inputs
    ctx.save_for_backward(h, w, kappa)  # [B] coefficients only
    ctx.mode, ctx.cfg = mode, vjp_c is not None
    ctx.dtypes = (a.dtype, vjp_u.dtype, vjp_c.dtype if vjp_c is not None else vjp_u.dtype)
    ctx.set_materialize_grads(False)  # unused outputs arrive as None: no zero tensors read


def _backward(ctx, grad_a_new, grad_cot):
    h, w, kappa = ctx.saved_tensors
    if grad_cot is not None and grad_cot.numel() == 0:  # cot was not returned
        grad_cot = None
    nothing = (None,) * 8
    if grad_a_new is None and grad_cot is None:
        return nothing
    need_a, need_u = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_c = ctx.cfg and ctx.needs_input_grad[2]
    d_a = None
    if need_a and ctx.mode == MODE_ODE and grad_cot is None and grad_a_new.dtype == ctx.dtypes[0]:
        d_a, need_a = grad_a_new, False  # d a = g_a: no kernel
    if need_a or need_u or need_c:
        da, du, dc = _backward_op(
            grad_a_new, grad_cot, h, w, kappa, ctx.mode, ctx.cfg, need_a, need_u, need_c, *ctx.dtypes
        )
        return (da if need_a else d_a, du if need_u else None, dc if need_c else None) + nothing[3:]
    return (d_a,) + nothing[1:]


_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------- public API
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
    V.check_tensor("a", a)
    V.check_tensor("vjp_u", vjp_u, a, "a")
    if vjp_c is not None:
        V.check_tensor("vjp_c", vjp_c, a, "a")
    if not isinstance(return_cot, bool):
        raise TypeError(f"return_cot must be a bool, got {type(return_cot).__name__}")
    code = MODES[V.check_choice("mode", mode, tuple(MODES))]
    h = V.per_sample("h", h, a)
    if vjp_c is None:
        if w is not None:
            raise ValueError("w is only used with vjp_c (CFG); pass vjp_c or drop w")
    elif w is None:
        raise ValueError("w is required when vjp_c is given (CFG)")
    else:
        w = V.per_sample("w", w, a)
    if code == MODE_MEMORYLESS:
        if kappa is None:
            raise ValueError("kappa is required with mode='memoryless' (M31)")
        kappa = V.per_sample("kappa", kappa, a)
    elif kappa is not None:
        raise ValueError("kappa is only used with mode='memoryless', got mode='ode'")
    return _op(a, vjp_u, vjp_c, h, w, kappa, code, return_cot)

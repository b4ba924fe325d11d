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
"""

from __future__ import annotations

import torch

from flowkern.ops import _validate as V
from flowkern.ops.backend import HAS_TRITON, ext_function, implementations, select_backend
from flowkern.ops.reference.cfg_euler import MODE_MEMORYLESS, MODE_ODE
from flowkern.ops.reference.cfg_euler import cfg_euler as reference
from flowkern.ops.reference.cfg_euler import cfg_euler_backward as reference_backward

OP = "cfg_euler"
MODES = {"ode": MODE_ODE, "memoryless": MODE_MEMORYLESS}


def bytes_moved(
    v_cond: torch.Tensor, x: torch.Tensor, cfg: bool = True, mode: str = "ode", backward: bool = False
) -> int:
    """Minimal HBM traffic of one call (math.md section 8); `backward` adds the training-case backward
    (g_v only, uncond detached: read g_v, write d v_cond)."""
    n, v_size, x_size = x.numel(), v_cond.element_size(), x.element_size()
    reads = n * (v_size * (2 if cfg else 1) + x_size * (2 if mode == "memoryless" else 1))
    writes = n * (v_size + 2 * x_size)
    return reads + writes + (2 * n * v_size if backward else 0)


# ---------------------------------------------------------------- Triton
if HAS_TRITON:
    import triton
    import triton.language as tl

    from flowkern.ops._triton_layout import reduction_layout

    @triton.jit
    def _cfg_euler_fwd_kernel(
        vu_ptr, vc_ptr, x_ptr, noise_ptr, w_ptr, h_ptr, t_ptr, kappa_ptr, sigma_ptr, v_ptr, next_ptr, hat_ptr,
        d, chunk,
        CFG: tl.constexpr, MEMORYLESS: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1).to(tl.int64)
        h = tl.load(h_ptr + b).to(ACC)
        one_minus_t = 1 - tl.load(t_ptr + b).to(ACC)
        if CFG:
            w = tl.load(w_ptr + b).to(ACC)
        if MEMORYLESS:
            kappa = tl.load(kappa_ptr + b).to(ACC)
            if ACC == tl.float64:
                root_h = tl.sqrt(h)
            else:
                root_h = tl.sqrt_rn(h)  # correctly rounded like torch.sqrt (tl.sqrt is approximate for fp32)
            noise_scale = root_h * tl.load(sigma_ptr + b).to(ACC)
        start = c * chunk
        for off in range(0, chunk, BLOCK):
            idx = start + off + tl.arange(0, BLOCK)
            mask = idx < d
            ptr = b * d + idx
            # upcast right after every load (the interpreter miscomputes raw bf16)
            v = tl.load(vc_ptr + ptr, mask=mask, other=0).to(ACC)
            if CFG:
                vu = tl.load(vu_ptr + ptr, mask=mask, other=0).to(ACC)
                v = vu + w * (v - vu)  # (M5)
            xv = tl.load(x_ptr + ptr, mask=mask, other=0).to(ACC)
            if MEMORYLESS:  # (M30)
                xi = tl.load(noise_ptr + ptr, mask=mask, other=0).to(ACC)
                x_next = xv + h * (2 * v - kappa * xv) + noise_scale * xi
            else:  # (M2)
                x_next = xv + h * v
            x_hat = xv + one_minus_t * v  # (M6)
            tl.store(v_ptr + ptr, v.to(v_ptr.dtype.element_ty), mask=mask)
            tl.store(next_ptr + ptr, x_next.to(next_ptr.dtype.element_ty), mask=mask)
            tl.store(hat_ptr + ptr, x_hat.to(hat_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _cfg_euler_bwd_kernel(
        gv_ptr, gn_ptr, gh_ptr, w_ptr, h_ptr, t_ptr, kappa_ptr, du_ptr, dc_ptr, dx_ptr,
        d, chunk,
        HAS_GV: tl.constexpr, HAS_GN: tl.constexpr, HAS_GH: tl.constexpr, XHAT_GRAD: tl.constexpr,
        MEMORYLESS: tl.constexpr, NEED_U: tl.constexpr, NEED_C: tl.constexpr, NEED_X: tl.constexpr,
        BLOCK: tl.constexpr, ACC: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1).to(tl.int64)
        h = tl.load(h_ptr + b).to(ACC)
        w = tl.load(w_ptr + b).to(ACC)
        one_minus_t = 1 - tl.load(t_ptr + b).to(ACC)
        if MEMORYLESS:
            step = 2 * h
            keep = 1 - h * tl.load(kappa_ptr + b).to(ACC)  # d x_next / d x = 1 - h kappa (M30)
        else:
            step = h
        start = c * chunk
        for off in range(0, chunk, BLOCK):
            idx = start + off + tl.arange(0, BLOCK)
            mask = idx < d
            ptr = b * d + idx
            gn = tl.zeros([BLOCK], dtype=ACC)
            gh = tl.zeros([BLOCK], dtype=ACC)
            if HAS_GN:
                gn = tl.load(gn_ptr + ptr, mask=mask, other=0).to(ACC)
            if HAS_GH:
                gh = tl.load(gh_ptr + ptr, mask=mask, other=0).to(ACC)
            if NEED_U or NEED_C:
                gbar = tl.zeros([BLOCK], dtype=ACC)
                if HAS_GV:
                    gbar += tl.load(gv_ptr + ptr, mask=mask, other=0).to(ACC)
                if HAS_GN:
                    gbar += step * gn
                if HAS_GH and XHAT_GRAD:
                    gbar += one_minus_t * gh
                if NEED_C:
                    tl.store(dc_ptr + ptr, (w * gbar).to(dc_ptr.dtype.element_ty), mask=mask)
                if NEED_U:
                    tl.store(du_ptr + ptr, ((1 - w) * gbar).to(du_ptr.dtype.element_ty), mask=mask)
            if NEED_X:
                gx = tl.zeros([BLOCK], dtype=ACC)
                if HAS_GN:
                    if MEMORYLESS:
                        gx += keep * gn
                    else:
                        gx += gn
                if HAS_GH:
                    gx += gh
                tl.store(dx_ptr + ptr, gx.to(dx_ptr.dtype.element_ty), mask=mask)

    def _acc_tl(*tensors):
        return tl.float64 if any(x is not None and x.dtype == torch.float64 for x in tensors) else tl.float32

    def _triton_forward(v_uncond, v_cond, x, w, h, t, kappa, sigma, noise, mode, stopgrad_xhat):
        v_cond, x = v_cond.contiguous(), x.contiguous()
        v_uncond = v_uncond.contiguous() if v_uncond is not None else None
        noise = noise.contiguous() if noise is not None else None
        batch, d = x.shape[0], x.numel() // x.shape[0]
        assert v_cond.shape == x.shape and (v_uncond is None or v_uncond.shape == x.shape)
        assert noise is None or noise.shape == x.shape
        assert all(c.numel() == batch for c in (w, h, t) + ((kappa, sigma) if mode == MODE_MEMORYLESS else ()))
        v = torch.empty_like(v_cond)
        x_next, x_hat1 = torch.empty_like(x), torch.empty_like(x)
        block, chunk, n_chunks = reduction_layout(d)
        memoryless = mode == MODE_MEMORYLESS
        _cfg_euler_fwd_kernel[(batch, n_chunks)](
            v_uncond if v_uncond is not None else v_cond, v_cond, x, noise if memoryless else x,
            w, h, t, kappa if memoryless else h, sigma if memoryless else h, v, x_next, x_hat1, d, chunk,
            CFG=v_uncond is not None, MEMORYLESS=memoryless, BLOCK=block, ACC=_acc_tl(v_uncond, v_cond, x, noise),
        )  # fmt: skip
        return v, x_next, x_hat1

    def _triton_backward(
        grad_v, grad_next, grad_hat, w, h, t, kappa, mode, stopgrad_xhat,
        need_uncond, need_cond, need_x, uncond_dtype, cond_dtype, x_dtype,
    ):  # fmt: skip
        grads = [g.contiguous() if g is not None else None for g in (grad_v, grad_next, grad_hat)]
        like = next(g for g in grads if g is not None)
        assert all(g is None or g.shape == like.shape for g in grads)
        batch, d = like.shape[0], like.numel() // like.shape[0]
        assert all(c.numel() == batch for c in (w, h, t) + ((kappa,) if mode == MODE_MEMORYLESS else ()))
        out = lambda need, dtype: torch.empty(like.shape if need else (0,), dtype=dtype, device=like.device)
        d_uncond, d_cond, d_x = out(need_uncond, uncond_dtype), out(need_cond, cond_dtype), out(need_x, x_dtype)
        block, chunk, n_chunks = reduction_layout(d)
        _cfg_euler_bwd_kernel[(batch, n_chunks)](
            *(g if g is not None else like for g in grads), w, h, t, kappa if kappa is not None else h,
            d_uncond if need_uncond else like, d_cond if need_cond else like, d_x if need_x else like, d, chunk,
            HAS_GV=grads[0] is not None, HAS_GN=grads[1] is not None, HAS_GH=grads[2] is not None,
            XHAT_GRAD=not stopgrad_xhat, MEMORYLESS=mode == MODE_MEMORYLESS,
            NEED_U=need_uncond, NEED_C=need_cond, NEED_X=need_x, BLOCK=block, ACC=_acc_tl(*grads, w),
        )  # fmt: skip
        return d_uncond, d_cond, d_x
else:  # pragma: no cover
    _triton_forward = _triton_backward = None


# ---------------------------------------------------------------- C++ / CUDA (flowkern._C)
_ext_fwd = ext_function("cfg_euler_fwd")
_ext_bwd = ext_function("cfg_euler_bwd")


def _common(*dtypes: torch.dtype | None) -> torch.dtype:
    """The shared dtype, else fp32 (fp64 if any is fp64): `_validate.common_compute_dtype` on dtypes."""
    found = {d for d in dtypes if d is not None}
    if len(found) == 1:
        return found.pop()
    return torch.float64 if torch.float64 in found else torch.float32


def ext_dtypes(velocity: torch.dtype, state: torch.dtype) -> tuple[torch.dtype, torch.dtype]:
    """(velocity, state) element types the compiled kernels take: equal types, or bf16/fp16 velocities with
    fp32 states (the common case, model outputs next to fp32 states: no cast copy of either); any other
    pair is computed in the common dtype."""
    if velocity == state or (state == torch.float32 and velocity in (torch.bfloat16, torch.float16)):
        return velocity, state
    common = _common(velocity, state)
    return common, common


def _dtype(x: torch.Tensor | None) -> torch.dtype | None:
    return None if x is None else x.dtype


def _cast(x: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if x is None else x.to(dtype).contiguous()


def _coef(c: torch.Tensor | None, state: torch.dtype) -> torch.Tensor | None:
    """[B] coefficients in the kernels' accumulation type (fp64 with fp64 states, else fp32)."""
    return None if c is None else c.to(torch.float64 if state == torch.float64 else torch.float32).contiguous()


def _ext_forward(v_uncond, v_cond, x, w, h, t, kappa, sigma, noise, mode, stopgrad_xhat):
    tv, tx = ext_dtypes(_common(_dtype(v_uncond), v_cond.dtype), _common(x.dtype, _dtype(noise)))
    w, h, t, kappa, sigma = (_coef(c, tx) for c in (w, h, t, kappa, sigma))
    v, x_next, x_hat1 = _ext_fwd(
        _cast(v_uncond, tv), _cast(v_cond, tv), _cast(x, tx), w, h, t, kappa, sigma, _cast(noise, tx), mode
    )
    return v.to(v_cond.dtype), x_next.to(x.dtype), x_hat1.to(x.dtype)


def _ext_backward(
    grad_v, grad_next, grad_hat, w, h, t, kappa, mode, stopgrad_xhat,
    need_uncond, need_cond, need_x, uncond_dtype, cond_dtype, x_dtype,
):  # fmt: skip
    tv, tx = ext_dtypes(
        _common(_dtype(grad_v), uncond_dtype, cond_dtype), _common(_dtype(grad_next), _dtype(grad_hat), x_dtype)
    )
    w, h, t, kappa = (_coef(c, tx) for c in (w, h, t, kappa))
    d_uncond, d_cond, d_x = _ext_bwd(
        _cast(grad_v, tv), _cast(grad_next, tx), _cast(grad_hat, tx), w, h, t, kappa, mode, stopgrad_xhat,
        need_uncond, need_cond, need_x, tv, tx,
    )  # fmt: skip
    return d_uncond.to(uncond_dtype), d_cond.to(cond_dtype), d_x.to(x_dtype)


IMPLS = implementations(reference, _triton_forward, _ext_forward if _ext_fwd else None)
BACKWARD_IMPLS = implementations(reference_backward, _triton_backward, _ext_backward if _ext_bwd else None)


# ---------------------------------------------------------------- custom ops
@torch.library.custom_op("flowkern::cfg_euler", mutates_args=())
def _op(
    v_uncond: torch.Tensor | None,
    v_cond: torch.Tensor,
    x: torch.Tensor,
    w: torch.Tensor,
    h: torch.Tensor,
    t: torch.Tensor,
    kappa: torch.Tensor | None,
    sigma: torch.Tensor | None,
    noise: torch.Tensor | None,
    mode: int,
    stopgrad_xhat: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = select_backend(OP, IMPLS, x.device)
    return impl(v_uncond, v_cond, x, w, h, t, kappa, sigma, noise, mode, stopgrad_xhat)


@_op.register_fake
def _(v_uncond, v_cond, x, w, h, t, kappa, sigma, noise, mode, stopgrad_xhat):
    torch._check(v_cond.shape == x.shape)
    for other in (v_uncond, noise):
        torch._check(other is None or other.shape == x.shape)
    for coef in (w, h, t):
        torch._check(coef.shape == (x.shape[0],))
    torch._check(mode in (MODE_ODE, MODE_MEMORYLESS))
    if mode == MODE_MEMORYLESS:
        torch._check(kappa is not None and sigma is not None and noise is not None)
    contiguous = lambda y: torch.empty_like(y, memory_format=torch.contiguous_format)
    return contiguous(v_cond), contiguous(x), contiguous(x)


@torch.library.custom_op("flowkern::cfg_euler_backward", mutates_args=())
def _backward_op(
    grad_v: torch.Tensor | None,
    grad_next: torch.Tensor | None,
    grad_hat: torch.Tensor | None,
    w: torch.Tensor,
    h: torch.Tensor,
    t: torch.Tensor,
    kappa: torch.Tensor | None,
    mode: int,
    stopgrad_xhat: bool,
    need_uncond: bool,
    need_cond: bool,
    need_x: bool,
    uncond_dtype: torch.dtype,
    cond_dtype: torch.dtype,
    x_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    like = next(g for g in (grad_v, grad_next, grad_hat) if g is not None)
    impl = select_backend(OP, BACKWARD_IMPLS, like.device)
    return impl(
        grad_v, grad_next, grad_hat, w, h, t, kappa, mode, stopgrad_xhat,
        need_uncond, need_cond, need_x, uncond_dtype, cond_dtype, x_dtype,
    )  # fmt: skip


@_backward_op.register_fake
def _(
    grad_v, grad_next, grad_hat, w, h, t, kappa, mode, stopgrad_xhat,
    need_uncond, need_cond, need_x, uncond_dtype, cond_dtype, x_dtype,
):  # fmt: skip
    grads = [g for g in (grad_v, grad_next, grad_hat) if g is not None]
    torch._check(len(grads) > 0)
    like = grads[0]
    for g in grads[1:]:
        torch._check(g.shape == like.shape)
    torch._check(w.shape == (like.shape[0],))
    out = lambda need, dtype: like.new_empty(like.shape if need else (0,), dtype=dtype)
    return out(need_uncond, uncond_dtype), out(need_cond, cond_dtype), out(need_x, x_dtype)


def _setup_context(ctx, inputs, output):
    v_uncond, v_cond, x, w, h, t, kappa, sigma, noise, mode, stopgrad_xhat = inputs
    ctx.save_for_backward(w, h, t, kappa)  # [B] coefficients only
    ctx.mode, ctx.stopgrad_xhat = mode, stopgrad_xhat
    ctx.has_uncond = v_uncond is not None
    ctx.dtypes = (v_uncond.dtype if v_uncond is not None else v_cond.dtype, v_cond.dtype, x.dtype)
    ctx.set_materialize_grads(False)  # unused outputs arrive as None: no zero tensors read


def _backward(ctx, grad_v, grad_next, grad_hat):
    w, h, t, kappa = ctx.saved_tensors
    v_terms = [g for g in (grad_v, grad_next, None if ctx.stopgrad_xhat else grad_hat) if g is not None]
    x_terms = [g for g in (grad_next, grad_hat) if g is not None]
    need_uncond = ctx.has_uncond and ctx.needs_input_grad[0] and bool(v_terms)
    need_cond = ctx.needs_input_grad[1] and bool(v_terms)
    need_x = ctx.needs_input_grad[2] and bool(x_terms)
    d_uncond = d_cond = d_x = None
    # identities need no kernel: d v_cond = g_v without CFG, d x = the one x cotangent in 'ode'
    if need_cond and not ctx.has_uncond and len(v_terms) == 1 and grad_v is not None:
        d_cond, need_cond = grad_v, False
    if need_x and ctx.mode == MODE_ODE and len(x_terms) == 1:
        d_x, need_x = x_terms[0], False
    if need_uncond or need_cond or need_x:
        du, dc, dx = _backward_op(
            grad_v, grad_next, grad_hat, w, h, t, kappa, ctx.mode, ctx.stopgrad_xhat,
            need_uncond, need_cond, need_x, *ctx.dtypes,
        )  # fmt: skip
        d_uncond = du if need_uncond else None
        d_cond = dc if need_cond else d_cond
        d_x = dx if need_x else d_x
    return d_uncond, d_cond, d_x, None, None, None, None, None, None, None, None


_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------- public API
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
    V.check_tensor("v_cond", v_cond)
    V.check_tensor("x", x, v_cond, "v_cond")
    if v_uncond is not None:
        V.check_tensor("v_uncond", v_uncond, v_cond, "v_cond")
    for name, flag in (("detach_uncond", detach_uncond), ("stopgrad_xhat", stopgrad_xhat)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    code = MODES[V.check_choice("mode", mode, tuple(MODES))]
    h = V.per_sample("h", h, v_cond)
    t = V.per_sample("t", t, v_cond)
    if v_uncond is None:
        w = torch.ones_like(h)  # unused by the forward; makes d v_cond = 1 * gbar in the backward
    elif w is None:
        raise ValueError("w is required when v_uncond is given")
    else:
        w = V.per_sample("w", w, v_cond)
    if code == MODE_MEMORYLESS:
        for name, value in (("kappa", kappa), ("sigma", sigma), ("noise", noise)):
            if value is None:
                raise ValueError(f"{name} is required with mode='memoryless' (M30)")
        kappa = V.per_sample("kappa", kappa, v_cond)
        sigma = V.per_sample("sigma", sigma, v_cond)
        V.check_tensor("noise", noise, x, "x")
    else:
        for name, value in (("kappa", kappa), ("sigma", sigma), ("noise", noise)):
            if value is not None:
                raise ValueError(f"{name} is only used with mode='memoryless', got mode='ode'")
    if v_uncond is not None and detach_uncond:
        v_uncond = v_uncond.detach()
    return _op(v_uncond, v_cond, x, w, h, t, kappa, sigma, noise, code, stopgrad_xhat)

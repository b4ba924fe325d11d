"""Triton kernels of `cfg_euler` (M5, M2, M6, M30) and their autograd: elementwise on a flat grid (BLOCK and num_warps
autotuned on GPU), coefficients gathered per element."""

import torch
import triton
import triton.language as tl

from flowkern.ops._triton import coef_tensor, elementwise_configs, flat_grid, launch_device, tl_acc
from flowkern.ops.cfg_euler.reference import MODES

MODE_ODE, MODE_MEMORYLESS = MODES["ode"], MODES["memoryless"]


@triton.autotune(configs=elementwise_configs(), key=["n", "d"])
@triton.jit
def _cfg_euler_fwd_kernel(
    vu_ptr, vc_ptr, x_ptr, noise_ptr, w_ptr, h_ptr, t_ptr, kappa_ptr, sigma_ptr, v_ptr, next_ptr, hat_ptr,
    n, d,
    CFG: tl.constexpr, MEMORYLESS: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    # flat grid over all B*D elements; the per-sample coefficients are gathered (cached) per element
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    b = idx // d
    h = tl.load(h_ptr + b, mask=mask, other=0).to(ACC)
    one_minus_t = 1 - tl.load(t_ptr + b, mask=mask, other=0).to(ACC)
    # upcast right after every load (the interpreter miscomputes raw bf16)
    v = tl.load(vc_ptr + idx, mask=mask, other=0).to(ACC)
    if CFG:
        w = tl.load(w_ptr + b, mask=mask, other=0).to(ACC)
        vu = tl.load(vu_ptr + idx, mask=mask, other=0).to(ACC)
        v = vu + w * (v - vu)  # (M5)
    xv = tl.load(x_ptr + idx, mask=mask, other=0).to(ACC)
    if MEMORYLESS:  # (M30)
        kappa = tl.load(kappa_ptr + b, mask=mask, other=0).to(ACC)
        if ACC == tl.float64:
            root_h = tl.sqrt(h)
        else:
            root_h = tl.sqrt_rn(h)  # correctly rounded like torch.sqrt (tl.sqrt is approximate for fp32)
        noise_scale = root_h * tl.load(sigma_ptr + b, mask=mask, other=0).to(ACC)
        xi = tl.load(noise_ptr + idx, mask=mask, other=0).to(ACC)
        x_next = xv + h * (2 * v - kappa * xv) + noise_scale * xi
    else:  # (M2)
        x_next = xv + h * v
    x_hat = xv + one_minus_t * v  # (M6)
    tl.store(v_ptr + idx, v.to(v_ptr.dtype.element_ty), mask=mask)
    tl.store(next_ptr + idx, x_next.to(next_ptr.dtype.element_ty), mask=mask)
    tl.store(hat_ptr + idx, x_hat.to(hat_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=elementwise_configs(), key=["n", "d"])
@triton.jit
def _cfg_euler_bwd_kernel(
    gv_ptr, gn_ptr, gh_ptr, w_ptr, h_ptr, t_ptr, kappa_ptr, du_ptr, dc_ptr, dx_ptr,
    n, d,
    HAS_GV: tl.constexpr, HAS_GN: tl.constexpr, HAS_GH: tl.constexpr, XHAT_GRAD: tl.constexpr,
    MEMORYLESS: tl.constexpr, NEED_U: tl.constexpr, NEED_C: tl.constexpr, NEED_X: tl.constexpr,
    BLOCK: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    b = idx // d
    h = tl.load(h_ptr + b, mask=mask, other=0).to(ACC)
    if MEMORYLESS:
        step = 2 * h
        keep = 1 - h * tl.load(kappa_ptr + b, mask=mask, other=0).to(ACC)  # d x_next / d x = 1 - h kappa (M30)
    else:
        step = h
    gn = tl.zeros([BLOCK], dtype=ACC)
    gh = tl.zeros([BLOCK], dtype=ACC)
    if HAS_GN:
        gn = tl.load(gn_ptr + idx, mask=mask, other=0).to(ACC)
    if HAS_GH:
        gh = tl.load(gh_ptr + idx, mask=mask, other=0).to(ACC)
    if NEED_U or NEED_C:
        w = tl.load(w_ptr + b, mask=mask, other=0).to(ACC)
        gbar = tl.zeros([BLOCK], dtype=ACC)
        if HAS_GV:
            gbar += tl.load(gv_ptr + idx, mask=mask, other=0).to(ACC)
        if HAS_GN:
            gbar += step * gn
        if HAS_GH and XHAT_GRAD:
            gbar += (1 - tl.load(t_ptr + b, mask=mask, other=0).to(ACC)) * gh
        if NEED_C:
            tl.store(dc_ptr + idx, (w * gbar).to(dc_ptr.dtype.element_ty), mask=mask)
        if NEED_U:
            tl.store(du_ptr + idx, ((1 - w) * gbar).to(du_ptr.dtype.element_ty), mask=mask)
    if NEED_X:
        gx = tl.zeros([BLOCK], dtype=ACC)
        if HAS_GN:
            if MEMORYLESS:
                gx += keep * gn
            else:
                gx += gn
        if HAS_GH:
            gx += gh
        tl.store(dx_ptr + idx, gx.to(dx_ptr.dtype.element_ty), mask=mask)


def _launch_forward(v_uncond, v_cond, x, w, h, t, kappa, sigma, noise, mode):
    v_cond, x = v_cond.contiguous(), x.contiguous()
    v_uncond = v_uncond.contiguous() if v_uncond is not None else None
    noise = noise.contiguous() if noise is not None else None
    batch, d = x.shape[0], x[0].numel()
    assert v_cond.shape == x.shape and (v_uncond is None or v_uncond.shape == x.shape)
    assert noise is None or noise.shape == x.shape
    assert all(c.numel() == batch for c in (w, h, t) + ((kappa, sigma) if mode == MODE_MEMORYLESS else ()))
    v = torch.empty_like(v_cond)
    x_next, x_hat1 = torch.empty_like(x), torch.empty_like(x)
    memoryless = mode == MODE_MEMORYLESS
    if d == 0:
        return v, x_next, x_hat1
    _cfg_euler_fwd_kernel[flat_grid(x.numel())](
        v_uncond if v_uncond is not None else v_cond, v_cond, x, noise if memoryless else x,
        w, h, t, kappa if memoryless else h, sigma if memoryless else h, v, x_next, x_hat1, x.numel(), d,
        CFG=v_uncond is not None, MEMORYLESS=memoryless, ACC=tl_acc(v_uncond, v_cond, x, noise),
    )  # fmt: skip
    return v, x_next, x_hat1


def _launch_backward(
    grad_v, grad_next, grad_hat, w, h, t, kappa, mode, stopgrad_xhat,
    need_uncond, need_cond, need_x, uncond_dtype, cond_dtype, x_dtype,
):  # fmt: skip
    grads = [g.contiguous() if g is not None else None for g in (grad_v, grad_next, grad_hat)]
    like = next(g for g in grads if g is not None)
    assert all(g is None or g.shape == like.shape for g in grads)
    batch, d = like.shape[0], like[0].numel()
    assert all(c.numel() == batch for c in (w, h, t) + ((kappa,) if mode == MODE_MEMORYLESS else ()))
    out = lambda need, dtype: torch.empty(like.shape if need else (0,), dtype=dtype, device=like.device)
    d_uncond, d_cond, d_x = out(need_uncond, uncond_dtype), out(need_cond, cond_dtype), out(need_x, x_dtype)
    if d == 0:
        return d_uncond, d_cond, d_x
    _cfg_euler_bwd_kernel[flat_grid(like.numel())](
        *(g if g is not None else like for g in grads), w, h, t, kappa if kappa is not None else h,
        d_uncond if need_uncond else like, d_cond if need_cond else like, d_x if need_x else like, like.numel(), d,
        HAS_GV=grads[0] is not None, HAS_GN=grads[1] is not None, HAS_GH=grads[2] is not None,
        XHAT_GRAD=not stopgrad_xhat, MEMORYLESS=mode == MODE_MEMORYLESS,
        NEED_U=need_uncond, NEED_C=need_cond, NEED_X=need_x, ACC=tl_acc(*grads, w),
    )  # fmt: skip
    return d_uncond, d_cond, d_x


class _CfgEuler(torch.autograd.Function):
    """The native op's autograd (flowkern/ops/cfg_euler/op.cpp) on the Triton kernels; coefficients as [B] tensors."""

    @staticmethod
    def forward(ctx, v_uncond, v_cond, x, w, h, t, kappa, sigma, noise, mode, stopgrad_xhat):
        with launch_device(x):
            out = _launch_forward(v_uncond, v_cond, x, w, h, t, kappa, sigma, noise, mode)
        ctx.save_for_backward(w, h, t, kappa)  # [B] coefficients only
        ctx.mode, ctx.stopgrad_xhat, ctx.has_uncond = mode, stopgrad_xhat, v_uncond is not None
        ctx.dtypes = (v_uncond.dtype if v_uncond is not None else v_cond.dtype, v_cond.dtype, x.dtype)
        ctx.set_materialize_grads(False)  # unused outputs arrive as None: no zero tensors read
        return out

    @staticmethod
    def backward(ctx, grad_v, grad_next, grad_hat):
        w, h, t, kappa = ctx.saved_tensors
        v_terms = [g for g in (grad_v, grad_next, None if ctx.stopgrad_xhat else grad_hat) if g is not None]
        x_terms = [g for g in (grad_next, grad_hat) if g is not None]
        need_uncond = ctx.has_uncond and ctx.needs_input_grad[0] and bool(v_terms)
        need_cond = ctx.needs_input_grad[1] and bool(v_terms)
        need_x = ctx.needs_input_grad[2] and bool(x_terms)
        d_uncond = d_cond = d_x = None
        if need_cond and not ctx.has_uncond and len(v_terms) == 1 and grad_v is not None:
            d_cond, need_cond = grad_v, False  # d v_cond = g_v without CFG
        if need_x and ctx.mode == MODE_ODE and len(x_terms) == 1:
            d_x, need_x = x_terms[0], False  # d x = the one x cotangent ('ode')
        if need_uncond or need_cond or need_x:
            with launch_device(w):
                du, dc, dx = _launch_backward(
                    grad_v, grad_next, grad_hat, w, h, t, kappa, ctx.mode, ctx.stopgrad_xhat,
                    need_uncond, need_cond, need_x, *ctx.dtypes,
                )  # fmt: skip
            d_uncond = du if need_uncond else None
            d_cond = dc if need_cond else d_cond
            d_x = dx if need_x else d_x
        return d_uncond, d_cond, d_x, None, None, None, None, None, None, None, None


def cfg_euler(a):
    """The native op's contract (its schema arguments `a`) on the Triton kernels."""
    coef = lambda c, value: coef_tensor(c, value, a.x)
    mode = MODES[a.mode]
    memoryless = mode == MODE_MEMORYLESS
    return _CfgEuler.apply(
        a.v_uncond, a.v_cond, a.x, coef(a.w, a.w_value), coef(a.h, a.h_value), coef(a.t, a.t_value),
        coef(a.kappa, a.kappa_value) if memoryless else None, coef(a.sigma, a.sigma_value) if memoryless else None,
        a.noise if memoryless else None, mode, a.stopgrad_xhat,
    )  # fmt: skip

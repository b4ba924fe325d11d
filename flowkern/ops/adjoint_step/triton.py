"""Triton kernels of `adjoint_step` (M23, M25, M31) and their autograd: elementwise on a flat grid (BLOCK and num_warps
autotuned on GPU), coefficients gathered per element."""

import torch
import triton
import triton.language as tl

from flowkern.ops._triton import coef_tensor, elementwise_configs, flat_grid, launch_device, tl_acc

MODE_ODE, MODE_MEMORYLESS = 0, 1


@triton.autotune(configs=elementwise_configs(), key=["n", "d"])
@triton.jit
def _adjoint_step_fwd_kernel(
    a_ptr, u_ptr, c_ptr, h_ptr, w_ptr, kappa_ptr, out_ptr, cot_ptr,
    n, d, cot_half,
    CFG: tl.constexpr, MEMORYLESS: tl.constexpr, COT: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    # flat grid over all B*D elements; the per-sample coefficients are gathered (cached) per element
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    b = idx // d
    h = tl.load(h_ptr + b, mask=mask, other=0).to(ACC)
    # upcast right after every load (the interpreter miscomputes raw bf16)
    jta = tl.load(u_ptr + idx, mask=mask, other=0).to(ACC)
    if CFG:  # (M5)
        w = tl.load(w_ptr + b, mask=mask, other=0).to(ACC)
        jta = (1 - w) * jta + w * tl.load(c_ptr + idx, mask=mask, other=0).to(ACC)
    av = tl.load(a_ptr + idx, mask=mask, other=0).to(ACC)
    if MEMORYLESS:  # (M31)
        kappa = tl.load(kappa_ptr + b, mask=mask, other=0).to(ACC)
        a_new = av + h * (2 * jta - kappa * av)
    else:  # (M25)
        a_new = av + h * jta
    tl.store(out_ptr + idx, a_new.to(out_ptr.dtype.element_ty), mask=mask)
    if COT:
        cot = a_new.to(cot_ptr.dtype.element_ty)
        tl.store(cot_ptr + idx, cot, mask=mask)
        if CFG:
            tl.store(cot_ptr + cot_half + idx, cot, mask=mask)


@triton.autotune(configs=elementwise_configs(), key=["n", "d"])
@triton.jit
def _adjoint_step_bwd_kernel(
    ga_ptr, gcot_ptr, h_ptr, w_ptr, kappa_ptr, da_ptr, du_ptr, dc_ptr,
    n, d, cot_half,
    HAS_GA: tl.constexpr, HAS_GCOT: tl.constexpr, CFG: tl.constexpr, MEMORYLESS: tl.constexpr,
    NEED_A: tl.constexpr, NEED_U: tl.constexpr, NEED_C: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    b = idx // d
    h = tl.load(h_ptr + b, mask=mask, other=0).to(ACC)
    if MEMORYLESS:
        step = 2 * h
    else:
        step = h
    g = tl.zeros([BLOCK], dtype=ACC)
    if HAS_GA:
        g += tl.load(ga_ptr + idx, mask=mask, other=0).to(ACC)
    if HAS_GCOT:  # cot = [a_new; a_new]: both halves flow back into a_new
        g += tl.load(gcot_ptr + idx, mask=mask, other=0).to(ACC)
        if CFG:
            g += tl.load(gcot_ptr + cot_half + idx, mask=mask, other=0).to(ACC)
    if NEED_A:
        if MEMORYLESS:
            keep = 1 - h * tl.load(kappa_ptr + b, mask=mask, other=0).to(ACC)  # d a_new / d a = 1 - h kappa (M31)
            tl.store(da_ptr + idx, (keep * g).to(da_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(da_ptr + idx, g.to(da_ptr.dtype.element_ty), mask=mask)
    if CFG:
        w = tl.load(w_ptr + b, mask=mask, other=0).to(ACC)
        coef_u = step * (1 - w)
        if NEED_C:
            tl.store(dc_ptr + idx, (step * w * g).to(dc_ptr.dtype.element_ty), mask=mask)
    else:
        coef_u = step
    if NEED_U:
        tl.store(du_ptr + idx, (coef_u * g).to(du_ptr.dtype.element_ty), mask=mask)


def _launch_forward(args, h, w, kappa):
    """(a_new, cot) of the schema's arguments `args`, with the coefficients as [B] tensors (w, kappa None if unused)."""
    a, vjp_u, return_cot = args.a.contiguous(), args.vjp_u.contiguous(), args.return_cot
    vjp_c = args.vjp_c.contiguous() if args.vjp_c is not None else None
    batch, d = a.shape[0], a[0].numel()
    cfg, memoryless = vjp_c is not None, args.mode == MODE_MEMORYLESS
    assert vjp_u.shape == a.shape and (vjp_c is None or vjp_c.shape == a.shape)
    assert h.numel() == batch and (not cfg or w.numel() == batch) and (not memoryless or kappa.numel() == batch)
    a_new = torch.empty(a.shape, dtype=torch.float64 if a.dtype == torch.float64 else torch.float32, device=a.device)
    cot_shape = ((2 if cfg else 1) * batch, *a.shape[1:]) if return_cot else (0,)
    cot = torch.empty(cot_shape, dtype=vjp_u.dtype, device=a.device)
    if d == 0:
        return a_new, cot
    _adjoint_step_fwd_kernel[flat_grid(batch * d)](
        a, vjp_u, vjp_c if cfg else vjp_u, h, w if cfg else h, kappa if memoryless else h,
        a_new, cot if return_cot else a_new, batch * d, d, batch * d,
        CFG=cfg, MEMORYLESS=memoryless, COT=return_cot, ACC=tl_acc(a, vjp_u, vjp_c),
    )  # fmt: skip
    return a_new, cot


def _launch_backward(grad_a_new, grad_cot, h, w, kappa, mode, cfg, need_a, need_u, need_c, a_dtype, u_dtype, c_dtype):
    grad_a_new = grad_a_new.contiguous() if grad_a_new is not None else None
    grad_cot = grad_cot.contiguous() if grad_cot is not None else None
    batch = h.shape[0]
    like = grad_a_new if grad_a_new is not None else grad_cot[:batch]
    d = like.numel() // batch
    assert grad_cot is None or grad_cot.numel() == (2 if cfg else 1) * batch * d
    assert grad_a_new is None or grad_a_new.numel() == batch * d
    out = lambda need, dtype: torch.empty(like.shape if need else (0,), dtype=dtype, device=like.device)
    d_a, d_u, d_c = out(need_a, a_dtype), out(need_u, u_dtype), out(need_c, c_dtype)
    if d == 0:
        return d_a, d_u, d_c
    dummy = grad_a_new if grad_a_new is not None else grad_cot
    _adjoint_step_bwd_kernel[flat_grid(batch * d)](
        dummy if grad_a_new is None else grad_a_new, dummy if grad_cot is None else grad_cot,
        h, w if cfg else h, kappa if mode == MODE_MEMORYLESS else h,
        d_a if need_a else dummy, d_u if need_u else dummy, d_c if need_c else dummy, batch * d, d, batch * d,
        HAS_GA=grad_a_new is not None, HAS_GCOT=grad_cot is not None, CFG=cfg,
        MEMORYLESS=mode == MODE_MEMORYLESS, NEED_A=need_a, NEED_U=need_u, NEED_C=need_c,
        ACC=tl_acc(grad_a_new, grad_cot, h),
    )  # fmt: skip
    return d_a, d_u, d_c


class _AdjointStep(torch.autograd.Function):
    """The native op's autograd (flowkern/ops/adjoint_step/op.cpp) on the Triton kernels; coefficients as [B]."""

    @staticmethod
    def forward(ctx, args, a, vjp_u, vjp_c):
        coef = lambda c, value: coef_tensor(c, value, a)
        h = coef(args.h, args.h_value)
        w = coef(args.w, args.w_value) if vjp_c is not None else None
        kappa = coef(args.kappa, args.kappa_value) if args.mode == MODE_MEMORYLESS else None
        with launch_device(a):
            out = _launch_forward(args, h, w, kappa)
        ctx.save_for_backward(h, w, kappa)  # [B] coefficients only
        ctx.mode, ctx.cfg = args.mode, vjp_c is not None
        ctx.dtypes = (a.dtype, vjp_u.dtype, vjp_c.dtype if vjp_c is not None else vjp_u.dtype)
        ctx.set_materialize_grads(False)  # unused outputs arrive as None: no zero tensors read
        return out

    @staticmethod
    def backward(ctx, grad_a_new, grad_cot):
        h, w, kappa = ctx.saved_tensors
        if grad_cot is not None and grad_cot.numel() == 0:  # cot was not returned
            grad_cot = None
        nothing = (None,) * 4  # args, a, vjp_u, vjp_c
        if grad_a_new is None and grad_cot is None:
            return nothing
        need_a, need_u = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        need_c = ctx.cfg and ctx.needs_input_grad[3]
        d_a = None
        if need_a and ctx.mode == MODE_ODE and grad_cot is None:
            d_a, need_a = grad_a_new.to(ctx.dtypes[0]), False  # d a = g_a: no kernel
        if need_a or need_u or need_c:
            with launch_device(h):
                da, du, dc = _launch_backward(
                    grad_a_new, grad_cot, h, w, kappa, ctx.mode, ctx.cfg, need_a, need_u, need_c, *ctx.dtypes
                )
            return None, da if need_a else d_a, du if need_u else None, dc if need_c else None
        return None, d_a, None, None


def adjoint_step(args):
    """The native op's contract (its schema arguments `args`) on the Triton kernels."""
    return _AdjointStep.apply(args, args.a, args.vjp_u, args.vjp_c)

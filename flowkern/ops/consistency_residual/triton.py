"""Triton kernels of `consistency_residual` (M18, M20) and `consistency_residual_exact` (M21), with their autograd.

Each forward is one launch: per-(sample, chunk) partials of R^2 and c^2, summed in index order by the last program
to finish (`_finish`), coefficients read in-kernel (floats as scalars). The backward is one launch too."""

import torch
import triton.language as tl
from triton import jit

from flowkern.ops import _validate as V
from flowkern.ops._autograd import scale_saved
from flowkern.ops._reference import ETA_MODES
from flowkern.ops._triton import (
    FINAL_BLOCK,
    coef,
    coef_args,
    last_to_arrive,
    launch_device,
    reduction_layout,
    tickets,
    tl_acc,
)
from flowkern.ops._triton import eta as _eta
from flowkern.ops.consistency_residual.reference import boundary_grad


@jit
def _signed_step(t, eps_t):
    # e_b of (M20), the same fp32 test as `signed_time_step`
    return tl.where(t + eps_t <= 1.0, eps_t, -eps_t).to(t.dtype)


@jit
def _finish(partial_ptr, mask_ptr, mask_stride, mask_value, d, n_chunks, ticket_ptr, cons_ptr, bnd_ptr,
            ACC: tl.constexpr):  # fmt: skip
    # the last program to finish: L_cons = sum R^2 / (B D), L_bnd = sum_b m_b sum c^2 / (B D), tiles in index order
    n_tiles = tl.num_programs(0).to(tl.int64) * n_chunks
    if last_to_arrive(ticket_ptr, n_tiles):
        acc_r = tl.zeros([FINAL_BLOCK], dtype=ACC)
        acc_c = tl.zeros([FINAL_BLOCK], dtype=ACC)
        for off in range(0, n_tiles, FINAL_BLOCK):
            idx = off + tl.arange(0, FINAL_BLOCK)
            valid = idx < n_tiles
            acc_r += tl.load(partial_ptr + 2 * idx, mask=valid, other=0, volatile=True).to(ACC)
            c2 = tl.load(partial_ptr + 2 * idx + 1, mask=valid, other=0, volatile=True).to(ACC)
            if mask_ptr is None:
                acc_c += mask_value * c2
            else:
                acc_c += tl.load(mask_ptr + (idx // n_chunks) * mask_stride, mask=valid, other=0).to(ACC) * c2
        numel = (tl.num_programs(0).to(tl.int64) * d).to(ACC)
        tl.store(cons_ptr, tl.sum(acc_r, axis=0) / numel)
        tl.store(bnd_ptr, tl.sum(acc_c, axis=0) / numel)


@jit
def _residual_kernel(
    c_ptr, c_t_ptr, c_x_ptr, g_ptr, g_t_ptr, g_x_ptr, vb_ptr, vb_g_ptr,
    t_ptr, t_stride, t_value, rho_w_ptr, rho_w_stride, rho_w_value, rho_g_ptr, rho_g_stride, rho_g_value,
    mask_ptr, mask_stride, mask_value, q_ptr, partial_ptr, ticket_ptr, cons_ptr, bnd_ptr,
    d, chunk, n_chunks, beta, eps_t, eps_x, q_scale,
    ETA_MODE: tl.constexpr, COMPUTE_GRAD: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    t = coef(t_ptr, t_stride, t_value, b, ACC)
    step = _signed_step(t, eps_t)
    inv_step = 1.0 / step
    k_eta = beta * _eta(t, ETA_MODE)
    coef_t = beta * _eta(t + step, ETA_MODE)
    k_w = coef(rho_w_ptr, rho_w_stride, rho_w_value, b, ACC) / eps_x
    k_g = coef(rho_g_ptr, rho_g_stride, rho_g_value, b, ACC) / eps_x
    acc_r = tl.zeros([BLOCK], dtype=ACC)
    acc_c = tl.zeros([BLOCK], dtype=ACC)
    start = c * chunk
    for off in range(0, chunk, BLOCK):
        idx = start + off + tl.arange(0, BLOCK)
        mask = idx < d
        ptr = b * d + idx
        # upcast right after every load (the interpreter miscomputes raw bf16)
        cc = tl.load(c_ptr + ptr, mask=mask, other=0).to(ACC)
        g = cc - k_eta * tl.load(g_ptr + ptr, mask=mask, other=0).to(ACC)
        g_t = tl.load(c_t_ptr + ptr, mask=mask, other=0).to(ACC)
        g_t -= coef_t * tl.load(g_t_ptr + ptr, mask=mask, other=0).to(ACC)
        g_x = tl.load(c_x_ptr + ptr, mask=mask, other=0).to(ACC)
        g_x -= k_eta * tl.load(g_x_ptr + ptr, mask=mask, other=0).to(ACC)
        dvb = tl.load(vb_g_ptr + ptr, mask=mask, other=0).to(ACC)
        dvb -= tl.load(vb_ptr + ptr, mask=mask, other=0).to(ACC)
        r = (g_t - g) * inv_step + k_w * (g_x - g) + k_g * dvb
        acc_r += r * r
        acc_c += cc * cc
        if COMPUTE_GRAD:
            tl.store(q_ptr + ptr, r * q_scale, mask=mask)
    tile = (b * n_chunks + c) * 2
    tl.store(partial_ptr + tile, tl.sum(acc_r, axis=0))
    tl.store(partial_ptr + tile + 1, tl.sum(acc_c, axis=0))
    _finish(partial_ptr, mask_ptr, mask_stride, mask_value, d, n_chunks, ticket_ptr, cons_ptr, bnd_ptr, ACC)


@jit
def _residual_backward_kernel(
    q_ptr, c_ptr, t_ptr, t_stride, t_value, rho_w_ptr, rho_w_stride, rho_w_value, mask_ptr, mask_stride, mask_value,
    grad_cons_ptr, grad_bnd_ptr, grad_c_ptr, grad_c_t_ptr, grad_c_x_ptr,
    d, chunk, eps_t, eps_x, bnd_scale,
    NEED_C: tl.constexpr, NEED_C_T: tl.constexpr, NEED_C_X: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    t = coef(t_ptr, t_stride, t_value, b, ACC)
    inv_step = 1.0 / _signed_step(t, eps_t)
    k_w = coef(rho_w_ptr, rho_w_stride, rho_w_value, b, ACC) / eps_x
    g = tl.load(grad_cons_ptr).to(ACC)
    s_t = g * inv_step
    s_x = g * k_w
    s_c = -g * (inv_step + k_w)
    s_b = tl.load(grad_bnd_ptr).to(ACC) * coef(mask_ptr, mask_stride, mask_value, b, ACC) * bnd_scale
    # c is read on terminal samples only (s_b == 0 elsewhere; c assumed finite there)
    c_limit = tl.where(s_b != 0, d, 0)
    start = c * chunk
    for off in range(0, chunk, BLOCK):
        idx = start + off + tl.arange(0, BLOCK)
        mask = idx < d
        ptr = b * d + idx
        q = tl.load(q_ptr + ptr, mask=mask, other=0).to(ACC)
        if NEED_C_T:
            tl.store(grad_c_t_ptr + ptr, (q * s_t).to(grad_c_t_ptr.dtype.element_ty), mask=mask)
        if NEED_C_X:
            tl.store(grad_c_x_ptr + ptr, (q * s_x).to(grad_c_x_ptr.dtype.element_ty), mask=mask)
        if NEED_C:
            cc = tl.load(c_ptr + ptr, mask=idx < c_limit, other=0).to(ACC)
            tl.store(grad_c_ptr + ptr, (q * s_c + s_b * cc).to(grad_c_ptr.dtype.element_ty), mask=mask)


@jit
def _exact_kernel(
    dg_ptr, t3_ptr, c_ptr, mask_ptr, mask_stride, mask_value, grad_ptr, partial_ptr, ticket_ptr, cons_ptr, bnd_ptr,
    d, chunk, n_chunks, grad_scale,
    COMPUTE_GRAD: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    # c is read on terminal samples only (M17; c assumed finite elsewhere)
    c_limit = tl.where(coef(mask_ptr, mask_stride, mask_value, b, ACC) != 0, d, 0)
    acc_r = tl.zeros([BLOCK], dtype=ACC)
    acc_c = tl.zeros([BLOCK], dtype=ACC)
    start = c * chunk
    for off in range(0, chunk, BLOCK):
        idx = start + off + tl.arange(0, BLOCK)
        mask = idx < d
        ptr = b * d + idx
        r = tl.load(dg_ptr + ptr, mask=mask, other=0).to(ACC) + tl.load(t3_ptr + ptr, mask=mask, other=0).to(ACC)
        acc_r += r * r
        if COMPUTE_GRAD:
            tl.store(grad_ptr + ptr, (r * grad_scale).to(grad_ptr.dtype.element_ty), mask=mask)
        cc = tl.load(c_ptr + ptr, mask=idx < c_limit, other=0).to(ACC)
        acc_c += cc * cc
    tile = (b * n_chunks + c) * 2
    tl.store(partial_ptr + tile, tl.sum(acc_r, axis=0))
    tl.store(partial_ptr + tile + 1, tl.sum(acc_c, axis=0))
    _finish(partial_ptr, mask_ptr, mask_stride, mask_value, d, n_chunks, ticket_ptr, cons_ptr, bnd_ptr, ACC)


def _check_layout(primary, tensors, coefs):
    # the interpreter writes out of bounds silently: check what the kernels index before launching
    for x in tensors:
        if x.shape != primary.shape or not x.is_contiguous():
            raise ValueError(f"kernel input of shape {tuple(x.shape)} does not match {tuple(primary.shape)}")
    for x in coefs:
        if x is not None and x.shape not in ((), (primary.shape[0],)):
            raise ValueError(f"per-sample coefficient of shape {tuple(x.shape)} is not [{primary.shape[0]}]")


def _losses(primary):
    """(L_cons, L_bnd, per-tile partials, tickets) of a forward launch: outputs the last program writes (NaN when
    there is nothing to launch: the mean over no elements)."""
    acc = V.loss_dtype(primary)
    batch, d = primary.shape[0], primary[0].numel()
    if batch == 0 or d == 0:
        nan = primary.new_full((), float("nan"), dtype=acc)
        return nan, nan.clone(), None, None
    n_chunks = reduction_layout(d)[2]
    partial = primary.new_empty(batch * n_chunks * 2, dtype=acc)
    return primary.new_empty((), dtype=acc), primary.new_empty((), dtype=acc), partial, tickets(primary.device, 1)


def _launch(a, t, rho_w, rho_G, mask):
    """(L_cons, L_bnd, q) of the schema's arguments `a`, with the coefficients as `coef_args` triples: one launch."""
    tensors = [x.contiguous() for x in (a.c, a.c_t, a.c_x, a.ghat, a.ghat_t, a.ghat_x, a.vb, a.vb_G)]
    c = tensors[0]
    _check_layout(c, tensors, (t[0], rho_w[0], rho_G[0], mask[0]))
    batch, d = c.shape[0], c[0].numel()
    block, chunk, n_chunks = reduction_layout(d)
    acc = V.loss_dtype(c)
    q = torch.empty(c.shape, dtype=acc, device=c.device) if a.compute_grad else c.new_empty(0, dtype=acc)
    l_cons, l_bnd, partial, ticket = _losses(c)
    if partial is not None:
        _residual_kernel[(batch, n_chunks)](
            *tensors, *t, *rho_w, *rho_G, *mask, q if a.compute_grad else partial, partial, ticket, l_cons, l_bnd,
            d, chunk, n_chunks, a.beta, a.eps_t, a.eps_x, 2.0 / c.numel(),
            ETA_MODE=ETA_MODES[a.eta_mode], COMPUTE_GRAD=a.compute_grad, BLOCK=block, ACC=tl_acc(c),
        )  # fmt: skip
    return l_cons, l_bnd, q


def _launch_backward(a, q, c, t, rho_w, mask, grad_cons, grad_bnd, needs, out_dtype):
    """(d c, d c_t, d c_x), each empty unless in `needs`, from the saved q, c and coefficients (`coef_args`)."""
    c = c.contiguous()
    _check_layout(q, (c,), (t[0], rho_w[0], mask[0]))
    batch, d = q.shape[0], q[0].numel()
    block, chunk, n_chunks = reduction_layout(d)
    outs = [torch.empty(q.shape if n else (0,), dtype=out_dtype, device=q.device) for n in needs]
    if d > 0:
        _residual_backward_kernel[(batch, n_chunks)](
            q, c, *t, *rho_w, *mask, grad_cons.to(q.dtype), grad_bnd.to(q.dtype),
            *(o if n else q for o, n in zip(outs, needs)),
            d, chunk, a.eps_t, a.eps_x, 2.0 / q.numel(),
            NEED_C=needs[0], NEED_C_T=needs[1], NEED_C_X=needs[2], BLOCK=block, ACC=tl_acc(q),
        )  # fmt: skip
    return tuple(outs)


def _launch_exact(a, mask):
    dG, t3, c = (x.contiguous() for x in (a.dG, a.t3, a.c))
    _check_layout(dG, (t3, c), (mask[0],))
    batch, d = dG.shape[0], dG[0].numel()
    block, chunk, n_chunks = reduction_layout(d)
    grad = torch.empty_like(dG) if a.compute_grad else dG.new_empty(0)
    l_cons, l_bnd, partial, ticket = _losses(dG)
    if partial is not None:
        _exact_kernel[(batch, n_chunks)](
            dG, t3, c, *mask, grad if a.compute_grad else dG, partial, ticket, l_cons, l_bnd,
            d, chunk, n_chunks, 2.0 / dG.numel(),
            COMPUTE_GRAD=a.compute_grad, BLOCK=block, ACC=tl_acc(dG),
        )  # fmt: skip
    return l_cons, l_bnd, grad


class _Residual(torch.autograd.Function):
    """Differentiable in c, c_t, c_x (passed next to the schema's arguments `a` so autograd sees them)."""

    @staticmethod
    def forward(ctx, a, c, c_t, c_x):
        pairs = ((a.t, a.t_value), (a.rho_w, a.rho_w_value), (a.rho_G, a.rho_G_value), (a.mask, a.mask_value))
        coefs = [coef_args(x, value) for x, value in pairs]
        with launch_device(c):
            l_cons, l_bnd, q = _launch(a, *coefs)
        ctx.set_materialize_grads(False)
        t, rho_w, _, mask = coefs
        ctx.save_for_backward(q, c, t[0], rho_w[0], mask[0])  # the coefficient tensors (None for floats)
        ctx.coefs = [x[1:] for x in (t, rho_w, mask)]  # (stride, value) pairs
        ctx.a = a
        # the gradients' dtype: the value outputs' common one (autograd casts each to its input's dtype)
        dtypes = {c.dtype, c_t.dtype, c_x.dtype}
        ctx.out_dtype = (
            dtypes.pop() if len(dtypes) == 1 else torch.float64 if torch.float64 in dtypes else torch.float32
        )
        ctx.mark_non_differentiable(q)
        return l_cons, l_bnd, q

    @staticmethod
    def backward(ctx, grad_cons, grad_bnd, _unused):
        q, c, *coef_tensors = ctx.saved_tensors
        need = (ctx.needs_input_grad[1], *(n and grad_cons is not None for n in ctx.needs_input_grad[2:4]))
        if q.numel() == 0 or not any(need) or (grad_cons is None and grad_bnd is None):
            return None, None, None, None
        g_cons = grad_cons if grad_cons is not None else q.new_zeros(())
        g_bnd = grad_bnd if grad_bnd is not None else q.new_zeros(())
        with launch_device(q):
            coefs = [(x, *rest) for x, rest in zip(coef_tensors, ctx.coefs)]
            outs = _launch_backward(ctx.a, q, c, *coefs, g_cons, g_bnd, need, ctx.out_dtype)
        return None, *(out if n else None for out, n in zip(outs, need))


class _Exact(torch.autograd.Function):
    """Differentiable in dG and c (passed next to the schema's arguments `a` so autograd sees them)."""

    @staticmethod
    def forward(ctx, a, dG, c):
        with launch_device(dG):
            l_cons, l_bnd, grad = _launch_exact(a, coef_args(a.mask, a.mask_value))
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(grad, c, a.mask)
        ctx.mask_value = a.mask_value
        ctx.mark_non_differentiable(grad)
        return l_cons, l_bnd, grad

    @staticmethod
    def backward(ctx, grad_cons, grad_bnd, _unused):
        grad, c, mask = ctx.saved_tensors
        d_dG = d_c = None
        if ctx.needs_input_grad[1] and grad_cons is not None and grad.numel() > 0:
            d_dG = scale_saved(grad, grad_cons)
        if ctx.needs_input_grad[2] and grad_bnd is not None:
            acc = V.loss_dtype(c)
            mask = c.new_tensor(ctx.mask_value, dtype=acc) if mask is None else mask
            d_c = boundary_grad(grad_bnd, c, mask, acc).to(c.dtype)
        return None, d_dG, d_c


def consistency_residual(a):
    """The native op's contract (its schema arguments `a`), differentiable in c, c_t, c_x."""
    compute_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (a.c, a.c_t, a.c_x))
    return _Residual.apply(a._replace(compute_grad=compute_grad), a.c, a.c_t, a.c_x)


def consistency_residual_exact(a):
    """The native op's contract (its schema arguments `a`), differentiable in dG and c."""
    compute_grad = torch.is_grad_enabled() and a.dG.requires_grad
    return _Exact.apply(a._replace(compute_grad=compute_grad), a.dG, a.c)

"""Triton kernels of `adjoint_matching_loss` (M26, M28, M32): per-(sample, chunk) partials, fixed-order sums."""

import math

import torch
import triton
import triton.language as tl

from flowkern.ops import _validate as V
from flowkern.ops._triton import coef_tensor, launch_device, reduction_layout, tl_acc
from flowkern.ops.adjoint_matching_loss.reference import ELEMENTWISE, MEMORYLESS, MODES, NORM, NORM_FLOOR


@triton.jit
def _reduce_kernel(
    v_ft_ptr, v_base_ptr, adj_ptr, sigma_ptr, partial_ptr,
    d, chunk, n_chunks, lam,
    MODE: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    # per (sample, chunk) partial sums: (a/lam)^2 for 'norm' (MODE 1), d^2 for 'memoryless' (MODE 2)
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    acc = tl.zeros([BLOCK], dtype=ACC)
    start = c * chunk
    if MODE == 1:
        for off in range(0, chunk, BLOCK):
            idx = start + off + tl.arange(0, BLOCK)
            x = tl.load(adj_ptr + b * d + idx, mask=idx < d, other=0).to(ACC) / lam
            acc += x * x
    else:
        sigma = tl.load(sigma_ptr + b).to(ACC)
        two_over_sigma = 2.0 / sigma
        for off in range(0, chunk, BLOCK):
            idx = start + off + tl.arange(0, BLOCK)
            mask = idx < d
            ptr = b * d + idx
            x = tl.load(v_ft_ptr + ptr, mask=mask, other=0).to(ACC)
            x -= tl.load(v_base_ptr + ptr, mask=mask, other=0).to(ACC)
            x = two_over_sigma * x + sigma * tl.load(adj_ptr + ptr, mask=mask, other=0).to(ACC)
            acc += x * x
    tl.store(partial_ptr + b * n_chunks + c, tl.sum(acc, axis=0))


@triton.jit
def _sample_sum_kernel(partial_ptr, sums_ptr, n_chunks, CHUNKS_P2: tl.constexpr, ACC: tl.constexpr):
    # per-sample sum of the chunk partials in a fixed order (shape depends on D_b only)
    b = tl.program_id(0).to(tl.int64)
    idx = tl.arange(0, CHUNKS_P2)
    partial = tl.load(partial_ptr + b * n_chunks + idx, mask=idx < n_chunks, other=0).to(ACC)
    tl.store(sums_ptr + b, tl.sum(partial, axis=0))


@triton.jit
def _control_loss_kernel(
    v_ft_ptr, v_base_ptr, adj_ptr, sums_ptr, grad_ptr, partial_ptr,
    d, chunk, n_chunks, lam, exponent, norm_floor, grad_scale,
    MODE: tl.constexpr, P2: tl.constexpr, COMPUTE_GRAD: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    # diff = v_ft - v_base - u* (M26, M28): partial sum of diff^2 and the gradient 2 diff / D
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    if MODE == 1:
        norm = tl.maximum(tl.sqrt(tl.load(sums_ptr + b).to(ACC)), norm_floor)
        # ||omega||^exponent via exp2/log2 (no libdevice); 0^exponent = 0 for exponent > 0
        factor = tl.where(norm > 0, tl.exp2(tl.log2(tl.where(norm > 0, norm, 1.0)) * exponent), 0.0)
    acc = tl.zeros([BLOCK], dtype=ACC)
    start = c * chunk
    for off in range(0, chunk, BLOCK):
        idx = start + off + tl.arange(0, BLOCK)
        mask = idx < d
        ptr = b * d + idx
        omega = tl.load(adj_ptr + ptr, mask=mask, other=0).to(ACC) / lam
        if MODE == 1:
            u = -omega * factor
        elif P2:
            u = -omega
        else:
            mag = tl.abs(omega)
            mag = tl.where(mag > 0, tl.exp2(tl.log2(tl.where(mag > 0, mag, 1.0)) * exponent), 0.0)
            u = tl.where(omega < 0, mag, -mag)
        x = tl.load(v_ft_ptr + ptr, mask=mask, other=0).to(ACC)
        x -= tl.load(v_base_ptr + ptr, mask=mask, other=0).to(ACC)
        x -= u
        acc += x * x
        if COMPUTE_GRAD:
            tl.store(grad_ptr + ptr, (x * grad_scale).to(grad_ptr.dtype.element_ty), mask=mask)
    tl.store(partial_ptr + b * n_chunks + c, tl.sum(acc, axis=0))


@triton.jit
def _memoryless_grad_kernel(
    v_ft_ptr, v_base_ptr, adj_ptr, sigma_ptr, sums_ptr, grad_ptr,
    d, chunk, lct, batch,
    BLOCK: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    # dL/dv_ft = 1[s_b < lct] (4/sigma_b) d / B (M32); clamped samples store zeros without reading
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    sigma = tl.load(sigma_ptr + b).to(ACC)
    active = tl.load(sums_ptr + b).to(ACC) < lct
    coef = tl.where(active, 4.0 / (sigma * batch), 0.0)
    two_over_sigma = 2.0 / sigma
    read_end = tl.where(active, d, 0)  # clamped: every load masked off
    start = c * chunk
    for off in range(0, chunk, BLOCK):
        idx = start + off + tl.arange(0, BLOCK)
        mask = idx < d
        read = idx < read_end
        ptr = b * d + idx
        x = tl.load(v_ft_ptr + ptr, mask=read, other=0).to(ACC)
        x -= tl.load(v_base_ptr + ptr, mask=read, other=0).to(ACC)
        x = two_over_sigma * x + sigma * tl.load(adj_ptr + ptr, mask=read, other=0).to(ACC)
        tl.store(grad_ptr + ptr, (coef * x).to(grad_ptr.dtype.element_ty), mask=mask)


def adjoint_matching_loss(a):
    """(loss, dloss/dv_ft or empty) from the schema's arguments `a`: the native op's contract."""
    with launch_device(a.v_ft):
        return _launch(a, MODES[a.mode])


def _exponent(p: float, mode: int) -> float:
    """Exponent of (M26): 1/(p-1) on |a/lam| (elementwise), (2-p)/(p-1) on ||omega|| (norm)."""
    return 1.0 / (p - 1.0) if mode == ELEMENTWISE else (2.0 - p) / (p - 1.0)


def _launch(a, mode):
    v_ft, v_base, adjoint = (x.contiguous() for x in (a.v_ft, a.v_base, a.adjoint))
    sigma = coef_tensor(a.sigma, a.sigma_value, v_ft) if mode == MEMORYLESS else None
    lam, p, lct, compute_grad = a.lam, a.p, a.lct, a.compute_grad
    batch, d = v_ft.shape[0], v_ft[0].numel()
    if d == 0:  # [B, 0]: the mean over no elements is NaN; memoryless sums are 0 (no launch)
        loss = v_ft.new_full((), 0.0 if mode == MEMORYLESS else math.nan, dtype=V.loss_dtype(v_ft))
        return loss, torch.empty_like(v_ft) if compute_grad else v_ft.new_empty(0)
    # out-of-bounds accesses are silent in the interpreter: check what the kernels index
    assert v_base.shape == v_ft.shape and adjoint.shape == v_ft.shape
    assert mode != MEMORYLESS or (sigma is not None and sigma.shape == (batch,) and sigma.is_contiguous())
    block, chunk, n_chunks = reduction_layout(d)
    acc, loss_dtype = tl_acc(v_ft), V.loss_dtype(v_ft)
    grad = torch.empty_like(v_ft) if compute_grad else v_ft.new_empty(0)
    grid = (batch, n_chunks)
    if mode == NORM and p == 2.0:  # ||omega||^0 = 1: u* = -omega, no norm pass
        mode = ELEMENTWISE
    sums = None
    if mode != ELEMENTWISE:
        sigma_arg = sigma if mode == MEMORYLESS else v_ft  # unread outside memoryless mode
        partial = torch.empty(batch * n_chunks, dtype=loss_dtype, device=v_ft.device)
        _reduce_kernel[grid](
            v_ft, v_base, adjoint, sigma_arg, partial, d, chunk, n_chunks, lam, MODE=mode, BLOCK=block, ACC=acc
        )
        sums = torch.empty(batch, dtype=loss_dtype, device=v_ft.device)
        chunks_p2 = max(16, 1 << math.ceil(math.log2(n_chunks)))
        _sample_sum_kernel[(batch,)](partial, sums, n_chunks, CHUNKS_P2=chunks_p2, ACC=acc)
    if mode == MEMORYLESS:
        if compute_grad:
            _memoryless_grad_kernel[grid](
                v_ft, v_base, adjoint, sigma, sums, grad, d, chunk, lct, float(batch), BLOCK=block, ACC=acc
            )
        return sums.clamp(max=lct).sum() / batch, grad
    exponent = _exponent(p, mode)
    partial = torch.empty(batch * n_chunks, dtype=loss_dtype, device=v_ft.device)
    _control_loss_kernel[grid](
        v_ft, v_base, adjoint, sums if sums is not None else partial, grad if compute_grad else v_ft, partial,
        d, chunk, n_chunks, lam, exponent, NORM_FLOOR if exponent < 0 else 0.0, 2.0 / v_ft.numel(),
        MODE=mode, P2=p == 2.0, COMPUTE_GRAD=compute_grad, BLOCK=block, ACC=acc,
    )  # fmt: skip
    return partial.sum() / v_ft.numel(), grad

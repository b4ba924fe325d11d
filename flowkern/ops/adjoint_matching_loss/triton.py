"""Triton kernels of `adjoint_matching_loss` (M26, M28, M32): one launch ('elementwise', 'memoryless'; two for
'norm' with p != 2, whose control needs each sample's norm first), per-(sample, chunk) partials summed in a fixed
order by the last program to finish."""

import math

import torch
import triton
import triton.language as tl

from flowkern.ops import _validate as V
from flowkern.ops._triton import (
    FINAL_BLOCK,
    coef,
    coef_args,
    finish_mean,
    last_to_arrive,
    launch_device,
    ordered_sum,
    reduction_layout,
    tickets,
    tl_acc,
)
from flowkern.ops.adjoint_matching_loss.reference import ELEMENTWISE, MEMORYLESS, MODES, NORM, NORM_FLOOR


@triton.jit
def _norm_kernel(adj_ptr, partial_ptr, d, chunk, n_chunks, lam, BLOCK: tl.constexpr, ACC: tl.constexpr):
    # per (sample, chunk) partial sums of (a/lam)^2: ||omega_b||^2 for 'norm' (M28)
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    acc = tl.zeros([BLOCK], dtype=ACC)
    start = c * chunk
    for off in range(0, chunk, BLOCK):
        idx = start + off + tl.arange(0, BLOCK)
        x = tl.load(adj_ptr + b * d + idx, mask=idx < d, other=0).to(ACC) / lam
        acc += x * x
    tl.store(partial_ptr + b * n_chunks + c, tl.sum(acc, axis=0))


@triton.jit
def _control_loss_kernel(
    v_ft_ptr, v_base_ptr, adj_ptr, norm_partial_ptr, grad_ptr, partial_ptr, ticket_ptr, loss_ptr,
    d, chunk, n_chunks, lam, exponent, norm_floor, grad_scale,
    MODE: tl.constexpr, P2: tl.constexpr, COMPUTE_GRAD: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    # diff = v_ft - v_base - u* (M26, M28): partial sum of diff^2 and the gradient 2 diff / (B D); the last program
    # to finish writes the loss
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    if MODE == 1:  # ||omega_b||: the sample's partials of _reduce_kernel in a fixed order
        sq_norm = ordered_sum(norm_partial_ptr + b * n_chunks, n_chunks, 1, FINAL_BLOCK, ACC)
        norm = tl.maximum(tl.sqrt(sq_norm), norm_floor)
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
    finish_mean(partial_ptr, n_chunks, d, ticket_ptr, loss_ptr, ACC)


@triton.jit
def _memoryless_kernel(
    v_ft_ptr, v_base_ptr, adj_ptr, sigma_ptr, sigma_stride, sigma_value, grad_ptr, partial_ptr, ticket_ptr, loss_ptr,
    d, chunk, n_chunks, lct,
    COMPUTE_GRAD: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    # d = (2/sigma_b)(v_ft - v_base) + sigma_b a (M32); s_b = sum d^2; loss = sum_b min(s_b, lct) / B;
    # dL/dv_ft = 1[s_b < lct] (4/sigma_b) d / B: written for every tile, zeroed for a clamped sample by the last of
    # its programs (per-sample ticket), which stores min(s_b, lct); the last sample's last program writes the loss
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    batch = tl.num_programs(0)
    sigma = coef(sigma_ptr, sigma_stride, sigma_value, b, ACC)
    two_over_sigma = 2.0 / sigma
    grad_coef = 4.0 / (sigma * batch)
    acc = tl.zeros([BLOCK], dtype=ACC)
    start = c * chunk
    for off in range(0, chunk, BLOCK):
        idx = start + off + tl.arange(0, BLOCK)
        mask = idx < d
        ptr = b * d + idx
        x = tl.load(v_ft_ptr + ptr, mask=mask, other=0).to(ACC)
        x -= tl.load(v_base_ptr + ptr, mask=mask, other=0).to(ACC)
        x = two_over_sigma * x + sigma * tl.load(adj_ptr + ptr, mask=mask, other=0).to(ACC)
        acc += x * x
        if COMPUTE_GRAD:
            tl.store(grad_ptr + ptr, (grad_coef * x).to(grad_ptr.dtype.element_ty), mask=mask)
    tl.store(partial_ptr + b * n_chunks + c, tl.sum(acc, axis=0))
    if last_to_arrive(ticket_ptr + 1 + b, n_chunks):
        total = ordered_sum(partial_ptr + b * n_chunks, n_chunks, 1, FINAL_BLOCK, ACC)
        n_tiles = batch.to(tl.int64) * n_chunks  # partial[n_tiles + b]: min(s_b, lct)
        tl.store(partial_ptr + n_tiles + b, tl.minimum(total, lct))
        if COMPUTE_GRAD:
            if total >= lct:  # clamped: no gradient
                for off in range(0, d, BLOCK):
                    idx = off + tl.arange(0, BLOCK)
                    zeros = tl.zeros([BLOCK], dtype=grad_ptr.dtype.element_ty)
                    tl.store(grad_ptr + b * d + idx, zeros, mask=idx < d)
        if last_to_arrive(ticket_ptr, batch):
            tl.store(loss_ptr, ordered_sum(partial_ptr + n_tiles, batch, 1, FINAL_BLOCK, ACC) / batch.to(ACC))


def adjoint_matching_loss(a):
    """(loss, dloss/dv_ft or empty) from the schema's arguments `a`: the native op's contract."""
    with launch_device(a.v_ft):
        return _launch(a, MODES[a.mode])


def _exponent(p: float, mode: int) -> float:
    """Exponent of (M26): 1/(p-1) on |a/lam| (elementwise), (2-p)/(p-1) on ||omega|| (norm)."""
    return 1.0 / (p - 1.0) if mode == ELEMENTWISE else (2.0 - p) / (p - 1.0)


def _launch(a, mode):
    v_ft, v_base, adjoint = (x.contiguous() for x in (a.v_ft, a.v_base, a.adjoint))
    lam, p, lct, compute_grad = a.lam, a.p, a.lct, a.compute_grad
    batch, d = v_ft.shape[0], v_ft[0].numel()
    loss_dtype = V.loss_dtype(v_ft)
    grad = torch.empty_like(v_ft) if compute_grad else v_ft.new_empty(0)
    if d == 0 or batch == 0:  # [B, 0]: the mean over no elements is NaN; memoryless sums are 0 (no launch)
        return v_ft.new_full((), 0.0 if mode == MEMORYLESS and batch else math.nan, dtype=loss_dtype), grad
    # out-of-bounds accesses are silent in the interpreter: check what the kernels index
    assert v_base.shape == v_ft.shape and adjoint.shape == v_ft.shape
    assert a.sigma is None or a.sigma.shape in ((), (batch,))
    block, chunk, n_chunks = reduction_layout(d)
    acc = tl_acc(v_ft)
    grid, n_tiles = (batch, n_chunks), batch * n_chunks
    loss = v_ft.new_empty((), dtype=loss_dtype)
    grad_arg = grad if compute_grad else v_ft  # unwritten without the gradient
    if mode == MEMORYLESS:  # one launch
        partial = v_ft.new_empty(n_tiles + batch, dtype=loss_dtype)
        _memoryless_kernel[grid](
            v_ft, v_base, adjoint, *coef_args(a.sigma, a.sigma_value), grad_arg, partial,
            tickets(v_ft.device, 1 + batch), loss, d, chunk, n_chunks, lct,
            COMPUTE_GRAD=compute_grad, BLOCK=block, ACC=acc,
        )  # fmt: skip
        return loss, grad
    if mode == NORM and p == 2.0:  # ||omega||^0 = 1: u* = -omega, no norm pass
        mode = ELEMENTWISE
    partial = v_ft.new_empty(n_tiles * (2 if mode == NORM else 1), dtype=loss_dtype)
    if mode == NORM:  # ||omega_b||^2 partials first (a second launch: every element's u* needs its sample's norm)
        _norm_kernel[grid](adjoint, partial[n_tiles:], d, chunk, n_chunks, lam, BLOCK=block, ACC=acc)
    exponent = _exponent(p, mode)
    _control_loss_kernel[grid](
        v_ft, v_base, adjoint, partial[n_tiles:] if mode == NORM else partial, grad_arg, partial,
        tickets(v_ft.device, 1), loss, d, chunk, n_chunks, lam, exponent, NORM_FLOOR if exponent < 0 else 0.0,
        2.0 / v_ft.numel(), MODE=mode, P2=p == 2.0, COMPUTE_GRAD=compute_grad, BLOCK=block, ACC=acc,
    )  # fmt: skip
    return loss, grad

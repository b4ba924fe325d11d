"""Triton kernels of `reward_grad_clip` (M8): norms per (sample, chunk), fixed-order sums, then the scaling.

Sums of squares accumulate in fp64: a finite fp32/bf16/fp16 gradient whose fp32 sum of squares would overflow (entries
of 1e20) still gets its finite norm.
"""

import math

import torch
import triton
import triton.language as tl

from flowkern.ops import _validate as V
from flowkern.ops._triton import launch_device, reduction_layout, tl_acc
from flowkern.ops.reward_grad_clip.reference import NORM_FLOOR

FUSED_MAX_D = 4096  # samples up to this size are clipped by one program in one read


@triton.jit
def _sumsq_kernel(grad_ptr, partial_ptr, d, chunk, n_chunks, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    start = c * chunk
    for off in range(0, chunk, BLOCK):
        idx = start + off + tl.arange(0, BLOCK)
        x = tl.load(grad_ptr + b * d + idx, mask=idx < d, other=0).to(tl.float64)  # upcast right after the load
        acc += x * x
    tl.store(partial_ptr + b * n_chunks + c, tl.sum(acc, axis=0))


@triton.jit
def _norm_kernel(partial_ptr, norm_ptr, n_chunks, CHUNKS_P2: tl.constexpr):
    # n_b from the sample's fp64 chunk partials: a fixed-order sum whose shape depends on D_b only
    b = tl.program_id(0).to(tl.int64)
    idx = tl.arange(0, CHUNKS_P2)
    partial = tl.load(partial_ptr + b * n_chunks + idx, mask=idx < n_chunks, other=0)
    tl.store(norm_ptr + b, tl.sqrt(tl.sum(partial, axis=0)).to(norm_ptr.dtype.element_ty))


@triton.jit
def _scale_kernel(grad_ptr, norm_ptr, out_ptr, d, chunk, tau, floor, BLOCK: tl.constexpr, ACC: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    norm = tl.load(norm_ptr + b).to(ACC)
    rho = tl.minimum(norm, tau) / tl.maximum(norm, floor)  # (M8)
    start = c * chunk
    for off in range(0, chunk, BLOCK):
        idx = start + off + tl.arange(0, BLOCK)
        mask = idx < d
        x = tl.load(grad_ptr + b * d + idx, mask=mask, other=0).to(ACC)
        tl.store(out_ptr + b * d + idx, (x * rho).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _clip_fused_kernel(grad_ptr, out_ptr, norm_ptr, d, tau, floor, BLOCK: tl.constexpr, ACC: tl.constexpr):
    # the whole sample in one block: read once, norm, scale (2D traffic)
    b = tl.program_id(0).to(tl.int64)
    idx = tl.arange(0, BLOCK)
    mask = idx < d
    x = tl.load(grad_ptr + b * d + idx, mask=mask, other=0).to(ACC)
    x64 = x.to(tl.float64)
    norm = tl.sqrt(tl.sum(x64 * x64, axis=0)).to(ACC)
    rho = tl.minimum(norm, tau) / tl.maximum(norm, floor)  # (M8)
    tl.store(out_ptr + b * d + idx, (x * rho).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(norm_ptr + b, norm)


def reward_grad_clip(a):
    """(ghat, norms) from the schema's arguments `a`: the native op's contract."""
    grad, tau = a.grad.contiguous(), a.tau
    batch, d = grad.shape[0], grad[0].numel()
    out = torch.empty_like(grad)
    norms = torch.zeros(batch, dtype=V.loss_dtype(grad), device=grad.device)
    if d == 0:  # [B, 0]: zero norms, nothing to scale (no launch)
        return out, norms
    with launch_device(grad):
        return _launch(grad, tau, out, norms, batch, d)


def _launch(grad, tau, out, norms, batch, d):
    assert out.is_contiguous() and out.numel() == batch * d  # out-of-bounds writes are silent when interpreting
    acc = tl_acc(grad)
    if d <= FUSED_MAX_D:
        block = max(16, 1 << math.ceil(math.log2(d)))
        _clip_fused_kernel[(batch,)](
            grad, out, norms, d, tau, NORM_FLOOR, BLOCK=block, ACC=acc, num_warps=8 if block >= 4096 else 4
        )
        return out, norms
    block, chunk, n_chunks = reduction_layout(d)
    partial = torch.empty(batch * n_chunks, dtype=torch.float64, device=grad.device)
    _sumsq_kernel[(batch, n_chunks)](grad, partial, d, chunk, n_chunks, BLOCK=block)
    chunks_p2 = max(16, 1 << math.ceil(math.log2(n_chunks)))
    _norm_kernel[(batch,)](partial, norms, n_chunks, CHUNKS_P2=chunks_p2)
    _scale_kernel[(batch, n_chunks)](grad, norms, out, d, chunk, tau, NORM_FLOOR, BLOCK=block, ACC=acc)
    return out, norms

"""`reward_grad_clip`: per-sample norm clip of the reward gradient (M8).

    n_b    = ||grad_b||                               (L2 over all non-batch elements, fp32)
    rho_b  = min(n_b, tau) / max(n_b, 1e-12)
    ghat_b = rho_b * grad_b                           (grad's dtype)

Shapes: grad [B, ...] (any layout); tau a positive finite float. Returns (ghat like grad, norms fp32 [B];
fp64 for fp64 input). The norms feed the tau update of (M9).
Not differentiable: the clipped reward gradient is a stop-gradient input everywhere it is used (M15, M21),
so the public function detaches `grad` and the outputs never require grad (no autograd is registered).
Two passes: fp32 partial sums of squares per (sample, fixed chunk), summed per sample in a fixed order
(deterministic, batch-invariant), then the scaling pass. A sample of <= FUSED_MAX_D elements is
handled by one program that reads it once (it stays on chip).
Traffic: 1R (norms) + 1R + 1W (scale) = 3D elements; 2D when a sample stays on chip.
"""

from __future__ import annotations

import math

import torch

from flowkern.ops import _validate as V
from flowkern.ops.backend import HAS_TRITON, ext_function, implementations, select_backend
from flowkern.ops.reference.reward_grad_clip import NORM_FLOOR
from flowkern.ops.reference.reward_grad_clip import reward_grad_clip as reference

OP = "reward_grad_clip"
FUSED_MAX_D = 4096  # Triton: samples up to this size are clipped by one program in one read


def bytes_moved(grad: torch.Tensor) -> int:
    """Minimal HBM traffic of one call (math.md section 8): 3D (a sample does not fit on chip)."""
    return grad.numel() * grad.element_size() * 3


# ---------------------------------------------------------------- Triton
if HAS_TRITON:
    import triton
    import triton.language as tl

    from flowkern.ops._triton_layout import acc_dtype, reduction_layout

    @triton.jit
    def _sumsq_kernel(grad_ptr, partial_ptr, d, chunk, n_chunks, BLOCK: tl.constexpr, ACC: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1).to(tl.int64)
        acc = tl.zeros([BLOCK], dtype=ACC)
        start = c * chunk
        for off in range(0, chunk, BLOCK):
            idx = start + off + tl.arange(0, BLOCK)
            x = tl.load(grad_ptr + b * d + idx, mask=idx < d, other=0).to(ACC)  # upcast right after the load
            acc += x * x
        tl.store(partial_ptr + b * n_chunks + c, tl.sum(acc, axis=0))

    @triton.jit
    def _norm_kernel(partial_ptr, norm_ptr, n_chunks, CHUNKS_P2: tl.constexpr, ACC: tl.constexpr):
        # n_b from the sample's chunk partials: a fixed-order sum whose shape depends on D_b only
        b = tl.program_id(0).to(tl.int64)
        idx = tl.arange(0, CHUNKS_P2)
        partial = tl.load(partial_ptr + b * n_chunks + idx, mask=idx < n_chunks, other=0).to(ACC)
        tl.store(norm_ptr + b, tl.sqrt(tl.sum(partial, axis=0)))

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
        norm = tl.sqrt(tl.sum(x * x, axis=0))
        rho = tl.minimum(norm, tau) / tl.maximum(norm, floor)  # (M8)
        tl.store(out_ptr + b * d + idx, (x * rho).to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(norm_ptr + b, norm)

    def _triton_impl(grad, tau):
        grad = grad.contiguous()
        batch, d = grad.shape[0], grad.numel() // grad.shape[0]
        out = torch.empty_like(grad)
        norms = torch.empty(batch, dtype=V.loss_dtype(grad), device=grad.device)
        assert out.is_contiguous() and out.numel() == batch * d  # out-of-bounds writes are silent when interpreting
        acc = acc_dtype(grad)
        if d <= FUSED_MAX_D:
            block = max(16, 1 << math.ceil(math.log2(d)))
            _clip_fused_kernel[(batch,)](
                grad, out, norms, d, tau, NORM_FLOOR, BLOCK=block, ACC=acc, num_warps=8 if block >= 4096 else 4
            )
            return out, norms
        block, chunk, n_chunks = reduction_layout(d)
        partial = torch.empty(batch * n_chunks, dtype=norms.dtype, device=grad.device)
        _sumsq_kernel[(batch, n_chunks)](grad, partial, d, chunk, n_chunks, BLOCK=block, ACC=acc)
        chunks_p2 = max(16, 1 << math.ceil(math.log2(n_chunks)))
        _norm_kernel[(batch,)](partial, norms, n_chunks, CHUNKS_P2=chunks_p2, ACC=acc)
        _scale_kernel[(batch, n_chunks)](grad, norms, out, d, chunk, tau, NORM_FLOOR, BLOCK=block, ACC=acc)
        return out, norms
else:  # pragma: no cover
    _triton_impl = None


# ---------------------------------------------------------------- C++ / CUDA (flowkern._C)
_ext_fwd = ext_function("reward_grad_clip_fwd")


def _ext_impl(grad, tau):
    return _ext_fwd(grad.contiguous(), tau)


IMPLS = implementations(reference, _triton_impl, _ext_impl if _ext_fwd else None)


# ---------------------------------------------------------------- custom op (no autograd: see docstring)
@torch.library.custom_op("flowkern::reward_grad_clip", mutates_args=())
def _op(grad: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    impl = select_backend(OP, IMPLS, grad.device)
    return impl(grad, tau)


@_op.register_fake
def _(grad, tau):
    torch._check(grad.dim() >= 1)
    out = torch.empty_like(grad, memory_format=torch.contiguous_format)
    return out, grad.new_empty((grad.shape[0],), dtype=V.loss_dtype(grad))


# ---------------------------------------------------------------- public API
def reward_grad_clip(grad: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip each sample of the reward gradient to L2 norm <= tau (M8).

    Args:
        grad: reward gradient grad r at x_hat1 [B, ...] (fp32/bf16/fp16; fp64 accepted).
        tau: clip threshold, a positive finite float (M9 updates it from the returned norms).

    Returns:
        (ghat, norms): ghat = min(n_b, tau)/max(n_b, 1e-12) * grad_b in grad's dtype, and the
        unclipped per-sample norms n_b, fp32 [B] (fp64 for fp64 input).

    Not differentiable: `grad` is detached, so the outputs never require grad (backward through
    them raises PyTorch's "does not require grad" error).
    """
    V.check_tensor("grad", grad)
    tau = V.check_float("tau", tau, positive=True)
    return _op(grad.detach(), tau)

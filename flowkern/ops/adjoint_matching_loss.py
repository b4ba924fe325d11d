"""`adjoint_matching_loss`: the (deterministic / memoryless) adjoint matching loss with its gradient in one op.

`adjoint` is the paired lean adjoint a = a~_{i+1} (M27); v_base and adjoint receive no gradient.

'elementwise' (M26 with c(u) = (1/p) sum_j |u_j|^p, M28 for one step):
    u*_j = -sign(a_j) |a_j / lam|^(1/(p-1))              (p = 2: u* = -a/lam, computed exactly)
    loss = mean((v_ft - v_base - u*)^2),  dloss/dv_ft = 2 (v_ft - v_base - u*) / D
'norm' (M26 with c(u) = (1/p) ||u||^p): omega = a/lam, ||omega_b|| per sample (floored at 1e-12 when the
    exponent is negative, p > 2), u* = -omega ||omega_b||^((2-p)/(p-1)); then the same loss and gradient.
'memoryless' (M32; lam and p unused): d = (2/sigma_b)(v_ft - v_base) + sigma_b a, s_b = sum_j d_j^2,
    loss = (1/B) sum_b min(s_b, lct),  dloss/dv_ft = 1[s_b < lct] (4/sigma_b) d / B.

Shapes: v_ft, v_base, adjoint [B, ...] (any layout; same shape); sigma fp32 [B] or []. loss fp32 [] (fp64 for
fp64 inputs); the gradient is produced in the forward pass in v_ft's dtype. Saved for backward: that gradient
(the backward scales it by the incoming scalar). Double backward is not supported.
Reductions: fp32 partials per (sample, fixed chunk), summed in a fixed order (deterministic).
Traffic: elementwise 3R + 1W = 4D; norm 1R + 3R + 1W = 5D; memoryless 3R, then 3R + 1W = 7D (4D when a
sample stays on chip). Without the gradient: 3D, 4D, 3D.
"""

from __future__ import annotations

import math
import numbers

import torch

from flowkern.ops import _validate as V
from flowkern.ops._loss_autograd import register_saved_grad_autograd
from flowkern.ops.backend import HAS_TRITON, ext_function, implementations, select_backend
from flowkern.ops.reference.adjoint_matching_loss import ELEMENTWISE, MEMORYLESS, NORM, NORM_FLOOR
from flowkern.ops.reference.adjoint_matching_loss import adjoint_matching_loss as reference

OP = "adjoint_matching_loss"
MODES = {"elementwise": ELEMENTWISE, "norm": NORM, "memoryless": MEMORYLESS}
_TRAFFIC = {ELEMENTWISE: (3, 4), NORM: (4, 5), MEMORYLESS: (3, 7)}  # (without, with) the gradient, in D


def bytes_moved(v_ft: torch.Tensor, mode: str = "elementwise", compute_grad: bool = True) -> int:
    """Minimal HBM traffic of one call (math.md section 8), assuming a sample does not fit on chip."""
    return v_ft.numel() * v_ft.element_size() * _TRAFFIC[MODES[mode]][int(compute_grad)]


def _exponent(p: float, mode: int) -> float:
    """Exponent of (M26): 1/(p-1) on |a/lam| (elementwise), (2-p)/(p-1) on ||omega|| (norm)."""
    return 1.0 / (p - 1.0) if mode == ELEMENTWISE else (2.0 - p) / (p - 1.0)


# ---------------------------------------------------------------- Triton
if HAS_TRITON:
    import triton
    import triton.language as tl

    from flowkern.ops._triton_layout import acc_dtype, reduction_layout

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

    def _triton_impl(v_ft, v_base, adjoint, sigma, lam, p, mode, lct, compute_grad):
        v_ft, v_base, adjoint = (x.contiguous() for x in (v_ft, v_base, adjoint))
        batch, d = v_ft.shape[0], v_ft.numel() // v_ft.shape[0]
        # out-of-bounds accesses are silent in the interpreter: check what the kernels index
        assert v_base.shape == v_ft.shape and adjoint.shape == v_ft.shape
        assert mode != MEMORYLESS or (sigma is not None and sigma.shape == (batch,) and sigma.is_contiguous())
        block, chunk, n_chunks = reduction_layout(d)
        acc, loss_dtype = acc_dtype(v_ft), V.loss_dtype(v_ft)
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
else:  # pragma: no cover
    _triton_impl = None


# ---------------------------------------------------------------- C++ / CUDA (flowkern._C)
_ext_fwd = ext_function("adjoint_matching_loss_fwd")


def _ext_impl(v_ft, v_base, adjoint, sigma, lam, p, mode, lct, compute_grad):
    dtype = V.common_compute_dtype(v_ft, v_base, adjoint)
    args = [x.to(dtype).contiguous() for x in (v_ft, v_base, adjoint)]
    if sigma is not None:  # the kernels read coefficients in the accumulation dtype of `dtype`
        sigma = sigma.to(torch.float64 if dtype == torch.float64 else torch.float32).contiguous()
    if mode == NORM and p == 2.0:  # ||omega||^0 = 1: u* = -omega, no norm pass
        mode = ELEMENTWISE
    loss, grad = _ext_fwd(*args, sigma, lam, p, mode, lct, compute_grad)
    return loss.to(V.loss_dtype(v_ft)), grad.to(v_ft.dtype) if compute_grad else grad


IMPLS = implementations(reference, _triton_impl, _ext_impl if _ext_fwd else None)


# ---------------------------------------------------------------- custom op
@torch.library.custom_op("flowkern::adjoint_matching_loss", mutates_args=())
def _op(
    v_ft: torch.Tensor,
    v_base: torch.Tensor,
    adjoint: torch.Tensor,
    sigma: torch.Tensor | None,
    lam: float,
    p: float,
    mode: int,
    lct: float,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    impl = select_backend(OP, IMPLS, v_ft.device)
    return impl(v_ft, v_base, adjoint, sigma, lam, p, mode, lct, compute_grad)


@_op.register_fake
def _(v_ft, v_base, adjoint, sigma, lam, p, mode, lct, compute_grad):
    for other in (v_base, adjoint):
        torch._check(other.shape == v_ft.shape)
    if sigma is not None:
        torch._check(sigma.shape == (v_ft.shape[0],))
    loss = v_ft.new_empty((), dtype=V.loss_dtype(v_ft))
    return loss, (torch.empty_like(v_ft, memory_format=torch.contiguous_format) if compute_grad else v_ft.new_empty(0))


register_saved_grad_autograd(_op, OP, num_inputs=9, grad_inputs=(0,))


# ---------------------------------------------------------------- public API
def _check_lct(lct: object) -> float:
    """LCT of (M32): a float > 0; float('inf') disables the clamp."""
    if isinstance(lct, torch.Tensor) and lct.numel() == 1:
        lct = lct.item()
    if isinstance(lct, bool) or not isinstance(lct, numbers.Real):
        raise TypeError(f"lct must be a float, got {type(lct).__name__}")
    lct = float(lct)
    if math.isnan(lct) or lct <= 0:
        raise ValueError(f"lct must be > 0 (float('inf') disables the clamp), got {lct}")
    return lct


def adjoint_matching_loss(
    v_ft: torch.Tensor,
    v_base: torch.Tensor,
    adjoint: torch.Tensor,
    lam: float,
    p: float = 2.0,
    mode: str = "elementwise",
    sigma: torch.Tensor | float | None = None,
    lct: float | None = None,
) -> torch.Tensor:
    """Adjoint matching loss for one step, fp32 (see the module docstring for the math).

    Args:
        v_ft: fine-tuned (CFG-combined) velocity [B, ...]; the only input that receives a gradient.
        v_base: base velocity, same shape (no gradient).
        adjoint: the paired lean adjoint a~_{i+1} (M25, M27; M31 for memoryless), same shape (no gradient).
        lam: lambda > 0 of (M24), finite ('elementwise' and 'norm'; validated but unused by 'memoryless').
        p: cost exponent of (M26), finite and > 1 (default 2: u* = -adjoint/lam).
        mode: 'elementwise' (DAM, c = (1/p) sum |u_j|^p), 'norm' (c = (1/p)||u||^p) or 'memoryless' (AM, M32).
        sigma: memoryless only (required there): sigma_i per sample, > 0 ([B], 0-dim or float).
        lct: memoryless only (required there): the loss clamp LCT > 0; float('inf') disables the clamp.
    """
    V.check_tensor("v_ft", v_ft)
    V.check_tensor("v_base", v_base, v_ft, "v_ft")
    V.check_tensor("adjoint", adjoint, v_ft, "v_ft")
    lam = V.check_float("lam", lam, positive=True)
    p = V.check_float("p", p, minimum=1.0)
    code = MODES[V.check_choice("mode", mode, tuple(MODES))]
    if code == MEMORYLESS:
        if sigma is None:
            raise ValueError("sigma is required for mode='memoryless' (M32)")
        if lct is None:
            raise ValueError("lct is required for mode='memoryless' (M32); float('inf') disables the clamp")
        sigma = V.per_sample("sigma", sigma, v_ft)
        # data-dependent check: CPU eager only (a GPU sync or a graph break otherwise)
        if sigma.device.type == "cpu" and not torch.compiler.is_compiling() and not bool((sigma > 0).all()):
            raise ValueError("sigma must be > 0 for every sample")
        lct = _check_lct(lct)
    else:
        for name, value in (("sigma", sigma), ("lct", lct)):
            if value is not None:
                raise ValueError(f"{name} is only used by mode='memoryless', got mode={mode!r}")
        lct = math.inf
    compute_grad = torch.is_grad_enabled() and v_ft.requires_grad
    loss, _ = _op(v_ft, v_base, adjoint, sigma, lam, p, code, lct, compute_grad)
    return loss

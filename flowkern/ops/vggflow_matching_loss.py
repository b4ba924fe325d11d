"""`vggflow_matching_loss`: the VGG-Flow matching loss (M16) with its gradient in one pass.

    T    = v_base + beta * eta_t * ghat - c_phi          (c_phi = value_out = beta * nu_phi)
    loss = mean((v_ft - T)^2)                            (mean over all B*D elements, fp32)
    dloss/dv_ft = 2 (v_ft - T) / (B*D)                   (written in the forward pass, v_ft's dtype)

Shapes: v_ft, v_base, reward_grad, value_out [B, ...] (any layout; same shape); t fp32 [B] or [].
Gradient flows to v_ft only (the target is stop-gradient). Saved for backward: the gradient.
Traffic: 4R + 1W = 5D elements (4R without the gradient).
"""

from __future__ import annotations

import torch

from flowkern.ops import _validate as V
from flowkern.ops._loss_autograd import register_saved_grad_autograd
from flowkern.ops.backend import HAS_TRITON, ext_function, implementations, select_backend
from flowkern.ops.reference.vggflow_matching_loss import vggflow_matching_loss as reference

OP = "vggflow_matching_loss"


def bytes_moved(v_ft: torch.Tensor, compute_grad: bool = True) -> int:
    """Minimal HBM traffic of one call (math.md section 8)."""
    return v_ft.numel() * v_ft.element_size() * (5 if compute_grad else 4)


# ---------------------------------------------------------------- Triton
if HAS_TRITON:
    import triton
    import triton.language as tl

    from flowkern.ops._triton_layout import acc_dtype, reduction_layout

    @triton.jit
    def _matching_loss_kernel(
        v_ft_ptr, v_base_ptr, ghat_ptr, value_ptr, t_ptr, grad_ptr, partial_ptr,
        d, chunk, n_chunks, beta, grad_scale,
        ETA_MODE: tl.constexpr, COMPUTE_GRAD: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1).to(tl.int64)
        t = tl.load(t_ptr + b).to(ACC)
        if ETA_MODE == 0:
            eta = t * t
        elif ETA_MODE == 1:
            eta = t
        else:
            eta = t * 0 + 1
        coef = beta * eta
        acc = tl.zeros([BLOCK], dtype=ACC)
        start = c * chunk
        for off in range(0, chunk, BLOCK):
            idx = start + off + tl.arange(0, BLOCK)
            mask = idx < d
            ptr = b * d + idx
            # upcast right after every load (the interpreter miscomputes raw bf16)
            x = tl.load(v_ft_ptr + ptr, mask=mask, other=0).to(ACC)
            x -= tl.load(v_base_ptr + ptr, mask=mask, other=0).to(ACC)
            x -= coef * tl.load(ghat_ptr + ptr, mask=mask, other=0).to(ACC)
            x += tl.load(value_ptr + ptr, mask=mask, other=0).to(ACC)
            acc += x * x
            if COMPUTE_GRAD:
                tl.store(grad_ptr + ptr, (x * grad_scale).to(grad_ptr.dtype.element_ty), mask=mask)
        tl.store(partial_ptr + b * n_chunks + c, tl.sum(acc, axis=0))

    def _triton_impl(v_ft, v_base, reward_grad, value_out, t, beta, eta_mode, compute_grad):
        v_ft, v_base, reward_grad, value_out = (x.contiguous() for x in (v_ft, v_base, reward_grad, value_out))
        batch, d = v_ft.shape[0], v_ft.numel() // v_ft.shape[0]
        block, chunk, n_chunks = reduction_layout(d)
        grad = torch.empty_like(v_ft) if compute_grad else v_ft.new_empty(0)
        partial = torch.empty(batch * n_chunks, dtype=V.loss_dtype(v_ft), device=v_ft.device)
        _matching_loss_kernel[(batch, n_chunks)](
            v_ft, v_base, reward_grad, value_out, t, grad if compute_grad else v_ft, partial,
            d, chunk, n_chunks, beta, 2.0 / v_ft.numel(),
            ETA_MODE=eta_mode, COMPUTE_GRAD=compute_grad, BLOCK=block, ACC=acc_dtype(v_ft),
        )  # fmt: skip
        return partial.sum() / v_ft.numel(), grad
else:  # pragma: no cover
    _triton_impl = None


# ---------------------------------------------------------------- C++ / CUDA (flowkern._C)
_ext_fwd = ext_function("vggflow_matching_loss_fwd")


def _ext_impl(v_ft, v_base, reward_grad, value_out, t, beta, eta_mode, compute_grad):
    dtype = V.common_compute_dtype(v_ft, v_base, reward_grad, value_out)
    args = [x.to(dtype).contiguous() for x in (v_ft, v_base, reward_grad, value_out)]
    loss, grad = _ext_fwd(*args, t, beta, eta_mode, compute_grad)
    return loss, grad.to(v_ft.dtype) if compute_grad else grad


IMPLS = implementations(reference, _triton_impl, _ext_impl if _ext_fwd else None)


# ---------------------------------------------------------------- custom op
@torch.library.custom_op("flowkern::vggflow_matching_loss", mutates_args=())
def _op(
    v_ft: torch.Tensor,
    v_base: torch.Tensor,
    reward_grad: torch.Tensor,
    value_out: torch.Tensor,
    t: torch.Tensor,
    beta: float,
    eta_mode: int,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    impl = select_backend(OP, IMPLS, v_ft.device)
    return impl(v_ft, v_base, reward_grad, value_out, t, beta, eta_mode, compute_grad)


@_op.register_fake
def _(v_ft, v_base, reward_grad, value_out, t, beta, eta_mode, compute_grad):
    for other in (v_base, reward_grad, value_out):
        torch._check(other.shape == v_ft.shape)
    torch._check(t.shape == (v_ft.shape[0],))
    loss = v_ft.new_empty((), dtype=V.loss_dtype(v_ft))
    return loss, (torch.empty_like(v_ft, memory_format=torch.contiguous_format) if compute_grad else v_ft.new_empty(0))


register_saved_grad_autograd(_op, OP, num_inputs=8, grad_inputs=(0,))


# ---------------------------------------------------------------- public API
def vggflow_matching_loss(
    v_ft: torch.Tensor,
    v_base: torch.Tensor,
    reward_grad: torch.Tensor,
    value_out: torch.Tensor,
    t: torch.Tensor | float,
    beta: float,
    eta_mode: str = "quad",
) -> torch.Tensor:
    """VGG-Flow matching loss (M16): mean((v_ft - v_base - beta*eta_t*reward_grad + value_out)^2), fp32.

    Args:
        v_ft: fine-tuned (CFG-combined) velocity [B, ...]; the only input that receives a gradient.
        v_base: base velocity, same shape. reward_grad: clipped reward gradient ghat at x_hat1 (M8).
        value_out: value-net output c_phi = beta*nu_phi (velocity units, M14/M15).
        t: paper time per sample ([B] or scalar). beta: 1/lambda > 0.
        eta_mode: 'quad' (t^2, default), 'linear' (t) or 'constant' (1).
    """
    V.check_tensor("v_ft", v_ft)
    V.check_tensor("v_base", v_base, v_ft, "v_ft")
    V.check_tensor("reward_grad", reward_grad, v_ft, "v_ft")
    V.check_tensor("value_out", value_out, v_ft, "v_ft")
    beta = V.check_float("beta", beta, positive=True)
    mode = V.eta_code(eta_mode)
    t = V.per_sample("t", t, v_ft)
    compute_grad = torch.is_grad_enabled() and v_ft.requires_grad
    loss, _ = _op(v_ft, v_base, reward_grad, value_out, t, beta, mode, compute_grad)
    return loss

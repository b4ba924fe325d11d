"""Triton kernel of `vggflow_matching_loss` (M16): one launch, the gradient and the loss (last program's sum)."""

import torch
import triton
import triton.language as tl

from flowkern.ops import _validate as V
from flowkern.ops._reference import ETA_MODES
from flowkern.ops._triton import (
    coef,
    coef_args,
    eta,
    finish_mean,
    launch_device,
    reduction_layout,
    tickets,
    tl_acc,
)


@triton.jit
def _matching_loss_kernel(
    v_ft_ptr, v_base_ptr, ghat_ptr, value_ptr, t_ptr, t_stride, t_value, grad_ptr, partial_ptr, ticket_ptr, loss_ptr,
    d, chunk, n_chunks, beta, grad_scale,
    ETA_MODE: tl.constexpr, COMPUTE_GRAD: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    k = beta * eta(coef(t_ptr, t_stride, t_value, b, ACC), ETA_MODE)
    acc = tl.zeros([BLOCK], dtype=ACC)
    start = c * chunk
    for off in range(0, chunk, BLOCK):
        idx = start + off + tl.arange(0, BLOCK)
        mask = idx < d
        ptr = b * d + idx
        # upcast right after every load (the interpreter miscomputes raw bf16)
        x = tl.load(v_ft_ptr + ptr, mask=mask, other=0).to(ACC)
        x -= tl.load(v_base_ptr + ptr, mask=mask, other=0).to(ACC)
        x -= k * tl.load(ghat_ptr + ptr, mask=mask, other=0).to(ACC)
        x += tl.load(value_ptr + ptr, mask=mask, other=0).to(ACC)
        acc += x * x
        if COMPUTE_GRAD:
            tl.store(grad_ptr + ptr, (x * grad_scale).to(grad_ptr.dtype.element_ty), mask=mask)
    tl.store(partial_ptr + b * n_chunks + c, tl.sum(acc, axis=0))
    finish_mean(partial_ptr, n_chunks, d, ticket_ptr, loss_ptr, ACC)


def vggflow_matching_loss(a):
    """(loss, dloss/dv_ft or empty) from the schema's arguments `a`: the native op's contract."""
    v_ft, v_base, reward_grad, value_out = (x.contiguous() for x in (a.v_ft, a.v_base, a.reward_grad, a.value_out))
    batch, d = v_ft.shape[0], v_ft[0].numel()
    grad = torch.empty_like(v_ft) if a.compute_grad else v_ft.new_empty(0)
    if d == 0 or batch == 0:  # the mean over no elements (no launch)
        return v_ft.new_full((), float("nan"), dtype=V.loss_dtype(v_ft)), grad
    block, chunk, n_chunks = reduction_layout(d)
    loss = v_ft.new_empty((), dtype=V.loss_dtype(v_ft))
    partial = v_ft.new_empty(batch * n_chunks, dtype=loss.dtype)
    with launch_device(v_ft):
        _matching_loss_kernel[(batch, n_chunks)](
            v_ft, v_base, reward_grad, value_out, *coef_args(a.t, a.t_value), grad if a.compute_grad else v_ft,
            partial, tickets(v_ft.device, 1), loss, d, chunk, n_chunks, a.beta, 2.0 / v_ft.numel(),
            ETA_MODE=ETA_MODES[a.eta_mode], COMPUTE_GRAD=a.compute_grad, BLOCK=block, ACC=tl_acc(v_ft),
        )  # fmt: skip
    return loss, grad

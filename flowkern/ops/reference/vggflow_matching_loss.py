"""PyTorch reference of `vggflow_matching_loss` (M16): the one definition every backend is tested against."""

import torch

from flowkern.ops.reference._eta import eta, per_sample_view


def vggflow_matching_loss(
    v_ft: torch.Tensor,
    v_base: torch.Tensor,
    reward_grad: torch.Tensor,
    value_out: torch.Tensor,
    t: torch.Tensor,
    beta: float,
    eta_mode: int,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, dloss/dv_ft). diff = v_ft - T, T = v_base + beta*eta_t*ghat - c_phi; loss = mean(diff^2)."""
    acc = torch.float64 if v_ft.dtype == torch.float64 else torch.float32
    coef = per_sample_view(beta * eta(t.to(acc), eta_mode), v_ft)
    diff = v_ft.to(acc) - v_base.to(acc) - coef * reward_grad.to(acc) + value_out.to(acc)
    loss = diff.square().mean()
    grad = (diff * (2.0 / diff.numel())).to(v_ft.dtype) if compute_grad else v_ft.new_empty(0)
    return loss, grad

"""PyTorch reference of `vggflow_matching_loss` (M16): the `torch` backend and the oracle every backend is tested
against. Plain differentiable PyTorch: autograd gives the gradient (to v_ft only; the target is stop-gradient)."""

import torch

from flowkern.ops._reference import acc_dtype, eta, per_sample


def vggflow_matching_loss(v_ft, v_base, reward_grad, value_out, t, beta, eta_mode="quad") -> torch.Tensor:
    """mean((v_ft - T)^2), T = v_base + beta*eta_t*ghat - c_phi, in fp32 (fp64 for fp64 v_ft)."""
    acc = acc_dtype(v_ft)
    coef = beta * eta(per_sample(t, v_ft, acc), eta_mode)
    diff = v_ft.to(acc) - v_base.detach().to(acc) - coef * reward_grad.detach().to(acc) + value_out.detach().to(acc)
    return diff.square().mean()

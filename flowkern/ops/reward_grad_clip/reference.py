"""PyTorch reference of `reward_grad_clip` (M8): the `torch` backend and the oracle every backend is tested against."""

import torch

from flowkern.ops._reference import acc_dtype

NORM_FLOOR = 1e-12  # max(n_b, 1e-12) of (M8)


def reward_grad_clip(grad: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(ghat, norms). n_b = ||grad_b||, rho_b = min(n_b, tau) / max(n_b, 1e-12), ghat_b = rho_b * grad_b."""
    g = grad.detach().to(acc_dtype(grad))
    norms = g.reshape(g.shape[0], -1).square().sum(dim=1).sqrt()
    rho = norms.clamp(max=tau) / norms.clamp(min=NORM_FLOOR)
    return (g * rho.reshape((-1,) + (1,) * (g.dim() - 1))).to(grad.dtype), norms

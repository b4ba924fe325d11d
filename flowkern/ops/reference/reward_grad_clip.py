"""PyTorch reference of `reward_grad_clip` (M8): the one definition every backend is tested against."""

import torch

from flowkern.ops.reference._eta import per_sample_view

NORM_FLOOR = 1e-12  # max(n_b, 1e-12) of (M8)


def reward_grad_clip(grad: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(ghat, norms). n_b = ||grad_b||, rho_b = min(n_b, tau) / max(n_b, 1e-12), ghat_b = rho_b * grad_b."""
    acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
    g = grad.contiguous().to(acc)
    norms = g.reshape(g.shape[0], -1).square().sum(dim=1).sqrt()
    rho = norms.clamp(max=tau) / norms.clamp(min=NORM_FLOOR)
    return (g * per_sample_view(rho, g)).to(grad.dtype), norms

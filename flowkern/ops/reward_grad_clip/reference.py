"""PyTorch reference of `reward_grad_clip` (M8): the `torch` backend and the oracle every backend is tested against."""

import torch

from flowkern.ops._reference import acc_dtype

NORM_FLOOR = 1e-12  # max(n_b, 1e-12) of (M8)


def reward_grad_clip(grad: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(ghat, norms). n_b = ||grad_b||, rho_b = min(n_b, tau) / max(n_b, 1e-12), ghat_b = rho_b * grad_b."""
    g = grad.detach().to(acc_dtype(grad))
    flat = g.reshape(g.shape[0], -1)
    norms = flat.square().sum(dim=1).sqrt()
    if flat.shape[1] > 0:  # a finite sample whose sum of squares overflows: m ||g / m||, m = max |g| (no overflow)
        m = flat.abs().amax(dim=1)
        scaled = m * (flat / m.clamp(min=NORM_FLOOR).unsqueeze(1)).square().sum(dim=1).sqrt()
        norms = torch.where(norms.isinf() & m.isfinite(), scaled, norms)
    rho = norms.clamp(max=tau) / norms.clamp(min=NORM_FLOOR)
    return (g * rho.reshape((-1,) + (1,) * (g.dim() - 1))).to(grad.dtype), norms

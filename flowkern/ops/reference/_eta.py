"""eta_t of (M15): 'quad' t^2 (code 0), 'linear' t (1), 'constant' 1 (2)."""

import torch


def eta(t: torch.Tensor, eta_mode: int) -> torch.Tensor:
    if eta_mode == 0:
        return t * t
    if eta_mode == 1:
        return t
    return torch.ones_like(t)


def per_sample_view(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] coefficient broadcastable against a [B, ...] tensor."""
    return coef.reshape((-1,) + (1,) * (like.dim() - 1))

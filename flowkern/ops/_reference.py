"""Helpers shared by the ops' PyTorch references (flowkern/ops/<op>/reference.py)."""

from __future__ import annotations

import torch

ETA_MODES = {"quad": 0, "linear": 1, "constant": 2}


def acc_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """Arithmetic dtype (math.md section 8): fp32, fp64 when an input is fp64 (gradcheck)."""
    return torch.float64 if any(x is not None and x.dtype == torch.float64 for x in tensors) else torch.float32


def per_sample(value: torch.Tensor | float, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A per-sample coefficient (float, 0-dim or [B] tensor) broadcastable against the [B, ...] tensor `like`."""
    c = torch.as_tensor(value, dtype=dtype, device=like.device).detach()
    return c.reshape((-1,) + (1,) * (like.dim() - 1))


def eta(t: torch.Tensor, eta_mode: str | int) -> torch.Tensor:
    """eta_t of (M15): 'quad' t^2, 'linear' t, 'constant' 1."""
    mode = ETA_MODES[eta_mode] if isinstance(eta_mode, str) else eta_mode
    if mode == 0:
        return t * t
    if mode == 1:
        return t
    return torch.ones_like(t)

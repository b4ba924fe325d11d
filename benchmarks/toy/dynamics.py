"""The controlled Euler map of the toy's control problem (M2, M24, M37) and its control cost (M26).

Uncontrolled sampling on a whole grid goes through ``flowkern.sampling.sample_euler``. What lives here is what the
q* solver needs and flowkern's sampler does not do: an additive control per step, a differentiable rollout (the
L-BFGS objective backpropagates through it) and partial grids (the uncontrolled prefix before the last K steps).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Reward = Callable[[torch.Tensor], torch.Tensor]


def check_lam(lam: float) -> None:
    if not (isinstance(lam, int | float) and math.isfinite(lam) and lam > 0):
        raise ValueError(f"lam must be a positive finite float, got {lam!r}")


def control_cost(u: torch.Tensor, p: float, cost: str) -> torch.Tensor:
    """c(u) per particle [b] (M24, M26): p = 2: ||u||^2 / 2; 'norm': ||u||^p / p; 'elementwise': sum |u_j|^p / p."""
    if p == 2:
        return 0.5 * (u * u).sum(-1)
    if cost == "norm":
        return torch.linalg.vector_norm(u, dim=-1) ** p / p
    return (u.abs() ** p).sum(-1) / p


def controlled_euler(x: torch.Tensor, base_velocity: Velocity, ts: torch.Tensor, u=None) -> torch.Tensor:
    """x_{i+1} = x_i + h_i (v_base(x_i, t_i) + u_i) over the grid ts (any sub-grid), u [B, len(ts) - 1, d] or None.
    Differentiable in x and u."""
    for i in range(ts.shape[0] - 1):
        h = ts[i + 1] - ts[i]
        x = x + h * (base_velocity(x, ts[i]) + (0 if u is None else u[:, i]))
    return x


def euler_inverse(y: torch.Tensor, base_velocity: Velocity, t: torch.Tensor, h: torch.Tensor, iters: int = 30):
    """x with x + h v_base(x, t) = y, by fixed-point iteration (a contraction where h Lip(v_base) < 1)."""
    x = y - h * base_velocity(y, t)
    for _ in range(iters):
        x = y - h * base_velocity(x, t)
    return x

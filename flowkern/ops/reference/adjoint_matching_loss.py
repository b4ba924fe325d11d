"""PyTorch reference of `adjoint_matching_loss` (M26, M28, M32): the one definition every backend is tested against.

mode codes: 0 'elementwise', 1 'norm', 2 'memoryless'.
"""

import torch

from flowkern.ops.reference._eta import per_sample_view

ELEMENTWISE, NORM, MEMORYLESS = 0, 1, 2
NORM_FLOOR = 1e-12  # floor of ||omega_b|| where the exponent (2-p)/(p-1) is negative (p > 2)


def optimal_control(adjoint: torch.Tensor, lam: float, p: float, mode: int) -> torch.Tensor:
    """u* = -grad c*(a/lam) (M26) in the dtype of `adjoint` (already upcast by the caller)."""
    if mode == ELEMENTWISE:
        if p == 2.0:
            return -adjoint / lam
        return -torch.sign(adjoint) * (adjoint / lam).abs().pow(1.0 / (p - 1.0))
    omega = adjoint / lam
    exponent = (2.0 - p) / (p - 1.0)
    norm = omega.reshape(omega.shape[0], -1).square().sum(dim=1).sqrt()
    if exponent < 0:
        norm = norm.clamp(min=NORM_FLOOR)
    return -omega * per_sample_view(norm.pow(exponent), omega)


def adjoint_matching_loss(
    v_ft: torch.Tensor,
    v_base: torch.Tensor,
    adjoint: torch.Tensor,
    sigma: torch.Tensor | None,
    lam: float,
    p: float,
    mode: int,
    lct: float,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, dloss/dv_ft).

    elementwise / norm (M28, one step): diff = v_ft - v_base - u*, loss = mean(diff^2), grad = 2 diff / D.
    memoryless (M32): d = (2/sigma_b)(v_ft - v_base) + sigma_b * a, s_b = sum d^2,
    loss = (1/B) sum_b min(s_b, lct), grad = 1[s_b < lct] (4/sigma_b) d / B.
    """
    acc = torch.float64 if v_ft.dtype == torch.float64 else torch.float32
    v_ft_a, v_base_a, adjoint_a = (x.contiguous().to(acc) for x in (v_ft, v_base, adjoint))
    if mode == MEMORYLESS:
        batch = v_ft.shape[0]
        s = per_sample_view(sigma.to(acc), v_ft)
        d = (2.0 / s) * (v_ft_a - v_base_a) + s * adjoint_a
        sums = d.reshape(batch, -1).square().sum(dim=1)
        loss = sums.clamp(max=lct).sum() / batch
        if not compute_grad:
            return loss, v_ft.new_empty(0)
        coef = torch.where(sums < lct, 4.0 / (sigma.to(acc) * batch), torch.zeros_like(sums))
        return loss, (per_sample_view(coef, d) * d).to(v_ft.dtype)
    diff = v_ft_a - v_base_a - optimal_control(adjoint_a, lam, p, mode)
    loss = diff.square().mean()
    grad = (diff * (2.0 / diff.numel())).to(v_ft.dtype) if compute_grad else v_ft.new_empty(0)
    return loss, grad

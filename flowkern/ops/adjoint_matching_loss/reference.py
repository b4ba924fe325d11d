"""PyTorch reference of `adjoint_matching_loss` (M26, M28, M32): the `torch` backend and the oracle every backend is
tested against. Plain differentiable PyTorch (gradient to v_ft only; v_base and adjoint are stop-gradient)."""

import torch

from flowkern.ops._reference import acc_dtype, per_sample

ELEMENTWISE, NORM, MEMORYLESS = 0, 1, 2
MODES = {"elementwise": ELEMENTWISE, "norm": NORM, "memoryless": MEMORYLESS}
NORM_FLOOR = 1e-12  # floor of ||omega_b|| where the exponent (2-p)/(p-1) is negative (p > 2)


def optimal_control(adjoint: torch.Tensor, lam: float, p: float, mode: int) -> torch.Tensor:
    """u* = -grad c*(a/lam) (M26) in the dtype of `adjoint` (already upcast by the caller)."""
    if mode == ELEMENTWISE or p == 2.0:
        if p == 2.0:
            return -adjoint / lam
        return -torch.sign(adjoint) * (adjoint / lam).abs().pow(1.0 / (p - 1.0))
    omega = adjoint / lam
    exponent = (2.0 - p) / (p - 1.0)
    norm = omega.reshape(omega.shape[0], -1).square().sum(dim=1).sqrt()
    if exponent < 0:
        norm = norm.clamp(min=NORM_FLOOR)
    return -omega * norm.pow(exponent).reshape((-1,) + (1,) * (omega.dim() - 1))


def adjoint_matching_loss(v_ft, v_base, adjoint, lam, p=2.0, mode="elementwise", sigma=None, lct=None) -> torch.Tensor:
    """elementwise / norm (M28, one step): mean((v_ft - v_base - u*)^2).
    memoryless (M32): d = (2/sigma_b)(v_ft - v_base) + sigma_b a, s_b = sum d^2, loss = (1/B) sum_b min(s_b, lct),
    whose gradient is 1[s_b < lct] (4/sigma_b) d / B."""
    acc = acc_dtype(v_ft)
    v_ft_a, v_base_a, adjoint_a = v_ft.to(acc), v_base.detach().to(acc), adjoint.detach().to(acc)
    code = MODES[mode]
    if code == MEMORYLESS:
        s = per_sample(sigma, v_ft, acc)
        d = (2.0 / s) * (v_ft_a - v_base_a) + s * adjoint_a
        sums = d.reshape(v_ft.shape[0], -1).square().sum(dim=1)
        return torch.where(sums < lct, sums, torch.full_like(sums, lct)).sum() / v_ft.shape[0]
    diff = v_ft_a - v_base_a - optimal_control(adjoint_a, lam, p, code)
    return diff.square().mean()

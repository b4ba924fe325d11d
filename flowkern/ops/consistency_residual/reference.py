"""PyTorch references of `consistency_residual` (M18, M20) and `consistency_residual_exact` (M21): the `torch` backend
and the oracle every backend is tested against. Plain differentiable PyTorch: gradients reach c, c_t, c_x (dG and c
for the exact entry) and nothing else."""

import torch

from flowkern.ops._reference import acc_dtype, eta, per_sample


def signed_time_step(t: torch.Tensor, eps_t: float) -> torch.Tensor:
    """e_b of (M20): +eps_t, or -eps_t where t_b + eps_t > 1 (evaluated in t's dtype, as the kernels do)."""
    step = torch.full_like(t, eps_t)
    return torch.where(t + eps_t <= 1, step, -step)


def boundary_loss(c: torch.Tensor, mask, acc: torch.dtype) -> torch.Tensor:
    """(M17): (1/B) sum_b m_b mean_b(c_b^2)."""
    per_sample_mean = c.to(acc).reshape(c.shape[0], -1).square().mean(1)
    return (torch.as_tensor(mask, dtype=acc, device=c.device).detach() * per_sample_mean).sum() / c.shape[0]


def boundary_grad(grad_bnd: torch.Tensor, c: torch.Tensor, mask: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """grad_bnd * dL_bnd/dc = grad_bnd * 2 m_b c / D (fp32, fp64 for acc=fp64)."""
    coef = grad_bnd.to(acc) * mask.to(acc) * (2.0 / c.numel())
    return coef.reshape((-1,) + (1,) * (c.dim() - 1)) * c.to(acc)


def consistency_residual(c, c_t, c_x, ghat, ghat_t, ghat_x, vb, vb_G, t, beta, eta_mode, eps_t, eps_x, rho_w, rho_G,
                         mask) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(L_cons, L_bnd): R = T1 + T2 + T3 of (M20), L_cons = mean(R^2), L_bnd of (M17)."""
    acc = acc_dtype(c)
    t = per_sample(t, c, acc)
    step = signed_time_step(t, eps_t)
    sg = lambda x: x.detach().to(acc)
    g = c.to(acc) - beta * eta(t, eta_mode) * sg(ghat)
    g_t = c_t.to(acc) - beta * eta(t + step, eta_mode) * sg(ghat_t)
    g_x = c_x.to(acc) - beta * eta(t, eta_mode) * sg(ghat_x)
    r = (
        (g_t - g) / step
        + per_sample(rho_w, c, acc) / eps_x * (g_x - g)
        + per_sample(rho_G, c, acc) / eps_x * (sg(vb_G) - sg(vb))
    )
    return r.square().mean(), boundary_loss(c, mask, acc)


def consistency_residual_exact(dG, t3, c, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_cons, L_bnd): R = dG + T3 of (M21) (T3 detached), L_cons = mean(R^2), L_bnd of (M17)."""
    acc = acc_dtype(dG)
    r = dG.to(acc) + t3.detach().to(acc)
    return r.square().mean(), boundary_loss(c, mask, acc)

"""PyTorch references of `consistency_residual` (M18, M20) and `consistency_residual_exact` (M21).

The one definition every backend is tested against, including the saved-gradient contract:
the forward returns q = 2R/D (fp32, fp64 for fp64 c), from which the backward forms every gradient.
"""

import torch

from flowkern.ops.reference._eta import eta, per_sample_view


def signed_time_step(t: torch.Tensor, eps_t: float) -> torch.Tensor:
    """e_b of (M20): +eps_t, or -eps_t where t_b + eps_t > 1 (evaluated in t's dtype, as the kernels do)."""
    step = torch.full_like(t, eps_t)
    return torch.where(t + eps_t <= 1, step, -step)


def boundary_loss(c: torch.Tensor, mask: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """(M17): (1/B) sum_b m_b mean_b(c_b^2)."""
    per_sample = c.to(acc).reshape(c.shape[0], -1).square().mean(1)
    return (mask.to(acc) * per_sample).sum() / c.shape[0]


def boundary_grad(grad_bnd: torch.Tensor, c: torch.Tensor, mask: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """grad_bnd * dL_bnd/dc = grad_bnd * 2 m_b c / D (fp32, fp64 for acc=fp64)."""
    coef = grad_bnd.to(acc) * mask.to(acc) * (2.0 / c.numel())
    return per_sample_view(coef, c) * c.to(acc)


def consistency_residual(
    c: torch.Tensor,
    c_t: torch.Tensor,
    c_x: torch.Tensor,
    ghat: torch.Tensor,
    ghat_t: torch.Tensor,
    ghat_x: torch.Tensor,
    vb: torch.Tensor,
    vb_G: torch.Tensor,
    t: torch.Tensor,
    beta: float,
    eta_mode: int,
    eps_t: float,
    eps_x: float,
    rho_w: torch.Tensor,
    rho_G: torch.Tensor,
    mask: torch.Tensor,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L_cons, L_bnd, q): R = T1 + T2 + T3 of (M20), L_cons = mean(R^2), q = 2R/D (empty without grad)."""
    acc = torch.float64 if c.dtype == torch.float64 else torch.float32
    t = t.to(acc)
    step = signed_time_step(t, eps_t)
    view = lambda coef: per_sample_view(coef, c)
    g = c.to(acc) - view(beta * eta(t, eta_mode)) * ghat.to(acc)
    g_t = c_t.to(acc) - view(beta * eta(t + step, eta_mode)) * ghat_t.to(acc)
    g_x = c_x.to(acc) - view(beta * eta(t, eta_mode)) * ghat_x.to(acc)
    r = (
        (g_t - g) / view(step)
        + view(rho_w.to(acc) / eps_x) * (g_x - g)
        + view(rho_G.to(acc) / eps_x) * (vb_G.to(acc) - vb.to(acc))
    )
    l_cons = r.square().mean()
    l_bnd = boundary_loss(c, mask, acc)
    # contiguous like every kernel's output, whatever the inputs' layout
    q = (r * (2.0 / r.numel())).contiguous() if compute_grad else c.new_empty(0, dtype=acc)
    return l_cons, l_bnd, q


def consistency_residual_backward(
    grad_cons: torch.Tensor,
    grad_bnd: torch.Tensor,
    q: torch.Tensor,
    c: torch.Tensor,
    t: torch.Tensor,
    rho_w: torch.Tensor,
    mask: torch.Tensor,
    eps_t: float,
    eps_x: float,
    dtype_c: torch.dtype | None,
    dtype_c_t: torch.dtype | None,
    dtype_c_x: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of grad_cons*L_cons + grad_bnd*L_bnd wrt (c, c_t, c_x); an output is empty when its dtype is None.

    dR/dc_t = 1/e_b, dR/dc_x = rho_w/eps_x, dR/dc = -(1/e_b + rho_w/eps_x); dL_bnd/dc = 2 m_b c / D.
    """
    acc = q.dtype
    t = t.to(acc)
    inv_step = 1.0 / signed_time_step(t, eps_t)
    k_w = rho_w.to(acc) / eps_x
    g = grad_cons.to(acc)
    view = lambda coef: per_sample_view(coef, q)
    grad_c_t = (q * view(g * inv_step)).to(dtype_c_t) if dtype_c_t is not None else q.new_empty(0)
    grad_c_x = (q * view(g * k_w)).to(dtype_c_x) if dtype_c_x is not None else q.new_empty(0)
    grad_c = q.new_empty(0)
    if dtype_c is not None:
        grad_c = (q * view(-g * (inv_step + k_w)) + boundary_grad(grad_bnd, c, mask, acc)).to(dtype_c)
    return grad_c, grad_c_t, grad_c_x


def consistency_residual_exact(
    dG: torch.Tensor, t3: torch.Tensor, c: torch.Tensor, mask: torch.Tensor, compute_grad: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L_cons, L_bnd, dL_cons/ddG): R = dG + T3 of (M21), dG = d_tG + J_G w; gradient 2R/D in dG's dtype."""
    acc = torch.float64 if dG.dtype == torch.float64 else torch.float32
    r = dG.to(acc) + t3.to(acc)
    l_cons = r.square().mean()
    l_bnd = boundary_loss(c, mask, acc)
    grad = (r * (2.0 / r.numel())).to(dG.dtype).contiguous() if compute_grad else dG.new_empty(0)
    return l_cons, l_bnd, grad

"""PyTorch reference of `consistency_probes` (M20): the one definition every backend is tested against."""

import torch

from flowkern.ops.reference._eta import eta, per_sample_view

RMS_FLOOR = 1e-12  # rms_b floor of (M20)


def consistency_probes(
    x: torch.Tensor,
    v_base: torch.Tensor,
    value_out: torch.Tensor,
    reward_grad: torch.Tensor,
    t: torch.Tensor,
    beta: float,
    eta_mode: int,
    eps_x: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_w, x_G, rho_w, rho_G). G = c_phi - beta*eta_t*ghat (M15), w = v_base - G, rho = rms_b (M20)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    g = value_out.to(acc) - per_sample_view(beta * eta(t.to(acc), eta_mode), x) * reward_grad.to(acc)
    w = v_base.to(acc) - g
    d_b = x[0].numel()
    rho_w = (w.reshape(x.shape[0], -1).square().sum(1) / d_b).sqrt().clamp_min(RMS_FLOOR)
    rho_g = (g.reshape(x.shape[0], -1).square().sum(1) / d_b).sqrt().clamp_min(RMS_FLOOR)
    x_acc = x.to(acc)
    x_w = (x_acc + per_sample_view(eps_x / rho_w, x) * w).contiguous()  # contiguous like the kernels' outputs
    x_g = (x_acc + per_sample_view(eps_x / rho_g, x) * g).contiguous()
    return x_w, x_g, rho_w, rho_g

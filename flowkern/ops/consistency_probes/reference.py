"""PyTorch reference of `consistency_probes` (M20): the `torch` backend and the oracle every backend is tested
against. Not differentiable: every input is stop-gradient in (M20)."""

import torch

from flowkern.ops._reference import acc_dtype, eta, per_sample

RMS_FLOOR = 1e-12  # rms_b floor of (M20)


@torch.no_grad()
def consistency_probes(x, v_base, value_out, reward_grad, t, beta, eta_mode="quad", eps_x=1e-3):
    """(x_w, x_G, rho_w, rho_G). G = c_phi - beta*eta_t*ghat (M15), w = v_base - G, rho = rms_b (M20)."""
    acc = acc_dtype(x)
    g = value_out.to(acc) - beta * eta(per_sample(t, x, acc), eta_mode) * reward_grad.to(acc)
    w = v_base.to(acc) - g
    d_b = x[0].numel()
    rho_w = (w.reshape(x.shape[0], -1).square().sum(1) / d_b).sqrt().clamp_min(RMS_FLOOR)
    rho_g = (g.reshape(x.shape[0], -1).square().sum(1) / d_b).sqrt().clamp_min(RMS_FLOOR)
    view = lambda c: c.reshape((-1,) + (1,) * (x.dim() - 1))
    x_acc = x.to(acc)
    x_w = (x_acc + view(eps_x / rho_w) * w).contiguous()  # contiguous like the kernels' outputs
    x_g = (x_acc + view(eps_x / rho_g) * g).contiguous()
    return x_w, x_g, rho_w, rho_g

"""PyTorch reference of `adjoint_step` (M23, M25, M31): forward and backward, the definition every backend is tested
against. mode 0 = 'ode', 1 = 'memoryless'. Arithmetic in fp32 (fp64 when any input is fp64)."""

from __future__ import annotations

import torch

from flowkern.ops.reference._eta import per_sample_view

MODE_ODE, MODE_MEMORYLESS = 0, 1


def _acc(*tensors: torch.Tensor | None) -> torch.dtype:
    return torch.float64 if any(x is not None and x.dtype == torch.float64 for x in tensors) else torch.float32


def adjoint_step(
    a: torch.Tensor,
    vjp_u: torch.Tensor,
    vjp_c: torch.Tensor | None,
    h: torch.Tensor,
    w: torch.Tensor | None,
    kappa: torch.Tensor | None,
    mode: int,
    return_cot: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(a_new, cot): a_new = a + h*J ('ode', M25) | a + h*(2J - kappa*a) ('memoryless', M31), fp32 (fp64);
    J = (1-w)*vjp_u + w*vjp_c (vjp_u alone without vjp_c); cot = [a_new; a_new] (CFG) | a_new, in vjp_u's dtype."""
    acc = _acc(a, vjp_u, vjp_c)
    view = lambda c: per_sample_view(c.to(acc), a)
    aa = a.to(acc)
    jta = vjp_u.to(acc) if vjp_c is None else view(1 - w.to(acc)) * vjp_u.to(acc) + view(w) * vjp_c.to(acc)
    if mode == MODE_ODE:
        a_new = aa + view(h) * jta
    else:
        a_new = aa + view(h) * (2 * jta - view(kappa) * aa)
    a_new = a_new.to(torch.float64 if a.dtype == torch.float64 else torch.float32).contiguous()
    if not return_cot:
        cot = vjp_u.new_empty(0)
    elif vjp_c is None:
        cot = a_new.to(vjp_u.dtype, copy=True)
    else:
        cot = torch.cat([a_new, a_new]).to(vjp_u.dtype)
    return a_new, cot


def adjoint_step_backward(
    grad_a_new: torch.Tensor | None,
    grad_cot: torch.Tensor | None,
    h: torch.Tensor,
    w: torch.Tensor | None,
    kappa: torch.Tensor | None,
    mode: int,
    cfg: bool,
    need_a: bool,
    need_u: bool,
    need_c: bool,
    a_dtype: torch.dtype,
    u_dtype: torch.dtype,
    c_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d a, d vjp_u, d vjp_c); an output not asked for is an empty tensor.

    G = g_a + g_cot[:B] + g_cot[B:] (g_cot alone without CFG); d a = G ('ode') | (1 - h*kappa)*G;
    d vjp_u = c*(1-w)*G, d vjp_c = c*w*G (d vjp_u = c*G without CFG), c = h | 2h.
    """
    acc = _acc(grad_a_new, grad_cot, h)
    parts = []
    if grad_a_new is not None:
        parts.append(grad_a_new.to(acc))
    if grad_cot is not None:
        batch = h.shape[0]
        parts += [grad_cot[:batch].to(acc), grad_cot[batch:].to(acc)] if cfg else [grad_cot.to(acc)]
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    view = lambda c: per_sample_view(c.to(acc), total)
    memoryless = mode == MODE_MEMORYLESS
    empty = lambda dtype: total.new_empty(0, dtype=dtype)
    d_a, d_u, d_c = empty(a_dtype), empty(u_dtype), empty(c_dtype)
    step = 2 * h.to(acc) if memoryless else h.to(acc)
    if need_a:
        d_a = (view(1 - h.to(acc) * kappa.to(acc)) * total if memoryless else total).to(a_dtype, copy=True)
    if need_u:
        d_u = (view(step * (1 - w.to(acc)) if cfg else step) * total).to(u_dtype).contiguous()
    if need_c:
        d_c = (view(step * w.to(acc)) * total).to(c_dtype).contiguous()
    return d_a.contiguous(), d_u, d_c

"""PyTorch reference of `cfg_euler` (M5, M2, M6, M30): forward and backward, the definition every backend is tested
against. mode 0 = 'ode', 1 = 'memoryless'. Arithmetic in fp32 (fp64 when any input is fp64)."""

from __future__ import annotations

import torch

from flowkern.ops.reference._eta import per_sample_view

MODE_ODE, MODE_MEMORYLESS = 0, 1


def _acc(*tensors: torch.Tensor | None) -> torch.dtype:
    return torch.float64 if any(x is not None and x.dtype == torch.float64 for x in tensors) else torch.float32


def cfg_euler(
    v_uncond: torch.Tensor | None,
    v_cond: torch.Tensor,
    x: torch.Tensor,
    w: torch.Tensor,
    h: torch.Tensor,
    t: torch.Tensor,
    kappa: torch.Tensor | None,
    sigma: torch.Tensor | None,
    noise: torch.Tensor | None,
    mode: int,
    stopgrad_xhat: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(v, x_next, x_hat1); stopgrad_xhat only affects the backward."""
    acc = _acc(v_uncond, v_cond, x, noise)
    view = lambda c: per_sample_view(c.to(acc), x)
    xa = x.to(acc)
    if v_uncond is None:
        v = v_cond.to(acc, copy=True)  # copy: a custom op's output may not alias its input
    else:
        vu = v_uncond.to(acc)
        v = vu + view(w) * (v_cond.to(acc) - vu)  # (M5)
    if mode == MODE_ODE:
        x_next = xa + view(h) * v  # (M2)
    else:  # (M30)
        x_next = xa + view(h) * (2 * v - view(kappa) * xa) + view(h.to(acc).sqrt() * sigma.to(acc)) * noise.to(acc)
    x_hat1 = xa + view(1 - t.to(acc)) * v  # (M6)
    return (
        v.to(v_cond.dtype).contiguous(),
        x_next.to(x.dtype).contiguous(),
        x_hat1.to(x.dtype).contiguous(),
    )


def cfg_euler_backward(
    grad_v: torch.Tensor | None,
    grad_next: torch.Tensor | None,
    grad_hat: torch.Tensor | None,
    w: torch.Tensor,
    h: torch.Tensor,
    t: torch.Tensor,
    kappa: torch.Tensor | None,
    mode: int,
    stopgrad_xhat: bool,
    need_uncond: bool,
    need_cond: bool,
    need_x: bool,
    uncond_dtype: torch.dtype,
    cond_dtype: torch.dtype,
    x_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d v_uncond, d v_cond, d x); an output not asked for is an empty tensor.

    gbar = g_v + c_n*g_n + (1-t)*g_h*[not stopgrad_xhat], c_n = h ('ode') | 2h ('memoryless');
    d v_cond = w*gbar, d v_uncond = (1-w)*gbar, d x = a_n*g_n + g_h, a_n = 1 | 1 - h*kappa.
    """
    like = next(g for g in (grad_v, grad_next, grad_hat) if g is not None)
    acc = _acc(grad_v, grad_next, grad_hat, w)
    view = lambda c: per_sample_view(c.to(acc), like)
    memoryless = mode == MODE_MEMORYLESS
    empty = lambda dtype: like.new_empty(0, dtype=dtype)
    d_uncond, d_cond, d_x = empty(uncond_dtype), empty(cond_dtype), empty(x_dtype)
    if need_uncond or need_cond:
        gbar = torch.zeros(like.shape, dtype=acc, device=like.device)
        if grad_v is not None:
            gbar = gbar + grad_v.to(acc)
        if grad_next is not None:
            gbar = gbar + view(2 * h if memoryless else h) * grad_next.to(acc)
        if grad_hat is not None and not stopgrad_xhat:
            gbar = gbar + view(1 - t.to(acc)) * grad_hat.to(acc)
        if need_cond:
            d_cond = (view(w) * gbar).to(cond_dtype).contiguous()
        if need_uncond:
            d_uncond = (view(1 - w.to(acc)) * gbar).to(uncond_dtype).contiguous()
    if need_x:
        gx = torch.zeros(like.shape, dtype=acc, device=like.device)
        if grad_next is not None:
            gn = grad_next.to(acc)
            gx = gx + (view(1 - h.to(acc) * kappa.to(acc)) * gn if memoryless else gn)
        if grad_hat is not None:
            gx = gx + grad_hat.to(acc)
        d_x = gx.to(x_dtype).contiguous()
    return d_uncond, d_cond, d_x

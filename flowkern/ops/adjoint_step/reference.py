"""PyTorch reference of `adjoint_step` (M23, M25, M31): the `torch` backend and the oracle every backend is tested
against. Plain differentiable PyTorch (linear in a, vjp_u, vjp_c). Arithmetic in fp32 (fp64 when an input is fp64)."""

from __future__ import annotations

import torch

from flowkern.ops._reference import acc_dtype, per_sample

MODES = {"ode": 0, "memoryless": 1}


def adjoint_step(a, vjp_u, h, vjp_c=None, w=None, kappa=None, mode="ode", return_cot=False):
    """(a_new, cot): a_new = a + h J ('ode', M25) | a + h (2J - kappa a) ('memoryless', M31), fp32 (fp64);
    J = (1-w) vjp_u + w vjp_c (vjp_u alone without vjp_c); cot = [a_new; a_new] (CFG) | a_new, in vjp_u's dtype."""
    acc = acc_dtype(a, vjp_u, vjp_c)
    c = lambda value: per_sample(value, a, acc)
    aa = a.to(acc)
    jta = vjp_u.to(acc) if vjp_c is None else (1 - c(w)) * vjp_u.to(acc) + c(w) * vjp_c.to(acc)
    a_new = aa + c(h) * jta if mode == "ode" else aa + c(h) * (2 * jta - c(kappa) * aa)
    a_new = a_new.to(torch.float64 if a.dtype == torch.float64 else torch.float32).contiguous()
    if not return_cot:
        cot = vjp_u.new_empty(0)
    elif vjp_c is None:
        cot = a_new.to(vjp_u.dtype, copy=True)
    else:
        cot = torch.cat([a_new, a_new]).to(vjp_u.dtype)
    return a_new, cot

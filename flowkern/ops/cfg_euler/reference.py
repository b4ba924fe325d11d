"""PyTorch reference of `cfg_euler` (M5, M2, M6, M30): the `torch` backend and the oracle every backend is tested
against. Plain differentiable PyTorch: autograd gives every gradient. Arithmetic in fp32 (fp64 when an input is
fp64); v in v_cond's dtype, x_next and x_hat1 in x's."""

from __future__ import annotations

from flowkern.ops._reference import acc_dtype, per_sample

MODES = {"ode": 0, "memoryless": 1}


def cfg_euler(v_uncond, v_cond, x, w, h, t, stopgrad_xhat=True, mode="ode", kappa=None, sigma=None, noise=None):
    """(v, x_next, x_hat1). v = v_u + w(v_c - v_u) (M5); x_next = x + h v (M2) or
    x + h(2v - kappa x) + sqrt(h) sigma noise (M30); x_hat1 = x + (1 - t) sg(v) (M6, sg if stopgrad_xhat)."""
    acc = acc_dtype(v_uncond, v_cond, x, noise)
    c = lambda value: per_sample(value, x, acc)
    xa = x.to(acc)
    if v_uncond is None:
        v = v_cond.to(acc)
    else:
        vu = v_uncond.to(acc)
        v = vu + c(w) * (v_cond.to(acc) - vu)
    if mode == "ode":
        x_next = xa + c(h) * v
    else:
        x_next = xa + c(h) * (2 * v - c(kappa) * xa) + c(h).sqrt() * c(sigma) * noise.detach().to(acc)
    x_hat1 = xa + (1 - c(t)) * (v.detach() if stopgrad_xhat else v)
    # fresh tensors (a copy where v would alias v_cond), contiguous like every kernel's output
    return (
        v.to(v_cond.dtype, copy=True).contiguous(),
        x_next.to(x.dtype).contiguous(),
        x_hat1.to(x.dtype).contiguous(),
    )

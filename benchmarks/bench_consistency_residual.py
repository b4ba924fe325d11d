"""consistency_residual (M17, M18, M20) and consistency_residual_exact (M21): flowkern backends vs eager PyTorch
vs torch.compile.

Eager is what a user writes: G, G_t, G_x, R = T1 + T2 + T3 in fp32, L_cons = mean(R^2), L_bnd from c on terminal
samples, autograd backward of L_cons + alpha*L_bnd; exact: R = dG + T3.
Run: pytest benchmarks/bench_consistency_residual.py --benchmark-json benchmarks/results/<device>/<date>-<sha>.json
"""

import pytest
import torch

import flowkern
from benchmarks.common import DTYPES, MODES, PROVIDERS, device, provider_fn, run_benchmark, shape_cases
from flowkern.ops import consistency_residual as _public  # noqa: F401  (import registers the op)
from flowkern.ops.consistency_residual import EXACT_IMPLS, IMPLS, bytes_moved

BETA, ALPHA, EPS_T, EPS_X = 5e4, 1e4, 1e-3, 1e-3
VALUE_OUTPUTS = ("c", "c_t", "c_x")


def _view(coef, like):
    return coef.view(-1, *([1] * (like.dim() - 1)))


def boundary(c, mask):
    return (mask * c.float().flatten(1).square().mean(1)).mean()


def eager(c, c_t, c_x, ghat, ghat_t, ghat_x, vb, vb_G, t, rho_w, rho_G, mask):
    step = torch.where(t + EPS_T <= 1, EPS_T, -EPS_T)
    big_g = c.float() - _view(BETA * t**2, c) * ghat.float()
    big_g_t = c_t.float() - _view(BETA * (t + step) ** 2, c) * ghat_t.float()
    big_g_x = c_x.float() - _view(BETA * t**2, c) * ghat_x.float()
    r = (
        (big_g_t - big_g) / _view(step, c)
        + _view(rho_w / EPS_X, c) * (big_g_x - big_g)
        + _view(rho_G / EPS_X, c) * (vb_G.float() - vb.float())
    )
    return r.square().mean(), boundary(c, mask)


def fused(c, c_t, c_x, ghat, ghat_t, ghat_x, vb, vb_G, t, rho_w, rho_G, mask):
    return flowkern.consistency_residual(
        c, c_t, c_x, ghat, ghat_t, ghat_x, vb, vb_G, t, BETA, "quad", EPS_T, EPS_X, rho_w, rho_G, mask
    )


def eager_exact(dG, t3, c, mask):
    return (dG.float() + t3.float()).square().mean(), boundary(c, mask)


def fused_exact(dG, t3, c, mask):
    return flowkern.consistency_residual_exact(dG, t3, c, mask)


def pytest_generate_tests(metafunc):
    metafunc.parametrize("case", shape_cases(metafunc.config), ids=lambda c: c[0])


def _terminal_mask(batch, dev):
    # VGG-Flow: one terminal transition per trajectory among n_bin + 1 = 6 (M22)
    return (torch.arange(batch, device=dev) % 6 == 0).float()


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def bench_consistency_residual(benchmark, provider, mode, dtype, case):
    name, shape = case
    dev, dt = device(), DTYPES[dtype]
    gen = torch.Generator(dev).manual_seed(0)
    x = {k: torch.randn(shape, generator=gen, device=dev) for k in ("c", "ghat", "vb")}
    for near, centre in (("c_t", "c"), ("c_x", "c"), ("ghat_t", "ghat"), ("ghat_x", "ghat"), ("vb_G", "vb")):
        x[near] = x[centre] + 1e-3 * torch.randn(shape, generator=gen, device=dev)  # probes within O(eps)
    for k in ("ghat", "ghat_t", "ghat_x"):
        x[k] = x[k] * 1e-5  # ghat is O(1/beta) next to velocities (M14)
    x = {k: v.to(dt).requires_grad_(mode == "fwd_bwd" and k in VALUE_OUTPUTS) for k, v in x.items()}
    t = torch.rand(shape[0], generator=gen, device=dev)
    rho_w, rho_G = (torch.rand(shape[0], generator=gen, device=dev) + 0.5 for _ in range(2))
    mask = _terminal_mask(shape[0], dev)
    args = [x[k] for k in ("c", "c_t", "c_x", "ghat", "ghat_t", "ghat_x", "vb", "vb_G")] + [t, rho_w, rho_G, mask]
    fn = provider_fn(provider, IMPLS, eager, fused)

    def step():
        l_cons, l_bnd = fn(*args)
        if mode == "fwd_bwd":
            for k in VALUE_OUTPUTS:
                x[k].grad = None
            (l_cons + ALPHA * l_bnd).backward()
        return l_cons

    terminal = mask.mean().item()
    nbytes = bytes_moved(x["c"], mode, terminal_fraction=terminal)
    run_benchmark(
        benchmark, step, nbytes=nbytes,
        op="consistency_residual", provider=provider, mode=mode, shape=list(shape), shape_name=name, dtype=dtype,
    )  # fmt: skip


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def bench_consistency_residual_exact(benchmark, provider, mode, dtype, case):
    name, shape = case
    dev, dt = device(), DTYPES[dtype]
    gen = torch.Generator(dev).manual_seed(0)
    dG, t3, c = (torch.randn(shape, generator=gen, device=dev).to(dt) for _ in range(3))
    dG.requires_grad_(mode == "fwd_bwd")
    c.requires_grad_(mode == "fwd_bwd")
    mask = _terminal_mask(shape[0], dev)
    fn = provider_fn(provider, EXACT_IMPLS, eager_exact, fused_exact)

    def step():
        l_cons, l_bnd = fn(dG, t3, c, mask)
        if mode == "fwd_bwd":
            dG.grad = c.grad = None
            (l_cons + ALPHA * l_bnd).backward()
        return l_cons

    nbytes = bytes_moved(dG, mode, terminal_fraction=mask.mean().item(), exact=True)
    run_benchmark(
        benchmark, step, nbytes=nbytes,
        op="consistency_residual_exact", provider=provider, mode=mode, shape=list(shape), shape_name=name, dtype=dtype,
    )  # fmt: skip

"""adjoint_matching_loss (M26, M28, M32): flowkern backends vs eager PyTorch vs torch.compile.

Eager is what a user writes: u* from (M26) and mean((v_ft - v_base - u*)^2) ('elementwise', p=2; 'norm', p=1.5),
or the clamped memoryless loss (M32), in fp32 with autograd backward.
Run: pytest benchmarks/bench_adjoint_matching_loss.py --benchmark-json benchmarks/results/<device>/<date>-<sha>.json
"""

import pytest
import torch

import flowkern
from benchmarks.common import DTYPES, MODES, PROVIDERS, device, provider_fn, run_benchmark, shape_cases
from flowkern.ops import adjoint_matching_loss as _public  # noqa: F401  (import registers the op)
from flowkern.ops.adjoint_matching_loss import IMPLS, bytes_moved

LAM = 2e-5  # lambda = 1/beta (M28 defaults: beta of section 3)
P = {"elementwise": 2.0, "norm": 1.5, "memoryless": 2.0}


def make_eager(am_mode, lct):
    p = P[am_mode]

    def eager(v_ft, v_base, adjoint, sigma):
        view = (-1, *([1] * (v_ft.dim() - 1)))
        if am_mode == "memoryless":
            s = sigma.view(view)
            d = (2 / s) * (v_ft.float() - v_base.float()) + s * adjoint.float()
            return d.flatten(1).square().sum(1).clamp(max=lct).mean()
        omega = adjoint.float() / LAM
        if am_mode == "elementwise":
            u = -omega
        else:
            u = -omega * omega.flatten(1).norm(dim=1).pow((2 - p) / (p - 1)).view(view)
        return (v_ft.float() - v_base.float() - u).square().mean()

    return eager


def make_fused(am_mode, lct):
    def fused(v_ft, v_base, adjoint, sigma):
        if am_mode == "memoryless":
            return flowkern.adjoint_matching_loss(v_ft, v_base, adjoint, LAM, mode=am_mode, sigma=sigma, lct=lct)
        return flowkern.adjoint_matching_loss(v_ft, v_base, adjoint, LAM, P[am_mode], am_mode)

    return fused


def pytest_generate_tests(metafunc):
    metafunc.parametrize("case", shape_cases(metafunc.config), ids=lambda c: c[0])


@pytest.mark.parametrize("am_mode", ["elementwise", "norm", "memoryless"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def bench_adjoint_matching_loss(benchmark, provider, mode, dtype, am_mode, case):
    name, shape = case
    dev, dt = device(), DTYPES[dtype]
    gen = torch.Generator(dev).manual_seed(0)
    v_ft, v_base, adjoint = (torch.randn(shape, generator=gen, device=dev).to(dt) for _ in range(3))
    adjoint = adjoint * LAM  # u* = -adjoint/lam is O(velocity)
    sigma = 0.5 + torch.rand(shape[0], generator=gen, device=dev)
    lct = 8.0 * v_ft[0].numel()  # about half of the samples clamped (E[d^2] ~ 8/sigma^2)
    fn = provider_fn(provider, IMPLS, make_eager(am_mode, lct), make_fused(am_mode, lct))
    v_ft.requires_grad_(mode == "fwd_bwd")

    def step():
        loss = fn(v_ft, v_base, adjoint, sigma)
        if mode == "fwd_bwd":
            v_ft.grad = None
            loss.backward()
        return loss

    run_benchmark(
        benchmark, step, nbytes=bytes_moved(v_ft, am_mode, mode == "fwd_bwd"),
        op="adjoint_matching_loss", provider=provider, mode=mode, am_mode=am_mode, shape=list(shape),
        shape_name=name, dtype=dtype,
    )  # fmt: skip

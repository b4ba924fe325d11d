"""consistency_probes (M20): flowkern backends vs eager PyTorch vs torch.compile.

Eager is what a user writes: G = c - beta*eta_t*ghat, w = v_base - G, per-sample fp32 rms (floored), x_w, x_G in fp32.
Forward only: the probes are stop-gradient inputs of the next network calls.
Run: pytest benchmarks/bench_consistency_probes.py --benchmark-json benchmarks/results/<device>/<date>-<sha>.json
"""

import pytest
import torch

import flowkern
from benchmarks.common import DTYPES, PROVIDERS, device, provider_fn, run_benchmark, shape_cases
from flowkern.ops import consistency_probes as _public  # noqa: F401  (import registers the op)
from flowkern.ops.consistency_probes import IMPLS, bytes_moved

BETA, EPS_X = 5e4, 1e-3


def eager(x, v_base, value_out, reward_grad, t):
    view = lambda coef: coef.view(-1, *([1] * (x.dim() - 1)))
    big_g = value_out.float() - view(BETA * t**2) * reward_grad.float()
    w = v_base.float() - big_g
    d_b = x[0].numel()
    rho_w = (w.flatten(1).norm(dim=1) / d_b**0.5).clamp(min=1e-12)
    rho_g = (big_g.flatten(1).norm(dim=1) / d_b**0.5).clamp(min=1e-12)
    return x.float() + view(EPS_X / rho_w) * w, x.float() + view(EPS_X / rho_g) * big_g, rho_w, rho_g


def fused(x, v_base, value_out, reward_grad, t):
    return flowkern.consistency_probes(x, v_base, value_out, reward_grad, t, BETA, "quad", EPS_X)


def pytest_generate_tests(metafunc):
    metafunc.parametrize("case", shape_cases(metafunc.config), ids=lambda c: c[0])


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("mode", ["fwd"])
@pytest.mark.parametrize("provider", PROVIDERS)
def bench_consistency_probes(benchmark, provider, mode, dtype, case):
    name, shape = case
    dev, dt = device(), DTYPES[dtype]
    gen = torch.Generator(dev).manual_seed(0)
    x, v_base, value_out, ghat = (torch.randn(shape, generator=gen, device=dev).to(dt) for _ in range(4))
    ghat = ghat * 1e-5  # ghat is O(1/beta) next to velocities (M14)
    t = torch.rand(shape[0], generator=gen, device=dev)
    fn = provider_fn(provider, IMPLS, eager, fused)
    run_benchmark(
        benchmark, lambda: fn(x, v_base, value_out, ghat, t), nbytes=bytes_moved(x),
        op="consistency_probes", provider=provider, mode=mode, shape=list(shape), shape_name=name, dtype=dtype,
    )  # fmt: skip

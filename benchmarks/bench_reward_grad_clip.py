"""reward_grad_clip (M8): flowkern backends vs eager PyTorch vs torch.compile.

Eager is what a user writes: per-sample fp32 norms, rho = min(n, tau)/max(n, 1e-12), ghat = rho*grad.
Forward only: the op is not differentiable (the clipped gradient is a stop-gradient input).
Run: pytest benchmarks/bench_reward_grad_clip.py --benchmark-json benchmarks/results/<device>/<date>-<sha>.json
"""

import pytest
import torch

import flowkern
from benchmarks.common import DTYPES, PROVIDERS, device, provider_fn, run_benchmark, shape_cases
from flowkern.ops import reward_grad_clip as _public  # noqa: F401  (import registers the op)
from flowkern.ops.reward_grad_clip import IMPLS, bytes_moved


def eager(grad, tau):
    g = grad.float()
    norms = g.flatten(1).norm(dim=1)
    rho = norms.clamp(max=tau) / norms.clamp(min=1e-12)
    return (g * rho.view(-1, *([1] * (g.dim() - 1)))).to(grad.dtype), norms


def fused(grad, tau):
    return flowkern.reward_grad_clip(grad, tau)


def pytest_generate_tests(metafunc):
    metafunc.parametrize("case", shape_cases(metafunc.config), ids=lambda c: c[0])


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("mode", ["fwd"])
@pytest.mark.parametrize("provider", PROVIDERS)
def bench_reward_grad_clip(benchmark, provider, mode, dtype, case):
    name, shape = case
    dev, dt = device(), DTYPES[dtype]
    gen = torch.Generator(dev).manual_seed(0)
    grad = torch.randn(shape, generator=gen, device=dev).to(dt)
    grad[0] *= 0.1  # one sample below tau, the rest clipped
    tau = 0.5 * grad[0].numel() ** 0.5
    fn = provider_fn(provider, IMPLS, eager, fused)
    run_benchmark(
        benchmark, lambda: fn(grad, tau), nbytes=bytes_moved(grad),
        op="reward_grad_clip", provider=provider, mode=mode, shape=list(shape), shape_name=name, dtype=dtype,
    )  # fmt: skip

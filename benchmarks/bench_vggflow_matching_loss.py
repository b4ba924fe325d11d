"""vggflow_matching_loss (M16): flowkern backends vs eager PyTorch vs torch.compile.

Eager is what a user writes: T = v_base + beta*eta_t*ghat - c; loss = ((v_ft - T)^2).mean() in fp32, autograd backward.
Run: pytest benchmarks/bench_vggflow_matching_loss.py --benchmark-json benchmarks/results/<device>/<date>-<sha>.json
"""

import pytest
import torch

import flowkern
from benchmarks.common import DTYPES, MODES, PROVIDERS, device, provider_fn, run_benchmark, shape_cases
from flowkern.ops import vggflow_matching_loss as _public  # noqa: F401  (import registers the op)
from flowkern.ops.vggflow_matching_loss import IMPLS, bytes_moved

BETA = 5e4


def eager(v_ft, v_base, reward_grad, value_out, t):
    coef = (BETA * t.float() ** 2).view(-1, *([1] * (v_ft.dim() - 1)))
    target = v_base.float() + coef * reward_grad.float() - value_out.float()
    return (v_ft.float() - target).square().mean()


def fused(v_ft, v_base, reward_grad, value_out, t):
    return flowkern.vggflow_matching_loss(v_ft, v_base, reward_grad, value_out, t, BETA, "quad")


def pytest_generate_tests(metafunc):
    metafunc.parametrize("case", shape_cases(metafunc.config), ids=lambda c: c[0])


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def bench_vggflow_matching_loss(benchmark, provider, mode, dtype, case):
    name, shape = case
    dev, dt = device(), DTYPES[dtype]
    gen = torch.Generator(dev).manual_seed(0)
    v_ft, v_base, ghat, value = (torch.randn(shape, generator=gen, device=dev).to(dt) for _ in range(4))
    ghat = ghat * 1e-5  # ghat is O(1/beta) next to velocities (M14)
    t = torch.rand(shape[0], generator=gen, device=dev)
    fn = provider_fn(provider, IMPLS, eager, fused)
    v_ft.requires_grad_(mode == "fwd_bwd")

    def step():
        loss = fn(v_ft, v_base, ghat, value, t)
        if mode == "fwd_bwd":
            v_ft.grad = None
            loss.backward()
        return loss

    run_benchmark(
        benchmark, step, nbytes=bytes_moved(v_ft, mode == "fwd_bwd"),
        op="vggflow_matching_loss", provider=provider, mode=mode, shape=list(shape), shape_name=name, dtype=dtype,
    )  # fmt: skip

"""cfg_euler (M5, M2, M6): flowkern backends vs eager PyTorch vs torch.compile.

Eager is what a user writes: v = v_u + w(v_c - v_u) in fp32, x_next = x + h v, x_hat1 = x + (1-t) sg(v), v cast to
the model dtype; states x fp32, velocities in the benchmark dtype (the sampler's layout).
fwd_bwd is the training case: gradient to v_cond through v only (uncond detached, x_next and x_hat1 unused).
Run: pytest benchmarks/bench_cfg_euler.py --benchmark-json benchmarks/results/<device>/<date>-<sha>.json
"""

import pytest
import torch

import flowkern
from benchmarks.common import DTYPES, MODES, PROVIDERS, device, provider_fn, run_benchmark, shape_cases
from flowkern.ops import cfg_euler as _public  # noqa: F401  (import registers the op)
from flowkern.ops.cfg_euler import IMPLS, bytes_moved

GUIDANCE = 4.5


def eager(v_uncond, v_cond, x, w, h, t):
    col = lambda c: c.view(-1, *([1] * (x.dim() - 1)))
    vu = v_uncond.detach().float()
    v = vu + col(w) * (v_cond.float() - vu)
    x_next = x + col(h) * v
    x_hat1 = x + col(1 - t) * v.detach()
    return v.to(v_cond.dtype), x_next.to(x.dtype), x_hat1.to(x.dtype)


def fused(v_uncond, v_cond, x, w, h, t):
    return flowkern.cfg_euler(v_uncond, v_cond, x, w, h, t)


def pytest_generate_tests(metafunc):
    metafunc.parametrize("case", shape_cases(metafunc.config), ids=lambda c: c[0])


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def bench_cfg_euler(benchmark, provider, mode, dtype, case):
    name, shape = case
    dev, dt = device(), DTYPES[dtype]
    gen = torch.Generator(dev).manual_seed(0)
    v_uncond, v_cond = (torch.randn(shape, generator=gen, device=dev).to(dt) for _ in range(2))
    x = torch.randn(shape, generator=gen, device=dev)
    batch = shape[0]
    w = torch.full((batch,), GUIDANCE, device=dev)
    h, t = torch.full((batch,), 0.05, device=dev), torch.rand(batch, generator=gen, device=dev)
    grad_v = torch.randn(shape, generator=gen, device=dev).to(dt)
    fn = provider_fn(provider, IMPLS, eager, fused)
    v_cond.requires_grad_(mode == "fwd_bwd")

    def step():
        out = fn(v_uncond, v_cond, x, w, h, t)
        if mode == "fwd_bwd":
            v_cond.grad = None
            out[0].backward(grad_v)
        return out

    run_benchmark(
        benchmark, step, nbytes=bytes_moved(v_cond, x, backward=mode == "fwd_bwd"),
        op="cfg_euler", provider=provider, mode=mode, shape=list(shape), shape_name=name, dtype=dtype,
    )  # fmt: skip

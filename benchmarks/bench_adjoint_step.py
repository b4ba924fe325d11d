"""adjoint_step (M25, M23): flowkern backends vs eager PyTorch vs torch.compile.

Eager is what a user writes: JTa = (1-w) vjp_u + w vjp_c in fp32, a_new = a + h JTa (fp32),
cot = cat([a_new, a_new]) in the VJPs' dtype; a is fp32, the VJPs in the benchmark dtype (the lean adjoint's layout).
fwd_bwd differentiates through a_new and cot to a, vjp_u and vjp_c (no method needs it; it checks the backward).
Run: pytest benchmarks/bench_adjoint_step.py --benchmark-json benchmarks/results/<device>/<date>-<sha>.json
"""

import pytest
import torch

import flowkern
from benchmarks.common import DTYPES, MODES, PROVIDERS, device, provider_fn, run_benchmark, shape_cases
from flowkern.ops import adjoint_step as _public  # noqa: F401  (import registers the op)
from flowkern.ops.adjoint_step import IMPLS, bytes_moved

GUIDANCE = 4.5


def eager(a, vjp_u, vjp_c, h, w):
    col = lambda c: c.view(-1, *([1] * (a.dim() - 1)))
    jta = col(1 - w) * vjp_u.float() + col(w) * vjp_c.float()
    a_new = a.float() + col(h) * jta
    return a_new, torch.cat([a_new, a_new]).to(vjp_u.dtype)


def fused(a, vjp_u, vjp_c, h, w):
    return flowkern.adjoint_step(a, vjp_u, h, vjp_c, w, return_cot=True)


def pytest_generate_tests(metafunc):
    metafunc.parametrize("case", shape_cases(metafunc.config), ids=lambda c: c[0])


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def bench_adjoint_step(benchmark, provider, mode, dtype, case):
    name, shape = case
    dev, dt = device(), DTYPES[dtype]
    gen = torch.Generator(dev).manual_seed(0)
    a = torch.randn(shape, generator=gen, device=dev)
    vjp_u, vjp_c = (torch.randn(shape, generator=gen, device=dev).to(dt) for _ in range(2))
    batch = shape[0]
    h, w = torch.full((batch,), 0.05, device=dev), torch.full((batch,), GUIDANCE, device=dev)
    grad_a = torch.randn(shape, generator=gen, device=dev)
    fn = provider_fn(provider, IMPLS, eager, fused)
    for tensor in (a, vjp_u, vjp_c):
        tensor.requires_grad_(mode == "fwd_bwd")

    def step():
        a_new, cot = fn(a, vjp_u, vjp_c, h, w)
        if mode == "fwd_bwd":
            a.grad = vjp_u.grad = vjp_c.grad = None
            a_new.backward(grad_a)
        return a_new, cot

    run_benchmark(
        benchmark, step, nbytes=bytes_moved(a, vjp_u, return_cot=True, backward=mode == "fwd_bwd"),
        op="adjoint_step", provider=provider, mode=mode, shape=list(shape), shape_name=name, dtype=dtype,
    )  # fmt: skip

"""DRaFT-K gradients (M23, M35): time and peak memory vs K for three strategies.

- ``unrolled``: roll out N-K steps without grad, then K Euler steps under autograd, one backward;
- ``checkpoint``: the same with each step's velocity in ``torch.utils.checkpoint`` (non-reentrant);
- ``flowkern``: roll out all N steps with `flowkern.sampling.sample_euler` (states only), then
  `flowkern.truncated_backprop` (recompute one step at a time).

Each call is one full gradient computation from the noise x_0: rollout + terminal gradient
<a_N, x_N> + parameter gradients of the LoRA (rank 4 tiny / 8 SD3-medium), CFG over a [2B] batch.
Models: the tiny SD3 transformer (CPU or GPU) and, on CUDA only, an SD3-medium-shaped transformer
(the real config, random weights, bf16, 512px = [B, 16, 64, 64], 333 text tokens).
Run: pytest benchmarks/bench_adjoint.py --benchmark-json benchmarks/results/<device>/<date>-<sha>.json
Markdown table without pytest: python benchmarks/adjoint_table.py
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from benchmarks.common import device, environment, is_smoke
from flowkern.adjoint import truncated_backprop
from flowkern.profiling import peak_memory
from flowkern.sampling import sample_euler, sd3_shifted_grid
from tests.models_tiny import SD3_MEDIUM, SD3_TINY, SD3Velocity, add_lora, sd3_conditioning, tiny_sd3_transformer

STRATEGIES = ("unrolled", "checkpoint", "flowkern")
KS = (1, 3, 5, 10, 20)
NUM_STEPS = 20
GUIDANCE = 4.5


@dataclass
class Problem:
    name: str
    velocity: SD3Velocity
    params: list[torch.nn.Parameter]
    x0: torch.Tensor
    terminal_grad: torch.Tensor
    ts: torch.Tensor
    device: torch.device

    @property
    def num_steps(self) -> int:
        return self.ts.shape[0] - 1


def make_problem(model: str = "sd3-tiny", dev: torch.device | str = "cpu", num_steps: int = NUM_STEPS,
                 batch: int | None = None, side: int | None = None) -> Problem:  # fmt: skip
    """A DRaFT-K problem: SD3 transformer with LoRA, CFG conditioning, noise x_0 and a fixed a_N.
    Batch: 2 (tiny) or 1 (SD3-medium), doubled by CFG."""
    dev = torch.device(dev)
    if model == "sd3-tiny":
        config, dtype, rank, seq_len = SD3_TINY, torch.float32, 4, 8
        batch = batch or 2
        side = side or config["sample_size"]
        with torch.device(dev):
            transformer = tiny_sd3_transformer(device=dev)
    elif model == "sd3-medium":
        if dev.type != "cuda":
            raise ValueError("the SD3-medium-shaped transformer (~2B parameters) is benchmarked on CUDA only")
        config, dtype, rank, seq_len = SD3_MEDIUM, torch.bfloat16, 8, 333
        batch = batch or 1
        side = side or 64  # 512px / VAE factor 8
        with torch.device(dev):  # build directly on the GPU: random init of 2B parameters on CPU is slow
            transformer = tiny_sd3_transformer(config=SD3_MEDIUM, dtype=dtype, device=dev)
    else:
        raise ValueError(f"model must be 'sd3-tiny' or 'sd3-medium', got {model!r}")
    params = add_lora(transformer, rank=rank)
    for p in params:  # LoRA parameters in fp32 on bf16 models (cast_training_params)
        p.data = p.data.float()
    text, pooled = sd3_conditioning(batch, config, seq_len=seq_len, dtype=dtype, device=dev)
    velocity = SD3Velocity(transformer, text, pooled, guidance_scale=GUIDANCE)
    generator = torch.Generator(dev).manual_seed(0)
    shape = (batch, config["in_channels"], side, side)
    x0 = torch.randn(shape, generator=generator, device=dev, dtype=dtype)
    terminal_grad = torch.randn(shape, generator=generator, device=dev, dtype=torch.float32)
    return Problem(model, velocity, params, x0, terminal_grad, sd3_shifted_grid(num_steps), dev)


def _times(problem: Problem) -> tuple[torch.Tensor, list[float]]:
    t = problem.ts.to(device=problem.device, dtype=torch.float32)
    return t, [float(h) for h in problem.ts[1:] - problem.ts[:-1]]


def _velocity_step(problem: Problem, x: torch.Tensor, t: torch.Tensor, h: float, use_checkpoint: bool) -> torch.Tensor:
    if use_checkpoint:
        v = checkpoint(problem.velocity, x, t, use_reentrant=False)
    else:
        v = problem.velocity(x, t)
    return x + h * v


def run_autograd(problem: Problem, K: int, use_checkpoint: bool = False) -> torch.Tensor:
    """Unrolled autograd through the last K steps (optionally checkpointing each step)."""
    t, h = _times(problem)
    n = problem.num_steps
    x = problem.x0
    with torch.no_grad():
        for i in range(n - K):
            x = x + h[i] * problem.velocity(x, t[i])
    x = x.detach().requires_grad_()
    start = x
    for i in range(n - K, n):
        x = _velocity_step(problem, x, t[i], h[i], use_checkpoint)
    torch.autograd.backward(x, problem.terminal_grad.to(x.dtype))
    return start.grad


def run_flowkern(problem: Problem, K: int) -> torch.Tensor:
    """Rollout storing the states (no graph), then recomputation one step at a time (M23)."""
    trajectory = sample_euler(problem.velocity.pair, problem.x0, problem.ts, guidance_scale=GUIDANCE)
    return truncated_backprop(problem.velocity, trajectory.states, problem.ts, problem.terminal_grad, K)


def strategy_fn(problem: Problem, strategy: str, K: int):
    def run():
        for p in problem.params:
            p.grad = None
        if strategy == "flowkern":
            out = run_flowkern(problem, K)
        else:
            out = run_autograd(problem, K, use_checkpoint=strategy == "checkpoint")
        if problem.device.type == "cuda":
            torch.cuda.synchronize()
        return out

    return run


def cases(config) -> list[tuple[str, int, int | None]]:
    """(model, N, latent side) cases; the smoke run (CI, --benchmark-disable) uses a few cheap steps."""
    if is_smoke(config):
        return [("sd3-tiny", 4, 16)]
    models = [("sd3-tiny", NUM_STEPS, None)]
    if torch.cuda.is_available():
        models.append(("sd3-medium", NUM_STEPS, None))
    return models


_problems: dict[tuple, Problem] = {}


def get_problem(model: str, num_steps: int, side: int | None) -> Problem:
    key = (model, num_steps, side)
    if key not in _problems:
        _problems.clear()  # one model resident at a time (SD3-medium is large)
        _problems[key] = make_problem(model, device(), num_steps=num_steps, side=side)
    return _problems[key]


def pytest_generate_tests(metafunc):
    smoke = is_smoke(metafunc.config)
    metafunc.parametrize("case", cases(metafunc.config), ids=lambda c: f"{c[0]}-N{c[1]}")
    metafunc.parametrize("K", (1, 3) if smoke else KS)


@pytest.mark.parametrize("strategy", STRATEGIES)
def bench_adjoint(benchmark, strategy, K, case):
    model, num_steps, side = case
    if K > num_steps:
        pytest.skip(f"K={K} > N={num_steps}")
    problem = get_problem(model, num_steps, side)
    fn = strategy_fn(problem, strategy, K)
    try:
        fn()  # warm-up (allocator, oneDNN primitives, CUDA kernels)
    except torch.OutOfMemoryError:
        for p in problem.params:
            p.grad = None
        torch.cuda.empty_cache()
        pytest.skip(f"{strategy} K={K} runs out of device memory")
    benchmark.extra_info.update(environment())
    benchmark.extra_info.update(model=model, strategy=strategy, K=K, num_steps=num_steps, shape=list(problem.x0.shape),
                                dtype=str(problem.x0.dtype), guidance_scale=GUIDANCE)  # fmt: skip
    benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=1)
    with contextlib.suppress(AttributeError):  # no stats under --benchmark-disable
        benchmark.extra_info["seconds_median"] = benchmark.stats.stats.median
    benchmark.extra_info["peak_memory_bytes"] = peak_memory(fn, problem.device)

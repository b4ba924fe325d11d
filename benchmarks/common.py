"""Shared benchmark machinery (design.md section 6): providers, shapes, timing, extra_info.

Providers: `torch` (eager PyTorch as a user would write it, autograd for backward),
`torch_compile` (the same function under torch.compile), `flowkern_triton`, `flowkern_cpp`,
`flowkern_cuda` (the flowkern op with that backend forced). Unavailable ones are skipped with a
reason. Under `--benchmark-disable` (CI smoke) shapes shrink so each case runs once, fast.
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from collections.abc import Callable

import pytest
import torch

import flowkern
from flowkern.ops.backend import available_backends, use_backend
from flowkern.profiling import peak_memory

PROVIDERS = ("torch", "torch_compile", "flowkern_triton", "flowkern_cpp", "flowkern_cuda")
MODES = ("fwd", "fwd_bwd")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# math.md section 9: latent shapes per sample
MODEL_SHAPES = {
    "sd3_512": (16, 64, 64),
    "sd3_1024": (16, 128, 128),
    "flux1_1024": (16, 128, 128),
    "flux2_klein_1024": (32, 128, 128),
}
SMOKE_SHAPE = ("smoke", (3, 5, 7, 9))


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def is_smoke(config) -> bool:
    return bool(config.getoption("benchmark_disable", False))


def shape_cases(config, batches=(1, 4, 8), models=tuple(MODEL_SHAPES)) -> list[tuple[str, tuple[int, ...]]]:
    """(name, full shape) cases; CPU runs only SD3 512px unless FLOWKERN_BENCH_ALL_SHAPES=1."""
    if is_smoke(config):
        return [SMOKE_SHAPE]
    if device().type == "cpu" and os.environ.get("FLOWKERN_BENCH_ALL_SHAPES") != "1":
        models = ("sd3_512",)
    return [(f"{m}_B{b}", (b, *MODEL_SHAPES[m])) for m in models for b in batches]


def provider_fn(provider: str, impls, eager: Callable, flowkern_fn: Callable) -> Callable:
    """The callable to time for `provider`, or pytest.skip with the reason it cannot run."""
    dev = device()
    if provider == "torch":
        return eager
    if provider == "torch_compile":
        return torch.compile(eager, dynamic=False)
    backend = provider.removeprefix("flowkern_")
    if backend not in available_backends(impls, dev):
        pytest.skip(f"{provider} unavailable on {dev.type}")
    if backend == "triton" and dev.type == "cpu" and not _smoke_mode[0]:
        pytest.skip("triton on CPU runs in the interpreter: only smoke-tested")

    def run(*args, **kwargs):
        with use_backend(backend):
            return flowkern_fn(*args, **kwargs)

    return run


_smoke_mode = [False]


def set_smoke(config) -> None:
    _smoke_mode[0] = is_smoke(config)


@functools.cache
def copy_bandwidth_gbs() -> float | None:
    """Measured device copy bandwidth (GB/s, read+write) on 1 GiB, once per run (GPU only)."""
    if not torch.cuda.is_available():
        return None
    import triton.testing

    n = (1 << 30) // 4
    x, y = torch.randn(n, device="cuda"), torch.empty(n, device="cuda")
    ms = triton.testing.do_bench(lambda: y.copy_(x), quantiles=None)
    return 2 * n * 4 / (ms * 1e-3) / 1e9


@functools.cache
def environment() -> dict:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        sha = ""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    dev = device()
    name = torch.cuda.get_device_name() if dev.type == "cuda" else platform.processor() or platform.machine()
    return {
        "device": name,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "flowkern": flowkern.__version__,
        "git_sha": sha,
        "threads": torch.get_num_threads(),
    }


def run_benchmark(benchmark, fn: Callable[[], object], *, nbytes: int, **info) -> None:
    """Time `fn` (CUDA events via do_bench on GPU, pytest-benchmark's timer on CPU), record extra_info."""
    dev = device()
    benchmark.extra_info.update(environment())
    benchmark.extra_info.update(info)
    benchmark.extra_info["bytes_moved"] = nbytes
    fn()  # warm-up (compilation, allocator)
    if dev.type == "cuda":
        import triton.testing

        p50, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        benchmark.pedantic(fn, rounds=1, iterations=1)
        seconds = p50 * 1e-3
        benchmark.extra_info.update(ms_p50=p50, ms_p20=p20, ms_p80=p80)
        bw = copy_bandwidth_gbs()
        benchmark.extra_info["copy_bandwidth_gbs"] = bw
        benchmark.extra_info["fraction_of_copy_bandwidth"] = nbytes / seconds / 1e9 / bw if bw else None
        benchmark.extra_info["gb_per_s"] = nbytes / seconds / 1e9
    else:
        benchmark(fn)
        stats = getattr(benchmark, "stats", None)
        if stats is not None and getattr(stats, "stats", None) is not None:
            seconds = stats.stats.median
            benchmark.extra_info["gb_per_s"] = nbytes / seconds / 1e9
    benchmark.extra_info["peak_extra_memory_bytes"] = peak_memory(fn, dev)

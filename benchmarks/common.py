"""Shared benchmark machinery (design.md section 6): providers, shapes, the subset a run selects, timing, extra_info.

Providers: `torch` (eager PyTorch as a user would write it, autograd for backward),
`torch_compile` (the same function under torch.compile), `flowkern_triton`, `flowkern_cpp`,
`flowkern_cuda` (the flowkern op with that backend forced). Unavailable ones are skipped with a
reason. Under `--benchmark-disable` (CI smoke) shapes shrink so each case runs once, fast.

Subsets (benchmarks/conftest.py's options): a plain `pytest benchmarks` runs a representative subset
(:data:`SUBSETS` 'default': one shape per device, every op, mode, dtype and provider), `--full-matrix` every
model shape, batch and provider, `--bench-subset gpu-check` what scripts/gpu_check.sh measures. Cases run in
:func:`priority` order (the issue-19 targets first), so a run cut short by a deadline has the important ones.

GPU timing (:func:`gpu_timings`): kernel-only time from one CUDA graph replaying the step over rotating copies of its
inputs (more bytes than 4x the L2, so every call reads from device memory), host-inclusive time (back-to-back calls,
then one synchronize), GB/s and the fraction of the copy bandwidth (measured once, first), kernels per call.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import platform
import statistics
import subprocess
import time
import types
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
BATCHES = (1, 4, 8)
SMOKE_SHAPE = ("smoke", (3, 5, 7, 9))
TINY_SAMPLE = (4, 8, 8)  # --bench-tiny: the subset's batches at this per-sample shape (gpu_check's CPU dry run)
# the ops whose B = 8 targets issue 19 sets (copy bandwidth, torch.compile, eager): first in every run
FORWARD_ONLY_OPS = ("consistency_probes", "reward_grad_clip")  # no fwd_bwd mode: the forward is their training case
LOSS_OPS = ("vggflow_matching_loss", "adjoint_matching_loss", "consistency_residual", "consistency_residual_exact")


@dataclasses.dataclass(frozen=True)
class Subset:
    """Which op-benchmark cases a run keeps: model shapes, batches, dtypes, providers; torch.compile (seconds of
    compilation per case) only at `compile_batches`, and with `compile_training_only` only in the training case
    (fwd_bwd; ops with a forward only keep theirs). `extra`: the non-op benchmarks (adjoint, overhead) run too."""

    models: tuple[str, ...]
    batches: tuple[int, ...]
    dtypes: tuple[str, ...] = tuple(DTYPES)
    providers: tuple[str, ...] = PROVIDERS
    compile_batches: tuple[int, ...] = BATCHES
    extra: bool = True
    compile_training_only: bool = False


SUBSETS = {
    # plain `pytest benchmarks`: every op, mode, dtype and provider at one shape, torch.compile in the training case
    "default": {"cuda": Subset(("sd3_1024",), (8,), compile_training_only=True),
                "cpu": Subset(("sd3_512",), (4,), compile_training_only=True)},
    "full": {"cuda": Subset(tuple(MODEL_SHAPES), BATCHES), "cpu": Subset(tuple(MODEL_SHAPES), BATCHES)},
    # scripts/gpu_check.sh: SD3 and FLUX.2-Klein 1024 px, B in {1, 8}; torch.compile at B = 8 in the training case
    "gpu-check": {
        dev: Subset(("sd3_1024", "flux2_klein_1024"), (1, 8), providers=(
            "torch", "torch_compile", "flowkern_triton", "flowkern_cuda"), compile_batches=(8,), extra=False,
            compile_training_only=True)
        for dev in ("cuda", "cpu")
    },
}  # fmt: skip


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def is_smoke(config) -> bool:
    return bool(config.getoption("benchmark_disable", False))


def is_tiny(config) -> bool:
    return bool(config.getoption("bench_tiny", False))


def subset(config) -> Subset:
    """The run's :class:`Subset`: --bench-subset (--full-matrix = full), narrowed by --bench-providers."""
    name = "full" if config.getoption("full_matrix", False) else config.getoption("bench_subset", "default")
    chosen = SUBSETS[name][device().type if device().type in ("cuda", "cpu") else "cpu"]
    providers = config.getoption("bench_providers", None)
    if providers:
        chosen = dataclasses.replace(chosen, providers=tuple(providers.split(",")))
    return chosen


def shape_cases(config, batches=BATCHES, models=tuple(MODEL_SHAPES)) -> list[tuple[str, tuple[int, ...]]]:
    """(name, full shape) cases of the run's subset; --bench-tiny keeps its batches at a tiny per-sample shape."""
    if is_smoke(config):
        return [SMOKE_SHAPE]
    chosen = subset(config)
    batches = [b for b in batches if b in chosen.batches]
    if is_tiny(config):
        return [(f"tiny_B{b}", (b, *TINY_SAMPLE)) for b in batches]
    return [(f"{m}_B{b}", (b, *MODEL_SHAPES[m])) for m in models if m in chosen.models for b in batches]


def _op_params(item) -> dict | None:
    """An op benchmark's parameters (op, provider, mode, dtype, am_mode, shape name, batch) or None."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    case = params.get("case")
    if "provider" not in params or not (isinstance(case, tuple) and len(case) == 2 and isinstance(case[1], tuple)):
        return None
    name = getattr(item, "originalname", item.name)
    return {
        "op": name.removeprefix("bench_"),
        "provider": params["provider"],
        "mode": params.get("mode", "fwd"),
        "dtype": params.get("dtype", "fp32"),
        "am_mode": params.get("am_mode", ""),
        "shape_name": case[0],
        "batch": case[1][0],
    }


def keep(item, config) -> bool:
    """Whether the run's subset keeps this collected benchmark (smoke runs keep everything)."""
    if is_smoke(config):
        return True
    chosen = subset(config)
    p = _op_params(item)
    if p is None:  # bench_adjoint, bench_overhead, bench_cpu_speed
        if not chosen.extra:
            return False
        case = getattr(getattr(item, "callspec", None), "params", {}).get("case")
        full = config.getoption("full_matrix", False) or config.getoption("bench_subset", "default") == "full"
        return full or not (isinstance(case, tuple) and case and case[0] == "sd3-medium")  # minutes per case
    if p["provider"] not in chosen.providers or p["dtype"] not in chosen.dtypes:
        return False
    if p["provider"] != "torch_compile":
        return True
    training = p["mode"] == "fwd_bwd" or p["op"] in FORWARD_ONLY_OPS
    return p["batch"] in chosen.compile_batches and (training or not chosen.compile_training_only)


def priority(item) -> tuple:
    """Sort key: B = 8 before smaller batches, the loss ops' training case (fwd_bwd) first, then the other ops;
    a case's providers stay together (eager, compile, triton, cpp, cuda) so a cut-short run has whole comparisons."""
    p = _op_params(item)
    if p is None:
        return (9,)
    training_loss = p["op"] in LOSS_OPS and p["mode"] == "fwd_bwd"
    provider = PROVIDERS.index(p["provider"]) if p["provider"] in PROVIDERS else len(PROVIDERS)
    case = (p["shape_name"].rsplit("_B", 1)[0], p["op"], p["am_mode"], p["mode"], p["dtype"])
    return (-p["batch"], not training_loss, p["op"] not in LOSS_OPS, case, provider)


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
    """Smoke runs (--benchmark-disable) and tiny runs (--bench-tiny) let Triton run in its CPU interpreter."""
    _smoke_mode[0] = is_smoke(config) or is_tiny(config)


@functools.cache
def copy_bandwidth_gbs() -> float | None:
    """Measured device copy bandwidth (GB/s, read+write) on 1 GiB, once per run (GPU only)."""
    if not torch.cuda.is_available():
        return None
    import triton.testing

    n = (1 << 30) // 4
    x, y = torch.randn(n, device="cuda"), torch.empty(n, device="cuda")
    ms = triton.testing.do_bench(functools.partial(y.copy_, x), quantiles=None)
    del x, y
    torch.cuda.empty_cache()
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
    env = {
        "device": name,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "flowkern": flowkern.__version__,
        "git_sha": sha,
        "threads": torch.get_num_threads(),
    }
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        env.update(sm_count=props.multi_processor_count, l2_bytes=cache_bytes(dev),
                   capability=f"{props.major}.{props.minor}")  # fmt: skip
    return env


# ---------------------------------------------------------------- timing helpers
def cache_bytes(dev: torch.device) -> int:
    """The last-level cache the rotating inputs must exceed: the GPU's L2 (CPU: 32 MiB, an EPYC CCX's L3)."""
    if dev.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 50 << 20))
    return 32 << 20


def _clone_tree(value, memo: dict):
    """`value` with every leaf tensor replaced by a clone (same values, new memory); shared objects stay shared."""
    if id(value) in memo:
        return memo[id(value)]
    if isinstance(value, torch.Tensor):
        out = value
        if value.grad_fn is None and not value.is_inference():
            out = value.detach().clone().requires_grad_(value.requires_grad)
    elif isinstance(value, dict):
        out = {k: _clone_tree(v, memo) for k, v in value.items()}
    elif isinstance(value, list | tuple) and any(isinstance(v, torch.Tensor | list | tuple | dict) for v in value):
        out = type(value)(_clone_tree(v, memo) for v in value)
    else:
        out = value
    memo[id(value)] = out
    return out


def rotating_copies(fn: Callable, min_bytes: int, max_copies: int = 64) -> tuple[list[Callable], int]:
    """Copies of the closure `fn` over fresh clones of the tensors it closes over (directly or in lists, tuples
    and dicts), enough of them that their tensors exceed `min_bytes`: ([fn, copy, ...], bytes per copy).

    Timing them in turn makes every call read its inputs from device memory, not from a cache the previous call
    filled. Tensors reached only through other objects are not cloned (bytes per copy says how much rotates)."""
    cells = fn.__closure__ or ()
    tensors: dict[int, torch.Tensor] = {}

    def collect(value):
        if isinstance(value, torch.Tensor):
            tensors[id(value)] = value
        elif isinstance(value, dict):
            for v in value.values():
                collect(v)
        elif isinstance(value, list | tuple):
            for v in value:
                collect(v)

    for cell in cells:
        collect(cell.cell_contents)
    per_copy = sum(t.numel() * t.element_size() for t in tensors.values() if t.grad_fn is None)
    if per_copy == 0:
        return [fn], 0
    n = min(max_copies, max(2, math.ceil(min_bytes / per_copy)))
    copies = [fn]
    for _ in range(n - 1):
        memo: dict = {}
        new_cells = tuple(types.CellType(_clone_tree(c.cell_contents, memo)) for c in cells)
        clone = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, new_cells)
        clone.__kwdefaults__ = fn.__kwdefaults__
        copies.append(clone)
    return copies, per_copy


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def host_inclusive_ms(fns: list[Callable], dev: torch.device, reps: int = 5, min_rep_s: float = 0.02) -> list[float]:
    """Per-call wall time of back-to-back calls over `fns` (host work, launches and device time), one
    synchronize per repetition: `reps` repetitions of at least `min_rep_s` each."""
    _sync(dev)
    start = time.perf_counter()
    for f in fns:
        f()
    _sync(dev)
    first = (time.perf_counter() - start) / len(fns)
    rounds = max(1, math.ceil(min_rep_s / max(first * len(fns), 1e-9)))
    out = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(rounds):
            for f in fns:
                f()
        _sync(dev)
        out.append((time.perf_counter() - start) / (rounds * len(fns)) * 1e3)
    return out


def graph_replay_ms(fns: list[Callable], reps: int = 5) -> list[float]:
    """Kernel-only per-call time: one CUDA graph calls each of `fns` once; its replays are timed with events."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as capture requires
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    graph.replay()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end) / len(fns))
    del graph
    return out


def kernels_per_call(fn: Callable) -> dict[str, int]:
    """Device work of one call from the profiler: kernels, memsets, memcpys."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    counts = {"kernels": 0, "memsets": 0, "memcpys": 0}
    for event in prof.events():
        if event.device_type != DeviceType.CUDA:
            continue
        name = event.name.lower()
        key = "memsets" if "memset" in name else "memcpys" if "memcpy" in name else "kernels"
        counts[key] += 1
    return counts


def gpu_timings(fn: Callable, nbytes: int, dev: torch.device, max_copies: int = 64) -> dict:
    """Kernel-only time (CUDA only), host-inclusive time, GB/s and the copy-bandwidth fraction, kernels per call:
    the extra_info of one benchmark case (see the module docstring). Failures are recorded, not raised."""
    out: dict = {}
    copies, per_copy = rotating_copies(fn, 4 * cache_bytes(dev), max_copies)
    out.update(rotating_copies=len(copies), rotated_bytes_per_copy=per_copy)
    host = host_inclusive_ms(copies, dev)
    out.update(host_ms=statistics.median(host), host_ms_min=min(host), host_ms_max=max(host))
    out["host_gb_per_s"] = nbytes / (out["host_ms"] * 1e-3) / 1e9
    if dev.type != "cuda":
        return out
    try:
        kernel = graph_replay_ms(copies)
        out.update(kernel_ms=statistics.median(kernel), kernel_ms_min=min(kernel), kernel_ms_max=max(kernel))
        out["gb_per_s"] = nbytes / (out["kernel_ms"] * 1e-3) / 1e9
        bw = copy_bandwidth_gbs()
        out["copy_bandwidth_gbs"] = bw
        out["fraction_of_copy_bandwidth"] = out["gb_per_s"] / bw if bw else None
    except Exception as err:  # noqa: BLE001 - a step that cannot be captured still gets its host-inclusive time
        out["graph_error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
        torch.cuda.synchronize()
    try:
        out.update({f"{k}_per_call": v for k, v in kernels_per_call(fn).items()})
    except Exception as err:  # noqa: BLE001
        out["profiler_error"] = f"{type(err).__name__}: {err}"[:300]
    return out


def run_benchmark(benchmark, fn: Callable[[], object], *, nbytes: int, **info) -> None:
    """Time `fn` and record extra_info: on GPU :func:`gpu_timings` (ms_p50 = host-inclusive median), on CPU
    pytest-benchmark's timer plus the host-inclusive time over rotating inputs (--bench-tiny, timed runs)."""
    dev = device()
    benchmark.extra_info.update(environment())
    benchmark.extra_info.update(info)
    benchmark.extra_info["bytes_moved"] = nbytes
    start = time.perf_counter()
    fn()  # warm-up (compilation, allocator)
    _sync(dev)
    benchmark.extra_info["first_call_s"] = time.perf_counter() - start
    timed = not benchmark.disabled
    if dev.type == "cuda":
        if timed:
            t = gpu_timings(fn, nbytes, dev)
            benchmark.extra_info.update(t)
            benchmark.extra_info.update(ms_p50=t["host_ms"], ms_p20=min(t["host_ms_min"], t["host_ms"]))
        benchmark.pedantic(fn, rounds=1, iterations=1)
    else:
        if timed and benchmark.extra_info.get("shape_name", "").startswith("tiny_"):
            benchmark.extra_info.update(gpu_timings(fn, nbytes, dev, max_copies=2))  # the plumbing, on a CPU
        benchmark(fn)
        stats = getattr(benchmark, "stats", None)
        if stats is not None and getattr(stats, "stats", None) is not None:
            seconds = stats.stats.median
            benchmark.extra_info["gb_per_s"] = nbytes / seconds / 1e9
    benchmark.extra_info["peak_extra_memory_bytes"] = peak_memory(fn, dev)

"""Exact peak-memory measurement (design.md section 6), shared by tests and benchmarks.

CPU: the torch profiler's [memory] allocator events, sorted by time; the maximum running sum of
nbytes is the peak above the starting point. RSS/VmHWM/tracemalloc are wrong here (allocator
reuse, C++ allocations unseen). CUDA: reset_peak_memory_stats + max_memory_allocated.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterator

import torch


@contextlib.contextmanager
def no_cyclic_gc() -> Iterator[None]:
    """Python's cyclic garbage collector off (after one collection): tensors held by reference cycles live until
    the block ends, whenever the collector would have run (its timing depends on the whole process's history).
    The measurements here and the planner's traces run this way: a collection inside would free tensors allocated
    before the entry and lower the running sum by bytes that are not the measured code's (the peak with no collection
    inside is the one the planner predicts; with one, the real peak can only be lower)."""
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def cpu_peak_memory(fn: Callable[[], object]) -> int:
    """Peak bytes allocated by the CPU allocator above the level at entry while `fn` runs."""
    from torch.profiler import ProfilerActivity, profile

    with no_cyclic_gc(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Raw kineto events carry every allocation (+nbytes) and free (-nbytes); prof.events() folds
    # allocations into their ops' totals, so it cannot give a running sum.
    raw = prof.profiler.kineto_results.events()
    events = sorted((e.start_ns(), e.nbytes()) for e in raw if e.name() == "[memory]" and e.device_type().name == "CPU")
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak


def cuda_peak_memory(fn: Callable[[], object], device: torch.device | str | None = None) -> int:
    """Peak bytes allocated on the CUDA device above the level at entry while `fn` runs."""
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    with no_cyclic_gc():
        fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def peak_memory(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Exact peak memory of `fn` above the entry level on `device` (CPU or CUDA)."""
    if torch.device(device).type == "cuda":
        return cuda_peak_memory(fn, device)
    return cpu_peak_memory(fn)

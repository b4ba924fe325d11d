"""The planner's per-phase peaks against the checks' definition (benchmarks/real_size.py ``phase_profile``: a phase's
peak is the highest level the running total reached at an allocator event while that phase was innermost, frees
included)."""

from __future__ import annotations

import pytest
import torch

from flowkern.app import plan as planner


def _update(phase):
    """Memory a phase allocates and keeps, then a phase ('other', outside every phase) that only frees: the end of an
    update after AdamW, whose moments stay held while the step's temporaries go."""
    with phase("optimizer"):
        moments = torch.zeros(4096)
        scratch = torch.zeros(64)
    del scratch
    return moments


def test_a_phase_that_only_frees_peaks_at_the_level_it_leaves():
    pytest.importorskip("torch.profiler")
    from torch._subclasses.fake_tensor import FakeTensorMode

    from benchmarks.real_size import phase_profile

    measured, _, _ = phase_profile(lambda: _update(torch.profiler.record_function))
    tracker = planner.StorageTracker()
    with FakeTensorMode(), tracker:
        _update(lambda name: planner._phase(tracker, name))
    assert measured["other"]["peak_bytes"] == 4096 * 4  # the moments, sampled at the free
    assert tracker.phase_peak == {p: v["peak_bytes"] for p, v in measured.items()}

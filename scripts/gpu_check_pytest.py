"""pytest plugin of scripts/gpu_check.py (loaded with `-p gpu_check_pytest`): a wall-clock deadline.

Once the epoch second in FLOWKERN_DEADLINE has passed, every test not yet started is skipped with the reason
"gpu_check: time budget spent", so pytest still finishes, writes its JUnit XML and pytest-benchmark its JSON, and
gpu_check counts those tests as not run. Works under pytest-xdist (each worker reads the same variable).
"""

from __future__ import annotations

import os
import time

import pytest

OUT_OF_TIME = "gpu_check: time budget spent"


def _deadline() -> float | None:
    value = os.environ.get("FLOWKERN_DEADLINE")
    return float(value) if value else None


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    deadline = _deadline()
    if deadline is not None and time.time() > deadline:
        pytest.skip(OUT_OF_TIME)

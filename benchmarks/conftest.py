"""Benchmarks are collected only by `pytest benchmarks` (testpaths = tests).

Which cases run (benchmarks/common.py, SUBSETS): a plain `pytest benchmarks` runs a representative subset, one
shape per device with every op, mode, dtype and provider; `--full-matrix` runs every model shape, batch and
provider (thousands of cases, hours with torch.compile); `--bench-subset gpu-check` is what scripts/gpu_check.sh
measures. `--bench-providers` narrows the providers, `--bench-tiny` swaps the subset's shapes for tiny ones (a CPU
dry run of the same plumbing). Cases run most important first (common.priority).
"""

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # lets the triton provider smoke-run on CPU
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_addoption(parser):
    group = parser.getgroup("flowkern benchmarks")
    group.addoption("--full-matrix", action="store_true", help="every model shape, batch, dtype and provider")
    group.addoption(
        "--bench-subset",
        default="default",
        choices=("default", "full", "gpu-check"),
        help="default: one shape per device, every op/mode/dtype/provider; gpu-check: scripts/gpu_check.sh's cases",
    )
    group.addoption("--bench-providers", help="comma-separated providers to keep (e.g. torch,flowkern_cuda)")
    group.addoption("--bench-tiny", action="store_true", help="tiny shapes at the subset's batches (CPU dry runs)")


def pytest_configure(config):
    from benchmarks.common import set_smoke

    set_smoke(config)


def pytest_sessionstart(session):
    from benchmarks.common import copy_bandwidth_gbs, is_smoke

    if torch.cuda.is_available() and not is_smoke(session.config):
        copy_bandwidth_gbs()  # measured first, on an idle device, once per run


def pytest_collection_modifyitems(config, items):
    from benchmarks.common import keep, priority

    kept = [item for item in items if keep(item, config)]
    deselected = [item for item in items if not keep(item, config)]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
    kept.sort(key=priority)  # stable: files and parameters keep their order inside a priority class
    items[:] = kept


def pytest_runtest_setup(item):
    params = getattr(getattr(item, "callspec", None), "params", {})
    if params.get("provider") == "torch_compile":
        torch._dynamo.reset()  # each case compiles afresh: Dynamo's recompile limit would fall back to eager


def pytest_benchmark_update_machine_info(config, machine_info):
    """The copy bandwidth, measured first (before any case) on a GPU, and the device's figures."""
    from benchmarks.common import copy_bandwidth_gbs, environment

    if torch.cuda.is_available():
        machine_info["copy_bandwidth_gbs"] = copy_bandwidth_gbs()
    machine_info["flowkern_environment"] = environment()

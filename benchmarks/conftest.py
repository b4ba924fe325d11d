"""Benchmarks are collected only by `pytest benchmarks` (testpaths = tests)."""

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # lets the triton provider smoke-run on CPU
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_configure(config):
    from benchmarks.common import set_smoke

    set_smoke(config)

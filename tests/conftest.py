"""Test setup (design.md section 5). Runs before flowkern is imported anywhere."""

import os
import socket

import torch

if not torch.cuda.is_available():
    # TRITON_INTERPRET is read when @triton.jit runs: set it before any flowkern import.
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402


class _NoNetwork(socket.socket):
    def connect(self, address):  # loopback stays allowed (accelerate, local servers)
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and (host.startswith("127.") or host in ("localhost", "::1")):
            return super().connect(address)
        if isinstance(address, str | bytes):  # unix sockets
            return super().connect(address)
        raise RuntimeError(f"tests must not touch the network (tried {address})")


_getaddrinfo = socket.getaddrinfo


def _no_dns(host, *args, **kwargs):  # name lookups leave the machine too (a hub id tried as a host)
    if host is None or (isinstance(host, str) and (host.startswith("127.") or host in ("localhost", "::1"))):
        return _getaddrinfo(host, *args, **kwargs)
    raise RuntimeError(f"tests must not touch the network (looked up {host!r})")


socket.socket = _NoNetwork  # type: ignore[misc]
socket.getaddrinfo = _no_dns  # type: ignore[assignment]


def _has_ext() -> bool:
    from flowkern.ops.backend import HAS_EXT

    return HAS_EXT


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_ext = pytest.mark.skip(reason="flowkern._C is not built")
    has_cuda, has_ext = torch.cuda.is_available(), _has_ext()
    for item in items:
        # markers, not keywords: keywords hold every parent's name too (a checkout in a folder named gpu)
        if item.get_closest_marker("gpu") and not has_cuda:
            item.add_marker(skip_gpu)
        if item.get_closest_marker("ext") and not has_ext:
            item.add_marker(skip_ext)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True, warn_only=False)
    yield
    torch.use_deterministic_algorithms(False)

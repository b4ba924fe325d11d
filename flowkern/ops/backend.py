"""Backend selection for the fused ops (design.md section 2).

Backends: ``torch`` (the op's reference.py, any device), ``triton`` (CUDA; CPU under TRITON_INTERPRET=1),
``cpp`` and ``cuda``: the native op ``torch.ops.flowkern.<op>`` from flowkern._C, whose CPU and CUDA kernels the
dispatcher picks by device (C++ autograd, so an eager call stays in C++).
Priority: ``use_backend(...)`` context > ``FLOWKERN_BACKEND`` env var > automatic
(CUDA tensor: cuda, else triton; CPU tensor: cpp, else triton when interpreting, else torch).
The public function of each op selects before calling (`backend_for`: the common case, eager CPU with nothing forced,
without building a torch.device); under torch.compile the choice is made once while tracing.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import warnings
from collections.abc import Callable, Iterator, Mapping

import torch

from flowkern.ops._validate import device_of

BACKEND_NAMES = ("torch", "triton", "cpp", "cuda")


def _cpu_lacks_avx2() -> bool:
    """_C's CPU kernels are compiled for AVX2 on x86-64: loading them elsewhere would be SIGILL."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return torch.backends.cpu.get_cpu_capability() in ("DEFAULT", "NO AVX", "VSX", "ZVECTOR")


_C = None
HAS_EXT = False
EXT_IMPORT_ERROR: str | None = None
if _cpu_lacks_avx2():  # pragma: no cover - depends on the machine
    EXT_IMPORT_ERROR = "this CPU has no AVX2, which flowkern._C's CPU kernels are compiled for"
else:
    try:  # the package works without the extension (pure-Python install or ABI mismatch)
        from flowkern import _C  # type: ignore[attr-defined,no-redef]  (importing it registers the flowkern:: ops)

        HAS_EXT = True
    except (ImportError, OSError) as exc:  # pragma: no cover - depends on the install
        EXT_IMPORT_ERROR = str(exc)

HAS_CUDA_EXT = HAS_EXT and bool(getattr(_C, "WITH_CUDA", 0))

try:  # never query the Triton driver here: it raises on machines without a GPU
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False

_FORCED: contextvars.ContextVar[str | None] = contextvars.ContextVar("flowkern_backend", default=None)
_warned_no_ext = False


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot serve the given op/tensor."""


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check_name(name: str, source: str) -> str:
    if name not in BACKEND_NAMES:
        raise ValueError(f"{source} must be one of {BACKEND_NAMES}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force a backend for every flowkern op called inside the block (``None`` = automatic)."""
    if name is not None:
        _check_name(name, "use_backend(name)")
    token = _FORCED.set(name)
    try:
        yield
    finally:
        _FORCED.reset(token)


# FLOWKERN_BACKEND is read on every call (it may change at run time); os.environ.get costs ~1 us, a lookup in its
# underlying dict ~0.1 us (CPython keeps it in sync with os.environ).
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey("FLOWKERN_BACKEND") if _ENV_DATA is not None else None


def forced_backend() -> str | None:
    name = _FORCED.get()
    if name is not None:
        return name
    raw = _ENV_DATA.get(_ENV_KEY) if _ENV_DATA is not None else os.environ.get("FLOWKERN_BACKEND")
    if raw is None:
        return None
    env = (os.environ.decodevalue(raw) if isinstance(raw, bytes) else raw).strip().lower()
    if env in ("", "auto"):
        return None
    return _check_name(env, "FLOWKERN_BACKEND")


def native_op(name: str):
    """The compiled op ``torch.ops.flowkern.<name>.default`` (CPU and, if built, CUDA kernels; C++ autograd) or None."""
    return getattr(torch.ops.flowkern, name).default if HAS_EXT else None


def implementations(reference: Callable, triton_impl: Callable | None, native: Callable | None) -> dict:
    """An op's backend table. The native op serves CPU (cpp) and CUDA (cuda) tensors; the dispatcher picks a kernel."""
    return {"torch": reference, "triton": triton_impl, "cpp": native, "cuda": native}


def _why_unavailable(backend: str, device: torch.device, impls: Mapping[str, Callable | None]) -> str | None:
    if impls.get(backend) is None:
        if backend in ("cpp", "cuda") and not HAS_EXT:
            return (
                f"flowkern._C is not built ({EXT_IMPORT_ERROR}); reinstall with `pip install --no-build-isolation -e .`"
            )
        return "this op has no such implementation"
    if backend == "torch":
        return None
    if backend == "cpp":
        return None if device.type == "cpu" else "cpp serves CPU tensors only"
    if backend == "cuda":
        if device.type != "cuda":
            return "cuda serves CUDA tensors only"
        return (
            None if HAS_CUDA_EXT else "flowkern._C was built without CUDA (torch without CUDA or no nvcc at build time)"
        )
    if backend == "triton":
        if not HAS_TRITON:
            return "triton is not installed (`pip install triton`)"
        if device.type == "cuda":
            return None
        if device.type == "cpu":
            if triton_interpreting():
                return None
            return "triton on CPU needs TRITON_INTERPRET=1 set before importing flowkern"
        return f"triton does not serve {device.type} tensors"
    return "unknown backend"


def available_backends(impls: Mapping[str, Callable | None], device: torch.device) -> list[str]:
    return [b for b in BACKEND_NAMES if _why_unavailable(b, device, impls) is None]


def _warn_no_ext() -> None:
    global _warned_no_ext
    _warned_no_ext = True
    warnings.warn(
        f"flowkern._C is not available ({EXT_IMPORT_ERROR}); falling back to Triton/PyTorch. "
        "'undefined symbol' means it was built against another torch: rebuild with "
        "`pip install --no-build-isolation -e .`",
        RuntimeWarning,
        stacklevel=4,
    )


def backend_for(op: str, impls: Mapping[str, Callable | None], name: str, x: object) -> str:
    """The backend that runs ``op`` for its primary input ``x`` (argument ``name``): 'cpp' at once in the common case
    (eager, ``x`` a plain CPU tensor, flowkern._C loaded, no backend forced), else ``select_backend`` on ``x``'s device.

    The common case builds no torch.device: a device's ``.type`` string costs about 0.5 us alone and, measured inside a
    forward+backward on [4, 8], slows the call by 4-5 us (benchmarks/bench_overhead.py).
    """
    if not torch.compiler.is_compiling() and type(x) is torch.Tensor and x.is_cpu and HAS_EXT:
        if forced_backend() is None:
            return "cpp"
    return select_backend(op, impls, device_of(name, x))


@torch.compiler.assume_constant_result  # torch.compile evaluates the choice once, while tracing
def select_backend(op: str, impls: Mapping[str, Callable | None], device: torch.device) -> str:
    """The backend that runs ``op`` on ``device`` (see module docstring): 'torch', 'triton', 'cpp' or 'cuda'."""
    forced = forced_backend()
    if forced is None:  # automatic; the common case first
        if device.type == "cpu":
            if HAS_EXT:
                return "cpp"
        elif device.type == "cuda" and HAS_CUDA_EXT:
            return "cuda"
        if not HAS_EXT and not _warned_no_ext:
            _warn_no_ext()
        order = ("cuda", "triton") if device.type == "cuda" else ("cpp", "triton")
        return next((name for name in order if _why_unavailable(name, device, impls) is None), "torch")
    why = _why_unavailable(forced, device, impls)
    if why is not None:
        raise BackendUnavailableError(f"flowkern.{op}: backend {forced!r} cannot serve {device.type} tensors: {why}")
    return forced

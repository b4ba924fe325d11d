"""Backend-vs-reference harness shared by tests/ops/test_<op>.py (design.md section 5).

An op test supplies `call(backend_or_None, **inputs) -> tuple of outputs` through the public
function, plus input factories; the harness runs the reference in high precision and in the test
dtype, the backend in the test dtype, and checks outputs and input gradients with the tolerance rule.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from flowkern.ops.backend import available_backends, use_backend
from tests.utils import assert_close_to_reference, hi_dtype

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ODD_SHAPES = ((3, 5, 7, 9), (2, 4, 33, 17), (3, 16, 37, 29))


def op_module(name: str):
    """The package flowkern/ops/<name>/ (flowkern.ops re-exports a function of the same name)."""
    import importlib

    return importlib.import_module(f"flowkern.ops.{name}")


def cpu_backends(impls) -> list[str]:
    return available_backends(impls, torch.device("cpu"))


def require_gpu_backend(impls, backend: str) -> None:
    """Under `-m gpu`: a missing CUDA extension fails the cuda-backend tests (a GPU run must run the CUDA kernels);
    a missing Triton skips the triton ones."""
    import pytest

    from flowkern.ops.backend import EXT_IMPORT_ERROR, HAS_CUDA_EXT

    if backend == "cuda" and not HAS_CUDA_EXT:
        pytest.fail(f"flowkern._C has no CUDA kernels ({EXT_IMPORT_ERROR or 'built without nvcc'}): rebuild on the GPU")
    if backend not in available_backends(impls, torch.device("cuda")):
        pytest.skip(f"{backend} not available on CUDA")


def _clone_inputs(inputs: dict, dtype: torch.dtype | None, grad_names: tuple[str, ...]) -> dict:
    out = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor) and v.dtype.is_floating_point and v.dim() > 1:
            w = v.detach().to(dtype) if dtype is not None else v.detach().clone()
            if not v.is_contiguous() and w.is_contiguous():  # keep the non-contiguous layout
                from tests.utils import make_noncontiguous

                w = make_noncontiguous(w)
            out[k] = w.requires_grad_(k in grad_names)
        else:
            out[k] = v
    return out


def _run(call: Callable, backend: str | None, inputs: dict, grad_names, cotangents_seed: int = 1):
    with use_backend(backend):
        outs = call(**inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    grads = {}
    if grad_names:
        gen = torch.Generator().manual_seed(cotangents_seed)
        total = 0
        for o in outs:
            if o.requires_grad:  # drawn on the CPU (same values on every device), then moved to the output's device
                cot = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(device=o.device, dtype=o.dtype)
                total = total + (o * cot).sum()
        if isinstance(total, torch.Tensor):
            params = [inputs[n] for n in grad_names]
            with use_backend(backend):  # backward custom ops select their backend at call time too
                gs = torch.autograd.grad(total, params, allow_unused=True)
            grads = {n: g for n, g in zip(grad_names, gs)}
    return outs, grads


def check_against_reference(
    call: Callable, inputs: dict, backend: str, dtype: torch.dtype, grad_names: tuple[str, ...] = ()
) -> None:
    """Outputs and gradients of `backend` in `dtype` vs the reference (tolerance rule)."""
    lo = _clone_inputs(inputs, dtype, grad_names)
    hi = _clone_inputs({k: v for k, v in lo.items()}, hi_dtype(), grad_names)
    ref_lo = _clone_inputs(lo, None, grad_names)
    y_hi, g_hi = _run(call, "torch", hi, grad_names)
    y_torch, g_torch = _run(call, "torch", ref_lo, grad_names)
    y, g = _run(call, backend, lo, grad_names)
    assert len(y) == len(y_hi)
    for i, (a, b, c) in enumerate(zip(y, y_torch, y_hi)):
        assert_close_to_reference(a, b, c, dtype, f"{backend} output {i}")
    for n in grad_names:
        if g_hi.get(n) is None:
            assert g.get(n) is None or not g[n].abs().any(), f"{backend}: unexpected gradient for {n}"
            continue
        assert g.get(n) is not None, f"{backend}: missing gradient for {n}"
        assert g[n].dtype == lo[n].dtype, f"{backend}: gradient of {n} has dtype {g[n].dtype}, input {lo[n].dtype}"
        assert_close_to_reference(g[n], g_torch[n], g_hi[n], dtype, f"{backend} d/d{n}")


# ATen calls that launch no kernel: allocation without a fill, and metadata.
_NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh", "set_", "detach"}


def count_launches(fn: Callable) -> dict[str, list[str]]:
    """Runs fn() and returns the kernels it launches: {'triton': [kernel names], 'aten': [op names]}. ATen views and
    allocations without a fill do not count; the interpreter's own host copies inside a Triton launch are skipped."""
    import triton
    from torch.utils._python_dispatch import TorchDispatchMode

    from flowkern.ops.backend import triton_interpreting

    found: dict[str, list[str]] = {"triton": [], "aten": []}
    inside = [False]

    class _Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if not inside[0] and not func.is_view and name not in _NO_KERNEL:
                found["aten"].append(name)
            return func(*args, **(kwargs or {}))

    if triton_interpreting():
        from triton.runtime.interpreter import GridExecutor as owner

        method = "__call__"
    else:
        from triton.runtime.jit import JITFunction as owner

        method = "run"
    original = getattr(owner, method)

    def launch(self, *args, **kwargs):
        if not kwargs.get("warmup", False):
            found["triton"].append(getattr(self.fn, "__name__", "?"))
        inside[0] = True
        try:
            return original(self, *args, **kwargs)
        finally:
            inside[0] = False

    setattr(owner, method, launch)
    try:
        with _Count():
            fn()
    finally:
        setattr(owner, method, original)
    del triton
    return found

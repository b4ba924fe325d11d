"""Shared test helpers: the tolerance rule of design.md section 5 and exact CPU peak memory."""

from __future__ import annotations

import os

import torch

from flowkern.profiling import peak_memory  # noqa: F401  (re-exported for tests)

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-10}


def hi_dtype(device: torch.device | str = "cpu") -> torch.dtype:
    return torch.float64 if torch.device(device).type == "cpu" else torch.float32


def assert_close_to_reference(
    y: torch.Tensor, y_torch: torch.Tensor, y_hi: torch.Tensor, dtype: torch.dtype, name: str = "output"
) -> None:
    """max|y - y_hi| <= 2 max|y_torch - y_hi| + atol max(1, max|y_hi|) (+1 bf16 ulp under the interpreter).

    y: backend under test; y_torch: reference in the test dtype; y_hi: reference on upcast inputs.
    """
    assert y.shape == y_hi.shape, f"{name}: shape {tuple(y.shape)} != reference {tuple(y_hi.shape)}"
    y64, yt64, yh64 = (v.detach().to(torch.float64).cpu() for v in (y, y_torch, y_hi))
    assert torch.isfinite(yh64).all(), f"{name}: the high-precision reference is not finite"
    bad = ~torch.isfinite(y64)
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        raise AssertionError(f"{name}: non-finite values at {idx}")
    scale = max(1.0, yh64.abs().max().item()) if yh64.numel() else 1.0
    tol = 2 * (yt64 - yh64).abs().max().item() if yh64.numel() else 0.0
    tol += ATOL[dtype] * scale
    if dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        tol += 2.0**-7 * scale  # the interpreter rounds fp32->bf16 toward zero
    err = (y64 - yh64).abs()
    if err.numel() and err.max().item() > tol:
        worst = torch.nonzero(err == err.max())[:3].tolist()
        at = err.flatten().argmax()
        raise AssertionError(
            f"{name} ({dtype}): max error {err.max().item():.3e} > tolerance {tol:.3e} at {worst}; "
            f"value {y64.flatten()[at].item():.6g} vs {yh64.flatten()[at].item():.6g}"
        )


def make_noncontiguous(x: torch.Tensor) -> torch.Tensor:
    """Same values, non-contiguous storage (every other element of a doubled last dim)."""
    big = torch.empty(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
    big[..., ::2] = x
    out = big[..., ::2]
    assert not out.is_contiguous()
    return out


def misaligned(x):
    """A contiguous copy of x whose data pointer is one element past a 16-byte boundary."""
    buf = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)
    out = buf[1:].view(x.shape)
    out.copy_(x)
    return out

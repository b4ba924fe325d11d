"""Helpers shared by the Triton kernels (design.md section 3): launch layout, device guard, coefficients, @jit helpers.

Per-sample reductions run over fixed (sample, chunk) tiles whose size depends only on the per-sample element
count D, never on B: the sums are batch-invariant and deterministic. The interpreter costs ~0.5 ms per program,
so on CPU tiles are large (<= 8 chunks per sample).
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

from flowkern.ops.backend import triton_interpreting

GPU_BLOCK = 1024
GPU_CHUNK = 8192
INTERP_BLOCK = 4096
INTERP_MAX_CHUNKS = 8


def reduction_layout(d: int) -> tuple[int, int, int]:
    """(BLOCK, CHUNK, n_chunks) for a per-sample reduction over d elements; CHUNK % BLOCK == 0."""
    if triton_interpreting():
        block = min(INTERP_BLOCK, max(16, 1 << math.ceil(math.log2(max(d, 1)))))
        chunk = block * max(1, math.ceil(d / (block * INTERP_MAX_CHUNKS)))
    else:
        block, chunk = GPU_BLOCK, GPU_CHUNK
    return block, chunk, math.ceil(d / chunk)


def elementwise_configs() -> list:
    """Autotune space of the flat-grid elementwise kernels (BLOCK elements per program, num_warps); one config when
    interpreting (the autotuner needs a GPU to compare, and the interpreter wants few, large programs)."""
    if triton_interpreting():
        return [triton.Config({"BLOCK": 4096}, num_warps=4)]
    return [triton.Config({"BLOCK": block}, num_warps=warps) for block in (1024, 2048, 4096) for warps in (4, 8)]


def flat_grid(n: int):
    """Grid of a flat elementwise kernel over n elements (BLOCK chosen by the autotuner)."""
    return lambda meta: (triton.cdiv(n, meta["BLOCK"]),)


def tl_acc(*tensors: torch.Tensor | None):
    """Triton accumulation dtype: fp64 when an input is fp64 (so gradcheck runs the real kernel), else fp32."""
    return tl.float64 if any(x is not None and x.dtype == torch.float64 for x in tensors) else tl.float32


def coef_tensor(tensor: torch.Tensor | None, value: float, primary: torch.Tensor) -> torch.Tensor:
    """A per-sample coefficient given as (tensor or None, value) as the contiguous [B] tensor the kernels index."""
    dtype = torch.float64 if primary.dtype == torch.float64 else torch.float32
    batch = primary.shape[0]
    if tensor is None:
        return torch.full((batch,), value, dtype=dtype, device=primary.device)
    return tensor.detach().to(dtype).expand(batch).contiguous()


def launch_device(x: torch.Tensor):
    """Launch on x's GPU (a tensor on cuda:1 while cuda:0 is current); nothing to do on CPU (interpreter)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


@triton.jit
def eta(t, ETA_MODE: tl.constexpr):
    """eta_t of (M15): quad t^2, linear t, constant 1."""
    if ETA_MODE == 0:
        out = t * t
    elif ETA_MODE == 1:
        out = t
    else:
        out = t * 0 + 1
    return out

"""Launch layout shared by the Triton kernels (design.md section 3).

Per-sample reductions run over fixed (sample, chunk) tiles whose size depends only on the
per-sample element count D, never on B: the sums are batch-invariant and deterministic.
The interpreter costs ~0.5 ms per program, so on CPU tiles are large (<= 8 chunks per sample).
"""

from __future__ import annotations

import math

import torch

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


def elementwise_layout(n: int) -> tuple[int, int]:
    """(BLOCK, n_programs) for a flat elementwise kernel over n elements."""
    if triton_interpreting():
        block = max(16, min(1 << 16, 1 << math.ceil(math.log2(max(math.ceil(n / 64), 1)))))
    else:
        block = 2048
    return block, math.ceil(n / block)


def acc_dtype(x: torch.Tensor):
    """Triton accumulation dtype: fp64 for fp64 inputs (so gradcheck runs the real kernel), else fp32."""
    import triton.language as tl

    return tl.float64 if x.dtype == torch.float64 else tl.float32

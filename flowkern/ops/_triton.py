"""Helpers shared by the Triton kernels (design.md section 3): launch layout, device guard, coefficients, @jit helpers.

Per-sample reductions run over fixed (sample, chunk) tiles whose size depends only on the per-sample element
count D, never on B: the sums are batch-invariant and deterministic. The interpreter costs ~0.5 ms per program,
so on CPU tiles are large (<= 8 chunks per sample).

One launch per loss: each program stores its tile's partial sum in an uninitialised buffer and takes a ticket from
a counter (`tickets`); the last program to arrive sums the partials in index order (deterministic) and writes the
loss, then resets the counter. Coefficients given as Python floats reach the kernels as scalars (`coef`).
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


_TICKETS: dict[torch.device, torch.Tensor] = {}


def tickets(device: torch.device, n: int) -> torch.Tensor:
    """n zeroed int32 ticket counters on device, shared by the launches on it (each kernel resets the ones it used:
    launches that use them must not run concurrently on two streams). Allocated (one fill) only when it grows."""
    buf = _TICKETS.get(device)
    if buf is None or buf.numel() < n:
        buf = _TICKETS[device] = torch.zeros(max(n, 64), dtype=torch.int32, device=device)
    return buf


def coef_args(tensor: torch.Tensor | None, value: float) -> tuple:
    """(tensor or None, stride, value): a per-sample coefficient as the kernels read it with `coef` (no copy: a 0-dim
    tensor gets stride 0, any dtype is converted after the load; None when it is the Python float `value`)."""
    if tensor is None:
        return None, 0, value
    return tensor.detach(), (tensor.stride(0) if tensor.dim() else 0), 0.0


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
def coef(ptr, stride, value, b, ACC: tl.constexpr):
    """Sample b's coefficient passed as `coef_args`: ptr[b * stride] (any dtype), or `value` when ptr is None."""
    if ptr is None:
        out = tl.full((), value, ACC)
    else:
        out = tl.load(ptr + b * stride).to(ACC)
    return out


@triton.jit
def last_to_arrive(ticket_ptr, n_arrivals):
    """True in the last of the n_arrivals programs that call this on ticket_ptr, which it resets to 0; every store
    the programs made before the call is visible to it (barrier, then an acq_rel ticket)."""
    tl.debug_barrier()
    ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel")
    last = ticket == n_arrivals - 1
    tl.atomic_xchg(ticket_ptr, 0, mask=last)
    return last


@triton.jit
def ordered_sum(ptr, n, stride, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """sum(ptr[i * stride] for i < n) in a fixed order (depends on n only): the last program's final reduction."""
    acc = tl.zeros([BLOCK], dtype=ACC)
    for off in range(0, n, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        acc += tl.load(ptr + idx * stride, mask=idx < n, other=0, volatile=True).to(ACC)
    return tl.sum(acc, axis=0)


FINAL_BLOCK = 128  # partials summed per step by the last program


@triton.jit
def finish_mean(partial_ptr, n_chunks, d, ticket_ptr, loss_ptr, ACC: tl.constexpr):
    """The mean loss of a (sample, chunk) grid: the last program to arrive writes sum(partials) / (B * d)."""
    n_tiles = tl.num_programs(0) * n_chunks
    if last_to_arrive(ticket_ptr, n_tiles):
        numel = tl.num_programs(0).to(tl.int64) * d
        tl.store(loss_ptr, ordered_sum(partial_ptr, n_tiles, 1, FINAL_BLOCK, ACC) / numel.to(ACC))


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

"""Samplers in paper time (layer L3): time grids, the Euler ODE sampler with CFG, the memoryless
stochastic sampler of adjoint matching, and VGG-Flow transition subsampling.

Conventions (M1, M2): t in [0, 1], t=0 noise, t=1 data, v = dx/dt; grid 0 = t_0 < ... < t_N = 1,
h_i = t_{i+1} - t_i, Euler x_{i+1} = x_i + h_i v(x_i, t_i). Every step goes through the fused
`flowkern.ops.cfg_euler` (CFG combine (M5) + step). Rollouts run under `torch.no_grad()` and keep
only the states (and optionally the velocities), so no autograd graph survives a step; the adjoint
engine (`flowkern.adjoint`) recomputes what it needs.

Velocity arguments (duck-typed, no model classes imported here):

- an object with ``.velocity(x, t, cond)`` (a FlowModel: CFG, conditioning, paper time handled by it);
- any callable ``velocity(x, t)`` (or ``velocity(x, t, cond)`` when ``cond`` is not None).

It returns the velocity [B, ...], or, for CFG done by the sampler, the pair ``(v_uncond, v_cond)``,
combined as v = v_u + w (v_c - v_u) with ``guidance_scale=w`` (M5). ``t`` is passed as a 0-dim
tensor (a shared grid ``ts`` [N+1]) or a [B] tensor (per-sample grids ``ts`` [N+1, B]), fp32 (fp64
for fp64 states) on the states' device.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from flowkern.ops import cfg_euler

__all__ = [
    "Trajectory",
    "initial_noise",
    "memoryless_coefficients",
    "sample_euler",
    "sample_memoryless",
    "sd3_shifted_grid",
    "shift_sigma",
    "subsample_transitions",
    "uniform_grid",
    "validate_grid",
]

GRID_ATOL = 1e-6  # endpoints of an explicit grid must be 0 and 1 to this tolerance


# ---------------------------------------------------------------- time grids
def _check_steps(num_steps: object, minimum: int = 1) -> int:
    if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral):
        raise TypeError(f"num_steps must be an int, got {type(num_steps).__name__}")
    if num_steps < minimum:
        raise ValueError(f"num_steps must be >= {minimum}, got {num_steps}")
    return int(num_steps)


def uniform_grid(num_steps: int) -> torch.Tensor:
    """t_i = i/N, i = 0..N (M2), fp64 [N+1]."""
    n = _check_steps(num_steps)
    return torch.arange(n + 1, dtype=torch.float64) / n


def shift_sigma(s: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """sigma_S(s) = S s / (1 + (S - 1) s) (M4)."""
    return shift * s / (1 + (shift - 1) * s)


def sd3_shifted_grid(num_steps: int, shift: float = 3.0) -> torch.Tensor:
    """The SD3 schedule in paper time (M4), fp64 [N+1]; equals diffusers'
    ``FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(N)`` as t = 1 - sigma.

    s_i = 1 - (i/(N-1)) (1 - s_min), i = 0..N-1, s_min = sigma_S(1e-3) (the training grid's minimum,
    shifted once, then the grid is shifted again); sigma_i = sigma_S(s_i), sigma_N = 0; t_i = 1 - sigma_i.
    """
    n = _check_steps(num_steps, minimum=2)
    if isinstance(shift, bool) or not isinstance(shift, numbers.Real) or not math.isfinite(shift) or shift <= 0:
        raise ValueError(f"shift must be a finite float > 0, got {shift!r}")
    s_min = shift_sigma(1e-3, float(shift))
    s = 1.0 - torch.arange(n, dtype=torch.float64) / (n - 1) * (1.0 - s_min)
    sigma = torch.cat([shift_sigma(s, float(shift)), torch.zeros(1, dtype=torch.float64)])
    return 1.0 - sigma


def validate_grid(ts: object, name: str = "ts") -> torch.Tensor:
    """An explicit grid as fp64 CPU tensor [N+1] (shared) or [N+1, B] (per sample), N >= 1.

    Requires finite, strictly increasing times from 0 to 1 (M2) (endpoints to 1e-6).
    """
    if isinstance(ts, torch.Tensor):
        grid = ts.detach().to(device="cpu", dtype=torch.float64)
    elif isinstance(ts, Sequence):
        try:
            grid = torch.tensor([float(t) for t in ts], dtype=torch.float64)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{name} must be a sequence of numbers or a tensor: {exc}") from None
    else:
        raise TypeError(f"{name} must be a tensor or a sequence of times, got {type(ts).__name__}")
    if grid.dim() not in (1, 2) or grid.shape[0] < 2:
        raise ValueError(f"{name} must have shape [N+1] or [N+1, B] with N >= 1, got {tuple(grid.shape)}")
    if not bool(torch.isfinite(grid).all()):
        raise ValueError(f"{name} must be finite")
    if not bool((grid[1:] > grid[:-1]).all()):
        raise ValueError(f"{name} must be strictly increasing")
    if not bool((grid[0].abs() <= GRID_ATOL).all()) or not bool(((grid[-1] - 1).abs() <= GRID_ATOL).all()):
        raise ValueError(f"{name} must start at t=0 (noise) and end at t=1 (data) (M1), got {grid[0]} .. {grid[-1]}")
    return grid


# ---------------------------------------------------------------- shared helpers
def _coef_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _velocity_fn(velocity: Any, cond: Any) -> Callable[[torch.Tensor, torch.Tensor], Any]:
    if hasattr(velocity, "velocity") and callable(velocity.velocity):
        return lambda x, t: velocity.velocity(x, t, cond)
    if not callable(velocity):
        raise TypeError(f"velocity must be callable or have .velocity(x, t, cond), got {type(velocity).__name__}")
    if cond is None:
        return velocity
    return lambda x, t: velocity(x, t, cond)


def _split_cfg(out: Any, x: torch.Tensor, guidance_scale: float | None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(v_uncond, v_cond) from a velocity's output; v_uncond None without CFG."""
    if isinstance(out, tuple | list):
        if guidance_scale is None:
            raise ValueError("velocity returned (v_uncond, v_cond): pass guidance_scale to combine them (M5)")
        if len(out) != 2:
            raise ValueError(f"velocity must return a tensor or (v_uncond, v_cond), got {len(out)} outputs")
        v_uncond, v_cond = out
    else:
        if guidance_scale is not None:
            raise ValueError(
                "guidance_scale is set but velocity returned one tensor: return (v_uncond, v_cond), "
                "or leave CFG to the model and pass guidance_scale=None"
            )
        v_uncond, v_cond = None, out
    for name, v in (("v_uncond", v_uncond), ("v_cond", v_cond)):
        if v is not None and (not isinstance(v, torch.Tensor) or v.shape != x.shape):
            shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"velocity's {name} must have the state's shape {tuple(x.shape)}, got {shape}")
    return v_uncond, v_cond


def _times(grid: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(t [N+1] or [N+1, B], h [N] or [N, B]) on x's device in fp32 (fp64 for fp64 x); h from fp64 differences."""
    if grid.dim() == 2 and grid.shape[1] != x.shape[0]:
        raise ValueError(f"ts has per-sample shape {tuple(grid.shape)} but the batch is {x.shape[0]}")
    dtype = _coef_dtype(x)
    return grid.to(device=x.device, dtype=dtype), (grid[1:] - grid[:-1]).to(device=x.device, dtype=dtype)


def initial_noise(
    shape: Sequence[int],
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """x_0 ~ N(0, I) (M1), drawn from `generator` (on the generator's device by default)."""
    if device is None:
        device = generator.device if generator is not None else "cpu"
    return torch.randn(tuple(shape), generator=generator, dtype=dtype, device=device)


def _start(x0: torch.Tensor | Sequence[int], generator: torch.Generator | None) -> torch.Tensor:
    if isinstance(x0, torch.Tensor):
        if x0.dim() < 1 or x0.shape[0] == 0:
            raise ValueError(f"x0 must have a non-empty batch dimension, got shape {tuple(x0.shape)}")
        if not x0.dtype.is_floating_point:
            raise TypeError(f"x0 must be a floating tensor, got {x0.dtype}")
        return x0.detach()
    if generator is None:
        raise ValueError("x0 is a shape: pass a torch.Generator to draw the noise reproducibly")
    return initial_noise(x0, generator)


@dataclass
class Trajectory:
    """A rollout: ``states`` [N+1, B, ...] = x_0..x_N, ``ts`` fp64 [N+1] (or [N+1, B]), ``velocities``
    [N, B, ...] = the (CFG-combined) v(x_i, t_i) used by each step, or None. No autograd graph."""

    states: torch.Tensor
    ts: torch.Tensor
    velocities: torch.Tensor | None = None

    @property
    def num_steps(self) -> int:
        return self.states.shape[0] - 1

    @property
    def final(self) -> torch.Tensor:
        return self.states[-1]


def host_buffer(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A stored trajectory offloaded to the host: CPU memory, pinned when CUDA is available (so copies to and from
    the GPU can be ``non_blocking``). The one place a trajectory leaves the device (``flowkern plan`` counts what it
    returns as off the GPU)."""
    return torch.empty(shape, dtype=dtype, device="cpu", pin_memory=torch.cuda.is_available())


def fetch(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A piece of a (possibly offloaded) stored trajectory on the compute ``device``; ``x`` itself when it is
    already there (no copy: on the CPU, offloading changes no value)."""
    return x.to(device, non_blocking=True)


class _Store:
    """Preallocated [n, B, ...] buffer in the chosen dtype/device (pinned CPU memory on request: `host_buffer`)."""

    def __init__(self, n: int, like: torch.Tensor, dtype: torch.dtype | None, device: Any, pin_memory: bool):
        device = torch.device(device) if device is not None else like.device
        shape, dtype = (n, *like.shape), dtype or like.dtype
        pin = pin_memory and device.type == "cpu"
        self.buffer = host_buffer(shape, dtype) if pin else torch.empty(shape, dtype=dtype, device=device)
        self.async_copy = pin and torch.cuda.is_available() and like.device.type == "cuda"

    def put(self, i: int, x: torch.Tensor) -> None:
        self.buffer[i].copy_(x, non_blocking=self.async_copy)

    def done(self) -> torch.Tensor:
        if self.async_copy:
            torch.cuda.current_stream().synchronize()
        return self.buffer


# ---------------------------------------------------------------- Euler ODE sampler (M2, M5)
def sample_euler(
    velocity: Any,
    x0: torch.Tensor | Sequence[int],
    ts: object,
    cond: Any = None,
    *,
    guidance_scale: float | None = None,
    generator: torch.Generator | None = None,
    return_velocities: bool = False,
    store_dtype: torch.dtype | None = None,
    store_device: torch.device | str | None = None,
    pin_memory: bool = False,
) -> Trajectory:
    """Euler rollout x_{i+1} = x_i + h_i v(x_i, t_i) (M2) from ``x0``, without autograd graphs.

    ``x0``: the noise x_0 [B, ...], or a shape drawn from ``generator`` (seeded: reproducible).
    ``ts``: grid [N+1] or per-sample [N+1, B] (see `uniform_grid`, `sd3_shifted_grid`; validated).
    ``guidance_scale``: w when ``velocity`` returns (v_uncond, v_cond) (CFG done here, M5).
    States (and velocities) are stored in ``store_dtype`` on ``store_device`` (default: x0's), pinned
    CPU memory with ``pin_memory`` when CUDA is available; integration itself stays in x0's dtype.
    """
    grid = validate_grid(ts)
    x = _start(x0, generator)
    fn = _velocity_fn(velocity, cond)
    t_all, h_all = _times(grid, x)
    w = 1.0 if guidance_scale is None else float(guidance_scale)
    n = grid.shape[0] - 1
    states = _Store(n + 1, x, store_dtype, store_device, pin_memory)
    velocities = _Store(n, x, store_dtype, store_device, pin_memory) if return_velocities else None
    with torch.no_grad():
        states.put(0, x)
        for i in range(n):
            v_uncond, v_cond = _split_cfg(fn(x, t_all[i]), x, guidance_scale)
            v, x, _ = cfg_euler(v_uncond, v_cond, x, w, h_all[i], t_all[i])  # (M5), (M2)
            states.put(i + 1, x)
            if velocities is not None:
                velocities.put(i, v)
    return Trajectory(states.done(), grid, velocities.done() if velocities is not None else None)


# ---------------------------------------------------------------- memoryless sampler (M29, M30)
def memoryless_coefficients(ts: object) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma, kappa), fp64 [N] (or [N, B]): the practical schedule of (M29) on grid ``ts``,
    sigma_i = sqrt(2 (1 - t_i + h_i) / (t_i + h_i)), kappa_i = 1 / (t_i + h_i)."""
    grid = validate_grid(ts)
    t, h = grid[:-1], grid[1:] - grid[:-1]
    return torch.sqrt(2 * (1 - t + h) / (t + h)), 1 / (t + h)


def sample_memoryless(
    velocity: Any,
    x0: torch.Tensor | Sequence[int],
    ts: object,
    generator: torch.Generator,
    cond: Any = None,
    *,
    guidance_scale: float | None = None,
    sigma: torch.Tensor | Sequence[float] | None = None,
    kappa: torch.Tensor | Sequence[float] | None = None,
    return_velocities: bool = False,
    store_dtype: torch.dtype | None = None,
    store_device: torch.device | str | None = None,
    pin_memory: bool = False,
) -> Trajectory:
    """The memoryless rollout of adjoint matching (M30):
    x_{i+1} = x_i + h_i (2 v - kappa_i x_i) + sqrt(h_i) sigma_i xi_i.

    xi_i ~ N(0, I) are drawn in order i = 0..N-2 from ``generator`` (after x_0 when ``x0`` is a shape);
    the last step is noiseless. ``sigma``/``kappa``: [N] (or [N, B]) schedules, default (M29)
    `memoryless_coefficients` (AM uses the uniform grid with N = 40). Inference uses `sample_euler`.
    """
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    grid = validate_grid(ts)
    x = _start(x0, generator)
    fn = _velocity_fn(velocity, cond)
    t_all, h_all = _times(grid, x)
    n = grid.shape[0] - 1
    default_sigma, default_kappa = memoryless_coefficients(grid)
    coefs = {}
    for name, value, default in (("sigma", sigma, default_sigma), ("kappa", kappa, default_kappa)):
        value = default if value is None else torch.as_tensor(value, dtype=torch.float64)
        if value.shape != default.shape:
            raise ValueError(f"{name} must have shape {tuple(default.shape)} (one per step), got {tuple(value.shape)}")
        coefs[name] = value.to(device=x.device, dtype=t_all.dtype)
    w = 1.0 if guidance_scale is None else float(guidance_scale)
    states = _Store(n + 1, x, store_dtype, store_device, pin_memory)
    velocities = _Store(n, x, store_dtype, store_device, pin_memory) if return_velocities else None
    with torch.no_grad():
        states.put(0, x)
        for i in range(n):
            v_uncond, v_cond = _split_cfg(fn(x, t_all[i]), x, guidance_scale)
            if i == n - 1:  # (M30): the last step is noiseless
                noise, sigma_i = torch.zeros_like(x), torch.zeros_like(coefs["sigma"][i])
            else:
                noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
                sigma_i = coefs["sigma"][i]
            v, x, _ = cfg_euler(
                v_uncond, v_cond, x, w, h_all[i], t_all[i],
                mode="memoryless", kappa=coefs["kappa"][i], sigma=sigma_i, noise=noise,
            )  # fmt: skip
            states.put(i + 1, x)
            if velocities is not None:
                velocities.put(i, v)
    return Trajectory(states.done(), grid, velocities.done() if velocities is not None else None)


# ---------------------------------------------------------------- VGG-Flow subsampling (M22)
def subsample_transitions(
    num_steps: int,
    batch_size: int,
    generator: torch.Generator | None = None,
    fraction: float = 0.25,
) -> list[list[int]]:
    """Per trajectory, the transition indices I = [N-1] + [i_0, ..., i_{n_bin-1}] (M22).

    n_bin = round(fraction N) (at least 1); bin k = {floor(kN/n_bin) .. floor((k+1)N/n_bin) - 1};
    i_k ~ U(bin k), i_k <- max(i_k, 1); drawn independently per trajectory from ``generator``;
    duplicates kept, so every list has n_bin + 1 entries.
    """
    n = _check_steps(num_steps, minimum=2)
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    n_bin = max(1, round(fraction * n))
    lows = torch.tensor([k * n // n_bin for k in range(n_bin)])
    highs = torch.tensor([(k + 1) * n // n_bin for k in range(n_bin)])  # exclusive
    u = torch.rand((batch_size, n_bin), generator=generator, dtype=torch.float64)
    picks = (lows + (u * (highs - lows)).floor().long()).clamp(min=1)
    return [[n - 1, *row] for row in picks.tolist()]

"""The Trainer's random streams (layer L6), in one place: who draws what, their checkpointed state, and the rewind
of an update that is skipped or fails.

- ``data``: x0 ~ N(0, I) and the conditioning of every update (seed ``config.seed``), identical on every process,
  so W processes of batch B draw exactly the x0 of one process of batch W B.
- ``process``: the per-process randomness handed to ``method.rollout`` (memoryless AM's noise, M30) and the
  residual probe (M41); seed ``config.seed + 1_000_003 (process index + 1)``.
- ``method``: the method's own generator if it has one (VGG-Flow's subsampling M22, ReFL's steps, DRaFT's K,
  memoryless AM's transitions); reseeded on processes > 0 (offset by the process index).
- the global generators (torch CPU and CUDA, Python's ``random``, NumPy), which a model or reward may draw from.

A skipped update (non-finite reward, loss or gradient) rewinds every stream except ``data`` to where the update
began, so the applied updates see one unbroken sequence of draws whatever was skipped, and the next update still
gets fresh x0 (a deterministic poison is not drawn again). An update that raises rewinds ``data`` too: the trainer
is then exactly as before the call.
"""

from __future__ import annotations

import random
import warnings
from typing import Any

import torch

__all__ = ["PROCESS_SEED_STRIDE", "RandomStreams"]

PROCESS_SEED_STRIDE = 1_000_003  # per-process random streams: seed + stride * (process index + 1)


class RandomStreams:
    """The generators of one training process (see the module docstring)."""

    def __init__(self, seed: int, process_index: int, method_generator: Any = None):
        self.seed, self.index = seed, process_index
        self.data = torch.Generator().manual_seed(seed)
        self.process = torch.Generator().manual_seed(seed + PROCESS_SEED_STRIDE * (process_index + 1))
        self.method = method_generator if isinstance(method_generator, torch.Generator) else None
        if self.method is not None and process_index > 0:
            self.method.manual_seed(self.method.initial_seed() + PROCESS_SEED_STRIDE * process_index)

    # ------------------------------------------------------------ rewind (in memory)
    def snapshot(self) -> dict[str, Any]:
        """Every stream's state, cheaply (a few kB): taken at the start of each update."""
        np = _numpy()
        return {
            "data": self.data.get_state(),
            "process": self.process.get_state(),
            "method": None if self.method is None else self.method.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": _cuda_states(),
            "python": random.getstate(),
            "numpy": None if np is None else np.random.get_state(),
        }

    def rewind(self, snap: dict[str, Any], *, data: bool) -> None:
        """Back to ``snap``; the data stream too only with ``data=True``."""
        if data:
            self.data.set_state(snap["data"])
        self.process.set_state(snap["process"])
        if self.method is not None and snap["method"] is not None:
            self.method.set_state(snap["method"])
        torch.set_rng_state(snap["torch"])
        if snap["cuda"]:
            torch.cuda.set_rng_state_all(snap["cuda"])
        random.setstate(snap["python"])
        np = _numpy()
        if np is not None and snap["numpy"] is not None:
            np.random.set_state(snap["numpy"])

    # ------------------------------------------------------------ checkpoint state
    def process_state(self) -> dict[str, Any]:
        """This process's streams as checkpoint values (tensors and plain values)."""
        return {
            "process_generator": self.process.get_state(),
            "method_generator": None if self.method is None else self.method.get_state(),
            "method_generator_device": None if self.method is None else str(self.method.device),
            "torch": torch.get_rng_state(),
            "cuda": _cuda_states(),
            "python": random.getstate(),
            "numpy": _numpy_state(),
        }

    def check(self, rng: Any) -> None:
        """ValueError if ``rng`` (a checkpoint's ``state['rng']``) cannot be restored into these streams."""
        if not isinstance(rng, dict) or not isinstance(rng.get("processes"), list) or not rng["processes"]:
            raise ValueError("trainer state: RNG states missing")
        entry = rng["processes"][self.index] if self.index < len(rng["processes"]) else None
        if entry is not None and (entry.get("method_generator") is None) != (self.method is None):
            saved = "a" if entry.get("method_generator") is not None else "no"
            now = "one" if self.method is not None else "none"
            raise ValueError(f"incompatible: the checkpoint's method had {saved} random generator, this one has {now}")

    def load(self, rng: dict[str, Any], step: int, *, count: int, is_main: bool) -> None:
        """Restore :meth:`process_state` of this process (and the shared data stream). A process the checkpoint
        does not know (more processes than when it was written) is reseeded from the step."""
        self.data.set_state(rng["generator"])
        saved = rng["processes"]
        entry = saved[self.index] if self.index < len(saved) else None
        if len(saved) != count and is_main:
            warnings.warn(
                f"checkpoint written by {len(saved)} process(es), resumed on {count}: per-process random streams "
                "of new processes are reseeded (the run continues, not bitwise equal to an uninterrupted one)",
                stacklevel=4,
            )
        if entry is None:
            self.process.manual_seed(self.seed + PROCESS_SEED_STRIDE * (self.index + 1) + step)
            return
        self.process.set_state(entry["process_generator"])
        if self.method is not None and entry.get("method_generator") is not None:
            self.method.set_state(entry["method_generator"])
        torch.set_rng_state(entry["torch"])
        cuda_states = entry.get("cuda") or []
        if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        if entry.get("python") is not None:
            random.setstate(entry["python"])
        if entry.get("numpy") is not None:
            _set_numpy_state(entry["numpy"])


def _cuda_states() -> list[torch.Tensor]:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return list(torch.cuda.get_rng_state_all())
    return []


def _numpy():
    try:
        import numpy as np
    except ImportError:
        return None
    return np


def _numpy_state() -> dict[str, Any] | None:
    np = _numpy()
    if np is None:
        return None
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {"name": name, "keys": [int(k) for k in keys], "pos": int(pos), "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached)}  # fmt: skip


def _set_numpy_state(state: dict[str, Any]) -> None:
    np = _numpy()
    if np is None:
        return
    keys = np.asarray(state["keys"], dtype=np.uint32)
    np.random.set_state((state["name"], keys, state["pos"], state["has_gauss"], state["cached_gaussian"]))

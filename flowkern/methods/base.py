"""The Method protocol: what the Trainer (and any caller) may use of an alignment method, and nothing else.

A method is built from callables (``velocity(x, t, cond)``, ``base_velocity(x, t, cond)``, ``reward(x) -> [B]``)
and validates its arguments in its constructor. One update, as the Trainer runs it (docs/design.md, "One update"):

    batch = method.rollout(x0, ts, cond, generator)      on-policy trajectories, no grad
    loss, metrics = method.loss(batch)                   non-finite loss -> the update is skipped
    loss.backward(); optimizer step on theta and method.value_parameters()
    method.after_optimizer_step()                        (VGG-Flow: tau <- quantile of the update's norms, M9)
    or, for a skipped or failed update, method.discard_step()

Everything the Trainer reads is declared here: the attributes ``reward``, ``generator`` (the method's own random
stream, or None; saved, restored and rewound by the Trainer but never replaced) and ``micro_batch``, and the
methods below. :class:`MethodBase` gives the optional hooks their do-nothing defaults; a method written from
scratch must provide them all (``isinstance(obj, Method)`` checks that they exist).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch

__all__ = ["Method", "MethodBase", "missing_members"]


@runtime_checkable
class Method(Protocol):
    reward: Callable[[torch.Tensor], torch.Tensor]
    generator: torch.Generator | None
    micro_batch: int | None

    def rollout(self, x0: torch.Tensor, ts: torch.Tensor, cond: Any = None, generator: torch.Generator | None = None):
        """On-policy trajectories without grad: a dict with 'states' [N+1, B, ...], 'ts' [N+1], 'cond' (and
        optionally 'terminal_reward', r(x_N) when the method computed it anyway)."""

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """(scalar loss whose ``backward()`` writes theta's and phi's gradients, float metrics). A non-finite loss
        means: skip this update (the method has applied nothing)."""

    def value_parameters(self) -> list[torch.nn.Parameter]:
        """phi: the method's own trainable parameters (a value net), disjoint from the model's (M19)."""

    def value_module(self) -> torch.nn.Module | None:
        """The module holding phi (saved and restored by name), or None."""

    def after_optimizer_step(self) -> None:
        """Called once after each applied optimizer step."""

    def discard_step(self) -> None:
        """Called when an update is skipped or raised: forget anything queued by its ``loss`` calls."""

    def share_across_processes(self, gather: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Data parallel: ``gather`` concatenates a tensor over processes (VGG-Flow's tau uses every rank's norms)."""

    def state_dict(self) -> dict:
        """State that changes during training (VGG-Flow's tau), saved in checkpoints."""

    def load_state_dict(self, state: dict) -> None: ...

    def hyperparameters(self) -> dict[str, Any]:
        """Every setting that changes the trajectory of training, JSON-plain (compared on resume)."""


MEMBERS = ("reward", "generator", "micro_batch", "rollout", "loss", "value_parameters", "value_module",
           "after_optimizer_step", "discard_step", "share_across_processes", "state_dict", "load_state_dict",
           "hyperparameters")  # fmt: skip


def missing_members(obj: object) -> list[str]:
    """The members of :class:`Method` that ``obj`` lacks (empty: it follows the protocol)."""
    return [name for name in MEMBERS if not hasattr(obj, name)]


class MethodBase:
    """Defaults for the optional parts of :class:`Method`: no value net, no state, no hooks, no micro-batching.

    ``hyperparameters()`` returns the public attributes that hold plain values (numbers, strings, bools, tuples
    of them; None left out) and are not state: a method's constructor stores its hyperparameters under their own
    names, so this is the list of them without a second copy to keep in step.
    """

    reward: Callable[[torch.Tensor], torch.Tensor]
    generator: torch.Generator | None = None
    micro_batch: int | None = None
    # the rollout's stored states in pinned CPU memory (`flowkern.sampling.host_buffer`), fetched back per use
    offload_trajectory: bool = False

    def trajectory_store(self) -> dict[str, Any]:
        """The samplers' storage options for this method's rollout (``store_device``/``pin_memory``)."""
        return {"store_device": "cpu", "pin_memory": True} if self.offload_trajectory else {}

    def compute_device(self, states: torch.Tensor, ts: torch.Tensor) -> torch.device:
        """Where the loss computes: the grid's device for an offloaded trajectory (the trainer's), else the states'."""
        return ts.device if self.offload_trajectory else states.device

    def value_parameters(self) -> list[torch.nn.Parameter]:
        return []

    def value_module(self) -> torch.nn.Module | None:
        return None

    def after_optimizer_step(self) -> None:
        pass

    def discard_step(self) -> None:
        pass

    def share_across_processes(self, gather: Callable[[torch.Tensor], torch.Tensor]) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} has no state, got keys {sorted(state)}")

    def hyperparameters(self) -> dict[str, Any]:
        state = set(self.state_dict())
        out = {}
        for name, value in sorted(vars(self).items()):
            if name.startswith("_") or name in state or value is None:
                continue
            if isinstance(value, bool | int | float | str) or (
                isinstance(value, tuple) and all(isinstance(v, bool | int | float | str) for v in value)
            ):
                out[name] = list(value) if isinstance(value, tuple) else value
        return out

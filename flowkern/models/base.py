"""The FlowModel protocol: what methods, the sampler and the trainer need from a backbone.

Paper convention throughout (M1): t in [0, 1], t=0 noise, t=1 data, v = dx/dt. Adapters
(SD3, FLUX, SiT, toy) are the only places that convert from a library's convention (M3).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class FlowModel(Protocol):
    """A (fine-tunable) velocity field v_theta(x, t, cond).

    - ``velocity(x, t, cond)``: the CFG-combined velocity in paper time (M5). ``t`` is a 0-dim
      tensor or a [B] tensor. ``cond`` is whatever the adapter needs (prompt embeddings, class
      labels, None); with CFG the adapter holds the guidance scale and batches [uncond; cond].
      ``detach_uncond=True`` detaches the parameter path of the unconditional branch (M5).
    - ``base_velocity()``: context manager inside which ``velocity`` is the frozen base v_base
      (LoRA/residual off), restored on exit even on error.
    - ``trainable_parameters()``: the parameters an optimizer updates (LoRA, residual net).
    """

    def velocity(
        self, x: torch.Tensor, t: torch.Tensor, cond: Any = None, *, detach_uncond: bool = False
    ) -> torch.Tensor: ...

    def base_velocity(self) -> contextlib.AbstractContextManager[None]: ...

    def trainable_parameters(self) -> list[torch.nn.Parameter]: ...


class ResidualFlowModel(torch.nn.Module):
    """v_theta = v_base + residual(x, t): a frozen analytic/pretrained base plus a trainable module.

    The residual network should start at zero output so v_theta == v_base at initialisation.
    Used by the toy (exact Gaussian-mixture base, M38) and by tests with analytic fields.
    """

    def __init__(self, base: torch.nn.Module, residual: torch.nn.Module):
        super().__init__()
        self.base = base
        self.residual = residual
        for p in self.base.parameters():
            p.requires_grad_(False)
        self._residual_on = True

    def velocity(self, x, t, cond=None, *, detach_uncond=False):
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        v = self.base(x, t) if cond is None else self.base(x, t, cond)
        if self._residual_on:
            v = v + (self.residual(x, t) if cond is None else self.residual(x, t, cond))
        return v

    def forward(self, x, t, cond=None):
        return self.velocity(x, t, cond)

    @contextlib.contextmanager
    def base_velocity(self) -> Iterator[None]:
        previous, self._residual_on = self._residual_on, False
        try:
            yield
        finally:
            self._residual_on = previous

    def trainable_parameters(self):
        return [p for p in self.residual.parameters() if p.requires_grad]

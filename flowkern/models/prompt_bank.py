"""A FlowModel whose conditioning is an index into a fixed table of encoded prompts (or class ids).

The methods gather a batch's conditioning by indexing rows (``flowkern.methods._common.gather_cond``) and
VGG-Flow's value net embeds the index: an integer tensor [B] is the simplest conditioning that both can use.
``flowkern.app.build.load_model`` wraps every SD3 / FLUX.1 / SiT adapter in it; the 2-D toy's wrapper is
``flowkern.models.toy.ToyFlow``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["PromptBankFlow"]


class PromptBankFlow(nn.Module):
    """A FlowModel over an adapter (SD3, FLUX, SiT) whose ``cond`` is a LongTensor [B] of indices into a fixed
    table of encoded prompts (or class ids).

    ``velocity(x, t, labels)`` builds the adapter's conditioning from rows ``labels`` of the table (``rows``: one
    row per prompt; ``shared``: one row for every sample, e.g. the negative prompt; ``constants``: e.g.
    ``guidance_scale`` for CFG, M5) and calls the adapter, so rollouts, losses and adjoints go through it exactly
    as without the wrapper. Indexing makes the conditioning gatherable by the methods and the value net.
    """

    def __init__(
        self,
        flow: nn.Module,
        cond_class: type,
        rows: dict[str, torch.Tensor],
        shared: dict[str, torch.Tensor] | None = None,
        constants: dict[str, Any] | None = None,
        prompts: Sequence[str] = (),
    ):
        super().__init__()
        self.flow = flow
        self.cond_class = cond_class
        if not rows:
            raise ValueError("PromptBankFlow needs at least one per-prompt tensor")
        sizes = {v.shape[0] for v in rows.values()}
        if len(sizes) != 1:
            raise ValueError(f"every per-prompt tensor needs the same number of rows, got {sorted(sizes)}")
        self._rows, self._shared = list(rows), list(shared or {})
        for name, value in {**rows, **{k: v[:1] for k, v in (shared or {}).items()}}.items():
            self.register_buffer(name, value, persistent=False)
        self.constants = dict(constants or {})
        self.num_prompts = sizes.pop()
        self.prompts = list(prompts) or [f"prompt {i}" for i in range(self.num_prompts)]

    @property
    def guidance_scale(self) -> float | None:
        return self.constants.get("guidance_scale")

    def conditioning(self, labels: torch.Tensor):
        if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int32, torch.int64) or labels.dim() != 1:
            raise TypeError(f"cond must be an integer tensor [B] of prompt indices, got {_describe(labels)}")
        first = getattr(self, self._rows[0])
        labels = labels.to(first.device)
        fields = {name: getattr(self, name)[labels] for name in self._rows}
        b = labels.shape[0]
        fields.update({name: getattr(self, name).expand(b, *getattr(self, name).shape[1:]) for name in self._shared})
        return self.cond_class(**fields, **self.constants)

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None, *, detach_uncond: bool = False):
        return self.flow.velocity(x, t, self.conditioning(cond), detach_uncond=detach_uncond)

    def forward(self, x, t, cond=None):
        return self.velocity(x, t, cond)

    def base_velocity(self) -> contextlib.AbstractContextManager[None]:
        return self.flow.base_velocity()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.flow.trainable_parameters()

    def save_lora(self, path: str | os.PathLike) -> str:
        return self.flow.save_lora(path)


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor {tuple(x.shape)} {x.dtype}"
    return type(x).__name__

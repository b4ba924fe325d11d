"""VGG-Flow's value network as a LoRA copy of the backbone (M11, M19; the "LoRA copy" option of the methods issue).

``TransformerValueNet(model)`` gives ``c_phi(x, t, cond) = v_copy(x, t, cond) - v_copy_base(x, t, cond)``, in velocity
units like the residual it models (M11), where ``v_copy`` is the adapter's CFG-combined velocity through a copy of the
transformer carrying its own LoRA (phi) and ``v_copy_base`` a second copy without any LoRA (no adapter switching, so
it also works inside ``torch.func`` transforms). With LoRA's B = 0 at
initialisation, c_phi starts at exactly zero, as the small network's zero-initialised output layer does.

- Both copies *share* every frozen base weight with the policy's transformer (``copy.deepcopy`` with those tensors
  in the memo), so they cost the LoRA parameters only, not a second backbone. The policy's own LoRA layers (theta),
  if any, are replaced in the copy by their base layers, so theta and phi stay disjoint (M19).
- Both terms keep their dependence on x and t (the frozen base term has no trainable parameter but is not
  detached): 'exact' consistency (M21) differentiates c_phi in x and t, and the difference must be the whole map.
- Cost: two backbone calls per value evaluation (CFG: two branches each).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from flowkern.models.lora import DEFAULT_TARGETS, add_lora


def _base_layers_only(module: nn.Module) -> None:
    """Replace every peft tuner layer below ``module`` by its wrapped base layer, in place."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, child in list(module.named_children()):
        if isinstance(child, BaseTunerLayer):
            setattr(module, name, child.get_base_layer())
        else:
            _base_layers_only(child)


def shared_base_copy(transformer: nn.Module) -> nn.Module:
    """A copy of ``transformer`` whose frozen (non-LoRA) parameters and buffers *are* the original's tensors and
    which carries no LoRA layer."""
    memo: dict[int, Any] = {}
    for name, p in transformer.named_parameters():
        if "lora_" not in name:
            memo[id(p)] = p
    for b in transformer.buffers():
        memo[id(b)] = b
    clone = copy.deepcopy(transformer, memo)
    _base_layers_only(clone)
    for attr in ("peft_config", "_hf_peft_config_loaded"):  # the copy's peft bookkeeping starts empty
        if attr in clone.__dict__:
            delattr(clone, attr)
    return clone


class TransformerValueNet(nn.Module):
    """c_phi as a LoRA copy of a diffusers-backed FlowModel (SD3, FLUX, FLUX.2, SiT adapters).

    Args:
        model: the adapter (an object with a ``transformer`` submodule, ``velocity(x, t, cond)`` and
            ``base_velocity()``); not modified.
        rank, alpha, target_modules: the value LoRA (alpha defaults to rank; targets default to
            ``to_q, to_k, to_v, to_out.0``).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        rank: int = 16,
        alpha: float | None = None,
        target_modules: Sequence[str] = DEFAULT_TARGETS,
    ):
        super().__init__()
        transformer = getattr(model, "transformer", None)
        if not isinstance(model, nn.Module) or not isinstance(transformer, nn.Module):
            raise TypeError(
                "model must be a flowkern diffusers adapter (an nn.Module with a .transformer), "
                f"got {type(model).__name__}"
            )
        for name in ("velocity", "base_velocity"):
            if not callable(getattr(model, name, None)):
                raise TypeError(f"model must provide {name}() (FlowModel), got {type(model).__name__}")
        self.flow = _adapter_with(model, shared_base_copy(transformer))  # v_copy: base + the value LoRA (phi)
        self.base_flow = _adapter_with(model, shared_base_copy(transformer))  # v_copy_base: no LoRA at all
        add_lora(self.flow.transformer, rank, alpha, target_modules)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        return self.flow.velocity(x, t, cond) - self.base_flow.velocity(x, t, cond)


def _adapter_with(model: nn.Module, transformer: nn.Module) -> nn.Module:
    """A shallow copy of the adapter (its settings: guidance, checkpointing, time scale) around ``transformer``."""
    flow = copy.copy(model)
    for table in ("_modules", "_parameters", "_buffers"):  # its own module tables, so the original is untouched
        flow.__dict__[table] = dict(model.__dict__[table])
    flow.transformer = transformer
    return flow

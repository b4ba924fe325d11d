"""Alignment methods (layer L4): VGG-Flow, adjoint matching (deterministic/truncated and memoryless), ReFL, DRaFT.

Each takes callables and tensors, never a model class (design.md section 1): ``velocity(x, t, cond)``,
``base_velocity(x, t, cond)``, ``reward(x) -> [B]`` (``flow_callables(model)`` builds the first two from a
FlowModel). Common interface: ``rollout(x0, ts, cond, generator) -> batch``, ``loss(batch) -> (loss, metrics)``,
``value_parameters()``; VGG-Flow adds ``after_optimizer_step()`` (tau, M9) and ``discard_step()``.
"""

from flowkern.methods._common import flow_callables
from flowkern.methods.adjoint_matching import AdjointMatching
from flowkern.methods.draft import DRaFT
from flowkern.methods.refl import ReFL
from flowkern.methods.vggflow import SmallValueNet, VGGFlow

__all__ = ["AdjointMatching", "DRaFT", "ReFL", "SmallValueNet", "VGGFlow", "flow_callables"]

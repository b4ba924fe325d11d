"""Alignment methods (layer L4): VGG-Flow, adjoint matching (deterministic/truncated and memoryless), ReFL, DRaFT.

Each takes callables and tensors, never a model class (design.md section 1): ``velocity(x, t, cond)``,
``base_velocity(x, t, cond)``, ``reward(x) -> [B]`` (``flow_callables(model)`` builds the first two from a
FlowModel). Each follows the :class:`~flowkern.methods.base.Method` protocol (``rollout``, ``loss``, hooks, state,
``hyperparameters``) through :class:`~flowkern.methods.base.MethodBase`; :mod:`flowkern.methods.registry` builds
them by name from a run's settings.
"""

from flowkern.methods._common import flow_callables
from flowkern.methods.adjoint_matching import AdjointMatching
from flowkern.methods.base import Method, MethodBase
from flowkern.methods.draft import DRaFT
from flowkern.methods.refl import ReFL
from flowkern.methods.vggflow import SmallValueNet, VGGFlow

__all__ = ["AdjointMatching", "DRaFT", "Method", "MethodBase", "ReFL", "SmallValueNet", "VGGFlow", "flow_callables"]

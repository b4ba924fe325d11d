"""Training loop (layer L6): :class:`Trainer` and :class:`TrainConfig`."""

from flowkern.train.config import TrainConfig
from flowkern.train.trainer import Trainer

__all__ = ["TrainConfig", "Trainer"]

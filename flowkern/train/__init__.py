"""Training loop (layer L6): :class:`Trainer`, :class:`TrainConfig`, checkpoints and data-parallel support."""

from flowkern.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from flowkern.train.config import TrainConfig
from flowkern.train.trainer import Trainer

__all__ = ["TrainConfig", "Trainer", "latest_checkpoint", "list_checkpoints", "load_checkpoint", "save_checkpoint"]

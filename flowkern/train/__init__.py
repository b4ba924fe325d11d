"""Training loop (layer L6): :class:`Trainer`, :class:`TrainConfig`, checkpoints and data-parallel support."""

from flowkern.train.checkpoint import DamagedCheckpoint, latest_checkpoint, list_checkpoints
from flowkern.train.config import TrainConfig
from flowkern.train.lock import RunDirectoryBusy
from flowkern.train.trainer import Trainer, load_checkpoint, save_checkpoint

__all__ = [
    "DamagedCheckpoint",
    "RunDirectoryBusy",
    "TrainConfig",
    "Trainer",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "save_checkpoint",
]

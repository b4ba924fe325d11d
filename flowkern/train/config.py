"""Training configuration (layer L6): one dataclass, validated on construction."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

MAX_SEED = 2**63 - 1  # torch seeds are 64-bit; per-process streams add small offsets (flowkern.train.rng)


@dataclass
class TrainConfig:
    """Settings of :class:`flowkern.train.Trainer` (math.md section 3 defaults table where it applies).

    batch_size: trajectories per micro-batch (on-policy, no replay); grad_accum_steps micro-batches per
    update, so an update sees batch_size * grad_accum_steps trajectories.
    num_steps, time_grid, shift: the sampler's grid (M2, M4): 'uniform' or 'shifted' (SD3 map, shift S).
    lr / value_lr: AdamW learning rates of theta (flow model) and phi (value net; default lr); betas,
    weight_decay, eps as AdamW. lr_schedule: 'constant' or 'cosine' (from lr down to lr * lr_min_ratio over
    num_updates applied steps), after warmup_updates of linear warm-up.
    grad_clip: max grad norm per parameter group (M19 update), None = off.
    residual_probe: log E||v_theta - v_base||^2 at one transition per trajectory drawn with probability h_i
    (an estimate of int_0^1 E||v_theta - v_base||^2 dt, M41); 0 disables, n > 0 probes n trajectories.
    checkpoint_every: with ``Trainer.train(checkpoint_dir=...)``, a checkpoint every k updates (0: only after the
    last update); keep_checkpoints: how many of the newest complete checkpoints to keep (0 = all).
    extra: JSON-plain settings the trainer cannot see (e.g. the reward spec, the data): saved with every checkpoint
    and compared on resume like the other fields (:meth:`flowkern.train.Trainer.settings`).
    """

    batch_size: int = 32
    grad_accum_steps: int = 1
    num_updates: int = 400
    num_steps: int = 20
    time_grid: str = "uniform"
    shift: float = 3.0
    lr: float = 5e-4
    value_lr: float | None = None
    lr_schedule: str = "constant"
    lr_min_ratio: float = 0.0
    warmup_updates: int = 0
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-2
    eps: float = 1e-8
    grad_clip: float | None = 1.0
    residual_probe: int = 8
    seed: int = 0
    log_every: int = 0
    checkpoint_every: int = 0
    keep_checkpoints: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in ("batch_size", "grad_accum_steps", "num_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be an int >= 1, got {value!r}")
        for name in (
            "num_updates", "residual_probe", "log_every", "seed", "warmup_updates", "checkpoint_every",
            "keep_checkpoints",
        ):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"TrainConfig.{name} must be an int >= 0, got {value!r}")
        if self.seed > MAX_SEED:
            raise ValueError(f"TrainConfig.seed must be <= 2**63 - 1, got {self.seed!r}")
        if not isinstance(self.extra, dict) or not all(isinstance(k, str) for k in self.extra):
            raise ValueError(f"TrainConfig.extra must be a dict with str keys, got {self.extra!r}")
        if self.time_grid not in ("uniform", "shifted"):
            raise ValueError(f"TrainConfig.time_grid must be 'uniform' or 'shifted', got {self.time_grid!r}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"TrainConfig.lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if not (isinstance(self.lr_min_ratio, int | float) and 0 <= self.lr_min_ratio <= 1):
            raise ValueError(f"TrainConfig.lr_min_ratio must be in [0, 1], got {self.lr_min_ratio!r}")
        _positive("shift", self.shift)
        _positive("lr", self.lr)
        if self.value_lr is not None:
            _positive("value_lr", self.value_lr)
        _positive("eps", self.eps)
        if self.grad_clip is not None:
            _positive("grad_clip", self.grad_clip)
        if not (isinstance(self.weight_decay, int | float) and math.isfinite(self.weight_decay)) or (
            self.weight_decay < 0
        ):
            raise ValueError(f"TrainConfig.weight_decay must be finite and >= 0, got {self.weight_decay!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"TrainConfig.betas must be two floats in [0, 1), got {self.betas!r}")
        self.betas = (float(self.betas[0]), float(self.betas[1]))

    def to_dict(self) -> dict:
        return asdict(self)


def _positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"TrainConfig.{name} must be a finite number > 0, got {value!r}")

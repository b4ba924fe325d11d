"""The reward interface: ``reward(images_in_0_1 [B, 3, H, W], prompts: list[str]) -> [B]`` (docs/ecosystem.md (c)).

Images are ``decode(x) / 2 + 0.5`` and must lie in [0, 1] up to `RANGE_TOLERANCE` (a decoder's rounding);
rewards are frozen modules, differentiable with respect to the pixels (M7), and return fp32 scores (fp64 for
an fp64 model).
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence

import torch
from torch import nn

__all__ = ["RANGE_TOLERANCE", "Reward", "WeightedReward", "validate_images", "validate_prompts"]

RANGE_TOLERANCE = 1e-3  # images may overshoot [0, 1] by this much (VAE rounding); more is a caller error


def validate_images(images: object, name: str = "images", tolerance: float = RANGE_TOLERANCE) -> torch.Tensor:
    """Check ``images`` is a floating [B, 3, H, W] tensor with finite values in [0, 1] (+- ``tolerance``)."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [B, 3, H, W] in [0, 1], got {type(images).__name__}")
    if not images.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor in [0, 1] (not uint8 0..255), got {images.dtype}")
    if images.dim() != 4 or images.shape[1] != 3 or images.shape[0] < 1:
        raise ValueError(f"{name} must have shape [B, 3, H, W] (RGB, channels first), got {tuple(images.shape)}")
    with torch.no_grad():
        lo, hi = images.detach().aminmax()
        if not bool(torch.isfinite(lo)) or not bool(torch.isfinite(hi)):
            raise ValueError(f"{name} contains NaN or inf")
        if lo < -tolerance or hi > 1 + tolerance:
            raise ValueError(
                f"{name} must lie in [0, 1] (decode(x) / 2 + 0.5), got values in [{lo.item():.4g}, {hi.item():.4g}]"
            )
    return images


def validate_prompts(prompts: object, batch: int) -> list[str]:
    """Check ``prompts`` is a list of ``batch`` strings."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a list of strings, got {type(prompts).__name__}")
    prompts = list(prompts)
    if not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must all be strings")
    if len(prompts) != batch:
        raise ValueError(f"got {len(prompts)} prompts for a batch of {batch} images")
    return prompts


class Reward(nn.Module, abc.ABC):
    """Base class: frozen, eval-mode; subclasses implement ``score(images, prompts) -> [B]`` on validated inputs."""

    needs_prompts = True

    def freeze(self) -> Reward:
        self.eval()
        self.requires_grad_(False)
        return self

    def train(self, mode: bool = True) -> Reward:  # rewards stay in eval mode (no dropout)
        return super().train(False)

    @abc.abstractmethod
    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """[B] scores of validated images in [0, 1]; subclasses define it."""

    def forward(self, images: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
        images = validate_images(images)
        if prompts is None:
            if self.needs_prompts:
                raise ValueError(f"{type(self).__name__} needs one prompt per image")
            prompts = [""] * images.shape[0]
        prompts = validate_prompts(prompts, images.shape[0])
        out = self.score(images, prompts)
        return out if out.dtype == torch.float64 else out.float()  # fp32 scores (fp64 kept for gradcheck)


class WeightedReward(Reward):
    """sum_k weight_k * reward_k(images, prompts); the last per-reward outputs (detached) in ``last_outputs``."""

    def __init__(self, rewards: Mapping[str, Reward], weights: Mapping[str, float] | None = None):
        super().__init__()
        if not rewards:
            raise ValueError("WeightedReward needs at least one reward")
        weights = dict(weights or {name: 1.0 for name in rewards})
        if set(weights) != set(rewards):
            raise ValueError(f"weights keys {sorted(weights)} must equal rewards keys {sorted(rewards)}")
        self.rewards = nn.ModuleDict(dict(rewards))
        self.weights = {k: float(v) for k, v in weights.items()}
        self.needs_prompts = any(getattr(r, "needs_prompts", True) for r in rewards.values())
        self.last_outputs: dict[str, torch.Tensor] = {}

    def components(self, images: torch.Tensor, prompts: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Each reward's [B] output (with graph), by name."""
        return {name: reward(images, prompts) for name, reward in self.rewards.items()}

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        parts = self.components(images, prompts)
        self.last_outputs = {name: v.detach() for name, v in parts.items()}
        return sum(self.weights[name] * v for name, v in parts.items())

"""Differentiable, frozen reward models (layer L5): ``reward(images_in_0_1 [B, 3, H, W], prompts) -> [B]``."""

from __future__ import annotations

from flowkern.rewards.base import RANGE_TOLERANCE, Reward, WeightedReward, validate_images, validate_prompts
from flowkern.rewards.clip import AestheticHead, AestheticReward, CLIPScoreReward, load_clip
from flowkern.rewards.preprocess import CLIP_MEAN, CLIP_STD, apply_clamp, clip_preprocess

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "RANGE_TOLERANCE",
    "REWARDS",
    "AestheticHead",
    "AestheticReward",
    "CLIPScoreReward",
    "Reward",
    "WeightedReward",
    "apply_clamp",
    "build_reward",
    "clip_preprocess",
    "load_clip",
    "validate_images",
    "validate_prompts",
]

REWARDS = {"aesthetic": AestheticReward, "clipscore": CLIPScoreReward}


def build_reward(name: str, *args, **kwargs) -> Reward:
    """``REWARDS[name].from_pretrained(*args, **kwargs)``; an unknown name raises a ValueError listing the known."""
    key = name.lower().replace("-", "").replace("_", "") if isinstance(name, str) else name
    if key not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; known: {sorted(REWARDS)}")
    return REWARDS[key].from_pretrained(*args, **kwargs)

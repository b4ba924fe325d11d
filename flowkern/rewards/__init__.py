"""Differentiable, frozen reward models (layer L5): ``reward(images_in_0_1 [B, 3, H, W], prompts) -> [B]``."""

from __future__ import annotations

from collections.abc import Mapping

from flowkern.rewards.base import RANGE_TOLERANCE, Reward, WeightedReward, validate_images, validate_prompts
from flowkern.rewards.clip import (
    AestheticHead,
    AestheticReward,
    CLIPScoreReward,
    layer_checkpointing_enabled,
    load_clip,
    set_layer_checkpointing,
)
from flowkern.rewards.convert import imagereward_to_transformers, open_clip_to_transformers
from flowkern.rewards.hps import HPSReward, HPSv21Reward, clip_from_open_clip
from flowkern.rewards.image_reward import ImageRewardModel, ImageRewardReward, load_blip_tokenizer
from flowkern.rewards.pickscore import PickScoreReward
from flowkern.rewards.preprocess import CLIP_MEAN, CLIP_STD, apply_clamp, clip_preprocess
from flowkern.rewards.registry import REGISTRY, make_reward, reward_entry, reward_names

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "RANGE_TOLERANCE",
    "REGISTRY",
    "REWARDS",
    "AestheticHead",
    "AestheticReward",
    "CLIPScoreReward",
    "HPSReward",
    "HPSv21Reward",
    "ImageRewardModel",
    "ImageRewardReward",
    "PickScoreReward",
    "Reward",
    "WeightedReward",
    "apply_clamp",
    "build_reward",
    "build_weighted_reward",
    "clip_from_open_clip",
    "clip_preprocess",
    "imagereward_to_transformers",
    "layer_checkpointing_enabled",
    "load_blip_tokenizer",
    "load_clip",
    "make_reward",
    "open_clip_to_transformers",
    "reward_entry",
    "reward_names",
    "set_layer_checkpointing",
    "validate_images",
    "validate_prompts",
]

REWARDS = {name: REGISTRY[name].make.__self__ for name in reward_names("image", weights=True)}  # name -> class


def build_reward(name: str, *args, **kwargs) -> Reward:
    """The reward ``name`` of :data:`flowkern.rewards.registry.REGISTRY` (``from_pretrained(*args, **kwargs)`` for
    the model-based ones); an unknown name raises a ValueError listing the known. Names ignore case, ``-`` and ``_``
    (``"HPS-v2.1"`` is ``"hpsv2.1"``)."""
    return make_reward(name, *args, **kwargs)


def build_weighted_reward(specs: Mapping[str, Mapping]) -> WeightedReward:
    """``{label: {"name": reward name (default: label), "weight": float (default 1), "args": [...], **kwargs}}``
    -> `WeightedReward` of ``build_reward(name, *args, **kwargs)`` per label. All names are checked first."""
    if not isinstance(specs, Mapping) or not specs:
        raise ValueError("specs must be a non-empty mapping {label: {'name': ..., 'weight': ..., ...}}")
    parsed = {}
    for label, spec in specs.items():
        if not isinstance(spec, Mapping):
            raise TypeError(f"specs[{label!r}] must be a mapping, got {type(spec).__name__}")
        spec = dict(spec)
        entry = reward_entry(spec.pop("name", label))
        weight = float(spec.pop("weight", 1.0))
        args = spec.pop("args", ())
        parsed[label] = (entry, weight, list(args), spec)
    rewards = {label: entry.make(*args, **kw) for label, (entry, _, args, kw) in parsed.items()}
    return WeightedReward(rewards, {label: weight for label, (_, weight, _, _) in parsed.items()})

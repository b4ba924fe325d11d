"""The one registry of rewards: name -> how to build it, what it scores, whether it needs weights.

- ``image`` rewards score images in [0, 1]: ``reward(images [B, 3, H, W], prompts) -> [B]``. The model-based ones
  (HPSv2, ImageReward, PickScore, CLIPScore, aesthetic) load their weights with ``from_pretrained(*paths,
  **kwargs)``; the pixel rewards (redness, brightness) have none.
- ``toy`` rewards score the 2-D toy's samples: ``r(x [B, 2]) -> [B]`` (``flowkern.models.toy``).

``flowkern.rewards.build_reward(name, *args, **kwargs)``, the CLI's ``--reward NAME[:WEIGHT]`` and the demo all
look names up here (case, ``-`` and ``_`` ignored). To add a reward: write it (docs/design.md, "Adding a
reward"), then add one :class:`RewardEntry` below.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flowkern.models.toy import BumpReward, LinearReward
from flowkern.rewards.clip import AestheticReward, CLIPScoreReward
from flowkern.rewards.hps import HPSReward, HPSv21Reward
from flowkern.rewards.image_reward import ImageRewardReward
from flowkern.rewards.pickscore import PickScoreReward
from flowkern.rewards.toy_image import BrightnessReward, RednessReward

__all__ = ["REGISTRY", "RewardEntry", "make_reward", "reward_entry", "reward_names"]


@dataclass(frozen=True)
class RewardEntry:
    """``make(*args, **kwargs)`` builds the reward; ``domain`` is 'image' or 'toy'; ``weights``: it needs files
    (``make(*paths)``), so the CLI asks for ``--reward-source NAME=PATH``."""

    name: str
    make: Callable[..., Any]
    domain: str
    weights: bool


REGISTRY: dict[str, RewardEntry] = {
    e.name: e
    for e in (
        RewardEntry("aesthetic", AestheticReward.from_pretrained, "image", True),
        RewardEntry("clipscore", CLIPScoreReward.from_pretrained, "image", True),
        RewardEntry("hpsv2", HPSReward.from_pretrained, "image", True),
        RewardEntry("hpsv2.1", HPSv21Reward.from_pretrained, "image", True),
        RewardEntry("imagereward", ImageRewardReward.from_pretrained, "image", True),
        RewardEntry("pickscore", PickScoreReward.from_pretrained, "image", True),
        RewardEntry("redness", RednessReward.from_pretrained, "image", False),
        RewardEntry("brightness", BrightnessReward.from_pretrained, "image", False),
        # the toy's rewards (docs/results.md, "The toy with ground truth"): toward the ring's right-hand mode
        RewardEntry("linear", lambda: LinearReward((1.0, 0.0)), "toy", False),
        RewardEntry("bump", lambda: BumpReward((4.0, 0.0), 1.5, 2.0), "toy", False),
    )
}


def reward_entry(name: object) -> RewardEntry:
    """The entry of ``name`` (case, ``-`` and ``_`` ignored); ValueError listing the known names."""
    key = name.lower().replace("-", "").replace("_", "") if isinstance(name, str) else name
    if key not in REGISTRY:
        raise ValueError(f"unknown reward {name!r}; known: {sorted(REGISTRY)}")
    return REGISTRY[key]


def reward_names(domain: str | None = None, *, weights: bool | None = None) -> list[str]:
    """Registered names, optionally only one domain ('image' | 'toy') and with (or without) weights."""
    return [
        e.name
        for e in REGISTRY.values()
        if (domain is None or e.domain == domain) and (weights is None or e.weights == weights)
    ]


def make_reward(name: str, *args, **kwargs) -> Any:
    """Build the reward ``name`` (``from_pretrained(*args, **kwargs)`` for the model-based ones)."""
    return reward_entry(name).make(*args, **kwargs)

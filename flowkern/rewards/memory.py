"""Measured memory of a reward's score + gradient with respect to the images, for a memory planner.

Numbers from ``python -m benchmarks.rewards_memory`` (benchmarks/results/rewards/memory.json; exact CPU
allocator peaks, fp32 weights and activations, random weights, images at the tower's own resolution, prompts
cached): peak bytes above the level before the call, weights excluded, fitted as ``fixed + per_image * B``
from B = 1 and B = 4. tests/test_rewards_memory.py checks this table against the JSON.

A bf16 tower holds roughly half the activation bytes; that scaling is an estimate, not a measurement.
"""

from __future__ import annotations

__all__ = ["REWARD_TOWERS", "TOWERS", "fit_fixed_per_image", "reward_grad_peak_bytes"]

# tower -> (image size, {checkpoint: (fixed bytes, bytes per image)}); fixed is ~0 (weights excluded, prompts
# cached): a few negative bytes are the fit's rounding, peak(B) reproduces the measured B = 1 and B = 4 to < 2 bytes
TOWERS: dict[str, tuple[int, dict[bool, tuple[int, int]]]] = {
    "vit-h-14": (224, {False: (20, 436241928), True: (161812, 68485208)}),
    "blip-224": (224, {False: (-763729, 270996585), True: (121556, 36925072)}),
    "blip-384": (384, {False: (-4727889, 1103327305), True: (3272745, 133295475)}),
    "vit-l-14": (224, {False: (212, 370285448), True: (121556, 55063640)}),
}

# reward name (flowkern.rewards.REWARDS) -> the tower its gradient runs through
REWARD_TOWERS = {
    "hpsv2": "vit-h-14",
    "hpsv2.1": "vit-h-14",
    "pickscore": "vit-h-14",
    "aesthetic": "vit-l-14",
    "clipscore": "vit-l-14",
    "imagereward": "blip-224",
}


def fit_fixed_per_image(peak_a: int, peak_b: int, batch_a: int, batch_b: int) -> tuple[int, int]:
    """(fixed, per_image) bytes of the line through (batch_a, peak_a) and (batch_b, peak_b)."""
    if batch_a == batch_b:
        raise ValueError("the two batch sizes must differ")
    per_image = round((peak_b - peak_a) / (batch_b - batch_a))
    return int(peak_a - per_image * batch_a), int(per_image)


def reward_grad_peak_bytes(reward_or_tower: str, batch: int, checkpoint: bool) -> int:
    """Peak bytes of ``reward(images, prompts)`` + ``autograd.grad`` to the images at ``batch`` images (fp32,
    weights excluded): a reward name of `REWARD_TOWERS` or a tower of `TOWERS`."""
    tower = REWARD_TOWERS.get(reward_or_tower, reward_or_tower)
    if tower not in TOWERS:
        raise ValueError(f"no measured tower {reward_or_tower!r}; known: {sorted(TOWERS) + sorted(REWARD_TOWERS)}")
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    fixed, per_image = TOWERS[tower][1][bool(checkpoint)]
    return fixed + per_image * batch

"""Differentiable pixel rewards for the embedded demo model's small RGB images (no weights, no downloads).

Both follow the reward interface (``reward(images_in_0_1 [B, 3, H, W], prompts) -> [B]``) and ignore prompts:

- ``redness``: mean over pixels of R - (G + B) / 2, in [-1, 1]. On the demo's shapes it rewards turning the
  shape and background red without saying how, so a regularised method has to trade it against staying
  close to the base model (a good test of reward hacking vs prior preservation).
- ``brightness``: mean Rec. 601 luma 0.299 R + 0.587 G + 0.114 B, in [0, 1].
"""

from __future__ import annotations

import torch

from flowkern.rewards.base import Reward

__all__ = ["BrightnessReward", "RednessReward"]

LUMA = (0.299, 0.587, 0.114)  # Rec. 601


class _PixelReward(Reward):
    needs_prompts = False

    def __init__(self):
        super().__init__()
        self.freeze()

    @classmethod
    def from_pretrained(cls, *args, **kwargs) -> _PixelReward:
        """No weights: the same signature as the model-based rewards so ``build_reward(name)`` can build it."""
        if args or kwargs:
            raise TypeError(f"{cls.__name__} has no weights and takes no arguments, got {args!r} {kwargs!r}")
        return cls()


class RednessReward(_PixelReward):
    """r = mean_pixels(R - (G + B) / 2), in [-1, 1]."""

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        r, g, b = images.unbind(1)
        return (r - 0.5 * (g + b)).flatten(1).mean(1)


class BrightnessReward(_PixelReward):
    """r = mean_pixels(0.299 R + 0.587 G + 0.114 B), in [0, 1]."""

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        weights = torch.tensor(LUMA, dtype=images.dtype, device=images.device)
        return torch.einsum("bchw,c->bhw", images, weights).flatten(1).mean(1)

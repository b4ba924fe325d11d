"""PickScore (Kirstain et al., 2023): a CLIP ViT-H/14 fine-tuned on Pick-a-Pic preferences
(docs/ecosystem.md (c)). Weights ``yuvalkirstain/PickScore_v1`` (a transformers `CLIPModel`); processor and
tokenizer of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (224 px, CLIP mean/std, CLIPImageProcessor crop).

score = ``logit_scale.exp() * cos(image_emb, text_emb)``: the paper's raw preference logit (about 18-24 on
real images), not the softmax over a set of images.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from flowkern.rewards.clip import CLIPScoreReward, _load_tokenizer, load_clip

__all__ = ["PICKSCORE_MODEL", "PICKSCORE_PROCESSOR", "PickScoreReward"]

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


class PickScoreReward(CLIPScoreReward):
    """``logit_scale.exp() * cos``: `CLIPScoreReward` whose scale is the model's own learned temperature."""

    def __init__(self, clip: nn.Module, tokenizer, *, clamp: str = "hard", size: int | None = None, **kwargs):
        if "scale" in kwargs:
            raise TypeError("PickScoreReward takes its scale from the model's logit_scale; do not pass scale=")
        super().__init__(clip, tokenizer, scale=1.0, clamp=clamp, size=size, **kwargs)

    @property
    def logit_scale(self) -> torch.Tensor:
        """exp(logit_scale) in fp32 (fp64 for an fp64 model)."""
        s = self.clip.logit_scale
        return s.double().exp() if s.dtype == torch.float64 else s.float().exp()

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike | nn.Module = PICKSCORE_MODEL,
        *,
        tokenizer=None,
        local_files_only: bool = False,
        torch_dtype: torch.dtype | None = None,
        **kwargs,
    ) -> PickScoreReward:
        """``model``: hub id (default ``yuvalkirstain/PickScore_v1``), local directory or `CLIPModel`.
        ``tokenizer``: object, directory or hub id; default: the laion ViT-H-14 processor for the hub model,
        else the model directory."""
        clip = load_clip(model, local_files_only=local_files_only, torch_dtype=torch_dtype)
        if tokenizer is None and isinstance(model, str) and model == PICKSCORE_MODEL:
            tokenizer = PICKSCORE_PROCESSOR
        return cls(clip, _load_tokenizer(tokenizer, model, local_files_only), **kwargs)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        img = self.image_features(images)
        txt = self.text_features(prompts).to(device=img.device, dtype=img.dtype)
        return self.logit_scale.to(img.device, img.dtype) * (img * txt).sum(-1)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Model and tokenizer into ``directory`` (loadable with ``from_pretrained(directory)``)."""
        self.clip.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)

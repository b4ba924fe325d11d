"""Tensor-only, differentiable CLIP preprocessing shared by the CLIP-family rewards (docs/ecosystem.md (c)).

HF image processors go through PIL/numpy and break the graph; this reproduces CLIPImageProcessor's
resize (short side to ``size``, long side ``int(size * long / short)``), center crop and normalisation
with `F.interpolate(mode="bicubic", antialias=True)`. The numbers differ slightly from PIL's bicubic and
from the processor's uint8 round trip (tests/test_rewards.py measures it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["CLIP_MEAN", "CLIP_STD", "apply_clamp", "center_crop", "clip_preprocess", "resize_short_side"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLAMP_MODES = ("hard", "straight_through", "none")


def apply_clamp(images: torch.Tensor, clamp: str = "hard") -> torch.Tensor:
    """Clamp to [0, 1]. ``"hard"``: clamped values, zero gradient on pixels strictly outside [0, 1] (what peers'
    ``clamp(0, 1)`` does; written out because torch 2.14 changed `clamp`'s gradient at the bounds themselves
    from 1 to 0, and pixels exactly at 0 or 1 keep gradient 1 here on every torch); ``"straight_through"``:
    clamped values, identity gradient; ``"none"``: unchanged."""
    if clamp == "hard":
        inside = (images >= 0.0) & (images <= 1.0)
        return torch.where(inside, images, images.detach().clamp(0.0, 1.0))
    if clamp == "straight_through":
        return images + (images.clamp(0.0, 1.0) - images).detach()
    if clamp == "none":
        return images
    raise ValueError(f"clamp must be one of {CLAMP_MODES}, got {clamp!r}")


def resize_short_side(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubic (antialiased) resize so the short side is ``size`` (long side ``int(size * long / short)``,
    as transformers' ``get_resize_output_image_size``); a no-op when it already is."""
    h, w = images.shape[-2:]
    short, long = (h, w) if h <= w else (w, h)
    new_long = int(size * long / short)
    new_h, new_w = (size, new_long) if h <= w else (new_long, size)
    if (new_h, new_w) == (h, w):
        return images
    return F.interpolate(images, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)


def center_crop(images: torch.Tensor, crop: int | tuple[int, int], offset: str = "floor") -> torch.Tensor:
    """Center crop to ``crop``. Top/left offsets: ``offset="floor"``: ``(H - h) // 2`` (transformers'
    ``center_crop``); ``"round"``: ``round((H - h) / 2)``, half to even (torchvision's ``CenterCrop``, used by
    open_clip/HPSv2 and ImageReward); they differ by one pixel when ``H - h`` is 3 mod 4."""
    ch, cw = (crop, crop) if isinstance(crop, int) else crop
    h, w = images.shape[-2:]
    if ch > h or cw > w:
        raise ValueError(f"crop {ch}x{cw} is larger than the resized image {h}x{w}")
    if offset not in ("floor", "round"):
        raise ValueError(f"offset must be 'floor' or 'round', got {offset!r}")
    top, left = ((h - ch) // 2, (w - cw) // 2) if offset == "floor" else (round((h - ch) / 2), round((w - cw) / 2))
    return images[..., top : top + ch, left : left + cw]


def clip_preprocess(
    images: torch.Tensor,
    size: int = 224,
    crop_size: int | None = None,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    clamp: str = "hard",
    dtype: torch.dtype | None = None,
    crop_offset: str = "floor",
) -> torch.Tensor:
    """[B, 3, H, W] images in [0, 1] -> CLIP pixel values [B, 3, crop, crop] (in ``dtype``, default images').

    Resize and crop run in fp32 (fp64 for fp64 inputs) before the cast, so bf16 towers still get
    accurately resampled pixels. ``crop_offset``: see `center_crop`.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape [B, 3, H, W], got {tuple(images.shape)}")
    work = images if images.dtype == torch.float64 else images.float()
    x = apply_clamp(work, clamp)
    x = center_crop(resize_short_side(x, size), size if crop_size is None else crop_size, crop_offset)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return ((x - m) / s).to(dtype or images.dtype)

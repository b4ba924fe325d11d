"""Procedural training images of the embedded demo model: coloured shapes on plain backgrounds.

Each class ("prompt") is one shape kind with its own colour family; position, size, hue and background jitter
per sample. Images are RGB in [-1, 1] (the model's pixel space; ``x / 2 + 0.5`` gives [0, 1]) with soft,
anti-aliased edges (a sigmoid of the signed distance), drawn with torch only from a ``torch.Generator`` so a
seed reproduces the data set exactly.
"""

from __future__ import annotations

import torch

__all__ = ["CLASS_NAMES", "render_shapes"]

CLASS_NAMES = ("a red disk", "a blue square", "green stripes", "a yellow ring")

# base colour of the shape per class (RGB in [0, 1]); jittered per sample
_COLOURS = torch.tensor(
    [
        [0.85, 0.15, 0.15],  # red disk
        [0.15, 0.25, 0.85],  # blue square
        [0.15, 0.70, 0.20],  # green stripes
        [0.90, 0.80, 0.10],  # yellow ring
    ]
)


def render_shapes(
    labels: torch.Tensor, size: int = 16, generator: torch.Generator | None = None, softness: float = 0.6
) -> torch.Tensor:
    """Images [B, 3, size, size] in [-1, 1] for integer ``labels`` [B] (indices into :data:`CLASS_NAMES`)."""
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if labels.numel() and (labels.min() < 0 or labels.max() >= len(CLASS_NAMES)):
        raise ValueError(f"labels must be in [0, {len(CLASS_NAMES) - 1}], got {labels.tolist()}")
    if size < 8:
        raise ValueError(f"size must be >= 8 pixels, got {size}")
    b = labels.numel()
    u = lambda *shape: torch.rand(*shape, generator=generator)
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size  # pixel centres in (0, 1)
    yy, xx = coords[:, None], coords[None, :]
    cx, cy = 0.3 + 0.4 * u(b), 0.3 + 0.4 * u(b)  # shape centre
    radius = 0.17 + 0.1 * u(b)  # half-size of the shape
    vertical = u(b) < 0.5  # stripe direction: vertical or horizontal
    phase = 4 * u(b)  # stripe offset in pixels
    dx, dy = xx[None] - cx[:, None, None], yy[None] - cy[:, None, None]
    px = 1.0 / size  # one pixel in (0, 1) units
    r = radius[:, None, None]
    dist = torch.sqrt(dx**2 + dy**2)
    signed = torch.empty(b, size, size)  # > 0 inside the shape, in pixels
    for k in range(len(CLASS_NAMES)):
        rows = labels == k
        if not bool(rows.any()):
            continue
        if k == 0:  # disk
            s = r - dist
        elif k == 1:  # square
            s = r - torch.maximum(dx.abs(), dy.abs())
        elif k == 2:  # stripes over the whole image, period 4 px, 2 px wide
            along = torch.where(vertical[:, None, None], xx[None].expand(b, size, size), yy[None].expand(b, size, size))
            s = px * torch.cos(2 * torch.pi * (along / px + phase[:, None, None]) / 4)
        else:  # ring of width ~ 3 px
            s = 1.5 * px - (dist - r).abs()
        signed[rows] = s[rows] / px
    mask = torch.sigmoid(signed / softness)[:, None]  # [B, 1, H, W]
    colour = (_COLOURS[labels] + 0.12 * (u(b, 3) - 0.5)).clamp(0, 1)
    grey = 0.25 + 0.5 * u(b, 1)  # background: a light or dark grey, slightly tinted
    background = (grey + 0.08 * (u(b, 3) - 0.5)).clamp(0, 1)
    image = mask * colour[:, :, None, None] + (1 - mask) * background[:, :, None, None]
    return image * 2 - 1

"""Evaluation on fixed seeds and prompts: reward, diversity and prior preservation against the base model.

Samples come from the same Euler sampler as training (``flowkern.sampling.sample_euler``, M2, with the model's CFG,
M5) from one seeded noise batch x0 and fixed prompt indices 0, 1, ..., C-1, 0, ...; the base samples use the same
x0 and prompts with the LoRA switched off (``model.base_velocity()``), so row b of both is a pair.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch

from flowkern.app.build import RunSetup
from flowkern.metrics.diversity import FlattenFeatures, RandomProjectionFeatures, diversity, prior_preservation
from flowkern.sampling import sd3_shifted_grid, uniform_grid

__all__ = ["Samples", "evaluate_samples", "generate", "time_grid"]


def time_grid(setup: RunSetup) -> torch.Tensor:
    if setup.time_grid == "shifted":
        return sd3_shifted_grid(setup.num_steps, shift=setup.shift)
    return uniform_grid(setup.num_steps)


class Samples:
    """x [B, ...] (the model's space), the images in [0, 1] (None for the toy) and the prompt indices."""

    def __init__(self, x: torch.Tensor, images: torch.Tensor | None, labels: torch.Tensor | None):
        self.x, self.images, self.labels = x, images, labels


@torch.no_grad()
def generate(setup: RunSetup, n: int, seed: int, *, base: bool = False) -> Samples:
    """n samples from seeded noise and fixed prompts; ``base`` switches the LoRA off (v_base)."""
    from flowkern.sampling import sample_euler

    generator = torch.Generator().manual_seed(seed)
    x0 = torch.randn((n, *setup.sample_shape), generator=generator).to(setup.device)
    labels = setup.eval_labels(n)
    model = setup.model
    context = model.base_velocity() if base else contextlib.nullcontext()
    with context:
        x = sample_euler(model, x0, time_grid(setup), labels).states[-1]  # calls model.velocity(x, t, labels)
    images = setup.to_images(x) if setup.to_images is not None else None
    return Samples(x, images, labels)


def _features(setup: RunSetup):
    return FlattenFeatures() if setup.to_images is None else RandomProjectionFeatures()


def _diversity_within_prompts(data: torch.Tensor, labels: torch.Tensor | None, extractor) -> float:
    """Mean over prompts of the within-prompt diversity (across prompts the distance would mostly measure the
    prompt); one group when there are no prompts."""
    if labels is None:
        return diversity(data, extractor)
    values = [diversity(data[labels == k], extractor) for k in labels.unique().tolist() if int((labels == k).sum()) > 1]
    return sum(values) / len(values) if values else float("nan")


@torch.no_grad()
def evaluate_samples(
    setup: RunSetup,
    reward_fn: Callable[[torch.Tensor], torch.Tensor],
    samples: Samples,
    base: Samples | None = None,
    reward_module=None,
) -> dict:
    """Reward (mean, std, per component), diversity and, with ``base``, prior preservation of ``samples``."""
    r = reward_fn(samples.x).float()
    out = {
        "reward_mean": float(r.mean()),
        "reward_std": float(r.std()) if r.numel() > 1 else 0.0,
        "n": int(r.numel()),
    }
    parts = getattr(reward_module, "last_outputs", None)
    if parts and len(parts) > 1:
        out["reward_components"] = {k: float(v.float().mean()) for k, v in parts.items()}
    data = samples.images if samples.images is not None else samples.x
    extractor = _features(setup)
    out["diversity"] = _diversity_within_prompts(data, samples.labels, extractor)
    out["diversity_all"] = diversity(data, extractor) if data.shape[0] > 1 else float("nan")
    if base is not None:
        base_data = base.images if base.images is not None else base.x
        out["prior_distance"] = prior_preservation(data, base_data, extractor)
        out["base_diversity"] = _diversity_within_prompts(base_data, base.labels, extractor)
    out["feature_extractor"] = getattr(extractor, "name", type(extractor).__name__)
    if samples.images is not None:
        images = samples.images
        out["saturated_fraction"] = float(((images <= 0) | (images >= 1)).float().mean())
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}

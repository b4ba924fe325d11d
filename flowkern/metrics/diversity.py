"""Diversity and prior preservation of generated samples, with a pluggable feature extractor (layer L6).

- ``diversity(samples)``: the mean pairwise feature distance over all pairs i < j of a batch,
  (2 / (B (B - 1))) sum_{i<j} d(f(x_i), f(x_j)). Collapse (every sample alike) gives 0.
- ``prior_preservation(tuned, base)``: the mean distance between paired rows, (1/B) sum_b d(f(tuned_b), f(base_b)),
  where row b of both was generated from the same noise and prompt: 0 means the fine-tuned model still
  draws what the base drew; large values mean it forgot its prior (or hacked the reward).

A feature extractor maps ``[B, ...]`` to ``[B, F]``. The built-in :class:`RandomProjectionFeatures` (images: area
downsampling to a fixed size, then a fixed seeded Gaussian projection, so distances are approximately scaled
Euclidean distances of the downsampled pixels, Johnson-Lindenstrauss) needs no weights; :class:`FlattenFeatures`
uses the raw values (vectors, e.g. the 2-D toy). :func:`default_extractor` prefers DreamSim when the ``dreamsim``
package and its weights are available locally (never downloaded here), else the built-in one.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = [
    "FlattenFeatures",
    "RandomProjectionFeatures",
    "default_extractor",
    "diversity",
    "pairwise_distances",
    "prior_preservation",
]

FeatureExtractor = Callable[[torch.Tensor], torch.Tensor]
METRICS = ("l2", "cosine")


class FlattenFeatures:
    """f(x) = x flattened to [B, F] (fp32, or fp64 for fp64 input)."""

    name = "flatten"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = _check_batch("x", x)
        return x.flatten(1).to(torch.float64 if x.dtype == torch.float64 else torch.float32)


class RandomProjectionFeatures:
    """Images [B, C, H, W] -> area-downsampled to ``size`` x ``size`` -> fixed Gaussian projection to ``dim``.

    The projection matrix is drawn once from ``seed`` and scaled by 1/sqrt(dim), so E||P v||^2 = ||v||^2: the
    feature distance estimates the Euclidean distance of the downsampled images (per-pixel mean, i.e. divided
    by sqrt(C size^2), so the numbers do not grow with resolution). Non-image inputs [B, ...] are flattened
    and projected the same way. Deterministic: the same input always gives the same features (fp64).
    """

    name = "random_projection"

    def __init__(self, size: int = 8, dim: int = 128, seed: int = 0):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be an int >= 1, got {size!r}")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be an int >= 1, got {dim!r}")
        self.size, self.dim, self.seed = size, dim, seed
        self._projections: dict[int, torch.Tensor] = {}

    def projection(self, n_in: int) -> torch.Tensor:
        """The [n_in, dim] matrix (fp64, CPU), N(0, 1 / dim) entries from ``seed``."""
        if n_in not in self._projections:
            g = torch.Generator().manual_seed(self.seed)
            self._projections[n_in] = torch.randn(n_in, self.dim, generator=g, dtype=torch.float64) / math.sqrt(
                self.dim
            )
        return self._projections[n_in]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = _check_batch("x", x).detach().to(torch.float64)  # fp64: rows that are equal stay equal to ~1e-16
        if x.dim() == 4:
            x = F.adaptive_avg_pool2d(x, self.size)
        flat = x.flatten(1) / math.sqrt(x[0].numel())
        return flat @ self.projection(flat.shape[1]).to(flat.device)


def default_extractor() -> FeatureExtractor:
    """DreamSim's embedding when ``dreamsim`` is installed with local weights, else :class:`RandomProjectionFeatures`.

    Never downloads: DreamSim is used only if it loads from its local cache without network access.
    """
    try:  # optional, and only with weights already on disk
        from dreamsim import dreamsim  # type: ignore[import-not-found]

        model, preprocess = dreamsim(pretrained=True, device="cpu")
    except Exception:
        return RandomProjectionFeatures()

    class _DreamSim:
        name = "dreamsim"

        def __call__(self, x: torch.Tensor) -> torch.Tensor:
            x = F.interpolate(x.float().clamp(0, 1), size=224, mode="bicubic", antialias=True)
            return model.embed(x)

    return _DreamSim()


def _check_batch(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [B, ...], got {type(x).__name__}")
    if x.dim() < 2 or x.shape[0] < 1:
        raise ValueError(
            f"{name} must be a batch [B, ...] with B >= 1 and at least one feature dim, got {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf")
    return x


def _features(x: torch.Tensor, extractor: FeatureExtractor | None, name: str) -> torch.Tensor:
    x = _check_batch(name, x)
    extractor = extractor if extractor is not None else RandomProjectionFeatures()
    feats = extractor(x)
    if not isinstance(feats, torch.Tensor) or feats.dim() != 2 or feats.shape[0] != x.shape[0]:
        got = tuple(feats.shape) if isinstance(feats, torch.Tensor) else type(feats).__name__
        raise ValueError(f"the feature extractor must return [B, F] with B={x.shape[0]}, got {got}")
    return feats


def _distance(a: torch.Tensor, b: torch.Tensor, metric: str) -> torch.Tensor:
    """Distances along the last dim of two broadcastable feature tensors [..., F]: Euclidean, or 1 - cos."""
    if metric == "l2":
        return (a - b).norm(dim=-1)
    if metric == "cosine":
        return 1 - F.cosine_similarity(a, b, dim=-1, eps=1e-12)
    raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


def pairwise_distances(features: torch.Tensor, metric: str = "l2") -> torch.Tensor:
    """[B, B] distances between the rows of ``features`` [B, F] (exact zeros on the diagonal)."""
    features = _check_batch("features", features)
    b = features.shape[0]
    i, j = torch.triu_indices(b, b, offset=1)
    out = torch.zeros(b, b, dtype=features.dtype, device=features.device)
    d = _distance(features[i], features[j], metric)
    out[i, j] = d
    out[j, i] = d
    return out


def diversity(samples: torch.Tensor, extractor: FeatureExtractor | None = None, metric: str = "l2") -> float:
    """Mean pairwise feature distance over the pairs i < j of ``samples`` [B, ...] (B >= 2)."""
    feats = _features(samples, extractor, "samples")
    b = feats.shape[0]
    if b < 2:
        raise ValueError(f"diversity needs at least 2 samples, got {b}")
    # blocks of rows against all rows, at most ~2^22 feature differences alive at once (B in the thousands)
    rows = max(1, (1 << 22) // (b * feats.shape[1]))
    total = torch.zeros((), dtype=torch.float64, device=feats.device)
    for s in range(0, b, rows):
        block = _distance(feats[s : s + rows, None], feats[None], metric)  # [rows, B]
        total += torch.triu(block, diagonal=s + 1).sum(dtype=torch.float64)  # pairs i < j only
    return float(total / (b * (b - 1) / 2))


def prior_preservation(
    tuned: torch.Tensor, base: torch.Tensor, extractor: FeatureExtractor | None = None, metric: str = "l2"
) -> float:
    """Mean feature distance between row b of ``tuned`` and row b of ``base`` (same noise and prompt)."""
    if not isinstance(tuned, torch.Tensor) or not isinstance(base, torch.Tensor) or tuned.shape != base.shape:
        raise ValueError(
            "tuned and base must be tensors of the same shape [B, ...] (pairs drawn from the same noise and prompt), "
            f"got {_shape(tuned)} and {_shape(base)}"
        )
    return float(_distance(_features(tuned, extractor, "tuned"), _features(base, extractor, "base"), metric).mean())


def _shape(x: object) -> str:
    return str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__

"""p*, the reward-tilted base distribution p_base exp(r / lam) / Z (M36): the fixed point of memoryless adjoint
matching. Drawn by importance resampling of exact base samples, or in closed form for a linear reward (M39)."""

from __future__ import annotations

import torch

from flowkern.models.toy import GaussianMixture, LinearReward

from .dynamics import Reward, check_lam


def tilt_linear(mixture: GaussianMixture, a, lam: float) -> GaussianMixture:
    """p* for r = a^T x (M39): mu_k' = mu_k + Sigma_k a / lam,
    pi_k' ∝ pi_k exp(a^T mu_k / lam + a^T Sigma_k a / (2 lam^2))."""
    check_lam(lam)
    a = torch.as_tensor(a, dtype=torch.float64)
    Sa = mixture.covariances @ a  # [K, d]
    means = mixture.means + Sa / lam
    logw = torch.log(mixture.weights) + mixture.means @ a / lam + (Sa @ a) / (2 * lam**2)
    return GaussianMixture(means, mixture.covariances, torch.softmax(logw, 0))


def sample_tilted(
    mixture: GaussianMixture,
    reward: Reward,
    lam: float,
    n: int,
    generator: torch.Generator | None = None,
    *,
    method: str = "auto",
    pool: int | None = None,
    min_ess_frac: float = 0.1,
    return_info: bool = False,
):
    """n samples of p* ∝ p_base exp(r / lam) (M36), fp64 [n, d].

    method "resample" (M39): M = pool (default 64 n) exact base samples, weights omega ∝ exp(r / lam), multinomial
    resampling with replacement; raises if ESS = (sum omega)^2 / sum omega^2 < min_ess_frac * M.
    "closed_form": LinearReward only, (M39) mixture. "auto": closed form for LinearReward, else resampling.
    """
    check_lam(lam)
    if method == "auto":
        method = "closed_form" if isinstance(reward, LinearReward) else "resample"
    if method == "closed_form":
        if not isinstance(reward, LinearReward):
            raise ValueError("closed_form p* needs a LinearReward")
        x = tilt_linear(mixture, reward.a, lam).sample(n, generator)
        return (x, {"method": "closed_form"}) if return_info else x
    if method != "resample":
        raise ValueError(f"unknown method {method!r}")
    M = pool if pool is not None else 64 * n
    y = mixture.sample(M, generator)
    r = reward(y).to(torch.float64)
    if r.shape != (M,) or not bool(torch.isfinite(r).all()):
        raise ValueError(f"reward must return {M} finite values, got shape {tuple(r.shape)}")
    w = torch.softmax(r / lam, 0)
    ess = float(1.0 / (w * w).sum())
    if ess < min_ess_frac * M:
        raise ValueError(f"importance resampling ESS {ess:.0f} < {min_ess_frac} * {M}: lam too small for this reward")
    idx = torch.multinomial(w, n, replacement=True, generator=generator)
    x = y[idx]
    return (x, {"method": "resample", "ess": ess, "pool": M, "ess_frac": ess / M}) if return_info else x

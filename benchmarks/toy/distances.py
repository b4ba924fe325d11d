"""Distances and yardsticks for the toy (M40, M41): energy distance, its noise floor, the base model's
discretization gap, mode masses and coverage, and the W2 bound of VGG-Flow's Prop. 4.

Diversity (mean pairwise distance) is flowkern.metrics.diversity with FlattenFeatures (raw coordinates).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from flowkern.metrics.diversity import FlattenFeatures, diversity
from flowkern.models.toy import GaussianMixture
from flowkern.sampling import sample_euler, uniform_grid


def _pair_sum(X: torch.Tensor, Y: torch.Tensor, chunk_elems: int) -> torch.Tensor:
    rows = max(1, chunk_elems // max(1, Y.shape[0]))
    total = torch.zeros((), dtype=torch.float64)
    for s in range(0, X.shape[0], rows):
        total = total + torch.cdist(X[s : s + rows], Y, compute_mode="donot_use_mm_for_euclid_dist").sum()
    return total


def energy_distance(X: torch.Tensor, Y: torch.Tensor, *, unbiased: bool = False, chunk_elems: int = 1 << 22) -> float:
    """2 E||X - Y|| - E||X - X'|| - E||Y - Y'|| (M40), fp64, chunked (at most chunk_elems distances at once).

    Default V-statistic: all pairs including i = i' (zero distances), i.e. the energy distance between the two
    empirical measures: >= 0, exactly 0 when X and Y are the same set; its expectation for two independent draws
    of one distribution is O(1/n), which `noise_floor` measures. `unbiased=True`: within-set means over i != i'
    (U-statistic, expectation 0 under equality, may be negative).
    """
    X = X.detach().reshape(X.shape[0], -1).to(torch.float64).cpu()
    Y = Y.detach().reshape(Y.shape[0], -1).to(torch.float64).cpu()
    if X.shape[1] != Y.shape[1]:
        raise ValueError(f"dimension mismatch: {X.shape[1]} vs {Y.shape[1]}")
    n, m = X.shape[0], Y.shape[0]
    if n < 2 or m < 2:
        raise ValueError("energy_distance needs at least 2 samples per set")
    xy = _pair_sum(X, Y, chunk_elems) / (n * m)
    xx_sum, yy_sum = _pair_sum(X, X, chunk_elems), _pair_sum(Y, Y, chunk_elems)
    if unbiased:
        xx, yy = xx_sum / (n * (n - 1)), yy_sum / (m * (m - 1))
    else:
        xx, yy = xx_sum / (n * n), yy_sum / (m * m)
    return float(2 * xy - xx - yy)


def noise_floor(
    sampler: Callable[[int, torch.Generator], torch.Tensor],
    n: int,
    repeats: int = 5,
    generator: torch.Generator | None = None,
    unbiased: bool = False,
) -> dict[str, float]:
    """Reference-vs-reference ED: `repeats` pairs of independent size-n draws of sampler(n, generator).

    Returns mean, std and max over the pairs. Compare a method's ED(samples, ref) at the same n with `mean`.
    """
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    vals = torch.tensor(
        [energy_distance(sampler(n, g), sampler(n, g), unbiased=unbiased) for _ in range(repeats)],
        dtype=torch.float64,
    )
    std = float(vals.std()) if repeats > 1 else 0.0
    return {"mean": float(vals.mean()), "std": std, "max": float(vals.max()), "n": n, "repeats": repeats}


def expected_floor(samples: torch.Tensor, n: int | None = None, m: int | None = None) -> float:
    """E[ED_V] between two independent sets of sizes n and m (default: len(samples) each) from the distribution of
    `samples`: E||X - X'|| (1/n + 1/m), estimated with flowkern.metrics.diversity. For i.i.d. draws the V-statistic
    has exactly this expectation (its within-set means include the i = i' zeros); resampled sets with duplicates sit
    a little higher (use `noise_floor`)."""
    n = samples.shape[0] if n is None else n
    m = n if m is None else m
    return diversity(samples.to(torch.float64), FlattenFeatures()) * (1.0 / n + 1.0 / m)


def discretization_gap(
    model_or_velocity,
    N: int = 20,
    N_fine: int = 1000,
    n: int = 2000,
    *,
    dim: int | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    ts: torch.Tensor | None = None,
) -> float:
    """ED (M40) between n samples of the N-step Euler sampler (or grid `ts`) and n samples of an N_fine-step
    uniform Euler sampler, from independent noise: compare it with the noise floor at the same n."""
    d = dim if dim is not None else getattr(model_or_velocity, "dim", None)
    if d is None:
        base = getattr(model_or_velocity, "base", None)
        d = getattr(base, "dim", None)
    if d is None:
        raise ValueError("pass dim=")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    coarse = uniform_grid(N) if ts is None else ts
    xa = sample_euler(model_or_velocity, torch.randn(n, d, dtype=dtype, generator=g), coarse).final
    xb = sample_euler(model_or_velocity, torch.randn(n, d, dtype=dtype, generator=g), uniform_grid(N_fine)).final
    return energy_distance(xa, xb)


def mode_masses(samples: torch.Tensor, mixture: GaussianMixture, max_mahalanobis: float | None = None):
    """Share of samples assigned to each mode [K] and the off-mode share.

    A sample belongs to the component with the largest posterior pi_k N(x; mu_k, Sigma_k) if its squared Mahalanobis
    distance to that component is <= max_mahalanobis^2 (default d + 6 sqrt(2 d): about 6 standard deviations of a
    chi^2_d above its mean), else it is off-mode.
    """
    x = samples.detach().to(torch.float64).cpu()
    d = mixture.dim
    thr2 = (d + 6 * math.sqrt(2 * d)) if max_mahalanobis is None else max_mahalanobis**2
    k = mixture.component_log_prob(x).argmax(-1)
    diff = x - mixture.means[k]
    z = torch.einsum("nd,nde->ne", diff, mixture.evecs[k])
    m2 = (z * z / mixture.evals[k]).sum(-1)
    on = m2 <= thr2
    counts = torch.bincount(k[on], minlength=mixture.n_modes).to(torch.float64)
    return counts / x.shape[0], float((~on).float().mean())


def mode_coverage(
    samples: torch.Tensor, mixture: GaussianMixture, min_share: float | None = None, max_mahalanobis=None
) -> float:
    """Fraction of the mixture's modes holding at least min_share of the samples (default 0.1 / K, a tenth of
    a uniform share); assignment as in `mode_masses`."""
    shares, _ = mode_masses(samples, mixture, max_mahalanobis)
    thr = 0.1 / mixture.n_modes if min_share is None else min_share
    return float((shares >= thr).float().mean())


def w2_bound_diagnostic(
    model,
    n: int = 1000,
    N: int = 20,
    *,
    dim: int | None = None,
    generator: torch.Generator | None = None,
    ts: torch.Tensor | None = None,
) -> dict[str, float]:
    """(M41) Prop. 4: W2(p_1, q_1)^2 <= e^{2L+1} int_0^1 E_{p_t} ||v~_theta||^2 dt, coupling x0 = y0.

    `model` is a FlowModel with base_velocity() (e.g. make_toy_model). On the Euler grid, from the same x0:
    w2_sq_coupled = mean ||x_N - y_N||^2 (fine-tuned vs base endpoints; an upper bound of the empirical W2^2),
    energy = sum_i h_i mean ||v_theta - v_base||^2 along the fine-tuned path, lipschitz = the largest eigenvalue
    of the symmetrised Jacobian of v_base seen along the path (the one-sided constant Groenwall needs; an estimate
    of the sup), bound = e^{2L+1} energy, holds = w2_sq_coupled <= bound.
    """
    d = dim if dim is not None else getattr(getattr(model, "base", None), "dim", None)
    if d is None:
        raise ValueError("pass dim=")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    p0 = next(iter(model.parameters()), None)
    dt = p0.dtype if p0 is not None else torch.float64
    ts = (uniform_grid(N) if ts is None else torch.as_tensor(ts)).to(dt)
    x0 = torch.randn(n, d, dtype=dt, generator=g)
    x, y = x0.clone(), x0.clone()
    energy, L = 0.0, -math.inf
    for i in range(ts.shape[0] - 1):
        h, t = ts[i + 1] - ts[i], ts[i]
        with torch.no_grad():
            v = model.velocity(x, t)
            with model.base_velocity():
                vb = model.velocity(x, t)
                vy = model.velocity(y, t)
        energy += float(h) * float(((v - vb) ** 2).sum(-1).mean())
        xr = x.detach().requires_grad_(True)
        with torch.enable_grad(), model.base_velocity():
            out = model.velocity(xr, t)
            rows = [torch.autograd.grad(out[:, j].sum(), xr, retain_graph=j < d - 1)[0] for j in range(d)]
        J = torch.stack(rows, 1)  # [n, d(out), d(in)]
        L = max(L, float(torch.linalg.eigvalsh(0.5 * (J + J.transpose(1, 2))).max()))
        x, y = x + h * v, y + h * vy
    w2 = float(((x - y) ** 2).sum(-1).mean())
    bound = math.exp(2 * L + 1) * energy if 2 * L + 1 < 700 else math.inf
    return {"w2_sq_coupled": w2, "energy": energy, "lipschitz": L, "bound": bound, "holds": bool(w2 <= bound)}

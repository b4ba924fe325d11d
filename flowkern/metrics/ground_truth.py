"""Ground-truth references and distances for the toy (math.md section 10, M36-M41).

Two references per (reward r, lam = 1/beta, grid):

- p* ∝ p_base exp(r / lam) (M36): the fixed point of memoryless adjoint matching. `sample_tilted` draws it by
  importance resampling of exact base samples (M39), or in closed form for linear r (M39).
- q* (M37): the push-forward of x0 ~ N(0, I) under the per-particle optimal open-loop control of
  min_u sum_i h_i lam c(u_i) - r(x_N) on the Euler grid (M2) with the exact v_base (M38), truncated to the last K
  steps where the method is. The fixed point of deterministic adjoint matching (M25-M28) and, up to O(h), of
  VGG-Flow (M10). `solve_optimal_controls` / `q_star_samples`: batched per-particle L-BFGS, best of several
  starts (u = 0, starts aimed at the reward's maxima, a continuation in lam from a 16x stronger reward, the DP
  policy in 2-D), because from u = 0 many particles stop at a local optimum (M37). In 2-D `GridDP2D` (grid dynamic
  programming) is both an independent check and a start. The continuation start matters in 8-D, where there is no
  DP: on bump_8d it finds a better optimum than the zero and aimed starts for 43% of the particles (mean J -1.84
  vs -1.30, n = 1000), and the q* published before it existed was wrong (reward 1.48 against 2.52 now).

Distances (M40): `energy_distance` (V-statistic, i.e. the energy distance between the two empirical measures:
>= 0, exactly 0 for identical sets; `unbiased=True` gives the U-statistic), the reference-vs-reference
`noise_floor`, the base model's `discretization_gap`; `mode_coverage`, `diversity`; `w2_bound_diagnostic`
(M41, Prop. 4).

Chosen toy settings (`TOY_SETTINGS`, `toy_problem`, `toy_references`): base = 8-mode ring in 2-D, radius 4, std 0.4
(isotropic, equal weights), uniform Euler grid N = 20, K = N, p = 2, lam = 0.5 (beta = 2); an 8-D mixture below.

- "linear": r = a^T x, a = (1, 0) (unbounded: also the reward-hacking test). p* re-weights the modes by
  exp(a^T mu_k / lam) (mode 0 at (4, 0) ~83%, its neighbours ~8% each) and shifts them by Sigma a / lam = (0.32, 0);
  q* pushes mode-0 particles further out along +x (mean x 4.57 vs 4.12) and leaves 6.5% off-mode.
- "quad": r = -k/2 ||x - (4, 0)||^2, k = 0.25 (concave, bounded above; favours mode 0 and its neighbours). Its pull
  grows with the distance instead of vanishing, so the per-particle problem's "stay where you are" basins are
  shallow and on-policy training leaves them; q*_100 = q* to the noise floor (no O(h) gap for VGG-Flow).
- "bump": r = 2 exp(-||x - (4, 0)||^2 / (2 * 1.5^2)), on mode 0. Both put ~83% on mode 0, but q* empties the two
  neighbouring modes (cheap to steer from, 0.1% each vs 3.3% under p*) and keeps more on the far side
  (~4% vs ~2% per far mode); q* covers 6 of 8 modes, p* all 8.
- "bump_gap": r = 2 exp(-||x - c||^2 / 2), c = 4 (cos 22.5°, sin 22.5°), the ring point midway between modes 0 and
  1. q* parks 74% of the mass off-mode near c (where the base has almost none), p* only re-weights modes 0 and 1
  (30% each): the most discriminating setting (ED(q*,p*) is 32% of ED(base, q*) and 95% of ED(base, p*); for the
  other two it is 3-7%), but the stiffest q* solve (endpoints on the unstable ridge between two modes).

Measured 2026-11-23, before the continuation start existed (the 2-D q* barely moved with it, since the DP start
already covered those particles; the current reference numbers of every setting, 8-D included, are the benchmark's
summary lines in benchmarks/results/toy/README.md) (n = 2000 per set, fp64, seed 0;
`python -m flowkern.metrics.ground_truth` reprints it).
Floors: q* from one independent pair (seed 1; `expected_floor` gives 0.0014 / 0.0025 / 0.0029), p* the mean of 3
pairs. base = the base's own 20-step Euler samples; its discretization gap to a 1000-step grid is 0.0083, 2.1x the
exact-sample floor 0.0040. "improved" = particles whose optimum beats the u = 0 start's (of 2000), by the
pull-back aimed start (the second start) and by the best of all starts (zero, aimed, dp). Against an independent
G = 301 grid DP (n = 1000 per setting) no particle's optimum J exceeds the DP value by more than 0.05 (the DP's
grid error is about 0.1).

    reward    ED(q*,p*)  floor q*  floor p*  ED(b,q*)  ED(b,p*)  r(q*)  r(p*)  r(b)   cov q*/p*  off q*  improved
    linear      0.1445    0.0014    0.0012    4.864     4.125    4.57   4.12  -0.03  0.375/0.375  0.065  160 / 580
    bump        0.1579    0.0015    0.0011    2.297     2.901    1.59   1.60   0.33  0.750/1.000  0.000  165 / 897
    bump_gap    0.6358    0.0025    0.0028    1.985     0.670    1.46   0.53   0.17  0.750/1.000  0.737  109 / 982

q* depends on the grid, strongly on this toy (`toy_q_star_fine`): where the base flow splits between modes
|J_vbase| ~ 10, so h |J_vbase| ~ 0.5 for h = 0.05 and the 20-step Euler map misrepresents that instability (holding a
particle on the ridge between two modes is far cheaper on the coarse grid). q* of a 100-step grid, the stand-in for
the continuous-time optimum that VGG-Flow's value gradient (M11-M14) describes, is far from q* of N = 20 (n = 2000,
seed 0): ED(q*_100, q*_20) = 0.107 / 0.457 / 1.082 (linear / bump / bump_gap; floors q*_100 0.0023 / 0.0043 /
0.0049), ED(q*_100, p*) = 0.207 / 0.838 / 0.507, reward 4.42 / 1.13 / 0.77 (vs q*_20 4.57 / 1.59 / 1.46). So DAM
(the discrete adjoint of the N-step map, M25-M28) and VGG-Flow have different fixed points here; the benchmark
holds each to its own.

8-D (`TOY_SETTINGS["bases"]["gmm8"]`, `toy_settings(8)`): 8 anisotropic modes (random rotations, stds in [0.3, 0.6],
unequal weights 0.02-0.24, means N(0, 1.5^2 I), closest pair 3.1 apart), same grid and lam. "linear_8d": r = x_1;
"quad_8d": r = -k/2 ||x - mu_2||^2, k = 0.25; "bump_8d": height 3, width 2, midway between the closest pair (modes 2,
3): q* keeps mode 2 and pulls in its neighbours, p* splits the mass between modes 2 and 3. n = 1000: ED(q*, p*) = 0.44
/ 1.04 (floors ~0.009 / 0.006), ED(base, q*) = 2.00 / 0.41, ED(base, p*) = 3.11 / 2.27 with q* from the zero and aimed
starts only; that q* was wrong: the continuation start improves 24% (linear_8d) and 43% (bump_8d) of the particles,
and with it ED(base, q*) = 2.45 / 2.41 (benchmarks/results/toy/README.md).

q* solves converge to max ||grad_w J||_inf <= 1e-7 on linear and bump; on bump_gap 91.5% reach 1e-7 and the rest
stall at the rounding level of J with ||grad|| <= 2.4e-5 (curvature ~1e4 there); re-solving with another L-BFGS
memory moves no endpoint by more than 1e-7.
Noise floors scale as 1/n: `expected_floor(ref, n_model, n_ref)` gives the floor for other sample sizes.

Performance note: the toy's tensors are tiny; on a loaded 2-core machine torch's intra-op threads make every op
~10-20x slower, so run the toy with torch.set_num_threads(1) (tests and __main__ do).

Layering (design.md section 1, L6): imports torch and flowkern.models only.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from flowkern.models.toy import (
    BumpReward,
    GaussianMixture,
    GaussianMixtureVelocity,
    LinearReward,
    QuadraticReward,
)

__all__ = [
    "TOY_SETTINGS",
    "toy_settings",
    "toy_mixture",
    "toy_problem",
    "toy_references",
    "toy_q_star_fine",
    "expected_floor",
    "uniform_grid",
    "euler_sample",
    "energy_distance",
    "noise_floor",
    "tilt_linear",
    "sample_tilted",
    "aimed_start",
    "solve_optimal_controls",
    "model_controls",
    "q_star_samples",
    "GridDP2D",
    "dp_values_2d",
    "discretization_gap",
    "mode_masses",
    "mode_coverage",
    "diversity",
    "w2_bound_diagnostic",
    "settings_table",
]

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Reward = Callable[[torch.Tensor], torch.Tensor]

# ---- settings ---------------------------------------------------------------------------------------

_GAP = [4.0 * math.cos(math.pi / 8), 4.0 * math.sin(math.pi / 8)]  # on the ring, midway between modes 0 and 1

TOY_SETTINGS: dict[str, Any] = {
    "bases": {
        # 2-D: 8 isotropic modes on a circle (GaussianMixture.ring)
        "ring": {"kind": "ring", "n_modes": 8, "radius": 4.0, "std": 0.4},
        # 8-D: 8 anisotropic modes with random rotations and unequal weights (GaussianMixture.random); closest pair
        # of means (modes 2 and 3) 3.1 apart, median pair 6.2
        "gmm8": {"kind": "random", "dim": 8, "n_modes": 8, "seed": 0, "spread": 1.5, "std_range": (0.3, 0.6)},
    },
    "N": 20,  # uniform Euler grid (M2), K = N, p = 2
    "n_eval": 2000,  # samples per set for ED and its noise floor
    "rewards": {
        "linear": {"base": "ring", "kind": "linear", "a": [1.0, 0.0], "lam": 0.5},
        # concave: r = -k/2 ||x - c||^2 (+ const), c = mode 0's mean; favours mode 0 and its neighbours. Unlike a
        # bump its pull never vanishes far away, so on-policy training is not left in the "stay" basin (M37)
        "quad": {"base": "ring", "kind": "quadratic", "center": [4.0, 0.0], "k": 0.25, "lam": 0.5},
        "bump": {"base": "ring", "kind": "bump", "center": [4.0, 0.0], "width": 1.5, "height": 2.0, "lam": 0.5},
        "bump_gap": {"base": "ring", "kind": "bump", "center": _GAP, "width": 1.0, "height": 2.0, "lam": 0.5},
        "linear_8d": {"base": "gmm8", "kind": "linear", "a": [1.0] + [0.0] * 7, "lam": 0.5},
        "quad_8d": {"base": "gmm8", "kind": "quadratic", "at_mode": 2, "k": 0.25, "lam": 0.5},
        # a bump midway between the closest pair of modes: q* keeps mode 2 and pulls neighbours towards the bump,
        # p* splits the mass between modes 2 and 3
        "bump_8d": {"base": "gmm8", "kind": "bump", "between_modes": (2, 3), "width": 2.0, "height": 3.0, "lam": 0.5},
    },
}


def toy_settings(dim: int | None = None) -> list[str]:
    """Names of the chosen settings (keys of TOY_SETTINGS["rewards"]) whose base lives in `dim` dimensions (all if
    None): 2 -> linear, quad, bump, bump_gap; 8 -> linear_8d, quad_8d, bump_8d."""
    names = list(TOY_SETTINGS["rewards"])
    if dim is None:
        return names
    return [n for n in names if toy_mixture(TOY_SETTINGS["rewards"][n]["base"]).dim == dim]


@functools.lru_cache(maxsize=4)
def toy_mixture(base: str) -> GaussianMixture:
    """The base mixture `base` (a key of TOY_SETTINGS["bases"])."""
    bases = TOY_SETTINGS["bases"]
    if base not in bases:
        raise ValueError(f"unknown toy base {base!r}; expected one of {sorted(bases)}")
    cfg = dict(bases[base])
    kind = cfg.pop("kind")
    if kind == "ring":
        return GaussianMixture.ring(**cfg)
    return GaussianMixture.random(**cfg)


def toy_problem(name: str, dtype: torch.dtype = torch.float64) -> dict[str, Any]:
    """The chosen setting `name` (a key of TOY_SETTINGS["rewards"]): mixture, exact base velocity (M38) in
    `dtype`, reward, lam, uniform grid ts [N+1], N, dim."""
    rewards = TOY_SETTINGS["rewards"]
    if name not in rewards:
        raise ValueError(f"unknown toy setting {name!r}; expected one of {sorted(rewards)}")
    cfg = rewards[name]
    mixture = toy_mixture(cfg["base"])
    if cfg["kind"] == "linear":
        reward = LinearReward(cfg["a"])
    elif cfg["kind"] == "quadratic":  # r = -k/2 ||x - c||^2, c a mode's mean or given
        c = mixture.means[cfg["at_mode"]] if "at_mode" in cfg else torch.as_tensor(cfg["center"], dtype=torch.float64)
        k = float(cfg["k"])
        reward = QuadraticReward(k * torch.eye(mixture.dim, dtype=torch.float64), k * c.to(torch.float64))
    else:
        if "between_modes" in cfg:
            i, j = cfg["between_modes"]
            center = 0.5 * (mixture.means[i] + mixture.means[j])
        else:
            center = cfg["center"]
        reward = BumpReward(center, width=cfg["width"], height=cfg["height"])
    return {
        "mixture": mixture,
        "base_velocity": GaussianMixtureVelocity(mixture).to(dtype),
        "reward": reward,
        "lam": float(cfg["lam"]),
        "ts": uniform_grid(TOY_SETTINGS["N"], dtype=dtype),
        "N": TOY_SETTINGS["N"],
        "dim": mixture.dim,
    }


def toy_references(name: str, n: int | None = None, seed: int = 0, K: int | None = None) -> dict[str, Any]:
    """Reference sample sets for setting `name`, fp64, cached per process: "q_star" (M37, the best-of-starts
    solve, truncated to the last K steps if given), "p_star" (M36, M39), "base" (the base's N-step Euler samples)
    and "exact" (exact mixture samples), n each (default TOY_SETTINGS["n_eval"]), plus "q_info" (the solver's info)
    and the expected V-statistic noise floors 2 E||X - X'|| / n of q* and p* ("q_floor", "p_floor"; see
    `expected_floor`). Do not modify the returned tensors (they are shared by the cache)."""
    n = TOY_SETTINGS["n_eval"] if n is None else int(n)
    return _toy_references(name, n, int(seed), None if K is None else int(K))


@functools.lru_cache(maxsize=16)
def _toy_references(name: str, n: int, seed: int, K: int | None) -> dict[str, Any]:
    P = toy_problem(name)
    g = torch.Generator().manual_seed(seed)
    xq, info = q_star_samples(P["base_velocity"], P["reward"], P["lam"], n, P["ts"], K=K, generator=g, return_info=True)
    xp = sample_tilted(P["mixture"], P["reward"], P["lam"], n, g)
    xb = euler_sample(P["base_velocity"], torch.randn(n, P["dim"], dtype=torch.float64, generator=g), P["ts"])
    xe = P["mixture"].sample(n, g)
    return {
        "q_star": xq,
        "p_star": xp,
        "base": xb,
        "exact": xe,
        "q_info": info,
        "q_floor": expected_floor(xq),
        "p_floor": expected_floor(xp),
        **P,
    }


def toy_q_star_fine(
    name: str, n: int | None = None, seed: int = 0, N_fine: int = 100, dp_grid: int = 241
) -> dict[str, Any]:
    """q* solved on a uniform N_fine-step grid (default 100 = 5 x TOY_SETTINGS["N"]): a stand-in for the
    continuous-time optimum of (M10), cached per process. {"q_star": [n, d], "q_floor", "q_info", "N_fine"}.

    Why: VGG-Flow learns the continuous value gradient (M11-M14), so its fixed point on the N-step grid is the
    N-step Euler flow of v_base - beta grad V, which equals q* of the N-step grid only up to O(h) (M37). On the
    toy h |J_vbase| is not small where the base flow splits between modes (|J| ~ 10), and that O(h) is large:
    on the 2-D ring, linear reward, q*_100 is 0.107 from q*_20 (80x the floor), while a value net distilled
    from q*_100 and sampled on the 20-step grid lands 0.011 from q*_100 and 0.088 from q*_20. Report VGG-Flow's
    distance to both. dp_grid: points per axis of the 2-D DP start (a cheaper 121 with N_fine = 60 lands within
    the noise floor of the default at n = 400)."""
    n = TOY_SETTINGS["n_eval"] if n is None else int(n)
    return _toy_q_star_fine(name, n, int(seed), int(N_fine), int(dp_grid))


@functools.lru_cache(maxsize=8)
def _toy_q_star_fine(name: str, n: int, seed: int, N_fine: int, dp_grid: int) -> dict[str, Any]:
    P = toy_problem(name)
    g = torch.Generator().manual_seed(seed)
    ts = uniform_grid(N_fine)
    kw = {"dp_grid": dp_grid} if P["dim"] == 2 else {}
    xq, info = q_star_samples(P["base_velocity"], P["reward"], P["lam"], n, ts, generator=g, return_info=True, **kw)
    return {"q_star": xq, "q_floor": expected_floor(xq), "q_info": info, "N_fine": N_fine}


# ---- sampling helpers ------------------------------------------------------------------------------


def uniform_grid(N: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """0 = t_0 < ... < t_N = 1, uniform (M2)."""
    if N < 1:
        raise ValueError(f"N must be >= 1, got {N}")
    return torch.linspace(0.0, 1.0, N + 1, dtype=dtype)


def _velocity_fn(model_or_velocity) -> Velocity:
    """A FlowModel (has .velocity) or a plain callable v(x, t)."""
    if hasattr(model_or_velocity, "velocity") and callable(model_or_velocity.velocity):
        return lambda x, t: model_or_velocity.velocity(x, t)
    return model_or_velocity


def euler_sample(model_or_velocity, x0: torch.Tensor, ts: torch.Tensor, controls: torch.Tensor | None = None):
    """Euler (M2) from x0 [B, d] over ts [N+1]; optional additive controls [B, N, d]. No gradient."""
    v = _velocity_fn(model_or_velocity)
    ts = ts.to(device=x0.device, dtype=x0.dtype)
    x = x0
    with torch.no_grad():
        for i in range(ts.shape[0] - 1):
            h = ts[i + 1] - ts[i]
            step = v(x, ts[i])
            if controls is not None:
                step = step + controls[:, i]
            x = x + h * step
    return x


# ---- energy distance (M40) ---------------------------------------------------------------------------


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
    `samples`: E||X - X'|| (1/n + 1/m), estimated with `diversity`. For i.i.d. draws the V-statistic has exactly
    this expectation (its within-set means include the i = i' zeros); resampled sets with duplicates sit a little
    higher (use `noise_floor`)."""
    n = samples.shape[0] if n is None else n
    m = n if m is None else m
    return diversity(samples) * (1.0 / n + 1.0 / m)


# ---- p*: tilted distribution (M36, M39) --------------------------------------------------------------


def tilt_linear(mixture: GaussianMixture, a, lam: float) -> GaussianMixture:
    """p* for r = a^T x (M39): mu_k' = mu_k + Sigma_k a / lam,
    pi_k' ∝ pi_k exp(a^T mu_k / lam + a^T Sigma_k a / (2 lam^2))."""
    _check_lam(lam)
    a = torch.as_tensor(a, dtype=torch.float64)
    Sa = mixture.covariances @ a  # [K, d]
    means = mixture.means + Sa / lam
    logw = torch.log(mixture.weights) + mixture.means @ a / lam + (Sa @ a) / (2 * lam**2)
    return GaussianMixture(means, mixture.covariances, torch.softmax(logw, 0))


def _check_lam(lam: float) -> None:
    if not (isinstance(lam, int | float) and math.isfinite(lam) and lam > 0):
        raise ValueError(f"lam must be a positive finite float, got {lam!r}")


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
    _check_lam(lam)
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


# ---- q*: per-particle optimal open-loop controls (M37) -----------------------------------------------


def _cost(u: torch.Tensor, p: float, cost: str) -> torch.Tensor:
    """c(u) per particle [b] (M24, M26): p = 2: ||u||^2 / 2; 'norm': ||u||^p / p; 'elementwise': sum |u_j|^p / p."""
    if p == 2:
        return 0.5 * (u * u).sum(-1)
    if cost == "norm":
        return torch.linalg.vector_norm(u, dim=-1) ** p / p
    return (u.abs() ** p).sum(-1) / p


def _rollout(x: torch.Tensor, base_velocity: Velocity, ts: torch.Tensor, u=None) -> torch.Tensor:
    for i in range(ts.shape[0] - 1):
        h = ts[i + 1] - ts[i]
        x = x + h * (base_velocity(x, ts[i]) + (0 if u is None else u[:, i]))
    return x


def _euler_inverse(y: torch.Tensor, base_velocity: Velocity, t: torch.Tensor, h: torch.Tensor, iters: int = 30):
    """x with x + h v_base(x, t) = y, by fixed-point iteration (a contraction where h Lip(v_base) < 1)."""
    x = y - h * base_velocity(y, t)
    for _ in range(iters):
        x = y - h * base_velocity(x, t)
    return x


def aimed_start(
    x0: torch.Tensor,
    base_velocity: Velocity,
    ts: torch.Tensor,
    target: torch.Tensor,
    K: int | None = None,
    *,
    mode: str = "pullback",
    ramp: int | None = None,
) -> torch.Tensor:
    """Controls u [B, N, d] (zero before step N - K) aimed at endpoint `target` ([d] or [B, d]), a start for the
    q* solver (M37).

    mode "pullback" (default): pull the target back through the uncontrolled Euler map (y_N = target,
    y_i = Euler^{-1}(y_{i+1})), then blend the uncontrolled path x^0 into y over the first `ramp` active steps
    (default max(1, K // 4)), p_i = x^0_i + min(1, (i - N + K) / ramp) (y_i - x^0_i), and return the controls that
    realise p, u_i = (p_{i+1} - p_i) / h_i - v_base(p_i, t_i). It uses the flow's sensitivity: early, the base
    flow decides between modes at the price of a small displacement, which a constant push cannot see.
    mode "constant": u = (target - x_N^0) / sum_{active} h_i on every active step.
    """
    x0 = x0.detach()
    ts = torch.as_tensor(ts, dtype=x0.dtype)
    N = ts.shape[0] - 1
    K = N if K is None else K
    B, d = x0.shape
    target = torch.as_tensor(target, dtype=x0.dtype).expand(B, d)
    h = ts[1:] - ts[:-1]
    u = torch.zeros(B, N, d, dtype=x0.dtype)
    with torch.no_grad():
        path = [x0]
        for i in range(N):
            path.append(path[-1] + h[i] * base_velocity(path[-1], ts[i]))
        if mode == "constant":
            u[:, N - K :] = ((target - path[N]) / (ts[N] - ts[N - K]))[:, None, :]
            return u
        if mode != "pullback":
            raise ValueError(f"unknown aimed_start mode {mode!r}")
        m = max(1, K // 4) if ramp is None else int(ramp)
        y = [target]
        for i in range(N - 1, N - K - 1, -1):
            y.insert(0, _euler_inverse(y[0], base_velocity, ts[i], h[i]))
        # y[j] pairs with state index N - K + j
        p = [path[N - K]]
        for j in range(1, K + 1):
            rho = min(1.0, j / m)
            p.append(path[N - K + j] + rho * (y[j] - path[N - K + j]))
        for j in range(K):
            i = N - K + j
            u[:, i] = (p[j + 1] - p[j]) / h[i] - base_velocity(p[j], ts[i])
    return u


def _batched_lbfgs(fun, w0: torch.Tensor, *, max_iter: int, gtol: float, history: int, h0: float):
    """Minimise sum_b f_b(w_b) with independent per-particle L-BFGS (own memory, own Armijo backtracking).

    fun(w [b, D], idx [b]) -> f [b] (differentiable). Returns w, f, grad, iterations [B], status [B]
    (0 converged ||g||_inf <= gtol, 1 hit max_iter, 2 line search failed, 3 stalled: the accepted decrease of f was
    at its rounding level 10 times in a row; this happens on stiff particles (endpoints on the unstable ridge
    between two modes, curvature ~1e4) and for gtol below about sqrt(eps |f| lam)).
    """
    B, D = w0.shape

    def fg(w, idx):
        w = w.detach().requires_grad_(True)
        with torch.enable_grad():
            f = fun(w, idx)
            (g,) = torch.autograd.grad(f.sum(), w)
        return f.detach(), g.detach()

    all_idx = torch.arange(B)
    w = w0.detach().clone()
    f, g = fg(w, all_idx)
    S = torch.zeros(history, B, D, dtype=w.dtype)
    Y = torch.zeros_like(S)
    rho = torch.zeros(history, B, dtype=w.dtype)
    gamma = torch.full((B,), h0, dtype=w.dtype)
    iters = torch.zeros(B, dtype=torch.long)
    status = torch.ones(B, dtype=torch.long)
    active = g.abs().amax(-1) > gtol
    status[~active] = 0
    n_tiny = torch.zeros(B, dtype=torch.long)
    patience = 10
    c1 = 1e-4
    for it in range(max_iter):
        idx = active.nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        gi = g[idx]
        # two-loop recursion, newest pair first (slots are a ring buffer indexed by iteration)
        q = gi.clone()
        slots = [(it - 1 - j) % history for j in range(min(it, history))]
        alphas = []
        for s in slots:
            a = rho[s, idx] * (S[s, idx] * q).sum(-1)
            alphas.append(a)
            q = q - a[:, None] * Y[s, idx]
        r = gamma[idx, None] * q
        for s, a in zip(reversed(slots), reversed(alphas)):
            b = rho[s, idx] * (Y[s, idx] * r).sum(-1)
            r = r + S[s, idx] * (a - b)[:, None]
        d = -r
        gd = (gi * d).sum(-1)
        bad = ~(gd < 0) | ~torch.isfinite(gd)
        if bad.any():  # not a descent direction: restart from steepest descent, forget the history
            d[bad] = -gamma[idx[bad], None] * gi[bad]
            gd[bad] = (gi[bad] * d[bad]).sum(-1)
            rho[:, idx[bad]] = 0
        # per-particle backtracking (Armijo): alpha = 1 first, then 8 halvings per batched evaluation
        alpha = torch.ones(idx.numel(), dtype=w.dtype)
        wi, fi = w[idx], f[idx]
        with torch.no_grad():
            ft = fun(wi + d, idx)
            accepted = torch.isfinite(ft) & (ft <= fi + c1 * gd)
            for rnd in range(5):
                todo = (~accepted).nonzero().squeeze(1)
                if todo.numel() == 0:
                    break
                cand = 0.5 ** torch.arange(8 * rnd + 1, 8 * rnd + 9, dtype=w.dtype)  # [8]
                nt = todo.numel()
                trial = wi[todo, None, :] + cand[None, :, None] * d[todo, None, :]  # [nt, 8, D]
                ft = fun(trial.reshape(nt * 8, -1), idx[todo].repeat_interleave(8)).view(nt, 8)
                ok = torch.isfinite(ft) & (ft <= fi[todo, None] + c1 * cand[None] * gd[todo, None])
                any_ok = ok.any(1)
                first = ok.float().argmax(1)  # the largest acceptable step
                alpha[todo[any_ok]] = cand[first[any_ok]]
                accepted[todo[any_ok]] = True
        alpha[~accepted] = 0.0
        w_new = wi + alpha[:, None] * d
        f_new, g_new = fg(w_new, idx)
        s_vec, y_vec = w_new - wi, g_new - gi
        sy = (s_vec * y_vec).sum(-1)
        valid = accepted & (sy > 1e-12 * s_vec.norm(dim=-1) * y_vec.norm(dim=-1)) & (sy > 0)
        slot = it % history
        S[slot, idx], Y[slot, idx] = s_vec, y_vec
        rho[slot, idx] = torch.where(valid, 1.0 / torch.where(valid, sy, torch.ones_like(sy)), torch.zeros_like(sy))
        yy = (y_vec * y_vec).sum(-1)
        gamma[idx] = torch.where(valid, sy / torch.where(valid, yy, torch.ones_like(yy)), gamma[idx])
        w[idx], f[idx], g[idx] = w_new, f_new, g_new
        iters[idx] += 1
        done = g_new.abs().amax(-1) <= gtol
        # decreases at the rounding level of f for `patience` iterations in a row: no further progress possible
        tiny = accepted & ~done & (fi - f_new <= 1e-14 * (1 + fi.abs()))
        n_tiny[idx] = torch.where(tiny, n_tiny[idx] + 1, torch.zeros_like(n_tiny[idx]))
        stalled = n_tiny[idx] >= patience
        status[idx[done]] = 0
        status[idx[~accepted & ~done]] = 2
        status[idx[stalled]] = 3
        active[idx[done | ~accepted | stalled]] = False
    return w, f, g, iters, status


def solve_optimal_controls(
    x0: torch.Tensor,
    base_velocity: Velocity,
    reward: Reward,
    lam: float,
    ts: torch.Tensor,
    K: int | None = None,
    p: float = 2.0,
    *,
    cost: str = "norm",
    starts: Sequence[str | torch.Tensor] | None = None,
    max_iter: int = 500,
    gtol: float = 1e-7,
    history: int = 30,
    improve_tol: float = 1e-6,
    dp_grid: int = 241,
    dp_lim: float | None = None,
    continuation_scales: Sequence[float] = (1 / 16, 1 / 8, 1 / 4, 1 / 2),
):
    """Per particle, min over u_0..u_{N-1} of J = sum_i h_i lam c(u_i) - r(x_N) on the Euler grid ts with the exact
    v_base (M37); u_i = 0 for i < N - K (truncated horizon). c as in (M26): p = 2 quadratic, else 'norm'
    (||u||^p / p) or 'elementwise' (sum |u_j|^p / p), p > 1. base_velocity: a callable v(x, t) evaluated in fp64
    (a GaussianMixtureVelocity of any dtype, or a FlowModel's frozen `.base`), x0 [B, d].

    Computed in fp64 (x0 is cast). Optimisation variable w_i = sqrt(h_i) u_i (so the p = 2 cost is lam/2 ||w||^2
    for any grid), per-particle L-BFGS with Armijo backtracking, stop at ||grad_w J||_inf <= gtol.

    starts: "zero" (u = 0), "aimed" (one pull-back `aimed_start` per target of reward.aim_targets: a bump's centres,
    or x_N^0 + a / lam for a linear reward), "aimed_constant" (the same targets, constant controls), a tensor of
    target endpoints [d] / [B, d] (pull-back), a tensor of controls [B, N, d] (used as given on the active steps:
    e.g. a trained model's own controls, to find the local optimum it sits near), or "dp" (2-D: the greedy policy of
    `GridDP2D` with dp_grid^2 points on [-dp_lim, dp_lim]^2, default lim = 2 + max(|x_N^0|, |aim targets|)). Default
    (None): ("zero", "aimed", "dp") in 2-D with a separable cost, else ("zero", "aimed"). Each start is solved to
    convergence; the best J per particle is kept (M37: from u = 0 many particles stop at a local optimum; in 2-D the
    DP start finds the better optimum for 25-50% of them on the chosen settings).

    Returns (u [B, N, d], x_N [B, d], info): info["objective"] [B], ["objective_by_start"] [S, B],
    ["start_names"], ["improved"] (particles whose best J beats the first start's by more than
    improve_tol * (1 + |J|)), ["improved_by_start"], ["best_start"] [B], ["grad_norm"] [B] (||grad_w J||_inf at
    the kept solution), ["grad_norm_max"], ["grad_norm_median"], ["converged_frac"], ["status"] [B], ["iterations"],
    ["reward"] [B], ["control_cost"] [B].
    """
    _check_lam(lam)
    if not (math.isfinite(p) and p > 1):
        raise ValueError(f"p must be > 1, got {p}")
    if cost not in ("norm", "elementwise"):
        raise ValueError(f"cost must be 'norm' or 'elementwise', got {cost!r}")
    x0 = x0.detach().to(torch.float64)
    ts = torch.as_tensor(ts, dtype=torch.float64)
    N = ts.shape[0] - 1
    K = N if K is None else int(K)
    if not 1 <= K <= N:
        raise ValueError(f"K must be in [1, {N}], got {K}")
    B, d = x0.shape
    h = ts[1:] - ts[:-1]
    if not bool((h > 0).all()):
        raise ValueError("ts must be strictly increasing")
    ts_act, h_act = ts[N - K :], h[N - K :]
    sq = h_act.sqrt()
    with torch.no_grad():
        x_start = _rollout(x0, base_velocity, ts[: N - K + 1])  # the fixed, uncontrolled prefix
        x_end0 = _rollout(x_start, base_velocity, ts_act)

    def objective_at(lam_: float):
        def objective(w_flat: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            w = w_flat.view(-1, K, d)
            x = x_start[idx]
            total = torch.zeros(x.shape[0], dtype=x.dtype)
            for i in range(K):
                u = w[:, i] / sq[i]
                x = x + h_act[i] * (base_velocity(x, ts_act[i]) + u)
                total = total + h_act[i] * lam_ * _cost(u, p, cost)
            return total - reward(x)

        return objective

    objective = objective_at(lam)

    if starts is None:
        starts = ("zero", "aimed", "continuation") + (("dp",) if d == 2 and (p == 2 or cost == "elementwise") else ())

    def w_from_u(u: torch.Tensor) -> torch.Tensor:
        return (u[:, N - K :] * sq[None, :, None]).contiguous()

    aim = getattr(reward, "aim_targets", None)
    targets = [q.to(torch.float64) for q in aim(x_end0, lam)] if aim is not None else []  # the reward's maxima
    inits: list[tuple[str, torch.Tensor]] = []
    for s in starts:
        if isinstance(s, str):
            if s == "zero":
                inits.append(("zero", torch.zeros(B, K, d, dtype=torch.float64)))
            elif s == "dp":
                if d != 2:
                    raise ValueError("the 'dp' start is 2-D only")
                if dp_lim is not None:
                    lim = float(dp_lim)
                else:  # cover the uncontrolled endpoints and the reward's aim targets
                    pts = [x_end0] + targets
                    lim = 2.0 + max(2.0, max(float(q.abs().max()) for q in pts))
                dp = GridDP2D(base_velocity, reward, lam, ts, K, p, cost, lim=lim, G=dp_grid)
                inits.append(("dp", w_from_u(dp.controls(x0))))
            elif s == "continuation":
                # (M37) homotopy in lam: solve with a reward 16x stronger than the target (every particle that
                # can reach a reward maximum does), then relax lam by factors of 2, warm-starting each stage.
                # It follows the "moved" branch of a particle's optima as far as that branch exists, which the
                # zero and aimed starts do not reach on mode-switching rewards (8-D bump: it improves J for
                # about half of the particles over both).
                w = w_from_u(aimed_start(x0, base_velocity, ts, targets[0], K)) if targets else \
                    torch.zeros(B, K, d, dtype=torch.float64)  # fmt: skip
                for scale in continuation_scales:
                    w = _batched_lbfgs(objective_at(lam * scale), w.reshape(B, K * d), max_iter=max_iter,
                                       gtol=gtol * 10, history=history, h0=1 / (lam * scale))[0]  # fmt: skip
                inits.append(("continuation", w.reshape(B, K, d)))
            elif s in ("aimed", "aimed_constant"):
                mode = "pullback" if s == "aimed" else "constant"
                for j, tgt in enumerate(targets):
                    u0 = aimed_start(x0, base_velocity, ts, tgt, K, mode=mode)
                    inits.append((f"{s}{j}", w_from_u(u0)))
            else:
                raise ValueError(f"unknown start {s!r}")
        else:
            tgt = torch.as_tensor(s, dtype=torch.float64)
            if tgt.dim() == 3:  # controls [B, N, d]: start from them (e.g. a trained model's own controls)
                if tuple(tgt.shape) != (B, N, d):
                    raise ValueError(f"a control start must be [B, N, d] = {(B, N, d)}, got {tuple(tgt.shape)}")
                inits.append((f"controls{len(inits)}", w_from_u(tgt)))
                continue
            inits.append((f"target{len(inits)}", w_from_u(aimed_start(x0, base_velocity, ts, tgt, K))))
    if not inits:
        raise ValueError("no starts (the reward has no aim_targets and no other start was given)")

    results = []
    for _, w0 in inits:
        results.append(
            _batched_lbfgs(objective, w0.reshape(B, K * d), max_iter=max_iter, gtol=gtol, history=history, h0=1 / lam)
        )
    F = torch.stack([r[1] for r in results])  # [S, B]
    best = F.argmin(0)
    ar = torch.arange(B)
    W = torch.stack([r[0] for r in results])[best, ar]
    G = torch.stack([r[2] for r in results])[best, ar]
    status = torch.stack([r[4] for r in results])[best, ar]
    f_best = F[best, ar]
    tol = improve_tol * (1 + F[0].abs())
    improved = F[0] - f_best > tol
    improved_by_start = {name: int((F[0] - F[j] > tol).sum()) for j, (name, _) in enumerate(inits) if j > 0}

    u_full = torch.zeros(B, N, d, dtype=torch.float64)
    u_full[:, N - K :] = W.view(B, K, d) / sq[None, :, None]
    with torch.no_grad():
        x_N = _rollout(x_start, base_velocity, ts_act, u_full[:, N - K :])
        r_end = reward(x_N).to(torch.float64)
    ccost = (h_act[None, :] * lam * _cost(u_full[:, N - K :], p, cost)).sum(-1)
    gn = G.abs().amax(-1)
    info = {
        "objective": f_best,
        "objective_by_start": F,
        "start_names": [name for name, _ in inits],
        "best_start": best,
        "improved": int(improved.sum()),
        "improved_frac": float(improved.float().mean()),
        "improved_by_start": improved_by_start,
        "grad_norm": gn,
        "grad_norm_max": float(gn.max()),
        "grad_norm_median": float(gn.median()),
        "converged_frac": float((status == 0).float().mean()),
        "status": status,
        "iterations": [int(r[3].max()) for r in results],
        "reward": r_end,
        "control_cost": ccost,
        "K": K,
    }
    return u_full, x_N, info


def model_controls(model, x0: torch.Tensor, ts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(u [B, N, d], x_N [B, d]): the open-loop controls u_i = v_theta(x_i, t_i) - v_base(x_i, t_i) that reproduce a
    FlowModel's own N-step Euler path from x0 (M2, M24), in x0's dtype, without gradient.

    Passed as a start to `solve_optimal_controls` (starts=(u,)), L-BFGS finds the local optimum of (M37) that the
    model sits near: its distance to the model's samples measures training error, its distance to q* (the best
    of several starts) the cost of landing in another basin."""
    ts = torch.as_tensor(ts, dtype=x0.dtype)
    x, us = x0, []
    with torch.no_grad():
        for i in range(ts.shape[0] - 1):
            v = model.velocity(x, ts[i])
            with model.base_velocity():
                u = v - model.velocity(x, ts[i])
            us.append(u)
            x = x + (ts[i + 1] - ts[i]) * v
    return torch.stack(us, 1), x


def q_star_samples(
    base_velocity: Velocity,
    reward: Reward,
    lam: float,
    n: int,
    ts: torch.Tensor,
    *,
    dim: int | None = None,
    K: int | None = None,
    p: float = 2.0,
    generator: torch.Generator | None = None,
    return_info: bool = False,
    **solver_kwargs,
):
    """n samples of q* (M37): x0 ~ N(0, I) (fp64, from `generator`) pushed forward under its optimal control."""
    d = dim if dim is not None else getattr(base_velocity, "dim", None)
    if d is None:
        raise ValueError("pass dim= for a velocity without a .dim attribute")
    x0 = torch.randn(n, d, dtype=torch.float64, generator=generator)
    _, x_N, info = solve_optimal_controls(x0, base_velocity, reward, lam, ts, K, p, **solver_kwargs)
    return (x_N, info) if return_info else x_N


# ---- 2-D dynamic programming (M37) ----------------------------------------------------------------


def _bilinear(V: torch.Tensor, lo: float, step: float, pts: torch.Tensor) -> torch.Tensor:
    """Bilinear interpolation of V [G, G] (V[i, j] at (lo + i step, lo + j step)) at pts [..., 2], clamped."""
    G = V.shape[0]
    f = ((pts - lo) / step).clamp(0, G - 1 - 1e-9)
    i0 = f.floor().long()
    fr = f - i0
    i, j = i0[..., 0], i0[..., 1]
    a, b = fr[..., 0], fr[..., 1]
    return V[i, j] * (1 - a) * (1 - b) + V[i + 1, j] * a * (1 - b) + V[i, j + 1] * (1 - a) * b + V[i + 1, j + 1] * a * b


def _infconv_1d(V: torch.Tensor, pen: torch.Tensor, dim: int, chunk: int = 32) -> torch.Tensor:
    """E[i] = min_k pen[|i - k|] + V[k] along `dim` of a [G, G] grid (brute force, chunked)."""
    if dim == 1:
        return _infconv_1d(V.T.contiguous(), pen, 0, chunk).T.contiguous()
    G = V.shape[0]
    idx = torch.arange(G)
    out = torch.empty_like(V)
    for s in range(0, G, chunk):
        P = pen[(idx[s : s + chunk, None] - idx[None, :]).abs()]  # [c, G]
        out[s : s + chunk] = (P[:, :, None] + V[None, :, :]).amin(1)
    return out


class GridDP2D:
    """Grid dynamic programming for the 2-D control problem of (M37); an independent check of, and a start for,
    the L-BFGS solver.

    Backward: V_N = -r; V_i(x) = min_y h_i lam c((y - z) / h_i) + V_{i+1}(y), z = x + h_i v_base(x, t_i), with the
    minimum over y on the G x G grid of [-lim, lim]^2 (a separable inf-convolution: c = |u|^2 / 2 (p = 2) or the
    elementwise sum |u_j|^p / p), then bilinear interpolation at z. Accurate to about the grid spacing (the value
    function is steep where the base flow splits between modes). `value(x0)` = V at the state the uncontrolled
    prefix reaches (comparable with the solver's objective); `controls(x0)` = the greedy DP policy, its jump
    searched on a window fine enough to resolve the grid and wide enough for the largest worthwhile jump.
    """

    def __init__(
        self,
        base_velocity: Velocity,
        reward: Reward,
        lam: float,
        ts: torch.Tensor,
        K: int | None = None,
        p: float = 2.0,
        cost: str = "norm",
        *,
        lim: float = 7.0,
        G: int = 241,
    ):
        _check_lam(lam)
        if not (p == 2 or cost == "elementwise"):
            raise ValueError("GridDP2D needs a separable cost: p = 2 or cost='elementwise'")
        self.base_velocity, self.reward, self.lam, self.p = base_velocity, reward, float(lam), float(p)
        self.ts = torch.as_tensor(ts, dtype=torch.float64)
        self.N = self.ts.shape[0] - 1
        self.K = self.N if K is None else int(K)
        self.lim, self.G = float(lim), int(G)
        ax = torch.linspace(-lim, lim, G, dtype=torch.float64)
        self.step = float(ax[1] - ax[0])
        grid = torch.stack(torch.meshgrid(ax, ax, indexing="ij"), -1).reshape(-1, 2)
        N, K = self.N, self.K
        offs = torch.arange(G, dtype=torch.float64) * self.step
        with torch.no_grad():
            V = -reward(grid).reshape(G, G).to(torch.float64)
            self.V = [V]  # self.V[j] is the value at state index N - j ... reversed below
            for i in range(N - 1, N - K - 1, -1):
                h = float(self.ts[i + 1] - self.ts[i])
                pen = h * self.lam * self._c1(offs / h)
                E = _infconv_1d(_infconv_1d(V, pen, 0), pen, 1)
                z = grid + h * base_velocity(grid, self.ts[i])
                V = _bilinear(E, -self.lim, self.step, z).reshape(G, G)
                self.V.append(V)
        self.V.reverse()  # self.V[j]: value at state index N - K + j

    def _c1(self, u: torch.Tensor) -> torch.Tensor:
        return 0.5 * u * u if self.p == 2 else u.abs() ** self.p / self.p

    def _prefix(self, x0: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return _rollout(x0.to(torch.float64), self.base_velocity, self.ts[: self.N - self.K + 1])

    def value(self, x0: torch.Tensor) -> torch.Tensor:
        """DP approximation of min_u J for particles starting at x0 [B, 2] (t = 0)."""
        return _bilinear(self.V[0], -self.lim, self.step, self._prefix(x0))

    def controls(self, x0: torch.Tensor, max_window: int = 41, chunk: int = 512) -> torch.Tensor:
        """Greedy DP policy from x0 [B, 2]: controls u [B, N, 2] (zero before step N - K)."""
        N, K = self.N, self.K
        x = self._prefix(x0)
        B = x.shape[0]
        u = torch.zeros(B, N, 2, dtype=torch.float64)
        with torch.no_grad():
            for j in range(K):
                i = N - K + j
                h = float(self.ts[i + 1] - self.ts[i])
                Vn = self.V[j + 1]
                spread = float(Vn.max() - Vn.min())
                # largest worthwhile jump: h lam c(jump / h) <= spread
                reach = (
                    h * (2 * spread / (h * self.lam)) ** 0.5
                    if self.p == 2
                    else h * (self.p * spread / (h * self.lam)) ** (1 / self.p)
                )
                half = (max_window - 1) // 2
                sp = max(self.step / 2, reach / half)
                o = torch.arange(-half, half + 1, dtype=torch.float64) * sp
                offs = torch.stack(torch.meshgrid(o, o, indexing="ij"), -1).reshape(-1, 2)  # [C, 2]
                cost_o = h * self.lam * self._c1(offs / h).sum(-1)  # [C]
                z = x + h * self.base_velocity(x, self.ts[i])
                best = torch.empty(B, dtype=torch.long)
                for s in range(0, B, chunk):
                    cand = z[s : s + chunk, None, :] + offs[None]
                    tot = cost_o[None] + _bilinear(Vn, -self.lim, self.step, cand)
                    best[s : s + chunk] = tot.argmin(-1)
                jump = offs[best]
                u[:, i] = jump / h
                x = z + jump
        return u


def dp_values_2d(base_velocity: Velocity, reward: Reward, lam: float, ts: torch.Tensor, K: int | None = None, **kw):
    """x0 -> the GridDP2D value (see there); kept as a function for quick checks."""
    return GridDP2D(base_velocity, reward, lam, ts, K, **kw).value


# ---- yardsticks and diagnostics (M40, M41) -----------------------------------------------------------


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
    coarse = uniform_grid(N, dtype) if ts is None else torch.as_tensor(ts, dtype=dtype)
    xa = euler_sample(model_or_velocity, torch.randn(n, d, dtype=dtype, generator=g), coarse)
    xb = euler_sample(model_or_velocity, torch.randn(n, d, dtype=dtype, generator=g), uniform_grid(N_fine, dtype))
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


def diversity(samples: torch.Tensor, max_n: int = 4000) -> float:
    """Mean pairwise Euclidean distance over distinct pairs (first max_n samples), fp64."""
    x = samples.detach().reshape(samples.shape[0], -1).to(torch.float64).cpu()[:max_n]
    n = x.shape[0]
    if n < 2:
        raise ValueError("diversity needs at least 2 samples")
    return float(_pair_sum(x, x, 1 << 22) / (n * (n - 1)))


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
    ts = uniform_grid(N, dt) if ts is None else torch.as_tensor(ts, dtype=dt)
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


# ---- the settings table (python -m flowkern.metrics.ground_truth) -----------------------------------------


def settings_table(names: Sequence[str] | None = None, n: int | None = None, repeats: int = 3) -> list[dict]:
    """Distinguishability of q* and p* for the chosen settings (module docstring): one row per setting."""
    import time

    rows = []
    for name in names or list(TOY_SETTINGS["rewards"]):
        t0 = time.perf_counter()
        R = toy_references(name, n, seed=0)
        nn = R["q_star"].shape[0]
        xq2 = toy_references(name, nn, seed=1)["q_star"]
        mix, reward, lam = R["mixture"], R["reward"], R["lam"]
        pf = noise_floor(
            lambda k, g, mix=mix, reward=reward, lam=lam: sample_tilted(mix, reward, lam, k, g),
            nn,
            repeats,
            torch.Generator().manual_seed(2),
        )
        ef = noise_floor(lambda k, g, mix=mix: mix.sample(k, g), nn, repeats, torch.Generator().manual_seed(3))
        info = R["q_info"]
        xq, xp, xb = R["q_star"], R["p_star"], R["base"]
        rows.append(
            {
                "name": name,
                "ed_qp": energy_distance(xq, xp),
                "floor_q": energy_distance(xq, xq2),
                "floor_q_expected": R["q_floor"],
                "floor_p": pf["mean"],
                "floor_base": ef["mean"],
                "ed_base_q": energy_distance(xb, xq),
                "ed_base_p": energy_distance(xb, xp),
                "disc_gap": discretization_gap(R["base_velocity"], R["N"], 1000, nn),
                "reward_q": float(reward(xq).mean()),
                "reward_p": float(reward(xp).mean()),
                "reward_base": float(reward(xb).mean()),
                "coverage_q": mode_coverage(xq, mix),
                "coverage_p": mode_coverage(xp, mix),
                "offmode_q": mode_masses(xq, mix)[1],
                "improved": info["improved"],
                "improved_by_start": info["improved_by_start"],
                "grad_norm_max": info["grad_norm_max"],
                "converged_frac": info["converged_frac"],
                "n": nn,
                "seconds": time.perf_counter() - t0,
            }
        )
    return rows


def main() -> None:  # pragma: no cover - a report, exercised by hand
    import argparse

    ap = argparse.ArgumentParser(description="q* vs p* distinguishability table for the toy settings")
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--settings", nargs="*", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)  # tiny tensors: more threads only add contention
    rows = settings_table(args.settings, args.n, args.repeats)
    hdr = (
        f"{'reward':9s} {'ED(q*,p*)':>9s} {'floor q*':>9s} {'floor p*':>9s} {'ED(b,q*)':>9s} {'ED(b,p*)':>9s} "
        f"{'gap N=20':>9s} {'floor b':>9s} {'r q*':>6s} {'r p*':>6s} {'r b':>6s} {'cov q*':>6s} {'cov p*':>6s} "
        f"{'off q*':>6s} improved-by-start (n)"
    )
    print(hdr)
    for r in rows:
        print(
            f"{r['name']:9s} {r['ed_qp']:9.4f} {r['floor_q']:9.4f} {r['floor_p']:9.4f} {r['ed_base_q']:9.4f} "
            f"{r['ed_base_p']:9.4f} {r['disc_gap']:9.4f} {r['floor_base']:9.4f} {r['reward_q']:6.2f} "
            f"{r['reward_p']:6.2f} {r['reward_base']:6.2f} {r['coverage_q']:6.3f} {r['coverage_p']:6.3f} "
            f"{r['offmode_q']:6.3f} {r['improved']} {r['improved_by_start']} ({r['n']}); "
            f"max|grad| {r['grad_norm_max']:.1e}, conv {r['converged_frac']:.3f}, {r['seconds']:.0f}s"
        )


if __name__ == "__main__":  # pragma: no cover
    main()

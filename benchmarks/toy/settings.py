"""The chosen toy settings and their cached references (M36-M40); `python -m benchmarks.toy` prints the table.

Two references per (reward r, lam = 1/beta, grid): p* (M36, `tilted.py`), the fixed point of memoryless adjoint
matching, and q* (M37, `optimal_control.py`), the fixed point of deterministic adjoint matching and, up to O(h), of
VGG-Flow. The settings below are chosen so that the two are many noise floors apart.

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
`python -m benchmarks.toy` reprints it).
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
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Sequence
from typing import Any

import torch

from flowkern.models.toy import BumpReward, GaussianMixture, GaussianMixtureVelocity, LinearReward, QuadraticReward
from flowkern.sampling import sample_euler, uniform_grid

from .distances import discretization_gap, energy_distance, expected_floor, mode_coverage, mode_masses, noise_floor
from .optimal_control import q_star_samples
from .tilted import sample_tilted

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
        "ts": uniform_grid(TOY_SETTINGS["N"]).to(dtype),
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
    xb = sample_euler(P["base_velocity"], torch.randn(n, P["dim"], dtype=torch.float64, generator=g), P["ts"]).final
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


def settings_table(names: Sequence[str] | None = None, n: int | None = None, repeats: int = 3) -> list[dict]:
    """Distinguishability of q* and p* for the chosen settings (module docstring): one row per setting."""
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

"""Toy alignment with ground truth (issue 4, math.md section 10): every method against its known optimum.

Bases (``TOY_SETTINGS`` of ``benchmarks.toy``): the 8-mode ring in 2-D and an 8-mode anisotropic
mixture in 8-D, each with its exact rectified-flow velocity (M38) plus a zero-initialised residual MLP, through the
FlowModel protocol (``flowkern.models.toy.make_toy_model``); uniform Euler grid N = 20, lam = 0.5 (beta = 2).
References:

- q* (M37): push-forward of N(0, I) under the per-particle optimal open-loop control on the N-step grid (best of
  the zero, aimed, continuation-in-lam and, in 2-D, dynamic-programming starts): the fixed point of deterministic AM
  (K = N, p = 2);
- q*_100: the same solved on a 100-step grid, a stand-in for the continuous-time optimum that VGG-Flow's value
  gradient (M11-M14) describes: VGG-Flow's fixed point is q* only up to O(h) (M37), and on the toy that O(h) is
  large (``toy.toy_q_star_fine``), so VGG-Flow rows show both;
- q*_loc: the local optimum of (M37) that L-BFGS reaches from the trained model's own controls (same x0 as the
  model's samples): ED(model, q*_loc) is training error, ED(q*_loc, q*) the cost of another basin;
- p* ∝ p_base exp(beta r) (M36, M39): the fixed point of memoryless AM.

Distances are energy distances (M40) at n samples per set, beside the expected reference-vs-reference noise floors
and the base model's own distance. ReFL and DRaFT have no target: reward and diversity (mean pairwise distance).

    python -m benchmarks.toy_alignment --out results.md    # long: 2-D tables (~30 min on one core)
    python -m benchmarks.toy_alignment --dim 8 --no-fine   # long: 8-D tables (q*_100 = q* to ~2 floors in 8-D)
    python -m benchmarks.toy_alignment --updates 1600 --methods vggflow_fd,vggflow_exact,am_memoryless
    python -m benchmarks.toy_alignment --distill           # capacity: the residual MLP regressed on q*
    python -m benchmarks.toy_alignment --quick             # a shorter run

Measured results and the diagnosis of what limits each method: benchmarks/results/toy/README.md.

Settings (chosen once, ``RunConfig`` + ``METHOD_SETTINGS``): 256 trajectories per update (1024 for memoryless AM,
whose stochastic targets need them), 800 updates, AdamW with a
cosine learning-rate decay, residual MLP 128x3; VGG-Flow with eta = 'constant', no reward-gradient clipping (the
toy's gradients are O(1); clipping would move the fixed point away from q*), alpha = 100, default eps, subsampling
f = 0.25; DAM K = N = 20, p = 2; memoryless AM on a uniform N = 20 memoryless grid (M29), T = the last 5 steps +
5 random ones (M33 scaled to N = 20), no loss clamp; DRaFT K = 3; ReFL i ~ U{15..19}.

The CI test (tests/test_toy_alignment.py) imports ``run_method`` / ``references`` with a short configuration.
"""

from __future__ import annotations

import argparse
import logging
import math
import shlex
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from benchmarks import toy
from flowkern.methods import SmallValueNet, flow_callables, registry
from flowkern.methods.registry import MethodSettings
from flowkern.metrics.diversity import FlattenFeatures, diversity
from flowkern.models.toy import make_toy_model
from flowkern.sampling import sample_euler
from flowkern.train import TrainConfig, Trainer

METHODS = ("vggflow_fd", "vggflow_exact", "dam", "am_memoryless", "refl", "draft")
# the reference each regularised method converges to: "q" q* of the N-step grid (DAM's discrete adjoint, M25-M28),
# "q_fine" q*_100 (VGG-Flow's continuous-time value gradient, M11-M14; falls back to "q" without it), "p" p* (M36)
REGULARISED = {
    "vggflow_fd": "q_fine",
    "vggflow_exact": "q_fine",
    "vggflow_central": "q_fine",
    "dam": "q",
    "dam_k3": "q",
    "am_memoryless": "p",
}
REF_LABEL = {"q": "q*", "q_fine": "q*_100", "p": "p*"}
Q_METHODS = ("vggflow_fd", "vggflow_exact", "dam")  # acceptance (a)
N_FINE = 100  # grid of the q*_100 reference


@dataclass
class RunConfig:
    """One training run. Defaults: the long benchmark; the CI test shortens updates/batch."""

    updates: int = 800  # VGG-Flow's value net is the slowest to settle: at 400 it stops at 2x its 800 distance
    batch_size: int | None = None  # None: the method's METHOD_SETTINGS value, else 256
    lr: float | None = None  # None: the method's METHOD_SETTINGS value
    lr_schedule: str = "cosine"
    value_lr: float | None = None
    hidden: int = 128
    depth: int = 3
    value_hidden: int | None = None  # VGG-Flow's value net; None = hidden / depth
    value_depth: int | None = None
    eval_every: int = 200
    n_eval: int = 2000
    seed: int = 0
    am_steps: int = 20  # memoryless AM grid (uniform, M29); inference always uses the N-step Euler grid (M30)
    local: bool = False  # also solve q*_loc from the final model's controls (long run)
    overrides: dict = field(default_factory=dict)


def references(
    name: str,
    n: int,
    seed: int = 0,
    K: int | None = None,
    fine: bool = False,
    fine_steps: int = N_FINE,
    fine_dp_grid: int = 241,
) -> dict[str, Any]:
    """q* (M37, best-of-starts solve, truncated to the last K steps if given), p* (M36, M39) and the base's N-step
    samples from ``toy.toy_references`` (cached per process), with their distances and noise floors;
    fine=True adds q*_100 (``toy.toy_q_star_fine`` on a fine_steps grid; the CI test uses a cheaper
    60-step grid and a 121-point DP start)."""
    t0 = time.perf_counter()
    R = toy.toy_references(name, n, seed, K)
    t_ref = time.perf_counter() - t0
    q, p, base = R["q_star"], R["p_star"], R["base"]
    out = {
        "name": name,
        "problem": R,
        "q": q,
        "p": p,
        "base": base,
        "floor_q": R["q_floor"],
        "floor_p": R["p_floor"],
        "base_to_q": toy.energy_distance(base, q),
        "base_to_p": toy.energy_distance(base, p),
        "q_to_p": toy.energy_distance(q, p),
        "q_improved_by_aimed_start": R["q_info"]["improved"],
        "q_improved_by_start": R["q_info"]["improved_by_start"],
        "q_solve_s": t_ref,
        "reward_q": float(R["reward"](q).mean()),
        "reward_p": float(R["reward"](p).mean()),
        "reward_base": float(R["reward"](base).mean()),
        "diversity_base": diversity(base, FlattenFeatures()),
        # (M40) second yardstick: the base's own N-step Euler samples vs exact mixture samples
        "base_gap": toy.energy_distance(base, R["exact"]),
        "floor_exact": toy.expected_floor(R["exact"]),
    }
    if fine:
        t0 = time.perf_counter()
        F = toy.toy_q_star_fine(name, n, seed, fine_steps, fine_dp_grid)
        out.update(
            q_fine=F["q_star"],
            floor_q_fine=F["q_floor"],
            q_fine_to_q=toy.energy_distance(F["q_star"], q),
            q_fine_to_p=toy.energy_distance(F["q_star"], p),
            base_to_q_fine=toy.energy_distance(base, F["q_star"]),
            reward_q_fine=float(R["reward"](F["q_star"]).mean()),
            q_fine_solve_s=time.perf_counter() - t0,
        )
    return out


# per-method training settings (chosen once on the toy; RunConfig fields, "overrides" go to the method).
# VGG-Flow: alpha = 100 instead of the paper's 1e4 (M19 table): with Adam and a per-group gradient clip, the
# boundary term's gradient at 1e4 dominates phi's update early on. Ring, linear reward, 400 updates: ED to q*_100
# 0.048 / 0.100 (seeds 0 / 1) with alpha = 100 against 0.116 (seed 1) with 1e4; alpha = 1 loses the boundary (0.30).
METHOD_SETTINGS: dict[str, dict[str, Any]] = {
    "vggflow_fd": {"lr": 4e-3, "value_lr": 1e-2, "overrides": {"eta_mode": "constant", "alpha": 100.0}},
    "vggflow_exact": {"lr": 4e-3, "value_lr": 1e-2, "overrides": {"eta_mode": "constant", "alpha": 100.0}},
    "vggflow_central": {"lr": 4e-3, "value_lr": 1e-2, "overrides": {"eta_mode": "constant", "alpha": 100.0}},
    "dam": {"lr": 4e-3},
    "dam_k3": {"lr": 4e-3},
    # memoryless AM is variance-limited: its early-step targets -sigma_i^2 a_{i+1} / 2 (M32; sigma_0^2 = 42 on N = 20)
    # put noise 4 a in the gradient against a signal (8 / sigma^2) (v - v_base). quad_8d, 400 updates: ED to p* 25% /
    # 10% / 7% of the base's at 256 / 1024 / 2048 trajectories; 256 trajectories at any lr plateau at 17-27%.
    "am_memoryless": {"lr": 5e-3, "batch_size": 1024},
    "refl": {"lr": 2e-3},
    "draft": {"lr": 2e-3},
}


def settings_for(name: str, cfg: RunConfig) -> RunConfig:
    """cfg with the method's METHOD_SETTINGS filled in where cfg leaves None (and under cfg.overrides)."""
    spec = dict(METHOD_SETTINGS.get(name, {}))
    overrides = {**spec.pop("overrides", {}), **cfg.overrides}
    fields = {k: v for k, v in vars(cfg).items() if k != "overrides"}
    for key, value in spec.items():
        if fields.get(key) is None:
            fields[key] = value
    if fields["lr"] is None:
        fields["lr"] = 2e-3
    if fields["batch_size"] is None:
        fields["batch_size"] = 256
    return RunConfig(**fields, overrides=overrides)


def method_under_test(name: str, model, P: dict[str, Any], cfg: RunConfig, generator: torch.Generator):
    """The method under test, from the method registry, with the toy's beta = 1/lam; name in METHODS (+ 'dam_k3',
    'vggflow_central'): a registry name, or one with its variant after '_'."""
    v, vb = flow_callables(model)
    kw: dict[str, Any] = dict(generator=generator, **cfg.overrides)
    base, _, variant = name.partition("_")
    settings = MethodSettings(beta=1.0 / P["lam"])
    if base == "vggflow":
        hidden, depth = cfg.value_hidden or cfg.hidden, cfg.value_depth or cfg.depth
        kw = dict(value_net=SmallValueNet((P["dim"],), hidden=hidden, depth=depth), clip=False, **kw)
        settings.consistency = "exact" if variant == "exact" else "fd"
        if variant == "central":
            kw["fd_scheme"] = "central"
    elif name in ("dam", "dam_k3"):
        kw.pop("generator")
        settings.K = P["N"] if name == "dam" else 3
    elif name == "am_memoryless":
        base = "am"
        kw = dict(lct=math.inf, n_last=cfg.am_steps // 4, n_random=cfg.am_steps // 4, **kw)
    elif name == "draft":
        settings.K = kw.pop("K", 3)
    elif name != "refl":
        raise ValueError(f"unknown method {name!r}")
    return registry.build_method(base, v, vb, P["reward"], settings, num_steps=P["N"], sample_shape=(P["dim"],), **kw)


def own_reference(name: str, refs: dict[str, Any]) -> str | None:
    """The key ("q", "q_fine", "p") of the reference method ``name`` converges to, None for ReFL/DRaFT."""
    ref = REGULARISED.get(name)
    return "q" if ref == "q_fine" and "q_fine" not in refs else ref


def _eval_noise(P: dict[str, Any], n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(20_000 + seed)
    return torch.randn(n, P["dim"], generator=g)


@torch.no_grad()
def sample_model(model, P: dict[str, Any], n: int, seed: int) -> torch.Tensor:
    """n inference samples: the deterministic N-step Euler sampler (M2) for every method."""
    return sample_euler(model, _eval_noise(P, n, seed), P["ts"]).final.double()


def evaluate(model, refs: dict[str, Any], n: int, seed: int) -> dict[str, float]:
    P = refs["problem"]
    x = sample_model(model, P, n, seed)
    finite = bool(torch.isfinite(x).all())
    out = {"reward": float(P["reward"](x).mean()) if finite else math.nan}
    keys = ["ed_q", "ed_p", "diversity", "coverage"] + (["ed_q_fine"] if "q_fine" in refs else [])
    if not finite:
        return {**out, **{k: math.nan for k in keys}}
    out.update(
        ed_q=toy.energy_distance(x, refs["q"]),
        ed_p=toy.energy_distance(x, refs["p"]),
        diversity=diversity(x, FlattenFeatures()),
        coverage=toy.mode_coverage(x, P["mixture"]),
    )
    if "q_fine" in refs:
        out["ed_q_fine"] = toy.energy_distance(x, refs["q_fine"])
    return out


def local_reference(model, refs: dict[str, Any], n: int, seed: int) -> dict[str, float]:
    """q*_loc: L-BFGS (M37) from the model's own controls on the same x0 as its samples (module docstring)."""
    P = refs["problem"]
    x0 = _eval_noise(P, n, seed)
    u, x_model = toy.model_controls(model, x0, P["ts"])
    if not bool(torch.isfinite(u).all()):
        return {"ed_loc": math.nan, "loc_to_q": math.nan}
    _, x_loc, _ = toy.solve_optimal_controls(x0.double(), P["base_velocity"], P["reward"], P["lam"], P["ts"],
                                            starts=(u.double(),))  # fmt: skip
    return {"ed_loc": toy.energy_distance(x_model.double(), x_loc), "loc_to_q": toy.energy_distance(x_loc, refs["q"])}


def run_method(name: str, refs: dict[str, Any], cfg: RunConfig) -> dict[str, Any]:
    """Train ``name`` on the reference's problem; evaluate every ``eval_every`` updates; returns the checkpoints."""
    P = refs["problem"]
    cfg = settings_for(name, cfg)
    torch.manual_seed(cfg.seed)
    model = make_toy_model(P["mixture"], hidden=cfg.hidden, depth=cfg.depth)
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    method = method_under_test(name, model, P, cfg, generator)
    n_steps = cfg.am_steps if name == "am_memoryless" else P["N"]
    config = TrainConfig(batch_size=cfg.batch_size, num_steps=n_steps, lr=cfg.lr, num_updates=cfg.updates,
                         value_lr=cfg.value_lr, lr_schedule=cfg.lr_schedule, seed=cfg.seed,
                         residual_probe=0)  # fmt: skip
    trainer = Trainer(model, P["reward"], method, config, sample_shape=(P["dim"],))
    checkpoints = []
    start = time.perf_counter()
    train_time = 0.0
    for update in range(1, cfg.updates + 1):
        t0 = time.perf_counter()
        trainer.train_step()
        train_time += time.perf_counter() - t0
        if update % cfg.eval_every == 0 or update == cfg.updates:
            checkpoints.append({"update": update, **evaluate(model, refs, cfg.n_eval, cfg.seed)})
    wall = time.perf_counter() - start
    local = local_reference(model, refs, cfg.n_eval, cfg.seed) if cfg.local and name in (*Q_METHODS, "dam_k3") else {}
    return {
        "method": name,
        "reward_name": refs["name"],
        "checkpoints": checkpoints,
        "final": checkpoints[-1],
        "local": local,
        "updates": trainer.updates,
        "skipped": len(trainer.skipped),
        "train_s": train_time,
        "wall_s": wall,
        "s_per_update": train_time / max(1, cfg.updates),
        "model": model,
        "method_object": method,
        "history": trainer.history,
    }


# ---------------------------------------------------------------- the long version
def _fmt(x: float, spec: str = ".4f") -> str:
    return format(x, spec) if isinstance(x, float) and math.isfinite(x) else "–"


def _row(res, refs, best) -> dict[str, Any]:
    final = res["final"]
    ref = own_reference(res["method"], refs)
    floor = refs[f"floor_{ref}"] if ref else math.nan
    return {
        "reward_name": refs["name"],
        "method": res["method"],
        "reward": final["reward"],
        "ed_q": final["ed_q"],
        "ed_p": final["ed_p"],
        "ed_q_fine": final.get("ed_q_fine", math.nan),
        "floor_q": refs["floor_q"],
        "floor_p": refs["floor_p"],
        "floor_q_fine": refs.get("floor_q_fine", math.nan),
        "ref": ref,
        "ratio": final[f"ed_{ref}"] / floor if ref else math.nan,
        "ratio_fine": final.get("ed_q_fine", math.nan) / refs.get("floor_q_fine", math.nan),
        "best_ratio": best[f"ed_{ref}"] / floor if ref else math.nan,
        "best_update": best["update"],
        "base_ratio": (final[f"ed_{ref}"] / refs[f"base_to_{ref}"]) if ref else math.nan,
        "ed_loc": res["local"].get("ed_loc", math.nan),
        "loc_to_q": res["local"].get("loc_to_q", math.nan),
        "diversity": final["diversity"],
        "updates": res["updates"],
        "skipped": res["skipped"],
        "wall_s": res["wall_s"],
        "s_per_update": res["s_per_update"],
    }


HEADER = (
    "| setting | method | reward | ED to q* | ED to p* | floor q* / p* | ED/floor own ref (best ckpt) "
    "| ED/base ED | ED to q*_100 (/floor) | ED to q*_loc (q*_loc to q*) | diversity | updates (skipped) "
    "| s/update | wall s |"
)


def _line(r) -> str:
    own = f"{_fmt(r['ratio'], '.1f')} ({_fmt(r['best_ratio'], '.1f')} @{r['best_update']})" if r["ref"] else "–"
    fine = f"{_fmt(r['ed_q_fine'])} ({_fmt(r['ratio_fine'], '.1f')})" if math.isfinite(r["ed_q_fine"]) else "–"
    loc = f"{_fmt(r['ed_loc'])} ({_fmt(r['loc_to_q'])})" if math.isfinite(r["ed_loc"]) else "–"
    ref = REF_LABEL.get(r["ref"], "")
    return (
        f"| {r['reward_name']} | {r['method']} | {_fmt(r['reward'], '.3f')} | {_fmt(r['ed_q'])} | {_fmt(r['ed_p'])} | "
        f"{r['floor_q']:.4f} / {r['floor_p']:.4f} | {own}{' ' + ref if ref else ''} | {_fmt(r['base_ratio'], '.3f')} | "
        f"{fine} | {loc} | {_fmt(r['diversity'], '.3f')} | {r['updates']} ({r['skipped']}) | "
        f"{r['s_per_update']:.3f} | {r['wall_s']:.0f} |"
    )


def table(rows) -> str:
    sep = "|" + "|".join("---" for _ in range(HEADER.count("|") - 1)) + "|"
    return "\n".join([HEADER, sep] + [_line(r) for r in rows])


def reference_table(all_refs) -> str:
    lines = [
        "| setting | ED(q*, p*) | floor q* / p* | ED(base, q*) | ED(base, p*) | ED(q*_100, q*) | ED(q*_100, p*) "
        "| floor q*_100 | base gap (floor) | reward base / q* / q*_100 / p* | q* improved by start (of n) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in all_refs:
        imp = ", ".join(f"{k} {v}" for k, v in r["q_improved_by_start"].items())
        lines.append(
            f"| {r['name']} | {r['q_to_p']:.4f} | {r['floor_q']:.4f} / {r['floor_p']:.4f} | {r['base_to_q']:.4f} | "
            f"{r['base_to_p']:.4f} | {_fmt(r.get('q_fine_to_q', math.nan))} | {_fmt(r.get('q_fine_to_p', math.nan))} "
            f"| {_fmt(r.get('floor_q_fine', math.nan))} | {r['base_gap']:.4f} ({r['floor_exact']:.4f}) | "
            f"{r['reward_base']:.3f} / {r['reward_q']:.3f} / {_fmt(r.get('reward_q_fine', math.nan), '.3f')} / "
            f"{r['reward_p']:.3f} | {imp} ({r['q'].shape[0]}) |"
        )
    return "\n".join(lines)


def acceptance(rows, all_refs) -> str:
    """Issue 4's acceptance conditions on the final checkpoints of the long run: (a) VGG-Flow and DAM within 10% of
    the base's distance to their reference and closer to it than to p* (VGG-Flow against q*_100 and, as the issue
    words it, q*), (b) memoryless AM likewise for p* vs q*, (c) ReFL/DRaFT reward hacking or a guarded divergence."""
    refs = {r["name"]: r for r in all_refs}
    by = {(r["reward_name"], r["method"]): r for r in rows}
    verdict = lambda ok: "pass" if ok else "FAIL"
    out = []
    for (setting, method), r in by.items():
        R = refs[setting]
        if method in Q_METHODS:
            keys = ["q_fine", "q"] if method.startswith("vggflow") and math.isfinite(r["ed_q_fine"]) else ["q"]
            parts = []
            for key in keys:
                ed, base = r[f"ed_{key}"], R[f"base_to_{key}"]
                ok = ed <= 0.1 * base and ed < r["ed_p"]
                parts.append(f"to {REF_LABEL[key]} {ed:.4f} (10% of base {0.1 * base:.4f}): {verdict(ok)}")
            out.append(f"- (a) {setting} {method}: ED to p* {r['ed_p']:.4f}; " + "; ".join(parts))
        elif method == "am_memoryless":
            ok = r["ed_p"] <= 0.1 * R["base_to_p"] and r["ed_p"] < r["ed_q"]
            out.append(
                f"- (b) {setting} {method}: ED to p* {r['ed_p']:.4f} (10% of base {0.1 * R['base_to_p']:.4f}), "
                f"to q* {r['ed_q']:.4f}: {verdict(ok)}"
            )
        elif method in ("refl", "draft"):
            reg = [by[setting, m] for m in REGULARISED if (setting, m) in by and m != "dam_k3"]
            if not math.isfinite(r["reward"]):
                out.append(
                    f"- (c) {setting} {method}: diverged (non-finite samples), {r['skipped']} updates skipped by the "
                    "NaN/inf guard, no crash: pass"
                )
                continue
            if not reg:
                continue
            # farther from each reference than the regularised methods that target it (q*: DAM, q*_100: VGG-Flow,
            # p*: memoryless AM), at least their reward, lower diversity
            targets = [(x[f"ed_{x['ref']}"], r[f"ed_{x['ref']}"], REF_LABEL[x["ref"]], x["method"]) for x in reg]
            far = all(mine > theirs for theirs, mine, _, _ in targets)
            best_reward = max(x["reward"] for x in reg)
            ok = r["reward"] >= best_reward and far and r["diversity"] < min(x["diversity"] for x in reg)
            dist = ", ".join(f"to {lab} {mine:.3f} vs {m} {theirs:.3f}" for theirs, mine, lab, m in targets)
            out.append(
                f"- (c) {setting} {method}: reward {r['reward']:.3f} (regularised max {best_reward:.3f}), diversity "
                f"{r['diversity']:.3f} (regularised min {min(x['diversity'] for x in reg):.3f}), ED {dist}: "
                f"{verdict(ok)}"
            )
    return "\n".join(out)


def truncation_comparison(refs: dict[str, Any], cfg: RunConfig, dam_result: dict[str, Any] | None) -> str:
    """DAM K = 3 vs K = N: time per update and the distances to the truncated q*_3 (u_i = 0 for i < N - 3), the full
    q* (M37) and q*_3,own: per particle, the model's own Euler path for the first N - 3 steps, then the optimal
    3-step control from there. The truncated loss (M28) trains only the last K steps; a network shared across t
    also moves the first N - K steps' controls, which no loss term holds at 0, so q*_3 is the fixed point only if
    they stay 0, and q*_3,own measures whether the last K controls are optimal for where the model actually is."""
    name, P, K = refs["name"], refs["problem"], 3
    trunc = references(name, cfg.n_eval, K=K)
    lines = [
        f"DAM truncation ({name}): ED(q*_3, q*) = {toy.energy_distance(trunc['q'], refs['q']):.4f}, "
        f"ED(base, q*_3) = {toy.energy_distance(refs['base'], trunc['q']):.4f}, reward q*_3 "
        f"{float(P['reward'](trunc['q']).mean()):.3f}",
        "",
        "| method | s/update | ED to q*_3 (K=3) | ED to q* (K=N) | ED to q*_3,own (paired mean dx) "
        "| floor q*_3 / q* | reward |",
        "|---|---|---|---|---|---|---|",
    ]
    results = [("dam_k3", run_method("dam_k3", refs, cfg))]
    results.append(("dam", dam_result if dam_result is not None else run_method("dam", refs, cfg)))
    ts, N = P["ts"], P["N"]
    for label, res in results:
        path = sample_euler(res["model"], _eval_noise(P, cfg.n_eval, cfg.seed), ts).states.double()
        x_mid, x = path[N - K], path[N]  # own path after the first N - K steps; the model's samples
        _, x_own, _ = toy.solve_optimal_controls(x_mid, P["base_velocity"], P["reward"], P["lam"], ts[N - K :])
        lines.append(
            f"| {label} | {res['s_per_update']:.4f} | {toy.energy_distance(x, trunc['q']):.4f} | "
            f"{toy.energy_distance(x, refs['q']):.4f} | {toy.energy_distance(x, x_own):.4f} "
            f"({float((x - x_own).norm(dim=1).mean()):.4f}) | {trunc['floor_q']:.4f} / {refs['floor_q']:.4f} | "
            f"{res['final']['reward']:.3f} |"
        )
    return "\n".join(lines)


def distill_capacity(name: str, cfg: RunConfig, n_train: int = 4000, steps: int = 4000) -> dict[str, float]:
    """ "A perfectly trained control": regress the residual MLP (same size as in training) on the q* controls along
    q* paths (M37, n_train particles, independent of the evaluation set), then sample it on the N-step grid. Its
    ED to q* against the floor is what the function class and grid allow, i.e. the limit of any method whose
    fixed point is q*."""
    P = references(name, cfg.n_eval, seed=cfg.seed)["problem"]
    ts, N, vb = P["ts"], P["N"], P["base_velocity"]
    x0 = torch.randn(n_train, P["dim"], dtype=torch.float64, generator=torch.Generator().manual_seed(123))
    u, _, _ = toy.solve_optimal_controls(x0, vb, P["reward"], P["lam"], ts)
    xs = [x0]  # the q* paths
    for i in range(N):
        xs.append(toy.controlled_euler(xs[-1], vb, ts[i : i + 2], u[:, i : i + 1]))
    X = torch.stack(xs[:-1]).reshape(-1, P["dim"]).float()
    T = ts[:-1, None].expand(N, n_train).reshape(-1).float()
    U = u.transpose(0, 1).reshape(-1, P["dim"]).float()
    torch.manual_seed(cfg.seed)
    model = make_toy_model(P["mixture"], hidden=cfg.hidden, depth=cfg.depth)
    params = list(model.trainable_parameters())
    opt = torch.optim.Adam(params, lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    for _ in range(steps):
        idx = torch.randint(0, X.shape[0], (4096,), generator=gen)
        with model.base_velocity(), torch.no_grad():
            v_base = model.velocity(X[idx], T[idx])
        loss = (model.velocity(X[idx], T[idx]) - v_base - U[idx]).square().sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    R = toy.toy_references(name, cfg.n_eval, cfg.seed)
    ed = toy.energy_distance(sample_model(model, P, cfg.n_eval, cfg.seed), R["q_star"])
    return {"name": name, "ed_q": ed, "floor_q": R["q_floor"], "mse": float(loss.detach())}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer updates and samples")
    parser.add_argument("--dim", type=int, default=2, choices=(2, 8), help="the 2-D ring or the 8-D mixture")
    parser.add_argument("--rewards", default=None, help="comma-separated settings (default: all of --dim)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--updates", type=int, default=None)
    parser.add_argument("--n-eval", type=int, default=None, help="samples per set (default 2000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-fine", action="store_true", help="skip the q*_100 reference")
    parser.add_argument("--no-local", action="store_true", help="skip the q*_loc solves")
    parser.add_argument("--no-truncation", action="store_true", help="skip DAM K=3 vs K=N")
    parser.add_argument("--distill", action="store_true", help="only the capacity check (distill_capacity)")
    parser.add_argument("--out", default=None, help="write the markdown tables to this file")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)  # tiny tensors: one thread is fastest and keeps timings stable
    logging.getLogger("flowkern.train").setLevel(logging.ERROR)  # skipped updates are counted in the table
    cfg = RunConfig(seed=args.seed, local=not args.no_local)
    if args.quick:
        cfg.updates, cfg.n_eval, cfg.eval_every = 200, 1000, 50
    if args.n_eval:
        cfg.n_eval = args.n_eval
    if args.updates:
        cfg.updates = args.updates
        cfg.eval_every = max(1, min(cfg.eval_every, args.updates))
    rewards = args.rewards.split(",") if args.rewards else toy.toy_settings(args.dim)
    methods = args.methods.split(",")
    if args.distill:
        print("| setting | distilled q* control: ED to q* | floor q* | ratio | final MSE |\n|---|---|---|---|---|")
        for name in rewards:
            d = distill_capacity(name, cfg)
            ratio = d["ed_q"] / d["floor_q"]
            print(f"| {name} | {d['ed_q']:.4f} | {d['floor_q']:.4f} | {ratio:.1f} | {d['mse']:.4f} |")
        return
    start = time.perf_counter()
    rows, all_refs, dam_results = [], [], {}
    for reward_name in rewards:
        refs = references(reward_name, cfg.n_eval, seed=args.seed, fine=not args.no_fine)
        all_refs.append(refs)
        fine = (
            f"; q*_100: ED to q* {refs['q_fine_to_q']:.4f}, floor {refs['floor_q_fine']:.4f}, "
            f"solve {refs['q_fine_solve_s']:.0f}s"
            if "q_fine" in refs
            else ""
        )
        print(
            f"\n[{reward_name}] q* solve {refs['q_solve_s']:.1f}s (improved by start {refs['q_improved_by_start']}); "
            f"ED(q*,p*) {refs['q_to_p']:.4f}; floors q* {refs['floor_q']:.4f} p* {refs['floor_p']:.4f}; "
            f"base: ED to q* {refs['base_to_q']:.4f}, to p* {refs['base_to_p']:.4f}, reward {refs['reward_base']:.3f}, "
            f"diversity {refs['diversity_base']:.3f}; reward q* {refs['reward_q']:.3f}, p* {refs['reward_p']:.3f}"
            + fine,
            flush=True,
        )
        for name in methods:
            res = run_method(name, refs, cfg)
            if name == "dam":
                dam_results[reward_name] = res
            ref = own_reference(name, refs)
            best = min(res["checkpoints"], key=lambda c: c[f"ed_{ref}"]) if ref else res["final"]
            row = _row(res, refs, best)
            rows.append(row)
            print(_line(row), flush=True)
            print("    checkpoints: " + "; ".join(
                f"{c['update']}: r {_fmt(c['reward'], '.3f')} q {_fmt(c['ed_q'])} p {_fmt(c['ed_p'])}"
                + (f" q100 {_fmt(c['ed_q_fine'])}" if "ed_q_fine" in c else "")
                for c in res["checkpoints"]))  # fmt: skip
    parts = [
        "References\n\n" + reference_table(all_refs),
        "Methods (final checkpoint)\n\n" + table(rows),
        "Acceptance (issue 4)\n\n" + acceptance(rows, all_refs),
    ]
    if not args.no_truncation:
        first = all_refs[0]
        parts.append(truncation_comparison(first, cfg, dam_results.get(first["name"])))
    report = "\n\n".join(parts)
    print("\n" + report)
    if args.out:
        used = sys.argv[1:] if argv is None else argv
        command = "python -m benchmarks.toy_alignment " + " ".join(shlex.quote(a) for a in used)
        with open(args.out, "w") as f:
            f.write(
                f"# Toy alignment with ground truth ({args.dim}-D)\n\nCommand (CPU, one thread; "
                f"{time.perf_counter() - start:.0f} s):\n\n    {command}\n\n{report}\n"
            )


if __name__ == "__main__":
    main()

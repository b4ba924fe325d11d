"""Toy alignment with ground truth (issue 4, math.md section 10): every method against its known optimum.

Base: the 8-mode ring in 2-D with its exact rectified-flow velocity (M38) plus a zero-initialised residual MLP,
through the FlowModel protocol (``flowkern.models.toy.make_toy_model``); settings ``TOY_SETTINGS`` of
``flowkern.metrics.ground_truth`` (uniform Euler grid N = 20, lam = 0.5, i.e. beta = 2). References:

- q* (M37): push-forward of N(0, I) under the per-particle optimal open-loop control (best of the zero and aimed
  starts), the fixed point of deterministic AM (K = N, p = 2) and, up to O(h), of VGG-Flow;
- p* ∝ p_base exp(beta r) (M36, M39): the fixed point of memoryless AM.

Distances are energy distances (M40) at n samples per set, beside the reference-vs-reference noise floors and the
base model's own distance. ReFL and DRaFT have no target: reward and diversity (mean pairwise distance).

    python benchmarks/toy_alignment.py                 # the long version: full table, DAM K=3 vs K=N
    python benchmarks/toy_alignment.py --quick         # a shorter run

Settings (chosen once, ``RunConfig`` + ``METHOD_SETTINGS``): 256 trajectories per update, 400 updates, AdamW with a
cosine learning-rate decay, residual MLP 128x3; VGG-Flow with eta = 'constant', no reward-gradient clipping (the
toy's gradients are O(1); clipping would move the fixed point away from q*), default alpha, eps, subsampling
f = 0.25; DAM K = N = 20, p = 2; memoryless AM on a uniform N = 20 memoryless grid (M29), T = the last 5 steps +
5 random ones (M33 scaled to N = 20), no loss clamp; DRaFT K = 3; ReFL i ~ U{15..19}.

The CI test (tests/test_toy_alignment.py) imports ``run_method`` / ``references`` with a short configuration.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from flowkern.methods import AdjointMatching, DRaFT, ReFL, SmallValueNet, VGGFlow, flow_callables
from flowkern.metrics import ground_truth as GT
from flowkern.models.toy import make_toy_model
from flowkern.train import TrainConfig, Trainer

METHODS = ("vggflow_fd", "vggflow_exact", "dam", "am_memoryless", "refl", "draft")
REGULARISED = {"vggflow_fd": "q", "vggflow_exact": "q", "dam": "q", "dam_k3": "q", "am_memoryless": "p"}


@dataclass
class RunConfig:
    """One training run. Defaults: the long benchmark; the CI test shortens updates/batch."""

    updates: int = 400
    batch_size: int = 256
    lr: float | None = None  # None: the method's METHOD_SETTINGS value
    lr_schedule: str = "cosine"
    value_lr: float | None = None
    hidden: int = 128
    depth: int = 3
    eval_every: int = 100
    n_eval: int = 2000
    seed: int = 0
    am_steps: int = 20  # memoryless AM grid (uniform, M29); inference always uses the N-step Euler grid (M30)
    overrides: dict = field(default_factory=dict)


def references(name: str, n: int, seed: int = 0, K: int | None = None) -> dict[str, Any]:
    """q* (M37, best-of-starts solve, truncated to the last K steps if given), p* (M36, M39) and the base's N-step
    samples from ``ground_truth.toy_references`` (cached per process), with their distances and noise floors."""
    t0 = time.perf_counter()
    R = GT.toy_references(name, n, seed, K)
    t_ref = time.perf_counter() - t0
    q, p, base = R["q_star"], R["p_star"], R["base"]
    return {
        "name": name,
        "problem": R,
        "q": q,
        "p": p,
        "base": base,
        "floor_q": R["q_floor"],
        "floor_p": R["p_floor"],
        "base_to_q": GT.energy_distance(base, q),
        "base_to_p": GT.energy_distance(base, p),
        "q_to_p": GT.energy_distance(q, p),
        "q_improved_by_aimed_start": R["q_info"]["improved"],
        "q_solve_s": t_ref,
        "reward_q": float(R["reward"](q).mean()),
        "reward_p": float(R["reward"](p).mean()),
        "reward_base": float(R["reward"](base).mean()),
        "diversity_base": GT.diversity(base),
    }


# per-method training settings (chosen once on the toy; RunConfig fields, "overrides" go to the method)
METHOD_SETTINGS: dict[str, dict[str, Any]] = {
    "vggflow_fd": {"lr": 4e-3, "value_lr": 1e-2, "overrides": {"eta_mode": "constant"}},
    "vggflow_exact": {"lr": 4e-3, "value_lr": 1e-2, "overrides": {"eta_mode": "constant"}},
    "dam": {"lr": 4e-3},
    "dam_k3": {"lr": 4e-3},
    "am_memoryless": {"lr": 5e-3},
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
    return RunConfig(**fields, overrides=overrides)


def build_method(name: str, model, P: dict[str, Any], cfg: RunConfig, generator: torch.Generator):
    """The method under test with the toy's beta = 1/lam; name in METHODS (+ 'dam_k3')."""
    v, vb = flow_callables(model)
    beta = 1.0 / P["lam"]
    reward = P["reward"]
    kw = dict(cfg.overrides)
    if name.startswith("vggflow"):
        value_net = SmallValueNet((2,), hidden=cfg.hidden, depth=cfg.depth)
        args = dict(value_net=value_net, beta=beta, consistency=name.split("_")[1], generator=generator,
                    clip=False, subsample_fraction=0.25)  # fmt: skip
        args.update(kw)
        return VGGFlow(v, vb, reward, **args)
    if name in ("dam", "dam_k3"):
        args = dict(K=P["N"] if name == "dam" else 3, p=2.0)
        args.update(kw)
        return AdjointMatching(v, vb, reward, beta=beta, **args)
    if name == "am_memoryless":
        args = dict(kind="memoryless", lct=math.inf, n_last=cfg.am_steps // 4, n_random=cfg.am_steps // 4)
        args.update(kw)
        return AdjointMatching(v, vb, reward, beta=beta, generator=generator, **args)
    if name == "refl":
        return ReFL(v, reward, generator=generator, **kw)
    if name == "draft":
        return DRaFT(v, reward, K=kw.pop("K", 3), generator=generator, **kw)
    raise ValueError(f"unknown method {name!r}")


@torch.no_grad()
def sample_model(model, P: dict[str, Any], n: int, seed: int) -> torch.Tensor:
    """n inference samples: the deterministic N-step Euler sampler (M2) for every method."""
    g = torch.Generator().manual_seed(20_000 + seed)
    x0 = torch.randn(n, 2, generator=g)
    return GT.euler_sample(model, x0, P["ts"].float()).double()


def evaluate(model, refs: dict[str, Any], n: int, seed: int) -> dict[str, float]:
    P = refs["problem"]
    x = sample_model(model, P, n, seed)
    finite = bool(torch.isfinite(x).all())
    out = {"reward": float(P["reward"](x).mean()) if finite else math.nan}
    if finite:
        out.update(
            ed_q=GT.energy_distance(x, refs["q"]),
            ed_p=GT.energy_distance(x, refs["p"]),
            diversity=GT.diversity(x),
            coverage=GT.mode_coverage(x, P["mixture"]),
        )
    else:
        out.update(ed_q=math.nan, ed_p=math.nan, diversity=math.nan, coverage=math.nan)
    return out


def run_method(name: str, refs: dict[str, Any], cfg: RunConfig) -> dict[str, Any]:
    """Train ``name`` on the reference's problem; evaluate every ``eval_every`` updates; returns the checkpoints."""
    P = refs["problem"]
    cfg = settings_for(name, cfg)
    torch.manual_seed(cfg.seed)
    model = make_toy_model(P["mixture"], hidden=cfg.hidden, depth=cfg.depth)
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    method = build_method(name, model, P, cfg, generator)
    n_steps = cfg.am_steps if name == "am_memoryless" else P["N"]
    config = TrainConfig(batch_size=cfg.batch_size, num_steps=n_steps, lr=cfg.lr, num_updates=cfg.updates,
                         value_lr=cfg.value_lr, lr_schedule=cfg.lr_schedule, seed=cfg.seed,
                         residual_probe=0)  # fmt: skip
    trainer = Trainer(model, P["reward"], method, config, sample_shape=(2,))
    checkpoints = []
    start = time.perf_counter()
    train_time = 0.0
    for update in range(1, cfg.updates + 1):
        t0 = time.perf_counter()
        trainer.train_step()
        train_time += time.perf_counter() - t0
        if update % cfg.eval_every == 0 or update == cfg.updates:
            checkpoints.append({"update": update, **evaluate(model, refs, cfg.n_eval, cfg.seed)})
    return {
        "method": name,
        "reward_name": refs["name"],
        "checkpoints": checkpoints,
        "final": checkpoints[-1],
        "updates": trainer.updates,
        "skipped": len(trainer.skipped),
        "train_s": train_time,
        "wall_s": time.perf_counter() - start,
        "s_per_update": train_time / max(1, cfg.updates),
        "model": model,
        "history": trainer.history,
    }


# ---------------------------------------------------------------- the long version
def _fmt(x: float, spec: str = ".4f") -> str:
    return format(x, spec) if isinstance(x, float) and math.isfinite(x) else str(x)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer updates and samples")
    parser.add_argument("--rewards", default="linear,bump,bump_gap")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--updates", type=int, default=None)
    parser.add_argument("--n-eval", type=int, default=None, help="samples per set (default 2000)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)  # tiny tensors: one thread is fastest and keeps timings stable
    logging.getLogger("flowkern.train").setLevel(logging.ERROR)  # skipped updates are counted in the table
    cfg = RunConfig()
    if args.quick:
        cfg.updates, cfg.n_eval, cfg.eval_every = 200, 1000, 50
    if args.n_eval:
        cfg.n_eval = args.n_eval
    if args.updates:
        cfg.updates = args.updates
        cfg.eval_every = max(1, min(cfg.eval_every, args.updates))
    rows = []
    for reward_name in args.rewards.split(","):
        refs = references(reward_name, cfg.n_eval)
        print(
            f"\n[{reward_name}] q* solve {refs['q_solve_s']:.1f}s (aimed start improved "
            f"{refs['q_improved_by_aimed_start']} particles); ED(q*,p*) {refs['q_to_p']:.4f}; "
            f"floors q* {refs['floor_q']:.4f} p* {refs['floor_p']:.4f}; "
            f"base: ED to q* {refs['base_to_q']:.4f}, to p* {refs['base_to_p']:.4f}, reward {refs['reward_base']:.3f}, "
            f"diversity {refs['diversity_base']:.3f}; reward q* {refs['reward_q']:.3f}, p* {refs['reward_p']:.3f}",
            flush=True,
        )
        for name in args.methods.split(","):
            res = run_method(name, refs, cfg)
            ref = REGULARISED.get(name)
            best = min(res["checkpoints"], key=lambda c: c[f"ed_{ref}"]) if ref else res["final"]
            row = _row(res, refs, best)
            rows.append(row)
            print(_line(row), flush=True)
            print("    checkpoints: " + "; ".join(
                f"{c['update']}: r {_fmt(c['reward'], '.3f')} q {_fmt(c['ed_q'])} p {_fmt(c['ed_p'])}"
                for c in res["checkpoints"]))  # fmt: skip
    print("\n" + table(rows))
    if "linear" in args.rewards.split(",") or "bump" in args.rewards.split(","):
        print("\n" + truncation_comparison(args.rewards.split(",")[0], cfg))


def _row(res, refs, best) -> dict[str, Any]:
    final = res["final"]
    ref = REGULARISED.get(res["method"])
    floor = refs[f"floor_{ref}"] if ref else math.nan
    return {
        "reward_name": refs["name"],
        "method": res["method"],
        "reward": final["reward"],
        "ed_q": final["ed_q"],
        "ed_p": final["ed_p"],
        "floor_q": refs["floor_q"],
        "floor_p": refs["floor_p"],
        "ratio": final[f"ed_{ref}"] / floor if ref else math.nan,
        "best_ratio": best[f"ed_{ref}"] / floor if ref else math.nan,
        "best_update": best["update"],
        "base_ratio": (final[f"ed_{ref}"] / refs[f"base_to_{ref}"]) if ref else math.nan,
        "diversity": final["diversity"],
        "updates": res["updates"],
        "skipped": res["skipped"],
        "wall_s": res["wall_s"],
        "s_per_update": res["s_per_update"],
    }


HEADER = (
    "| reward | method | reward | ED to q* | ED to p* | floor q* | floor p* | ED/floor (final) "
    "| ED/floor (best ckpt @upd) | ED/base ED | diversity | updates (skipped) | wall s |"
)


def _line(r) -> str:
    return (
        f"| {r['reward_name']} | {r['method']} | {_fmt(r['reward'], '.3f')} | {_fmt(r['ed_q'])} | {_fmt(r['ed_p'])} | "
        f"{r['floor_q']:.4f} | {r['floor_p']:.4f} | {_fmt(r['ratio'], '.1f')} | {_fmt(r['best_ratio'], '.1f')} "
        f"@{r['best_update']} | {_fmt(r['base_ratio'], '.3f')} | {_fmt(r['diversity'], '.3f')} | {r['updates']} "
        f"({r['skipped']}) | {r['wall_s']:.0f} |"
    )


def table(rows) -> str:
    sep = "|" + "|".join("---" for _ in range(13)) + "|"
    return "\n".join([HEADER, sep] + [_line(r) for r in rows])


def truncation_comparison(reward_name: str, cfg: RunConfig) -> str:
    """DAM K = 3 vs K = N: time per update, distance to the truncated q*_K and the full q* (M37 truncated)."""
    full = references(reward_name, cfg.n_eval)
    trunc = references(reward_name, cfg.n_eval, K=3)
    lines = [
        f"DAM truncation ({reward_name}): q*_3 vs q*: ED {GT.energy_distance(trunc['q'], full['q']):.4f}",
        "| method | s/update | ED to q*_K=3 | ED to q* (K=N) | floor q*_3 | floor q* |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("dam_k3", "dam"):
        res = run_method(name, full, cfg)
        x = sample_model(res["model"], full["problem"], cfg.n_eval, cfg.seed)
        lines.append(
            f"| {name} | {res['s_per_update']:.4f} | {GT.energy_distance(x, trunc['q']):.4f} | "
            f"{GT.energy_distance(x, full['q']):.4f} | {trunc['floor_q']:.4f} | {full['floor_q']:.4f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()

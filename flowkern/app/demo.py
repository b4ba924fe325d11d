"""``flowkern demo``: align the shipped tiny model to a pixel reward and write a report folder.

The model is the pixel-space SD3 transformer in ``flowkern/assets/tiny_flow`` (16x16 RGB shapes, four prompts,
``scripts/train_tiny_flow.py``), loaded with ``SD3FlowModel.from_pretrained`` plus a LoRA; each method runs through
``flowkern.train.Trainer`` exactly as on SD3 (same adapter, sampler, ops). Report (``--out``):

    reward_curve.png   reward of each update's rollouts, per method
    samples.png        the same seeds and prompts before (base) and after each method
    metrics.json       per method: reward before/after, diversity, prior preservation, settings, wall time
    log.jsonl          every update's metrics (``method`` field), what ``flowkern plot`` redraws
    report.md          the numbers as a table
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field

import torch

from flowkern.app import report
from flowkern.app.build import ASSET_DIR, METHODS, MethodSettings, load_model, method_for_run, reward_for_run
from flowkern.app.evaluate import evaluate_samples, generate
from flowkern.app.run import TRAINING_FILES, JsonlLog, progress_bar, run_directory
from flowkern.train import TrainConfig, Trainer
from flowkern.train.config import MAX_SEED

__all__ = ["DEMO_SETTINGS", "DemoOptions", "run_demo"]

# Per-method settings of the demo (chosen once on this model and reward; beta = 1/lambda).
DEMO_SETTINGS = {
    "vggflow": dict(
        lr=3e-3, value_lr=1e-3, settings=MethodSettings(beta=600.0, eta="quad", alpha=10.0, subsample=0.25)
    ),
    "dam": dict(lr=3e-3, settings=MethodSettings(beta=600.0, K=3)),
    "am": dict(lr=3e-3, settings=MethodSettings(beta=600.0)),
    "refl": dict(lr=1e-3, settings=MethodSettings(K=3)),
    "draft": dict(lr=1e-3, settings=MethodSettings(K=1)),
}


@dataclass
class DemoOptions:
    out: str = "flowkern-demo"
    methods: tuple[str, ...] = ("vggflow",)
    steps: int = 60
    batch_size: int = 8
    num_steps: int = 10
    lora_rank: int = 4
    eval_samples: int = 16
    reward: str = "redness"
    model: str = str(ASSET_DIR)
    seed: int = 0
    threads: int | None = 1  # the tiny model gains nothing from more; None keeps torch's setting
    fast: bool = False
    progress: bool = True
    overrides: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.fast:  # the CI smoke: a few tiny updates
            self.steps, self.batch_size, self.num_steps, self.eval_samples = min(self.steps, 3), 4, 4, 8
        for name in ("steps", "batch_size", "num_steps", "lora_rank", "eval_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be an int >= 1, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"--seed must be an int in [0, {MAX_SEED}], got {self.seed!r}")
        if self.eval_samples < 2:
            raise ValueError(f"--eval-samples must be >= 2 (diversity needs pairs), got {self.eval_samples}")
        if not self.methods:
            raise ValueError("--methods must name at least one method")
        for m in self.methods:
            if m not in METHODS:
                raise ValueError(f"unknown method {m!r}; known: {', '.join(METHODS)}")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"--methods lists a method twice: {','.join(self.methods)}")


def _setup(opts: DemoOptions):
    return load_model(opts.model, lora_rank=opts.lora_rank, num_steps=opts.num_steps, seed=opts.seed)


def run_demo(opts: DemoOptions, echo=print) -> dict:
    """Run the demo; returns the metrics written to ``metrics.json``."""
    threads = torch.get_num_threads()
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    try:
        return _run_demo(opts, echo)
    finally:
        torch.set_num_threads(threads)


def _run_demo(opts: DemoOptions, echo) -> dict:
    hint = "the demo writes its report into a new or earlier demo folder: pass another --out"
    with run_directory(opts.out, refuse=TRAINING_FILES, hint=hint):  # locked: one writer per directory
        return _demo(opts, echo)


def _demo(opts: DemoOptions, echo) -> dict:
    start = time.perf_counter()
    setup = _setup(opts)
    reward_fn, reward_module = reward_for_run([opts.reward], setup)
    base = generate(setup, opts.eval_samples, seed=opts.seed + 1000, base=True)
    before = evaluate_samples(setup, reward_fn, base, base, reward_module)
    echo(
        f"flowkern demo: {setup.source} ({setup.sample_shape[1]}x{setup.sample_shape[2]} px, prompts: "
        f"{', '.join(setup.prompts)}), reward '{opts.reward}' before: {before['reward_mean']:.4f}"
    )
    results = {"reward": opts.reward, "model": setup.source, "before": before, "methods": {}}
    curves, rows = {}, [("base", base.images)]
    log = JsonlLog(os.path.join(opts.out, "log.jsonl"), truncate=True)
    for name in opts.methods:
        t0 = time.perf_counter()
        if name != opts.methods[0]:
            setup = _setup(opts)  # a fresh LoRA per method
            reward_fn, reward_module = reward_for_run([opts.reward], setup)
        conf = {**DEMO_SETTINGS[name], **opts.overrides.get(name, {})}
        method = method_for_run(name, setup, reward_fn, conf["settings"], seed=opts.seed)
        config = TrainConfig(
            batch_size=opts.batch_size,
            num_updates=opts.steps,
            num_steps=setup.num_steps,
            lr=conf["lr"],
            value_lr=conf.get("value_lr"),
            seed=opts.seed,
            residual_probe=0,
            weight_decay=0.0,
        )
        trainer = Trainer(
            setup.model,
            reward_fn,
            method,
            config,
            sample_shape=setup.sample_shape,
            cond_sampler=setup.cond_sampler,
            device=setup.device,
        )
        bar = progress_bar(opts.steps, f"{name:>7}", enabled=opts.progress)
        history = []
        for _ in range(opts.steps):
            metrics = trainer.train_step()
            history.append(metrics)
            log.write({"method": name, **metrics})
            bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", loss=f"{metrics.get('loss', float('nan')):.3g}")
            bar.update(1)
        bar.close()
        train_s = time.perf_counter() - t0
        after = generate(setup, opts.eval_samples, seed=opts.seed + 1000)
        metrics = evaluate_samples(setup, reward_fn, after, base, reward_module)
        rewards = [h["reward_mean"] for h in history]
        k = max(1, len(rewards) // 10)
        results["methods"][name] = {
            "after": metrics,
            "reward_gain": metrics["reward_mean"] - before["reward_mean"],
            "rollout_reward_first": sum(rewards[:k]) / k,
            "rollout_reward_last": sum(rewards[-k:]) / k,
            "skipped_updates": len(trainer.skipped),
            "train_seconds": round(train_s, 2),
            "lr": conf["lr"],
            "settings": asdict(conf["settings"]),
        }
        curves[name] = ([h["step"] + 1 for h in history], rewards)
        rows.append((name, after.images))
        echo(
            f"  {name:>7}: reward {before['reward_mean']:.4f} -> {metrics['reward_mean']:.4f}, diversity "
            f"{before['diversity']:.3f} -> {metrics['diversity']:.3f}, prior distance {metrics['prior_distance']:.3f} "
            f"({train_s:.0f} s)"
        )
    log.close()
    window = max(1, opts.steps // 15)
    smooth = {
        f"{m} (mean of {window})" if window > 1 else m: (x, report.smooth(y, window)) for m, (x, y) in curves.items()
    }
    report.line_plot(
        smooth,
        os.path.join(opts.out, "reward_curve.png"),
        title=f"reward '{opts.reward}' of each update's rollouts",
        ylabel="reward",
        xlabel="update",
    )
    report.image_grid(
        rows, os.path.join(opts.out, "samples.png"), title="same seeds and prompts: base, then after each method"
    )
    results["wall_seconds"] = round(time.perf_counter() - start, 1)
    results["options"] = {k: v for k, v in asdict(opts).items() if k != "overrides"}
    with open(os.path.join(opts.out, "metrics.json"), "w") as f:
        json.dump(results, f, indent=2, default=_json_default)
    _write_markdown(results, os.path.join(opts.out, "report.md"))
    echo(
        f"wrote {opts.out}/ (reward_curve.png, samples.png, metrics.json, log.jsonl, report.md) "
        f"in {results['wall_seconds']:.0f} s"
    )
    return results


def _json_default(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, tuple):
        return list(v)
    return str(v)


def _write_markdown(results: dict, path: str) -> None:
    b = results["before"]
    lines = [
        f"# flowkern demo: reward '{results['reward']}'",
        "",
        f"Model: `{results['model']}`. Same seeds and prompts for every row; prior distance = mean feature "
        "distance to the base sample of the same seed and prompt; diversity = mean pairwise distance within a prompt.",
        "",
        "| method | reward | diversity | prior distance | train s |",
        "|---|---:|---:|---:|---:|",
        f"| base | {b['reward_mean']:.4f} | {b['diversity']:.3f} | 0 | |",
    ]
    for name, m in results["methods"].items():
        a = m["after"]
        cells = [name, f"{a['reward_mean']:.4f}", f"{a['diversity']:.3f}", f"{a['prior_distance']:.3f}"]
        lines.append("| " + " | ".join([*cells, str(m["train_seconds"])]) + " |")
    lines += ["", "![reward](reward_curve.png)", "", "![samples](samples.png)", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))

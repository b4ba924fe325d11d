"""The generic training loop (layer L6): FlowModel + reward + method, plain PyTorch.

One update (design.md section 1, "One update"):

    for each of grad_accum_steps micro-batches:
        x0 ~ N(0, I), cond ~ cond_sampler       (drawn for the whole update first, so accumulation over
        batch = method.rollout(x0, ts, cond)     A micro-batches of B sees the same draws as one batch of A*B)
        r(x_N) -> reward mean/std               (shape-checked; non-finite -> skip)
        loss, metrics = method.loss(batch)      (non-finite -> skip)
        backward(loss / A)
    grad norm per parameter group (theta, phi) (non-finite -> skip)
    clip each group to grad_clip separately (M19 update), AdamW step, method.after_optimizer_step() (M9 tau)

A skipped update zeroes the gradients and leaves weights, optimizer state and method state untouched; it is
logged (``logging`` warning and :attr:`Trainer.skipped`) and appears in the metrics with ``skipped = 1``.
The micro-step and the optimizer step are separate methods and ``backward`` is an attribute, so an
``accelerate`` loop can wrap them later (``trainer.backward = accelerator.backward``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import torch

from flowkern.methods import _common as C
from flowkern.sampling import sd3_shifted_grid, uniform_grid
from flowkern.train.config import TrainConfig

log = logging.getLogger("flowkern.train")


class Trainer:
    """Trains ``model`` (a FlowModel: ``velocity``, ``base_velocity()``, ``trainable_parameters()``) with ``method``.

    Args:
        model: the fine-tuned flow model (its ``trainable_parameters()`` are theta).
        reward: r(x) -> [B], used to log the reward of each rollout's terminal states x_N.
        method: a flowkern method (``rollout(x0, ts, cond)``, ``loss(batch)``; optionally
            ``value_parameters()``, ``after_optimizer_step()``, ``discard_step()``).
        config: :class:`TrainConfig`.
        sample_shape: shape of one sample x (without the batch dimension).
        cond_sampler: optional ``(n, generator) -> cond`` drawing per-trajectory conditioning.
        ts: optional explicit time grid [N+1] (overrides config.num_steps/time_grid).
        device, dtype: where x0 is drawn and in which dtype.
    """

    def __init__(
        self,
        model: Any,
        reward: C.Reward,
        method: Any,
        config: TrainConfig | None = None,
        *,
        sample_shape: tuple[int, ...],
        cond_sampler: Callable[[int, torch.Generator], Any] | None = None,
        ts: torch.Tensor | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        self.config = config or TrainConfig()
        if not isinstance(self.config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(self.config).__name__}")
        for attr in ("rollout", "loss"):
            if not callable(getattr(method, attr, None)):
                raise TypeError(f"method must provide {attr}(), got {type(method).__name__}")
        if not callable(getattr(model, "trainable_parameters", None)):
            raise TypeError(f"model must provide trainable_parameters() (FlowModel), got {type(model).__name__}")
        self.model = model
        self.reward = C.check_callable("reward", reward)
        self.method = method
        self.sample_shape = tuple(int(s) for s in sample_shape)
        self.cond_sampler = cond_sampler
        self.device = torch.device(device)
        self.dtype = dtype
        self.ts = C.check_time_grid(ts if ts is not None else self._time_grid()).to(self.device)
        self.velocity, self.base_velocity = C.flow_callables(model, detach_uncond=True)

        cfg = self.config
        theta = [p for p in model.trainable_parameters() if p.requires_grad]
        value_params = getattr(method, "value_parameters", None)
        phi = [p for p in value_params() if p.requires_grad] if callable(value_params) else []
        if {id(p) for p in theta} & {id(p) for p in phi}:
            raise ValueError("theta (model) and phi (value net) parameters must be disjoint (M19)")
        groups = []
        if theta:
            groups.append({"params": theta, "lr": cfg.lr, "name": "theta"})
        if phi:
            groups.append({"params": phi, "lr": cfg.value_lr or cfg.lr, "name": "phi"})
        if not groups:
            raise ValueError("nothing to train: the model and the method have no trainable parameters")
        self.param_groups = {g["name"]: g["params"] for g in groups}
        self.optimizer = torch.optim.AdamW(groups, betas=cfg.betas, weight_decay=cfg.weight_decay, eps=cfg.eps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.backward: Callable[[torch.Tensor], None] = lambda loss: loss.backward()
        self.step = 0  # attempted updates
        self.updates = 0  # applied optimizer steps
        self.history: list[dict[str, float]] = []
        self.skipped: list[tuple[int, str]] = []

    def _lr_factor(self, applied: int) -> float:
        """Multiplier of the base learning rates after ``applied`` optimizer steps (warm-up, then cosine/constant)."""
        cfg = self.config
        if applied < cfg.warmup_updates:
            return (applied + 1) / cfg.warmup_updates
        if cfg.lr_schedule == "constant":
            return 1.0
        span = max(1, cfg.num_updates - cfg.warmup_updates)
        progress = min(1.0, (applied - cfg.warmup_updates) / span)
        return cfg.lr_min_ratio + (1 - cfg.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def _time_grid(self) -> torch.Tensor:
        cfg = self.config
        if cfg.time_grid == "uniform":
            return uniform_grid(cfg.num_steps)
        return sd3_shifted_grid(cfg.num_steps, shift=cfg.shift)

    # ------------------------------------------------------------ pieces of an update
    def draw(self, n: int) -> tuple[torch.Tensor, Any]:
        """x0 ~ N(0, I) [n, *sample_shape] and cond for n trajectories."""
        x0 = torch.randn((n, *self.sample_shape), generator=self.generator, dtype=torch.float32)
        x0 = x0.to(device=self.device, dtype=self.dtype)
        cond = self.cond_sampler(n, self.generator) if self.cond_sampler is not None else None
        return x0, cond

    def micro_step(self, x0: torch.Tensor, cond: Any, scale: float) -> tuple[dict[str, float], str | None]:
        """Rollout, reward, loss and backward(scale * loss) for one micro-batch; (metrics, skip reason)."""
        batch = self.method.rollout(x0, self.ts, cond, generator=self.generator)
        states = batch["states"]
        x_end = states[-1]
        with torch.no_grad():
            r = C.evaluate_reward(self.reward, x_end)
        metrics = {"reward_mean": float(r.mean()), "reward_std": float(r.std()) if r.numel() > 1 else 0.0}
        if not bool(torch.isfinite(r).all()):
            return metrics, "non-finite reward"
        if not bool(torch.isfinite(x_end).all()):
            return metrics, "non-finite samples"
        loss, method_metrics = self.method.loss(batch)
        metrics.update(method_metrics)
        if not bool(torch.isfinite(loss.detach()).all()):
            return metrics, "non-finite loss"
        if loss.requires_grad:
            self.backward(loss * scale)
        if self.config.residual_probe:
            metrics["residual_velocity_sq"] = self.residual_velocity_sq(batch)
        return metrics, None

    @torch.no_grad()
    def residual_velocity_sq(self, batch: dict) -> float:
        """E||v_theta - v_base||^2 with one transition per trajectory drawn with probability h_i (M41)."""
        states, ts = batch["states"], batch["ts"]
        n = min(self.config.residual_probe, states[0].shape[0])
        h = (ts[1:] - ts[:-1]).float().cpu()
        step = torch.multinomial(h, n, replacement=True, generator=self.generator)
        x = torch.stack([states[int(i)][b] for b, i in enumerate(step)])
        t = ts.to(x.device, torch.float32)[step.to(x.device)]
        cond = C.gather_cond(batch.get("cond"), torch.arange(n))
        diff = self.velocity(x, t, cond).float() - self.base_velocity(x, t, cond).float()
        return float(C.sq_norm_per_sample(diff).mean())

    def grad_norms(self) -> dict[str, torch.Tensor]:
        """Total L2 norm of each group's gradient (before clipping)."""
        out = {}
        for name, params in self.param_groups.items():
            grads = [p.grad for p in params if p.grad is not None]
            out[name] = (torch.nn.utils.get_total_norm(grads, norm_type=2.0) if grads else torch.zeros(())).float()
        return out

    def optimizer_step(self, norms: dict[str, torch.Tensor]) -> None:
        """Clip each group separately (M19 update), AdamW, then the method's post-step hook (M9)."""
        if self.config.grad_clip is not None:
            for name, params in self.param_groups.items():
                grads = [p.grad for p in params if p.grad is not None]
                if grads:
                    torch.nn.utils.clip_grads_with_norm_(params, self.config.grad_clip, norms[name])
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        hook = getattr(self.method, "after_optimizer_step", None)
        if callable(hook):
            hook()

    def skip(self, reason: str) -> None:
        """Drop the update: gradients zeroed, weights, optimizer and method state untouched."""
        self.optimizer.zero_grad(set_to_none=True)
        hook = getattr(self.method, "discard_step", None)
        if callable(hook):
            hook()
        self.skipped.append((self.step, reason))
        log.warning("flowkern.train: update %d skipped (%s); weights and optimizer state unchanged", self.step, reason)

    # ------------------------------------------------------------ one update
    def train_step(self) -> dict[str, float]:
        """One optimizer update over grad_accum_steps micro-batches; returns its metrics."""
        cfg = self.config
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        n_micro, size = cfg.grad_accum_steps, cfg.batch_size
        x0_all, cond_all = self.draw(n_micro * size)
        sums: dict[str, float] = {}
        reason = None
        for k in range(n_micro):
            rows = torch.arange(k * size, (k + 1) * size)
            metrics, reason = self.micro_step(
                x0_all[rows.to(x0_all.device)], C.gather_cond(cond_all, rows), 1.0 / n_micro
            )
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + value / n_micro
            if reason is not None:
                break
        if reason is None:
            norms = self.grad_norms()
            for name, value in norms.items():
                sums[f"grad_norm_{name}"] = float(value)
            if not all(bool(torch.isfinite(v)) for v in norms.values()):
                reason = "non-finite gradient"
        if reason is not None:
            self.skip(reason)
        else:
            self.optimizer_step(norms)
            self.updates += 1
        sums.update(
            lr=float(self.optimizer.param_groups[0]["lr"]),
            step=float(self.step),
            updates=float(self.updates),
            skipped=float(reason is not None),
            time_s=time.perf_counter() - start,
        )
        self.step += 1
        self.history.append(sums)
        if cfg.log_every and self.step % cfg.log_every == 0:
            log.info("step %d: %s", self.step, {k: _fmt(v) for k, v in sums.items()})
        return sums

    def train(
        self, num_updates: int | None = None, callback: Callable[[Trainer, dict[str, float]], None] | None = None
    ) -> list[dict[str, float]]:
        """Run ``num_updates`` (default config.num_updates) updates; ``callback(trainer, metrics)`` after each."""
        n = self.config.num_updates if num_updates is None else C.check_int("num_updates", num_updates, minimum=0)
        out = []
        for _ in range(n):
            metrics = self.train_step()
            out.append(metrics)
            if callback is not None:
                callback(self, metrics)
        return out


def _fmt(v: float) -> str:
    return f"{v:.4g}" if isinstance(v, float) and math.isfinite(v) else str(v)

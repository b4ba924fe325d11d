"""The generic training loop (layer L6): FlowModel + reward + method, plain PyTorch.

One update (design.md section 1, "One update"):

    for each of grad_accum_steps micro-batches:
        x0 ~ N(0, I), cond ~ cond_sampler       (drawn for the whole update first, so accumulation over
        batch = method.rollout(x0, ts, cond)     A micro-batches of B sees the same draws as one batch of A*B)
        r(x_N) -> reward mean/std               (shape-checked; non-finite -> skip; the rollout's own r(x_N) if any)
        loss, metrics = method.loss(batch)      (non-finite -> skip)
        backward(loss / A)
    grad norm per parameter group (theta, phi) (non-finite -> skip)
    clip each group to grad_clip separately (M19 update), AdamW step, method.after_optimizer_step() (M9 tau)

A skipped update zeroes the gradients and leaves weights, optimizer state, method state (VGG-Flow's tau and the
norms queued for its quantile, M9) and every random stream but the data stream untouched (:mod:`flowkern.train.rng`);
it is logged (``logging`` warning and :attr:`Trainer.skipped`) and appears in the metrics with ``skipped = 1``. An
update that raises leaves the trainer exactly as before the call.

Data parallel: ``Trainer(..., accelerator=accelerate.Accelerator())`` under ``accelerate launch`` (see
:mod:`flowkern.train.distributed` for the command lines and what is synchronised).

Checkpoints: :meth:`Trainer.state_dict` / :meth:`Trainer.load_state_dict` hold everything an exact resume needs,
including :meth:`Trainer.settings` (everything that changes the trajectory of training), which a resume compares;
:func:`save_checkpoint` / :func:`load_checkpoint` store them through :mod:`flowkern.train.checkpoint` (atomic,
crash-safe, one writer per directory).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from flowkern.methods import _common as C
from flowkern.methods.base import Method, missing_members
from flowkern.sampling import sd3_shifted_grid, uniform_grid
from flowkern.train import checkpoint as ckpt
from flowkern.train import lock
from flowkern.train.config import TrainConfig
from flowkern.train.distributed import Processes
from flowkern.train.rng import PROCESS_SEED_STRIDE, RandomStreams

__all__ = ["PROCESS_SEED_STRIDE", "Trainer", "load_checkpoint", "save_checkpoint"]

log = logging.getLogger("flowkern.train")

STATE_FORMAT = "flowkern-trainer-state"
STATE_VERSION = 2  # 2: + settings (strict resume), run_info
UNCOMPARED_CONFIG = ("log_every", "checkpoint_every", "keep_checkpoints")  # bookkeeping, not the trajectory


class Trainer:
    """Trains ``model`` (a FlowModel: ``velocity``, ``base_velocity()``, ``trainable_parameters()``) with ``method``.

    Args:
        model: the fine-tuned flow model (its ``trainable_parameters()`` are theta).
        reward: r(x) -> [B], used to log the reward of each rollout's terminal states x_N.
        method: a :class:`flowkern.methods.base.Method` (the flowkern methods derive from ``MethodBase``).
        config: :class:`TrainConfig`.
        sample_shape: shape of one sample x (without the batch dimension).
        cond_sampler: optional ``(n, generator) -> cond`` drawing per-trajectory conditioning.
        ts: optional explicit time grid [N+1] (overrides config.num_steps/time_grid).
        device, dtype: where x0 is drawn and in which dtype (device default: the accelerator's, else CPU).
        accelerator: optional ``accelerate.Accelerator`` for data parallel training (module
            :mod:`flowkern.train.distributed`); ``config.batch_size`` is then per process. With more than one
            process, a method's own ``generator`` is reseeded on processes > 0 (seed offset by the process index)
            and the method is told how to gather over processes (``share_across_processes``: VGG-Flow's tau, M9).
        run_info: JSON-plain information saved with every checkpoint and not compared on resume (the CLI keeps
            its options there, so ``flowkern train --out RUN --resume`` can rebuild the run).

    Random streams (:mod:`flowkern.train.rng`): :attr:`generator` (seed ``config.seed``) draws only x0 and cond,
    identically on every process; :attr:`process_generator` (seed ``config.seed + 1_000_003 (process index + 1)``)
    drives the per-process randomness (stochastic rollouts, the residual probe).
    """

    def __init__(
        self,
        model: Any,
        reward: C.Reward,
        method: Method,
        config: TrainConfig | None = None,
        *,
        sample_shape: tuple[int, ...],
        cond_sampler: Callable[[int, torch.Generator], Any] | None = None,
        ts: torch.Tensor | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        accelerator: Any = None,
        run_info: dict | None = None,
    ):
        self.config = config or TrainConfig()
        if not isinstance(self.config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(self.config).__name__}")
        missing = missing_members(method)
        if missing:
            raise TypeError(f"method must follow flowkern.methods.base.Method (derive from MethodBase); "
                            f"{type(method).__name__} lacks {missing}")  # fmt: skip
        if not callable(getattr(model, "trainable_parameters", None)):
            raise TypeError(f"model must provide trainable_parameters() (FlowModel), got {type(model).__name__}")
        self.model = model
        self.reward = C.check_callable("reward", reward)
        self.method = method
        self.sample_shape = tuple(int(s) for s in sample_shape)
        self.cond_sampler = cond_sampler
        self.accelerator = accelerator
        self.processes = Processes(accelerator)
        if device is None:
            device = self.processes.device or "cpu"
        self.device = torch.device(device)
        self.dtype = dtype
        self.ts = C.check_time_grid(ts if ts is not None else self._time_grid()).to(self.device)
        self.velocity, self.base_velocity = C.flow_callables(model, detach_uncond=True)
        self.run_info = dict(run_info or {})

        cfg = self.config
        theta = [p for p in model.trainable_parameters() if p.requires_grad]
        phi = [p for p in method.value_parameters() if p.requires_grad]
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
        self._named_theta = _names(theta, model, "theta")
        self._named_phi = _names(phi, method.value_module(), "phi")
        self.streams = RandomStreams(cfg.seed, self.processes.index, method.generator)
        self.backward: Callable[[torch.Tensor], None] = self.processes.backward
        self.step = 0  # attempted updates
        self.updates = 0  # applied optimizer steps
        self.history: list[dict[str, float]] = []
        self.skipped: list[tuple[int, str]] = []
        self._saved_step: int | None = None  # step of the last checkpoint written or loaded by train()
        if self.processes.count > 1:
            self._setup_processes()

    @property
    def generator(self) -> torch.Generator:
        """The data stream: x0 and cond of every update (:mod:`flowkern.train.rng`)."""
        return self.streams.data

    @property
    def process_generator(self) -> torch.Generator:
        """The per-process stream: stochastic rollouts and the residual probe (:mod:`flowkern.train.rng`)."""
        return self.streams.process

    def _setup_processes(self) -> None:
        """Identical starting weights, tau over all processes (M9)."""
        self.method.share_across_processes(self.processes.gather_cat)
        self.processes.broadcast_parameters([p for params in self.param_groups.values() for p in params])

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
        with self.processes.autocast():  # accelerate's mixed precision (no-op without an accelerator)
            batch = self.method.rollout(x0, self.ts, cond, generator=self.process_generator)
            states = batch["states"]
            x_end = states[-1]
            r = self._terminal_reward(batch)
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

    def _terminal_reward(self, batch: dict) -> torch.Tensor:
        """r(x_N) [B]: the rollout's own ('terminal_reward', e.g. DAM's, which needs grad r(x_N) anyway) when the
        method trains on this reward, so x_N is decoded once per update; else evaluated without grad, the method's
        ``micro_batch`` samples at a time."""
        r = batch.get("terminal_reward")
        if r is not None and self.method.reward is self.reward:
            return C.check_reward_output(r.detach(), batch["states"][-1], "terminal_reward")
        with torch.no_grad():
            x_end = C.fetch(batch["states"][-1], self.device)
            return C.evaluate_reward(self.reward, x_end, micro_batch=self.method.micro_batch)

    @torch.no_grad()
    def residual_velocity_sq(self, batch: dict) -> float:
        """E||v_theta - v_base||^2 with one transition per trajectory drawn with probability h_i (M41)."""
        states, ts = batch["states"], batch["ts"]
        n = min(self.config.residual_probe, states[0].shape[0])
        h = (ts[1:] - ts[:-1]).float().cpu()
        step = torch.multinomial(h, n, replacement=True, generator=self.process_generator)
        x = C.fetch(torch.stack([states[int(i)][b] for b, i in enumerate(step)]), self.device)
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
        self.method.after_optimizer_step()

    def skip(self, reason: str, snapshot: dict | None = None) -> None:
        """Drop the update: gradients zeroed, weights, optimizer and method state untouched (VGG-Flow forgets the
        norms queued for its quantile, M9); with the update's ``snapshot`` of the random streams, every stream but
        the data stream is rewound to it (:mod:`flowkern.train.rng`)."""
        self._discard_gradients()
        if snapshot is not None:
            self.streams.rewind(snapshot, data=False)
        self.skipped.append((self.step, reason))
        if self.processes.is_main:
            log.warning(
                "flowkern.train: update %d skipped (%s); weights and optimizer state unchanged", self.step, reason
            )

    def _discard_gradients(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.method.discard_step()

    # ------------------------------------------------------------ one update
    def train_step(self) -> dict[str, float]:
        """One optimizer update over grad_accum_steps micro-batches; returns its metrics.

        If computing the update raises (a method's error, KeyboardInterrupt), the trainer is left exactly as before
        the call (gradients dropped, the method's queued state discarded, every random stream rewound)."""
        cfg = self.config
        start = time.perf_counter()
        snapshot = self.streams.snapshot()
        try:
            sums, reason, norms = self._accumulate()
        except BaseException:
            self._discard_gradients()
            self.streams.rewind(snapshot, data=True)
            raise
        if reason is not None:
            self.skip(reason, snapshot)
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
        if cfg.log_every and self.step % cfg.log_every == 0 and self.processes.is_main:
            log.info("step %d: %s", self.step, {k: _fmt(v) for k, v in sums.items()})
        return sums

    def _accumulate(self) -> tuple[dict[str, float], str | None, dict[str, torch.Tensor]]:
        """The update's gradients over its micro-batches: (summed metrics, skip reason or None, group norms)."""
        cfg = self.config
        self.optimizer.zero_grad(set_to_none=True)
        n_micro, size = cfg.grad_accum_steps, cfg.batch_size
        n_proc, index = self.processes.count, self.processes.index
        # the whole update's draws on every process; micro-batch k of process r = rows (k W + r) B .. + B, so
        # the processes' micro-batches concatenate to one process's micro-batch of W B (same seed)
        x0_all, cond_all = self.draw(n_micro * n_proc * size)
        sums: dict[str, float] = {}
        reason = None
        for k in range(n_micro):
            first = (k * n_proc + index) * size
            rows = torch.arange(first, first + size)
            metrics, reason = self.micro_step(
                x0_all[rows.to(x0_all.device)], C.gather_cond(cond_all, rows), 1.0 / n_micro
            )
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + value / n_micro
            if reason is not None:
                break
        if n_proc > 1:
            sums, reason = self._combine_processes(sums, reason)
        norms: dict[str, torch.Tensor] = {}
        if reason is None:
            self.processes.mean_gradients([p for params in self.param_groups.values() for p in params])
            norms = self.grad_norms()
            for name, value in norms.items():
                sums[f"grad_norm_{name}"] = float(value)
            if not all(bool(torch.isfinite(v)) for v in norms.values()):
                reason = "non-finite gradient"
        return sums, reason, norms

    def _combine_processes(self, sums: dict[str, float], reason: str | None) -> tuple[dict[str, float], str | None]:
        """Metrics averaged over processes; the update is skipped everywhere if any process failed."""
        gathered = self.processes.gather_objects((sums, reason))
        failed = [(i, r) for i, (_, r) in enumerate(gathered) if r is not None]
        merged: dict[str, float] = {}
        for key in dict.fromkeys(k for metrics, _ in gathered for k in metrics):
            values = [metrics[key] for metrics, _ in gathered if key in metrics]
            merged[key] = sum(values) / len(values)
        return merged, (f"{failed[0][1]} (process {failed[0][0]})" if failed else None)

    def train(
        self,
        num_updates: int | None = None,
        callback: Callable[[Trainer, dict[str, float]], None] | None = None,
        *,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int | None = None,
        keep_checkpoints: int | None = None,
    ) -> list[dict[str, float]]:
        """Run ``num_updates`` (default config.num_updates) updates; ``callback(trainer, metrics)`` after each.

        checkpoint_dir: a run directory, locked for the whole call (one writer per directory); a checkpoint
        (:func:`save_checkpoint`) is written every ``checkpoint_every`` updates (default config.checkpoint_every;
        0 = only at the end) and after the last one, keeping the newest ``keep_checkpoints`` (default
        config.keep_checkpoints; 0 = all). To resume, call :func:`load_checkpoint` (trainer, run directory) first,
        then ``train`` the remaining updates.
        """
        n = self.config.num_updates if num_updates is None else C.check_int("num_updates", num_updates, minimum=0)
        every = self.config.checkpoint_every if checkpoint_every is None else checkpoint_every
        every = C.check_int("checkpoint_every", every, minimum=0)
        keep = self.config.keep_checkpoints if keep_checkpoints is None else keep_checkpoints
        keep = C.check_int("keep_checkpoints", keep, minimum=0)
        held = contextlib.nullcontext()
        if checkpoint_dir is not None and self.processes.is_main:
            Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
            held = lock.hold(checkpoint_dir, what="checkpoint directory")
        out = []
        with held:
            for _ in range(n):
                metrics = self.train_step()
                out.append(metrics)
                if checkpoint_dir is not None and every and self.step % every == 0:
                    self._save(checkpoint_dir, keep)
                if callback is not None:
                    callback(self, metrics)
            if checkpoint_dir is not None and self._saved_step != self.step:
                self._save(checkpoint_dir, keep)
        return out

    def _save(self, directory: str | os.PathLike, keep: int) -> None:
        path = save_checkpoint(self, directory, keep_last=keep or None)
        self._saved_step = self.step
        if self.processes.is_main:
            log.info("flowkern.train: checkpoint %s", path)

    # ------------------------------------------------------------ state (exact resume)
    def fingerprint(self) -> dict[str, Any]:
        """The structure a checkpoint must have: model/method types, theta and phi names, shapes and dtypes."""
        return {
            "model": type(self.model).__name__,
            "method": type(self.method).__name__,
            "theta": [[name, list(p.shape), str(p.dtype)] for name, p in self._named_theta],
            "phi": [[name, list(p.shape), str(p.dtype)] for name, p in self._named_phi],
        }

    def settings(self) -> dict[str, Any]:
        """Everything that changes the trajectory of training, as flat ``key -> JSON value`` (compared on resume).

        The model and method types; the method's ``hyperparameters()`` (``method.kind`` tells deterministic from
        memoryless adjoint matching) and of the model (the frozen weights' dtypes, i.e. the precision; LoRA
        rank, alpha and targets; CFG constants; prompts); the value net's type; sample shape (the resolution), dtype,
        device type and the time grid; every TrainConfig field but the bookkeeping ones (optimizer, schedule, batch,
        seed, ...), and ``config.extra``, where a caller records what the trainer cannot see (e.g. the reward spec).
        """
        out: dict[str, Any] = {"model": type(self.model).__name__, "method": type(self.method).__name__}
        out.update({f"method.{k}": v for k, v in self.method.hyperparameters().items()})
        value_net = self.method.value_module()
        if value_net is not None:
            out["value_net"] = type(value_net).__name__
        out.update(_model_settings(self.model))
        out["sample_shape"] = list(self.sample_shape)
        out["dtype"] = str(self.dtype)
        out["device"] = self.device.type
        out["ts"] = [float(t) for t in self.ts.detach().double().cpu()]
        for key, value in self.config.to_dict().items():
            if key not in UNCOMPARED_CONFIG:
                _flatten(f"config.{key}", value, out)
        return out

    def state_dict(self) -> dict[str, Any]:
        """A snapshot (cloned tensors) of everything an exact resume needs: theta (by name), the value net,
        AdamW and LR-schedule state, method state (VGG-Flow tau, M9), RNG states, counters, history, config,
        :meth:`settings` and ``run_info``.

        With ``accelerate`` this is collective: every process must call it (the per-process RNG states are
        gathered into ``state['rng']['processes']``)."""
        state = self._local_state()
        state["rng"]["processes"] = self.processes.gather_objects(state["rng"]["processes"][0])
        return state

    def _local_state(self) -> dict[str, Any]:
        value_net = self.method.value_module()
        method_state = self.method.state_dict()
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "fingerprint": self.fingerprint(),
            "settings": self.settings(),
            "config": self.config.to_dict(),
            "run_info": copy.deepcopy(self.run_info),
            "counters": {
                "step": self.step,
                "updates": self.updates,
                "history_length": len(self.history),
                "num_processes": self.processes.count,
            },  # fmt: skip
            "history": copy.deepcopy(self.history),
            "skipped": [tuple(s) for s in self.skipped],
            "model": {name: p.detach().clone() for name, p in self._named_theta},
            "value_net": _clone(value_net.state_dict()) if value_net is not None else None,
            "phi": {name: p.detach().clone() for name, p in self._named_phi} if value_net is None else None,
            "optimizer": _clone(self.optimizer.state_dict()),
            "scheduler": copy.deepcopy(self.scheduler.state_dict()),
            "method": _clone(method_state) if method_state else None,
            "rng": {"generator": self.streams.data.get_state(), "processes": [self.streams.process_state()]},
        }

    def load_state_dict(self, state: dict[str, Any], *, allow_changes: Iterable[str] = ()) -> None:
        """Restore :meth:`state_dict` output. ValueError (and the trainer unchanged) if it does not fit: another
        structure (:meth:`fingerprint`), or other :meth:`settings`, listing every differing key, unless the key is
        in ``allow_changes`` (e.g. ``config.num_updates`` to extend a run, ``config.lr`` on purpose); allowed changes
        take effect (the optimizer's learning rates, betas, weight decay and eps follow the current config)."""
        self._check_state(state, set(allow_changes))
        backup = self._local_state()
        try:
            self._apply_state(state)
        except Exception as err:
            self._apply_state(backup)
            if isinstance(err, ValueError | TypeError | KeyError | RuntimeError):
                raise ValueError(f"trainer state could not be restored ({type(err).__name__}: {err})") from err
            raise

    def _check_state(self, state: Any, allow_changes: set[str]) -> None:
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a flowkern trainer state (format {STATE_FORMAT!r} expected)")
        version = state.get("version")
        if not isinstance(version, int) or version > STATE_VERSION:
            raise ValueError(f"trainer state version {version!r}; this flowkern reads versions <= {STATE_VERSION}")
        missing = [k for k in ("fingerprint", "counters", "model", "optimizer", "scheduler", "rng") if k not in state]
        if missing:
            raise ValueError(f"trainer state lacks {missing}")
        _compare_fingerprints(state["fingerprint"], self.fingerprint())
        self._compare_settings(state, allow_changes)
        _check_tensors("model (theta)", state["model"], dict(self._named_theta))
        value_net = self.method.value_module()
        if value_net is not None:
            _check_tensors("value_net", state.get("value_net"), value_net.state_dict())
        else:
            _check_tensors("phi", state.get("phi"), dict(self._named_phi))
        saved_groups = state["optimizer"].get("param_groups") if isinstance(state["optimizer"], dict) else None
        groups = self.optimizer.param_groups
        if not isinstance(saved_groups, list) or [len(g.get("params", ())) for g in saved_groups] != [
            len(g["params"]) for g in groups
        ]:
            raise ValueError("optimizer state: parameter groups differ from this trainer's")
        params = [p for g in groups for p in g["params"]]
        for index, entry in state["optimizer"].get("state", {}).items():
            if not isinstance(index, int) or not 0 <= index < len(params):
                raise ValueError(f"optimizer state: unknown parameter index {index!r}")
            for key, value in entry.items():
                if isinstance(value, torch.Tensor) and value.dim() and value.shape != params[index].shape:
                    raise ValueError(
                        f"optimizer state {key} of parameter {index}: shape {list(value.shape)}, "
                        f"parameter {list(params[index].shape)}"
                    )
        counters = state["counters"]
        if not all(isinstance(counters.get(k), int) and counters[k] >= 0 for k in ("step", "updates")):
            raise ValueError(f"trainer state counters malformed: {counters!r}")
        self.streams.check(state["rng"])

    def _compare_settings(self, state: dict[str, Any], allow_changes: set[str]) -> None:
        current = self.settings()
        saved = state.get("settings")
        if not isinstance(saved, dict):  # version 1 recorded the TrainConfig only: compare what it recorded
            saved = {}
            for key, value in (state.get("config") or {}).items():
                if key not in UNCOMPARED_CONFIG:
                    _flatten(f"config.{key}", value, saved)
            current = {k: v for k, v in current.items() if k in saved}
            if self.processes.is_main:
                log.warning("flowkern.train: a version-1 checkpoint records no method or model settings: only its "
                            "TrainConfig is compared")  # fmt: skip
        changed = [k for k in sorted(saved.keys() | current.keys()) if saved.get(k, _ABSENT) != current.get(k, _ABSENT)]
        refused = [k for k in changed if k not in allow_changes]

        def describe(keys: list[str]) -> str:
            return "; ".join(f"{k}: {_show(saved.get(k, _ABSENT))} -> {_show(current.get(k, _ABSENT))}" for k in keys)

        if refused:
            raise ValueError(
                f"settings differ from the checkpoint's ({describe(refused)}): a resumed run must keep them "
                f"(allow a deliberate change with allow_changes={refused!r})"
            )
        if changed and self.processes.is_main:
            log.warning("flowkern.train: resuming with changed settings (allowed): %s", describe(changed))

    def _apply_state(self, state: dict[str, Any]) -> None:
        if state.get("method"):
            self.method.load_state_dict(_clone(state["method"]))
        with torch.no_grad():
            for name, p in self._named_theta:
                p.copy_(state["model"][name])
            value_net = self.method.value_module()
            if value_net is not None:
                value_net.load_state_dict(state["value_net"], strict=True)
            else:
                for name, p in self._named_phi:
                    p.copy_(state["phi"][name])
        # cloned: AdamW updates its moments in place, the caller's state must not change
        self.optimizer.load_state_dict(_clone(state["optimizer"]))
        self.scheduler.load_state_dict(copy.deepcopy(state["scheduler"]))
        self._apply_config_to_optimizer()
        counters = state["counters"]
        self.streams.load(state["rng"], counters["step"], count=self.processes.count, is_main=self.processes.is_main)
        self.step = counters["step"]
        self.updates = counters["updates"]
        self.history = copy.deepcopy(list(state.get("history", [])))
        self.skipped = [tuple(s) for s in state.get("skipped", [])]
        self._saved_step = self.step

    def _apply_config_to_optimizer(self) -> None:
        """The current config's AdamW hyperparameters and base learning rates (equal to the loaded ones unless a
        change was allowed); the learning rate of each group is base * schedule factor, as LambdaLR computes it."""
        cfg = self.config
        base = {"theta": cfg.lr, "phi": cfg.value_lr or cfg.lr}
        groups = self.optimizer.param_groups
        for group in groups:
            group.update(betas=cfg.betas, weight_decay=cfg.weight_decay, eps=cfg.eps, initial_lr=base[group["name"]])
        self.scheduler.base_lrs = [group["initial_lr"] for group in groups]
        factor = self._lr_factor(self.scheduler.last_epoch)
        for group in groups:
            group["lr"] = group["initial_lr"] * factor


# ---------------------------------------------------------------- checkpoints of a trainer
def save_checkpoint(trainer: Trainer, directory: str | os.PathLike, *, keep_last: int | None = None) -> Path:
    """Write ``trainer``'s state to ``directory/step-<trainer.step>`` atomically (:mod:`flowkern.train.checkpoint`);
    returns that path.

    ``keep_last``: after the new checkpoint is complete, delete all but the newest ``keep_last`` complete ones
    (None or 0 keeps all). With ``accelerate`` every process must call this (the RNG states are gathered); only the
    main process writes (holding the directory's lock), the others return the same path once it is written.
    """
    state = trainer.state_dict()  # collective under accelerate
    final = Path(directory) / f"step-{trainer.step:08d}"
    if trainer.processes.is_main:
        try:
            ckpt.write_state(state, directory, trainer.step, keep_last=keep_last)
        finally:
            trainer.processes.wait()
    else:
        trainer.processes.wait()
    return final


def load_checkpoint(
    trainer: Trainer, path: str | os.PathLike, *, allow_changes: Iterable[str] = (), skip_damaged: bool = False
) -> Path:
    """Restore ``trainer`` from a checkpoint directory, or from a run directory's newest checkpoint; returns the
    checkpoint directory that was loaded.

    Raises ValueError (naming the file and the problem; the trainer unchanged) for a missing, truncated, corrupt or
    incompatible checkpoint, and for settings that differ from the checkpoint's (:meth:`Trainer.load_state_dict`,
    ``allow_changes``). A damaged newest checkpoint of a run directory is :class:`flowkern.train.checkpoint.
    DamagedCheckpoint`; ``skip_damaged=True`` sets it aside and falls back to the previous one on purpose.
    """
    path, state = ckpt.read_newest(path, skip_damaged=skip_damaged, set_aside=trainer.processes.is_main)
    try:
        trainer.load_state_dict(state, allow_changes=allow_changes)
    except ValueError as err:
        raise ValueError(f"checkpoint {str(path)!r}: {err}") from None
    return path


# ---------------------------------------------------------------- helpers
_ABSENT = type("Absent", (), {"__repr__": lambda self: "(absent)"})()


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


_NOT_PLAIN = object()


def _plain(value: Any) -> Any:
    """``value`` as a JSON-plain value (tuples as lists), or _NOT_PLAIN (tensors, callables, modules, ...)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple | set | frozenset):
        items = [_plain(v) for v in (sorted(value, key=str) if isinstance(value, set | frozenset) else value)]
        return _NOT_PLAIN if any(v is _NOT_PLAIN for v in items) else items
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        items = {k: _plain(v) for k, v in value.items()}
        return _NOT_PLAIN if any(v is _NOT_PLAIN for v in items.values()) else items
    if isinstance(value, torch.dtype | torch.device):
        return str(value)
    return _NOT_PLAIN


def _plain_attributes(prefix: str, obj: Any) -> dict[str, Any]:
    """``prefix.name -> value`` for the public attributes of ``obj`` holding plain, non-None values (a model's
    hyperparameters; nn.Module's ``training`` and None values left out)."""
    out = {}
    for name, value in sorted(getattr(obj, "__dict__", {}).items()):
        if name.startswith("_") or name == "training" or value is None:
            continue
        plain = _plain(value)
        if plain is not _NOT_PLAIN:
            out[f"{prefix}.{name}"] = plain
    return out


def _model_settings(model: Any) -> dict[str, Any]:
    """The model's plain hyperparameters, its frozen weights' dtypes and its LoRA adapters' configs (peft)."""
    out = _plain_attributes("model", model)
    if isinstance(model, torch.nn.Module):
        out["model.frozen_dtypes"] = sorted({str(p.dtype) for p in model.parameters() if not p.requires_grad})
        for module in model.modules():
            configs = getattr(module, "peft_config", None)
            if isinstance(configs, dict):
                for name, config in configs.items():
                    fields = ("r", "lora_alpha", "target_modules", "lora_dropout", "use_rslora")
                    values = {f: _plain(getattr(config, f, None)) for f in fields}
                    out[f"model.lora.{name}"] = {f: v for f, v in values.items() if v is not _NOT_PLAIN}
    return out


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
        for key, item in value.items():
            _flatten(f"{prefix}.{key}", item, out)
    elif value is not None and not (isinstance(value, dict) and not value):
        plain = _plain(value)
        out[prefix] = repr(value) if plain is _NOT_PLAIN else plain


def _fmt(v: float) -> str:
    return f"{v:.4g}" if isinstance(v, float) and math.isfinite(v) else str(v)


def _names(params: list[torch.nn.Parameter], module: Any, prefix: str) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) for an optimizer group: the module's parameter names, else ``prefix.i``."""
    by_id = {}
    if isinstance(module, torch.nn.Module):
        by_id = {id(p): name for name, p in module.named_parameters(remove_duplicate=True)}
    out, seen = [], set()
    for i, p in enumerate(params):
        name = by_id.get(id(p), f"{prefix}.{i}")
        if name in seen:
            name = f"{prefix}.{i}"
        seen.add(name)
        out.append((name, p))
    return out


def _clone(obj: Any) -> Any:
    """Deep copy of a nested state with tensors detached and cloned."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_clone(v) for v in obj)
    return copy.deepcopy(obj)


def _check_tensors(what: str, saved: Any, current: dict[str, torch.Tensor]) -> None:
    if not isinstance(saved, dict):
        raise ValueError(f"trainer state: {what} missing")
    missing, extra = sorted(set(current) - set(saved)), sorted(set(saved) - set(current))
    if missing or extra:
        raise ValueError(f"{what}: names differ (missing {missing[:3]}, unexpected {extra[:3]})")
    for name, tensor in current.items():
        value = saved[name]
        if not isinstance(value, torch.Tensor) or value.shape != tensor.shape or value.dtype != tensor.dtype:
            got = f"{list(value.shape)} {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{what} {name!r}: saved {got}, expected {list(tensor.shape)} {tensor.dtype}")


def _compare_fingerprints(saved: Any, current: dict[str, Any]) -> None:
    if not isinstance(saved, dict):
        raise ValueError("trainer state: fingerprint malformed")
    for key in ("model", "method"):
        if saved.get(key) != current[key]:
            raise ValueError(f"incompatible: saved for {key} {saved.get(key)!r}, this trainer has {current[key]!r}")
    for key in ("theta", "phi"):
        ours, theirs = current[key], [list(x) for x in saved.get(key, [])]
        if len(ours) != len(theirs):
            raise ValueError(f"incompatible: {len(theirs)} {key} parameters saved, this trainer has {len(ours)}")
        for a, b in zip(theirs, ours):
            if a != b:
                raise ValueError(f"incompatible {key} parameter: saved {a}, this trainer has {b}")

"""``flowkern train``: one training run with a log, progress bars, checkpoints, exact resume and accelerate.

Run directory (``--out``)::

    run_config.json              the resolved settings (what --config files and flags produced)
    log.jsonl                    one JSON object per update (Trainer metrics + step, method)
    checkpoints/step-XXXXXXXX/   flowkern.train.save_checkpoint (atomic; --resume continues bit-exactly)
    lora/                        the final LoRA (diffusers format; stock pipelines load it) or toy residual
    value_net.safetensors        VGG-Flow's value network (never in the LoRA file)
    eval.json                    reward, diversity, prior preservation on fixed seeds and prompts
    reward.png, loss.png         plots from the log (``flowkern plot RUN_DIR`` redraws them)
    tensorboard/                 with --tensorboard

Under ``accelerate launch`` (``WORLD_SIZE`` > 1) an ``accelerate.Accelerator`` is created and passed to the
Trainer (data parallel: per-process batch, gradients averaged); only the main process writes files.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["JsonlLog", "TrainOptions", "ensure_output_dir", "progress_bar", "train_run"]

RUN_FILES = ("log.jsonl", "run_config.json", "checkpoints", "lora", "eval.json")


# ---------------------------------------------------------------- small utilities
def ensure_output_dir(path: str | os.PathLike, *, allow_existing: bool) -> bool:
    """Create ``path`` if needed and check a file can be written in it; returns True if it was created.

    With ``allow_existing=False`` a directory that already holds a run (log, checkpoints, LoRA) is refused, so
    nothing of it is overwritten.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"output path {path} exists and is not a directory")
    if path.is_dir() and not allow_existing:
        present = [name for name in RUN_FILES if (path / name).exists()]
        if present:
            raise ValueError(
                f"output directory {path} already holds a run ({', '.join(present)}): pass --resume to continue it, "
                "--overwrite to replace it, or another --out"
            )
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as err:
        if created and path.is_dir() and not any(path.iterdir()):
            path.rmdir()
        raise ValueError(f"cannot write to output directory {path}: {err.strerror or err}") from None
    return created


class JsonlLog:
    """Append-only JSONL log, flushed per record; non-finite floats become null."""

    def __init__(self, path: str | os.PathLike, *, truncate: bool = False, keep_below_step: int | None = None):
        self.path = os.fspath(path)
        if truncate:
            open(self.path, "w").close()
        elif keep_below_step is not None and os.path.isfile(self.path):  # resume: drop updates after the checkpoint
            from flowkern.app.report import read_log

            kept = [
                r for r in read_log(self.path) if isinstance(r.get("step"), int | float) and r["step"] < keep_below_step
            ]
            with open(self.path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
        self._file = open(self.path, "a")

    def write(self, record: dict) -> None:
        clean = {}
        for k, v in record.items():
            if isinstance(v, float):
                clean[k] = v if math.isfinite(v) else None
                if k in ("step", "updates"):
                    clean[k] = int(v)
            else:
                clean[k] = v
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class _NoBar:
    def __init__(self, *args, **kwargs):
        pass

    def update(self, n=1):
        pass

    def set_postfix(self, **kwargs):
        pass

    def close(self):
        pass


def progress_bar(total: int, desc: str, *, enabled: bool = True, initial: int = 0):
    """A tqdm bar (stderr) when tqdm is installed and ``enabled``; a silent stand-in otherwise."""
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, initial=initial, desc=desc, unit="update", dynamic_ncols=True)


# ---------------------------------------------------------------- options
@dataclass
class TrainOptions:
    """Everything ``flowkern train`` takes (flags, or keys of a --config JSON file with the same names)."""

    model: str = "tiny"
    method: str = "vggflow"
    reward: list = field(default_factory=lambda: ["redness"])
    reward_source: dict = field(default_factory=dict)
    prompt: list = field(default_factory=list)
    out: str = "runs/flowkern"
    beta: float | None = None
    lam: float | None = None
    K: int | None = None
    p: float = 2.0
    eta: str = "quad"
    alpha: float = 1e4
    subsample: float | None = 0.25
    consistency: str | None = None
    lora_rank: int = 8
    lora_alpha: float | None = None
    steps: int = 400
    batch_size: int = 8
    grad_accum: int = 1
    micro_batch: int | None = None
    num_steps: int | None = None
    guidance_scale: float | None = None
    lr: float = 5e-4
    value_lr: float | None = None
    grad_clip: float | None = 1.0
    resolution: int | None = None
    precision: str = "fp32"
    device: str = "cpu"
    seed: int = 0
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    eval_samples: int = 16
    resume: bool = False
    overwrite: bool = False
    tensorboard: bool = False
    progress: bool = True

    def check(self) -> None:
        """Validate the numbers and choices that need no model (one clear ValueError each)."""
        from flowkern.app.build import METHODS

        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; known: {', '.join(METHODS)}")
        for name in ("steps", "batch_size", "grad_accum", "lora_rank", "eval_samples"):
            _int(name, getattr(self, name), 1)
        for name in ("checkpoint_every", "seed", "keep_checkpoints"):
            _int(name, getattr(self, name), 0)
        if self.micro_batch is not None:
            _int("micro_batch", self.micro_batch, 1)
        if self.num_steps is not None:
            _int("num_steps", self.num_steps, 1)
        for name in ("lr", "value_lr", "grad_clip", "lora_alpha", "guidance_scale"):
            value = getattr(self, name)
            if value is not None and not (_is_number(value) and math.isfinite(value) and value > 0):
                raise ValueError(f"--{_flag(name)} must be a finite number > 0, got {value!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"--precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if self.resolution is not None:
            _int("resolution", self.resolution, 1)
        if not self.reward:
            raise ValueError("--reward: name at least one reward (NAME or NAME:WEIGHT)")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite contradict each other")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise ValueError(f"--device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {self.device}: CUDA is not available on this machine")
        if self.tensorboard:
            import importlib.util

            if importlib.util.find_spec("tensorboard") is None:
                raise ValueError("--tensorboard needs the tensorboard package (pip install tensorboard)")
        self.method_settings().check(self.num_steps or 10**9)

    def method_settings(self):
        from flowkern.app.build import MethodSettings

        return MethodSettings(
            beta=self.beta,
            lam=self.lam,
            K=self.K,
            p=self.p,
            eta=self.eta,
            alpha=self.alpha,
            subsample=self.subsample,
            consistency=self.consistency,
            micro_batch=self.micro_batch,
        )

    def to_dict(self) -> dict:
        return asdict(self)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"--{_flag(name)} must be an int >= {minimum}, got {value!r}")


# ---------------------------------------------------------------- accelerate
def launched_processes() -> int:
    """The number of processes of an ``accelerate launch`` / torchrun (1 when started directly)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def make_accelerator(device: str):
    """An ``accelerate.Accelerator`` when launched with several processes, else None."""
    if launched_processes() <= 1:
        return None
    from accelerate import Accelerator

    return Accelerator(cpu=device == "cpu")


# ---------------------------------------------------------------- the run
def train_run(opts: TrainOptions, echo=print) -> dict:
    """Train as ``opts`` says; returns the final evaluation (also written to eval.json)."""
    from flowkern.app.build import check_reward_names, resolve_model
    from flowkern.train import latest_checkpoint, save_checkpoint

    opts.check()
    kind, _ = resolve_model(opts.model)
    check_reward_names(opts.reward, kind)
    out = Path(opts.out)
    checkpoints = out / "checkpoints"
    if opts.resume:
        if latest_checkpoint(checkpoints) is None:
            raise ValueError(f"--resume: no complete checkpoint in {checkpoints}")
        previous = out / "run_config.json"
        if previous.is_file():
            _check_same_run(json.loads(previous.read_text()), opts)
    accelerator = make_accelerator(opts.device)
    is_main = accelerator is None or accelerator.is_main_process
    created = ensure_output_dir(out, allow_existing=opts.resume or opts.overwrite) if is_main else False
    if accelerator is not None:
        accelerator.wait_for_everyone()
    try:
        setup, reward_fn, reward_module, method, trainer = _build_run(opts, accelerator, checkpoints, echo)
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a failed start leaves nothing behind
        raise
    if is_main and opts.overwrite:
        _clear_run(out)  # only now that the new run has started: a bad --overwrite run keeps the old one
    if is_main:
        processes = 1 if accelerator is None else accelerator.num_processes
        (out / "run_config.json").write_text(json.dumps({**opts.to_dict(), "num_processes": processes}, indent=2))
    log = JsonlLog(out / "log.jsonl", keep_below_step=trainer.step) if is_main else None
    writer = _tensorboard(out) if (opts.tensorboard and is_main) else None
    bar = progress_bar(opts.steps, opts.method, enabled=opts.progress and is_main, initial=trainer.step)
    start = time.perf_counter()
    try:
        while trainer.step < opts.steps:
            metrics = trainer.train_step()
            if log is not None:
                log.write({"method": opts.method, **metrics})
            if writer is not None:
                for k, v in metrics.items():
                    writer.add_scalar(k, v, trainer.step)
            bar.set_postfix(reward=f"{metrics['reward_mean']:.4g}", loss=f"{metrics.get('loss', float('nan')):.3g}")
            bar.update(1)
            if opts.checkpoint_every and trainer.step % opts.checkpoint_every == 0 and trainer.step < opts.steps:
                save_checkpoint(trainer, checkpoints, keep_last=opts.keep_checkpoints or None)
        save_checkpoint(trainer, checkpoints, keep_last=opts.keep_checkpoints or None)
    finally:
        bar.close()
        if log is not None:
            log.close()
        if writer is not None:
            writer.close()
    train_s = time.perf_counter() - start
    if not is_main:
        return {}
    return _finish(opts, out, setup, reward_fn, reward_module, method, trainer, train_s, echo)


def _build_run(opts: TrainOptions, accelerator, checkpoints: Path, echo):
    """Model, reward, method and Trainer (restored from the last checkpoint with --resume)."""
    from flowkern.app.build import build_method, build_reward, load_model
    from flowkern.train import TrainConfig, Trainer, load_checkpoint

    device = str(accelerator.device) if accelerator is not None else opts.device
    setup = load_model(
        opts.model,
        lora_rank=opts.lora_rank,
        lora_alpha=opts.lora_alpha,
        precision=opts.precision,
        device=device,
        resolution=opts.resolution,
        prompts=opts.prompt,
        guidance_scale=opts.guidance_scale,
        num_steps=opts.num_steps,
        seed=opts.seed,
    )
    opts.method_settings().check(setup.num_steps)
    reward_fn, reward_module = build_reward(opts.reward, setup, opts.reward_source)
    method = build_method(
        opts.method, setup, reward_fn, opts.method_settings(), default_beta=_default_beta(setup), seed=opts.seed
    )
    config = TrainConfig(
        batch_size=opts.batch_size,
        grad_accum_steps=opts.grad_accum,
        num_updates=opts.steps,
        num_steps=setup.num_steps,
        time_grid=setup.time_grid,
        shift=setup.shift,
        lr=opts.lr,
        value_lr=opts.value_lr,
        grad_clip=opts.grad_clip,
        seed=opts.seed,
        residual_probe=min(8, opts.batch_size),
    )
    kwargs = {"accelerator": accelerator} if accelerator is not None else {}
    trainer = Trainer(
        setup.model,
        reward_fn,
        method,
        config,
        sample_shape=setup.sample_shape,
        cond_sampler=setup.cond_sampler,
        device=device,
        **kwargs,
    )
    if opts.resume:
        loaded = load_checkpoint(trainer, checkpoints)
        echo(f"resumed from {loaded} (update {trainer.step})")
    return setup, reward_fn, reward_module, method, trainer


def _finish(opts: TrainOptions, out: Path, setup, reward_fn, reward_module, method, trainer, train_s, echo) -> dict:
    """Save the LoRA and value net, evaluate on fixed seeds against the base, plot (main process)."""
    from flowkern.app.evaluate import evaluate_samples, generate

    setup.model.save_lora(out / "lora")
    value_params = getattr(method, "value_net", None)
    if isinstance(value_params, torch.nn.Module):
        from safetensors.torch import save_file

        save_file(
            {k: v.detach().contiguous().cpu() for k, v in value_params.state_dict().items()},
            str(out / "value_net.safetensors"),
        )
    n = opts.eval_samples
    tuned = generate(setup, n, seed=10_000 + opts.seed)
    base = generate(setup, n, seed=10_000 + opts.seed, base=True)
    result = {
        "model": setup.source,
        "method": opts.method,
        "updates": trainer.step,
        "train_seconds_this_session": round(train_s, 2),
        "skipped_updates": len(trainer.skipped),
        "tuned": evaluate_samples(setup, reward_fn, tuned, base, reward_module),
        "base": evaluate_samples(setup, reward_fn, base, None, reward_module),
    }
    (out / "eval.json").write_text(json.dumps(result, indent=2))
    from flowkern.app.report import plot_run

    plot_run(out)
    echo(
        f"{opts.method}: reward {result['base']['reward_mean']:.4g} -> {result['tuned']['reward_mean']:.4g} "
        f"(eval, {n} fixed samples); wrote {out}"
    )
    return result


def _default_beta(setup) -> float:
    """beta when neither --beta nor --lam is given: the toy's 2 (lam = 0.5), the demo's 600 for the tiny model,
    the paper's Aesthetic value 5e4 for real models (math.md section 3)."""
    return {"toy": 2.0, "tiny": 600.0}.get(setup.kind, 5e4)


def _check_same_run(previous: dict, opts: TrainOptions) -> None:
    """--resume must continue the same run: the settings that shape the state must match."""
    keys = (
        "model",
        "method",
        "reward",
        "lora_rank",
        "batch_size",
        "grad_accum",
        "num_steps",
        "beta",
        "lam",
        "K",
        "p",
        "eta",
        "precision",
        "seed",
    )
    now = opts.to_dict()
    changed = [k for k in keys if k in previous and previous[k] != now[k]]
    if changed:
        diff = ", ".join(f"{k}: {previous[k]!r} -> {now[k]!r}" for k in changed)
        raise ValueError(f"--resume: the checkpoint was trained with other settings ({diff})")


def _clear_run(out: Path) -> None:
    import shutil

    for name in RUN_FILES + ("value_net.safetensors", "reward.png", "loss.png", "tensorboard"):
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _tensorboard(out: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(out / "tensorboard"))

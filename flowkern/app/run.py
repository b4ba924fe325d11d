"""``flowkern train``: one training run with a log, progress bars, checkpoints, exact resume and accelerate.

Run directory (``--out``)::

    .flowkern-lock               held while a process works on the run: one writer at a time (train, --resume,
                                 demo are refused with the holder's pid and command; released when it exits)
    run_config.json              the resolved settings (what --config files and flags produced)
    log.jsonl                    one JSON object per update (Trainer metrics + step, method)
    checkpoints/step-XXXXXXXX/   flowkern.train.save_checkpoint (atomic; --resume continues bit-exactly)
    lora/                        the final LoRA (diffusers format; stock pipelines load it) or toy residual
    value_net.safetensors        VGG-Flow's value network (never in the LoRA file)
    eval.json                    reward, diversity, prior preservation on fixed seeds and prompts
    reward.png, loss.png         plots from the log (``flowkern plot RUN_DIR`` redraws them)
    tensorboard/                 with --tensorboard

Resume: ``flowkern train --out RUN --resume [--steps N]`` continues from the newest checkpoint with the options
recorded in it (flags given with --resume must equal them: ``--steps`` extends the run, ``--allow-change NAME``
changes lr, value_lr, grad_clip or device on purpose); the Trainer then compares its own settings (method kind and
hyperparameters, LoRA, precision, resolution, optimizer) with the checkpoint's. A damaged newest checkpoint is an
error naming the file; ``--skip-damaged-checkpoint`` falls back to the previous one.

Under ``accelerate launch`` (``WORLD_SIZE`` > 1) an ``accelerate.Accelerator`` is created and passed to the
Trainer (data parallel: per-process batch, gradients averaged); only the main process writes files.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
import types
import typing
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from flowkern.methods.registry import MethodSettings
from flowkern.models.lora import DEFAULT_RANK
from flowkern.train.config import TrainConfig

__all__ = ["JsonlLog", "TrainOptions", "ensure_output_dir", "progress_bar", "run_directory", "saved_options",
           "train_run"]  # fmt: skip

RUN_FILES = ("log.jsonl", "run_config.json", "checkpoints", "lora", "eval.json")
TRAINING_FILES = ("run_config.json", "checkpoints", "lora", "eval.json")  # a training run (the demo refuses it)
# options that do not change the trajectory of training (free to differ on --resume; steps extends the run)
BOOKKEEPING = ("out", "resume", "overwrite", "progress", "tensorboard", "eval_samples", "checkpoint_every",
               "keep_checkpoints", "allow_change", "skip_damaged_checkpoint", "steps", "prompt_cache")  # fmt: skip
# --allow-change NAME: options a resumed run may change on purpose -> the Trainer.settings keys they move
CHANGEABLE = {"lr": ("config.lr",), "value_lr": ("config.value_lr",), "grad_clip": ("config.grad_clip",),
              "device": ("device",)}  # fmt: skip
MAX_INT = 2**31 - 1  # counts and sizes (steps, batch, rank, ...): beyond this a typo, not a setting


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


@contextlib.contextmanager
def run_directory(path: str | os.PathLike, *, refuse: Sequence[str] = (), hint: str = "") -> Iterator[bool]:
    """Work in run directory ``path`` for the ``with`` block: created if needed (and removed again if the block
    fails while it holds nothing), checked writable, locked (:func:`flowkern.train.lock.hold`: a second writer is
    refused, naming the process that holds it), and refused if it holds any of ``refuse`` (``hint`` says what to do
    instead). Yields whether the directory was created."""
    from flowkern.train import lock

    path = Path(path)
    created = ensure_output_dir(path, allow_existing=True)
    try:
        with lock.hold(path):
            present = [name for name in refuse if (path / name).exists()]
            if present:
                raise ValueError(f"output directory {path} already holds a run ({', '.join(present)}): {hint}")
            yield created
    except BaseException:
        if created and path.is_dir() and {p.name for p in path.iterdir()} <= {lock.LOCK_FILE}:
            (path / lock.LOCK_FILE).unlink(missing_ok=True)
            path.rmdir()  # a failed start leaves nothing behind
        raise


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` with ``text`` at once (temp file, fsync, rename): a kill leaves the old or the new file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
            write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
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
    reward: list[str] = field(default_factory=lambda: ["redness"])
    reward_source: dict[str, list[str]] = field(default_factory=dict)
    prompt: list[str] = field(default_factory=list)
    out: str = "runs/flowkern"
    beta: float | None = None
    lam: float | None = None
    K: int | None = None
    p: float = MethodSettings.p  # the method settings' defaults are the constructors' (methods/registry.py)
    eta: str = MethodSettings.eta
    alpha: float = MethodSettings.alpha
    subsample: float | None = MethodSettings.subsample
    consistency: str | None = None
    reward_hvp: str | None = None
    lora_rank: int = DEFAULT_RANK
    lora_alpha: float | None = None
    steps: int = TrainConfig.num_updates  # the Trainer's defaults where the CLI has no reason to differ
    batch_size: int = 8
    grad_accum: int = 1
    micro_batch: int | None = None
    memory_budget: str | None = None  # e.g. "24GB": flowkern plan picks the knobs that fit (issue 16)
    recompute: str = "block"  # none | block | sublayer: the backbone's recompute granularity (SD3/FLUX/SiT)
    checkpoint_reward: bool = True  # a reward tower recomputes each layer in backward
    offload_trajectory: bool = False  # the rollout's states in pinned CPU memory, fetched back per use
    num_steps: int | None = None
    guidance_scale: float | None = None
    lr: float = TrainConfig.lr
    value_lr: float | None = None
    grad_clip: float | None = TrainConfig.grad_clip
    resolution: int | None = None
    precision: str = "fp32"
    base_precision: str | None = None
    prompt_cache: str | None = None
    device: str = "cpu"
    seed: int = 0
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    eval_samples: int = 16
    resume: bool = False
    overwrite: bool = False
    tensorboard: bool = False
    progress: bool = True
    allow_change: list[str] = field(default_factory=list)
    skip_damaged_checkpoint: bool = False

    def __post_init__(self):
        from flowkern.app.build import reward_specs

        self.reward = reward_specs(self.reward)  # a string, a list, or a config file's {"name": weight}
        if isinstance(self.prompt, str):
            self.prompt = [self.prompt]
        if isinstance(self.reward_source, dict):
            self.reward_source = {k: [v] if isinstance(v, str) else v for k, v in self.reward_source.items()}

    def check(self) -> None:
        """Validate the types, numbers and choices that need no model (one clear ValueError each)."""
        from flowkern.app.build import METHODS
        from flowkern.train.config import MAX_SEED

        _check_types(self)
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; known: {', '.join(METHODS)}")
        for name in ("steps", "batch_size", "grad_accum", "lora_rank", "eval_samples"):
            _int(name, getattr(self, name), 1)
        for name in ("checkpoint_every", "keep_checkpoints"):
            _int(name, getattr(self, name), 0)
        _int("seed", self.seed, 0, MAX_SEED)
        if self.num_steps is not None:
            _int("num_steps", self.num_steps, 1, 10_000)
        unknown = [name for name in self.allow_change if name not in CHANGEABLE]
        if unknown:
            raise ValueError(f"--allow-change {unknown[0]}: a resumed run can change only {', '.join(CHANGEABLE)}")
        for name in ("lr", "value_lr", "grad_clip", "lora_alpha", "guidance_scale"):
            value = getattr(self, name)
            if value is not None and not (_is_number(value) and math.isfinite(value) and value > 0):
                raise ValueError(f"--{_flag(name)} must be a finite number > 0, got {value!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"--precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if self.base_precision not in (None, "bf16", "int8", "fp8"):
            raise ValueError(f"--base-precision must be bf16, int8 or fp8, got {self.base_precision!r}")
        if self.resolution is not None:
            _int("resolution", self.resolution, 1)
        from flowkern.models._adapter import check_recompute

        check_recompute(self.recompute)
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
        self.method_settings().check(self.num_steps or 10**9)  # before any model is loaded

    def method_settings(self) -> MethodSettings:
        return MethodSettings(
            beta=self.beta,
            lam=self.lam,
            K=self.K,
            p=self.p,
            eta=self.eta,
            alpha=self.alpha,
            subsample=self.subsample,
            consistency=self.consistency,
            reward_hvp=self.reward_hvp,
            micro_batch=self.micro_batch,
            offload_trajectory=self.offload_trajectory,
        )

    def to_dict(self) -> dict:
        return asdict(self)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _int(name: str, value: Any, minimum: int, maximum: int = MAX_INT) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise ValueError(f"--{_flag(name)} must be an int in [{minimum}, {maximum}], got {value!r}")


def _check_types(opts: Any) -> None:
    """Each value of a dataclass of options (e.g. from a --config file) must match its field's annotation (int,
    float, str, bool, None, list[str], dict[str, list[str]]); else a ValueError naming the setting and the value."""
    hints = typing.get_type_hints(type(opts))
    for f in fields(opts):
        value, hint = getattr(opts, f.name), hints[f.name]
        if not _matches(value, hint):
            raise ValueError(f"--{_flag(f.name)} must be {_describe(hint)}, got {value!r}")


def _matches(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if origin is list:
        return isinstance(value, list) and all(_matches(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items())
    return isinstance(value, origin or hint)  # other generics (tuple[...]): the container type


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    names = {type(None): "null", bool: "true or false", int: "an int", float: "a number", str: "a string"}
    if hint in names:
        return names[hint]
    if origin is list:
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is dict:
        return f"an object of {_describe(args[0]).removeprefix('a ')} -> {_describe(args[1])}"
    return getattr(hint, "__name__", str(hint))


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
    from flowkern.app.build import check_applicable, check_reward_names, resolve_model

    opts.check()
    kind, _ = resolve_model(opts.model)
    check_reward_names(opts.reward, kind)
    check_applicable(opts.to_dict(), TrainOptions().to_dict(), opts.method, kind)
    out = Path(opts.out)
    accelerator = make_accelerator(opts.device)
    is_main = accelerator is None or accelerator.is_main_process
    refuse = () if (opts.resume or opts.overwrite) else RUN_FILES
    hint = "pass --resume to continue it, --overwrite to replace it, or another --out"
    with run_directory(out, refuse=refuse, hint=hint) if is_main else contextlib.nullcontext(False):
        if accelerator is not None:
            accelerator.wait_for_everyone()
        return _train(opts, out, accelerator, echo)


def _train(opts: TrainOptions, out: Path, accelerator, echo) -> dict:
    is_main = accelerator is None or accelerator.is_main_process
    checkpoints = out / "checkpoints"
    if opts.resume:
        saved, path = saved_options(out, skip_damaged=opts.skip_damaged_checkpoint)
        _check_same_run(saved, opts, path)
    setup, reward_fn, reward_module, method, trainer = _build_run(opts, accelerator, checkpoints, echo)
    if is_main and opts.overwrite:
        _clear_run(out)  # only now that the new run has started: a bad --overwrite run keeps the old one
    if is_main:
        processes = 1 if accelerator is None else accelerator.num_processes
        write_atomic(out / "run_config.json", json.dumps({**opts.to_dict(), "num_processes": processes}, indent=2))
    log = JsonlLog(out / "log.jsonl", keep_below_step=trainer.step) if is_main else None
    writer = _tensorboard(out) if (opts.tensorboard and is_main) else None
    bar = progress_bar(opts.steps, opts.method, enabled=opts.progress and is_main, initial=trainer.step)
    start, first_step = time.perf_counter(), trainer.step
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
                _save(trainer, checkpoints, opts.keep_checkpoints)
        if trainer.step != first_step or not opts.resume:  # a resumed run with nothing to train keeps its checkpoint
            _save(trainer, checkpoints, opts.keep_checkpoints)
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


def _save(trainer, checkpoints: Path, keep: int) -> None:
    """A checkpoint; a full disk (or another write error) is one line saying what survived."""
    from flowkern.train import list_checkpoints, save_checkpoint

    try:
        save_checkpoint(trainer, checkpoints, keep_last=keep or None)
    except OSError as err:
        if err.errno is None:
            raise
        newest = list_checkpoints(checkpoints)
        if newest:
            then = f"{newest[-1]} is intact; free the space and continue with --resume"
        else:
            then = "no earlier checkpoint; free the space and start again"
        raise OSError(
            err.errno,
            f"cannot write checkpoint step-{trainer.step:08d} in {checkpoints}: {err.strerror or err} ({then})",
        ) from err


def saved_options(out: str | os.PathLike, *, skip_damaged: bool = False) -> tuple[dict, Path]:
    """(options, checkpoint): the options recorded in the newest checkpoint of run directory ``out``, what
    ``--resume`` continues (a run written before they were recorded: its run_config.json)."""
    from flowkern.train.checkpoint import DamagedCheckpoint, read_newest

    checkpoints = Path(out) / "checkpoints"
    if not checkpoints.is_dir():
        raise ValueError(f"--resume: no complete checkpoint in {checkpoints}")
    try:
        path, state = read_newest(checkpoints, skip_damaged=skip_damaged, tensors=False, set_aside=False)
    except DamagedCheckpoint as err:
        raise _damaged(err) from None
    except ValueError as err:
        raise ValueError(f"--resume: {err}") from None
    options = (state.get("run_info") or {}).get("options")
    if not isinstance(options, dict):
        previous = Path(out) / "run_config.json"
        options = json.loads(previous.read_text()) if previous.is_file() else {}
    known = {f.name for f in fields(TrainOptions)}
    fresh = ("out", "resume", "overwrite", "progress", "allow_change", "skip_damaged_checkpoint")
    return {k: v for k, v in options.items() if k in known and k not in fresh}, path


def _damaged(err) -> ValueError:
    """The CLI's words for a :class:`flowkern.train.DamagedCheckpoint`: the file, the problem, the way out."""
    fallback = (
        f"--skip-damaged-checkpoint resumes from {err.previous.name} on purpose"
        if err.previous is not None
        else "there is no older checkpoint to fall back to"
    )
    return ValueError(f"--resume: the newest checkpoint {err.path} is damaged: {err.problem}; {fallback}")


def _build_run(opts: TrainOptions, accelerator, checkpoints: Path, echo):
    """Model, reward, method and Trainer (restored from the last checkpoint with --resume)."""
    from flowkern.app.build import load_model, method_for_run, reward_for_run
    from flowkern.train import TrainConfig, Trainer, load_checkpoint
    from flowkern.train.checkpoint import DamagedCheckpoint

    device = str(accelerator.device) if accelerator is not None else opts.device
    if opts.memory_budget is not None and not opts.resume:
        _fit_budget(opts, echo, device)
    setup = load_model(
        opts.model,
        lora_rank=opts.lora_rank,
        lora_alpha=opts.lora_alpha,
        precision=opts.precision,
        base_precision=opts.base_precision,
        prompt_cache=opts.prompt_cache,
        device=device,
        resolution=opts.resolution,
        prompts=opts.prompt,
        guidance_scale=opts.guidance_scale,
        num_steps=opts.num_steps,
        seed=opts.seed,
        recompute=opts.recompute,
    )
    opts.method_settings().check(setup.num_steps)  # K against the model's N, before a reward model is loaded
    reward_fn, reward_module = reward_for_run(
        opts.reward, setup, opts.reward_source, checkpoint_reward=opts.checkpoint_reward
    )
    method = method_for_run(
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
        extra={"reward": list(opts.reward), "reward_source": dict(opts.reward_source)},  # what the trainer cannot see
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
        run_info={"options": opts.to_dict()},
        **kwargs,
    )
    if opts.resume:
        allow = ["config.num_updates"] + [key for name in opts.allow_change for key in CHANGEABLE[name]]
        try:
            loaded = load_checkpoint(
                trainer, checkpoints, allow_changes=allow, skip_damaged=opts.skip_damaged_checkpoint
            )
        except DamagedCheckpoint as err:
            raise _damaged(err) from None
        echo(f"resumed from {loaded} (update {trainer.step})")
    return setup, reward_fn, reward_module, method, trainer


def _fit_budget(opts: TrainOptions, echo, device: str = "cuda") -> None:
    """--memory-budget: the planner's choice among the knobs training has (the backbone's recompute granularity,
    trajectory offload, reward-tower checkpointing, batch with accumulation, K, then an int8 / fp8 frozen base where
    ``quantized_bases`` allows it on the run's device; the pipelines always checkpoint the VAE decode), planned with
    the run's --reward-hvp and --base-precision, applied to ``opts`` and printed in one line; nothing fits: one-line
    ValueError. The planner builds the aesthetic tower without weights; other rewards are planned as 'redness'."""
    from flowkern.app.plan import candidate_knobs, choose, knob_line, quantized_bases

    knobs = dict(
        method=opts.method, K=opts.K, consistency=opts.consistency, lora_rank=opts.lora_rank or DEFAULT_RANK,
        precision=opts.precision, batch=opts.batch_size, grad_accum=opts.grad_accum,
        micro_batch=opts.micro_batch or 1, resolution=opts.resolution, num_steps=opts.num_steps,
        recompute=opts.recompute, checkpoint_reward=opts.checkpoint_reward,
        offload_trajectory=opts.offload_trajectory, reward_hvp=opts.reward_hvp,
        base_precision=None if opts.base_precision == "bf16" else opts.base_precision,
    )  # fmt: skip
    from flowkern.app.build import parse_reward_spec

    if [parse_reward_spec(s)[0] for s in opts.reward] == ["aesthetic"]:
        knobs["reward"] = "aesthetic"
    bases = quantized_bases(opts.model, device)
    settings = [(what, k) for what, k in candidate_knobs(knobs, bases) if k.get("checkpoint_vae", True)]
    result = choose(opts.model, opts.memory_budget, candidates=settings, **knobs)
    chosen = result["prediction"]["knobs"]
    if chosen.get("base_precision") is not None:
        opts.base_precision = chosen["base_precision"]
    opts.batch_size, opts.grad_accum, opts.K = chosen["batch"], chosen["grad_accum"], chosen["K"]
    opts.recompute = chosen["recompute"] if chosen["checkpoint_backbone"] else "none"
    opts.checkpoint_reward, opts.offload_trajectory = chosen["checkpoint_reward"], chosen["offload_trajectory"]
    echo(f"--memory-budget {opts.memory_budget}: {result['choice']}: {knob_line(chosen)}")


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
    write_atomic(out / "eval.json", json.dumps(result, indent=2))
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


def _check_same_run(saved: dict, opts: TrainOptions, checkpoint: Path) -> None:
    """--resume continues the same run: every option that shapes training must equal the checkpoint's, unless
    ``--allow-change`` names it (``--steps`` and the bookkeeping options are free)."""
    now = opts.to_dict()
    changed = [k for k in now if k not in BOOKKEEPING and k in saved and saved[k] != now[k]]
    refused = [k for k in changed if k not in opts.allow_change]
    if refused:
        diff = ", ".join(f"{k}: {saved[k]!r} -> {now[k]!r}" for k in refused)
        raise ValueError(
            f"--resume: the checkpoint {checkpoint} was trained with other settings ({diff}); a resumed run keeps "
            f"them: leave these flags out (--allow-change NAME changes {', '.join(CHANGEABLE)} on purpose)"
        )


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

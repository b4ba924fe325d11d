"""One training update at real model size, with exact CPU peaks by phase (not collected by pytest or CI).

Builds SiT-XL/2 (diffusers ``DiTTransformer2DModel``) and the SD3-medium transformer from their configs with random
weights (no downloads), assembles the run the way ``flowkern train`` does (``flowkern.app.build``: prompt table,
LoRA rank 16, CFG, the reward on the decoded image, ``method_for_run`` with the CLI's defaults) and times one
``Trainer.train_step`` under the torch profiler. Peaks are exact: the running sum of the CPU allocator's events
(``flowkern.profiling``), above the level at the start of the update (the frozen weights, the LoRA and the prompt
table are allocated before). Each event is attributed to the innermost phase running when it happened:

    rollout        method.rollout (Euler sampling without grad; DAM also takes its terminal reward gradient there)
    reward         the reward's decode + score and its gradient (Trainer's logging reward, ``reward_and_grad``)
    adjoint        the lean adjoint sweep (DAM, AM: ``lean_adjoint``)
    loss_backward  the rest of ``method.loss`` plus ``loss.backward()`` (graphs of v_theta, value net, ...)
    probe          the Trainer's residual-velocity probe (no grad)
    optimizer      grad norms, clipping, AdamW
    other          everything else of the update (draws, bookkeeping)

A phase's peak is the highest level the running total reached while that phase was innermost; the update's peak
is the maximum over phases. :func:`measure` returns one record (a dict with ``phases``) with ``flowkern plan``'s
prediction (CPU mode, :func:`predicted_peaks`: the same run traced on fake tensors) beside each measured peak; the
update is measured with Python's cyclic collector off, as the planner traces (``flowkern.app.plan.no_cyclic_gc``).
The planner traces the reference torch ops: ``FLOWKERN_BACKEND=torch`` measures the same ops.

Usage (each row takes minutes and several GiB: always under the shared lock)::

    flock /tmp/flowkern-heavy.lock python benchmarks/real_size.py --rows sit-bf16-dam sit-bf16-vggflow \\
        --label after --out benchmarks/results/real_size/after.json
    python benchmarks/real_size.py --table benchmarks/results/real_size/*.json   # markdown table

bf16 GEMMs: this machine's CPU (AVX2, no AVX512-BF16) runs bf16 ``mm`` 10-100x slower than fp32, so
:class:`Bf16GemmInFp32` computes ``mm``/``addmm``/``bmm``/``baddbmm`` with bf16 operands in fp32 and rounds the
result to bf16 (what a bf16 GEMM with fp32 accumulation returns, up to rounding). The fp32 copies it makes are
folded away: every allocator event inside one emulated op counts as a single event of the op's net bytes (its bf16
output), so the peaks are those of a native bf16 kernel. ``--native-bf16`` turns the emulation off.

The script measures the ``flowkern`` of the repository it sits in, or the checkout given by ``--flowkern DIR``
(e.g. an export of main: ``--flowkern /tmp/main --label before``); settings a checkout lacks keep its defaults.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import json
import logging
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._python_dispatch

GIB = 2**30
PHASES = ("rollout", "reward", "adjoint", "loss_backward", "probe", "optimizer", "other")

# SiT-XL/2 (Ma et al. 2024; the DiT-XL/2 architecture, learn_sigma) as diffusers' DiTTransformer2DModel.
SIT_XL_2 = dict(
    num_attention_heads=16,
    attention_head_dim=72,
    in_channels=4,
    out_channels=8,
    num_layers=28,
    sample_size=32,
    patch_size=2,
    num_embeds_ada_norm=1000,
    norm_type="ada_norm_zero",
)
SD3_TEXT_TOKENS = 77 + 256  # CLIP-L/G (77) + T5 (256) tokens, as StableDiffusion3Pipeline.encode_prompt returns
# stabilityai/stable-diffusion-3-medium vae/config.json (the "real-config VAE")
SD3_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=16,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=1.5305,
    shift_factor=0.0609,
    use_quant_conv=False,
    use_post_quant_conv=False,
)


@dataclass
class Spec:
    """One measured update."""

    model: str  # 'sit' | 'sd3'
    precision: str  # 'bf16' | 'fp32' (frozen weights; LoRA fp32)
    method: str  # 'dam' | 'vggflow' (fd) | 'am' | ...
    batch: int  # trajectories B
    num_steps: int  # N
    K: int | None = None  # DAM's trained steps
    resolution: int = 256
    vae: str = "tiny"  # 'tiny' (AutoencoderTiny, TAESD-size) | 'kl' (the SD3 AutoencoderKL config)
    lora_rank: int = 16
    layers: int | None = None  # transformer blocks (None: the config's; fewer for smoke runs and per-layer slopes)
    settings: dict = field(default_factory=dict)  # extra MethodSettings fields (when this flowkern has them)

    @property
    def name(self) -> str:
        extra = "" if self.resolution == 256 and self.vae == "tiny" else f"-{self.resolution}px-{self.vae}vae"
        extra += "" if self.layers is None else f"-{self.layers}layers"
        return f"{self.model}-{self.precision}-{self.method}{extra}"


ROWS = {
    s.name: s
    for s in (
        Spec("sit", "fp32", "dam", 2, 10, 3),
        Spec("sit", "fp32", "vggflow", 2, 10),
        Spec("sit", "bf16", "dam", 2, 10, 3),
        Spec("sit", "bf16", "vggflow", 2, 10),
        Spec("sd3", "bf16", "dam", 1, 6, 3),
        Spec("sd3", "bf16", "vggflow", 1, 6),
        Spec("sd3", "bf16", "vggflow", 1, 6, vae="kl"),  # real-config VAE, for the 1024 px estimate
        Spec("sd3", "bf16", "vggflow", 1, 6, resolution=512, vae="kl"),
        Spec("sd3", "bf16", "dam", 8, 6, 3, vae="kl"),  # the CLI's batch of 8 (run at --resolution 1024 --layers)
    )
}


# ---------------------------------------------------------------- models from config, random weights
def _random_parameters(module: torch.nn.Module, dtype: torch.dtype, seed: int) -> None:
    """Materialise meta parameters in ``dtype``: matrices N(0, 0.02^2), norm scales 1, everything else 0."""
    g = torch.Generator().manual_seed(seed)
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is None or not p.is_meta:
                continue
            value = torch.empty(p.shape, dtype=dtype)
            if p.dim() >= 2:
                value.copy_(torch.randn(p.shape, generator=g).mul_(0.02))  # chunk-free: fine at these sizes
            elif "norm" in type(sub).__name__.lower() and name == "weight":
                value.fill_(1.0)
            else:
                value.zero_()
            sub._parameters[name] = torch.nn.Parameter(value, requires_grad=False)


def build_transformer(kind: str, dtype: torch.dtype, seed: int = 0, layers: int | None = None) -> torch.nn.Module:
    """The transformer from its config, parameters random in ``dtype`` (built on meta, buffers real)."""
    import diffusers
    from accelerate import init_empty_weights

    from tests.models_tiny import SD3_MEDIUM  # stabilityai/stable-diffusion-3-medium transformer/config.json

    cls, config = {
        "sit": (diffusers.DiTTransformer2DModel, SIT_XL_2),
        "sd3": (diffusers.SD3Transformer2DModel, SD3_MEDIUM),
    }[kind]
    with init_empty_weights(include_buffers=False):
        model = cls(**{**config, **({} if layers is None else {"num_layers": layers})})
    for sub in model.modules():  # buffers (positional embeddings) in the weights' dtype, as .to(dtype) would
        for name, b in list(sub._buffers.items()):
            if b is not None and b.is_floating_point():
                sub._buffers[name] = b.to(dtype)
    _random_parameters(model, dtype, seed)
    if any(p.dtype != dtype for p in model.parameters()):  # under the planner's FakeTensorMode: fake, not meta
        model = model.to(dtype)
    return model.eval().requires_grad_(False)


def build_vae(kind: str, latent_channels: int, seed: int = 0) -> torch.nn.Module:
    """'tiny': an AutoencoderTiny (TAESD's config) for these latents; 'kl': the SD3 AutoencoderKL config. fp32."""
    import diffusers

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "tiny":
            vae = diffusers.AutoencoderTiny(latent_channels=latent_channels, scaling_factor=1.0)
        else:
            vae = diffusers.AutoencoderKL(**{**SD3_VAE, "latent_channels": latent_channels})
    return vae.eval().requires_grad_(False)


def build_run(spec: Spec, seed: int = 0):
    """(trainer, info) for ``spec``, assembled as ``flowkern.app.build`` does for a pipeline directory."""
    from flowkern.app import build
    from flowkern.models.vae import LatentDecoder
    from flowkern.train import TrainConfig, Trainer

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[spec.precision]
    transformer = build_transformer(spec.model, dtype, seed, spec.layers)
    g = torch.Generator().manual_seed(seed + 1)
    if spec.model == "sit":
        from flowkern.models.sit import SiTConditioning as Cond
        from flowkern.models.sit import SiTFlowModel as Flow

        w, grid, prompts = 4.0, "uniform", ["207", "360"]
        rows = {"labels": torch.tensor([int(p) for p in prompts])}
        shared: dict = {}
        channels = SIT_XL_2["in_channels"]
    else:
        from flowkern.models.sd3 import SD3Conditioning as Cond
        from flowkern.models.sd3 import SD3FlowModel as Flow

        w, grid, prompts = 5.0, "shifted", ["a photo of a red fox"]
        config = transformer.config
        text = lambda n: torch.randn(n, SD3_TEXT_TOKENS, config.joint_attention_dim, generator=g)
        pooled = lambda n: torch.randn(n, config.pooled_projection_dim, generator=g)
        rows = {"prompt_embeds": text(1), "pooled_prompt_embeds": pooled(1)}
        shared = {"negative_prompt_embeds": text(1), "negative_pooled_prompt_embeds": pooled(1)}
        channels = config.in_channels
    flow = Flow(transformer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        flow.add_lora(spec.lora_rank)
    model = build.PromptBankFlow(flow, Cond, rows, shared, {"guidance_scale": w}, prompts=prompts)
    decoder = LatentDecoder(build_vae(spec.vae, channels, seed + 2))
    side = spec.resolution // 8  # both VAEs upsample 8x
    memory_defaults = getattr(build, "memory_defaults", None)  # this branch's defaults for real models
    if memory_defaults is not None:
        memory_defaults(flow, decoder)
    setup = build.RunSetup(
        model, spec.model, f"random {spec.model} config", (channels, side, side), prompts, spec.num_steps, grid,
        guidance_scale=w, to_images=decoder, weights_dtype=dtype,
    )  # fmt: skip
    reward_fn, _ = build.reward_for_run(["redness"], setup)
    known = {f.name for f in dataclasses.fields(build.MethodSettings)}
    wanted = {"K": spec.K, "consistency": "fd" if spec.method == "vggflow" else None, **spec.settings}
    settings = build.MethodSettings(**{k: v for k, v in wanted.items() if k in known and v is not None})
    method = build.method_for_run(spec.method, setup, reward_fn, settings, default_beta=5e4, seed=seed)
    config = TrainConfig(
        batch_size=spec.batch, num_updates=1, num_steps=spec.num_steps, time_grid=grid, seed=seed,
        residual_probe=min(8, spec.batch),
    )  # fmt: skip
    trainer = Trainer(
        model, reward_fn, method, config, sample_shape=setup.sample_shape, cond_sampler=setup.cond_sampler
    )
    nbytes = lambda params: sum(p.numel() * p.element_size() for p in params)
    count = lambda m, trainable: sum(p.numel() for p in m.parameters() if p.requires_grad == trainable)
    info = {
        "transformer_parameters": count(transformer, False),
        "lora_parameters": count(transformer, True),
        "vae_parameters": sum(p.numel() for p in decoder.parameters()),
        "frozen_weight_bytes": nbytes(p for p in transformer.parameters() if not p.requires_grad)
        + nbytes(decoder.parameters()),
        "sample_shape": list(setup.sample_shape),
        "guidance_scale": w,
        "method_settings": {k: getattr(settings, k) for k in sorted(known)},
        "method_attributes": {
            k: getattr(method, k)
            for k in ("micro_batch", "consistency", "subsample_fraction", "K", "beta")
            if isinstance(getattr(method, k, None), int | float | str)
        },
        "transformer_checkpointing": bool(getattr(transformer, "gradient_checkpointing", False)),
        "vae_checkpointing": bool(getattr(decoder, "gradient_checkpointing", False))
        or any(getattr(m, "gradient_checkpointing", False) for m in decoder.vae.modules()),
    }
    return trainer, info


# ---------------------------------------------------------------- bf16 GEMMs in fp32 (see the module docstring)
EMULATED = "bf16_gemm_in_fp32"


class Bf16GemmInFp32(torch.utils._python_dispatch.TorchDispatchMode):
    """bf16 mm/addmm/bmm/baddbmm computed in fp32, result rounded to bf16; one record_function range per op."""

    def __init__(self):
        super().__init__()
        aten = torch.ops.aten
        self.ops = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        bf16 = lambda a: isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16
        if func not in self.ops or not any(bf16(a) for a in args):
            return func(*args, **kwargs)
        with torch.profiler.record_function(EMULATED):  # every temporary is freed inside the range
            up = [a.float() if bf16(a) else a for a in args]
            out = func(*up, **kwargs)
            del up
            out, wide = out.to(torch.bfloat16), out
            del wide
        return out


def _fold_emulated(memory: list[tuple[int, int]], ranges: list[tuple[int, int, str]]) -> list[tuple[int, int]]:
    """Allocator events inside each emulated op's range -> one event of their sum at the range's end."""
    spans = sorted((lo, hi) for lo, hi, name in ranges if name == EMULATED)
    if not spans:
        return memory
    out, folded = [], {}
    j = 0
    for ts, nbytes in memory:
        while j < len(spans) and spans[j][1] < ts:
            j += 1
        if j < len(spans) and spans[j][0] <= ts <= spans[j][1]:
            folded[spans[j]] = folded.get(spans[j], 0) + nbytes
        else:
            out.append((ts, nbytes))
    out += [(hi, nbytes) for (_, hi), nbytes in folded.items()]
    return sorted(out)


# ---------------------------------------------------------------- phases
@contextlib.contextmanager
def _patched(obj: Any, name: str, phase: str) -> Iterator[None]:
    """``obj.name`` (a module function or an instance's method) runs inside ``record_function(phase)``."""
    original = getattr(obj, name)
    own = name in vars(obj)  # a module attribute or an instance attribute (not a bound method)

    def wrapped(*args, **kwargs):
        with torch.profiler.record_function(phase):
            return original(*args, **kwargs)

    setattr(obj, name, wrapped)
    try:
        yield
    finally:
        if own:
            setattr(obj, name, original)
        else:
            delattr(obj, name)


@contextlib.contextmanager
def phase_markers(trainer: Any) -> Iterator[None]:
    """record_function ranges around the pieces of one update (see the module docstring)."""
    import flowkern.methods._common as common

    targets = [
        (trainer.method, "rollout", "rollout"),
        (common, "evaluate_reward", "reward"),
        (common, "reward_and_grad", "reward"),
        (trainer.method, "loss", "loss_backward"),
        (trainer, "backward", "loss_backward"),
        (trainer, "residual_velocity_sq", "probe"),
        (trainer, "optimizer_step", "optimizer"),
    ]
    for module_name in ("flowkern.methods.adjoint_matching", "flowkern.methods.vggflow"):
        module = sys.modules.get(module_name)
        if module is not None and hasattr(module, "lean_adjoint"):
            targets.append((module, "lean_adjoint", "adjoint"))
    with contextlib.ExitStack() as stack:
        for obj, name, phase in targets:
            if hasattr(obj, name):
                stack.enter_context(_patched(obj, name, phase))
        yield


def phase_profile(fn: Callable[[], object]) -> tuple[dict[str, dict[str, float]], int, float]:
    """Run ``fn`` under the profiler; ({phase: {'peak_bytes', 'seconds'}}, peak bytes, seconds).

    Seconds of a phase are exclusive (nested phases subtracted); 'other' is the rest of the wall time.
    """
    from torch.profiler import ProfilerActivity, profile

    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    wall = time.perf_counter() - start
    raw = prof.profiler.kineto_results.events()
    annotations = [
        (e.start_ns(), e.start_ns() + e.duration_ns(), e.name()) for e in raw if e.name() in PHASES + (EMULATED,)
    ]
    memory = sorted((e.start_ns(), e.nbytes()) for e in raw if e.name() == "[memory]" and e.device_type().name == "CPU")
    memory = _fold_emulated(memory, annotations)
    ranges = sorted(r for r in annotations if r[2] != EMULATED)

    # sweep: ranges of one thread nest, so a stack of open ranges gives the innermost phase of each event
    # at one time stamp: ends (inner first), then starts (outer first), then allocations
    timeline = [(hi, 0, -lo, name) for lo, hi, name in ranges] + [(lo, 1, -hi, name) for lo, hi, name in ranges]
    timeline = sorted(timeline + [(ts, 2, 0, nbytes) for ts, nbytes in memory])
    out = {p: {"peak_bytes": 0, "seconds": 0.0} for p in PHASES}
    stack: list[tuple[str, int]] = []
    running = peak = 0
    for ts, kind, _, item in timeline:
        if kind == 1:
            stack.append((item, ts))
        elif kind == 0:
            name, _ = stack.pop()
            assert name == item, (name, item)
        else:
            running += item
            phase = stack[-1][0] if stack else "other"
            out[phase]["peak_bytes"] = max(out[phase]["peak_bytes"], running)
            peak = max(peak, running)
    for lo, hi, name in ranges:  # exclusive seconds: minus the ranges directly nested inside
        inner = [(a, b) for a, b, _ in ranges if lo <= a and b <= hi and (a, b) != (lo, hi)]
        direct = [(a, b) for a, b in inner if not any(c <= a and b <= d and (c, d) != (a, b) for c, d in inner)]
        out[name]["seconds"] += (hi - lo - sum(b - a for a, b in direct)) / 1e9
    out["other"]["seconds"] = max(0.0, wall - sum(v["seconds"] for k, v in out.items() if k != "other"))
    return out, peak, wall


# ---------------------------------------------------------------- measurement
@contextlib.contextmanager
def no_cyclic_gc() -> Iterator[None]:
    """``flowkern.app.plan.no_cyclic_gc`` where the measured checkout has it (else the collector as it is)."""
    try:
        from flowkern.app.plan import no_cyclic_gc as off
    except ImportError:
        off = contextlib.nullcontext
    with off():
        yield


def predicted_peaks(spec: Spec, info: dict, seed: int = 0) -> dict[str, int] | None:
    """``flowkern plan``'s per-phase peak prediction (CPU mode, bytes above the frozen weights) for ``spec``: the
    same run built by :func:`build_run` under fake tensors and traced by ``flowkern.app.plan.trace_update``.
    None when the measured checkout has no planner. The table prints it beside each measured peak."""
    try:
        from torch._subclasses.fake_tensor import FakeTensorMode

        from flowkern.app.plan import trace_update
        from flowkern.app.plan_models import fake_building
    except ImportError:
        return None
    from flowkern.ops.backend import use_backend

    start = time.perf_counter()
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with fake_building(fake) as known:
        trainer, _ = build_run(spec, seed)
    with fake, use_backend("torch"):  # as flowkern plan: the reference ops (fused kernels have no fake kernels)
        update = trace_update(trainer, "cpu", known)
    return {**update["phases"], "peak": update["peak_bytes"], "seconds": round(time.perf_counter() - start, 1)}


def measure(
    spec: Spec, label: str, seed: int = 0, native_bf16: bool = False, planned: Callable[[], dict | None] = lambda: None
) -> dict:
    """Build the run, warm nothing, time and profile exactly one update; one JSON-able record. ``planned()``, asked
    after the update: the planner's prediction traced by another process (``--plan-only``); None: traced here."""
    import flowkern

    t0 = time.perf_counter()
    trainer, info = build_run(spec, seed)
    build_s = time.perf_counter() - t0
    metrics: dict = {}
    update = lambda: metrics.update(trainer.train_step())  # noqa: E731

    emulate = spec.precision == "bf16" and not native_bf16
    # Python's cyclic collector off inside the update, as the planner traces (flowkern.app.plan.no_cyclic_gc)
    with no_cyclic_gc(), phase_markers(trainer), Bf16GemmInFp32() if emulate else contextlib.nullcontext():
        phases, peak, wall = phase_profile(update)
    skipped = [list(s) for s in trainer.skipped]
    trainer = update = None  # free the real run before the planner builds its fake one
    gc.collect()
    predicted = planned() or predicted_peaks(spec, info, seed)
    return {
        "row": spec.name,
        "label": label,
        "spec": dataclasses.asdict(spec),
        "seconds": round(wall, 2),
        "peak_bytes": peak,
        "peak_gib": round(peak / GIB, 3),
        "phases": {k: {"peak_gib": round(v["peak_bytes"] / GIB, 3), **v} for k, v in phases.items()},
        "predicted": predicted,
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, int | float)},
        "skipped": skipped,
        "build_seconds": round(build_s, 1),
        "info": info,
        "env": {
            "flowkern": os.path.dirname(flowkern.__file__),
            "git": _git_rev(os.path.dirname(os.path.dirname(flowkern.__file__))),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "bf16_gemm_in_fp32": emulate,
            "cpu": platform.processor() or platform.machine(),
        },
    }


def _git_rev(path: str) -> str | None:
    try:
        return subprocess.check_output(["git", "-C", path, "rev-parse", "--short", "HEAD"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return None


# ---------------------------------------------------------------- table
def markdown(records: list[dict]) -> str:
    """The before/after table: one line per record, peaks (GiB) and seconds per phase."""
    head = "| code | model | precision | B | N | K | method | seconds | peak GiB | " + " | ".join(PHASES) + " |"
    lines = [head, "|" + "---|" * (9 + len(PHASES))]
    for r in records:
        s = r["spec"]
        model = {"sit": "SiT-XL/2", "sd3": "SD3-medium"}[s["model"]]
        extra = "" if s["resolution"] == 256 and s["vae"] == "tiny" else f" ({s['resolution']} px, {s['vae']} VAE)"
        extra += f" [{s['layers']} blocks]" if s.get("layers") else ""
        method = {"vggflow": "VGG-Flow fd", "dam": "DAM", "am": "AM"}.get(s["method"], s["method"]) + extra
        cells = []
        for p in PHASES:
            v = r["phases"][p]
            cell = f"{v['peak_gib']:.2f} / {v['seconds']:.0f}s" if v["seconds"] or v["peak_bytes"] else "–"
            if r.get("predicted") and p in r["predicted"]:
                cell += f" (plan {r['predicted'][p] / GIB:.2f})"
            cells.append(cell)
        k = s["K"] if s["K"] is not None else "–"
        lines.append(
            f"| {r['label']} | {model} | {s['precision']} | {s['batch']} | {s['num_steps']} | {k} | {method} | "
            f"{r['seconds']:.0f} | **{r['peak_gib']:.2f}**{_plan_cell(r)} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def _plan_cell(record: dict) -> str:
    """' (plan X.XX, +e%)' when the record carries the planner's prediction."""
    predicted = (record.get("predicted") or {}).get("peak")
    if not predicted:
        return ""
    return f" (plan {predicted / GIB:.2f}, {100 * (predicted - record['peak_bytes']) / record['peak_bytes']:+.1f}%)"


def extrapolate_layers(records: list[dict], layers: int) -> dict:
    """Per-phase peaks of a row at ``layers`` transformer blocks, from runs of the same row at two smaller block
    counts: peak = a + b L per phase (b: the bytes a block adds: its saved block input under per-block checkpointing,
    or its activations without; a: everything else, e.g. the VAE decode, which no block changes). Returns
    {'phases': {phase: bytes}, 'peak_bytes', 'per_block_bytes': {phase: b}, 'from_layers': [L1, L2]}."""
    if len(records) != 2 or len({r["spec"]["layers"] for r in records}) != 2:
        raise ValueError("extrapolate_layers needs the same row at two different block counts")
    (r1, r2) = sorted(records, key=lambda r: r["spec"]["layers"])
    l1, l2 = r1["spec"]["layers"], r2["spec"]["layers"]
    phases, slopes = {}, {}
    for p in PHASES:
        y1, y2 = r1["phases"][p]["peak_bytes"], r2["phases"][p]["peak_bytes"]
        slopes[p] = (y2 - y1) / (l2 - l1)
        phases[p] = int(y2 + slopes[p] * (layers - l2))
    return {"phases": phases, "peak_bytes": max(phases.values()), "per_block_bytes": slopes, "from_layers": [l1, l2]}


def _planned(path: str | None, spec: Spec) -> dict | None:
    """The prediction for ``spec`` in a file of ``--plan-only`` records (read when the update is done), or None."""
    if not path or not os.path.isfile(path):
        return None
    wanted = dataclasses.asdict(spec)
    return next((r["predicted"] for r in json.load(open(path)) if r["spec"] == wanted), None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="*", default=[], help=f"rows to measure: {', '.join(ROWS)}")
    parser.add_argument("--label", default="after", help="code label in the table (e.g. before, after)")
    parser.add_argument("--out", help="append the records to this JSON file (a list)")
    parser.add_argument("--set", action="append", default=[], help="extra MethodSettings field, KEY=VALUE (JSON)")
    parser.add_argument("--layers", type=int, default=None, help="transformer blocks (smoke runs, per-layer slopes)")
    parser.add_argument("--resolution", type=int, default=None, help="override the rows' image side in pixels")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--flowkern", help="checkout whose flowkern to measure [this repository]")
    parser.add_argument("--native-bf16", action="store_true", help="no fp32 emulation of bf16 GEMMs")
    parser.add_argument(
        "--plan-only", action="store_true", help="only the planner's prediction of each row (no update), to --out"
    )
    parser.add_argument(
        "--plan-from", help="JSON of --plan-only records: a row's prediction from there instead of tracing it again"
    )
    parser.add_argument("--table", nargs="*", help="print the markdown table of these JSON files and exit")
    parser.add_argument(
        "--extrapolate", type=int, metavar="L", help="with --table: per-phase peaks at L blocks from two block counts"
    )
    args = parser.parse_args(argv)
    sys.path.insert(0, os.path.abspath(args.flowkern or os.path.join(os.path.dirname(__file__), os.pardir)))
    if args.table is not None:
        records = [r for path in args.table for r in json.load(open(path))]
        if args.extrapolate:
            by_row: dict[str, list[dict]] = {}
            for r in records:
                if r["spec"].get("layers"):
                    by_row.setdefault(r["row"].rsplit("-", 1)[0], []).append(r)
            for row, group in by_row.items():
                est = extrapolate_layers(group[-2:], args.extrapolate)
                cells = " | ".join(f"{p} {v / GIB:.2f}" for p, v in est["phases"].items())
                print(
                    f"{row} at {args.extrapolate} blocks (from {est['from_layers']}): "
                    f"{est['peak_bytes'] / GIB:.2f} GiB; "
                    f"{cells}; per block: "
                    + ", ".join(f"{p} {v / 2**20:.1f} MiB" for p, v in est["per_block_bytes"].items())
                )
            return 0
        print(markdown(records))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    extra = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    for row in args.rows:
        spec = dataclasses.replace(ROWS[row], settings={**ROWS[row].settings, **extra}, layers=args.layers)
        if args.resolution:
            spec = dataclasses.replace(spec, resolution=args.resolution)
        if args.plan_only:
            record = {"row": spec.name, "spec": dataclasses.asdict(spec), "predicted": predicted_peaks(spec, {})}
            print(f"{spec.name}: flowkern plan (CPU mode) predicts {record['predicted']}", flush=True)
        else:
            planned = functools.partial(_planned, args.plan_from, spec)
            record = measure(spec, args.label, native_bf16=args.native_bf16, planned=planned)
            print(markdown([record]).splitlines()[-1], flush=True)
        if record["predicted"] and not args.plan_only:
            predicted, measured = record["predicted"]["peak"], record["peak_bytes"]
            print(f"{spec.name}: flowkern plan (CPU mode) predicts {predicted} B, measured {measured} B "
                  f"({100 * (predicted - measured) / measured:+.2f}%), planned in {record['predicted']['seconds']} s",
                  flush=True)  # fmt: skip
        if args.out:
            records = json.load(open(args.out)) if os.path.isfile(args.out) else []
            records.append(record)
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(records, f, indent=1)
        del record
        gc.collect()
    return 0


if __name__ == "__main__":
    sys.exit(main())

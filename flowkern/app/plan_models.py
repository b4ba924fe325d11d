"""What the planner builds: a model description (transformer + VAE configs, the prompt table's shapes) and the
run assembled from it the way ``flowkern train`` assembles a pipeline (``flowkern.app.build``).

The same :func:`build_run` serves the planner (called under ``FakeTensorMode``: no weights) and the checks
against exact CPU peaks (called for real, with random weights), so both run the same update code.
Named real configs ship as JSON in ``flowkern/assets/configs/<name>.json`` (each value's source is in the file).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.weak import WeakIdKeyDictionary

from flowkern.models.lora import DEFAULT_RANK

CONFIG_DIR = Path(__file__).resolve().parents[1] / "assets" / "configs"
KINDS = {  # kind -> (adapter module, FlowModel, conditioning, transformer class)
    "sd3": ("flowkern.models.sd3", "SD3FlowModel", "SD3Conditioning", "SD3Transformer2DModel"),
    "flux": ("flowkern.models.flux", "FluxFlowModel", "FluxConditioning", "FluxTransformer2DModel"),
    "flux2": ("flowkern.models.flux2", "Flux2FlowModel", "Flux2Conditioning", "Flux2Transformer2DModel"),
    "sit": ("flowkern.models.sit", "SiTFlowModel", "SiTConditioning", "DiTTransformer2DModel"),
}
METHOD_NAMES = ("vggflow", "dam", "am", "draft", "refl")
# the reward towers the planner builds without weights (a transformers CLIPConfig); the LAION aesthetic reward runs
# on CLIP ViT-L/14 (openai/clip-vit-large-patch14's config.json). The other tower rewards need files to build:
# CLIPScore / PickScore / HPS a tokenizer (their text features), ImageReward its BLIP + BERT tokenizer.
REWARD_TOWERS: dict[str, dict] = {
    "aesthetic": {
        "projection_dim": 768,
        "text_config": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                        "num_hidden_layers": 12, "max_position_embeddings": 77, "vocab_size": 49408,
                        "projection_dim": 768, "hidden_act": "quick_gelu"},
        "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                          "num_hidden_layers": 24, "image_size": 224, "patch_size": 14, "projection_dim": 768,
                          "hidden_act": "quick_gelu"},
    },
}  # fmt: skip


@dataclass
class ModelSpec:
    """A backbone as the planner needs it: configs, prompt-table shapes, sampling defaults."""

    name: str
    kind: str  # sd3 | flux | flux2 | sit
    transformer: dict
    vae: dict
    vae_class: str = "AutoencoderKL"
    text_tokens: int = 0  # prompt_embeds length (SD3: CLIP 77 + T5 256; FLUX.1: T5 512; FLUX.2: 512)
    pooled_dim: int | None = None  # pooled_prompt_embeds width (SD3, FLUX.1)
    guidance_scale: float | None = None  # true CFG w (None: no CFG)
    guidance: float | None = None  # embedded guidance (FLUX.1-dev, FLUX.2-dev)
    resolution: int = 1024
    num_steps: int = 20
    text_encoder_params: int = 0  # parameters of the text encoders (loaded once to encode, then freed)
    source: dict = field(default_factory=dict)

    @property
    def vae_factor(self) -> int:
        """Pixels per VAE latent cell."""
        if self.vae_class == "AutoencoderTiny":
            return 8
        return 2 ** (len(self.vae.get("block_out_channels", (0,) * 4)) - 1)

    @property
    def state_factor(self) -> int:
        """Pixels per cell of the sampler's state (FLUX.2's state is the 2x2-patchified latent)."""
        return self.vae_factor * (2 if self.kind == "flux2" else 1)

    @property
    def resolution_multiple(self) -> int:
        """The image side must be a multiple of this: VAE factor x the transformer's patch (FLUX: 2x2 packing)."""
        patch = int(self.transformer.get("patch_size", 1) or 1) * (2 if self.kind in ("flux", "flux2") else 1)
        return self.vae_factor * patch

    @property
    def latent_channels(self) -> int:
        c = int(self.transformer["in_channels"])
        return c // 4 if self.kind == "flux" else c


def named_models() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def load_named(name: str) -> ModelSpec:
    """A shipped real config by name (``sd3-medium``, ``flux1-dev``, ...)."""
    path = CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"model: unknown config {name!r}; known: {', '.join(named_models())} or a pipeline directory")
    data = json.loads(path.read_text())
    fields = {f.name for f in dataclasses.fields(ModelSpec)}
    return ModelSpec(**{k: v for k, v in data.items() if k in fields})


def from_pipeline_dir(path: str | Path) -> ModelSpec:
    """A local diffusers pipeline directory (model_index.json, transformer/config.json, vae/config.json)."""
    from flowkern.app.build import _read_json, _transformer_class

    root = Path(path)
    tcls = _transformer_class(root)
    kind = {v[3]: k for k, v in KINDS.items()}.get(tcls)
    if kind is None:
        raise ValueError(f"model: {root} has a {tcls}; the planner knows {', '.join(v[3] for v in KINDS.values())}")
    transformer = {k: v for k, v in _read_json(root / "transformer" / "config.json").items() if not k.startswith("_")}
    vae_raw = _read_json(root / "vae" / "config.json")
    vae = {k: v for k, v in vae_raw.items() if not k.startswith("_")}
    text_tokens, pooled = {"sd3": (333, transformer.get("pooled_projection_dim")), "flux": (512, 768)}.get(
        kind, (512 if kind == "flux2" else 0, None)
    )
    return ModelSpec(
        name=str(root),
        kind=kind,
        transformer=transformer,
        vae=vae,
        vae_class=vae_raw.get("_class_name", "AutoencoderKL"),
        text_tokens=text_tokens,
        pooled_dim=pooled,
        guidance_scale={"sd3": 5.0, "sit": 4.0}.get(kind),
        guidance=3.5 if kind == "flux" and transformer.get("guidance_embeds") else None,
        resolution=int(transformer.get("sample_size", 128)) * 8 if kind in ("sd3", "sit") else 1024,
        source={"directory": str(root)},
    )


def resolve(model: str | ModelSpec) -> ModelSpec:
    if isinstance(model, ModelSpec):
        return model
    if not isinstance(model, str) or not model:
        raise ValueError(f"model: expected a config name or a pipeline directory, got {model!r}")
    if Path(model).is_dir():
        return from_pipeline_dir(model)
    return load_named(model)


@dataclass
class Knobs:
    """What one update is run with (the CLI's options that change memory)."""

    method: str = "dam"
    K: int | None = None
    consistency: str | None = None  # VGG-Flow: fd | exact (None: exact for bf16, fd for fp32)
    lora_rank: int = DEFAULT_RANK  # flowkern train's
    precision: str = "bf16"
    batch: int = 1
    grad_accum: int = 1
    resolution: int | None = None
    num_steps: int | None = None
    micro_batch: int | None = 1
    checkpoint_backbone: bool = True
    checkpoint_vae: bool = True
    reward: str = "redness"
    base_precision: str | None = None  # issue 17: bf16 | int8 | fp8 frozen transformer linears (implies bf16)
    recompute: str = "block"  # none | block | sublayer (TransformerFlowModel.set_recompute; with checkpoint_backbone)
    checkpoint_reward: bool = True  # per-layer checkpointing of a reward tower (rewards.clip.set_layer_checkpointing)
    offload_trajectory: bool = False  # the rollout's stored states in (pinned) CPU memory (sampling.host_buffer)
    reward_hvp: str | None = None  # VGG-Flow exact: autograd | central (None: the kind's, build.default_reward_hvp)

    def check(self, spec: ModelSpec) -> None:
        if self.base_precision is not None:
            from flowkern.models.quantize import check_base_precision

            check_base_precision(self.base_precision)
            self.precision = "bf16"  # as flowkern train: a bf16-stored or quantized base computes in bf16
        if self.method not in METHOD_NAMES:
            raise ValueError(f"method: expected one of {', '.join(METHOD_NAMES)}, got {self.method!r}")
        if self.precision not in ("bf16", "fp32"):
            raise ValueError(f"precision: expected bf16 or fp32, got {self.precision!r}")
        res = self.resolution or spec.resolution
        m = spec.resolution_multiple
        if isinstance(res, bool) or not isinstance(res, int) or res < m or res % m:
            raise ValueError(f"resolution: must be a multiple of {m} (VAE x patch factor) for {spec.name}, got {res}")
        from flowkern.models._adapter import check_recompute

        check_recompute(self.recompute)
        if self.reward_hvp not in (None, "autograd", "central"):
            raise ValueError(f"reward_hvp: expected autograd or central, got {self.reward_hvp!r}")
        for name in ("checkpoint_reward", "offload_trajectory"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected True or False, got {getattr(self, name)!r}")
        for name in ("batch", "grad_accum", "lora_rank"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")


def _cast(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Floating parameters and buffers to ``dtype``, frozen (``Module.to`` cannot swap fake tensors)."""
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None:
                value = p.detach().to(dtype) if p.is_floating_point() else p.detach()
                sub._parameters[name] = torch.nn.Parameter(value, requires_grad=False)
        for name, b in list(sub._buffers.items()):
            if b is not None and b.is_floating_point():
                sub._buffers[name] = b.to(dtype)
    return module.eval()


def _apply_by_assignment(self: torch.nn.Module, fn, recurse: bool = True) -> torch.nn.Module:
    """``Module._apply`` that assigns converted parameters instead of swapping them (fake tensors cannot be
    swapped once torch's fake-mode bookkeeping holds a weakref to them); used only while building under fake mode."""
    if recurse:
        for child in self.children():
            child._apply(fn)
    for key, p in self._parameters.items():
        if p is not None:
            with torch.no_grad():
                self._parameters[key] = torch.nn.Parameter(fn(p), requires_grad=p.requires_grad)
    for key, b in self._buffers.items():
        if b is not None:
            self._buffers[key] = fn(b)
    return self


SHADOW_NUMEL = 64  # tensors up to this size also carry real values under the planner (time grids, labels)


def _to_cpu(value: Any) -> Any:
    return torch.device("cpu") if isinstance(value, torch.device) else value


class PlausibleScalars(TorchDispatchMode):
    """Answers data-dependent scalar reads (``aten._local_scalar_dense``: ``float(t)``, ``bool(t)``, ``.item()``)
    instead of fake mode's DataDependentOutputException; stacked over a FakeTensorMode.

    Small tensors carry real values: an op whose tensor inputs all have values and whose outputs have at most
    :data:`SHADOW_NUMEL` elements is also run on the values (on the CPU), so time grids, prompt indices, random
    permutations and their checks read exactly what the real update reads. A scalar read of a large tensor's
    reduction (``images.aminmax()``, a loss) has no value: numbers read as 1 and booleans as what a healthy update
    computes, values finite and in range (``isfinite`` True, ``isnan`` / ``isinf`` / ``lt`` / ``gt`` / ``le`` /
    ``ge`` False, ``eq`` True only of a tensor with itself, ``ne`` the opposite; ``logical_not`` / ``bitwise_not``
    flip; ``all`` / ``mul`` / ``and`` of all inputs, else any), so finite checks pass and range checks do not fire.
    """

    TRUE = {"isfinite"}
    FALSE = {"isnan", "isinf", "isneginf", "isposinf", "lt", "gt", "le", "ge"}
    FLIP = {"logical_not", "bitwise_not"}

    def __init__(self, known: PlausibleScalars | None = None):
        super().__init__()
        # fake tensor -> real CPU tensor (small tensors); fake bool tensor without a value -> its plausible truth
        self.values = known.values if known is not None else WeakIdKeyDictionary()
        self.truth = known.truth if known is not None else WeakIdKeyDictionary()
        self.scalar_reads = 0

    def scalar(self, t: torch.Tensor) -> bool | int | float:
        self.scalar_reads += 1
        value = t if not isinstance(t, torch._subclasses.fake_tensor.FakeTensor) else self.values.get(t)
        if value is not None:
            with _disable_current_modes():
                return value.item()
        if t.dtype == torch.bool:
            return self.truth.get(t, True)
        return 1.0 if t.dtype.is_floating_point or t.dtype.is_complex else 1

    def _truth_of(self, func, args) -> bool:
        name = func.__name__.split(".")[0].rstrip("_")
        if name in self.TRUE:
            return True
        if name in self.FALSE:
            return False
        if name in ("eq", "ne"):  # x == x (not NaN) True, x != x (NaN) False; two different tensors differ
            same = len(args) > 1 and args[0] is args[1]
            return same if name == "eq" else not same
        inputs = [self.truth.get(a, True) for a in args if isinstance(a, torch.Tensor) and a.dtype == torch.bool]
        value = all(inputs) if name in ("all", "logical_and", "bitwise_and", "mul") else any(inputs) or not inputs
        return not value if name in self.FLIP else value

    def _value_of(self, a: Any) -> Any:
        if not isinstance(a, torch.Tensor):
            return _to_cpu(a)
        if not isinstance(a, torch._subclasses.fake_tensor.FakeTensor):
            return a  # a real tensor (a constant): its own value
        value = self.values.get(a)
        if value is None:
            raise KeyError
        return value

    def note(self, func, args, kwargs, out) -> None:
        """Give ``func``'s small outputs their real values (or booleans a plausible truth)."""
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        forward_ad = torch.autograd.forward_ad._current_level >= 0  # dual tensors: values not followed
        if outs and not forward_ad and all(t.numel() <= SHADOW_NUMEL for t in outs):
            try:
                real_args, real_kwargs = tree_map(self._value_of, (args, kwargs))
                with _disable_current_modes(), torch.no_grad():
                    real_out = func(*real_args, **real_kwargs)
                reals = [t for t in tree_flatten(real_out)[0] if isinstance(t, torch.Tensor)]
                if len(reals) == len(outs):
                    for t, r in zip(outs, reals, strict=True):
                        self.values[t] = r
                    return
            except Exception:  # noqa: BLE001 - a value we cannot compute is a value we do not know
                pass
        for t in outs:
            self.values.pop(t, None)  # an in-place op on a tensor whose value we could not follow
            if t.dtype == torch.bool:
                self.truth[t] = self._truth_of(func, args)

    def data_dependent(self, func, args, kwargs) -> Any:
        """``nonzero`` (boolean indexing): a fake result of the shape its input's value, or its plausible truth,
        gives; None for every other op."""
        if func is torch.ops.aten.index.Tensor and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]
        ):  # x[mask]: the mask's nonzero columns as long indices
            indices = []
            for i in args[1]:
                if isinstance(i, torch.Tensor) and i.dtype == torch.bool:
                    nz = self.data_dependent(torch.ops.aten.nonzero.default, (i,), {})
                    indices += [nz.select(1, j) for j in range(i.dim())]
                else:
                    indices.append(i)
            return func(args[0], indices)
        if func is not torch.ops.aten.nonzero.default:
            return None
        mask = args[0]
        value = self.values.get(mask)
        with _disable_current_modes():
            if value is None:  # a plausible mask: all True (e.g. ``norms[isfinite(norms)]``) or all False
                value = torch.full(mask.shape, self.truth.get(mask, True), dtype=torch.bool)
            real = func(value)
        out = torch.empty(real.shape, dtype=real.dtype, device=mask.device)
        self.values[out] = real
        return out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            return self.scalar(args[0])
        out = self.data_dependent(func, args, kwargs)
        if out is not None:
            return out
        out = func(*args, **kwargs)
        self.note(func, args, kwargs, out)
        return out


@contextlib.contextmanager
def fake_building(fake_mode: Any) -> Iterator[PlausibleScalars | None]:
    """Build modules under ``fake_mode`` (None: a no-op); yields the :class:`PlausibleScalars` that knows the
    small tensors' values (pass it on to the trace)."""
    if fake_mode is None:
        yield None
        return
    original = torch.nn.Module._apply
    torch.nn.Module._apply = _apply_by_assignment
    try:
        with fake_mode, PlausibleScalars() as scalars:
            yield scalars
    finally:
        torch.nn.Module._apply = original


def build_run(spec: ModelSpec, knobs: Knobs, device: str = "cpu", seed: int = 0) -> tuple[Any, dict]:
    """(trainer, resident) for one update: transformer + LoRA, prompt table, VAE decoder, reward, method, Trainer,
    as ``flowkern train`` builds them (``memory_defaults``' checkpointing unless the knobs turn it off).

    Under ``FakeTensorMode`` nothing is allocated; ``resident`` names the modules held before the update."""
    import importlib

    import diffusers

    from flowkern.app import build
    from flowkern.models.vae import LatentDecoder
    from flowkern.train import TrainConfig, Trainer

    knobs.check(spec)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[knobs.precision]
    module, flow_name, cond_name, tcls = KINDS[spec.kind]
    adapters = importlib.import_module(module)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        transformer = _cast(getattr(diffusers, tcls)(**spec.transformer), dtype)
        if knobs.base_precision in ("int8", "fp8"):  # torchao's own quantized linears, traced as they run
            from flowkern.models.quantize import quantize_base

            quantize_base(transformer.requires_grad_(False), knobs.base_precision)
        vae = getattr(diffusers, spec.vae_class)(**spec.vae).eval().requires_grad_(False)
        flow = getattr(adapters, flow_name)(transformer)
        flow.add_lora(knobs.lora_rank)
        g = torch.Generator().manual_seed(seed + 1)
        rows, shared, constants, prompts = _prompt_table(spec, transformer.config, g, device)
    model = build.PromptBankFlow(flow, getattr(adapters, cond_name), rows, shared, constants, prompts=prompts)
    decoder = LatentDecoder(vae)
    flow.set_recompute(knobs.recompute if knobs.checkpoint_backbone else "none")
    decoder.set_gradient_checkpointing(knobs.checkpoint_vae)
    side = (knobs.resolution or spec.resolution) // spec.state_factor
    channels = spec.transformer["in_channels"] if spec.kind != "flux" else spec.latent_channels
    grid = "uniform" if spec.kind == "sit" else "shifted"
    num_steps = knobs.num_steps or spec.num_steps
    setup = build.RunSetup(
        model, spec.kind, spec.name, (channels, side, side), prompts, num_steps, grid,
        guidance_scale=spec.guidance_scale, to_images=decoder, device=torch.device(device), weights_dtype=dtype,
    )  # fmt: skip
    reward_fn, reward_module = build.reward_for_run(
        [knobs.reward], setup, _tower_sources(knobs.reward, seed), checkpoint_reward=knobs.checkpoint_reward
    )
    settings = build.MethodSettings(
        K=knobs.K, consistency=knobs.consistency, micro_batch=knobs.micro_batch,
        offload_trajectory=knobs.offload_trajectory, reward_hvp=knobs.reward_hvp,
    )  # fmt: skip
    method = build.method_for_run(knobs.method, setup, reward_fn, settings, default_beta=5e4, seed=seed)
    config = TrainConfig(
        batch_size=knobs.batch, grad_accum_steps=knobs.grad_accum, num_updates=1, num_steps=num_steps,
        time_grid=grid, seed=seed, residual_probe=min(8, knobs.batch),
    )  # fmt: skip
    trainer = Trainer(
        model, reward_fn, method, config, sample_shape=setup.sample_shape, cond_sampler=setup.cond_sampler,
        device=device,
    )  # fmt: skip
    resident = {
        "transformer": transformer,
        "vae": vae,
        "reward": reward_module,
        "value_net": getattr(method, "value_net", None),
        "prompt_table": model,
    }
    return trainer, resident


def _tower_sources(reward: str, seed: int) -> dict[str, tuple]:
    """``reward_for_run``'s sources for a tower reward of :data:`REWARD_TOWERS`: the modules built from the config
    (random weights, or fake tensors under the planner), fp32 as ``flowkern train`` loads them; else none."""
    if reward not in REWARD_TOWERS:
        return {}
    from transformers import CLIPConfig, CLIPModel

    from flowkern.rewards.clip import AESTHETIC_DIMS, AestheticHead

    config = REWARD_TOWERS[reward]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 2)
        clip = CLIPModel(CLIPConfig(**config)).eval()
        return {reward: (clip, AestheticHead((config["projection_dim"], *AESTHETIC_DIMS[1:])))}


def _prompt_table(spec: ModelSpec, config: Any, g: torch.Generator, device: str):
    """(rows, shared, constants, prompts): one encoded prompt (SD3/FLUX: random embeddings of the encoders'
    shapes; SiT: class 207) and the negative prompt for CFG."""
    w = spec.guidance_scale
    constants: dict = {"guidance_scale": w} if w else {}
    if spec.guidance is not None:
        constants["guidance"] = spec.guidance
    if spec.kind == "sit":
        return {"labels": torch.tensor([207 % int(config.num_embeds_ada_norm)])}, {}, constants, ["207"]
    text = lambda: torch.randn(1, spec.text_tokens, config.joint_attention_dim, generator=g).to(device)
    rows = {"prompt_embeds": text()}
    shared = {"negative_prompt_embeds": text()} if w else {}
    if spec.pooled_dim:
        pooled = lambda: torch.randn(1, spec.pooled_dim, generator=g).to(device)
        rows["pooled_prompt_embeds"] = pooled()
        if w:
            shared["negative_pooled_prompt_embeds"] = pooled()
    return rows, shared, constants, ["a photo of a red fox"]

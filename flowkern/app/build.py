"""Build what a run needs from plain settings: the flow model (+ LoRA), its conditioning, rewards and a method.

Models (``load_model(spec)``):

- ``"tiny"`` (the default): the pixel-space SD3 transformer that ships in ``flowkern/assets/tiny_flow``
  (``scripts/train_tiny_flow.py``), conditioned on a fixed table of encoded prompts, one per class.
- a local directory (or a hub id): dispatched on the transformer's class name in ``model_index.json`` /
  ``transformer/config.json`` / ``config.json``: ``SD3Transformer2DModel`` (``flowkern.models.sd3``),
  ``FluxTransformer2DModel`` (FLUX.1, ``flowkern.models.flux``), ``DiTTransformer2DModel`` (SiT,
  ``flowkern.models.sit``), ``Flux2Transformer2DModel`` (FLUX.2 dev / Klein, ``flowkern.models.flux2``), imported
  lazily. Prompts are encoded once by the pipeline's own text encoders (``flowkern.app.prompts``, optionally cached
  on disk; SiT: class ids), which are then freed; the reward sees the pipeline VAE's decode
  (``flowkern.models.vae.LatentDecoder``) in [0, 1].
- ``"toy"``: the 2-D Gaussian-mixture toy (``flowkern.models.toy``; exact base velocity + residual MLP).

Every model is wrapped so that ``cond`` is an integer tensor of prompt indices [B] (``PromptBankFlow``): the
methods gather conditioning by indexing rows, and the VGG-Flow value net embeds the index.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flowkern.methods.registry import METHODS, MethodSettings
from flowkern.models.lora import DEFAULT_RANK
from flowkern.models.prompt_bank import PromptBankFlow
from flowkern.models.toy import ToyFlow
from flowkern.rewards.registry import reward_names

__all__ = [
    "ASSET_DIR",
    "METHODS",
    "MODEL_KINDS",
    "MethodSettings",
    "PromptBankFlow",
    "RunSetup",
    "method_for_run",
    "reward_for_run",
    "check_applicable",
    "default_micro_batch",
    "load_model",
    "memory_defaults",
    "parse_reward_spec",
    "resolve_model",
]

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny_flow"
TINY_INFO = "flowkern_tiny.json"
MODEL_KINDS = ("tiny", "sd3", "flux", "flux2", "sit", "toy")
IMAGE_REWARDS = tuple(reward_names("image", weights=False))  # the pixel rewards (no weights): redness, brightness
TOY_REWARDS = tuple(reward_names("toy"))  # linear, bump
CLASS_NAMES = {  # transformer class -> model kind
    "SD3Transformer2DModel": "sd3",
    "FluxTransformer2DModel": "flux",
    "Flux2Transformer2DModel": "flux2",
    "DiTTransformer2DModel": "sit",
    "SiTTransformer2DModel": "sit",
}


# ---------------------------------------------------------------- a loaded model and what goes with it
@dataclass
class RunSetup:
    """A loaded model and its defaults: sample shape, prompts, sampler grid, decoder to [0, 1] images."""

    model: nn.Module
    kind: str
    source: str
    sample_shape: tuple[int, ...]
    prompts: list[str]
    num_steps: int
    time_grid: str
    shift: float = 3.0
    guidance_scale: float | None = None
    to_images: Callable[[torch.Tensor], torch.Tensor] | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    info: dict = field(default_factory=dict)
    weights_dtype: torch.dtype = torch.float32  # the frozen base weights' dtype (--precision)

    @property
    def num_prompts(self) -> int:
        return len(self.prompts)

    def cond_sampler(self, n: int, generator: torch.Generator) -> torch.Tensor | None:
        """Prompt indices, stratified: every prompt n // C or n // C + 1 times, in a random order (the trainer's
        per-trajectory conditioning; balanced batches make the logged reward far less noisy than i.i.d. draws)."""
        if not self.prompts:
            return None
        c = len(self.prompts)
        offset = int(torch.randint(c, (), generator=generator))
        labels = (torch.arange(n) + offset) % c
        return labels[torch.randperm(n, generator=generator)].to(self.device)

    def eval_labels(self, n: int) -> torch.Tensor | None:
        """Fixed prompts for evaluation: 0, 1, ..., C-1, 0, 1, ..."""
        if not self.prompts:
            return None
        return (torch.arange(n) % len(self.prompts)).to(self.device)


def resolve_model(spec: str) -> tuple[str, str]:
    """(kind, location) for ``spec``: 'tiny' | 'toy' | a local directory | a hub id ``org/name``.

    Raises FileNotFoundError for a path that does not exist and ValueError for a directory that holds no
    supported transformer.
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"--model must be 'tiny', 'toy', a model directory or a hub id, got {spec!r}")
    if spec in ("tiny", "default"):
        return "tiny", str(ASSET_DIR)
    if spec == "toy":
        return "toy", "toy"
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / TINY_INFO).is_file():
            return "tiny", str(path)
        cls = _transformer_class(path)
        if cls not in CLASS_NAMES:
            raise ValueError(f"model directory {spec} holds a {cls}; supported: {sorted(CLASS_NAMES)}")
        return CLASS_NAMES[cls], str(path)
    if path.exists():
        raise ValueError(f"--model must be a directory (a diffusers pipeline or transformer), got the file {spec}")
    looks_like_hub_id = spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and "\\" not in spec
    if not looks_like_hub_id:
        raise FileNotFoundError(f"model directory {spec} does not exist")
    owner = spec.split("/")[0]
    if Path(owner).is_dir():  # `runs/mdl` next to a local runs/: a mistyped local path, not a hub id
        raise FileNotFoundError(f"model directory {spec} does not exist ({owner}/ is a local directory)")
    return _hub_kind(spec), spec


def _transformer_class(path: Path) -> str:
    index = path / "model_index.json"
    if index.is_file():
        entry = _read_json(index).get("transformer")
        if isinstance(entry, list) and len(entry) == 2 and entry[1]:
            return str(entry[1])
    for config in (path / "transformer" / "config.json", path / "config.json"):
        if config.is_file():
            return str(_read_json(config).get("_class_name", "an unknown model"))
    raise ValueError(f"model directory {path} has no model_index.json, transformer/config.json or config.json")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {path}: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def _hub_kind(repo: str) -> str:
    """The model kind of hub repository ``repo``, failing fast (one line, no retries) when the hub cannot answer."""
    from huggingface_hub import constants, model_info

    where = f"--model {repo} is not a local directory"
    if constants.HF_HUB_OFFLINE:
        raise FileNotFoundError(f"{where}, and the hub is offline (HF_HUB_OFFLINE): a hub id cannot be looked up")
    try:
        model_info(repo, timeout=10)  # one request: an unknown repo or no network answers at once
    except Exception as err:
        raise FileNotFoundError(f"{where}, nor a model on the hub ({_first_line(err)})") from None
    try:
        with _quiet_hub():
            from diffusers import DiffusionPipeline

            config = DiffusionPipeline.load_config(repo)
    except Exception as err:  # offline, unknown repo, gated: say so in one line
        raise ValueError(f"cannot read the model index of {repo!r} from the hub: {_first_line(err)}") from None
    entry = config.get("transformer")
    cls = entry[1] if isinstance(entry, list) and len(entry) == 2 else None
    if cls not in CLASS_NAMES:
        raise ValueError(f"{repo} has transformer {cls}; supported: {sorted(CLASS_NAMES)}")
    return CLASS_NAMES[cls]


@contextlib.contextmanager
def _quiet_hub() -> Iterator[None]:
    """huggingface_hub / diffusers warnings and retry messages off (the error, if any, is reported in one line)."""
    import logging
    import warnings

    loggers = [logging.getLogger(name) for name in ("huggingface_hub", "diffusers")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# ---------------------------------------------------------------- model directories: complete and readable?
WEIGHTS = "diffusion_pytorch_model.safetensors"


def check_model_directory(path: Path, kind: str) -> None:
    """ValueError naming the file for a model directory that cannot load: a missing config or weights file, a
    truncated or corrupt safetensors file (its header and size; safetensors has no checksum of the tensor bytes).
    Checked before diffusers runs (which would fall back to pickled weights, print and raise a multi-line error)."""
    components = ["transformer"] if kind == "tiny" else ["transformer", "vae"]
    if kind == "tiny":
        _read_json(path / TINY_INFO)
        check_safetensors(path / "prompts.safetensors")
    for name in components:
        folder = path / name
        if kind != "tiny" and not folder.is_dir():
            continue  # a bare transformer or a pipeline without vae/: the loader says what is needed
        if not (folder / "config.json").is_file():
            raise ValueError(f"model directory {path} is incomplete: {folder / 'config.json'} is missing")
        _read_json(folder / "config.json")
        index = folder / f"{WEIGHTS}.index.json"
        if index.is_file():  # sharded weights
            shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
            if not shards:
                raise ValueError(f"{index} lists no weight files")
            for shard in shards:
                check_safetensors(folder / shard)
        elif (folder / WEIGHTS).exists():
            check_safetensors(folder / WEIGHTS)
        elif not any(folder.glob("*.bin")):
            raise ValueError(f"model directory {path} is incomplete: {folder / WEIGHTS} is missing")


def check_safetensors(file: Path) -> None:
    """ValueError if ``file`` is missing or is not a complete safetensors file (header parse, size coverage)."""
    from safetensors import safe_open

    if not file.is_file():
        raise ValueError(f"{file} is missing")
    try:
        with safe_open(str(file), framework="pt"):
            pass
    except Exception as err:  # SafetensorError: truncated, bad header
        raise ValueError(f"{file} is truncated or corrupt ({_first_line(err)})") from None


def _dtype(precision: str) -> torch.dtype:
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    raise ValueError(f"--precision must be 'fp32' or 'bf16', got {precision!r}")


@dataclass
class _Load:
    """What every loader needs (the options of :func:`load_model`)."""

    location: str
    lora_rank: int | None
    lora_alpha: float | None
    lora_path: str | os.PathLike | None
    dtype: torch.dtype
    device: torch.device
    resolution: int | None
    prompts: list[str]
    guidance_scale: float | None
    num_steps: int | None
    seed: int
    quantize: str | None = None  # 'int8' / 'fp8': the transformer's base_precision (flowkern.models.quantize)
    prompt_cache: str | os.PathLike | None = None  # flowkern.app.prompts.encode_cached
    recompute: str = "block"  # the backbone's recompute granularity (TransformerFlowModel.set_recompute)

    @property
    def local(self) -> bool:
        return Path(self.location).is_dir()


def load_model(
    spec: str,
    *,
    lora_rank: int | None = DEFAULT_RANK,
    lora_alpha: float | None = None,
    lora_path: str | os.PathLike | None = None,
    precision: str = "fp32",
    device: str | torch.device = "cpu",
    resolution: int | None = None,
    prompts: Sequence[str] = (),
    guidance_scale: float | None = None,
    num_steps: int | None = None,
    seed: int = 0,
    base_precision: str | None = None,
    prompt_cache: str | os.PathLike | None = None,
    recompute: str = "block",
) -> RunSetup:
    """Load ``spec`` (see :func:`resolve_model`) with a fresh LoRA of ``lora_rank`` (None: no LoRA), or the LoRA
    saved in ``lora_path`` (its rank and alpha are read from the file).

    ``prompts``: text prompts (SD3, FLUX) or class ids (SiT); ``guidance_scale``: CFG w (1 or None: no CFG);
    ``resolution``: image side in pixels; ``num_steps``: Euler steps of the sampler. ``base_precision`` ('bf16',
    'int8', 'fp8'; `flowkern.models.quantize`): the transformer's frozen linears stored in bf16 or weight-only
    int8/fp8 under the fp32 LoRA; it implies ``precision='bf16'`` (the compute dtype). ``prompt_cache``: a
    directory caching the prompt embeddings per prompt and text encoder (`flowkern.app.prompts.encode_cached`).
    ``recompute``: how finely a pipeline's backbone is recomputed in backward ('none', 'block', 'sublayer';
    `flowkern.models._adapter.TransformerFlowModel.set_recompute`).
    """
    from flowkern.models._adapter import check_recompute

    check_recompute(recompute)
    kind, location = resolve_model(spec)
    if base_precision is not None:
        from flowkern.models.quantize import check_base_precision

        check_base_precision(base_precision)
        precision = "bf16"  # a bf16-stored or quantized base computes in bf16
    opts = _Load(
        location,
        lora_rank,
        lora_alpha,
        lora_path,
        _dtype(precision),
        torch.device(device),
        resolution,
        list(prompts),
        guidance_scale,
        num_steps,
        seed,
        None if base_precision == "bf16" else base_precision,
        prompt_cache,
        recompute,
    )
    if kind == "toy":
        return _load_toy(lora_path, opts.device, num_steps, seed)
    if opts.local:
        check_model_directory(Path(location), kind)
    if kind == "tiny":
        return _load_tiny(opts)
    return _load_pipeline(kind, opts)


def _lora_rank_of(lora_path: str | os.PathLike) -> tuple[int, float]:
    """(rank, alpha) stored in a saved LoRA's safetensors metadata (diffusers' adapter metadata)."""
    from safetensors import safe_open

    from flowkern.models.lora import LORA_WEIGHT_NAME

    file = os.path.join(lora_path, LORA_WEIGHT_NAME) if os.path.isdir(lora_path) else os.fspath(lora_path)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no LoRA weights at {file}")
    try:
        with safe_open(file, framework="pt") as f:
            meta = f.metadata() or {}
            keys = list(f.keys())
            rank = None
            for key in keys:
                if "lora_A" in key:
                    rank = int(f.get_slice(key).get_shape()[0])
                    break
    except Exception as err:
        raise ValueError(f"{file} is not a readable safetensors LoRA file: {str(err).splitlines()[0]}") from None
    if rank is None:
        raise ValueError(f"{file} holds no lora_A weights")
    alpha = float(rank)
    for value in meta.values():
        try:
            config = json.loads(value)
        except (TypeError, json.JSONDecodeError):
            continue
        if isinstance(config, dict) and "lora_alpha" in config:
            alpha = float(config["lora_alpha"])
    return rank, alpha


def _load_toy(lora_path, device, num_steps, seed) -> RunSetup:
    from flowkern.models.toy import GaussianMixture, make_toy_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ToyFlow(make_toy_model(GaussianMixture.ring(8, radius=4.0, std=0.4), hidden=64, depth=2))
    if lora_path is not None:
        model.load_lora(lora_path)
    return RunSetup(model.to(device), "toy", "toy", (2,), [], num_steps or 20, "uniform", device=device)


def _check_resolution(resolution: int | None, default: int, multiple: int, maximum: int | None) -> int:
    if resolution is None:
        return default
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < multiple:
        raise ValueError(f"--resolution must be an int >= {multiple}, got {resolution!r}")
    if resolution % multiple:
        raise ValueError(f"--resolution must be a multiple of {multiple} for this model, got {resolution}")
    if maximum is not None and resolution > maximum:
        raise ValueError(f"--resolution must be <= {maximum} for this model, got {resolution}")
    return resolution


def _attach_lora(flow, opts: _Load) -> None:
    rank, alpha = opts.lora_rank, opts.lora_alpha
    if opts.lora_path is not None:
        rank, alpha = _lora_rank_of(opts.lora_path)
    if rank is None:
        return
    from flowkern.models.lora import load_lora

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(opts.seed)
        flow.add_lora(rank, alpha)
    if opts.lora_path is not None:
        load_lora(flow.transformer, opts.lora_path)


def _cfg(w: float | None) -> float | None:
    """w = 1 is the conditional velocity: no [2B] batch needed."""
    return None if w is None or float(w) == 1.0 else float(w)


def _load_tiny(opts: _Load) -> RunSetup:
    from safetensors.torch import load_file

    from flowkern.models.sd3 import SD3Conditioning, SD3FlowModel

    path = Path(opts.location)
    info = _read_json(path / TINY_INFO)
    flow = SD3FlowModel.from_pretrained(
        path,
        subfolder="transformer",
        torch_dtype=opts.dtype,
        local_files_only=True,
        device=opts.device,
        base_precision=opts.quantize,
    )
    _attach_lora(flow, opts)
    table = {k: v.to(opts.device) for k, v in load_file(str(path / "prompts.safetensors")).items()}
    sampling = info.get("sampling", {})
    w = _cfg(sampling.get("guidance_scale") if opts.guidance_scale is None else opts.guidance_scale)
    rows = {k: table[k] for k in ("prompt_embeds", "pooled_prompt_embeds")}
    shared = {k: table[k] for k in ("negative_prompt_embeds", "negative_pooled_prompt_embeds")} if w else {}
    model = PromptBankFlow(
        flow, SD3Conditioning, rows, shared, {"guidance_scale": w} if w else {}, prompts=info["class_names"]
    )
    config = flow.transformer.config
    size = _check_resolution(
        opts.resolution,
        int(info.get("image_size", config.sample_size)),
        config.patch_size,
        config.patch_size * config.pos_embed_max_size,
    )
    return RunSetup(
        model,
        "tiny",
        str(path),
        (config.in_channels, size, size),
        list(info["class_names"]),
        opts.num_steps or int(sampling.get("num_steps", 20)),
        sampling.get("time_grid", "uniform"),
        guidance_scale=w,
        to_images=pixels_to_images,
        device=opts.device,
        info=info,
        weights_dtype=opts.dtype,
    )


def pixels_to_images(x: torch.Tensor) -> torch.Tensor:
    """Pixel-space samples in [-1, 1] -> images in [0, 1] (hard clamp, as the reward peers do)."""
    return (x.float() / 2 + 0.5).clamp(0, 1)


ADAPTERS = {  # kind -> (module, FlowModel class, conditioning class, default CFG w)
    "sd3": ("flowkern.models.sd3", "SD3FlowModel", "SD3Conditioning", 5.0),
    "flux": ("flowkern.models.flux", "FluxFlowModel", "FluxConditioning", None),
    "flux2": ("flowkern.models.flux2", "Flux2FlowModel", "Flux2Conditioning", None),  # Klein base: w from the index
    "sit": ("flowkern.models.sit", "SiTFlowModel", "SiTConditioning", 4.0),
}


def _load_pipeline(kind: str, opts: _Load) -> RunSetup:
    """SD3 / FLUX.1 / SiT from a diffusers pipeline directory (or hub id): adapter + LoRA, prompts encoded once by
    the pipeline's own text encoders (SiT: class ids), the reward decoded by the pipeline's VAE."""
    import importlib

    from flowkern.models.vae import LatentDecoder

    module, flow_name, cond_name, default_w = ADAPTERS[kind]
    adapters = importlib.import_module(module)
    if not opts.prompts:
        what = "class ids: pass --prompt ID (repeatable)" if kind == "sit" else "pass --prompt TEXT or --prompts FILE"
        raise ValueError(f"a {kind.upper()} model needs prompts ({what})")
    if opts.local and not (Path(opts.location) / "transformer").is_dir():
        raise ValueError(
            f"{opts.location} is a bare transformer: training needs the pipeline directory "
            "(text encoders for the prompts, the VAE to decode for the reward)"
        )
    if opts.local and not (Path(opts.location) / "vae").is_dir():
        raise ValueError(f"{opts.location} has no vae/ (needed to decode samples for the reward)")
    flow = getattr(adapters, flow_name).from_pretrained(
        opts.location,
        subfolder="transformer",
        torch_dtype=opts.dtype,
        local_files_only=opts.local,
        device=opts.device,
        base_precision=opts.quantize,
    )
    _attach_lora(flow, opts)
    if kind == "flux2" and opts.local:
        from flowkern.app.prompts import default_guidance_scale

        default_w = default_guidance_scale(opts.location)
    w = _cfg(default_w if opts.guidance_scale is None else opts.guidance_scale)
    rows, shared, constants = _encode_prompts(kind, flow, opts, w)
    model = PromptBankFlow(flow, getattr(adapters, cond_name), rows, shared, constants, prompts=opts.prompts)
    decoder = LatentDecoder.from_pretrained(
        opts.location, subfolder="vae", local_files_only=opts.local, device=opts.device
    )
    memory_defaults(flow, decoder, opts.recompute)
    factor = 2 ** (len(decoder.vae.config.block_out_channels) - 1)
    config = flow.transformer.config
    patch = int(getattr(config, "patch_size", 1) or 1)
    if kind == "flux":  # state: unpacked latents [B, in_channels / 4, H/f, W/f] (2x2 packing)
        channels, multiple, default = config.in_channels // 4, 2 * factor, 1024
    elif kind == "flux2":  # state: the patchified latents [B, in_channels, H/2f, W/2f]
        channels, multiple, default = config.in_channels, 2 * factor, 1024
        factor *= 2
    else:
        channels, multiple, default = config.in_channels, patch * factor, config.sample_size * factor
    size = _check_resolution(opts.resolution, default, multiple, None)
    side = size // factor
    grid = "uniform" if kind == "sit" else "shifted"
    return RunSetup(
        model,
        kind,
        opts.location,
        (channels, side, side),
        list(opts.prompts),
        opts.num_steps or 20,
        grid,
        guidance_scale=w,
        to_images=decoder,
        device=opts.device,
        weights_dtype=opts.dtype,
    )


def _encode_prompts(kind: str, flow, opts: _Load, w: float | None):
    """(rows, shared, constants) of the prompt table: encoded once, text encoders freed afterwards."""
    if kind == "sit":
        try:
            ids = torch.tensor([int(p) for p in opts.prompts], dtype=torch.long)
        except ValueError:
            raise ValueError(f"SiT prompts are class ids (integers), got {opts.prompts}") from None
        n = flow.num_classes
        if bool(((ids < 0) | (ids >= n)).any()):
            raise ValueError(f"SiT class ids must be in [0, {n}), got {ids.tolist()}")
        return {"labels": ids.to(opts.device)}, {}, ({"guidance_scale": w} if w else {})
    from flowkern.app.prompts import encode_prompts

    rows, shared = encode_prompts(
        kind,
        opts.location,
        opts.prompts,
        dtype=opts.dtype,
        device=opts.device,
        local_files_only=opts.local,
        negative=bool(w),
        cache_dir=opts.prompt_cache,
    )
    constants = {"guidance_scale": w} if w else {}
    if kind in ("flux", "flux2") and flow.transformer.config.guidance_embeds:
        # the embedded guidance of FLUX.1-dev / FLUX.2-dev: the pipelines' default guidance_scale
        constants["guidance"] = 3.5 if kind == "flux" else 4.0
    return rows, shared, constants


# ---------------------------------------------------------------- rewards
def reward_specs(value: Any) -> Any:
    """The reward setting as a list of ``NAME[:WEIGHT]`` strings: a string, a list of them, or a config file's
    ``{"name": weight}`` (the weight kept, e.g. ``{"bump": -1}`` -> ``["bump:-1"]``). Anything else is returned
    unchanged (the type check names it)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [f"{name}:{weight}" for name, weight in value.items()]
    return value


def parse_reward_spec(spec: str) -> tuple[str, float]:
    """``name[:weight]`` -> (name, weight); the weight must be a finite non-zero number."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"--reward must be NAME or NAME:WEIGHT, got {spec!r}")
    name, sep, weight = spec.strip().partition(":")
    if not name:
        raise ValueError(f"--reward must be NAME or NAME:WEIGHT, got {spec!r}")
    if not sep:
        return name.lower(), 1.0
    try:
        value = float(weight)
    except ValueError:
        raise ValueError(f"--reward weight must be a number (NAME:WEIGHT), got {spec!r}") from None
    if not math.isfinite(value) or value == 0:
        raise ValueError(f"--reward weight must be finite and non-zero, got {spec!r}")
    return name.lower(), value


def known_rewards(kind: str | None = None) -> list[str]:
    """Reward names usable with a model kind (all names when ``kind`` is None): the registry's 'toy' rewards for
    the toy, its 'image' rewards for the others."""
    domain = None if kind is None else "toy" if kind == "toy" else "image"
    return sorted(reward_names(domain))


def check_reward_names(specs: Sequence[str], kind: str) -> list[tuple[str, float]]:
    """Parse and check names against the model kind before anything is loaded or written."""
    parsed = [parse_reward_spec(s) for s in specs]
    names = [n for n, _ in parsed]
    if len(set(names)) != len(names):
        raise ValueError(f"--reward names must be distinct, got {names}")
    known = known_rewards(kind)
    for name in names:
        if name not in known:
            raise ValueError(f"unknown reward {name!r} for a {kind} model; known: {', '.join(known)}")
    return parsed


def reward_for_run(
    specs: Sequence[str],
    setup: RunSetup,
    sources: dict[str, Sequence[Any]] | None = None,
    checkpoint_reward: bool = True,
) -> tuple[Callable[[torch.Tensor], torch.Tensor], nn.Module | None]:
    """(r(x) -> [B] on the model's samples x, the reward module or None for the toy).

    Image models: r(x) = sum_k w_k reward_k(to_images(x), prompts); prompt-dependent rewards need a run with one
    prompt (the methods' reward interface r(x) carries no conditioning). ``sources`` maps a reward name to the
    arguments of its ``from_pretrained`` (local paths or hub ids). ``checkpoint_reward`` (``--checkpoint-reward``,
    default on): every reward tower (CLIP / BLIP) recomputes each layer in backward (``set_checkpointing``); at a
    tower's real size this cuts the reward gradient's activations ~6x (flowkern.rewards.memory's measured table:
    ViT-L/14 370 -> 55 MB per image, ViT-H/14 436 -> 68 MB, BLIP 271 -> 37 MB) for one more tower forward.
    """
    if not isinstance(checkpoint_reward, bool):
        raise ValueError(f"--checkpoint-reward: expected True or False, got {checkpoint_reward!r}")
    parsed = check_reward_names(specs, setup.kind)
    sources = sources or {}
    from flowkern.rewards import make_reward

    if setup.kind == "toy":
        parts = [(make_reward(name), w) for name, w in parsed]
        return (lambda x: sum(w * r(x) for r, w in parts)), None

    from flowkern.rewards import WeightedReward

    modules = {name: _reward_module(name, sources.get(name, ())) for name, _ in parsed}
    for module in modules.values():
        if hasattr(module, "set_checkpointing"):  # the tower rewards (clip, pickscore, hps, image_reward)
            module.set_checkpointing(checkpoint_reward)
    reward = WeightedReward(modules, {name: w for name, w in parsed}).to(setup.device)
    prompts = None
    if reward.needs_prompts:
        if len(set(setup.prompts)) != 1:
            needing = [n for n, m in modules.items() if getattr(m, "needs_prompts", True)]
            raise ValueError(
                f"reward(s) {needing} score image and prompt: train with exactly one --prompt "
                "(the methods pass the reward samples only)"
            )
        prompts = setup.prompts[0]
    to_images = setup.to_images

    def reward_fn(x: torch.Tensor) -> torch.Tensor:
        images = to_images(x)
        return reward(images, None if prompts is None else [prompts] * images.shape[0])

    return reward_fn, reward


def _reward_module(name: str, args: Sequence[str]) -> nn.Module:
    from flowkern.rewards import make_reward

    try:
        return make_reward(name, *args)
    except TypeError as err:
        raise ValueError(
            f"reward {name!r} needs its weights: pass --reward-source {name}=PATH[,PATH] ({err})"
        ) from None


# ---------------------------------------------------------------- methods
def default_micro_batch(kind: str) -> int | None:
    """Samples per micro-batch when --micro-batch is not given: 1 for real pipelines (SD3, FLUX.1, SiT: one
    sample's graph at a time, so batch size, K and the number of transitions no longer scale the peak), None (all
    at once, fastest) for the embedded tiny model and the toy."""
    return 1 if kind in ADAPTERS else None


def default_reward_hvp(kind: str) -> str:
    """VGG-Flow 'exact' consistency's H(y) dy (M21) when --reward-hvp is not given: 'central' (two ordinary reward
    gradients with the VAE's per-layer checkpointing) for real pipelines, whose double backward through the VAE decode
    does not fit (planned 83.7 GiB for SD3-medium at 1024 px); 'autograd' (exact) for the tiny model and the toy."""
    return "central" if kind in ADAPTERS else "autograd"


def memory_defaults(flow: nn.Module, decoder: nn.Module | None = None, recompute: str = "block") -> None:
    """What a real pipeline trains with: gradient checkpointing of the transformer, per block by default
    (``recompute``: `TransformerFlowModel.set_recompute`; recomputed with the forward's LoRA state) and of the VAE
    decoder the reward reads."""
    flow.set_recompute(recompute)
    if decoder is not None and hasattr(decoder, "set_gradient_checkpointing"):
        decoder.set_gradient_checkpointing(True)


def method_for_run(
    name: str,
    setup: RunSetup,
    reward_fn: Callable[[torch.Tensor], torch.Tensor],
    settings: MethodSettings,
    *,
    default_beta: float = 1.0,
    seed: int = 0,
) -> Any:
    """The method ``name`` of the registry (:mod:`flowkern.methods.registry`) on ``setup.model``: its grid, sample
    shape, prompts, device and weights' dtype, and the model kind's micro-batch default (:func:`default_micro_batch`)
    when ``settings.micro_batch`` is None, and its reward-HVP default (:func:`default_reward_hvp`)."""
    from flowkern.methods import flow_callables
    from flowkern.methods.registry import build_method

    if settings.micro_batch is None:
        settings = dataclasses.replace(settings, micro_batch=default_micro_batch(setup.kind))
    if settings.reward_hvp is None:
        settings = dataclasses.replace(settings, reward_hvp=default_reward_hvp(setup.kind))
    velocity, base_velocity = flow_callables(setup.model)
    method = build_method(
        name,
        velocity,
        base_velocity,
        reward_fn,
        settings,
        num_steps=setup.num_steps,
        sample_shape=setup.sample_shape,
        num_classes=setup.num_prompts or None,
        default_beta=default_beta,
        weights_dtype=setup.weights_dtype,
        device=setup.device,
        seed=seed,
    )
    if settings.offload_trajectory:
        method.offload_trajectory = True  # MethodBase.trajectory_store: states in pinned CPU memory
    if getattr(method, "consistency", None) == "exact":  # a quantized base: its linears need a JVP rule (M21)
        from flowkern.models.quantize import check_jvp

        check_jvp(setup.model)
    return method


# ---------------------------------------------------------------- which settings act where
IMAGE_MODELS = ("tiny", "sd3", "flux", "flux2", "sit")
FOR_MODELS = {  # setting -> the model kinds that read it (the toy has no LoRA, no pixels, no prompts)
    "lora_rank": IMAGE_MODELS,
    "lora_alpha": IMAGE_MODELS,
    "precision": IMAGE_MODELS,
    "base_precision": IMAGE_MODELS,
    "resolution": IMAGE_MODELS,
    "guidance_scale": IMAGE_MODELS,
    "reward_source": IMAGE_MODELS,
    "prompt": ("sd3", "flux", "flux2", "sit"),  # the tiny model draws its own four prompts
    "prompt_cache": ("sd3", "flux", "flux2"),
    "recompute": ("sd3", "flux", "flux2", "sit"),  # the pipelines' backbones (TransformerFlowModel.set_recompute)
    "checkpoint_reward": IMAGE_MODELS,  # the text encoders whose embeddings flowkern.app.prompts caches
}


def check_applicable(settings: Mapping, defaults: Mapping, method: str, kind: str) -> None:
    """ValueError (one line) listing every setting that differs from its default and does nothing for ``method``
    (:attr:`flowkern.methods.registry.MethodEntry.reads`) on a ``kind`` model (:data:`FOR_MODELS`). Settings no
    method reads, and settings no table lists, act for every method and model."""
    from flowkern.methods.registry import METHODS as REGISTRY

    read_by = {}
    for entry in REGISTRY.values():
        for setting in entry.reads:
            read_by.setdefault(setting, []).append(entry.name)
    problems = []
    for table, chosen, what in ((read_by, method, "method"), (FOR_MODELS, kind, "model")):
        for name, users in table.items():
            if chosen not in users and settings.get(name) != defaults.get(name):
                problems.append(
                    f"--{name.replace('_', '-')} has no effect with {what} {chosen} (it applies to {', '.join(users)})"
                )
    if problems:
        raise ValueError("; ".join(problems) + ": leave it out")

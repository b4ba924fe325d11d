"""LoRA through peft on diffusers transformers (docs/ecosystem.md (b)).

`add_lora` attaches a peft adapter with `transformer.add_adapter(LoraConfig(...))` and keeps its
parameters in fp32 even when the base weights are bf16 (diffusers' `cast_training_params` recipe).
`save_lora` writes the file a *stock* diffusers pipeline loads with `pipe.load_lora_weights(path)`:
`pytorch_lora_weights.safetensors` with keys `transformer.<module>.lora_{A,B}.weight` and the
LoraConfig in the safetensors metadata (so a rank != alpha scale survives the round trip).
`load_lora` reads such a file back into a transformer, trainable, for resuming.

Models without diffusers' `PeftAdapterMixin` (e.g. `DiTTransformer2DModel`, used for SiT) get the adapter
through peft's `inject_adapter_in_model`; `lora_disabled` switches the LoRA off for either kind. Their file has
the same layout, written directly (no stock diffusers pipeline loads LoRA for them).

Memory: peft casts a bf16 input to the fp32 LoRA in every layer, and autograd keeps each copy for the backward;
``to_q``, ``to_k`` and ``to_v`` read the same input, so it is kept three times in fp32. `add_lora` makes the
layers of one transformer share the cast (`SharedInputCast`): one fp32 copy per input, the same values.
`lora_state` / `lora_state_as` snapshot and re-apply the on/off flags (gradient checkpointing recomputes a block
with the flags its forward saw, `flowkern.models._adapter`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import warnings
import weakref
from collections.abc import Iterator, Sequence

import torch
from torch import nn

__all__ = [
    "DEFAULT_RANK",
    "DEFAULT_TARGETS",
    "LORA_WEIGHT_NAME",
    "add_lora",
    "has_lora",
    "load_lora",
    "lora_disabled",
    "lora_parameters",
    "lora_state",
    "lora_state_as",
    "save_lora",
]

# The rank of a run's LoRA when none is given: flowkern train, load_model and flowkern plan share it, so a plan
# without --lora-rank predicts the run without it.
DEFAULT_RANK = 8
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # the name diffusers' save/load_lora_weights use


def has_lora(transformer: nn.Module) -> bool:
    """True when peft adapters are attached (`add_adapter`/`load_lora_adapter`, or `add_lora` on a model
    without diffusers' peft mixin)."""
    return bool(getattr(transformer, "_hf_peft_config_loaded", False)) or bool(_tuner_layers(transformer))


def _tuner_layers(module: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


def lora_state(module: nn.Module) -> list[tuple[nn.Module, bool]]:
    """(layer, disabled) for every peft LoRA layer inside ``module`` (a transformer or one of its blocks)."""
    return [(layer, layer._disable_adapters) for layer in _tuner_layers(module)]


@contextlib.contextmanager
def lora_state_as(state: list[tuple[nn.Module, bool]]) -> Iterator[None]:
    """Inside, each layer of a `lora_state` snapshot is on/off as it was then; restored on exit, even on error."""
    # peft's layer.enable_adapters() also flips requires_grad (not allowed inside torch.func transforms such as the
    # 'exact' consistency's jvp, M21); the flag it sets is all the forward reads, so set only the flag.
    previous = [(layer, layer._disable_adapters) for layer, _ in state]
    for layer, disabled in state:
        layer._disable_adapters = disabled
    try:
        yield
    finally:
        for layer, disabled in previous:
            layer._disable_adapters = disabled


@contextlib.contextmanager
def lora_disabled(transformer: nn.Module) -> Iterator[None]:
    """Inside, every peft LoRA layer of ``transformer`` is off (the frozen base model); on exit each layer's
    previous on/off state is restored, even on error. ``requires_grad`` is never touched.

    Per layer, so it also works on models without diffusers' peft mixin.
    """
    with lora_state_as([(layer, True) for layer in _tuner_layers(transformer)]):
        yield


class SharedInputCast:
    """peft's per-layer input cast (``LoraLayer._cast_input_dtype``), shared by the LoRA layers of one transformer:
    a layer given the very tensor the previous cast read (same object, unchanged, same grad mode) reuses its result.

    The last input and its cast are held by weak reference only: under grad the cast lives as long as autograd
    keeps it (the sharing then saves one fp32 copy per extra reader); without grad nothing is kept alive.
    """

    def __init__(self):
        self._last: tuple | None = None  # (weakref input, weakref cast, version, dtype, grad mode)

    def __call__(self, layer: nn.Module, x: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        if x is None or not getattr(layer, "cast_input_dtype_enabled", True) or x.dtype == dtype:
            return x  # as peft
        try:
            key = (x._version, dtype, torch.is_grad_enabled())
        except RuntimeError:  # inference tensors and some functorch wrappers carry no version counter
            return x.to(dtype=dtype)
        if self._last is not None:
            source, cast, *last_key = self._last
            out = cast()
            if source() is x and out is not None and tuple(last_key) == key:
                return out
        out = x.to(dtype=dtype)
        self._last = (weakref.ref(x), weakref.ref(out), *key)
        return out


def share_input_cast(transformer: nn.Module) -> None:
    """Let the LoRA layers of ``transformer`` share one `SharedInputCast` (same values, fewer fp32 copies)."""
    shared = SharedInputCast()
    for layer in _tuner_layers(transformer):
        if hasattr(layer, "_cast_input_dtype"):
            layer._cast_input_dtype = functools.partial(shared, layer)


def lora_parameters(transformer: nn.Module) -> list[nn.Parameter]:
    """The LoRA parameters (names containing ``lora_``) in module order."""
    return [p for name, p in transformer.named_parameters() if "lora_" in name]


def add_lora(
    transformer: nn.Module,
    rank: int,
    alpha: float | None = None,
    target_modules: Sequence[str] = DEFAULT_TARGETS,
    *,
    init_lora_weights: bool | str = "gaussian",
    trainable_dtype: torch.dtype = torch.float32,
) -> list[nn.Parameter]:
    """Attach a peft LoRA (rank ``rank``, scale ``alpha / rank``; alpha defaults to rank) to a diffusers
    transformer and return its trainable parameters.

    The base weights are frozen; the LoRA parameters are cast to ``trainable_dtype`` (fp32 by default:
    bf16 base, fp32 trainable, as diffusers' `cast_training_params`). peft's LoRA layers cast the
    activations to the adapter's dtype and the result back, so mixed dtypes are safe.
    """
    from peft import LoraConfig

    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    if alpha is not None and not float(alpha) > 0:
        raise ValueError(f"alpha must be > 0, got {alpha!r}")
    if isinstance(target_modules, str) or not target_modules:
        raise ValueError(f"target_modules must be a non-empty sequence of module names, got {target_modules!r}")
    if has_lora(transformer):
        raise ValueError("the transformer already has a LoRA adapter; flowkern trains exactly one")
    transformer.requires_grad_(False)
    config = LoraConfig(
        r=rank,
        lora_alpha=float(rank if alpha is None else alpha),
        init_lora_weights=init_lora_weights,
        target_modules=list(target_modules),
    )
    with warnings.catch_warnings():  # a quantized base (flowkern.models.quantize): peft warns that merge() is
        warnings.filterwarnings("ignore", message="TorchaoLoraLinear was instantiated")  # unavailable; never used
        if hasattr(transformer, "add_adapter"):
            transformer.add_adapter(config)
        else:  # no diffusers peft mixin (DiT): peft directly; keep the config where get/set_peft_model_state_dict look
            from peft import inject_adapter_in_model

            try:
                inject_adapter_in_model(config, transformer, adapter_name="default")
            except ValueError as err:  # peft: "Target modules ... not found in the base model"
                raise ValueError(f"no module of the transformer matches target_modules={list(target_modules)}") from err
            transformer.peft_config = {"default": config}
    params = lora_parameters(transformer)
    if not params:
        raise ValueError(f"no module of the transformer matches target_modules={list(target_modules)}")
    for p in params:
        p.data = p.data.to(trainable_dtype)
        p.requires_grad_(True)
    share_input_cast(transformer)
    return params


def _pipeline_class(transformer: nn.Module):
    """The stock pipeline whose `save_lora_weights` matches this transformer's LoRA file format (None: no stock
    pipeline loads LoRA for it; `save_lora` then writes the same layout itself)."""
    import diffusers

    name = type(transformer).__name__
    if name == "SD3Transformer2DModel":
        return diffusers.StableDiffusion3Pipeline
    if name == "FluxTransformer2DModel":
        return diffusers.FluxPipeline
    if name == "Flux2Transformer2DModel" and hasattr(diffusers, "Flux2Pipeline"):
        return diffusers.Flux2Pipeline  # Flux2KleinPipeline shares its Flux2LoraLoaderMixin
    if name == "DiTTransformer2DModel":
        return None
    raise TypeError(f"save_lora supports SD3/FLUX/FLUX.2/DiT transformers, got {name}")


def _write_lora_file(directory: str, state: dict[str, torch.Tensor], metadata: dict) -> None:
    """diffusers' LoRA file layout without a pipeline class: ``transformer.``-prefixed keys, the LoraConfig as
    JSON under the ``lora_adapter_metadata`` safetensors metadata key (keys prefixed the same way)."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    config = {f"transformer.{k}": v for k, v in metadata.items()}
    header = {"format": "pt", "lora_adapter_metadata": json.dumps(config, indent=2, sort_keys=True)}
    save_file({f"transformer.{k}": v for k, v in state.items()}, os.path.join(directory, LORA_WEIGHT_NAME), header)


def _adapter_config(transformer: nn.Module):
    configs = getattr(transformer, "peft_config", None) or {}
    if "default" in configs:
        return configs["default"]
    if len(configs) == 1:
        return next(iter(configs.values()))
    raise ValueError("the transformer has no single LoRA adapter to save (call add_lora first)")


def save_lora(transformer: nn.Module, path: str | os.PathLike, *, dtype: torch.dtype | None = None) -> str:
    """Write the LoRA to directory ``path`` in diffusers' format; returns the file written.

    ``StableDiffusion3Pipeline.load_lora_weights(path)`` (``FluxPipeline`` for FLUX, ``Flux2Pipeline`` /
    ``Flux2KleinPipeline`` for FLUX.2) loads it unchanged; for DiT (SiT) the same layout is written directly.
    ``dtype``: cast the saved tensors (default: keep the trainable dtype, fp32).
    """
    from peft.utils import get_peft_model_state_dict

    if not has_lora(transformer):
        raise ValueError("the transformer has no LoRA adapter (call add_lora first)")
    config = _adapter_config(transformer)
    state = get_peft_model_state_dict(transformer)
    state = {k: (v.detach().to(dtype) if dtype is not None else v.detach()).contiguous() for k, v in state.items()}
    metadata = config.to_dict()
    metadata["target_modules"] = sorted(metadata["target_modules"])  # a set in peft: not JSON-serialisable
    pipeline = _pipeline_class(transformer)
    if pipeline is None:
        _write_lora_file(os.fspath(path), state, json.loads(json.dumps(metadata, default=_jsonable)))
    else:
        pipeline.save_lora_weights(
            os.fspath(path), transformer_lora_layers=state, transformer_lora_adapter_metadata=metadata
        )
    return os.path.join(os.fspath(path), LORA_WEIGHT_NAME)


def _jsonable(value: object) -> object:
    """LoraConfig.to_dict() may hold sets and enums."""
    if isinstance(value, set | frozenset):
        return sorted(value)
    return getattr(value, "value", str(value))


def load_lora(transformer: nn.Module, path: str | os.PathLike, *, strict: bool = True) -> list[nn.Parameter]:
    """Load a LoRA file written by `save_lora` (directory or file) into ``transformer``'s existing adapter
    (attach it with `add_lora` with the same rank/targets first); returns the trainable parameters.

    With ``strict`` every adapter parameter must be in the file and every file key must match.
    """
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    if not has_lora(transformer):
        raise ValueError("the transformer has no LoRA adapter to load into (call add_lora first)")
    file = os.path.join(path, LORA_WEIGHT_NAME) if os.path.isdir(path) else os.fspath(path)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no LoRA weights at {file}")
    raw = load_file(file)
    prefix = "transformer."
    state = {k[len(prefix) :]: v for k, v in raw.items() if k.startswith(prefix)}
    if not state:
        raise ValueError(f"{file} holds no 'transformer.*' LoRA keys")
    try:
        result = set_peft_model_state_dict(transformer, state)
    except RuntimeError as err:  # shape mismatch (another rank or targets)
        raise ValueError(f"LoRA file does not match the adapter (rank/targets differ?): {err}") from None
    if strict:
        missing = [k for k in result.missing_keys if "lora_" in k]
        unexpected = list(result.unexpected_keys)
        if missing or unexpected:
            raise ValueError(
                f"LoRA file does not match the adapter: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
    params = lora_parameters(transformer)
    for p in params:
        p.requires_grad_(True)
    return params

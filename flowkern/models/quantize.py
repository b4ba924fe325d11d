"""Weight-only quantized frozen base weights (torchao): int8 or fp8 storage under a bf16/fp32 LoRA (issue 17).

The base of a LoRA fine-tune is only read, so the weight W of each of its ``nn.Linear`` layers can be stored as
W ~ s * q with one scale per output row: ``int8`` (q in [-127, 127], torchao ``Int8WeightOnlyConfig``) or ``fp8``
(q in float8 e4m3, ``Float8WeightOnlyConfig``). The matmul dequantizes q to the activations' dtype (bf16), so
activations, the LoRA (fp32) and every gradient keep their precision; only the stored weight is rounded. ``bf16``
means no quantization.

- Which layers: every ``nn.Linear`` of the transformer except peft's LoRA factors (``lora_A`` / ``lora_B``, they train
  in fp32). Embeddings, norms and biases keep the load dtype.
- What torchao produces: the same ``nn.Linear`` whose ``weight`` parameter is a tensor subclass (``Int8Tensor``,
  ``Float8Tensor``; ``torchao.utils.TorchAOBaseTensor``). peft (>= 0.21) wraps such a layer as ``TorchaoLoraLinear``,
  a ``lora.Linear`` with the same forward and state-dict keys (only ``merge()`` is missing, and flowkern never merges),
  so a LoRA trained on a quantized base is an ordinary diffusers LoRA file. Quantizing after ``add_lora`` quantizes
  each LoRA layer's ``base_layer`` instead; either order gives the same forward.
- One copy: ``base_velocity()`` (LoRA off) and VGG-Flow's value-net LoRA copy (`flowkern.models.value_net`) read the
  same quantized tensors.
- Gradients: torchao's linear has an autograd backward with respect to its input (dL/dx = dL/dy dequant(W)) and a
  forward-mode rule, so the lean adjoint, truncated backprop and 'exact' consistency's JVP run through it.
  `check_jvp` probes the JVP once, so a torchao without it fails with one line suggesting ``--consistency fd``.
- fp8 on a CUDA GPU without fp8 matmul (before sm_89): weight-only fp8 does not use an fp8 matmul; torchao dequantizes
  the weight to the activations' dtype and runs a bf16 matmul, so the memory saving holds and there is no speed-up.
  `check_fp8` probes one small layer on the device, so a torch / device that cannot hold or convert float8 fails
  with one line suggesting int8.

`quantized_weight_bytes(module, base_precision)` predicts the frozen weights' bytes from shapes alone (meta modules
work), the hook the memory planner calls; `weight_bytes(module)` measures what is stored.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterator

import torch
from torch import nn

__all__ = [
    "BASE_PRECISIONS",
    "base_precision_of",
    "check_base_precision",
    "check_fp8",
    "check_jvp",
    "quantize_base",
    "quantized_layers",
    "quantized_weight_bytes",
    "weight_bytes",
]

BASE_PRECISIONS = ("bf16", "int8", "fp8")
# bytes per output row besides the quantized values: torchao 0.18's per-row fp32 scale (+ int8 zero point for int8)
_ROW_OVERHEAD = {"int8": 4 + 1, "fp8": 4}
_INSTALL_HINT = "pip install 'flowkern[quant]' (torchao>=0.18)"


def check_base_precision(value: object) -> str:
    """``value`` must be one of `BASE_PRECISIONS`; ValueError (one line) otherwise."""
    if value not in BASE_PRECISIONS:
        raise ValueError(f"base_precision must be one of {', '.join(BASE_PRECISIONS)}, got {value!r}")
    return str(value)


@functools.cache
def _torchao():
    """``torchao.quantization``; ValueError (one line, how to install it) when torchao is missing. The import's log
    lines (optional CUDA kernels a CPU wheel cannot load, a torch deprecation notice) are dropped by the filters
    ``flowkern/__init__.py`` installs (``flowkern._import_noise``)."""
    try:
        from torchao import quantization
    except ImportError as err:
        raise ValueError(f"an int8/fp8 base needs torchao, which is not importable ({err}): {_INSTALL_HINT}") from None
    return quantization


def _is_quantized(weight: object) -> bool:
    if "torchao" not in sys.modules:  # nothing is quantized before torchao is imported (and importing it is slow)
        return False
    from torchao.utils import TorchAOBaseTensor

    return isinstance(weight, TorchAOBaseTensor)


def _is_base_linear(module: nn.Module, name: str) -> bool:
    """A frozen linear of the base: an ``nn.Linear`` that is not a LoRA factor."""
    return isinstance(module, nn.Linear) and "lora_" not in name


def _base_linears(module: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    return ((name, sub) for name, sub in module.named_modules() if _is_base_linear(sub, name))


def quantized_layers(module: nn.Module) -> list[nn.Linear]:
    """The linears of ``module`` whose weight is a torchao quantized tensor."""
    return [sub for _, sub in _base_linears(module) if _is_quantized(sub.weight)]


def base_precision_of(module: nn.Module) -> str:
    """'int8' / 'fp8' when ``module``'s base linears are quantized, else the dtype name of its first frozen weight."""
    for layer in quantized_layers(module):
        return "fp8" if type(layer.weight).__name__.startswith("Float8") else "int8"
    for name, p in module.named_parameters():
        if "lora_" not in name:
            return str(p.dtype).removeprefix("torch.").replace("bfloat16", "bf16").replace("float32", "fp32")
    return "none"


def _config(precision: str):
    q = _torchao()
    if precision == "int8":
        return q.Int8WeightOnlyConfig(set_inductor_config=False)  # per-row scale (the default granularity)
    return q.Float8WeightOnlyConfig(set_inductor_config=False)


def check_fp8(device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16) -> None:
    """ValueError (one line) unless an fp8 weight-only linear runs forward on ``device`` (a 16x16 probe)."""
    _torchao()
    if not hasattr(torch, "float8_e4m3fn"):
        raise ValueError(f"an fp8 base needs torch with float8_e4m3fn (this is torch {torch.__version__}): use int8")
    try:
        layer = nn.Linear(16, 16, bias=False, device=device, dtype=dtype)
        _torchao().quantize_(layer, _config("fp8"))
        with torch.no_grad():
            layer(torch.ones(1, 16, device=device, dtype=dtype))
    except Exception as err:  # whatever torch/torchao raise for a device or dtype they cannot serve
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"an fp8 base is not supported on {device} here ({first}): use base precision int8") from None


def quantize_base(module: nn.Module, base_precision: str) -> int:
    """Quantize every frozen base linear of ``module`` (a diffusers transformer) weight-only, in place; returns how
    many layers were quantized (0 for 'bf16'). LoRA factors are left alone; a quantized base is refused."""
    precision = check_base_precision(base_precision)
    if precision == "bf16":
        return 0
    if quantized_layers(module):
        raise ValueError(f"the base is already quantized ({base_precision_of(module)}); load it again for {precision}")
    weights = [sub.weight for _, sub in _base_linears(module)]
    if not weights:
        raise ValueError(f"{type(module).__name__} has no nn.Linear layers to quantize")
    if any(w.requires_grad for w in weights):
        raise ValueError("quantize_base quantizes frozen weights only: a base linear weight requires grad")
    if precision == "fp8":
        check_fp8(weights[0].device, weights[0].dtype)
    _torchao().quantize_(module, _config(precision), filter_fn=_is_base_linear)
    return len(weights)


def _linear_jvp(layer: nn.Linear) -> None:
    """One forward-mode JVP through ``layer`` (raises where torchao has no rule)."""
    x = torch.ones(1, layer.in_features, device=layer.weight.device, dtype=layer.weight.dtype)
    torch.func.jvp(layer, (x,), (x,))


def check_jvp(module: nn.Module) -> None:
    """ValueError (one line suggesting ``--consistency fd``) if a JVP cannot pass ``module``'s quantized linears."""
    layers = quantized_layers(module)
    if not layers:
        return
    try:
        with torch.no_grad():
            _linear_jvp(layers[0])
    except Exception as err:  # NotImplementedError / RuntimeError from the tensor subclass's dispatch
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"'exact' consistency needs a JVP through the {base_precision_of(module)} base's linears, which torchao "
            f"does not provide here ({first}): use --consistency fd"
        ) from None


def _stored_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds; a tensor subclass counts its inner tensors (quantized values, scales)."""
    if _is_quantized(t):
        names, _ = t.__tensor_flatten__()
        return sum(_stored_bytes(getattr(t, n)) for n in names if isinstance(getattr(t, n), torch.Tensor))
    return t.numel() * t.element_size()


def weight_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s frozen (non-LoRA) parameters as stored (quantized weights: values + scales)."""
    return sum(_stored_bytes(p) for name, p in module.named_parameters() if "lora_" not in name)


def quantized_weight_bytes(module: nn.Module, base_precision: str, dtype: torch.dtype = torch.bfloat16) -> int:
    """Predicted bytes of ``module``'s frozen (non-LoRA) parameters with base linears in ``base_precision`` and every
    other frozen parameter in ``dtype``, from shapes only (meta modules work; ``module`` is not changed).

    int8: out x in int8 values + per row an fp32 scale and an int8 zero point; fp8: out x in float8 values + per row
    an fp32 scale (torchao 0.18's layouts, checked against `weight_bytes` in tests); bf16: no quantization.
    """
    precision = check_base_precision(base_precision)
    quantized = {id(sub.weight) for _, sub in _base_linears(module)} if precision != "bf16" else set()
    total = 0
    for name, p in module.named_parameters():
        if "lora_" in name:
            continue
        if id(p) in quantized:
            out_features, in_features = p.shape
            total += out_features * in_features + out_features * _ROW_OVERHEAD[precision]
        else:
            total += p.numel() * dtype.itemsize
    return total

"""Input validation and coefficient normalisation shared by every op's public function.

Rules (math.md section 8): tensors fp32/bf16/fp16 (fp64 accepted for gradcheck), mixed allowed;
per-sample coefficients are Python numbers, 0-dim tensors or [B] tensors (`coefficient`: a Python number reaches the
kernels as a scalar, a tensor as it is); hyperparameters are finite Python floats. Errors name the offending argument.
These checks are cheap (no tensor is read); the native ops check the values of coefficient tensors in C++.
"""

from __future__ import annotations

import math
import numbers
import re

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
ETA_MODES = {"quad": 0, "linear": 1, "constant": 2}


def check_tensor(name: str, x: object, like: torch.Tensor | None = None, like_name: str = "") -> torch.Tensor:
    """``x`` must be a floating tensor; with ``like``, of the same shape and device."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
    if like is not None:
        if x.device != like.device:
            raise ValueError(f"{name} is on {x.device} but {like_name} is on {like.device}; move both to one device")
        if x.shape != like.shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)} but {like_name} has shape {tuple(like.shape)}")
    elif x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"{name} must have a non-empty batch dimension, got shape {tuple(x.shape)}")
    return x


NATIVE = ("cpp", "cuda")  # backends whose C++ entry (op.cpp) checks every argument itself


def device_of(name: str, x: object) -> torch.device:
    """The primary input's device (for the backend choice); a TypeError naming it if it is not a tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x.device


def check_tensors(primary: torch.Tensor, primary_name: str, **others: object) -> None:
    """`primary` a floating [B, ...] tensor, B > 0; each other one (None allowed) floating, of its shape and device.

    For the Python backends: the native ops make these checks in C++ (op.cpp, and the device check of their autograd
    kernel), with the same errors.
    """
    check_tensor(primary_name, primary)
    shape, device = primary.shape, primary.device
    for name, x in others.items():
        if x is None:
            continue
        if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES or x.shape != shape or x.device != device:
            check_tensor(name, x, primary, primary_name)  # raises the error naming it


def native_coefficients(*values: object) -> list:
    """Per-sample coefficients for a native op, flattened: (tensor, 0.0) for a tensor, (None, 0.0) for None (unused),
    (None, value) otherwise. C++ checks them (a value of the wrong Python type fails the binding of `<name>_value`:
    raise_type_error names it). On every eager call: a list, and `type(...) is` before isinstance (half the time)."""
    out: list = []
    for value in values:
        if value is None:
            out += (None, 0.0)
        elif type(value) is torch.Tensor or isinstance(value, torch.Tensor):
            out += (value, 0.0)
        else:
            out += (None, value)
    return out


_BINDING_ERROR = re.compile(r"Expected a value of type '([^']+)' for argument '(\w+)' but instead found type '(\w+)'")


def raise_type_error(error: RuntimeError) -> None:
    """torch's argument binding error of a native op (a Python value of the wrong type) as a TypeError naming the
    argument (a coefficient's `<name>_value` as <name>); returns for any other error (the caller re-raises it)."""
    match = _BINDING_ERROR.search(str(error))
    if match is None:
        return
    expected, name, found = match.groups()
    if name.endswith("_value"):
        name, expected = name[: -len("_value")], "float, a 0-dim tensor or a [B] tensor"
    raise TypeError(f"{name} must be a {expected.replace('Tensor?', 'Tensor or None')}, got {found}") from None


def coefficient(
    name: str, value: object, primary: torch.Tensor, *, positive: bool = False
) -> tuple[torch.Tensor | None, float]:
    """A per-sample coefficient as (tensor, 0.0) for a 0-dim or [B] tensor, or (None, value) for a Python number,
    checked (dtype, device, shape, values on CPU) for the Python backends."""
    if type(value) is float and math.isfinite(value) and (value > 0 or not positive):
        return None, value
    if isinstance(value, torch.Tensor):
        _check_coefficient_tensor(name, value, primary, positive)
        return value, 0.0
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, a 0-dim tensor or a [B] tensor, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return None, value


def _check_coefficient_tensor(name: str, value: torch.Tensor, primary: torch.Tensor, positive: bool) -> None:
    if not (value.dtype.is_floating_point or value.dtype in (torch.int32, torch.int64, torch.bool)):
        raise TypeError(f"{name} must be a floating tensor, got {value.dtype}")
    if value.device != primary.device:
        raise ValueError(f"{name} is on {value.device} but the inputs are on {primary.device}")
    if value.dim() != 0 and value.shape != primary.shape[:1]:
        raise ValueError(f"{name} must be a scalar or have shape [B]=[{primary.shape[0]}], got {tuple(value.shape)}")
    # data-dependent: CPU eager only (a GPU sync or a graph break otherwise)
    if value.device.type != "cpu" or torch.compiler.is_compiling():
        return
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and not bool((value > 0).all()):
        raise ValueError(f"{name} must be > 0 for every sample, got {value}")


def coef_dtype(primary: torch.Tensor) -> torch.dtype:
    return torch.float64 if primary.dtype == torch.float64 else torch.float32


def check_float(
    name: str, value: object, *, positive: bool = False, minimum: float | None = None, finite: bool = True
) -> float:
    """A Python float hyperparameter: finite (or +inf when not `finite`), optionally > 0 or > minimum."""
    if (
        type(value) is float
        and math.isfinite(value)
        and (value > 0 or not positive)
        and (minimum is None or value > minimum)
    ):
        return value  # the common case, without the ABC checks below (~0.3 us)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value) or (finite and math.isinf(value)):
        raise ValueError(f"{name} must be {'finite' if finite else 'a number'}, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if minimum is not None and value <= minimum:
        raise ValueError(f"{name} must be > {minimum}, got {value}")
    return value


def eta_code(eta_mode: object) -> int:
    if eta_mode not in ETA_MODES:
        raise ValueError(f"eta_mode must be one of {sorted(ETA_MODES)}, got {eta_mode!r}")
    return ETA_MODES[eta_mode]  # type: ignore[index]


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value  # type: ignore[return-value]


def loss_dtype(primary: torch.Tensor) -> torch.dtype:
    """Losses and norms are fp32 (fp64 when the primary input is fp64, for gradcheck)."""
    return coef_dtype(primary)


def common_compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """One dtype for kernels that take a single element type: the shared dtype, else fp32/fp64."""
    dtypes = {t.dtype for t in tensors if t is not None}
    if len(dtypes) == 1:
        return dtypes.pop()
    return torch.float64 if torch.float64 in dtypes else torch.float32

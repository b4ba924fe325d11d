"""The one registry of methods: name -> class, a one-line summary, the run settings it reads, and how a run's
settings become its constructor's arguments. The CLI (``flowkern train``, ``flowkern demo``), the app layer and the
benchmarks build methods here; the settings a method does not read are refused by the app (``reads``).

Defaults live in one place each: a method's own in its constructor (with the reason in its docstring and in
docs/usage.md, "Defaults"), and :class:`MethodSettings` takes its defaults from those signatures. The two things a
run decides that a constructor cannot know are marked where they are set: beta for the model kind (the app) and
ReFL's window of last steps from the grid (:func:`build_method`).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

import torch

from flowkern.methods._common import REWARD_HVP_MODES, Reward, Velocity
from flowkern.methods.adjoint_matching import AdjointMatching
from flowkern.methods.base import Method
from flowkern.methods.draft import DRaFT
from flowkern.methods.refl import ReFL
from flowkern.methods.vggflow import SmallValueNet, VGGFlow

__all__ = ["METHODS", "MethodEntry", "MethodSettings", "build_method"]


def _default(cls: type, argument: str) -> Any:
    """The default of ``cls.__init__``'s keyword ``argument`` (the one definition of that default)."""
    return inspect.signature(cls.__init__).parameters[argument].default


@dataclass(frozen=True)
class MethodEntry:
    """A registered method: its class, a one-line summary (``flowkern train --help``) and the :class:`MethodSettings`
    fields (plus ``value_lr``, the value net's learning rate) that act for it."""

    name: str
    cls: type
    summary: str
    reads: tuple[str, ...]


METHODS: dict[str, MethodEntry] = {
    entry.name: entry
    for entry in (
        MethodEntry(
            "vggflow",
            VGGFlow,
            "VGG-Flow: value-gradient matching with a learned value net (M6-M22)",
            ("beta", "lam", "eta", "alpha", "subsample", "consistency", "reward_hvp", "value_lr", "micro_batch"),
        ),
        MethodEntry(
            "dam",
            AdjointMatching,
            "deterministic adjoint matching, truncated to the last K steps (M24-M28)",
            ("beta", "lam", "K", "p", "micro_batch"),
        ),
        MethodEntry(
            "am",
            AdjointMatching,
            "memoryless adjoint matching, the stochastic baseline (M29-M33)",
            ("beta", "lam", "micro_batch"),
        ),
        MethodEntry(
            "refl", ReFL, "ReFL: reward of the one-step prediction from a late step, no regulariser (M34)", ("K",)
        ),
        MethodEntry(
            "draft", DRaFT, "DRaFT-K: backprop through the last K sampling steps, no regulariser (M35)", ("K",)
        ),
    )  # fmt: skip
}


@dataclass
class MethodSettings:
    """A run's method settings (the ``flowkern train`` flags of the same names); each method reads its own
    (:attr:`MethodEntry.reads`). None means the method's default.

    beta = 1/lam (VGG-Flow M10, DAM/AM M26/M32); K: DAM's trained steps / DRaFT's backprop steps / ReFL's last
    steps; p: DAM's cost power (M26); eta: VGG-Flow's eta_t (M15); alpha: VGG-Flow's boundary weight (M17);
    subsample: VGG-Flow's transition fraction f (M22); consistency: VGG-Flow's 'fd' (M20) or 'exact' (M21), None
    picks 'exact' for non-fp32 weights (a bf16 network rounds away the finite-difference step, M20) and 'fd'
    otherwise; reward_hvp: 'exact' consistency's Hessian-vector product, 'autograd' (double backward) or 'central'
    (central difference of reward gradients), None: 'autograd' (``flowkern.app.build`` picks 'central' for the
    pipelines); value_hidden, value_depth: the 'small' value net (its own defaults); micro_batch: samples per network
    call with grad, per VJP and per reward gradient in VGG-Flow, DAM and AM.

    The defaults of p, eta, alpha and subsample are the constructors' (one definition each). They are checked by
    :meth:`check` with the messages the CLI prints (flag names); the constructors check them again for Python
    callers.
    """

    beta: float | None = None
    lam: float | None = None
    K: int | None = None
    p: float = _default(AdjointMatching, "p")
    eta: str = _default(VGGFlow, "eta_mode")
    alpha: float = _default(VGGFlow, "alpha")
    subsample: float | None = _default(VGGFlow, "subsample_fraction")
    consistency: str | None = None
    reward_hvp: str | None = None
    value_hidden: int | None = None
    value_depth: int | None = None
    micro_batch: int | None = None
    offload_trajectory: bool = False  # every method: the rollout's states in pinned CPU memory (MethodBase)

    def check(self, num_steps: int) -> None:
        """ValueError naming the ``flowkern train`` flag, before any model is loaded."""
        if self.beta is not None and self.lam is not None:
            raise ValueError("pass one of --beta and --lam (beta = 1/lam), not both")
        for name in ("beta", "lam", "alpha"):
            value = getattr(self, name)
            if value is not None and not (_number(value) and math.isfinite(value) and value > 0):
                raise ValueError(f"--{name} must be a finite number > 0, got {value!r}")
        if self.K is not None and not (_integer(self.K) and 1 <= self.K <= num_steps):
            raise ValueError(f"--K must be an int in [1, {num_steps}] (the number of sampling steps), got {self.K!r}")
        if not (_number(self.p) and math.isfinite(self.p) and self.p > 1):
            raise ValueError(f"--p must be a finite number > 1 (a strictly convex cost, M26), got {self.p!r}")
        if self.eta not in ("quad", "linear", "constant"):
            raise ValueError(f"--eta must be 'quad', 'linear' or 'constant', got {self.eta!r}")
        if self.consistency not in (None, "fd", "exact"):
            raise ValueError(f"--consistency must be 'fd' or 'exact', got {self.consistency!r}")
        if self.reward_hvp not in (None, *REWARD_HVP_MODES):
            raise ValueError(f"--reward-hvp must be 'autograd' or 'central', got {self.reward_hvp!r}")
        if self.subsample is not None and not (_number(self.subsample) and 0 < self.subsample <= 1):
            raise ValueError(f"--subsample must be in (0, 1], got {self.subsample!r}")
        for name in ("micro_batch", "value_hidden", "value_depth"):
            value = getattr(self, name)
            if value is not None and not (_integer(value) and value >= 1):
                raise ValueError(f"--{name.replace('_', '-')} must be an int >= 1, got {value!r}")
        if not isinstance(self.offload_trajectory, bool):
            raise ValueError(f"--offload-trajectory must be True or False, got {self.offload_trajectory!r}")

    def beta_value(self, default: float) -> float:
        if self.beta is not None:
            return float(self.beta)
        if self.lam is not None:
            return 1.0 / float(self.lam)
        return default


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def build_method(
    name: str,
    velocity: Velocity,
    base_velocity: Velocity,
    reward: Reward,
    settings: MethodSettings | None = None,
    *,
    num_steps: int,
    sample_shape: tuple[int, ...],
    num_classes: int | None = None,
    default_beta: float = 1.0,
    weights_dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
    **overrides: Any,
) -> Method:
    """The method ``name`` of :data:`METHODS` for a run on an N = ``num_steps`` grid.

    ``settings`` (checked here) become constructor arguments; ``overrides`` are passed to the constructor last
    (e.g. ``clip=False``, ``value_net=...``, ``generator=...``: the benchmarks' variants). The method's generator
    is seeded with ``seed + 17`` and the 'small' value net initialised under ``seed + 11``, so a run is reproducible
    from its seed. beta: ``settings.beta`` / ``1 / settings.lam``, else ``default_beta`` (the app's per-model-kind
    value). K when not set: DAM ceil(N/4) (its constructor, M28), ReFL the last max(1, N // 4) steps (M34's last 5 of
    20), DRaFT 1 (its constructor, M35); memoryless AM trains the last max(1, N // 4) steps plus as many drawn from
    the others (its constructor, M33's 10 + 10 of 40).
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    settings = settings or MethodSettings()
    settings.check(num_steps)
    args: dict[str, Any] = {"generator": torch.Generator().manual_seed(seed + 17)}
    if name in ("vggflow", "dam", "am"):
        args.update(beta=settings.beta_value(default_beta), micro_batch=settings.micro_batch)
    if name == "vggflow":
        if "value_net" not in overrides:
            sizes = {k: v for k, v in (("hidden", settings.value_hidden), ("depth", settings.value_depth)) if v}
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + 11)
                args["value_net"] = SmallValueNet(sample_shape, num_classes=num_classes, **sizes).to(device)
        consistency = settings.consistency or ("exact" if weights_dtype != torch.float32 else "fd")
        args.update(eta_mode=settings.eta, alpha=settings.alpha, subsample_fraction=settings.subsample,
                    consistency=consistency, reward_hvp=settings.reward_hvp or "autograd")  # fmt: skip
        return VGGFlow(velocity, base_velocity, reward, **{**args, **overrides})
    if name == "dam":
        del args["generator"]  # deterministic
        args.update(K=settings.K, p=settings.p)
        return AdjointMatching(velocity, base_velocity, reward, **{**args, **overrides})
    if name == "am":
        return AdjointMatching(velocity, base_velocity, reward, kind="memoryless", **{**args, **overrides})
    if name == "refl":
        args["last_steps"] = settings.K or max(1, num_steps // 4)
        return ReFL(velocity, reward, **{**args, **overrides})
    if settings.K is not None:
        args["K"] = settings.K
    return DRaFT(velocity, reward, **{**args, **overrides})

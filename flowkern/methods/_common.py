"""Shared helpers of the methods (layer L4): argument checks, reward evaluation, batch gathering.

Methods take callables and tensors, never a model (design.md section 1):

- ``velocity(x, t, cond)``: the fine-tuned CFG-combined velocity v_theta in paper time (M1, M5), with the
  parameter path of the unconditional branch detached (``detach_uncond=True``) for training forwards;
- ``base_velocity(x, t, cond)``: the frozen base v_base;
- ``reward(x) -> [B]``: the differentiable reward r(x) (decode + reward model, fp32).

``t`` is a [B] fp32 tensor. :func:`flow_callables` builds the first two from any object with the
``FlowModel`` shape (``velocity``, ``base_velocity()``) by duck typing.

Micro-batches: a method's ``micro_batch`` bounds how many samples (transitions, trajectories) one network call
with grad, one VJP or one reward gradient sees. A loss over many transitions is then a sum of micro-batch terms,
each backpropagated as soon as it is built (:class:`MicroBatchGradients`): one micro-batch's graph is alive at a
time, and ``loss.backward()`` applies the summed gradients (scaled, for gradient accumulation).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import numbers
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

from flowkern.adjoint import graph_leaves, terminal_reward_grad
from flowkern.methods.base import MethodBase
from flowkern.ops import _validate as V
from flowkern.sampling import fetch as fetch  # the methods fetch offloaded states back (C.fetch)
from flowkern.sampling import sample_euler, validate_grid

log = logging.getLogger("flowkern.methods")

Velocity = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
Reward = Callable[[torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------- arguments
def check_positive(name: str, value: object) -> float:
    """A finite float > 0 (beta, lambda, alpha, eps, ...); TypeError/ValueError naming ``name``."""
    return V.check_float(name, value, positive=True)


def check_int(name: str, value: object, minimum: int = 1, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if value < minimum or (maximum is not None and value > maximum):
        upper = "" if maximum is None else f" and <= {maximum}"
        raise ValueError(f"{name} must be >= {minimum}{upper}, got {value}")
    return value


def check_micro_batch(value: object) -> int | None:
    """``micro_batch``: None (everything in one call) or an int >= 1 (samples per call)."""
    return None if value is None else check_int("micro_batch", value)


def micro_batches(n: int, size: int | None) -> list[tuple[int, int]]:
    """[(start, stop)] covering 0..n in runs of ``size`` (one run when ``size`` is None)."""
    step = n if size is None else max(1, size)
    return [(lo, min(lo + step, n)) for lo in range(0, n, step)] or [(0, 0)]


def check_callable(name: str, value: object) -> Callable:
    if not callable(value):
        raise TypeError(f"{name} must be callable, got {type(value).__name__}")
    return value  # type: ignore[return-value]


def check_time_grid(ts: object) -> torch.Tensor:
    """ts: one shared grid 0 = t_0 < ... < t_N = 1 (M2), checked by ``flowkern.sampling.validate_grid``; fp64 [N+1]."""
    grid = validate_grid(ts)
    if grid.dim() != 1:
        raise ValueError(f"ts must be one shared grid [N+1] for the methods, got shape {tuple(grid.shape)}")
    return grid


# ---------------------------------------------------------------- FlowModel adapter (duck typing)
def flow_callables(model: Any, *, detach_uncond: bool = True) -> tuple[Velocity, Velocity]:
    """(velocity, base_velocity) callables for any object shaped like ``FlowModel`` (models/base.py).

    ``velocity`` detaches the parameter path of the unconditional CFG branch (M5) when
    ``detach_uncond``; ``base_velocity`` evaluates the model inside its ``base_velocity()`` context.
    """
    for attr in ("velocity", "base_velocity"):
        if not callable(getattr(model, attr, None)):
            raise TypeError(f"model must provide {attr}() (the FlowModel protocol), got {type(model).__name__}")

    def velocity(x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        return model.velocity(x, t, cond, detach_uncond=detach_uncond)

    def base_velocity(x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        with model.base_velocity():
            return model.velocity(x, t, cond)

    return velocity, base_velocity


# ---------------------------------------------------------------- reward
def check_reward_output(r: object, x: torch.Tensor, name: str = "reward") -> torch.Tensor:
    """The reward must return a floating [B] tensor (values may be non-finite: the trainer skips those)."""
    if not isinstance(r, torch.Tensor):
        raise TypeError(f"{name}(x) must return a torch.Tensor of shape [B], got {type(r).__name__}")
    if not r.dtype.is_floating_point:
        raise TypeError(f"{name}(x) must return a floating tensor, got {r.dtype}")
    if tuple(r.shape) != (x.shape[0],):
        raise ValueError(
            f"{name}(x) must return shape [B]=[{x.shape[0]}] (one reward per sample), got {tuple(r.shape)}"
        )
    return r


def evaluate_reward(
    reward: Reward, x: torch.Tensor, name: str = "reward", micro_batch: int | None = None
) -> torch.Tensor:
    """r(x) as fp32 [B], shape-checked (M7: reward in fp32), ``micro_batch`` samples per call."""
    chunks = micro_batches(x.shape[0], micro_batch)
    parts = [check_reward_output(reward(x[lo:hi]), x[lo:hi], name) for lo, hi in chunks]
    return (parts[0] if len(parts) == 1 else torch.cat(parts)).to(acc_dtype(x))


def reward_and_grad(
    reward: Reward, y: torch.Tensor, name: str = "reward", micro_batch: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(r(y) [B], grad_y r(y)) in fp32 (fp64 for fp64 y) via ``flowkern.adjoint.terminal_reward_grad`` (M7),
    ``micro_batch`` samples per decode + backward.

    Only y gets a gradient (frozen reward parameters get no ``.grad``).

    The reward is per sample, so the gradient of the sum is the per-sample gradient.
    """
    checked = lambda image: check_reward_output(reward(image), image, name)
    acc = acc_dtype(y)
    rs, gs = [], []
    for lo, hi in micro_batches(y.shape[0], micro_batch):
        g, r = terminal_reward_grad(y[lo:hi].detach().to(acc), None, checked)
        rs.append(r.to(acc))
        gs.append(g.to(acc))
    return (rs[0], gs[0]) if len(rs) == 1 else (torch.cat(rs), torch.cat(gs))


REWARD_HVP_MODES = ("autograd", "central")


def reward_grad_and_hvp(
    reward: Reward, y: torch.Tensor, v: torch.Tensor, mode: str = "autograd"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad r(y), H(y) v) per sample, H the Hessian of r (M21's derivative of grad r along v: the Jacobian of a
    gradient is the symmetric Hessian, so J v = H v = grad_y <grad r(y), v>).

    ``mode`` 'autograd': double backward, exact. Reverse-over-reverse runs through any differentiable decoder
    (forward-mode AD fails in group_norm); attention (a VAE's mid block) runs SDPA's math kernel, the one whose
    backward is differentiable. The first backward's graph (create_graph) keeps every recomputed activation of a
    checkpointed decoder alive: at 1024 px the peak of an SD3 VAE decode (see docs/math.md, M21).

    ``mode`` 'central': H v ~ (grad r(y + e v) - grad r(y - e v)) / (2 e), O(e^2) error, three ordinary reward
    gradients (``reward_and_grad``: fp32, the decoder's per-layer checkpointing). e per sample is
    ``hvp_step`` relative to |y| / |v|.

    A reward whose gradient does not depend on y (linear in the pixels, e.g. redness through a linear decoder) has
    H = 0: its gradient carries no graph back to y, and the HVP is zeros. A reward that does not depend on y at all
    is a ValueError, as in ``terminal_reward_grad``."""
    if mode == "central":
        return _reward_grad_and_hvp_central(reward, y, v)
    if mode != "autograd":
        raise ValueError(f"reward_hvp must be one of {REWARD_HVP_MODES}, got {mode!r}")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    yy = y.detach().requires_grad_(True)
    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
        r = check_reward_output(reward(yy), yy)
        if not r.requires_grad:
            raise ValueError("reward(x) does not depend differentiably on x")
        (g,) = torch.autograd.grad(r.sum(), yy, create_graph=True)
        if not g.requires_grad:  # grad r is constant in y: H = 0
            return g.detach(), torch.zeros_like(g)
        # materialize_grads: a gradient that has a graph (e.g. through reward parameters) but none back to y -> 0
        (hv,) = torch.autograd.grad(g, yy, grad_outputs=v.to(g.dtype), materialize_grads=True)
    return g.detach(), hv


def hvp_step(y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The central difference's step e_b = u^(1/3) |y_b| / |v_b| ([B], u the unit roundoff of the fp32/fp64
    accumulation dtype; 1 where |y_b| = 0).

    The shift e v has the norm u^(1/3) |y|: the step that balances a central difference's truncation error
    (~ e^2 |v|^2 |d^3 r|) against the rounding of the two gradients (~ u |grad r| / e), relative to the scale of
    y (latents of RMS ~1 in the pipelines); 4.9e-3 |y| in fp32, 6.1e-6 |y| in fp64."""
    acc = acc_dtype(y)
    rel = torch.finfo(acc).eps ** (1.0 / 3.0)
    y_norm = y.detach().to(acc).flatten(1).norm(dim=1)
    v_norm = v.detach().to(acc).flatten(1).norm(dim=1)
    scale = torch.where(y_norm > 0, y_norm, torch.ones_like(y_norm))
    return rel * scale / v_norm.clamp(min=torch.finfo(acc).tiny)


def _reward_grad_and_hvp_central(reward: Reward, y: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``reward_grad_and_hvp``'s 'central' mode: grad r(y) and (grad r(y + e v) - grad r(y - e v)) / (2 e)."""
    acc = acc_dtype(y)
    yy, vv = y.detach().to(acc), v.detach().to(acc)
    e = batch_column(hvp_step(yy, vv), yy)
    g = reward_and_grad(reward, yy)[1]
    g_plus = reward_and_grad(reward, yy + e * vv)[1]
    g_minus = reward_and_grad(reward, yy - e * vv)[1]
    hv = (g_plus - g_minus) / (2 * e)
    zero = batch_column(vv.flatten(1).norm(dim=1) == 0, yy)  # v_b = 0: H v = 0 exactly
    return g, torch.where(zero, torch.zeros_like(hv), hv)


# ---------------------------------------------------------------- batches
def gather_cond(cond: Any, index: torch.Tensor) -> Any:
    """cond rows ``index`` (tensors along dim 0; tuples, lists, dicts and dataclass fields recursively; None and
    others as is)."""
    if cond is None:
        return None
    if isinstance(cond, torch.Tensor):
        return cond if cond.dim() == 0 else cond[index.to(cond.device)]
    if isinstance(cond, Mapping):
        return type(cond)({k: gather_cond(v, index) for k, v in cond.items()})
    if isinstance(cond, tuple | list):
        return type(cond)(gather_cond(v, index) for v in cond)
    if dataclasses.is_dataclass(cond) and not isinstance(cond, type):  # adapter conditionings (SD3/FLUX/SiT)
        fields = {f.name: gather_cond(getattr(cond, f.name), index) for f in dataclasses.fields(cond) if f.init}
        return dataclasses.replace(cond, **fields)
    return cond


def unpack_batch(batch: Mapping) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """(states [N+1, B, ...], ts fp64 [N+1], cond) of a rollout batch {'states', 'ts', optional 'cond'}."""
    if not isinstance(batch, Mapping) or "states" not in batch or "ts" not in batch:
        raise TypeError("batch must be a mapping with 'states' (x_0..x_N) and 'ts' (the grid), e.g. from rollout()")
    states = stack_states(batch["states"])
    ts = check_time_grid(batch["ts"])
    if states.dim() < 2 or states.shape[0] != ts.numel():
        raise ValueError(
            f"states must be [N+1, B, ...] with N+1 = {ts.numel()} (one per grid time), got {tuple(states.shape)}"
        )
    return states, ts, batch.get("cond")


def stack_states(states: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """States x_0..x_N as one [N+1, B, ...] tensor."""
    if isinstance(states, torch.Tensor):
        return states
    return torch.stack(list(states))


def batch_column(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A [B] coefficient viewed as [B, 1, ...] against the [B, ...] tensor ``like`` (gradients flow through it,
    unlike the ops references' detached ``per_sample``)."""
    return coef.reshape((-1,) + (1,) * (like.dim() - 1))


def acc_dtype(x: torch.Tensor) -> torch.dtype:
    """Loss/difference dtype: fp32, or fp64 for fp64 inputs (tests with analytic fields)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def sq_norm_per_sample(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to(acc_dtype(x)).flatten(1).square().sum(1)


def no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off (M20: the network calls entering a finite difference run in fp32)."""
    return torch.autocast(device_type=device.type, enabled=False)


@contextlib.contextmanager
def query_chunked_attention(chunk: int) -> Iterator[None]:
    """Inside, ``F.scaled_dot_product_attention`` runs ``chunk`` query rows at a time (each row's softmax sees every
    key, so the result is the unchunked one, row by row): the L x L scores of SDPA's math kernel, which forward-mode
    AD needs (M21's JVPs), exist ``chunk`` rows at a time. Causal or dropout calls run unchunked.

    It replaces the module attribute (which diffusers' attention reads at each call, as the planner's GPU model of
    SDPA does, so a planned run sees the chunks) for the duration: one thread at a time."""
    chunk = check_int("chunk", chunk)
    functional = torch.nn.functional
    sdpa = functional.scaled_dot_product_attention

    def chunked(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        call = dict(dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
        if query.shape[-2] <= chunk or is_causal or dropout_p:
            return sdpa(query, key, value, attn_mask, **call)
        rows_mask = attn_mask is not None and attn_mask.dim() >= 2 and attn_mask.shape[-2] != 1  # per query row
        parts = []
        for lo in range(0, query.shape[-2], chunk):
            rows = slice(lo, lo + chunk)
            parts.append(
                sdpa(query[..., rows, :], key, value, attn_mask[..., rows, :] if rows_mask else attn_mask, **call)
            )
        return torch.cat(parts, dim=-2)

    functional.scaled_dot_product_attention = chunked
    try:
        yield
    finally:
        functional.scaled_dot_product_attention = sdpa


# ---------------------------------------------------------------- deferred backward
class _DeferredBackward(torch.autograd.Function):
    """A scalar loss whose backward runs ``backward_fn(scale)`` (e.g. the truncated adjoint of M23).

    Lets memory-lean methods (DRaFT) expose the same ``loss.backward()`` interface as autograd losses:
    the caller may scale the loss (gradient accumulation) and the scale reaches ``backward_fn``.
    """

    @staticmethod
    def forward(ctx, value, anchor, backward_fn):
        ctx.backward_fn = backward_fn
        return value.detach().clone()

    @staticmethod
    def backward(ctx, grad_output):
        ctx.backward_fn(grad_output.detach())
        return None, None, None


def deferred_loss(value: torch.Tensor, backward_fn: Callable[[torch.Tensor], None]) -> torch.Tensor:
    """A scalar equal to ``value`` whose ``.backward()`` calls ``backward_fn(grad_output)`` once."""
    anchor = torch.zeros((), dtype=value.dtype, device=value.device, requires_grad=True)
    return _DeferredBackward.apply(value.reshape(()), anchor, backward_fn)


class MicroBatchGradients:
    """The gradient of a loss that is a sum of micro-batch terms, each term backpropagated as soon as it is built
    (its graph freed before the next is built), exposed through the usual ``loss.backward()``.

    ``add(term)``: the gradients of ``term`` for every leaf its graph reaches (what its ``backward()`` would write)
    are summed into private buffers; returns ``term.detach()``. ``loss(value)``: a scalar equal to ``value`` whose
    ``backward()`` adds ``grad_output * buffers`` into the leaves' ``.grad`` (so ``(loss / A).backward()``
    accumulates, and a loss that is never backpropagated, e.g. a skipped non-finite update, leaves ``.grad`` as is).
    One term and grad_output 1 give the very tensors ``term.backward()`` would.
    """

    def __init__(self):
        self._grads: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def add(self, term: torch.Tensor) -> torch.Tensor:
        if term.requires_grad:
            leaves, hidden = graph_leaves(term)
            if hidden:
                raise ValueError(
                    "micro-batched losses need the graph's leaves: use non-reentrant gradient checkpointing "
                    "(torch.utils.checkpoint(..., use_reentrant=False), diffusers' default)"
                )
            grads = torch.autograd.grad(term, leaves, allow_unused=True)
            for leaf, g in zip(leaves, grads, strict=True):
                if g is not None:
                    entry = self._grads.get(id(leaf))
                    self._grads[id(leaf)] = (leaf, g if entry is None else entry[1] + g)
        return term.detach()

    def loss(self, value: torch.Tensor) -> torch.Tensor:
        return deferred_loss(value, self._apply)

    def _apply(self, scale: torch.Tensor) -> None:
        grads, self._grads = self._grads, {}
        unit = bool(scale == 1)
        for leaf, g in grads.values():
            g = g if unit else g * scale.to(g.dtype)
            g = g if g.is_contiguous() else g.contiguous()
            leaf.grad = g if leaf.grad is None else leaf.grad + g


class RewardFeedbackMethod(MethodBase):
    """Shared by the unregularised baselines ReFL (M34) and DRaFT (M35): a velocity and a reward, an
    on-policy Euler rollout (M2) without grad, no value network.

    ``relu=True`` (default, M34/M35 as published) maximises mean ReLU(r): samples with r <= 0 give no gradient, so a
    batch whose rewards are all <= 0 (e.g. ImageReward or redness on a bad start) learns nothing. That is logged (a
    warning the first time, ``relu_active`` = the fraction of samples with r > 0 in every update's metrics); pass
    ``relu=False`` for rewards that are often negative.
    """

    def __init__(self, velocity: Velocity, reward: Reward, *, relu: bool = True, generator=None):
        self.velocity = check_callable("velocity", velocity)
        self.reward = check_callable("reward", reward)
        self.relu = bool(relu)
        self.generator = generator
        self._warned_inactive = False

    def objective(self, r: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """(ReLU(r) or r per sample, metrics with ``relu_active``), warning when no sample has r > 0."""
        if not self.relu:
            return r, {}
        active = float((r.detach() > 0).float().mean())
        if active == 0.0 and bool(torch.isfinite(r).all()):
            level = logging.DEBUG if self._warned_inactive else logging.WARNING
            log.log(level, "%s: every reward of the batch is <= 0, so -ReLU(r) has zero gradient and this update "
                    "learns nothing (relu=True, M34/M35); use relu=False for rewards that are often negative",
                    type(self).__name__)  # fmt: skip
            self._warned_inactive = True
        return torch.relu(r), {"relu_active": active}

    def rollout(self, x0: torch.Tensor, ts: torch.Tensor, cond: Any = None, generator: torch.Generator | None = None):
        """Euler rollout (M2) without grad: {'states', 'ts', 'cond'}."""
        traj = sample_euler(self.velocity, x0, ts, cond, **self.trajectory_store())
        return {"states": traj.states, "ts": traj.ts, "cond": cond}

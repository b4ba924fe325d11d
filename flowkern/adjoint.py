"""The memory-lean truncated adjoint engine (layer L3): one reverse sweep over stored states that
recomputes one Euler step at a time, so only one step's activations are alive at any moment.

- `truncated_backprop` (M23, DRaFT-K): exact gradients of <terminal_grad, x_N> w.r.t. the velocity's
  parameters through the last K Euler steps (x_{N-K} held constant), accumulated into ``.grad``,
  bitwise equal to autograd through the unrolled steps (same operations, same order).
- `lean_adjoint` (M25, M31): the adjoint states of the frozen base velocity for the last K steps,
  one recomputed VJP per step (no parameter gradients), combined by `flowkern.ops.adjoint_step`.
- `terminal_reward_grad`: grad_x r(decode(x)) with optional checkpointing of decoder and reward.

Arguments shared by the engine:

- ``states``: x_0..x_N, a sequence of N+1 tensors [B, ...] or one stacked tensor [N+1, B, ...], in
  any dtype and on any device (e.g. pinned CPU memory); each step moves x_i to terminal_grad's
  device and passes it to the velocity in its stored dtype.
- ``ts``: the N+1 grid times, [N+1] (shared; the velocity gets a 0-dim t) or [N+1, B] (per sample;
  a [B] t); h_i = t_{i+1} - t_i is taken in fp64. t reaches the velocity in fp32 (fp64 for fp64 states).
- ``terminal_grad``: a_N = grad l(x_N) [B, ...] (``lean_adjoint``: a~_N, e.g. -grad r(x_N) (M25),
  or -grad r(x_hat_1) for the memoryless adjoint (M31)).
- ``K``: the number of final steps, 1 <= K <= N.

Adjoint states are fp32 (fp64 when states or terminal_grad are fp64), whatever the model's dtype;
the cotangent fed to the model is cast to its output dtype (bf16 models: M23 with fp32 accumulation).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

from flowkern import sampling
from flowkern.ops import adjoint_step

__all__ = ["graph_leaves", "lean_adjoint", "terminal_reward_grad", "truncated_backprop"]

KINDS = ("ode", "memoryless")


# ---------------------------------------------------------------- argument handling
class _Sweep:
    """Validated arguments of one reverse sweep: x_i, t_i, h_i on the compute device."""

    def __init__(self, states: object, ts: object, terminal_grad: object, K: object):
        if isinstance(states, torch.Tensor):
            if states.dim() < 2:
                raise ValueError(f"states must be stacked [N+1, B, ...], got shape {tuple(states.shape)}")
        elif isinstance(states, Sequence) and all(isinstance(s, torch.Tensor) for s in states):
            shapes = {tuple(s.shape) for s in states}
            if len(shapes) > 1:
                raise ValueError(f"states must all have one shape, got {sorted(shapes)}")
        else:
            raise TypeError("states must be a stacked tensor [N+1, B, ...] or a sequence of tensors x_0..x_N")
        self.states = states
        n = len(states) - 1
        if n < 1:
            raise ValueError(f"states must hold x_0..x_N with N >= 1, got {len(states)} state(s)")
        self.num_steps = n

        if isinstance(ts, torch.Tensor):
            grid = ts.detach().to(device="cpu", dtype=torch.float64)
        elif isinstance(ts, Sequence):
            grid = torch.tensor([float(t) for t in ts], dtype=torch.float64)
        else:
            raise TypeError(f"ts must be a tensor or a sequence of times, got {type(ts).__name__}")
        if grid.dim() not in (1, 2) or grid.shape[0] != n + 1:
            raise ValueError(
                f"ts must have N+1 = {n + 1} times (one per state, [N+1] or [N+1, B]), got shape {tuple(grid.shape)}"
            )
        if not bool(torch.isfinite(grid).all()):
            raise ValueError("ts must be finite")

        x_last = states[-1]
        if not isinstance(terminal_grad, torch.Tensor):
            raise TypeError(f"terminal_grad must be a tensor, got {type(terminal_grad).__name__}")
        if terminal_grad.shape != x_last.shape:
            raise ValueError(
                f"terminal_grad must have the state's shape {tuple(x_last.shape)}, got {tuple(terminal_grad.shape)}"
            )
        if not terminal_grad.dtype.is_floating_point:
            raise TypeError(f"terminal_grad must be a floating tensor, got {terminal_grad.dtype}")
        if grid.dim() == 2 and grid.shape[1] != x_last.shape[0]:
            raise ValueError(f"ts has per-sample shape {tuple(grid.shape)} but the batch is {x_last.shape[0]}")

        if isinstance(K, bool) or not isinstance(K, numbers.Integral):
            raise TypeError(f"K must be an int, got {type(K).__name__}")
        if not 1 <= K <= n:
            raise ValueError(f"K must satisfy 1 <= K <= N = {n}, got {K}")
        self.K = int(K)

        wide = torch.float64 in (x_last.dtype, terminal_grad.dtype)
        self.acc_dtype = torch.float64 if wide else torch.float32  # adjoint accumulation dtype
        self.device = terminal_grad.device
        self.grid = grid
        self.t = grid.to(device=self.device, dtype=self.acc_dtype)
        self.h = grid[1:] - grid[:-1]  # fp64 differences (M2)
        self.a_terminal = terminal_grad.detach().to(self.acc_dtype)

    def steps(self) -> range:
        """i = N-1 down to N-K (M23)."""
        return range(self.num_steps - 1, self.num_steps - self.K - 1, -1)

    def x(self, i: int) -> torch.Tensor:
        return sampling.fetch(self.states[i].detach(), self.device)

    def h_scalar(self, i: int, like: torch.Tensor) -> float | torch.Tensor:
        """h_i as a Python float (shared grid) or a broadcastable [B, 1, ...] tensor (per-sample grid)."""
        h = self.h[i]
        if h.dim() == 0:
            return float(h)
        return h.to(device=like.device, dtype=self.acc_dtype).view(-1, *([1] * (like.dim() - 1)))

    def h_coef(self, i: int) -> torch.Tensor:
        return self.h[i].to(device=self.device, dtype=self.acc_dtype)


def _check_output(v: object, x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(v, torch.Tensor) or v.shape != x.shape:
        shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
        raise ValueError(f"{name} must return a velocity of the state's shape {tuple(x.shape)}, got {shape}")
    return v


def graph_leaves(output: torch.Tensor) -> tuple[list[torch.Tensor], bool]:
    """(the leaves that require grad reached by ``output``'s autograd graph, in discovery order; whether a reentrant
    checkpoint hides some of them). The tensors a ``backward()`` of ``output`` would write ``.grad`` to."""
    stack, seen, leaves, found, hidden = [output.grad_fn], set(), [], set(), False
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad nodes hold their leaf
        if variable is not None and id(variable) not in found:
            found.add(id(variable))
            leaves.append(variable)
        if "CheckpointFunction" in node.name():  # reentrant checkpoint hides its parameters
            hidden = True
        stack.extend(next_node for next_node, _ in node.next_functions)
    return leaves, hidden


def _depends_on_other_leaves(output: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether ``output``'s autograd graph reaches a leaf that requires grad other than ``x`` (a reentrant
    checkpoint counts as one: assume its parameters are trainable)."""
    leaves, hidden = graph_leaves(output)
    return hidden or any(leaf is not x for leaf in leaves)


# ---------------------------------------------------------------- truncated discrete adjoint (M23)
def truncated_backprop(
    velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    states: Sequence[torch.Tensor] | torch.Tensor,
    ts: object,
    terminal_grad: torch.Tensor,
    K: int,
) -> torch.Tensor:
    """DRaFT-K gradients by recomputation (M23); returns the adjoint a_{N-K} (fp32, fp64 for fp64).

    For i = N-1 down to N-K: x~ = x_i.detach().requires_grad_(); v = velocity(x~, t_i);
    y = x~ + h_i v; backward(y, a_{i+1}); a_i = x~.grad; the step's graph is freed before the next.
    Parameters used by ``velocity`` receive (dv/dtheta)^T (h_i a_{i+1}) summed over the K steps in
    ``.grad`` (accumulated onto existing gradients, in autograd's order i = N-1 first), i.e. the
    gradient of <terminal_grad, x_N> with x_{N-K} held constant. When the model's output dtype
    differs from the adjoint dtype (bf16 models), the step is backward(v, h_i a_{i+1}) in the model
    dtype and a_i = a_{i+1} + x~.grad accumulates in fp32.

    ``velocity(x, t)``: any callable (nn.Module, a FlowModel's velocity with conditioning and CFG
    bound, detaching what it wants detached (M5)); it must be deterministic (no dropout: use .eval()).
    Raises ValueError if its output depends on no trainable tensor besides x.
    """
    sweep = _Sweep(states, ts, terminal_grad, K)
    a = sweep.a_terminal
    for step, i in enumerate(sweep.steps()):
        x = sweep.x(i).requires_grad_()
        with torch.enable_grad():
            v = _check_output(velocity(x, sweep.t[i]), x, "velocity")
            if step == 0 and (not v.requires_grad or not _depends_on_other_leaves(v, x)):
                raise ValueError(
                    "velocity has no trainable parameters: its output depends on no tensor that requires grad "
                    "besides x (enable requires_grad on the parameters to train, e.g. LoRA)"
                )
            h = sweep.h_scalar(i, x)
            if v.dtype == x.dtype == a.dtype:
                # literally (M23): autograd sums a + J^T(h a) in the order the unrolled graph does
                y = x + h * v
                torch.autograd.backward(y, a)
                del y
                a = x.grad if x.grad is not None else a
            else:
                # mixed precision: backward the model in its dtype, accumulate the adjoint in fp32
                torch.autograd.backward(v, (h * a).to(v.dtype))
                a = a + x.grad.to(a.dtype) if x.grad is not None else a
        del v, x  # free this step's activations before recomputing the previous step
    return a


# ---------------------------------------------------------------- lean adjoint (M25, M31)
def lean_adjoint(
    base_velocity: Callable[[torch.Tensor, torch.Tensor], Any],
    states: Sequence[torch.Tensor] | torch.Tensor,
    ts: object,
    terminal_grad: torch.Tensor,
    K: int,
    kind: str = "ode",
    *,
    guidance_scale: float | torch.Tensor | None = None,
    kappa: float | Sequence[float] | torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """The lean adjoint states of the last K steps, a list [a~_{N-K}, ..., a~_N] of K+1 fp32 tensors
    (fp64 for fp64 inputs), index j holding a~_{N-K+j}; a~_N is ``terminal_grad`` (cast if needed).

    ``kind='ode'`` (M25): a~_i = a~_{i+1} + h_i J_{v_base}(x_i, t_i)^T a~_{i+1}.
    ``kind='memoryless'`` (M31): a~_i = a~_{i+1} + h_i (2 J^T a~_{i+1} - kappa_i a~_{i+1}), kappa
    default 1/(t_i + h_i) (M29); ``kappa`` may be a float or N values ([N] or [N, B]).
    Each step recomputes one VJP through ``base_velocity`` with ``torch.autograd.grad`` w.r.t. x only
    (parameters' requires_grad untouched, no ``.grad`` written) and updates through `adjoint_step`.

    CFG (M5; state Jacobian (1-w) J_u + w J_c): with ``guidance_scale=w``, ``base_velocity(x2, t)``
    receives the doubled batch x2 = [x; x] [2B, ...] (uncond first; a [B] t is doubled too) and
    returns the per-branch velocities, either [v_u; v_c] [2B, ...] or a pair (v_u, v_c); one VJP
    with cotangent [a; a] yields vjp_u and vjp_c, which `adjoint_step` combines.
    Without CFG ``base_velocity(x, t)`` returns v_base [B, ...] (a CFG-combined callable also works:
    its VJP is the combined one).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    sweep = _Sweep(states, ts, terminal_grad, K)
    cfg = guidance_scale is not None
    w = None
    if cfg:
        w = torch.as_tensor(guidance_scale, dtype=sweep.acc_dtype).to(sweep.device)
        if w.dim() > 1 or not bool(torch.isfinite(w).all()):
            raise ValueError(f"guidance_scale must be a finite float or a [B] tensor, got {guidance_scale!r}")
    kappas = _kappas(kappa, sweep) if kind == "memoryless" else None

    adjoints = [sweep.a_terminal]
    a, cot = sweep.a_terminal, None
    for i in sweep.steps():
        x = sweep.x(i)
        t = sweep.t[i]
        x_in = (torch.cat([x, x]) if cfg else x).requires_grad_()
        if cfg and t.dim() == 1:
            t = torch.cat([t, t])
        with torch.enable_grad():
            out = base_velocity(x_in, t)
            outputs = _vjp_outputs(out, x_in, cfg)
            if cot is None:  # a~_N; later cotangents come from adjoint_step (fused cast/concat)
                cot = torch.cat([a, a]) if cfg else a
                cot = cot.to(outputs[0].dtype)
            grad_outputs = cot.chunk(2) if len(outputs) == 2 else (cot,)
            (vjp,) = torch.autograd.grad(outputs, x_in, grad_outputs, allow_unused=True)
        del out, outputs, x_in
        if vjp is None:  # the velocity does not depend on x
            vjp = torch.zeros((2 * x.shape[0], *x.shape[1:]) if cfg else x.shape, dtype=cot.dtype, device=x.device)
        vjp_u, vjp_c = vjp.chunk(2) if cfg else (vjp, None)
        # (M25) / (M31). The next cotangent: [a; a] (CFG) or a in the model's dtype, from the same fused
        # pass; without CFG in the adjoint's dtype it is a itself (no copy)
        fused_cot = cfg or vjp.dtype != a.dtype
        kappa_i = None if kappas is None else kappas[i]
        a, cot = adjoint_step(
            a, vjp_u, sweep.h_coef(i), vjp_c=vjp_c, w=w, kappa=kappa_i, mode=kind, return_cot=fused_cot
        )
        if not fused_cot:
            cot = a
        del vjp, vjp_u, vjp_c
        adjoints.append(a)
    adjoints.reverse()
    return adjoints


def _vjp_outputs(out: Any, x_in: torch.Tensor, cfg: bool) -> tuple[torch.Tensor, ...]:
    if cfg and isinstance(out, tuple | list):
        if len(out) != 2:
            raise ValueError(f"base_velocity must return [v_u; v_c] or (v_u, v_c) with CFG, got {len(out)} outputs")
        half = x_in[: x_in.shape[0] // 2]
        return tuple(_check_output(v, half, "base_velocity") for v in out)
    return (_check_output(out, x_in, "base_velocity"),)


def _kappas(kappa: object, sweep: _Sweep) -> torch.Tensor:
    """kappa_i for i = 0..N-1 on the compute device: default 1/(t_i + h_i) (M29)."""
    n = sweep.num_steps
    if kappa is None:
        values = 1 / (sweep.grid[:-1] + sweep.h)
    elif isinstance(kappa, numbers.Real) and not isinstance(kappa, bool):
        values = torch.full((n,), float(kappa), dtype=torch.float64)
    else:
        values = torch.as_tensor(kappa, dtype=torch.float64)
        if values.dim() not in (1, 2) or values.shape[0] != n:
            raise ValueError(f"kappa must be a float or have N = {n} values ([N] or [N, B]), got {tuple(values.shape)}")
    if not bool(torch.isfinite(values).all()):
        raise ValueError("kappa must be finite")
    return values.to(device=sweep.device, dtype=sweep.acc_dtype)


# ---------------------------------------------------------------- terminal gradient (M7, M23)
def terminal_reward_grad(
    x_N: torch.Tensor,
    decode: Callable[[torch.Tensor], torch.Tensor] | None,
    reward: Callable[[torch.Tensor], torch.Tensor],
    checkpoint: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_x r(decode(x)) at x_N, r [B]): one backward through the reward and the decoder.

    The gradient is returned in fp32 (fp64 for fp64 x_N); r detached. Only x receives a gradient
    (``torch.autograd.grad``): frozen decoder/reward parameters get no ``.grad``. ``decode=None``
    applies the reward to x directly. ``reward`` returns one value per sample ([B] or [B, 1]); it
    must treat samples independently (one backward of sum(r) gives every per-sample gradient).
    ``checkpoint=True`` wraps decoder and reward separately in ``torch.utils.checkpoint`` (non-
    reentrant): the forward keeps only their inputs and the backward recomputes one at a time, so
    peak memory is max(decoder, reward) activations instead of their sum. Negate for a_N = -grad r.
    """
    if not isinstance(x_N, torch.Tensor) or x_N.dim() < 1 or x_N.shape[0] == 0:
        raise ValueError("x_N must be a tensor with a non-empty batch dimension")
    x = x_N.detach().requires_grad_()
    with torch.enable_grad():
        if decode is None:
            image = x
        elif checkpoint:
            image = _checkpoint(decode, x, use_reentrant=False)
        else:
            image = decode(x)
        r = _checkpoint(reward, image, use_reentrant=False) if checkpoint else reward(image)
        if not isinstance(r, torch.Tensor) or r.numel() != x.shape[0] or (r.dim() > 0 and r.shape[0] != x.shape[0]):
            shape = tuple(r.shape) if isinstance(r, torch.Tensor) else type(r).__name__
            raise ValueError(f"reward must return one value per sample ([B] = [{x.shape[0]}]), got {shape}")
        if not r.requires_grad:
            raise ValueError("reward(decode(x)) does not depend differentiably on x")
        (grad,) = torch.autograd.grad(r.sum(), x)
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return grad.to(dtype), r.detach().reshape(x.shape[0])

"""Autograd and fake-kernel wiring shared by the ops' Python surfaces.

The native ops get their autograd in C++ (csrc/autograd.cpp); this module wires the Triton backend the same way
from Python: a loss whose forward also returns d loss / d input gets a backward that scales that saved gradient by
the loss cotangent (nothing to compute when the cotangent is 1 on CPU). Fake kernels and Triton launchers read the
op's arguments by name from one namedtuple of its schema (flowkern/ops/_schema.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from flowkern.ops._schema import Arguments, parse
from flowkern.ops.backend import HAS_EXT


def scale_saved(saved: torch.Tensor, grad_loss: torch.Tensor) -> torch.Tensor:
    """grad_loss * saved; `saved` itself when grad_loss is exactly 1 on CPU (loss.backward(): no copy, no pass)."""
    if grad_loss.device.type == "cpu" and type(grad_loss) is torch.Tensor and not torch.compiler.is_compiling():
        if grad_loss.item() == 1.0:
            return saved
    return (saved * grad_loss).to(saved.dtype)


class _SavedGradientLoss(torch.autograd.Function):
    """Runs forward(a) -> (loss, grad, ...) for the schema arguments a = args_type(*args, compute_grad=...), where
    grad = d loss / d args[grad_arg]; loss is differentiable."""

    @staticmethod
    def forward(ctx, forward: Callable, args_type: type, grad_arg: int, compute_grad: bool, *args):
        outs = forward(args_type(*args, compute_grad=compute_grad))
        ctx.set_materialize_grads(False)
        ctx.grad_arg = grad_arg
        ctx.save_for_backward(outs[1])
        ctx.mark_non_differentiable(*outs[1:])
        return outs

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        (saved,) = ctx.saved_tensors
        grads: list = [None] * (len(ctx.needs_input_grad))
        index = 4 + ctx.grad_arg
        if grad_loss is not None and saved.numel() > 0 and ctx.needs_input_grad[index]:
            grads[index] = scale_saved(saved, grad_loss)
        return tuple(grads)


def saved_gradient_loss(forward: Callable, schema: str, grad_arg: str) -> Callable:
    """The Triton backend of a loss op with the native op's contract: called with the schema's arguments (before
    compute_grad, which it sets as the C++ autograd kernel does), runs forward(a) -> (loss, grad, ...)."""
    args_type = Arguments(schema)
    index = args_type._fields.index(grad_arg)

    def call(*args):
        compute_grad = torch.is_grad_enabled() and args[index].requires_grad
        return _SavedGradientLoss.apply(forward, args_type, index, compute_grad, *args)

    return call


def schema_call(fn: Callable, schema: str) -> Callable:
    """`fn(a)` as a function of the schema's positional arguments (a = Arguments(schema)(*args)): a Triton launcher
    with the native op's contract."""
    args_type = Arguments(schema)
    return lambda *args: fn(args_type(*args))


def register_fake(schema: str) -> Callable:
    """Decorator: `fake(a)` becomes the fake kernel of the schema's op (torch.compile, opcheck), reading the arguments
    by name from a = Arguments(schema)(*args); a no-op without the extension."""
    if not HAS_EXT:
        return lambda fn: fn
    args_type = Arguments(schema)

    def register(fn: Callable) -> Callable:
        torch.library.register_fake(f"flowkern::{parse(schema)[0]}")(lambda *args, **kw: fn(args_type(*args, **kw)))
        return fn

    return register

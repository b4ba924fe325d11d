"""Autograd and fake-kernel wiring shared by the ops' Python surfaces.

The native ops get their autograd in C++ (csrc/autograd.cpp); this module wires the Triton backend the same way
from Python: a loss whose forward also returns d loss / d input gets a backward that scales that saved gradient by
the loss cotangent (nothing to compute when the cotangent is 1 on CPU).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from flowkern.ops.backend import HAS_EXT


def scale_saved(saved: torch.Tensor, grad_loss: torch.Tensor) -> torch.Tensor:
    """grad_loss * saved; `saved` itself when grad_loss is exactly 1 on CPU (loss.backward(): no copy, no pass)."""
    if grad_loss.device.type == "cpu" and type(grad_loss) is torch.Tensor and not torch.compiler.is_compiling():
        if grad_loss.item() == 1.0:
            return saved
    return (saved * grad_loss).to(saved.dtype)


class _SavedGradientLoss(torch.autograd.Function):
    """Runs forward(*args) -> (loss, grad, ...) where grad = d loss / d args[grad_arg]; loss is differentiable."""

    @staticmethod
    def forward(ctx, forward: Callable, grad_arg: int, *args):
        outs = forward(*args)
        ctx.set_materialize_grads(False)
        ctx.grad_arg = grad_arg
        ctx.save_for_backward(outs[1])
        ctx.mark_non_differentiable(*outs[1:])
        return outs

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        (saved,) = ctx.saved_tensors
        grads: list = [None] * (len(ctx.needs_input_grad))
        index = 2 + ctx.grad_arg
        if grad_loss is not None and saved.numel() > 0 and ctx.needs_input_grad[index]:
            grads[index] = scale_saved(saved, grad_loss)
        return tuple(grads)


def saved_gradient_loss(forward: Callable, grad_arg: int) -> Callable:
    """The Triton backend of a loss op with the native op's contract: forward(*args) -> (loss, grad, ...)."""
    return lambda *args: _SavedGradientLoss.apply(forward, grad_arg, *args)


def register_fake(name: str) -> Callable:
    """Decorator: the fake kernel of flowkern::<name> (torch.compile, opcheck); a no-op without the extension."""
    if not HAS_EXT:
        return lambda fn: fn
    return torch.library.register_fake(f"flowkern::{name}")

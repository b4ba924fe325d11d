"""Autograd for loss ops that produce their input gradient in the forward pass.

Such an op returns (loss, grad) where grad = dloss/d(input) (empty when not needed). Backward
scales the saved grad by the incoming scalar in a `flowkern::<op>_backward` custom op.
Double backward is not supported (no method needs it).
"""

from __future__ import annotations

import torch


def _is_one(grad_loss: torch.Tensor) -> bool:
    """True when the incoming cotangent is exactly 1 (checked on CPU only: no GPU sync, no graph break)."""
    # only plain eager tensors: fake/functional tensors (AOT tracing, opcheck) carry no value
    if type(grad_loss) is not torch.Tensor or torch.compiler.is_compiling():
        return False
    if grad_loss.device.type != "cpu" or grad_loss.numel() != 1:
        return False
    return bool(grad_loss.item() == 1.0)


def register_saved_grad_autograd(op, name: str, num_inputs: int, grad_inputs: tuple[int, ...], n_grads: int = 1):
    """Wire `op` (returning loss, then `n_grads` saved gradients) into autograd.

    grad_inputs[k] is the input position that the k-th saved gradient belongs to.
    """

    @torch.library.custom_op(f"flowkern::{name}_backward", mutates_args=())
    def backward_op(grad_loss: torch.Tensor, saved: list[torch.Tensor]) -> list[torch.Tensor]:
        scale = grad_loss.to(torch.float64 if grad_loss.dtype == torch.float64 else torch.float32)
        return [(g * scale).to(g.dtype) for g in saved]

    @backward_op.register_fake
    def _(grad_loss, saved):
        return [torch.empty_like(g) for g in saved]

    def setup_context(ctx, inputs, output):
        # the saved-gradient outputs never receive a cotangent: don't let autograd fill zeros for them
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*output[1 : 1 + n_grads])

    def backward(ctx, grad_loss, *unused):
        saved = list(ctx.saved_tensors)
        grads: list = [None] * num_inputs
        live = [k for k, g in enumerate(saved) if g.numel() > 0 and ctx.needs_input_grad[grad_inputs[k]]]
        if live and grad_loss is None:
            return tuple(grads)
        if live and _is_one(grad_loss):
            # loss.backward() from this loss: the saved gradient is the answer, no copy (peak +0)
            for k in live:
                grads[grad_inputs[k]] = saved[k]
        elif live:
            scaled = backward_op(grad_loss, [saved[k] for k in live])
            for k, g in zip(live, scaled):
                grads[grad_inputs[k]] = g
        return tuple(grads)

    op.register_autograd(backward, setup_context=setup_context)
    return backward_op

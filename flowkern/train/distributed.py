"""Data-parallel training with ``accelerate`` (layer L6): what :class:`flowkern.train.Trainer` needs from processes.

Multi-GPU usage
---------------
Build the model, reward and method exactly as for one process, then pass an ``accelerate.Accelerator``::

    from accelerate import Accelerator
    accelerator = Accelerator()                       # Accelerator(cpu=True) for CPU processes (gloo)
    model.to(accelerator.device)                      # every process builds the same model (same seed)
    trainer = Trainer(model, reward, method, config, sample_shape=..., accelerator=accelerator)
    trainer.train(checkpoint_dir="runs/exp1", checkpoint_every=50)

and start one process per GPU::

    accelerate launch --multi_gpu --num_processes 8 train.py                          # one node, 8 GPUs
    accelerate launch --multi_gpu --num_machines 2 --machine_rank 0 --num_processes 16 \
        --main_process_ip HOST --main_process_port 29500 train.py                     # two nodes (rank 1 alike)

On a machine without GPUs, ``accelerate launch --multi_gpu --num_processes 2 train.py`` with
``Accelerator(cpu=True)`` in the script runs two CPU processes over gloo (``accelerate launch --cpu`` starts a single
process: it is the single-CPU launcher). Pass ``--main_process_port`` to pick a free port.

What the trainer does with the accelerator (no model wrapping: the FlowModel protocol calls ``velocity``, the
adjoint engines call it many times per backward, which DistributedDataParallel's forward hooks do not support):

- ``config.batch_size`` is per process; an update sees ``batch_size * grad_accum_steps * num_processes``
  trajectories. Every process draws the whole update's x0 and cond from the same seeded generator and keeps its own
  rows (micro-batch k of process r = rows (k W + r) B .. (k W + r + 1) B of the draw, W processes), so the W
  processes' micro-batches concatenate to one process's micro-batch of W B with the same seed (so
  ``cond_sampler`` runs for W B trajectories on every process: keep it cheap, e.g. index precomputed embeddings).
  Other randomness (stochastic rollouts, the residual probe, a method's own ``generator``) uses per-process
  streams (seed offset by the process index).
- Gradients: ``accelerator.backward`` per micro-batch, then one ``accelerator.reduce(..., "mean")`` of all theta and
  phi gradients flattened into one buffer, before the per-group norms and clipping (M19), so every process applies
  the same AdamW step and the weights stay identical (they are broadcast from process 0 at construction).
- A non-finite reward, loss or gradient on any process skips the update on all of them.
- VGG-Flow's tau (M9) takes the quantile over the norms gathered from all processes (``tau_gather``).
- Metrics are averaged over processes (``reward_std`` is the mean of per-process standard deviations).
- Checkpoints: ``save_checkpoint`` and ``Trainer.state_dict`` are collective (every process calls them; the
  per-process RNG states are gathered); only the main process writes files and logs.
- Mixed precision: ``'no'`` or ``'bf16'`` (``accelerator.autocast`` around each micro-batch); ``'fp16'`` (a
  gradient scaler) and DeepSpeed/FSDP/Megatron plugins are refused.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

_REFUSED_TYPES = ("DEEPSPEED", "FSDP", "MEGATRON", "XLA")


class Processes:
    """The process group seen by the trainer: a no-op for one process, ``accelerate`` primitives otherwise.

    Args:
        accelerator: None (one process) or an ``accelerate.Accelerator``.
    """

    def __init__(self, accelerator: Any = None):
        self.accelerator = accelerator
        if accelerator is None:
            self.index, self.count, self.is_main = 0, 1, True
            return
        for attr in ("backward", "reduce", "wait_for_everyone", "autocast", "device"):
            if not hasattr(accelerator, attr):
                raise TypeError(f"accelerator must be an accelerate.Accelerator, got {type(accelerator).__name__}")
        kind = str(getattr(accelerator, "distributed_type", ""))
        if any(name in kind.upper() for name in _REFUSED_TYPES):
            raise ValueError(
                f"accelerator: distributed_type {kind} is not supported by flowkern's Trainer (plain data parallel "
                "only: use `accelerate launch --multi_gpu` without DeepSpeed/FSDP/Megatron/XLA)"
            )
        if getattr(accelerator, "scaler", None) is not None:
            raise ValueError(
                "accelerator: mixed_precision='fp16' (gradient scaler) is not supported; use 'bf16' or 'no'"
            )
        self.index = int(accelerator.process_index)
        self.count = int(accelerator.num_processes)
        self.is_main = bool(accelerator.is_main_process)

    @property
    def device(self) -> torch.device | None:
        return None if self.accelerator is None else torch.device(self.accelerator.device)

    def backward(self, loss: torch.Tensor) -> None:
        if self.accelerator is None:
            loss.backward()
        else:
            self.accelerator.backward(loss)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.accelerator is None:
            return contextlib.nullcontext()
        return self.accelerator.autocast()

    def gather_objects(self, obj: Any) -> list[Any]:
        """[obj of process 0, ..., obj of process W-1] on every process (picklable objects)."""
        if self.count == 1:
            return [obj]
        from accelerate.utils import gather_object

        return list(gather_object([obj]))

    def wait(self) -> None:
        if self.count > 1:
            self.accelerator.wait_for_everyone()

    def broadcast_parameters(self, params: list[torch.nn.Parameter]) -> None:
        """Copy process 0's values into every process's parameters (identical starting weights)."""
        if self.count == 1 or not params:
            return
        from accelerate.utils import broadcast

        with torch.no_grad():
            for p in params:
                p.copy_(broadcast(p.detach().clone(), from_process=0))

    def mean_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Average ``.grad`` over processes in one reduction (fp32 buffer, fp64 if any gradient is fp64).

        A parameter whose gradient is None on every process stays None; one that has a gradient on some process
        gets the mean with zeros elsewhere (the gradient of the mean loss over all processes' samples).
        """
        if self.count == 1 or not params:
            return
        dtype = torch.float64 if any(p.grad is not None and p.grad.dtype == torch.float64 for p in params) else None
        dtype = dtype or torch.float32
        device = self.device
        pieces = [
            (p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=p.device)).to(device, dtype)
            for p in params
        ]
        present = torch.tensor([float(p.grad is not None) for p in params], device=device, dtype=dtype)
        flat = torch.cat([*pieces, present])
        flat = self.accelerator.reduce(flat, reduction="mean")
        present = flat[-len(params) :] > 0
        offset = 0
        for p, has_grad in zip(params, present.tolist()):
            n = p.numel()
            if has_grad:
                dtype = p.grad.dtype if p.grad is not None else p.dtype
                p.grad = flat[offset : offset + n].view(p.shape).to(p.device, dtype)
            offset += n

    def gather_cat(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenation along dim 0 of every process's CPU tensor (sizes may differ), in process order."""
        if self.count == 1:
            return tensor
        return torch.cat([t.reshape(-1, *tensor.shape[1:]) for t in self.gather_objects(tensor.detach().cpu())])

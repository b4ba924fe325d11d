"""Worker for tests/test_distributed.py, run on 2 CPU processes (gloo):

    accelerate launch --multi_gpu --num_processes 2 --main_process_port PORT tests/_ddp_worker.py OUT_DIR

(``--multi_gpu`` picks accelerate's torchrun launcher; ``Accelerator(cpu=True)`` keeps the processes on the CPU.
``accelerate launch --cpu`` would start one process.) For each run it trains a few toy updates with
``batch_size`` per process and writes, per process, OUT_DIR/<run>-rank<r>.pt (weights, value net, tau, history,
skips); checkpoints go to OUT_DIR/<run>/. ``build`` is shared with the single-process side of the test.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
BATCH = 4  # per process; the single-process reference uses 2 * BATCH
UPDATES = 3


def reward(x):
    return -(x - torch.tensor([1.5, 0.5], dtype=x.dtype)).square().sum(-1) + 4.0


def build(name: str, batch_size: int, accelerator=None, dtype=torch.float32):
    """Toy trainer; 'dam' (deterministic AM, K=2) and 'vggflow' (value net, quantile clipping, every transition):
    no randomness after x0, so W processes of B equal one of W B."""
    from flowkern.methods import AdjointMatching, SmallValueNet, VGGFlow, flow_callables
    from flowkern.models.toy import GaussianMixture, make_toy_model
    from flowkern.train import TrainConfig, Trainer

    torch.manual_seed(0)
    model = make_toy_model(GaussianMixture.ring(4, radius=2.0, std=0.5), hidden=16, depth=2, dtype=dtype)
    v, vb = flow_callables(model)
    if name in ("dam", "poisoned"):
        method = AdjointMatching(v, vb, reward, beta=1.0, K=2)
    elif name == "vggflow":
        net = SmallValueNet((2,), hidden=16, depth=2, dtype=dtype)
        torch.nn.init.normal_(net.out.weight, std=0.1)
        method = VGGFlow(v, vb, reward, beta=1.0, alpha=10.0, value_net=net, subsample_fraction=None, clip=True,
                         clip_quantile=0.5)  # fmt: skip
    else:
        raise ValueError(name)
    config = TrainConfig(batch_size=batch_size, grad_accum_steps=2, num_steps=4, lr=1e-2, value_lr=5e-3,
                         num_updates=UPDATES, residual_probe=2)  # fmt: skip
    return Trainer(model, reward, method, config, sample_shape=(2,), accelerator=accelerator)


class PoisonOnProcess1:
    """Wraps a method: its second loss call on process 1 is infinite (the trainer must skip on every process)."""

    def __init__(self, method, process_index):
        self.method, self.process_index, self.calls = method, process_index, 0

    def __getattr__(self, name):
        return getattr(self.method, name)

    def loss(self, batch):
        loss, metrics = self.method.loss(batch)
        self.calls += 1
        if self.process_index == 1 and self.calls == 3:  # update 1, first micro-batch
            loss = loss * math.inf
        return loss, metrics


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    out = Path(out_dir)
    for name in ("dam", "vggflow", "poisoned"):
        trainer = build(name, BATCH, accelerator)
        if name == "poisoned":
            trainer.method = PoisonOnProcess1(trainer.method, rank)
            trainer.train(UPDATES)
        else:
            trainer.train(UPDATES, checkpoint_dir=str(out / name), checkpoint_every=2)
        value_net = getattr(trainer.method, "value_net", None)
        torch.save(
            {
                "num_processes": accelerator.num_processes,
                "model": {n: p.detach().clone() for n, p in trainer.model.residual.named_parameters()},
                "value_net": value_net.state_dict() if isinstance(value_net, torch.nn.Module) else None,
                "tau": getattr(trainer.method, "tau", None),
                "history": trainer.history,
                "skipped": trainer.skipped,
                "process_generator": trainer.process_generator.get_state(),
            },
            out / f"{name}-rank{rank}.pt",
        )
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main(sys.argv[1])

"""A measured run and its plan must describe one update: the knobs ``flowkern train`` runs with and those
``flowkern plan`` traces, from the same flags (benchmarks/klein_int8.py's SETTINGS).

The two commands' defaults differ where a knob is not given (method, precision, batch: the planner's are the docs
table's); the LoRA rank was one of them (train 8, plan 16) and is now shared (flowkern.models.lora.DEFAULT_RANK). The
Klein-4B int8 record of 2026-12-07 was measured without ``--lora-rank`` (rank 8) and planned at rank 16: the
planner's loss_backward (+43.3 MB), probe (+23.6 MB: the rank-16 minus rank-8 LoRA gradients, 47,185,920 / 2 bytes)
and optimizer (2x: gradients + AdamW moments are 3 x the LoRA) over-predictions were those of a LoRA twice as big.
"""

from __future__ import annotations

from pathlib import Path

from flowkern.app.plan_models import Knobs
from flowkern.app.run import TrainOptions
from flowkern.cli import _build_parser
from flowkern.cli import _plan_knobs as _cli_plan_knobs


def _train_knobs(argv: list[str]) -> dict:
    """The planner's knobs of the run ``flowkern train argv`` makes (as ``train --memory-budget`` maps them)."""
    args = vars(_build_parser().parse_args(argv))
    opts = TrainOptions(**{k: v for k, v in args.items() if k in TrainOptions.__dataclass_fields__})
    return dict(
        method=opts.method, K=opts.K, lora_rank=opts.lora_rank, batch=opts.batch_size, grad_accum=opts.grad_accum,
        micro_batch=opts.micro_batch or 1, resolution=opts.resolution, num_steps=opts.num_steps,
        base_precision=opts.base_precision, recompute=opts.recompute, checkpoint_reward=opts.checkpoint_reward,
        offload_trajectory=opts.offload_trajectory, reward=list(opts.reward),
    )  # fmt: skip


def _plan_knobs(argv: list[str]) -> dict:
    knobs = _cli_plan_knobs(_build_parser().parse_args(argv))
    return {
        k: [v] if k == "reward" else v
        for k, v in knobs.items()
        if k not in ("consistency", "precision", "extrapolate", "reward_hvp")
    }


def test_klein_benchmark_trains_and_plans_the_same_update():
    from benchmarks.klein_int8 import SETTINGS, train_argv

    train = _train_knobs(train_argv(Path("DIR"), Path("OUT")))
    planned = _plan_knobs(["plan", "DIR", "--device", "cpu", *SETTINGS, "--json"])
    assert train == planned
    assert train["lora_rank"] == 8  # the recorded measurement's rank


def test_plan_and_train_share_the_lora_rank_default():
    """`flowkern plan` without --lora-rank plans the rank `flowkern train` (and the Python Knobs) use without it."""
    assert _cli_plan_knobs(_build_parser().parse_args(["plan", "sd3-medium"]))["lora_rank"] == TrainOptions().lora_rank
    assert Knobs().lora_rank == TrainOptions().lora_rank == 8
    assert _cli_plan_knobs(_build_parser().parse_args(["plan", "sd3-medium", "--lora-rank", "16"]))["lora_rank"] == 16

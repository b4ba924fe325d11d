"""FLUX.2-Klein-4B's reward phase, cheaply: one DAM K=3 update (int8 base, bf16, 256 px, B = 1, N = 4, LoRA r = 16)
with the real-config AutoencoderKLFlux2 (84 M, random weights) and a reduced-width 1 + 1-block transformer (2 heads),
measured per phase (``real_size.phase_profile``: the profiler's allocator events) vs ``flowkern plan``'s CPU mode on
the same run built under fake tensors (``plan_models.build_run``). The reward phase (the checkpointed VAE decode,
its gradient, the redness reward) does not depend on the transformer, so it is the full-size Klein run's reward
phase to the byte (603,749,320 bytes both). Not collected by pytest; ~7 min and 1.7 GB on one thread.

    nice -n 10 python benchmarks/klein_reward_phase.py
"""

from __future__ import annotations

import dataclasses
import gc
import os
import sys
import time

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir)))

from benchmarks.real_size import phase_markers, phase_profile  # noqa: E402
from flowkern.app import plan as planner  # noqa: E402
from flowkern.app.plan_models import Knobs, build_run, fake_building, load_named  # noqa: E402
from flowkern.ops.backend import use_backend  # noqa: E402


def main() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    torch.set_num_threads(1)
    spec = load_named("flux2-klein-4b")
    small = dict(spec.transformer, num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=128,
                 joint_attention_dim=64, timestep_guidance_channels=32)  # fmt: skip
    spec = dataclasses.replace(spec, transformer=small, text_tokens=16)
    knobs = Knobs(method="dam", K=3, precision="bf16", batch=1, resolution=256, num_steps=4, base_precision="int8",
                  lora_rank=16)  # fmt: skip
    with use_backend("torch"):
        trainer, _ = build_run(spec, knobs)
        with planner.no_cyclic_gc(), phase_markers(trainer):
            phases, peak, wall = phase_profile(trainer.train_step)
        print(f"measured {peak} B in {wall:.0f} s", flush=True)
        trainer = None
        gc.collect()
        start = time.perf_counter()
        fake = FakeTensorMode(allow_non_fake_inputs=True)
        with fake_building(fake) as known:
            trainer, _ = build_run(spec, knobs)
        with fake:
            update = planner.trace_update(trainer, "cpu", known)
        print(f"planned {update['peak_bytes']} B in {time.perf_counter() - start:.0f} s")
    for p, v in phases.items():
        m, q = v["peak_bytes"], update["phases"][p]
        print(f"{p:14s} {m:>12,} {q:>12,} {100 * (q - m) / max(m, 1):+.3f}%")


if __name__ == "__main__":
    main()

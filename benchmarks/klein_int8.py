"""FLUX.2-Klein-4B with an int8 base: one DAM K=3 update through ``flowkern train`` on CPU (issue 17, item 6).

Not collected by pytest or CI (minutes, ~8 GB of weights). Three steps, each optional:

1. ``--build``: a Flux2KleinPipeline directory from ``flowkern/assets/configs/flux2-klein-4b.json`` with random
   weights: the real-size transformer (built on meta, filled in bf16 by ``real_size._random_parameters``) and the
   real-config AutoencoderKLFlux2, saved as safetensors in 1 GB shards (a shard's bytes are copied once on save).
   The text encoder is a small random Qwen3 of the real width: hidden 2560 (Klein stacks the hidden states of
   layers 9, 18 and 27, so 27 layers and 3 x 2560 = 7680 = the transformer's joint_attention_dim), one attention
   head, MLP width 64, with the tests' letter-level tokenizer. It does not change the update's peak: the prompts
   are encoded once, before training, and the encoder is freed (``flowkern.app.prompts.encode_prompts``); the run
   keeps only the [prompts, 512, 7680] embedding table, whose shape depends on the width and token count only, and
   the peak is measured above the level at the start of the update. ``is_distilled`` is true, as in the released
   FLUX.2-klein-4B (the non-distilled one is FLUX.2-klein-base-4B), so there is no true CFG (w = None).
2. ``--update``: ``flowkern train DIR --method dam --K 3 --base-precision int8 --resolution 256 --batch-size 1
   --steps 1 --num-steps 4 --lora-rank 8`` run in-process (``flowkern.cli.main``). Its one update runs under the
   torch profiler with ``flowkern.app.plan.no_cyclic_gc`` and ``real_size``'s phase markers; the peak is the running
   sum of the CPU allocator's events above the level at the update's start (``real_size.phase_profile``), with bf16
   GEMMs computed in fp32 and folded as native bf16 kernels (``real_size.Bf16GemmInFp32``; ``--native-bf16`` turns
   it off). The final eval (at least 2 samples) is skipped: it is not part of the update.
3. ``--plan``: ``flowkern plan DIR --device cpu`` with the same settings, ``--json``, in a subprocess with a time
   limit; its output (or exactly how it failed) goes into the record.

Usage (always under the shared lock; delete the directory afterwards)::

    flock /tmp/flowkern-heavy.lock nice -n 10 python benchmarks/klein_int8.py --build --update --plan \\
        --dir /tmp/klein4b --out benchmarks/results/real_size/klein4b_int8.json
    rm -rf /tmp/klein4b
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir)))

from benchmarks.real_size import (  # noqa: E402
    GIB,
    Bf16GemmInFp32,
    _git_rev,
    _random_parameters,
    phase_markers,
    phase_profile,
)

CONFIG = Path(__file__).resolve().parents[1] / "flowkern" / "assets" / "configs" / "flux2-klein-4b.json"
# the measured run: the CLI flags shared by `flowkern train` and `flowkern plan`, every knob that changes memory
# given explicitly (the two commands' defaults differ: LoRA rank 8 for train, 16 for plan; the recorded run of
# 2026-12-07 used train's 8); tests/test_plan_settings.py checks that both commands read them as one run
SETTINGS = ["--method", "dam", "--K", "3", "--base-precision", "int8", "--resolution", "256", "--batch-size", "1",
            "--num-steps", "4", "--lora-rank", "8"]  # fmt: skip
TEXT_ENCODER = dict(hidden_size=2560, num_hidden_layers=27, num_attention_heads=1, num_key_value_heads=1,
                    head_dim=128, intermediate_size=64, max_position_embeddings=512)  # fmt: skip


def build_pipeline(path: Path, seed: int = 0, blocks: tuple[int, int] | None = None) -> dict:
    """Save the random Klein-4B pipeline directory (see the module docstring); ``blocks`` (double, single) shrinks
    the transformer for smoke runs. Returns the parameter counts."""
    import diffusers
    from accelerate import init_empty_weights
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from tests.models_tiny_backbones import qwen_tokenizer

    config = json.loads(CONFIG.read_text())
    tconfig = dict(config["transformer"])
    if blocks is not None:
        tconfig.update(num_layers=blocks[0], num_single_layers=blocks[1])
    with init_empty_weights(include_buffers=False):
        transformer = diffusers.Flux2Transformer2DModel(**tconfig)
    _random_parameters(transformer, torch.bfloat16, seed)
    tokenizer = qwen_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        vae = diffusers.AutoencoderKLFlux2(**config["vae"])
        encoder = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tokenizer), **TEXT_ENCODER)).to(torch.bfloat16)
    pipe = diffusers.Flux2KleinPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
        vae=vae,
        text_encoder=encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=True,
    )
    pipe.save_pretrained(path, safe_serialization=True, max_shard_size="1GB")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {"transformer": count(transformer), "vae": count(vae), "text_encoder": count(encoder)}


def train_argv(path: Path, out: Path) -> list[str]:
    return ["train", "--model", str(path), "--prompt", "a photo of a red fox", *SETTINGS, "--steps", "1",
            "--reward", "redness", "--checkpoint-every", "0", "--no-progress", "--overwrite",
            "--out", str(out)]  # fmt: skip


def profile_cli_update(path: Path, out: Path, native_bf16: bool = False) -> dict:
    """``flowkern train`` in-process; its update profiled (see the module docstring). The record's keys."""
    import flowkern.app.run as run
    from flowkern.app.plan import no_cyclic_gc
    from flowkern.cli import main
    from flowkern.train import Trainer

    record: dict = {}
    original = Trainer.train_step

    def profiled_step(self):
        metrics: dict = {}
        emulate = contextlib.nullcontext() if native_bf16 else Bf16GemmInFp32()
        with no_cyclic_gc(), phase_markers(self), emulate:
            phases, peak, wall = phase_profile(lambda: metrics.update(original(self)))
        record.update(
            seconds=round(wall, 1),
            peak_bytes=peak,
            peak_gib=round(peak / GIB, 3),
            phases={k: {"peak_gib": round(v["peak_bytes"] / GIB, 3), **v} for k, v in phases.items()},
            metrics={k: v for k, v in metrics.items() if isinstance(v, int | float)},
            skipped=[list(s) for s in self.skipped],
        )
        return metrics

    Trainer.train_step = profiled_step
    finish, run._finish = run._finish, lambda *args, **kwargs: {}  # no final eval: not part of the update
    try:
        t0 = time.perf_counter()
        rc = main(train_argv(path, out))
        record.update(cli_rc=rc, cli_seconds=round(time.perf_counter() - t0, 1))
    finally:
        Trainer.train_step = original
        run._finish = finish
    return record


def run_planner(path: Path, timeout: float) -> dict:
    """``flowkern plan DIR --device cpu ... --json`` in a subprocess: its JSON, or how it failed."""
    argv = [sys.executable, "-m", "flowkern", "plan", str(path), "--device", "cpu", *SETTINGS, "--json"]
    t0 = time.perf_counter()
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=CONFIG.parents[3])
    except subprocess.TimeoutExpired:
        return {"command": argv[1:], "error": f"timed out after {timeout:.0f} s"}
    result: dict = {"command": argv[1:], "rc": done.returncode, "seconds": round(time.perf_counter() - t0, 1)}
    try:
        result["prediction"] = json.loads(done.stdout)
    except json.JSONDecodeError:
        result["error"] = (done.stderr or done.stdout).strip()[-2000:]
    return result


def peak_rss_gib() -> float:
    """This process's peak resident set (kernel's VmHWM), GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) * 1024 / GIB, 2)
    return float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/klein4b"), help="pipeline directory [/tmp/klein4b]")
    parser.add_argument("--build", action="store_true", help="build the random pipeline directory")
    parser.add_argument("--update", action="store_true", help="profile one update through flowkern train")
    parser.add_argument("--plan", action="store_true", help="run flowkern plan --device cpu on it")
    parser.add_argument("--plan-timeout", type=float, default=1800.0, help="seconds [1800]")
    parser.add_argument("--blocks", type=int, nargs=2, metavar=("DOUBLE", "SINGLE"), help="fewer blocks (smoke)")
    parser.add_argument("--native-bf16", action="store_true", help="no fp32 emulation of bf16 GEMMs")
    parser.add_argument("--out", type=Path, help="JSON list of records (one per block count): add or update ours")
    args = parser.parse_args(argv)
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    import flowkern

    records = json.loads(args.out.read_text()) if args.out and args.out.is_file() else []
    blocks = list(args.blocks) if args.blocks else None  # one record per block count in --out
    record = next((r for r in records if r.get("blocks") == blocks), None)
    if record is None:
        record = {"blocks": blocks}
        records.append(record)
    size = f", {blocks[0]} double + {blocks[1]} single blocks" if blocks else ""
    record.update(
        model=f"flux2-klein-4b (random weights{size})",
        settings=SETTINGS,
        env={
            "git": _git_rev(os.path.dirname(os.path.dirname(flowkern.__file__))),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
        },
    )
    save = lambda: args.out and args.out.write_text(json.dumps(records, indent=1) + "\n")  # noqa: E731
    if args.build:
        t0 = time.perf_counter()
        record["parameters"] = build_pipeline(args.dir, blocks=tuple(blocks) if blocks else None)
        record["build_seconds"] = round(time.perf_counter() - t0, 1)
        print(f"built {args.dir}: {record['parameters']} in {record['build_seconds']} s", flush=True)
        save()
    if args.update:
        update = profile_cli_update(args.dir, args.dir.parent / (args.dir.name + "-run"), args.native_bf16)
        record["update"] = {"train_argv": train_argv(args.dir, Path("RUN")), **update}
        record["update"]["bf16_gemm_in_fp32"] = not args.native_bf16
        record["peak_rss_gib_process"] = peak_rss_gib()
        print(f"update: {update.get('seconds')} s, peak {update.get('peak_gib')} GiB (rc {update['cli_rc']})")
        save()
    if args.plan:
        record["plan"] = run_planner(args.dir, args.plan_timeout)
        predicted = ((record["plan"].get("prediction") or {}).get("update") or {}).get("peak_bytes")
        print(f"plan: {predicted / GIB if predicted else record['plan']} GiB", flush=True)
        save()
    return 0


if __name__ == "__main__":
    sys.exit(main())

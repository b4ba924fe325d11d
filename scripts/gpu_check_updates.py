"""Training updates at real size (scripts/gpu_check.py's stage 'updates'): seconds per update and peak memory.

Rows, in the order they run (the most important first, so a run cut short by its deadline keeps them):

1. VGG-Flow on the SD3-medium config at 1024 px, B = 1 (issue 19's target: under 24 GB);
2. one update of each method (vggflow, dam, am, refl, draft) on the SD3-medium config at 512 px, B = 1;
3. the truncated-adjoint table row of SD3-medium at 512 px (benchmarks/bench_adjoint.py: unrolled autograd,
   per-step checkpointing and flowkern recomputation; K = 1 and 20, then 5 if time is left).

The run is assembled the way ``flowkern train`` assembles a pipeline run (flowkern.app.build: the prompt table,
LoRA rank 16, CFG w = 5, N = 20 on the shifted grid, the "redness" reward on the VAE-decoded image, method_for_run
with the CLI's defaults, β = 5e4) from the real transformer and VAE configs with random weights (bf16 transformer,
fp32 VAE and LoRA; no downloads). Each row times its second update (the first warms cuBLAS, autotuning and the
allocator) and reports ``max_memory_allocated`` during it (the frozen weights included) and the peak above the
level before it. Each row is written to --json as soon as it is measured. benchmarks/real_size.py (the CPU's exact
per-phase peaks) supplies the real configs; unlike its build_run, which builds a model per row on the CPU, the rows
here share one backbone built on the device (2B random weights: once, in seconds).

The memory planner (issue 16, `flowkern.app.plan`) predicts each row's peak: ``--predict FILE`` (run on a CPU machine
before the lease, by scripts/gpu_check_prepare.sh) asks ``python -m flowkern plan ... --json`` for every row and
writes the predictions; the lease reads them (``--predictions FILE``) and prints them beside the measurements.

``--tiny`` (gpu_check --dry-run, CPU): the same plumbing on the tiny SD3 config at 16 px with N = 4 (times only, no
profiler peaks).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

METHODS = ("vggflow", "dam", "am", "refl", "draft")


@dataclass(frozen=True)
class Row:
    """One measured update: a method on a model config at a resolution (pixels), B trajectories, N steps."""

    method: str
    resolution: int
    model: str = "sd3-medium"
    batch: int = 1
    num_steps: int = 20
    lora_rank: int = 16
    precision: str = "bf16"

    @property
    def name(self) -> str:
        return f"{self.model}/{self.method}/{self.resolution}px/B{self.batch}"

    def plan_args(self) -> list[str]:
        """The planner's command line for this row (issue 16's `flowkern plan`)."""
        return [self.model, "--method", self.method, "--resolution", str(self.resolution),
                "--batch-size", str(self.batch), "--num-steps", str(self.num_steps), "--lora-rank",
                str(self.lora_rank), "--precision", self.precision, "--json"]  # fmt: skip


def update_rows(tiny: bool = False, methods=METHODS) -> list[Row]:
    """VGG-Flow at 1024 px first (when asked for), then each method at 512 px; --tiny: 16 px, N = 4, fp32."""
    if tiny:
        return [Row(m, 16, "sd3-tiny", 1, 4, 4, "fp32") for m in methods]
    return [Row("vggflow", 1024)] * ("vggflow" in methods) + [Row(m, 512) for m in methods]


# ---------------------------------------------------------------- building a run (as flowkern.app.build does)
@dataclass
class Backbone:
    """The frozen transformer with its LoRA and the VAE decoder, shared by every row of one model."""

    flow: torch.nn.Module
    decoder: torch.nn.Module
    config: dict
    vae_factor: int
    text_tokens: int
    dtype: torch.dtype


def build_backbone(model: str, dev: torch.device, lora_rank: int, precision: str) -> Backbone:
    from diffusers import AutoencoderKL

    from benchmarks.real_size import SD3_TEXT_TOKENS, SD3_VAE  # the real configs, one copy
    from flowkern.models.sd3 import SD3FlowModel
    from flowkern.models.vae import LatentDecoder
    from tests.models_tiny import SD3_MEDIUM, SD3_TINY, tiny_sd3_transformer
    from tests.models_tiny_backbones import VAE_KL_TINY

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    config, vae_config, tokens = {
        "sd3-medium": (SD3_MEDIUM, SD3_VAE, SD3_TEXT_TOKENS),
        "sd3-tiny": (SD3_TINY, VAE_KL_TINY, 8),
    }[model]
    with torch.device(dev):  # random weights built on the device (2B parameters: seconds on a GPU)
        transformer = tiny_sd3_transformer(config=config, dtype=dtype, device=dev)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(2)
            vae = AutoencoderKL(**vae_config)
    flow = SD3FlowModel(transformer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        flow.add_lora(lora_rank)
    decoder = LatentDecoder(vae.to(dev))
    from flowkern.app import build

    build.memory_defaults(flow, decoder)  # what a pipeline trains with: transformer and VAE checkpointing
    factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    return Backbone(flow, decoder, config, factor, tokens, dtype)


def build_trainer(backbone: Backbone, row: Row, dev: torch.device):
    from flowkern.app import build
    from flowkern.models.sd3 import SD3Conditioning
    from flowkern.train import TrainConfig, Trainer

    g = torch.Generator().manual_seed(1)
    joint, pooled = backbone.config["joint_attention_dim"], backbone.config["pooled_projection_dim"]
    text = lambda: torch.randn(1, backbone.text_tokens, joint, generator=g).to(dev)
    vec = lambda: torch.randn(1, pooled, generator=g).to(dev)
    rows = {"prompt_embeds": text(), "pooled_prompt_embeds": vec()}
    shared = {"negative_prompt_embeds": text(), "negative_pooled_prompt_embeds": vec()}
    prompts = ["a photo of a red fox"]
    model = build.PromptBankFlow(backbone.flow, SD3Conditioning, rows, shared, {"guidance_scale": 5.0}, prompts)
    side = row.resolution // backbone.vae_factor
    setup = build.RunSetup(
        model, "sd3", f"random {row.model} config", (backbone.config["in_channels"], side, side), prompts,
        row.num_steps, "shifted", guidance_scale=5.0, to_images=backbone.decoder, device=dev,
        weights_dtype=backbone.dtype,
    )  # fmt: skip
    reward_fn, _ = build.reward_for_run(["redness"], setup)
    method = build.method_for_run(row.method, setup, reward_fn, build.MethodSettings(), default_beta=5e4, seed=0)
    config = TrainConfig(batch_size=row.batch, num_updates=2, num_steps=row.num_steps, time_grid="shifted",
                         seed=0, residual_probe=min(8, row.batch))  # fmt: skip
    return Trainer(model, reward_fn, method, config, sample_shape=setup.sample_shape,
                   cond_sampler=setup.cond_sampler, device=dev)  # fmt: skip


def _free(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def measure_update(trainer, dev: torch.device, cpu_peak: bool = True) -> dict:
    """Seconds of the second update and its memory (CUDA: max_memory_allocated; CPU: exact peak above entry, under
    the profiler, unless `cpu_peak` is False: the dry run checks the plumbing, the profiler would triple its time)."""
    from flowkern.profiling import peak_memory

    trainer.train_step()  # warm-up
    out: dict = {}
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        start = time.perf_counter()
        metrics = trainer.train_step()
        torch.cuda.synchronize()
        out["seconds_per_update"] = time.perf_counter() - start
        out["max_memory_allocated"] = torch.cuda.max_memory_allocated()
        out["memory_allocated_before"] = before
        out["peak_above_start_bytes"] = out["max_memory_allocated"] - before
        out["max_memory_reserved"] = torch.cuda.max_memory_reserved()
    elif not cpu_peak:
        start = time.perf_counter()
        metrics = trainer.train_step()
        out["seconds_per_update"] = time.perf_counter() - start
    else:  # one update under the profiler: its exact peak (its seconds include the profiler's overhead)
        history = len(trainer.history)
        start = time.perf_counter()
        out["peak_above_start_bytes"] = peak_memory(trainer.train_step, dev)
        out["seconds_per_update"] = time.perf_counter() - start
        metrics = trainer.history[history]
    out["skipped"] = bool(metrics.get("skipped", 0.0))
    out["metrics"] = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
    return out


def adjoint_rows(dev: torch.device, ks, tiny: bool, deadline: float | None, repeats: int = 2) -> list[dict]:
    """The adjoint table's SD3-medium row (bench_adjoint.py's problem): seconds (best of `repeats`) and peak bytes
    above the entry level of one gradient from x_0, per K and strategy."""
    from benchmarks.bench_adjoint import STRATEGIES, make_problem, strategy_fn
    from flowkern.profiling import peak_memory

    model, steps, side = ("sd3-tiny", 4, 16) if tiny else ("sd3-medium", 20, None)
    ks = list(dict.fromkeys(min(K, steps) for K in ks))
    problem = make_problem(model, dev, num_steps=steps, side=side)
    out = []
    for K in ks:
        for strategy in STRATEGIES:
            if deadline is not None and time.time() > deadline:
                return out
            fn = strategy_fn(problem, strategy, K)
            row = {"model": model, "K": K, "num_steps": steps, "strategy": strategy,
                   "shape": list(problem.x0.shape)}  # fmt: skip
            try:
                fn()
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - start)
                row["seconds"] = min(times)
                if dev.type == "cuda" or not tiny:  # the dry run: plumbing only, no profiler (see measure_update)
                    row["peak_bytes"] = peak_memory(fn, dev)
            except torch.OutOfMemoryError:
                row["error"] = "out of memory"
                for p in problem.params:
                    p.grad = None
                _free(dev)
            out.append(row)
    return out


# ---------------------------------------------------------------- the planner (issue 16)
def planner_available() -> bool:
    """Whether `python -m flowkern plan` exists (the CLI of issue 16)."""
    proc = subprocess.run([sys.executable, "-m", "flowkern", "plan", "--help"], capture_output=True, text=True)
    return proc.returncode == 0


def _peak_from(report: object) -> float | None:
    """The predicted peak in bytes from the planner's JSON: ``total_bytes`` (weights + the update's peak, what
    max_memory_allocated counts; `flowkern.app.plan.plan`)."""
    if isinstance(report, dict) and isinstance(report.get("total_bytes"), int | float):
        return float(report["total_bytes"])
    return None


def predict(rows: list[Row]) -> dict:
    """{row name: {'peak_bytes': float | None, 'report': the planner's JSON, or 'error'}}; {} without a planner."""
    if not planner_available():
        return {}
    out = {}
    for row in rows:
        cmd = [sys.executable, "-m", "flowkern", "plan", *row.plan_args()]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            out[row.name] = {"peak_bytes": None, "error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
            continue
        try:
            report = json.loads(proc.stdout)
        except json.JSONDecodeError:
            out[row.name] = {"peak_bytes": None, "error": "output is not JSON"}
            continue
        out[row.name] = {"peak_bytes": _peak_from(report), "report": report}
    return out


# ---------------------------------------------------------------- the stage
def run(dev: torch.device, tiny: bool, out_path: str | None, predictions: dict, deadline: float | None,
        adjoint_ks=(1, 20, 5), methods=METHODS) -> dict:  # fmt: skip
    result: dict = {"device": str(dev), "updates": [], "adjoint": [], "planner": bool(predictions)}

    def save():
        if out_path:
            with open(out_path, "w") as f:
                json.dump(result, f, indent=1)

    def late() -> bool:
        return deadline is not None and time.time() > deadline

    rows = update_rows(tiny, methods)
    backbone = None
    for row in rows:
        if late():
            result["updates"].append({**asdict(row), "name": row.name, "error": "not run: out of time"})
            continue
        record = {**asdict(row), "name": row.name}
        start = time.perf_counter()
        try:
            if backbone is None:
                backbone = build_backbone(row.model, dev, row.lora_rank, row.precision)
                result["backbone_build_s"] = time.perf_counter() - start
            trainer = build_trainer(backbone, row, dev)
            record.update(measure_update(trainer, dev, cpu_peak=not tiny))
            del trainer
        except torch.OutOfMemoryError as err:
            record["error"] = f"out of memory: {str(err).splitlines()[0]}"
        except Exception as err:  # noqa: BLE001 - every row is tried; the failure is the finding
            record["error"] = f"{type(err).__name__}: {err}"[:500]
        record["row_s"] = time.perf_counter() - start
        prediction = predictions.get(row.name)
        if prediction is not None:
            record["planner_peak_bytes"] = prediction.get("peak_bytes")
        result["updates"].append(record)
        _free(dev)
        save()
        print(f"update {row.name}: {json.dumps({k: v for k, v in record.items() if k != 'metrics'})}", flush=True)
    del backbone
    _free(dev)
    if not late():
        try:
            result["adjoint"] = adjoint_rows(dev, (1,) if tiny else adjoint_ks, tiny, deadline, 1 if tiny else 2)
        except Exception as err:  # noqa: BLE001
            result["adjoint_error"] = f"{type(err).__name__}: {err}"[:500]
        for r in result["adjoint"]:
            print(f"adjoint: {json.dumps(r)}", flush=True)
    save()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="the tiny SD3 config (CPU dry run)")
    parser.add_argument("--json", help="write the rows here (rewritten after each row)")
    parser.add_argument("--predictions", help="the planner's predictions (from --predict)")
    parser.add_argument("--predict", metavar="FILE", help="only ask the planner for every row; write FILE")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    args = parser.parse_args(argv)
    if args.predict:
        predictions = predict(update_rows(args.tiny, args.methods))
        with open(args.predict, "w") as f:
            json.dump(predictions, f, indent=1)
        print(f"planner: {f'{len(predictions)} predictions' if predictions else 'not available (issue 16)'}")
        return 0
    predictions = {}
    if args.predictions and os.path.exists(args.predictions):
        with open(args.predictions) as f:
            predictions = json.load(f)
    deadline = float(os.environ["FLOWKERN_DEADLINE"]) if os.environ.get("FLOWKERN_DEADLINE") else None
    result = run(torch.device(args.device), args.tiny, args.json, predictions, deadline, methods=args.methods)
    failed = [r for r in result["updates"] if "error" in r] + [r for r in result["adjoint"] if "error" in r]
    return 1 if failed or "adjoint_error" in result else 0


if __name__ == "__main__":
    sys.exit(main())

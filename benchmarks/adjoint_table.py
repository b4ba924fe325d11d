"""Print a markdown table of DRaFT-K gradient cost vs K: unrolled autograd, per-step checkpointing and
flowkern recomputation (M23), on the tiny SD3 transformer (see bench_adjoint.py for the setup).

    python benchmarks/adjoint_table.py [--model sd3-tiny|sd3-medium] [--device cpu|cuda] [--ks 1 3 5 10 20]

Seconds: the best of --repeats timed calls after one warm-up (the minimum is the estimate least
disturbed by other processes on a shared machine). Peak MB: exact peak above the entry
level during one call (CPU: profiler allocator events; CUDA: max_memory_allocated).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.bench_adjoint import KS, NUM_STEPS, STRATEGIES, make_problem, strategy_fn  # noqa: E402
from flowkern.profiling import peak_memory  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd3-tiny", choices=["sd3-tiny", "sd3-medium"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ks", type=int, nargs="+", default=list(KS))
    parser.add_argument("--steps", type=int, default=NUM_STEPS)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    problem = make_problem(args.model, args.device, num_steps=args.steps)
    print(
        f"{args.model}, latent {tuple(problem.x0.shape)} {str(problem.x0.dtype).removeprefix('torch.')}, "
        f"CFG [2B] batch, LoRA, N={args.steps}; device {args.device}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}"
    )
    print("Seconds and peak memory of one gradient computation from x_0 (rollout + K-step backward).\n")
    print("| K | strategy | seconds | peak MB |")
    print("|---:|---|---:|---:|")
    for K in args.ks:
        for strategy in STRATEGIES:
            fn = strategy_fn(problem, strategy, K)
            try:
                fn()  # warm-up
                times = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - start)
                peak = peak_memory(fn, problem.device) / 2**20
                print(f"| {K} | {strategy} | {min(times):.3f} | {peak:.1f} |", flush=True)
            except torch.OutOfMemoryError:
                for p in problem.params:
                    p.grad = None
                torch.cuda.empty_cache()
                print(f"| {K} | {strategy} | OOM | OOM |", flush=True)


if __name__ == "__main__":
    main()

"""CPU speed at SD3 512 px ([4, 16, 64, 64]), forward+backward: flowkern vs eager PyTorch vs torch.compile of the
eager expression, fp32 and bf16, in one process with the providers interleaved (the ops issue's targets: every loss
op >= 3x eager and >= 1.2x torch.compile; cfg_euler's training case >= 1.5x eager).

The eager expressions are the per-op benchmarks' (benchmarks/bench_<op>.py). CI smoke-runs one tiny case.
Run: python -m benchmarks.bench_cpu_speed [--threads 1 2] [--dtype fp32 bf16]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch

from benchmarks import bench_adjoint_matching_loss as am
from benchmarks import bench_cfg_euler as ce
from benchmarks import bench_consistency_residual as cr
from benchmarks import bench_vggflow_matching_loss as vg
from benchmarks.common import DTYPES
from flowkern.ops.backend import use_backend

SHAPE = (4, 16, 64, 64)


def _cases(shape, dtype) -> dict[str, tuple[Callable, Callable, list, list]]:
    """name -> (eager, fused, inputs, inputs that receive gradients); fused runs the default backend."""
    g = torch.Generator().manual_seed(0)
    rand = lambda: torch.randn(shape, generator=g).to(dtype)
    batch = shape[0]
    t = torch.rand(batch, generator=g)
    cases = {}
    v = rand().requires_grad_()
    cases["vggflow_matching_loss"] = (vg.eager, vg.fused, [v, rand(), rand() * 1e-5, rand(), t], [v])
    sigma = torch.rand(batch, generator=g) + 0.5
    for m in ("elementwise", "norm", "memoryless"):
        v = rand().requires_grad_()
        lct = 1e30 if m == "memoryless" else None
        cases[f"adjoint_matching_loss_{m}"] = (am.make_eager(m, lct), am.make_fused(m, lct),
                                               [v, rand(), rand() * am.LAM, sigma], [v])  # fmt: skip
    values = [rand().requires_grad_() for _ in range(3)]
    rho = torch.rand(batch, generator=g) + 0.5
    mask = cr._terminal_mask(batch, "cpu")
    loss = lambda f: lambda *a: (lambda out: out[0] + cr.ALPHA * out[1])(f(*a))
    inputs = [*values, *(rand() * 1e-5 for _ in range(3)), rand(), rand(), t * 0.9, rho, rho * 0.5, mask]
    cases["consistency_residual"] = (loss(cr.eager), loss(cr.fused), inputs, values)
    vu, vc = rand(), rand().requires_grad_()
    x = torch.randn(shape, generator=g)
    w, h = torch.full((batch,), ce.GUIDANCE), torch.full((batch,), 0.05)
    first = lambda f: lambda *a: f(*a)[0]  # the training case: gradient to v_cond through v only
    cases["cfg_euler"] = (first(ce.eager), first(ce.fused), [vu, vc, x, w, h, t], [vc])
    return cases


def _step(fn: Callable, inputs: list, grads: list) -> Callable:
    cot = {}

    def step():
        out = fn(*inputs)
        for x in grads:
            x.grad = None
        if out.dim() > 0 and "v" not in cot:  # cfg_euler's v: one fixed random cotangent (drawn once, not timed)
            cot["v"] = torch.randn_like(out)
        out.backward(cot["v"] if out.dim() > 0 else None)  # the training case: v's gradient from the matching loss

    return step


def _best_ms(fn: Callable, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def table(
    threads: int, dtypes: list[str], repeats: int = 15, shape=SHAPE, compiler: str = "inductor", ops=None
) -> list[tuple]:
    torch.set_num_threads(threads)
    rows = []
    for dname in dtypes:
        for name, (eager, fused, inputs, grads) in _cases(shape, DTYPES[dname]).items():
            if ops and name not in ops:
                continue
            providers = {
                "eager": _step(eager, inputs, grads),
                "compile": _step(torch.compile(eager, dynamic=False, backend=compiler), inputs, grads),
                "flowkern": _step(fused, inputs, grads),
            }
            for fn in providers.values():  # warm up (compilation, allocator)
                fn()
                fn()
            best = {k: float("inf") for k in providers}
            for _ in range(3):  # interleave: the three providers share the machine's noise
                for k, fn in providers.items():
                    best[k] = min(best[k], _best_ms(fn, repeats))
            rows.append((name, dname, threads, best["eager"], best["compile"], best["flowkern"]))
    return rows


def bench_cpu_speed_smoke(benchmark):
    """CI smoke: every case runs through all providers once at a tiny shape (no timing claims)."""
    with use_backend(None):
        rows = table(1, ["fp32"], repeats=1, shape=(2, 3, 4, 5), compiler="eager")  # Inductor: minutes in CI
    assert len(rows) == 6 and all(r[-1] > 0 for r in rows)
    benchmark.extra_info["rows"] = rows


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dtype", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--ops", nargs="*", help="only these rows (default: all)")
    args = parser.parse_args()
    print(f"{'op':34s} {'dtype':5s} {'thr':>3s} {'eager ms':>9s} {'compile ms':>10s} {'flowkern ms':>11s} "
          f"{'x eager':>7s} {'x compile':>9s}")  # fmt: skip
    for threads in args.threads:
        for name, dname, thr, e, c, f in table(threads, args.dtype, ops=args.ops):
            print(f"{name:34s} {dname:5s} {thr:3d} {e:9.2f} {c:10.2f} {f:11.2f} {e / f:7.2f} {c / f:9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

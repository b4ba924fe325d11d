"""GPU smoke of every fused op and mode: scripts/gpu_check.py runs it plainly and under compute-sanitizer.

Every case below (an op and one of its modes, with the inputs its tests/ops/test_<op>.py draws) runs on each
backend (cuda, triton) in fp32 and bf16 at three layouts: odd (3, 5, 7, 9), aligned (2, 16, 32, 32), and the
aligned shape misaligned on the device (every tensor one element past a 16-byte boundary). Checks:

- reference: outputs and input gradients (random cotangents) against the fp64 reference, with the tolerance rule
  of tests/utils.py (max error <= 2x that of the reference in the test dtype + atol);
- stream: the same call on a side stream gives bitwise the same outputs and gradients;
- graph: a CUDA graph of forward + backward, replayed after new values are copied into its inputs, gives bitwise
  what an eager call on those values gives. Skipped with PYTORCH_NO_CUDA_MEMORY_CACHING=1 (how gpu_check runs it
  under compute-sanitizer): capture allocates from the caching allocator's private pools.

On CPU (gpu_check --dry-run) the same plumbing runs the triton (interpreter) and cpp backends; stream and graph
need a GPU. Prints one line per failed check and a final count; --json writes every result.

    python scripts/gpu_check_smoke.py [--device cuda] [--layouts odd aligned misaligned] [--json FILE]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before flowkern is imported: Triton's CPU interpreter

from flowkern.ops.backend import HAS_CUDA_EXT, available_backends, use_backend  # noqa: E402
from tests.utils import assert_close_to_reference, misaligned  # noqa: E402

LAYOUTS = {"odd": (3, 5, 7, 9), "aligned": (2, 16, 32, 32), "misaligned": (2, 16, 32, 32)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Case:
    """An op and mode: tests/ops/<module>.py's make_inputs(shape, **kwargs) and call, the inputs with gradients."""

    name: str
    module: str
    kwargs: dict = field(default_factory=dict)
    grads: tuple[str, ...] = ()
    impls: str = "IMPLS"  # the backend table in flowkern/ops/<op>/__init__.py
    make: str = "make_inputs"
    call: str = "call"

    @property
    def op(self) -> str:
        return self.module.removeprefix("test_")


VALUE = ("c", "c_t", "c_x")
CASES = (
    Case("vggflow_matching_loss/quad", "test_vggflow_matching_loss", {}, ("v_ft",)),
    Case("vggflow_matching_loss/constant", "test_vggflow_matching_loss", {"eta_mode": "constant"}, ("v_ft",)),
    Case("adjoint_matching_loss/elementwise-p2", "test_adjoint_matching_loss", {"mode": "elementwise"}, ("v_ft",)),
    Case("adjoint_matching_loss/elementwise-p3", "test_adjoint_matching_loss", {"mode": "elementwise", "p": 3.0},
         ("v_ft",)),
    Case("adjoint_matching_loss/norm-p1.5", "test_adjoint_matching_loss", {"mode": "norm", "p": 1.5}, ("v_ft",)),
    Case("adjoint_matching_loss/memoryless", "test_adjoint_matching_loss", {"mode": "memoryless"}, ("v_ft",)),
    Case("cfg_euler/ode", "test_cfg_euler", {"mode": "ode"}, ("v_uncond", "v_cond", "x")),
    Case("cfg_euler/memoryless", "test_cfg_euler", {"mode": "memoryless"}, ("v_uncond", "v_cond", "x")),
    Case("cfg_euler/no-cfg", "test_cfg_euler", {"cfg": False}, ("v_cond", "x")),
    Case("adjoint_step/ode", "test_adjoint_step", {"mode": "ode"}, ("a", "vjp_u", "vjp_c")),
    Case("adjoint_step/memoryless", "test_adjoint_step", {"mode": "memoryless"}, ("a", "vjp_u", "vjp_c")),
    Case("adjoint_step/no-cfg", "test_adjoint_step", {"cfg": False}, ("a", "vjp_u")),
    Case("consistency_probes", "test_consistency_probes"),
    Case("consistency_residual", "test_consistency_residual", {}, VALUE),
    Case("consistency_residual_exact", "test_consistency_residual", {}, ("dG", "t3", "c"), "EXACT_IMPLS",
         "make_exact_inputs", "call_exact"),
    Case("reward_grad_clip", "test_reward_grad_clip"),
)  # fmt: skip


def _test_module(case: Case):
    return importlib.import_module(f"tests.ops.{case.module}")


def _impls(case: Case):
    return getattr(importlib.import_module(f"flowkern.ops.{case.op}"), case.impls)


def place(inputs: dict, dtype: torch.dtype, dev: torch.device, layout: str, grads: tuple[str, ...]) -> dict:
    """Data tensors (dim > 1) in `dtype` on `dev` (misaligned for that layout), per-sample coefficients as given."""
    out = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor) and v.dtype.is_floating_point and v.dim() > 1:
            w = v.detach().to(device=dev, dtype=dtype)
            if layout == "misaligned":
                w = misaligned(w)
            out[k] = w.requires_grad_(k in grads)
        elif isinstance(v, torch.Tensor):
            out[k] = v.to(dev)
        else:
            out[k] = v
    return out


def forward_backward(call, backend: str, inputs: dict, grads: tuple[str, ...], cots: list | None):
    """(outputs, input gradients): the forward, then autograd.grad of sum_i <out_i, cot_i> (no CPU work inside)."""
    with use_backend(backend):
        outs = call(**inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        pairs = [(o, c) for o, c in zip(outs, cots or ()) if c is not None and o.requires_grad]
        if not grads or not pairs:
            return outs, tuple(None for _ in grads)
        params = [inputs[n] for n in grads]
        got = torch.autograd.grad([o for o, _ in pairs], params, [c for _, c in pairs], allow_unused=True)
    return outs, tuple(got)


def cotangents(call, inputs: dict, grads: tuple[str, ...], seed: int = 1) -> list:
    """Random cotangents (drawn on the CPU in fp64) for the differentiable outputs, on the outputs' device/dtype."""
    with use_backend("torch"), torch.no_grad():
        outs = call(**inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator().manual_seed(seed)
    cots = []
    for o in outs:
        if grads and o.is_floating_point():
            cots.append(torch.randn(o.shape, generator=g, dtype=torch.float64).to(device=o.device, dtype=o.dtype))
        else:
            cots.append(None)
    return cots


def _equal(a: tuple, b: tuple, what: str) -> None:
    for i, (x, y) in enumerate(zip(a, b)):
        if (x is None) != (y is None):
            raise AssertionError(f"{what} {i}: one side has no value")
        if x is not None and not torch.equal(x, y):
            diff = (x.double() - y.double()).abs().max().item()
            raise AssertionError(f"{what} {i} differs (max abs difference {diff:.3e})")


def check_reference(case: Case, backend: str, dtype: torch.dtype, dev: torch.device, layout: str):
    mod = _test_module(case)
    raw = getattr(mod, case.make)(LAYOUTS[layout], **case.kwargs)
    call = getattr(mod, case.call)
    x = place(raw, dtype, dev, layout, case.grads)
    hi = place(raw, torch.float64, dev, "aligned", case.grads)
    lo_ref = place(raw, dtype, dev, "aligned", case.grads)
    cots = cotangents(call, x, case.grads)
    y_hi, g_hi = forward_backward(call, "torch", hi, case.grads, [c.double() if c is not None else None for c in cots])
    y_ref, g_ref = forward_backward(call, "torch", lo_ref, case.grads, cots)
    y, g = forward_backward(call, backend, x, case.grads, cots)
    assert len(y) == len(y_hi), f"{len(y)} outputs, the reference has {len(y_hi)}"
    for i, (a, b, c) in enumerate(zip(y, y_ref, y_hi)):
        assert_close_to_reference(a, b, c, dtype, f"output {i}")
    for name, a, b, c in zip(case.grads, g, g_ref, g_hi):
        if c is None:
            assert a is None or not a.abs().any(), f"unexpected gradient for {name}"
            continue
        assert a is not None, f"no gradient for {name}"
        assert_close_to_reference(a, b, c, dtype, f"d/d{name}")
    return x, call, cots, (y, g)


def check_stream(case, backend, x, call, cots, expected) -> None:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y, g = forward_backward(call, backend, x, case.grads, cots)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    _equal(y, expected[0], "side-stream output")
    _equal(g, expected[1], "side-stream gradient")


def check_graph(case, backend, x, call, cots) -> None:
    """Capture forward + backward on `x`, copy new values into x's tensors, replay, compare with an eager call."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            forward_backward(call, backend, x, case.grads, cots)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_graph, g_graph = forward_backward(call, backend, x, case.grads, cots)
    with torch.no_grad():  # new inputs: the batch reversed and scaled (coefficients keep their samples)
        for v in x.values():
            if isinstance(v, torch.Tensor) and v.dim() > 1:
                v.copy_(0.9 * v.flip(0))
    graph.replay()
    torch.cuda.synchronize()
    y, g = forward_backward(call, backend, x, case.grads, cots)
    _equal(y_graph, y, "graph-replay output")
    _equal(g_graph, g, "graph-replay gradient")


def backends_for(dev: torch.device) -> list[str]:
    return ["cuda", "triton"] if dev.type == "cuda" else ["triton", "cpp"]


def run(dev: torch.device, layouts, dtypes, checks, cases=CASES, deadline: float | None = None) -> list[dict]:
    no_cache = os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING") == "1"
    results = []

    def record(case, backend, dtype_name, layout, check, error=None, skipped=None):
        results.append({"case": case.name, "backend": backend, "dtype": dtype_name, "layout": layout,
                        "check": check, "ok": error is None and skipped is None, "error": error,
                        "skipped": skipped})  # fmt: skip
        if error is not None:
            print(f"FAIL {case.name} {backend} {dtype_name} {layout} {check}: {error}", flush=True)

    # every case once before any case twice: a run stopped by its deadline has covered every op and mode
    combos = [(d, lay, c, b) for d in dtypes for lay in layouts for c in cases for b in backends_for(dev)]
    for dtype_name, layout, case, backend in combos:
        impls = _impls(case)
        if deadline is not None and time.time() > deadline:
            record(case, backend, dtype_name, layout, "reference", skipped="out of time")
            continue
        if backend not in available_backends(impls, dev):
            why = "flowkern._C has no CUDA kernels" if backend == "cuda" and not HAS_CUDA_EXT else ""
            record(case, backend, dtype_name, layout, "reference", f"backend unavailable {why}".strip())
            continue
        try:
            x, call, cots, expected = check_reference(case, backend, DTYPES[dtype_name], dev, layout)
            record(case, backend, dtype_name, layout, "reference")
        except Exception as err:  # noqa: BLE001 - every case is tried; failures are the findings
            record(case, backend, dtype_name, layout, "reference", f"{type(err).__name__}: {err}")
            continue
        if dev.type != "cuda":
            continue
        if "stream" in checks:
            try:
                check_stream(case, backend, x, call, cots, expected)
                record(case, backend, dtype_name, layout, "stream")
            except Exception as err:  # noqa: BLE001
                record(case, backend, dtype_name, layout, "stream", f"{type(err).__name__}: {err}")
        if "graph" in checks and layout != "odd":
            if no_cache:
                record(case, backend, dtype_name, layout, "graph", skipped="caching allocator disabled")
                continue
            try:
                check_graph(case, backend, x, call, cots)
                record(case, backend, dtype_name, layout, "graph")
            except Exception as err:  # noqa: BLE001
                record(case, backend, dtype_name, layout, "graph", f"{type(err).__name__}: {err}")
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--checks", nargs="+", default=["reference", "stream", "graph"])
    parser.add_argument("--cases", nargs="*", help="case names (default: all)")
    parser.add_argument("--json", help="write every result here")
    args = parser.parse_args(argv)
    dev = torch.device(args.device)
    deadline = float(os.environ["FLOWKERN_DEADLINE"]) if os.environ.get("FLOWKERN_DEADLINE") else None
    cases = [c for c in CASES if not args.cases or c.name in args.cases]
    torch.manual_seed(0)
    start = time.time()
    results = run(dev, args.layouts, args.dtypes, args.checks, cases, deadline)
    failed = [r for r in results if r["error"] is not None]
    skipped = [r for r in results if r["skipped"] is not None]
    summary = {"device": str(dev), "checks": len(results), "passed": len(results) - len(failed) - len(skipped),
               "failed": len(failed), "skipped": len(skipped), "seconds": round(time.time() - start, 1),
               "no_caching_allocator": os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING") == "1"}  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "results": results}, f, indent=1)
    print("smoke:", json.dumps(summary), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Launches per call of the Triton loss ops (issue 13): each forward is one Triton launch and nothing else (two for
'norm' with p != 2), the backward at most one kernel. Counted under the interpreter on CPU (harness.count_launches),
the backends called with the native op's arguments as the public functions pass them."""

from __future__ import annotations

import pytest
import torch

from flowkern.ops.backend import HAS_TRITON
from tests.ops.harness import count_launches, op_module

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="needs triton")

B, D = 3, 40
INF = float("inf")


def _cases():
    vg, am, cr = (op_module(n) for n in ("vggflow_matching_loss", "adjoint_matching_loss", "consistency_residual"))
    t = torch.tensor([0.2, 0.5, 0.9])
    mask = torch.tensor([0.0, 1.0, 1.0])
    return {
        "vggflow t=[B]": (1, lambda v, x: vg.IMPLS["triton"](v, *x[:3], t, 0.0, 2.0, "quad")[:1]),
        "vggflow t=float": (1, lambda v, x: vg.IMPLS["triton"](v, *x[:3], None, 0.3, 2.0, "quad")[:1]),
        "adjoint elementwise": (1, lambda v, x: am.IMPLS["triton"](v, *x[:2], 0.5, 1.5, "elementwise", None, 0, INF)),
        "adjoint norm p=2": (1, lambda v, x: am.IMPLS["triton"](v, *x[:2], 0.5, 2.0, "norm", None, 0.0, INF)),
        "adjoint norm p=3": (2, lambda v, x: am.IMPLS["triton"](v, *x[:2], 0.5, 3.0, "norm", None, 0.0, INF)),
        "adjoint memoryless": (1, lambda v, x: am.IMPLS["triton"](v, *x[:2], 0.5, 2.0, "memoryless", t, 0.0, 50.0)),
        "adjoint memoryless float": (
            1,
            lambda v, x: am.IMPLS["triton"](v, *x[:2], 0.5, 2.0, "memoryless", None, 0.7, 50.0),
        ),
        "consistency_residual": (
            1,
            lambda v, x: cr.IMPLS["triton"](v, *x[:7], t, 0.0, 2.0, "quad", 0.05, 0.1, None, 1.0, t[0], 0.0, mask, 0.0),
        ),
        "consistency_residual_exact": (1, lambda v, x: cr.EXACT_IMPLS["triton"](v, *x[:2], None, 1.0)),
    }


@pytest.mark.parametrize("case", list(_cases()))
def test_triton_loss_launches(case):
    from flowkern.ops._triton import tickets

    tickets(torch.device("cpu"), 64)  # the ticket counters are allocated (zero-filled) once per device
    n_forward, call = _cases()[case]
    g = torch.Generator().manual_seed(0)
    v = torch.randn(B, D, generator=g).requires_grad_()
    x = [torch.randn(B, D, generator=g) for _ in range(7)]
    out = []
    forward = count_launches(lambda: out.extend(call(v, x)))
    assert forward["aten"] == [], forward
    assert len(forward["triton"]) == n_forward, forward
    losses = [y for y in out if y.dim() == 0]
    assert all(torch.isfinite(y) for y in losses)
    cotangents = [torch.tensor(0.5) for _ in losses]
    backward = count_launches(lambda: torch.autograd.grad(losses, v, cotangents))
    # _local_scalar_dense: the CPU-only check for a cotangent of exactly 1 (no kernel on a GPU)
    kernels = backward["triton"] + [name for name in backward["aten"] if name != "_local_scalar_dense"]
    assert len(kernels) <= 1, backward

"""Edge cases every op defines on every backend: zero features per sample ([B, 0]) gives the reference's result
(NaN means, zero sums and norms, empty tensors) without an invalid launch; Python-float coefficients equal tensors."""

import pytest
import torch

import flowkern
from tests.ops.harness import cpu_backends, op_module

EMPTY = (2, 0)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.shape == b.shape
        and a.dtype == b.dtype
        and torch.equal(a.isnan(), b.isnan())
        and torch.equal(a.nan_to_num(), b.nan_to_num())
    )


def _calls():
    z = lambda: torch.zeros(EMPTY)
    t = torch.tensor([0.2, 0.7])
    return {
        "vggflow_matching_loss": lambda: (flowkern.vggflow_matching_loss(z(), z(), z(), z(), t, 2.0),),
        "adjoint_matching_loss": lambda: (
            flowkern.adjoint_matching_loss(z(), z(), z(), 0.5),
            flowkern.adjoint_matching_loss(z(), z(), z(), 0.5, 3.0, "norm"),
            flowkern.adjoint_matching_loss(z(), z(), z(), 0.5, mode="memoryless", sigma=1.0, lct=10.0),
        ),
        "reward_grad_clip": lambda: flowkern.reward_grad_clip(z(), 1.0),
        "consistency_probes": lambda: flowkern.consistency_probes(z(), z(), z(), z(), t, 2.0),
        "consistency_residual": lambda: flowkern.consistency_residual(
            *(z() for _ in range(8)), t, 2.0, "quad", 1e-3, 1e-3, 1.0, 1.0, torch.tensor([1.0, 0.0])
        ),
        "cfg_euler": lambda: flowkern.cfg_euler(z(), z(), z(), 4.0, 0.1, t),
        "adjoint_step": lambda: flowkern.adjoint_step(z(), z(), 0.1, z(), 2.0, return_cot=True),
    }


@pytest.mark.parametrize("op", list(_calls()))
def test_zero_features_per_sample(op):
    call = _calls()[op]
    with flowkern.use_backend("torch"):
        expected = call()
    for backend in cpu_backends(op_module(op).IMPLS):
        with flowkern.use_backend(backend):
            got = call()
        for a, b in zip(got, expected):
            assert _same(a, b), f"{op} on {backend}: {a} != reference {b}"


@pytest.mark.parametrize("backend", cpu_backends(op_module("vggflow_matching_loss").IMPLS))
def test_float_and_tensor_coefficients_agree(backend):
    """A Python float reaches the kernels as a scalar; it must give what the same value as a [B] tensor gives."""
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(3, 4, 5, generator=g) for _ in range(4)]
    with flowkern.use_backend(backend):
        as_float = flowkern.vggflow_matching_loss(*x, 0.3, 2.0)
        as_zero_dim = flowkern.vggflow_matching_loss(*x, torch.tensor(0.3), 2.0)
        as_tensor = flowkern.vggflow_matching_loss(*x, torch.full((3,), 0.3), 2.0)
    assert torch.equal(as_float, as_tensor) and torch.equal(as_zero_dim, as_tensor)

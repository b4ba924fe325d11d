"""Samplers (flowkern/sampling.py): time grids (M2, M4), Euler + CFG (M5), memoryless (M29, M30), subsampling (M22)."""

from __future__ import annotations

import math

import pytest
import torch

from flowkern.sampling import (
    memoryless_coefficients,
    sample_euler,
    sample_memoryless,
    sd3_shifted_grid,
    subsample_transitions,
    uniform_grid,
    validate_grid,
)
from tests.models_tiny import MLPCFGVelocity, MLPVelocity

# (M4), N = 20
M4_TIMES = [0, .0181, .0376, .0586, .0813, .1060, .1328, .1621, .1943, .2298, .2690, .3128, .3618, .4171, .4799,
            .5521, .6356, .7337, .8502, .9911, 1]  # fmt: skip


def linear_field(x, t):
    """An analytic velocity v = -x/2 + t (any shape, t 0-dim or [B])."""
    t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
    return -0.5 * x + t


def literal_euler(velocity, x, ts, w=None):
    """(M2) and (M5) written out."""
    states, vs = [x], []
    for i in range(len(ts) - 1):
        t, h = ts[i], float(ts[i + 1] - ts[i])
        out = velocity(x, torch.tensor(t, dtype=x.dtype))
        v = out if w is None else out[0] + w * (out[1] - out[0])
        x = x + h * v
        states.append(x)
        vs.append(v)
    return torch.stack(states), torch.stack(vs)


# ---------------------------------------------------------------- grids
def test_uniform_grid():
    ts = uniform_grid(4)
    assert ts.dtype == torch.float64
    assert ts.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_sd3_grid_matches_math_md():
    ts = sd3_shifted_grid(20)
    assert ts.shape == (21,) and ts[0] == 0 and ts[-1] == 1
    torch.testing.assert_close(ts, torch.tensor(M4_TIMES, dtype=torch.float64), atol=5.1e-5, rtol=0)
    h = ts[1:] - ts[:-1]
    for i, value in ((0, 0.0181), (18, 0.1409), (19, 0.0089)):
        assert abs(h[i].item() - value) <= 1e-4, (i, h[i].item())
    s_min = 3.0 * 1e-3 / (1 + 2.0 * 1e-3)
    assert abs(s_min - 0.0029940) < 1e-7
    assert abs((1 - ts[-2]).item() - 3 * s_min / (1 + 2 * s_min)) < 1e-12  # the last nonzero sigma: shifted twice


@pytest.mark.parametrize("shift", [1.0, 3.0, 4.5])
@pytest.mark.parametrize("num_steps", [2, 7, 20, 28, 50])
def test_sd3_grid_matches_diffusers_scheduler(num_steps, shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(num_steps)
    expected = 1 - scheduler.sigmas.to(torch.float64)  # t = 1 - sigma (M3)
    torch.testing.assert_close(sd3_shifted_grid(num_steps, shift=shift), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "ts, match",
    [
        ([0.0, 0.5, 0.5, 1.0], "strictly increasing"),
        ([0.0, 0.7, 0.3, 1.0], "strictly increasing"),
        ([0.1, 0.5, 1.0], "start at t=0"),
        ([0.0, 0.5, 0.9], "end at t=1"),
        ([0.0, float("nan"), 1.0], "finite"),
        ([0.0], "N >= 1"),
        (torch.zeros(2, 2, 2), r"\[N\+1\]"),
    ],
)
def test_validate_grid_rejects(ts, match):
    with pytest.raises(ValueError, match=match):
        validate_grid(ts)


def test_validate_grid_accepts_lists_and_per_sample():
    assert validate_grid([0, 0.3, 1]).tolist() == [0.0, 0.3, 1.0]
    per_sample = torch.stack([uniform_grid(3), torch.tensor([0.0, 0.5, 0.9, 1.0], dtype=torch.float64)], dim=1)
    assert validate_grid(per_sample).shape == (4, 2)
    with pytest.raises(TypeError, match="ts"):
        validate_grid("0, 1")
    with pytest.raises(ValueError, match="num_steps"):
        sd3_shifted_grid(1)
    with pytest.raises(ValueError, match="shift"):
        sd3_shifted_grid(10, shift=0.0)


# ---------------------------------------------------------------- Euler sampler
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_euler_matches_literal_loop(dtype):
    ts = sd3_shifted_grid(8)
    x0 = torch.randn(3, 4, 5, dtype=dtype)
    traj = sample_euler(linear_field, x0, ts, return_velocities=True)
    states, vs = literal_euler(linear_field, x0, ts.tolist())
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert traj.states.shape == (9, 3, 4, 5) and traj.velocities.shape == (8, 3, 4, 5)
    torch.testing.assert_close(traj.states, states, atol=tol, rtol=tol)
    torch.testing.assert_close(traj.velocities, vs, atol=tol, rtol=tol)
    assert torch.equal(traj.states[0], x0) and torch.equal(traj.ts, ts)


def test_euler_exact_linear_flow_converges():
    """v = -x/2 + t has x(1) = e^{-1/2} x0 + (2 + ... ) per (M1): check the Euler error shrinks O(h)."""
    x0 = torch.randn(2, 3, dtype=torch.float64)

    def exact(x, t):  # x' = -x/2 + t  =>  x(t) = (x0 + 4) e^{-t/2} + 2t - 4
        return (x + 4) * math.exp(-t / 2) + 2 * t - 4

    errors = [(sample_euler(linear_field, x0, uniform_grid(n)).final - exact(x0, 1.0)).abs().max() for n in (10, 20)]
    assert 1.8 < errors[0] / errors[1] < 2.2


@pytest.mark.parametrize("w", [1.0, 4.5])
def test_euler_cfg_pair_matches_literal_loop(w):
    model = MLPVelocity(dim=12, hidden=32, num_classes=3).double()
    velocity = MLPCFGVelocity(model, torch.tensor([0, 2]), guidance_scale=w)
    ts = sd3_shifted_grid(6)
    x0 = torch.randn(2, 3, 4, dtype=torch.float64)
    traj = sample_euler(velocity.pair, x0, ts, guidance_scale=w, return_velocities=True)
    states, vs = literal_euler(velocity.pair, x0, ts.tolist(), w=w)
    torch.testing.assert_close(traj.states, states, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(traj.velocities, vs, atol=1e-12, rtol=1e-12)
    # the same CFG done by the callable itself (a FlowModel-like combined velocity)
    combined = sample_euler(velocity, x0, ts)
    torch.testing.assert_close(combined.states, traj.states, atol=1e-12, rtol=1e-12)


def test_euler_flow_model_and_cond():
    from flowkern.models.base import ResidualFlowModel

    class Base(torch.nn.Module):
        def forward(self, x, t, cond):
            return linear_field(x, t) * cond

    residual = MLPVelocity(dim=6, hidden=16).double()

    class Residual(torch.nn.Module):
        def forward(self, x, t, cond):
            return residual(x, t)

    flow = ResidualFlowModel(Base(), Residual())
    cond = torch.tensor([1.0, 2.0], dtype=torch.float64).view(2, 1, 1)
    x0 = torch.randn(2, 2, 3, dtype=torch.float64)
    ts = uniform_grid(5)
    traj = sample_euler(flow, x0, ts, cond)
    states, _ = literal_euler(lambda x, t: flow.velocity(x, t, cond), x0, ts.tolist())
    torch.testing.assert_close(traj.states, states, atol=1e-12, rtol=1e-12)
    plain = sample_euler(lambda x, t, c: flow.velocity(x, t, c), x0, ts, cond)  # callable with cond
    assert torch.equal(plain.states, traj.states)


def test_euler_reproducible_and_no_graph():
    model = MLPVelocity(dim=16, hidden=32)
    assert all(p.requires_grad for p in model.parameters())
    ts = sd3_shifted_grid(5)
    runs = [sample_euler(model, (4, 16), ts, generator=torch.Generator().manual_seed(s)) for s in (7, 7, 8)]
    assert torch.equal(runs[0].states, runs[1].states)
    assert not torch.equal(runs[0].states, runs[2].states)
    expected_x0 = torch.randn(4, 16, generator=torch.Generator().manual_seed(7))
    assert torch.equal(runs[0].states[0], expected_x0)
    assert not runs[0].states.requires_grad and runs[0].states.grad_fn is None
    with pytest.raises(ValueError, match="Generator"):
        sample_euler(model, (4, 16), ts)


def test_euler_store_dtype_and_device():
    ts = uniform_grid(4)
    x0 = torch.randn(2, 8)
    full = sample_euler(linear_field, x0, ts, return_velocities=True)
    low = sample_euler(linear_field, x0, ts, return_velocities=True, store_dtype=torch.bfloat16, store_device="cpu")
    assert low.states.dtype == torch.bfloat16 and low.velocities.dtype == torch.bfloat16
    # integration stays in x0's dtype: the stored states are the rounded full-precision ones
    assert torch.equal(low.states, full.states.to(torch.bfloat16))
    assert low.num_steps == 4 and torch.equal(low.final, low.states[-1])


def test_euler_per_sample_grid():
    x0 = torch.randn(2, 3, dtype=torch.float64)
    grids = [uniform_grid(4), sd3_shifted_grid(4)]
    traj = sample_euler(linear_field, x0, torch.stack(grids, dim=1))
    for b, grid in enumerate(grids):
        single = sample_euler(linear_field, x0[b : b + 1], grid)
        torch.testing.assert_close(traj.states[:, b : b + 1], single.states, atol=1e-14, rtol=0)


def test_euler_bad_velocity_outputs():
    ts, x0 = uniform_grid(2), torch.randn(2, 3)
    with pytest.raises(ValueError, match="guidance_scale"):
        sample_euler(lambda x, t: (x, x), x0, ts)
    with pytest.raises(ValueError, match="guidance_scale"):
        sample_euler(linear_field, x0, ts, guidance_scale=2.0)
    with pytest.raises(ValueError, match="shape"):
        sample_euler(lambda x, t: x[:1], x0, ts)
    with pytest.raises(TypeError, match="velocity"):
        sample_euler(3, x0, ts)


# ---------------------------------------------------------------- memoryless sampler (M29, M30)
def test_memoryless_coefficients_m29():
    ts = uniform_grid(40)
    sigma, kappa = memoryless_coefficients(ts)
    h = 1 / 40
    for i in (0, 17, 39):
        t = i / 40
        assert abs(sigma[i].item() - math.sqrt(2 * (1 - t + h) / (t + h))) < 1e-12
        assert abs(kappa[i].item() - 1 / (t + h)) < 1e-12


@pytest.mark.parametrize("w", [None, 3.0])
def test_memoryless_matches_literal_loop(w):
    model = MLPVelocity(dim=12, hidden=32, num_classes=2)
    velocity = MLPCFGVelocity(model, torch.tensor([1, 0, 1]), guidance_scale=w)
    fn = velocity if w is None else velocity.pair
    n = 12
    ts = uniform_grid(n)
    generator = torch.Generator().manual_seed(3)
    traj = sample_memoryless(fn, (3, 12), ts, generator, guidance_scale=w)

    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 12, generator=g)
    expected = [x]
    with torch.no_grad():
        for i in range(n):
            t, h = i / n, 1 / n
            sigma, kappa = math.sqrt(2 * (1 - t + h) / (t + h)), 1 / (t + h)  # (M29)
            out = fn(x, torch.tensor(t))
            v = out if w is None else out[0] + w * (out[1] - out[0])
            x = x + h * (2 * v - kappa * x)  # (M30)
            if i < n - 1:  # the last step is noiseless
                x = x + math.sqrt(h) * sigma * torch.randn(x.shape, generator=g)
            expected.append(x)
    torch.testing.assert_close(traj.states, torch.stack(expected), atol=1e-5, rtol=1e-5)
    # x_0 and exactly N-1 noise draws: both generators end in the same state
    assert torch.equal(torch.rand(4, generator=generator), torch.rand(4, generator=g))


def test_memoryless_custom_schedule_and_errors():
    ts = uniform_grid(4)
    x0 = torch.randn(2, 3, dtype=torch.float64)
    zero = sample_memoryless(linear_field, x0, ts, torch.Generator(), sigma=torch.zeros(4), kappa=[0.0] * 4)
    # sigma = 0, kappa = 0: Euler with twice the velocity
    doubled = sample_euler(lambda x, t: 2 * linear_field(x, t), x0, ts)
    torch.testing.assert_close(zero.states, doubled.states, atol=1e-14, rtol=0)
    with pytest.raises(ValueError, match="sigma"):
        sample_memoryless(linear_field, x0, ts, torch.Generator(), sigma=torch.zeros(3))
    with pytest.raises(TypeError, match="generator"):
        sample_memoryless(linear_field, x0, ts, None)


# ---------------------------------------------------------------- subsampling (M22)
def test_subsample_transitions_m22():
    n, batch = 20, 400
    picks = subsample_transitions(n, batch, torch.Generator().manual_seed(0))
    assert len(picks) == batch and all(len(p) == 6 for p in picks)  # n_bin = 5 bins + the last transition
    seen = [set() for _ in range(5)]
    for row in picks:
        assert row[0] == n - 1
        for k, i in enumerate(row[1:]):
            assert max(4 * k, 1) <= i <= 4 * k + 3, (k, i)
            seen[k].add(i)
    assert seen[0] == {1, 2, 3} and all(seen[k] == set(range(4 * k, 4 * k + 4)) for k in range(1, 5))
    assert len({tuple(p) for p in picks}) > 1  # independent per trajectory
    again = subsample_transitions(n, batch, torch.Generator().manual_seed(0))
    assert again == picks


def test_subsample_transitions_uneven_bins_and_errors():
    picks = subsample_transitions(10, 50, torch.Generator().manual_seed(1), fraction=0.3)  # n_bin = 3
    bins = [(0, 2), (3, 5), (6, 9)]  # floor(kN/n_bin) .. floor((k+1)N/n_bin) - 1
    for row in picks:
        assert len(row) == 4 and row[0] == 9
        assert all(max(lo, 1) <= i <= hi for i, (lo, hi) in zip(row[1:], bins))
    assert subsample_transitions(3, 1, fraction=0.01)[0][0] == 2  # at least one bin
    with pytest.raises(ValueError, match="fraction"):
        subsample_transitions(20, 2, fraction=0.0)
    with pytest.raises(ValueError, match="batch_size"):
        subsample_transitions(20, 0)
    with pytest.raises(ValueError, match="num_steps"):
        subsample_transitions(1, 2)

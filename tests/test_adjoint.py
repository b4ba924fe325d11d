"""The truncated adjoint engine (flowkern/adjoint.py): exactness against unrolled autograd (M23),
the lean adjoint (M25, M31), bf16 models, LoRA, the terminal reward gradient, bad input."""

from __future__ import annotations

import pytest
import torch

import flowkern
from flowkern.adjoint import lean_adjoint, terminal_reward_grad, truncated_backprop
from flowkern.sampling import sample_euler, sd3_shifted_grid, uniform_grid
from tests.models_tiny import (
    MLPCFGVelocity,
    MLPVelocity,
    SD3Velocity,
    add_lora,
    sd3_conditioning,
    tiny_sd3_transformer,
)
from tests.utils import peak_memory

N = 5
W = 4.0  # guidance scale
SD3_SHAPE = (2, 4, 16, 16)  # 64 tokens: a cropped position embedding, 4x cheaper than 32x32


# ---------------------------------------------------------------- models
def build(model: str, cfg: bool, dtype: torch.dtype, trainable: bool = True):
    """(velocity (CFG-combined when cfg), CFG branches callable or None, trainable params, state shape)."""
    w = W if cfg else None
    if model == "mlp":
        net = MLPVelocity(dim=24, hidden=48, num_classes=3).to(dtype).requires_grad_(trainable)
        velocity = MLPCFGVelocity(net, torch.tensor([0, 2]), guidance_scale=w)
        shape = (2, 3, 8)
    else:
        net = tiny_sd3_transformer(dtype=dtype).requires_grad_(trainable)
        text, pooled = sd3_conditioning(2, dtype=dtype)
        velocity = SD3Velocity(net, text, pooled, guidance_scale=w, negative_embeds=0.5 * text.flip(0))
        shape = SD3_SHAPE
    params = [p for p in net.parameters() if p.requires_grad]
    return velocity, (velocity.branches if cfg else None), params, shape


def grid_values(ts: torch.Tensor, dtype: torch.dtype):
    """t_i as the engine passes them (0-dim, fp32/fp64) and h_i as Python floats from fp64 differences."""
    tdtype = torch.float64 if dtype == torch.float64 else torch.float32
    return ts.to(tdtype), [float(h) for h in ts[1:] - ts[:-1]]


def unrolled(velocity, x0, ts, K, terminal_grad, step=None):
    """Plain autograd through the last K steps (M2), from x_{N-K} held constant.

    Returns (states x_0..x_N, adjoints a_{N-K}..a_N as grads of <terminal_grad, x_N>); parameter
    gradients accumulate in .grad. ``step(x, v, i)`` overrides the Euler update (memoryless map).
    """
    n = ts.shape[0] - 1
    t, h = grid_values(ts, x0.dtype)
    step = step or (lambda x, v, i: x + h[i] * v)
    states = [x0]
    with torch.no_grad():
        for i in range(n - K):
            states.append(step(states[-1], velocity(states[-1], t[i]), i))
    x = states[-1].clone().requires_grad_()
    xs = [x]
    for i in range(n - K, n):
        xs.append(step(xs[-1], velocity(xs[-1], t[i]), i))
        xs[-1].retain_grad()
    torch.autograd.backward(xs[-1], terminal_grad)
    states += [s.detach() for s in xs[1:]]
    adjoints = [s.grad for s in xs[:-1]] + [terminal_grad]
    return states, adjoints


def grads_of(params):
    out = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return out


def assert_rel(actual, expected, tol, name):
    err = (actual.double() - expected.double()).abs().max().item()
    scale = max(expected.double().abs().max().item(), 1e-30)
    assert err <= tol * scale, f"{name}: relative error {err / scale:.3e} > {tol:g}"


# ---------------------------------------------------------------- exactness (M23)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("K", [1, 3, N])
@pytest.mark.parametrize("cfg", [False, True], ids=["nocfg", "cfg"])
@pytest.mark.parametrize("model", ["mlp", "sd3"])
def test_truncated_backprop_equals_unrolled_autograd(model, cfg, K, dtype):
    velocity, _, params, shape = build(model, cfg, dtype)
    ts = sd3_shifted_grid(N)
    x0 = torch.randn(shape, dtype=dtype)
    a_N = torch.randn(shape, dtype=dtype)
    states, ref_adjoints = unrolled(velocity, x0, ts, K, a_N)
    ref_grads = grads_of(params)

    a = truncated_backprop(velocity, states, ts, a_N, K)
    grads = grads_of(params)
    assert a.dtype == dtype
    if dtype == torch.float64:  # bitwise: same operations in autograd's order (M23)
        assert torch.equal(a, ref_adjoints[0])
        for p, g, r in zip(params, grads, ref_grads):
            assert torch.equal(g, r), p.shape
    else:
        assert_rel(a, ref_adjoints[0], 1e-5, "a_{N-K}")
        for g, r in zip(grads, ref_grads):
            assert_rel(g, r, 1e-5, "parameter gradient")
    # stacked states give the same result
    truncated_backprop(velocity, torch.stack(states), ts, a_N, K)
    assert all(torch.equal(g, r) for g, r in zip(grads_of(params), grads))


def test_truncated_backprop_lora_sd3():
    transformer = tiny_sd3_transformer(dtype=torch.float64)
    lora = add_lora(transformer)
    text, pooled = sd3_conditioning(2, dtype=torch.float64)
    velocity = SD3Velocity(transformer, text, pooled, guidance_scale=W)
    ts, K = sd3_shifted_grid(N), 3
    x0, a_N = torch.randn(SD3_SHAPE, dtype=torch.float64), torch.randn(SD3_SHAPE, dtype=torch.float64)
    states, ref_adjoints = unrolled(velocity, x0, ts, K, a_N)
    ref = grads_of(lora)
    a = truncated_backprop(velocity, states, ts, a_N, K)
    assert torch.equal(a, ref_adjoints[0])
    assert all(torch.equal(g, r) for g, r in zip(grads_of(lora), ref))
    assert all(p.grad is None for p in transformer.parameters() if not p.requires_grad)
    assert any(r.abs().max() > 0 for r in ref)


def test_truncated_backprop_accumulates_onto_grad():
    velocity, _, params, shape = build("mlp", False, torch.float64)
    ts = uniform_grid(4)
    states = sample_euler(velocity, torch.randn(shape, dtype=torch.float64), ts).states
    a_N = torch.randn(shape, dtype=torch.float64)
    truncated_backprop(velocity, states, ts, a_N, 2)
    once = [p.grad.clone() for p in params]
    truncated_backprop(velocity, list(states), ts, a_N, 2)
    for p, g in zip(params, once):
        torch.testing.assert_close(p.grad, 2 * g, rtol=1e-15, atol=0)


@pytest.mark.parametrize("reentrant", [False, True])
def test_truncated_backprop_checkpointed_velocity(reentrant):
    """Activation checkpointing inside the velocity (e.g. diffusers' per-block hook) changes nothing."""
    from torch.utils.checkpoint import checkpoint

    velocity, _, params, shape = build("mlp", False, torch.float64)
    ts = sd3_shifted_grid(4)
    states = sample_euler(velocity, torch.randn(shape, dtype=torch.float64), ts).states
    a_N = torch.randn(shape, dtype=torch.float64)
    a = truncated_backprop(velocity, states, ts, a_N, 3)
    plain = grads_of(params)
    wrapped = lambda x, t: checkpoint(velocity, x, t, use_reentrant=reentrant)
    assert torch.equal(truncated_backprop(wrapped, states, ts, a_N, 3), a)
    assert all(torch.equal(g, r) for g, r in zip(grads_of(params), plain))


def test_truncated_backprop_per_sample_grid():
    velocity, _, params, shape = build("mlp", False, torch.float64)
    grids = [sd3_shifted_grid(4), uniform_grid(4)]
    ts = torch.stack(grids, dim=1)  # [N+1, B]
    x0, a_N = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    states = sample_euler(velocity, x0, ts).states
    a = truncated_backprop(velocity, states, ts, a_N, 3)
    grads = grads_of(params)
    # reference: per-sample h through plain autograd from the same states
    x = states[1].clone().requires_grad_()
    y = x
    for i in range(1, 4):
        h = (ts[i + 1] - ts[i]).view(-1, 1, 1)
        y = y + h * velocity(y, ts[i])
    torch.autograd.backward(y, a_N)
    torch.testing.assert_close(a, x.grad, rtol=1e-10, atol=1e-12)
    for g, r in zip(grads, grads_of(params)):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_truncated_backprop_bf16_model_fp32_adjoint():
    """bf16 model and states: adjoint accumulated in fp32 (cotangent cast to bf16), close to fp64 autograd."""
    velocity, _, params, shape = build("mlp", True, torch.float64)
    ts, K = sd3_shifted_grid(N), N
    x0, a_N = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    states, ref_adjoints = unrolled(velocity, x0, ts, K, a_N)
    ref = grads_of(params)
    velocity.model.to(torch.bfloat16)
    a = truncated_backprop(velocity, [s.to(torch.bfloat16) for s in states], ts, a_N.float(), K)
    assert a.dtype == torch.float32
    assert_rel(a, ref_adjoints[0], 3e-2, "a_{N-K} (bf16 model)")
    for p, r in zip(params, ref):
        assert p.grad.dtype == torch.bfloat16
        assert_rel(p.grad, r, 6e-2, "parameter gradient (bf16 model)")


# ---------------------------------------------------------------- lean adjoint (M25, M31)
@pytest.mark.parametrize("kind", ["ode", "memoryless"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("cfg", [False, True], ids=["nocfg", "cfg"])
@pytest.mark.parametrize("model", ["mlp", "sd3"])
def test_lean_adjoint_equals_unrolled_autograd(model, cfg, dtype, kind):
    """a~_j = grad of <a~_N, x_N> w.r.t. x_j through the base map (M25; M31 with the noiseless map (M30)),
    for K in {1, 3, N}: a~_j does not depend on K, so one unrolled reference over all N steps serves."""
    velocity, branches, params, shape = build(model, cfg, dtype, trainable=(model == "mlp"))
    ts = uniform_grid(N) if kind == "memoryless" else sd3_shifted_grid(N)
    t, h = grid_values(ts, dtype)
    kappa = [1 / (float(ts[i]) + h[i]) for i in range(N)]  # (M29)
    memoryless = lambda x, v, i: x + h[i] * (2 * v - kappa[i] * x)  # (M30) without noise: the same Jacobian
    x0, a_N = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)  # a_N stands for -grad r
    states, ref = unrolled(velocity, x0, ts, N, a_N, step=memoryless if kind == "memoryless" else None)
    for p in params:
        p.grad = None

    tol = 1e-11 if dtype == torch.float64 else 1e-5
    for K in (1, 3, N):
        lean = lean_adjoint(branches or velocity, states, ts, a_N, K, kind, guidance_scale=W if cfg else None)
        assert len(lean) == K + 1 and torch.equal(lean[-1], a_N)
        for j, (a, r) in enumerate(zip(lean, ref[N - K :])):
            assert a.dtype == dtype
            assert_rel(a, r, tol, f"K={K}: a~_(N-K+{j})")
    assert all(p.grad is None for p in params)  # no parameter gradients (M25)
    if cfg:  # the (v_u, v_c) pair form gives the same adjoint
        pair = lean_adjoint(lambda x2, t: tuple(branches(x2, t).chunk(2)), states, ts, a_N, N, kind, guidance_scale=W)
        assert all(torch.equal(a, b) for a, b in zip(pair, lean))


def test_lean_adjoint_bf16_states_fp32_adjoint():
    velocity, _, _, shape = build("sd3", False, torch.float64, trainable=False)
    ts = sd3_shifted_grid(N)
    x0, a_N = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    states, ref = unrolled(velocity, x0, ts, N, a_N)
    velocity.transformer.to(torch.bfloat16)
    velocity.prompt_embeds, velocity.pooled = velocity.prompt_embeds.bfloat16(), velocity.pooled.bfloat16()
    lean = lean_adjoint(velocity, [s.bfloat16() for s in states], ts, a_N.float(), N)
    assert all(a.dtype == torch.float32 for a in lean)
    assert_rel(lean[0], ref[0], 5e-2, "a~_0 (bf16 model)")


def test_lean_adjoint_custom_kappa_and_per_sample_grid():
    velocity = MLPVelocity(dim=24, hidden=48).double().requires_grad_(False)
    shape = (2, 3, 8)
    grids = [uniform_grid(4), sd3_shifted_grid(4)]
    ts = torch.stack(grids, dim=1)  # [N+1, B]
    states = sample_euler(velocity, torch.randn(shape, dtype=torch.float64), ts).states
    a_N = torch.randn(shape, dtype=torch.float64)
    # kappa = 0: the memoryless adjoint (M31) is the ODE adjoint (M25) of the doubled velocity
    lean_m = lean_adjoint(velocity, states, ts, a_N, 4, "memoryless", kappa=0.0)
    lean_o = lean_adjoint(lambda x, t: 2 * velocity(x, t), states, ts, a_N, 4)
    for a, b in zip(lean_m, lean_o):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    lean = lean_adjoint(velocity, states, ts, a_N, 4)
    for b, grid in enumerate(grids):  # per-sample grids == one sample at a time on its own grid
        single = lean_adjoint(velocity, states[:, b : b + 1], grid, a_N[b : b + 1], 4)
        for a, s in zip(lean, single):
            torch.testing.assert_close(a[b : b + 1], s, rtol=1e-12, atol=1e-14)


def test_lean_adjoint_cfg_per_sample_grid():
    """CFG branches get the doubled batch and a doubled [2B] time; matches autograd with per-sample h."""
    velocity, branches, _, shape = build("mlp", True, torch.float64, trainable=False)
    ts = torch.stack([sd3_shifted_grid(4), uniform_grid(4)], dim=1)
    states = sample_euler(velocity.pair, torch.randn(shape, dtype=torch.float64), ts, guidance_scale=W).states
    a_N = torch.randn(shape, dtype=torch.float64)
    lean = lean_adjoint(branches, states, ts, a_N, 2, guidance_scale=W)
    x = states[2].clone().requires_grad_()
    y = x + (ts[3] - ts[2]).view(-1, 1, 1) * velocity(x, ts[2])
    z = states[3].clone().requires_grad_()
    out = z + (ts[4] - ts[3]).view(-1, 1, 1) * velocity(z, ts[3])
    (a_3,) = torch.autograd.grad(out, z, a_N)
    (a_2,) = torch.autograd.grad(y, x, a_3)
    torch.testing.assert_close(lean[1], a_3, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(lean[0], a_2, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------- terminal reward gradient
def conv_stack(channels_in: int, channels_out: int, depth: int = 3, width: int = 16) -> torch.nn.Sequential:
    layers, c = [], channels_in
    for _ in range(depth):
        layers += [torch.nn.Conv2d(c, width, 3, padding=1), torch.nn.SiLU()]
        c = width
    return torch.nn.Sequential(*layers, torch.nn.Conv2d(c, channels_out, 3, padding=1))


class Decoder(torch.nn.Module):
    """Latent [B, 4, 8, 8] -> image [B, 3, 64, 64]; activations much larger than its input and output."""

    def __init__(self):
        super().__init__()
        self.net = conv_stack(4, 3)

    def forward(self, z):
        return self.net(torch.nn.functional.interpolate(z, scale_factor=8, mode="nearest"))


class Reward(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = conv_stack(3, 8)
        self.head = torch.nn.Linear(8, 1)

    def forward(self, image):
        return self.head(torch.tanh(self.net(image)).mean(dim=(2, 3))).squeeze(1)


def test_terminal_reward_grad_analytic():
    A = torch.randn(6, 6, dtype=torch.float64)
    x = torch.randn(3, 6, dtype=torch.float64)
    reward = lambda y: -0.5 * (y @ A.T).square().sum(dim=1)
    grad, r = terminal_reward_grad(x, None, reward)
    torch.testing.assert_close(grad, -(x @ A.T) @ A, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(r, reward(x))
    grad2, _ = terminal_reward_grad(x, lambda z: 2 * z, reward)
    torch.testing.assert_close(grad2, -4 * (x @ A.T) @ A, rtol=1e-12, atol=1e-12)
    assert grad.dtype == torch.float64 and not r.requires_grad


def test_terminal_reward_grad_checkpoint_exact_and_leaner():
    decoder, reward = Decoder().eval().requires_grad_(False), Reward().eval()  # reward params trainable: untouched
    x = torch.randn(2, 4, 8, 8)
    grad, r = terminal_reward_grad(x, decoder, reward)
    grad_ck, r_ck = terminal_reward_grad(x, decoder, reward, checkpoint=True)
    assert torch.equal(grad, grad_ck) and torch.equal(r, r_ck)
    assert all(p.grad is None for p in reward.parameters())
    plain = peak_memory(lambda: terminal_reward_grad(x, decoder, reward))
    ck = peak_memory(lambda: terminal_reward_grad(x, decoder, reward, checkpoint=True))
    assert ck < 0.75 * plain, (ck, plain)
    with pytest.raises(ValueError, match="reward"):
        terminal_reward_grad(x, decoder, lambda img: img.sum())
    with pytest.raises(ValueError, match="reward"):
        terminal_reward_grad(x, decoder, lambda img: torch.zeros(2))


def test_draft_update_end_to_end():
    """Sampler -> terminal gradient -> truncated adjoint on the tiny SD3 transformer with LoRA (DRaFT-K, M35)."""
    transformer = tiny_sd3_transformer()
    lora = add_lora(transformer)
    text, pooled = sd3_conditioning(2)
    velocity = SD3Velocity(transformer, text, pooled, guidance_scale=W)
    ts = sd3_shifted_grid(6)
    traj = sample_euler(velocity.pair, SD3_SHAPE, ts, guidance_scale=W, generator=torch.Generator().manual_seed(0))
    grad, r = terminal_reward_grad(traj.final, None, lambda y: -y.square().mean(dim=(1, 2, 3)))
    a = truncated_backprop(velocity, traj.states, ts, -grad, K=2)
    assert a.shape == traj.final.shape and torch.isfinite(a).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in lora)


# ---------------------------------------------------------------- bad input
def test_bad_input_names_the_argument():
    velocity, _, params, shape = build("mlp", False, torch.float32)
    ts = uniform_grid(4)
    states = sample_euler(velocity, torch.randn(shape), ts).states
    a_N = torch.randn(shape)
    for fn in (truncated_backprop, lean_adjoint):
        for K in (0, 5, -1):
            with pytest.raises(ValueError, match="K"):
                fn(velocity, states, ts, a_N, K)
        with pytest.raises(TypeError, match="K"):
            fn(velocity, states, ts, a_N, 1.5)
        with pytest.raises(ValueError, match="ts"):
            fn(velocity, states, uniform_grid(3), a_N, 1)
        with pytest.raises(ValueError, match="ts"):
            fn(velocity, states[:4], ts, a_N, 1)
        with pytest.raises(ValueError, match="terminal_grad"):
            fn(velocity, states, ts, a_N[:1], 1)
        with pytest.raises(ValueError, match="states"):
            fn(velocity, states[:1], ts[:1], a_N, 1)
        with pytest.raises(ValueError, match="velocity"):
            fn(lambda x, t: x[:1], states, ts, a_N, 1)
    frozen = MLPVelocity(dim=24, hidden=16).requires_grad_(False)
    with pytest.raises(ValueError, match="velocity has no trainable parameters"):
        truncated_backprop(lambda x, t: frozen(x, t), states, ts, a_N, 2)
    with pytest.raises(ValueError, match="kind"):
        lean_adjoint(velocity, states, ts, a_N, 1, kind="sde")
    with pytest.raises(ValueError, match="kappa"):
        lean_adjoint(velocity, states, ts, a_N, 1, kind="memoryless", kappa=[1.0, 2.0])


def test_public_exports():
    assert flowkern.truncated_backprop is truncated_backprop
    assert flowkern.lean_adjoint is lean_adjoint
    assert flowkern.terminal_reward_grad is terminal_reward_grad

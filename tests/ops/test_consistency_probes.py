"""consistency_probes (M20): every CPU backend vs the reference, literal (M20), batch invariance, opcheck, bad input."""

import pytest
import torch

import flowkern
from tests.ops.harness import DTYPES, ODD_SHAPES, check_against_reference, cpu_backends, op_module, require_gpu_backend
from tests.utils import make_noncontiguous

mod = op_module("consistency_probes")
BACKENDS = cpu_backends(mod.IMPLS)
TENSORS = ("x", "v_base", "value_out", "reward_grad")


def make_inputs(shape, per_sample=True, noncontiguous=False, eta_mode="quad", eps_x=0.5):
    # eps_x = 0.5 keeps the probe offset eps_x*w/rho at the scale of x, so the tolerance sees the direction
    g = torch.Generator().manual_seed(2)
    x = {k: torch.randn(shape, generator=g) for k in TENSORS}
    if noncontiguous:
        x = {k: make_noncontiguous(v) for k, v in x.items()}
    x["t"] = torch.rand(shape[0], generator=g) if per_sample else 0.37
    x["beta"], x["eta_mode"], x["eps_x"] = 1.7, eta_mode, eps_x
    return x


def call(**kw):
    return flowkern.consistency_probes(**kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ODD_SHAPES)
def test_matches_reference(backend, dtype, shape):
    check_against_reference(call, make_inputs(shape), backend, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("eta_mode", ["quad", "linear", "constant"])
def test_noncontiguous_scalar_t_and_eta_modes(backend, eta_mode):
    inputs = make_inputs((3, 5, 7, 9), per_sample=False, noncontiguous=True, eta_mode=eta_mode)
    check_against_reference(call, inputs, backend, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_and_mixed_dtypes(backend):
    x = make_inputs((2, 4, 33, 17))
    with flowkern.use_backend("torch"):
        ref = call(**x)
    x64 = {k: (v.double() if k in TENSORS else v) for k, v in x.items()}
    with flowkern.use_backend(backend):
        out64 = call(**x64)
    assert all(o.dtype == torch.float64 for o in out64)
    for a, b in zip(out64, ref):
        torch.testing.assert_close(a.float(), b, rtol=1e-5, atol=1e-6)
    mixed = {**x, "v_base": x["v_base"].bfloat16(), "reward_grad": x["reward_grad"].half()}
    with flowkern.use_backend("torch"):
        ref = call(**mixed)
    with flowkern.use_backend(backend):
        out = call(**mixed)
    assert all(o.dtype == torch.float32 for o in out)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_literal_equation_m20():
    """x_w = x + eps_x w/rho_w, x_G = x + eps_x G/rho_G, G = c_phi - beta eta_t ghat, w = v_base - G (M15, M20)."""
    x = make_inputs((3, 2, 4, 5), eps_x=1e-3)
    d_b = 2 * 4 * 5
    t = x["t"].double()
    g = x["value_out"].double() - x["beta"] * (t**2).view(-1, 1, 1, 1) * x["reward_grad"].double()
    w = x["v_base"].double() - g
    rho_w = torch.stack([w[b].norm() / d_b**0.5 for b in range(3)])
    rho_g = torch.stack([g[b].norm() / d_b**0.5 for b in range(3)])
    for backend in BACKENDS:
        with flowkern.use_backend(backend):
            x_w, x_g, out_rho_w, out_rho_g = call(**x)
        torch.testing.assert_close(out_rho_w.double(), rho_w, rtol=1e-6, atol=0)
        torch.testing.assert_close(out_rho_g.double(), rho_g, rtol=1e-6, atol=0)
        # the normalised directions, resolved to fp32 rounding of x_w over eps_x
        torch.testing.assert_close(
            (x_w.double() - x["x"].double()) / 1e-3, w / rho_w.view(-1, 1, 1, 1), rtol=0, atol=1e-3
        )
        torch.testing.assert_close(
            (x_g.double() - x["x"].double()) / 1e-3, g / rho_g.view(-1, 1, 1, 1), rtol=0, atol=1e-3
        )
        assert x_w.dtype == torch.float32 and out_rho_w.shape == (3,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rms_floor(backend):
    """G = 0 and w = 0 exactly: rho floors at 1e-12 and the probes equal x (M20)."""
    x = make_inputs((2, 3, 4, 5))
    x["value_out"] = torch.zeros_like(x["x"])
    x["reward_grad"] = torch.zeros_like(x["x"])
    x["v_base"] = torch.zeros_like(x["x"])
    with flowkern.use_backend(backend):
        x_w, x_g, rho_w, rho_g = call(**x)
    assert torch.equal(rho_w, torch.full((2,), 1e-12)) and torch.equal(rho_g, torch.full((2,), 1e-12))
    assert torch.equal(x_w, x["x"]) and torch.equal(x_g, x["x"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_invariant_and_deterministic(backend):
    x = make_inputs((3, 16, 37, 29))
    with flowkern.use_backend(backend):
        full = call(**x)
        again = call(**x)
        for b in range(3):
            one = call(**{k: (v[b : b + 1] if isinstance(v, torch.Tensor) else v) for k, v in x.items()})
            for o_full, o_one in zip(full, one):
                assert torch.equal(o_full[b : b + 1], o_one)
    assert all(torch.equal(a, b) for a, b in zip(full, again))


@pytest.mark.parametrize("backend", BACKENDS)
def test_outputs_have_no_grad_path(backend):
    x = make_inputs((2, 3, 4, 5))
    for k in TENSORS:
        x[k].requires_grad_()
    with flowkern.use_backend(backend):
        outs = call(**x)
    assert all(not o.requires_grad and o.grad_fn is None for o in outs)


def test_opcheck():
    x = make_inputs((2, 3, 4, 5))
    for requires_grad in (False, True):
        tensors = [x[k].clone().requires_grad_(requires_grad) for k in TENSORS]
        for t, t_value in ((x["t"], 0.0), (None, 0.4)):
            torch.library.opcheck(
                torch.ops.flowkern.consistency_probes.default, (*tensors, t, t_value, 1.7, "quad", 0.5)
            )


def test_compile_fullgraph():
    x = make_inputs((2, 3, 4, 5))

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(x_, v_base, value_out, reward_grad, t):
        x_w, x_g, rho_w, rho_g = flowkern.consistency_probes(x_, v_base, value_out, reward_grad, t, 1.7, "quad", 0.5)
        return x_w * 2, x_g, rho_w, rho_g

    out = f(*(x[k] for k in TENSORS), x["t"])
    ref = call(**x)
    torch.testing.assert_close(out[0], ref[0] * 2)
    for a, b in zip(out[1:], ref[1:]):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "change, exc, needle",
    [
        ({"v_base": torch.randn(2, 3, 4, 6)}, ValueError, "v_base"),
        ({"reward_grad": torch.randn(2, 3, 4, 5).int()}, TypeError, "reward_grad"),
        ({"value_out": "x"}, TypeError, "value_out"),
        ({"t": torch.rand(3)}, ValueError, "t"),
        ({"beta": float("nan")}, ValueError, "beta"),
        ({"beta": 0.0}, ValueError, "beta"),
        ({"eps_x": -1e-3}, ValueError, "eps_x"),
        ({"eps_x": float("inf")}, ValueError, "eps_x"),
        ({"eps_x": "small"}, TypeError, "eps_x"),
        ({"eta_mode": "cubic"}, ValueError, "eta_mode"),
        ({"x": torch.randn(0, 3)}, ValueError, "x"),
    ],
)
def test_bad_input(change, exc, needle):
    x = {**make_inputs((2, 3, 4, 5)), **change}
    with pytest.raises(exc, match=needle):
        call(**x)


def test_mixed_devices_rejected():
    x = make_inputs((2, 3, 4, 5))
    x["value_out"] = x["value_out"].to("meta")
    with pytest.raises(ValueError, match="value_out"):
        call(**x)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (8, 16, 128, 128), (1, 32, 128, 128)])
def test_gpu_matches_reference(backend, dtype, shape):
    require_gpu_backend(mod.IMPLS, backend)
    x = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in make_inputs(shape).items()}
    check_against_reference(call, x, backend, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_batch_invariant(backend):
    require_gpu_backend(mod.IMPLS, backend)
    x = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in make_inputs((4, 16, 64, 64)).items()}
    with flowkern.use_backend(backend):
        full = call(**x)
        one = call(**{k: (v[2:3] if isinstance(v, torch.Tensor) else v) for k, v in x.items()})
    assert all(torch.equal(a[2:3], b) for a, b in zip(full, one))

"""vggflow_matching_loss (M16): every CPU backend vs the reference, opcheck, gradcheck, compile, bad input."""

import pytest
import torch

import flowkern
from tests.ops.harness import DTYPES, ODD_SHAPES, check_against_reference, cpu_backends, op_module, require_gpu_backend
from tests.utils import make_noncontiguous

mod = op_module("vggflow_matching_loss")
BACKENDS = cpu_backends(mod.IMPLS)


def make_inputs(shape, per_sample=True, noncontiguous=False, eta_mode="quad"):
    g = torch.Generator().manual_seed(1)
    x = {k: torch.randn(shape, generator=g) for k in ("v_ft", "v_base", "reward_grad", "value_out")}
    if noncontiguous:
        x = {k: make_noncontiguous(v) for k, v in x.items()}
    x["t"] = torch.rand(shape[0], generator=g) if per_sample else 0.37
    x["beta"], x["eta_mode"] = 1.7, eta_mode
    return x


def call(**kw):
    return flowkern.vggflow_matching_loss(**kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ODD_SHAPES)
def test_matches_reference(backend, dtype, shape):
    check_against_reference(call, make_inputs(shape), backend, dtype, grad_names=("v_ft",))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("eta_mode", ["quad", "linear", "constant"])
def test_noncontiguous_scalar_t_and_eta_modes(backend, eta_mode):
    inputs = make_inputs((3, 5, 7, 9), per_sample=False, noncontiguous=True, eta_mode=eta_mode)
    check_against_reference(call, inputs, backend, torch.float32, grad_names=("v_ft",))


# (v_ft dtype, {target: dtype}, grad rtol): a bf16 velocity (the methods' case), and an fp32 velocity with fp64
# targets and a [B] t (issue 20: it raised an error that blamed t)
MIXED = [
    (torch.bfloat16, {"reward_grad": torch.float16}, 8e-3),
    (torch.float32, {"v_base": torch.float64, "reward_grad": torch.float64, "value_out": torch.float64}, 1e-5),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("v_dtype, targets, rtol", MIXED)
def test_mixed_dtypes(backend, v_dtype, targets, rtol):
    x = make_inputs((2, 4, 33, 17))
    x["v_ft"] = x["v_ft"].to(v_dtype).requires_grad_()
    for k, dtype in targets.items():
        x[k] = x[k].to(dtype)
    with flowkern.use_backend(backend):
        loss = call(**x)
        (grad,) = torch.autograd.grad(loss, x["v_ft"])
    with flowkern.use_backend("torch"):
        ref = call(**x)
        (ref_grad,) = torch.autograd.grad(ref, x["v_ft"])
    assert loss.dtype == torch.float32 and grad.dtype == v_dtype
    torch.testing.assert_close(loss, ref.to(loss.dtype), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=rtol, atol=1e-6)


def test_literal_equation_m16():
    """L = mean((v_ft - T)^2), T = v_base + beta*eta_t*ghat - c_phi, written from (M16)."""
    x = make_inputs((3, 2, 4, 5))
    t = x["t"].view(-1, 1, 1, 1)
    target = x["v_base"] + x["beta"] * t**2 * x["reward_grad"] - x["value_out"]
    expected = ((x["v_ft"] - target) ** 2).mean()
    torch.testing.assert_close(call(**x), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    x = make_inputs((2, 3, 4, 5))
    x = {k: (v.double() if isinstance(v, torch.Tensor) and v.dim() > 1 else v) for k, v in x.items()}
    x["v_ft"].requires_grad_()
    with flowkern.use_backend(backend):
        assert torch.autograd.gradcheck(lambda v: call(**{**x, "v_ft": v}), (x["v_ft"],))


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    x = make_inputs((3, 16, 37, 29))
    x["v_ft"].requires_grad_()
    with flowkern.use_backend(backend):
        runs = [(call(**x), torch.autograd.grad(call(**x), x["v_ft"])[0]) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_opcheck():
    x = make_inputs((2, 3, 4, 5))
    for compute_grad in (True, False):
        for dtype in (torch.float32, torch.bfloat16):  # bf16 velocity with fp32 targets: fakes match real outputs
            for t, t_value in ((x["t"], 0.0), (None, 0.3)):
                v_ft = x["v_ft"].to(dtype).requires_grad_(compute_grad)
                args = (v_ft, x["v_base"], x["reward_grad"], x["value_out"], t, t_value, 1.7, "quad", compute_grad)
                torch.library.opcheck(torch.ops.flowkern.vggflow_matching_loss.default, args)


def test_compile_fullgraph():
    x = make_inputs((2, 3, 4, 5))
    x["v_ft"].requires_grad_()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(v_ft, v_base, reward_grad, value_out, t):
        return flowkern.vggflow_matching_loss(v_ft, v_base, reward_grad, value_out, t, 1.7, "quad") * 2

    loss = f(x["v_ft"], x["v_base"], x["reward_grad"], x["value_out"], x["t"])
    loss.backward()
    ref = call(**{**x, "v_ft": x["v_ft"].detach()}) * 2
    torch.testing.assert_close(loss, ref)
    assert x["v_ft"].grad is not None and torch.isfinite(x["v_ft"].grad).all()


def test_no_grad_path_skips_gradient():
    x = make_inputs((2, 3, 4, 5))
    with torch.no_grad():
        assert torch.isfinite(call(**x))


@pytest.mark.parametrize(
    "change, exc, needle",
    [
        ({"v_base": torch.randn(2, 3, 4, 6)}, ValueError, "v_base"),
        ({"reward_grad": torch.randn(2, 3, 4, 5).int()}, TypeError, "reward_grad"),
        ({"value_out": "x"}, TypeError, "value_out"),
        ({"t": torch.rand(3)}, ValueError, "t"),
        ({"t": torch.rand(2, 1)}, ValueError, "t"),
        ({"beta": float("nan")}, ValueError, "beta"),
        ({"beta": -1.0}, ValueError, "beta"),
        ({"eta_mode": "cubic"}, ValueError, "eta_mode"),
        ({"v_ft": torch.randn(0, 3)}, ValueError, "v_ft"),
    ],
)
def test_bad_input(change, exc, needle):
    x = {**make_inputs((2, 3, 4, 5)), **change}
    with pytest.raises(exc, match=needle):
        call(**x)


def test_mixed_devices_rejected():
    x = make_inputs((2, 3, 4, 5))
    x["v_base"] = x["v_base"].to("meta")
    with pytest.raises(ValueError, match="v_base"):
        call(**x)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (8, 16, 128, 128), (1, 32, 128, 128)])
def test_gpu_matches_reference(backend, dtype, shape):
    require_gpu_backend(mod.IMPLS, backend)
    x = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in make_inputs(shape).items()}
    check_against_reference(call, x, backend, dtype, grad_names=("v_ft",))

"""reward_grad_clip (M8): every CPU backend vs the reference, batch invariance, opcheck, compile, bad input."""

import pytest
import torch

import flowkern
from tests.ops.harness import DTYPES, ODD_SHAPES, check_against_reference, cpu_backends, op_module, require_gpu_backend
from tests.utils import make_noncontiguous

mod = op_module("reward_grad_clip")
BACKENDS = cpu_backends(mod.IMPLS)


def make_inputs(shape, noncontiguous=False, dtype=torch.float32):
    """Per-sample scales spread the norms so that tau clips some samples and leaves others alone."""
    g = torch.Generator().manual_seed(2)
    scale = torch.logspace(-1.5, 1.0, shape[0]).reshape((-1,) + (1,) * (len(shape) - 1))
    grad = (torch.randn(shape, generator=g) * scale).to(dtype)
    if noncontiguous:
        grad = make_noncontiguous(grad)
    d = grad[0].numel()
    return {"grad": grad, "tau": 0.5 * d**0.5}  # unit-variance samples have norm ~ sqrt(D)


def call(**kw):
    return flowkern.reward_grad_clip(**kw)


def test_inputs_exercise_both_branches():
    for shape in ODD_SHAPES:
        x = make_inputs(shape)
        norms = x["grad"].flatten(1).norm(dim=1)
        assert (norms < x["tau"]).any() and (norms > x["tau"]).any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ODD_SHAPES)
def test_matches_reference(backend, dtype, shape):
    check_against_reference(call, make_inputs(shape), backend, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous(backend):
    check_against_reference(call, make_inputs((3, 16, 37, 29), noncontiguous=True), backend, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64(backend):
    x = make_inputs((2, 4, 33, 17), dtype=torch.float64)
    with flowkern.use_backend(backend):
        ghat, norms = call(**x)
    with flowkern.use_backend("torch"):
        ref_ghat, ref_norms = call(**x)
    assert ghat.dtype == norms.dtype == torch.float64
    # fp64 accumulation; Triton passes the float tau as an fp32 kernel argument (relative error <= 6e-8)
    torch.testing.assert_close(ghat, ref_ghat, rtol=1e-7, atol=0)
    torch.testing.assert_close(norms, ref_norms, rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_literal_equation_m8(backend):
    """n_b = ||g_b||, rho_b = min(n_b, tau)/max(n_b, 1e-12), ghat_b = rho_b g_b, written from (M8)."""
    x = make_inputs((3, 16, 37, 29))
    x["grad"][1] = 0  # n_b = 0: rho_b = 0, ghat_b = 0
    with flowkern.use_backend(backend):
        ghat, norms = call(**x)
    for b in range(3):
        n = torch.linalg.vector_norm(x["grad"][b].double())
        rho = min(n.item(), x["tau"]) / max(n.item(), 1e-12)
        torch.testing.assert_close(norms[b].double(), n, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ghat[b].double(), rho * x["grad"][b].double(), rtol=1e-5, atol=1e-6)
        assert torch.linalg.vector_norm(ghat[b].double()) <= x["tau"] * (1 + 1e-5)
    assert norms.dtype == torch.float32 and ghat.dtype == x["grad"].dtype


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", ODD_SHAPES)
def test_batch_invariant_and_deterministic(backend, shape):
    x = make_inputs(shape, dtype=torch.bfloat16)
    with flowkern.use_backend(backend):
        ghat, norms = call(**x)
        again = call(**x)
        assert torch.equal(ghat, again[0]) and torch.equal(norms, again[1])
        for b in range(shape[0]):
            one_ghat, one_norm = call(grad=x["grad"][b : b + 1], tau=x["tau"])
            assert torch.equal(ghat[b : b + 1], one_ghat) and torch.equal(norms[b : b + 1], one_norm)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(2, 8), (2, 3, 70, 70)])  # one chunk per sample, and several
def test_finite_gradient_whose_sum_of_squares_overflows(backend, shape):
    """Entries of 1e20: the fp32 sum of squares (~1e40 D) overflows, the norm 1e20 sqrt(D) does not (M8)."""
    grad = torch.full(shape, 1e20)
    grad[1] *= -0.5  # another norm, negative entries
    grad[1, 0] = 3.0  # an entry far below the others
    with flowkern.use_backend(backend):
        ghat, norms = call(grad=grad, tau=1.0)
    expected = grad.double().flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, expected.float())
    torch.testing.assert_close(ghat, (grad.double() / expected.view(-1, *[1] * (grad.dim() - 1))).float())


def test_not_differentiable():
    """The clipped gradient is a stop-gradient input (M15, M21): outputs never require grad."""
    grad = make_inputs((2, 3, 4, 5))["grad"].requires_grad_()
    ghat, norms = call(grad=grad, tau=1.0)
    assert not ghat.requires_grad and not norms.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        ghat.sum().backward()


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (2, 3, 70, 70)])
def test_opcheck(shape):
    torch.library.opcheck(torch.ops.flowkern.reward_grad_clip.default, (make_inputs(shape)["grad"], 1.5))


def test_compile_fullgraph():
    x = make_inputs((2, 3, 4, 5))

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(grad):
        ghat, norms = flowkern.reward_grad_clip(grad, 1.5)
        return ghat * 2, norms

    out = f(x["grad"])
    ref = call(grad=x["grad"], tau=1.5)
    torch.testing.assert_close(out[0], ref[0] * 2)
    torch.testing.assert_close(out[1], ref[1])


@pytest.mark.parametrize(
    "change, exc, needle",
    [
        ({"grad": torch.randn(2, 3).int()}, TypeError, "grad"),
        ({"grad": "x"}, TypeError, "grad"),
        ({"grad": torch.randn(0, 3)}, ValueError, "grad"),
        ({"tau": float("nan")}, ValueError, "tau"),
        ({"tau": float("inf")}, ValueError, "tau"),
        ({"tau": 0.0}, ValueError, "tau"),
        ({"tau": -1.0}, ValueError, "tau"),
        ({"tau": "1"}, TypeError, "tau"),
        ({"tau": torch.ones(2)}, TypeError, "tau"),
    ],
)
def test_bad_input(change, exc, needle):
    x = {**make_inputs((2, 3, 4, 5)), **change}
    with pytest.raises(exc, match=needle):
        call(**x)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (4, 4, 32, 32), (8, 16, 128, 128), (1, 32, 128, 128)])
def test_gpu_matches_reference(backend, dtype, shape):
    require_gpu_backend(mod.IMPLS, backend)
    x = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in make_inputs(shape).items()}
    check_against_reference(call, x, backend, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("shape", [(4, 4, 32, 32), (8, 16, 128, 128)])
def test_gpu_batch_invariant_and_deterministic(backend, shape):
    require_gpu_backend(mod.IMPLS, backend)
    x = make_inputs(shape, dtype=torch.bfloat16)
    x["grad"] = x["grad"].cuda()
    with flowkern.use_backend(backend):
        ghat, norms = call(**x)
        again = call(**x)
        assert torch.equal(ghat, again[0]) and torch.equal(norms, again[1])
        for b in range(shape[0]):
            one_ghat, one_norm = call(grad=x["grad"][b : b + 1], tau=x["tau"])
            assert torch.equal(ghat[b : b + 1], one_ghat) and torch.equal(norms[b : b + 1], one_norm)

"""adjoint_matching_loss (M26, M28, M32): every CPU backend vs the reference, literal equations, opcheck,
gradcheck, compile, determinism, bad input."""

import math

import pytest
import torch

import flowkern
from tests.ops.harness import DTYPES, ODD_SHAPES, check_against_reference, cpu_backends, op_module, require_gpu_backend
from tests.utils import make_noncontiguous

mod = op_module("adjoint_matching_loss")
BACKENDS = cpu_backends(mod.IMPLS)
# (mode, p): every mode, p in {2, 1.5, 3} where p is used
CONFIGS = [
    ("elementwise", 2.0),
    ("elementwise", 1.5),
    ("elementwise", 3.0),
    ("norm", 2.0),
    ("norm", 1.5),
    ("norm", 3.0),
    ("memoryless", 2.0),
]
CONFIG_IDS = [f"{m}-p{p}" for m, p in CONFIGS]
LAM = 1.7


def residual_sums(x):
    """s_b of (M32) in fp64, from the equation."""
    sigma = torch.as_tensor(x["sigma"], dtype=torch.float64).expand(x["v_ft"].shape[0])
    sigma = sigma.reshape((-1,) + (1,) * (x["v_ft"].dim() - 1))
    d = (2 / sigma) * (x["v_ft"].double() - x["v_base"].double()) + sigma * x["adjoint"].double()
    return d.flatten(1).square().sum(1)


def make_inputs(shape, mode="elementwise", p=2.0, per_sample_sigma=True, noncontiguous=False, clamp=True):
    """Sample b is scaled by (1 + b), so s_b of (M32) grows ~(1+b)^2 and lct can sit in a wide gap."""
    g = torch.Generator().manual_seed(3)
    scale = torch.arange(1, shape[0] + 1, dtype=torch.float32).reshape((-1,) + (1,) * (len(shape) - 1))
    x = {k: torch.randn(shape, generator=g) * scale for k in ("v_ft", "v_base", "adjoint")}
    if noncontiguous:
        x = {k: make_noncontiguous(v) for k, v in x.items()}
    x["lam"], x["p"], x["mode"] = LAM, p, mode
    if mode == "memoryless":
        x["sigma"] = 0.4 + torch.rand(shape[0], generator=g) if per_sample_sigma else 0.7
        s = residual_sums(x).sort().values
        # clamp the larger samples: lct halfway (geometrically) between the two smallest s_b
        x["lct"] = math.sqrt(s[0].item() * s[1].item()) if clamp else float("inf")
    return x


def call(**kw):
    return flowkern.adjoint_matching_loss(**kw)


def literal_control(adjoint, lam, p, mode):
    """u* of (M26), written from the equation (fp64)."""
    a = adjoint.double()
    if mode == "elementwise":
        return -torch.sign(a) * torch.abs(a / lam) ** (1 / (p - 1))
    omega = a / lam
    norm = torch.linalg.vector_norm(omega.flatten(1), dim=1).reshape((-1,) + (1,) * (a.dim() - 1))
    return -omega * norm ** ((2 - p) / (p - 1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ODD_SHAPES)
@pytest.mark.parametrize(
    "config", [CONFIGS[0], CONFIGS[5], CONFIGS[6]], ids=["elementwise-p2", "norm-p3", "memoryless"]
)
def test_matches_reference(backend, dtype, shape, config):
    check_against_reference(call, make_inputs(shape, *config), backend, dtype, grad_names=("v_ft",))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize(
    "dtype, shape", [(torch.float32, (3, 16, 37, 29)), (torch.bfloat16, (2, 4, 33, 17))], ids=["fp32", "bf16"]
)
def test_every_mode_and_p(backend, config, dtype, shape):
    check_against_reference(call, make_inputs(shape, *config), backend, dtype, grad_names=("v_ft",))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "config", [CONFIGS[1], CONFIGS[4], CONFIGS[6]], ids=["elementwise-p1.5", "norm-p1.5", "memoryless"]
)
def test_noncontiguous_and_scalar_sigma(backend, config):
    x = make_inputs((3, 5, 7, 9), *config, per_sample_sigma=False, noncontiguous=True)
    check_against_reference(call, x, backend, torch.float32, grad_names=("v_ft",))


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_dim_sigma_equals_per_sample(backend):
    x = make_inputs((2, 4, 33, 17), "memoryless", per_sample_sigma=False)
    with flowkern.use_backend(backend):
        scalar = call(**x)
        zero_dim = call(**{**x, "sigma": torch.tensor(x["sigma"])})
        per_sample = call(**{**x, "sigma": torch.full((2,), x["sigma"])})
    assert torch.equal(scalar, zero_dim) and torch.equal(scalar, per_sample)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["norm", "memoryless"])
def test_mixed_dtypes(backend, mode):
    x = make_inputs((2, 4, 33, 17), mode, p=3.0)
    x["v_ft"] = x["v_ft"].bfloat16().requires_grad_()
    x["adjoint"] = x["adjoint"].half()
    with flowkern.use_backend(backend):
        loss = call(**x)
        (grad,) = torch.autograd.grad(loss, x["v_ft"])
    with flowkern.use_backend("torch"):
        ref = call(**x)
        (ref_grad,) = torch.autograd.grad(ref, x["v_ft"])
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=8e-3, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", CONFIGS[:6], ids=CONFIG_IDS[:6])
def test_literal_equation_m26_m28(backend, config):
    """L = mean((v_ft - v_base - u*)^2) with u* from (M26); u* satisfies the KKT grad c(u*) = -a/lam."""
    mode, p = config
    x = make_inputs((3, 2, 4, 5), mode, p)
    u = literal_control(x["adjoint"], LAM, p, mode)
    # KKT of min_u lam c(u) + a^T u: elementwise grad c(u) = sign(u)|u|^(p-1); norm grad c(u) = ||u||^(p-2) u
    if mode == "elementwise":
        grad_c = torch.sign(u) * u.abs() ** (p - 1)
    else:
        grad_c = torch.linalg.vector_norm(u.flatten(1), dim=1).reshape(-1, 1, 1, 1) ** (p - 2) * u
    torch.testing.assert_close(grad_c, -x["adjoint"].double() / LAM)
    v_ft = x["v_ft"].double().requires_grad_()
    expected = ((v_ft - x["v_base"].double() - u) ** 2).mean()
    (expected_grad,) = torch.autograd.grad(expected, v_ft)
    v = x["v_ft"].clone().requires_grad_()
    with flowkern.use_backend(backend):
        loss = call(**{**x, "v_ft": v})
        (grad,) = torch.autograd.grad(loss, v)
        at_optimum = call(**{**x, "v_ft": (x["v_base"].double() + u).float()})
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-5, atol=1e-7)
    assert at_optimum.item() < 1e-10  # the regression target is u* itself


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("clamp", [True, False], ids=["lct", "no-clamp"])
def test_literal_equation_m32(backend, clamp):
    """s_b = ||(2/sigma_b)(v_ft - v_base) + sigma_b a||^2, L = mean_b min(s_b, LCT), written from (M32)."""
    x = make_inputs((3, 2, 4, 5), "memoryless", clamp=clamp)
    v_ft = x["v_ft"].double().requires_grad_()
    sigma = x["sigma"].double().reshape(-1, 1, 1, 1)
    s = torch.stack(
        [((2 / sigma[b]) * (v_ft[b] - x["v_base"][b]) + sigma[b] * x["adjoint"][b]).pow(2).sum() for b in range(3)]
    )
    expected = torch.minimum(s, torch.tensor(x["lct"], dtype=torch.float64)).mean()
    (expected_grad,) = torch.autograd.grad(expected, v_ft)
    v = x["v_ft"].clone().requires_grad_()
    with flowkern.use_backend(backend):
        loss = call(**{**x, "v_ft": v})
        (grad,) = torch.autograd.grad(loss, v)
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (3, 16, 37, 29)])  # one chunk per sample / several chunks
def test_memoryless_clamp_branch(backend, shape):
    """Samples with s_b >= LCT contribute LCT and get exactly zero gradient; the others get (4/sigma_b) d / B."""
    x = make_inputs(shape, "memoryless")
    s = residual_sums(x)
    clamped = s >= x["lct"]
    assert clamped.any() and (~clamped).any()
    v = x["v_ft"].clone().requires_grad_()
    with flowkern.use_backend(backend):
        loss = call(**{**x, "v_ft": v})
        (grad,) = torch.autograd.grad(loss, v)
    torch.testing.assert_close(loss.double(), torch.clamp(s, max=x["lct"]).mean(), rtol=1e-5, atol=0)
    assert not grad[clamped].any()
    sigma = x["sigma"].double().reshape(-1, 1, 1, 1)
    d = (2 / sigma) * (x["v_ft"].double() - x["v_base"].double()) + sigma * x["adjoint"].double()
    expected = 4 / sigma * d / shape[0]
    torch.testing.assert_close(grad[~clamped].double(), expected[~clamped], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_memoryless_fixed_point(backend):
    """v_ft - v_base = -sigma^2 a / 2 makes d = 0 (M32): zero loss and gradient."""
    x = make_inputs((2, 4, 33, 17), "memoryless", clamp=False)
    x = {k: (v.double() if isinstance(v, torch.Tensor) and v.dim() > 1 else v) for k, v in x.items()}
    sigma = x["sigma"].double().reshape(-1, 1, 1, 1)
    v = (x["v_base"] - sigma**2 * x["adjoint"] / 2).requires_grad_()
    with flowkern.use_backend(backend):
        loss = call(**{**x, "v_ft": v})
        (grad,) = torch.autograd.grad(loss, v)
    assert loss.item() < 1e-20 and grad.abs().max().item() < 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "config",
    [CONFIGS[0], CONFIGS[1], CONFIGS[5], CONFIGS[6]],
    ids=["elementwise-p2", "elementwise-p1.5", "norm-p3", "memoryless"],
)
def test_gradcheck_float64(backend, config):
    x = make_inputs((2, 3, 5), *config)  # memoryless: lct in a wide gap between s_b, away from the kink
    x = {k: (v.double() if isinstance(v, torch.Tensor) and v.dim() > 1 else v) for k, v in x.items()}
    x["v_ft"].requires_grad_()
    with flowkern.use_backend(backend):
        assert torch.autograd.gradcheck(lambda v: call(**{**x, "v_ft": v}), (x["v_ft"],))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["elementwise", "norm", "memoryless"])
def test_deterministic(backend, mode):
    x = make_inputs((3, 16, 37, 29), mode, p=1.5)
    x["v_ft"] = x["v_ft"].bfloat16().requires_grad_()
    with flowkern.use_backend(backend):
        runs = [(call(**x), torch.autograd.grad(call(**x), x["v_ft"])[0]) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("config", CONFIGS[::2], ids=CONFIG_IDS[::2])
def test_opcheck(config):
    x = make_inputs((2, 3, 4, 5), *config)
    memoryless = config[0] == "memoryless"
    sigma = x["sigma"] if memoryless else None
    lct = x["lct"] if memoryless else math.inf
    for compute_grad in (True, False):
        for v_dtype in (torch.float32, torch.bfloat16):  # mixed dtypes: the fake must match the real outputs
            v_ft = x["v_ft"].to(v_dtype).requires_grad_(compute_grad)
            args = (
                v_ft,
                x["v_base"],
                x["adjoint"],
                LAM,
                config[1],
                config[0],
                sigma,
                0.7,
                lct,
                compute_grad,
            )
            torch.library.opcheck(torch.ops.flowkern.adjoint_matching_loss.default, args)


def test_compile_fullgraph():
    x = make_inputs((2, 3, 4, 5), "memoryless")
    x["v_ft"].requires_grad_()
    lct = x["lct"]

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(v_ft, v_base, adjoint, sigma):
        loss = flowkern.adjoint_matching_loss(v_ft, v_base, adjoint, LAM, mode="memoryless", sigma=sigma, lct=lct)
        return loss + flowkern.adjoint_matching_loss(v_ft, v_base, adjoint, LAM, p=3.0, mode="norm")

    loss = f(x["v_ft"], x["v_base"], x["adjoint"], x["sigma"])
    loss.backward()
    detached = {**x, "v_ft": x["v_ft"].detach()}
    ref = call(**detached) + call(**{**detached, "p": 3.0, "mode": "norm", "sigma": None, "lct": None})
    torch.testing.assert_close(loss, ref)
    assert x["v_ft"].grad is not None and torch.isfinite(x["v_ft"].grad).all()


def test_no_grad_path_skips_gradient():
    for mode in ("elementwise", "norm", "memoryless"):
        x = make_inputs((2, 3, 4, 5), mode, p=1.5)
        with torch.no_grad():
            assert torch.isfinite(call(**x))


def test_bytes_moved():
    v = torch.empty(2, 3, dtype=torch.bfloat16)
    assert [mod.bytes_moved(v, m) for m in ("elementwise", "norm", "memoryless")] == [48, 60, 84]
    assert mod.bytes_moved(v, "memoryless", compute_grad=False) == 36


MEMORYLESS = {"mode": "memoryless", "sigma": 0.5, "lct": 10.0}


@pytest.mark.parametrize(
    "change, exc, needle",
    [
        ({"v_base": torch.randn(2, 3, 4, 6)}, ValueError, "v_base"),
        ({"adjoint": torch.randn(2, 3, 4, 5).int()}, TypeError, "adjoint"),
        ({"v_ft": "x"}, TypeError, "v_ft"),
        ({"v_ft": torch.randn(0, 3), "v_base": torch.randn(0, 3), "adjoint": torch.randn(0, 3)}, ValueError, "v_ft"),
        ({"lam": float("nan")}, ValueError, "lam"),
        ({"lam": float("inf")}, ValueError, "lam"),
        ({"lam": 0.0}, ValueError, "lam"),
        ({"p": 1.0}, ValueError, "^p must"),
        ({"p": 0.5}, ValueError, "^p must"),
        ({"p": float("inf")}, ValueError, "^p must"),
        ({"p": "2"}, TypeError, "^p must"),
        ({"mode": "l2"}, ValueError, "mode"),
        ({"mode": "memoryless", "lct": 10.0}, ValueError, "sigma"),
        ({"mode": "memoryless", "sigma": 0.5}, ValueError, "lct"),
        ({**MEMORYLESS, "sigma": torch.rand(3)}, ValueError, "sigma"),
        ({**MEMORYLESS, "sigma": torch.rand(2, 1)}, ValueError, "sigma"),
        ({**MEMORYLESS, "sigma": torch.tensor([0.5, 0.0])}, ValueError, "sigma"),
        ({**MEMORYLESS, "sigma": float("nan")}, ValueError, "sigma"),
        ({**MEMORYLESS, "sigma": "0.5"}, TypeError, "sigma"),
        ({**MEMORYLESS, "lct": 0.0}, ValueError, "lct"),
        ({**MEMORYLESS, "lct": float("nan")}, ValueError, "lct"),
        ({**MEMORYLESS, "lct": "1"}, TypeError, "lct"),
        ({"sigma": 0.5}, ValueError, "sigma"),
        ({"mode": "norm", "lct": 1.0}, ValueError, "lct"),
    ],
)
def test_bad_input(change, exc, needle):
    x = {**make_inputs((2, 3, 4, 5)), **change}
    with pytest.raises(exc, match=needle):
        call(**x)


def test_mixed_devices_rejected():
    x = make_inputs((2, 3, 4, 5))
    x["adjoint"] = x["adjoint"].to("meta")
    with pytest.raises(ValueError, match="adjoint"):
        call(**x)


def test_lct_inf_disables_the_clamp():
    x = make_inputs((2, 3, 4, 5), "memoryless", clamp=False)
    assert x["lct"] == float("inf")
    torch.testing.assert_close(call(**x).double(), residual_sums(x).mean(), rtol=1e-6, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (4, 4, 32, 32), (8, 16, 128, 128), (1, 32, 128, 128)])
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_gpu_matches_reference(backend, dtype, shape, config):
    require_gpu_backend(mod.IMPLS, backend)
    x = make_inputs(shape, *config)
    x = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in x.items()}
    check_against_reference(call, x, backend, dtype, grad_names=("v_ft",))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("mode", ["elementwise", "norm", "memoryless"])
def test_gpu_deterministic(backend, mode):
    require_gpu_backend(mod.IMPLS, backend)
    x = make_inputs((4, 16, 64, 64), mode, p=1.5)
    x = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in x.items()}
    x["v_ft"] = x["v_ft"].bfloat16().requires_grad_()
    with flowkern.use_backend(backend):
        runs = [(call(**x), torch.autograd.grad(call(**x), x["v_ft"])[0]) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])

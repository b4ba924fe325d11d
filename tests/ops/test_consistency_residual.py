"""consistency_residual (M17, M18, M20) and consistency_residual_exact (M21): every CPU backend vs the reference,
literal transcriptions, an analytic field through probes + residual, opcheck, gradcheck, compile, bad input."""

import pytest
import torch

import flowkern
from tests.ops.harness import DTYPES, ODD_SHAPES, check_against_reference, cpu_backends, op_module, require_gpu_backend
from tests.utils import make_noncontiguous

mod = op_module("consistency_residual")
BACKENDS = cpu_backends(mod.IMPLS)
EXACT_BACKENDS = cpu_backends(mod.EXACT_IMPLS)
TENSORS = ("c", "c_t", "c_x", "ghat", "ghat_t", "ghat_x", "vb", "vb_G")
VALUE_OUTPUTS = ("c", "c_t", "c_x")  # the only inputs with a gradient
EXACT_TENSORS = ("dG", "t3", "c")


def make_inputs(shape, per_sample=True, noncontiguous=False, eta_mode="quad", eps_t=1e-3, eps_x=1e-3):
    g = torch.Generator().manual_seed(3)
    x = {k: torch.randn(shape, generator=g) for k in TENSORS}
    if noncontiguous:
        x = {k: make_noncontiguous(v) for k, v in x.items()}
    batch = shape[0]
    if per_sample:
        t = torch.rand(batch, generator=g)
        t[1 % batch] = 0.9995  # t + eps_t > 1: backward time step (M20)
        x["t"] = t
        x["rho_w"] = torch.rand(batch, generator=g) + 0.5
        x["rho_G"] = torch.rand(batch, generator=g) + 0.5
        x["mask"] = (torch.arange(batch) % 2 == 0).float()  # terminal and non-terminal samples mixed
    else:
        x["t"], x["rho_w"], x["rho_G"], x["mask"] = 0.9995, 0.8, 1.3, 1.0
    x["beta"], x["eta_mode"], x["eps_t"], x["eps_x"] = 1.7, eta_mode, eps_t, eps_x
    return x


def make_exact_inputs(shape, per_sample=True, noncontiguous=False):
    g = torch.Generator().manual_seed(4)
    x = {k: torch.randn(shape, generator=g) for k in EXACT_TENSORS}
    if noncontiguous:
        x = {k: make_noncontiguous(v) for k, v in x.items()}
    x["mask"] = (torch.arange(shape[0]) % 2 == 1).float() if per_sample else 1.0
    return x


def call(**kw):
    return flowkern.consistency_residual(**kw)


def call_exact(**kw):
    return flowkern.consistency_residual_exact(**kw)


def literal_m20(x, eta):
    """R = T1 + T2 + T3 of (M20) and the boundary term (M17), written from math.md, per sample in float64."""
    rs, bnd = [], 0.0
    batch = x["c"].shape[0]
    for b in range(batch):
        t = float(x["t"][b])
        step = x["eps_t"] if t + x["eps_t"] <= 1 else -x["eps_t"]  # "if t+eps_t > 1 use -eps_t"
        big_g = x["c"][b] - x["beta"] * eta(t) * x["ghat"][b]
        big_g_t = x["c_t"][b] - x["beta"] * eta(t + step) * x["ghat_t"][b]
        big_g_x = x["c_x"][b] - x["beta"] * eta(t) * x["ghat_x"][b]
        t1 = (big_g_t - big_g) / step
        t2 = float(x["rho_w"][b]) * (big_g_x - big_g) / x["eps_x"]
        t3 = float(x["rho_G"][b]) * (x["vb_G"][b] - x["vb"][b]) / x["eps_x"]
        rs.append(t1 + t2 + t3)
        bnd = bnd + float(x["mask"][b]) * (x["c"][b] ** 2).mean()
    r = torch.stack(rs)
    return (r**2).mean(), bnd / batch


# ---------------------------------------------------------------- finite differences (M20)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ODD_SHAPES)
def test_matches_reference(backend, dtype, shape):
    # gradients checked for every tensor input: the value outputs get theirs, the others none
    check_against_reference(call, make_inputs(shape), backend, dtype, grad_names=TENSORS)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("eta_mode", ["quad", "linear", "constant"])
def test_noncontiguous_scalar_coefs_and_eta_modes(backend, eta_mode):
    inputs = make_inputs((3, 5, 7, 9), per_sample=False, noncontiguous=True, eta_mode=eta_mode)
    check_against_reference(call, inputs, backend, torch.float32, grad_names=VALUE_OUTPUTS)


@pytest.mark.parametrize("backend", BACKENDS)
def test_near_cancellation(backend):
    """Realistic differences: c_t, c_x, vb_G within O(eps) of their centres, so R = O(1) from cancelling fp32."""
    x = make_inputs((2, 4, 33, 17))
    g = torch.Generator().manual_seed(5)
    for near, centre in (("c_t", "c"), ("c_x", "c"), ("ghat_t", "ghat"), ("ghat_x", "ghat"), ("vb_G", "vb")):
        x[near] = x[centre] + 1e-3 * torch.randn(x[centre].shape, generator=g)
    check_against_reference(call, x, backend, torch.float32, grad_names=VALUE_OUTPUTS)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes(backend):
    x = make_inputs((2, 4, 33, 17))
    x["c"] = x["c"].bfloat16()
    x["ghat_t"] = x["ghat_t"].half()
    for k in VALUE_OUTPUTS:
        x[k].requires_grad_()
    outs = {}
    for name in ("torch", backend):
        with flowkern.use_backend(name):
            l_cons, l_bnd = call(**x)
            grads = torch.autograd.grad(l_cons + 3.0 * l_bnd, [x[k] for k in VALUE_OUTPUTS])
        outs[name] = (l_cons, l_bnd, grads)
    (ref_cons, ref_bnd, ref_grads), (l_cons, l_bnd, grads) = outs["torch"], outs[backend]
    assert l_cons.dtype == l_bnd.dtype == torch.float32
    assert [g.dtype for g in grads] == [torch.bfloat16, torch.float32, torch.float32]
    torch.testing.assert_close(l_cons, ref_cons, rtol=1e-5, atol=0)
    torch.testing.assert_close(l_bnd, ref_bnd, rtol=1e-5, atol=0)
    for g, r in zip(grads, ref_grads):  # R sums O(1/eps) terms: errors scale with the largest gradient
        scale = r.abs().max().item()
        torch.testing.assert_close(g, r, rtol=8e-3 if g.dtype == torch.bfloat16 else 1e-5, atol=1e-6 * scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("eta_mode, eta", [("quad", lambda t: t * t), ("linear", lambda t: t)])
def test_literal_equation_m20(backend, eta_mode, eta):
    """Losses and, through autograd of the transcription, all three gradients for separate cotangents."""
    x = make_inputs((3, 2, 4, 5), eta_mode=eta_mode)
    x64 = {k: (v.double().requires_grad_(k in VALUE_OUTPUTS) if k in TENSORS else v) for k, v in x.items()}
    exp_cons, exp_bnd = literal_m20(x64, eta)
    exp_grads = torch.autograd.grad(0.7 * exp_cons + 1.9 * exp_bnd, [x64[k] for k in VALUE_OUTPUTS])
    for k in VALUE_OUTPUTS:
        x[k].requires_grad_()
    with flowkern.use_backend(backend):
        l_cons, l_bnd = call(**x)
        grads = torch.autograd.grad(0.7 * l_cons + 1.9 * l_bnd, [x[k] for k in VALUE_OUTPUTS])
    torch.testing.assert_close(l_cons.double(), exp_cons, rtol=2e-5, atol=0)
    torch.testing.assert_close(l_bnd.double(), exp_bnd, rtol=2e-6, atol=0)
    for g, e in zip(grads, exp_grads):
        torch.testing.assert_close(g.double(), e, rtol=2e-5, atol=2e-5 * e.abs().max().item())


def _analytic_field(d_b, dtype):
    """Linear value net, reward gradient and base velocity: c = Ax + t a, ghat = Px + t p + g0, vb = Mx + t m."""
    g = torch.Generator().manual_seed(6)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)
    a_mat, p_mat, m_mat = (0.5 * rnd(d_b, d_b) for _ in range(3))
    a_vec, p_vec, g0, m_vec, c0 = (rnd(d_b) for _ in range(5))
    c_phi = lambda x, t: x @ a_mat.T + t[:, None] * a_vec + c0
    ghat = lambda x, t: x @ p_mat.T + t[:, None] * p_vec + g0
    v_base = lambda x, t: x @ m_mat.T + t[:, None] * m_vec
    return c_phi, ghat, v_base, (a_mat, p_mat, m_mat, a_vec, p_vec)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("eta_mode", ["linear", "quad"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_probes_and_residual_recover_the_pde_residual(backend, eta_mode, dtype):
    """On an analytic G field, probes + time_probe + residual give R = d_tG + J_G w + J_vb G (M14, M20)."""
    batch, shape, d_b = 3, (3, 2, 3), 6
    beta, eps_t, eps_x = 0.7, 1e-3, 1e-3
    c_phi, ghat, v_base, (a_mat, p_mat, m_mat, a_vec, p_vec) = _analytic_field(d_b, dtype)
    eta, deta = {"linear": (lambda t: t, lambda t: torch.ones_like(t)), "quad": (lambda t: t * t, lambda t: 2 * t)}[
        eta_mode
    ]
    g = torch.Generator().manual_seed(7)
    x = torch.randn(batch, d_b, generator=g, dtype=torch.float64).to(dtype)
    t = torch.tensor([0.3, 0.9995, 0.7], dtype=dtype)  # the middle sample steps backwards in time
    flat = lambda y: y.reshape(batch, d_b)
    with flowkern.use_backend(backend):
        x_w, x_g, rho_w, rho_g = flowkern.consistency_probes(
            x.view(shape), v_base(x, t).view(shape), c_phi(x, t).view(shape), ghat(x, t).view(shape),
            t, beta, eta_mode, eps_x,
        )  # fmt: skip
        t_probe = flowkern.time_probe(t, eps_t)
        inputs = dict(
            c=c_phi(x, t), c_t=c_phi(x, t_probe), c_x=c_phi(flat(x_w).to(dtype), t),
            ghat=ghat(x, t), ghat_t=ghat(x, t_probe), ghat_x=ghat(flat(x_w).to(dtype), t),
            vb=v_base(x, t), vb_G=v_base(flat(x_g).to(dtype), t),
        )  # fmt: skip
        inputs = {k: v.view(shape).requires_grad_(k in VALUE_OUTPUTS) for k, v in inputs.items()}
        l_cons, _ = flowkern.consistency_residual(
            **inputs, t=t, beta=beta, eta_mode=eta_mode, eps_t=eps_t, eps_x=eps_x, rho_w=rho_w, rho_G=rho_g, mask=0.0
        )
        (grad_c_t,) = torch.autograd.grad(l_cons, inputs["c_t"])
    step = eps_t * torch.where(t_probe > t, 1.0, -1.0).double()  # e_b as the kernels use it
    assert step[1] < 0 < step[0]
    r_fd = flat(grad_c_t).double() * (batch * d_b) * step[:, None] / 2  # dL/dc_t = 2R/(D e_b)
    # analytic: G = c - beta eta(t) ghat, J_G = A - beta eta(t) P, d_tG = a - beta (eta' ghat + eta p), J_vb = M
    a_mat, p_mat, m_mat, a_vec, p_vec = (v.double() for v in (a_mat, p_mat, m_mat, a_vec, p_vec))
    t64, gh = t.double(), ghat(x, t).double()
    big_g = c_phi(x, t).double() - beta * eta(t64)[:, None] * gh
    w = v_base(x, t).double() - big_g
    d_t = a_vec - beta * (deta(t64)[:, None] * gh + eta(t64)[:, None] * p_vec)
    j_g_w = w @ a_mat.T - beta * eta(t64)[:, None] * (w @ p_mat.T)
    r_exact = d_t + j_g_w + big_g @ m_mat.T
    # x-differences of linear fields are exact; the forward t-difference is off by |e_b|/2 |d_t^2 G| <= eps_t d2 / 2,
    # d_t^2 G = -beta (eta'' ghat + 2 eta' p) with |eta'| <= 2
    eta2 = 2.0 if eta_mode == "quad" else 0.0
    d2 = beta * (eta2 * (gh.abs() + eps_t * p_vec.abs()) + 4 * p_vec.abs())
    rounding = (1e-9 if dtype == torch.float64 else 3e-3) * (1 + r_exact.abs().max())
    tol = eps_t * d2 + rounding
    assert ((r_fd - r_exact).abs() <= tol).all(), (r_fd - r_exact).abs().max().item()
    # rtol 1e-6 in fp64: Triton passes float arguments (eps_t) as fp32, 5e-8 off
    torch.testing.assert_close(l_cons.double(), (r_fd**2).mean(), rtol=1e-5 if dtype == torch.float32 else 1e-6, atol=0)


def test_time_probe():
    t = torch.tensor([0.0, 0.5, 0.9985, 0.9995, 1.0])
    out = flowkern.time_probe(t, 1e-3)
    step = torch.tensor([1e-3, 1e-3, 1e-3, -1e-3, -1e-3])
    assert out.dtype == torch.float32 and torch.equal(out, t + step)
    assert flowkern.time_probe(0.9995).dtype == torch.float32 and flowkern.time_probe(0.9995).shape == ()
    assert flowkern.time_probe(t.double(), 0.25).dtype == torch.float64
    assert torch.equal(flowkern.time_probe(t.double(), 0.25), t.double() + torch.where(t.double() <= 0.75, 0.25, -0.25))
    with pytest.raises(ValueError, match="eps_t"):
        flowkern.time_probe(t, 0.0)
    with pytest.raises(TypeError, match="t"):
        flowkern.time_probe("0.5")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    x = make_inputs((2, 2, 3), eps_t=0.1, eps_x=0.1)  # large steps keep R and its Jacobian O(1) for gradcheck
    x = {k: (v.double() if k in TENSORS else v) for k, v in x.items()}
    x["t"] = torch.tensor([0.3, 0.95])  # 0.95 + 0.1 > 1: backward step
    value = [x[k].clone().requires_grad_() for k in VALUE_OUTPUTS]

    def f(c, c_t, c_x):
        return call(**{**x, "c": c, "c_t": c_t, "c_x": c_x})

    with flowkern.use_backend(backend):
        assert torch.autograd.gradcheck(f, value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    x = make_inputs((3, 16, 37, 29))
    for k in VALUE_OUTPUTS:
        x[k].requires_grad_()

    def run():
        l_cons, l_bnd = call(**x)
        return (l_cons, l_bnd, *torch.autograd.grad(l_cons + 2 * l_bnd, [x[k] for k in VALUE_OUTPUTS]))

    with flowkern.use_backend(backend):
        first, second = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("backend", BACKENDS)
def test_separate_cotangents(backend):
    """L_bnd alone reaches only c (2 m_b c/D); L_cons alone leaves the boundary term out."""
    x = make_inputs((3, 2, 3, 4))
    for k in VALUE_OUTPUTS:
        x[k].requires_grad_()
    with flowkern.use_backend(backend):
        l_cons, l_bnd = call(**x)
        g_bnd = torch.autograd.grad(l_bnd, [x[k] for k in VALUE_OUTPUTS], retain_graph=True, allow_unused=True)
        g_cons = torch.autograd.grad(l_cons, [x["c"]])[0]
    expected = 2 * x["mask"].view(-1, 1, 1, 1) * x["c"].detach() / x["c"].numel()
    torch.testing.assert_close(g_bnd[0], expected)
    assert all(g is None or not g.any() for g in g_bnd[1:])
    with flowkern.use_backend("torch"):
        ref = torch.autograd.grad(call(**x)[0], [x["c"]])[0]
    torch.testing.assert_close(g_cons, ref, rtol=1e-5, atol=1e-5)


def test_no_grad_path_skips_gradient():
    x = make_inputs((2, 3, 4, 5))
    with torch.no_grad():
        l_cons, l_bnd = call(**x)
    assert torch.isfinite(l_cons) and torch.isfinite(l_bnd) and not l_cons.requires_grad


def test_opcheck():
    x = make_inputs((2, 3, 4, 5))
    t, rho_w, rho_g = x["t"], x["rho_w"], x["rho_G"]
    for compute_grad in (True, False):
        tensors = [x[k].clone().requires_grad_(compute_grad and k in VALUE_OUTPUTS) for k in TENSORS]
        tensors[1] = tensors[1].detach().bfloat16().requires_grad_(compute_grad)  # mixed dtypes
        args = (*tensors, t, 0.0, 1.7, "quad", 1e-3, 1e-3, rho_w, 0.0, rho_g, 0.0, None, 1.0, compute_grad)
        torch.library.opcheck(torch.ops.flowkern.consistency_residual.default, args)
    q = torch.randn(2, 3, 4, 5)
    c = x["c"].bfloat16()
    for need in ((True, True, True), (False, True, False)):
        args = (torch.tensor(0.7), torch.tensor(1.3), q, c, t, 0.0, None, 0.8, None, 1.0, 1e-3, 1e-3, *need, c.dtype)
        torch.library.opcheck(torch.ops.flowkern.consistency_residual_backward.default, args)


def test_compile_fullgraph():
    x = make_inputs((2, 3, 4, 5))
    for k in VALUE_OUTPUTS:
        x[k].requires_grad_()
    e = make_exact_inputs((2, 3, 4, 5))
    e["dG"].requires_grad_()
    e["c"].requires_grad_()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(c, c_t, c_x, ghat, ghat_t, ghat_x, vb, vb_G, t, rho_w, rho_G, mask, dG, t3, c_exact):
        l_cons, l_bnd = flowkern.consistency_residual(
            c, c_t, c_x, ghat, ghat_t, ghat_x, vb, vb_G, t, 1.7, "quad", 1e-3, 1e-3, rho_w, rho_G, mask
        )
        e_cons, e_bnd = flowkern.consistency_residual_exact(dG, t3, c_exact, mask)
        return l_cons + 1e4 * l_bnd, e_cons + 1e4 * e_bnd

    args = [x[k] for k in TENSORS] + [x[k] for k in ("t", "rho_w", "rho_G", "mask")] + [e[k] for k in EXACT_TENSORS]
    loss, loss_exact = f(*args)
    (loss + loss_exact).backward()
    l_cons, l_bnd = call(**x)
    e_cons, e_bnd = call_exact(**{**e, "mask": x["mask"]})
    torch.testing.assert_close(loss, l_cons + 1e4 * l_bnd)
    torch.testing.assert_close(loss_exact, e_cons + 1e4 * e_bnd)
    for v in (*(x[k] for k in VALUE_OUTPUTS), e["dG"], e["c"]):
        assert v.grad is not None and torch.isfinite(v.grad).all()


BAD = [
    ({"c_t": torch.randn(2, 3, 4, 6)}, ValueError, "c_t"),
    ({"vb_G": torch.randn(2, 3, 4, 5).int()}, TypeError, "vb_G"),
    ({"ghat_x": None}, TypeError, "ghat_x"),
    ({"t": torch.rand(3)}, ValueError, "t"),
    ({"rho_w": torch.rand(2, 1)}, ValueError, "rho_w"),
    ({"rho_G": "1"}, TypeError, "rho_G"),
    ({"mask": torch.ones(5)}, ValueError, "mask"),
    ({"mask": float("nan")}, ValueError, "mask"),
    ({"beta": float("nan")}, ValueError, "beta"),
    ({"beta": -1.0}, ValueError, "beta"),
    ({"eps_t": 0.0}, ValueError, "eps_t"),
    ({"eps_t": float("inf")}, ValueError, "eps_t"),
    ({"eps_x": -1e-3}, ValueError, "eps_x"),
    ({"eta_mode": "cubic"}, ValueError, "eta_mode"),
    ({"c": torch.randn(0, 3)}, ValueError, "c"),
]


@pytest.mark.parametrize("change, exc, needle", BAD)
def test_bad_input(change, exc, needle):
    x = {**make_inputs((2, 3, 4, 5)), **change}
    with pytest.raises(exc, match=needle):
        call(**x)


def test_mixed_devices_rejected():
    x = make_inputs((2, 3, 4, 5))
    x["ghat_t"] = x["ghat_t"].to("meta")
    with pytest.raises(ValueError, match="ghat_t"):
        call(**x)


# ---------------------------------------------------------------- exact (M21)
@pytest.mark.parametrize("backend", EXACT_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ODD_SHAPES)
def test_exact_matches_reference(backend, dtype, shape):
    check_against_reference(call_exact, make_exact_inputs(shape), backend, dtype, grad_names=EXACT_TENSORS)


@pytest.mark.parametrize("backend", EXACT_BACKENDS)
def test_exact_noncontiguous_scalar_mask_and_mixed_dtypes(backend):
    check_against_reference(
        call_exact, make_exact_inputs((3, 5, 7, 9), per_sample=False, noncontiguous=True), backend, torch.float32,
        grad_names=EXACT_TENSORS,
    )  # fmt: skip
    x = make_exact_inputs((2, 4, 33, 17))
    x["dG"] = x["dG"].bfloat16().requires_grad_()
    x["c"] = x["c"].half().requires_grad_()
    outs = {}
    for name in ("torch", backend):
        with flowkern.use_backend(name):
            l_cons, l_bnd = call_exact(**x)
            outs[name] = (l_cons, l_bnd, *torch.autograd.grad(l_cons + 5 * l_bnd, [x["dG"], x["c"]]))
    for a, b in zip(outs[backend], outs["torch"]):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-5 if a.dim() == 0 else 8e-3, atol=1e-9)


@pytest.mark.parametrize("backend", EXACT_BACKENDS)
def test_exact_literal_equation_m21(backend):
    """R = dG + T3, L_cons = mean(R^2), L_bnd = (1/B) sum_b m_b mean_b(c_b^2); gradients 2R/D and 2 m_b c/D."""
    x = make_exact_inputs((3, 2, 4, 5))
    d = x["dG"].numel()
    r = x["dG"] + x["t3"]
    m = x["mask"].view(-1, 1, 1, 1)
    x["dG"].requires_grad_()
    x["c"].requires_grad_()
    with flowkern.use_backend(backend):
        l_cons, l_bnd = call_exact(**x)
        g_dg, g_c = torch.autograd.grad(0.3 * l_cons + 2.0 * l_bnd, [x["dG"], x["c"]])
    torch.testing.assert_close(l_cons, (r**2).mean())
    torch.testing.assert_close(l_bnd, sum(x["mask"][b] * (x["c"][b] ** 2).mean() for b in range(3)) / 3)
    torch.testing.assert_close(g_dg, 0.3 * 2 * r / d)
    torch.testing.assert_close(g_c, 2.0 * 2 * m * x["c"].detach() / d)


@pytest.mark.parametrize("backend", EXACT_BACKENDS)
def test_exact_gradcheck_float64_and_deterministic(backend):
    x = {k: (v.double() if k in EXACT_TENSORS else v) for k, v in make_exact_inputs((2, 2, 3)).items()}
    inputs = (x["dG"].clone().requires_grad_(), x["c"].clone().requires_grad_())
    with flowkern.use_backend(backend):
        assert torch.autograd.gradcheck(lambda dG, c: call_exact(dG=dG, t3=x["t3"], c=c, mask=x["mask"]), inputs)
        x32 = make_exact_inputs((3, 16, 37, 29))
        x32["dG"].requires_grad_()
        runs = []
        for _ in range(2):
            l_cons, l_bnd = call_exact(**x32)
            runs.append((l_cons, l_bnd, torch.autograd.grad(l_cons * 1.5, x32["dG"])[0]))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_exact_opcheck():
    x = make_exact_inputs((2, 3, 4, 5))
    mask = x["mask"]
    for compute_grad in (True, False):
        for dtype in (torch.float32, torch.bfloat16):
            dG = x["dG"].to(dtype).requires_grad_(compute_grad)
            c = x["c"].clone().requires_grad_(True)
            args = (dG, x["t3"], c, mask if isinstance(mask, torch.Tensor) else None, 1.0, compute_grad)
            torch.library.opcheck(torch.ops.flowkern.consistency_residual_exact.default, args)


@pytest.mark.parametrize(
    "change, exc, needle",
    [
        ({"t3": torch.randn(2, 3, 4, 6)}, ValueError, "t3"),
        ({"c": torch.randn(2, 3, 4, 5).long()}, TypeError, "c"),
        ({"mask": torch.ones(3)}, ValueError, "mask"),
        ({"dG": torch.randn(0, 3)}, ValueError, "dG"),
        ({"dG": 1.0}, TypeError, "dG"),
    ],
)
def test_exact_bad_input(change, exc, needle):
    x = {**make_exact_inputs((2, 3, 4, 5)), **change}
    with pytest.raises(exc, match=needle):
        call_exact(**x)


# ---------------------------------------------------------------- GPU
GPU_SHAPES = [(3, 5, 7, 9), (8, 16, 128, 128), (1, 32, 128, 128)]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_gpu_matches_reference(backend, dtype, shape):
    require_gpu_backend(mod.IMPLS, backend)
    x = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in make_inputs(shape).items()}
    check_against_reference(call, x, backend, dtype, grad_names=VALUE_OUTPUTS)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_gpu_exact_matches_reference(backend, dtype, shape):
    require_gpu_backend(mod.EXACT_IMPLS, backend)
    x = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in make_exact_inputs(shape).items()}
    check_against_reference(call_exact, x, backend, dtype, grad_names=EXACT_TENSORS)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_deterministic_and_unaligned(backend):
    require_gpu_backend(mod.IMPLS, backend)
    x = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in make_inputs((4, 16, 64, 64)).items()}
    for k in VALUE_OUTPUTS:
        x[k].requires_grad_()

    def run(inputs):
        l_cons, l_bnd = call(**inputs)
        return (l_cons, l_bnd, *torch.autograd.grad(l_cons + 2 * l_bnd, [inputs[k] for k in VALUE_OUTPUTS]))

    with flowkern.use_backend(backend):
        first, second = run(x), run(x)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    # an odd offset into storage takes the scalar (unaligned) path
    odd = {k: (torch.cat([v.detach().flatten(), v.new_zeros(1)])[1:].view(v.shape) if k in TENSORS else v)
           for k, v in make_inputs((2, 3, 8, 8)).items()}  # fmt: skip
    odd = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in odd.items()}
    check_against_reference(call, odd, backend, torch.float32, grad_names=VALUE_OUTPUTS)

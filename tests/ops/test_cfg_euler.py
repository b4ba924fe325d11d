"""cfg_euler (M5, M2, M6, M30): every CPU backend vs the reference, flags, partial cotangents, opcheck, gradcheck,
compile, batch invariance, bad input."""

import pytest
import torch

import flowkern
from tests.ops.harness import DTYPES, ODD_SHAPES, check_against_reference, cpu_backends, op_module, require_gpu_backend
from tests.utils import make_noncontiguous, misaligned

mod = op_module("cfg_euler")
BACKENDS = cpu_backends(mod.IMPLS)
GRAD_NAMES = ("v_uncond", "v_cond", "x")


def make_inputs(shape, *, cfg=True, per_sample=True, noncontiguous=False, mode="ode", detach_uncond=False,
                stopgrad_xhat=False, seed=1):  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    names = ("v_uncond", "v_cond", "x") + (("noise",) if mode == "memoryless" else ())
    x = {k: torch.randn(shape, generator=g) for k in names}
    if noncontiguous:
        x = {k: make_noncontiguous(v) for k, v in x.items()}
    batch = shape[0]
    coef = lambda lo, hi, scalar: lo + (hi - lo) * torch.rand(batch, generator=g) if per_sample else scalar
    x["w"] = coef(0.5, 6.0, 4.5) if cfg else None
    x["h"] = coef(0.01, 0.2, 0.05)
    x["t"] = coef(0.0, 0.95, 0.37)
    if not cfg:
        x["v_uncond"] = None
    if mode == "memoryless":  # (M29): kappa = 1/(t+h), sigma = sqrt(2(1-t+h)/(t+h))
        x["kappa"] = 1.0 / (x["t"] + x["h"])
        x["sigma"] = (2 * (1 - x["t"] + x["h"]) / (x["t"] + x["h"])) ** 0.5
    x["mode"], x["detach_uncond"], x["stopgrad_xhat"] = mode, detach_uncond, stopgrad_xhat
    return x


def call(**kw):
    return flowkern.cfg_euler(**kw)


def grad_names(inputs):
    return tuple(n for n in GRAD_NAMES if inputs.get(n) is not None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ODD_SHAPES)
def test_matches_reference(backend, dtype, shape):
    inputs = make_inputs(shape)
    check_against_reference(call, inputs, backend, dtype, grad_names=GRAD_NAMES)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["ode", "memoryless"])
@pytest.mark.parametrize("cfg, detach_uncond", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("stopgrad_xhat", [True, False])
def test_modes_and_flags(backend, mode, cfg, detach_uncond, stopgrad_xhat):
    # alternate layouts and coefficient kinds over the matrix: each kind is covered in both modes
    odd = (detach_uncond + stopgrad_xhat) % 2 == 1
    inputs = make_inputs((3, 5, 7, 9), cfg=cfg, per_sample=not odd, noncontiguous=odd, mode=mode,
                         detach_uncond=detach_uncond, stopgrad_xhat=stopgrad_xhat)  # fmt: skip
    dtype = torch.bfloat16 if mode == "memoryless" and not odd else torch.float32
    check_against_reference(call, inputs, backend, dtype, grad_names=grad_names(inputs))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["ode", "memoryless"])
@pytest.mark.parametrize("outputs", [(0,), (1,), (2,), (0, 2), (1, 2)])
def test_partial_cotangents(backend, mode, outputs):
    """Unused outputs get no cotangent (None, never materialised) and the identities need no kernel."""
    inputs = make_inputs((2, 4, 33, 17), mode=mode, stopgrad_xhat=outputs == (0, 2))

    def partial(**kw):
        out = call(**kw)
        return tuple(out[i] for i in outputs)

    check_against_reference(partial, inputs, backend, torch.float32, grad_names=GRAD_NAMES)
    no_cfg = make_inputs((2, 4, 33, 17), cfg=False, mode=mode)
    check_against_reference(partial, no_cfg, backend, torch.bfloat16, grad_names=("v_cond", "x"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16)])
def test_mixed_dtypes(backend, dtypes):
    """v in v_cond's dtype, x_next and x_hat1 in x's; bf16 velocities next to fp32 states is the common case."""
    v_dtype, x_dtype = dtypes
    x = make_inputs((2, 4, 33, 17), mode="memoryless")
    x["v_uncond"] = x["v_uncond"].to(v_dtype).requires_grad_()
    x["v_cond"] = x["v_cond"].to(v_dtype).requires_grad_()
    x["x"] = x["x"].to(x_dtype).requires_grad_()
    x["noise"] = x["noise"].half()
    results = []
    for b in (backend, "torch"):
        with flowkern.use_backend(b):
            out = call(**x)
            grads = torch.autograd.grad(sum(o.float().sum() for o in out), [x["v_uncond"], x["v_cond"], x["x"]])
        results.append((out, grads))
    (out, grads), (ref, ref_grads) = results
    assert [o.dtype for o in out] == [v_dtype, x_dtype, x_dtype]
    assert [g.dtype for g in grads] == [v_dtype, v_dtype, x_dtype]
    for a, b in zip(out + grads, ref + ref_grads):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("mode", ["ode", "memoryless"])
@pytest.mark.parametrize("detach_uncond, stopgrad_xhat", [(True, True), (False, False), (False, True)])
def test_literal_equations(mode, detach_uncond, stopgrad_xhat):
    """Forward and every gradient of the reference vs autograd through (M5), (M2)/(M30), (M6) written out."""
    x = make_inputs((3, 2, 4, 5), mode=mode, detach_uncond=detach_uncond, stopgrad_xhat=stopgrad_xhat)
    v_u, v_c, x0 = (x[k].double().requires_grad_() for k in ("v_uncond", "v_cond", "x"))
    col = lambda c: c.double().view(-1, 1, 1, 1)
    w, h, t = col(x["w"]), col(x["h"]), col(x["t"])
    u = v_u.detach() if detach_uncond else v_u
    v = u + w * (v_c - u)  # (M5)
    if mode == "ode":
        x_next = x0 + h * v  # (M2)
    else:  # (M30)
        x_next = x0 + h * (2 * v - col(x["kappa"]) * x0) + h.sqrt() * col(x["sigma"]) * x["noise"].double()
    x_hat1 = x0 + (1 - t) * (v.detach() if stopgrad_xhat else v)  # (M6)
    expected = (v, x_next, x_hat1)
    cots = [torch.randn_like(e) for e in expected]
    want = torch.autograd.grad(sum((e * c).sum() for e, c in zip(expected, cots)), [v_u, v_c, x0], allow_unused=True)
    kw = {**x, "v_uncond": v_u, "v_cond": v_c, "x": x0, "noise": x.get("noise", torch.empty(0)).double()}
    if mode == "ode":
        kw.pop("noise")
    with flowkern.use_backend("torch"):
        got = call(**kw)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
    got_grads = torch.autograd.grad(sum((o * c).sum() for o, c in zip(got, cots)), [v_u, v_c, x0], allow_unused=True)
    for a, b in zip(got_grads, want):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["ode", "memoryless"])
def test_gradcheck_float64(backend, mode):
    x = make_inputs((2, 3, 4, 5), mode=mode)
    x = {k: (v.double() if isinstance(v, torch.Tensor) and v.dim() > 1 else v) for k, v in x.items()}
    params = [x[k].requires_grad_() for k in GRAD_NAMES]

    def f(v_uncond, v_cond, state):
        return call(**{**x, "v_uncond": v_uncond, "v_cond": v_cond, "x": state})

    with flowkern.use_backend(backend):
        assert torch.autograd.gradcheck(f, params, fast_mode=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["ode", "memoryless"])
def test_batch_invariant_and_deterministic(backend, mode):
    x = make_inputs((3, 16, 37, 29), mode=mode)
    x["v_uncond"], x["v_cond"] = x["v_uncond"].bfloat16(), x["v_cond"].bfloat16()
    x["v_cond"].requires_grad_()
    sample = lambda b: {k: (v[b : b + 1] if isinstance(v, torch.Tensor) else v) for k, v in x.items()}
    with flowkern.use_backend(backend):
        full = call(**x)
        (full_grad,) = torch.autograd.grad(full[0].float().sum() + full[1].sum(), x["v_cond"])
        again = call(**x)
        for b in range(3):
            one = call(**sample(b))
            for a, c in zip(full, one):
                assert torch.equal(a[b : b + 1], c), f"sample {b} differs when computed alone"
            (one_grad,) = torch.autograd.grad(one[0].float().sum() + one[1].sum(), x["v_cond"])
            assert torch.equal(full_grad[b], one_grad[b])
    assert all(torch.equal(a, b) for a, b in zip(full, again))


def _coefs(batch, dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    return [torch.rand(batch, generator=g, dtype=dtype) for _ in range(5)]


def test_opcheck():
    shape = (2, 3, 4, 5)
    w, h, t, kappa, sigma = _coefs(2)
    for mode in ("ode", "memoryless"):
        for with_uncond in (True, False):
            v_u, v_c, x, noise = (torch.randn(shape) for _ in range(4))
            v_u = v_u.requires_grad_() if with_uncond else None
            extra = (kappa, sigma, noise) if mode == "memoryless" else (None, None, None)
            coefs = (w, 0.0, None, 0.05, t, 0.0, extra[0], 0.0, None, 1.3)  # tensors and Python floats
            v_c = v_c.bfloat16() if with_uncond else v_c  # bf16 velocities next to fp32 states
            v_u = v_u.bfloat16() if v_u is not None else None
            args = (v_u, v_c.requires_grad_(), x.requires_grad_(), *coefs, extra[2], mode, mode == "ode")
            torch.library.opcheck(torch.ops.flowkern.cfg_euler.default, args)
    g = torch.randn(shape)
    for mode in ("ode", "memoryless"):
        for grads in ((g, None, None), (None, g, g.clone()), (g.bfloat16(), g.clone(), g.clone())):
            kappa_ = kappa if mode == "memoryless" else None
            args = (*grads, w, 0.0, h, 0.0, None, 0.3, kappa_, 0.0, mode, False, True, True, True)
            torch.library.opcheck(
                torch.ops.flowkern.cfg_euler_backward.default, args, test_utils=("test_schema", "test_faketensor")
            )


def test_compile_fullgraph():
    x = make_inputs((2, 3, 4, 5), detach_uncond=False, stopgrad_xhat=False)
    for k in GRAD_NAMES:
        x[k].requires_grad_()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(v_uncond, v_cond, state, w, h, t):
        v, x_next, x_hat1 = flowkern.cfg_euler(v_uncond, v_cond, state, w, h, t, False, False)
        return (v * x_next).sum() + x_hat1.square().sum()

    out = f(x["v_uncond"], x["v_cond"], x["x"], x["w"], x["h"], x["t"])
    grads = torch.autograd.grad(out, [x[k] for k in GRAD_NAMES])
    v, x_next, x_hat1 = call(**x)
    ref = (v * x_next).sum() + x_hat1.square().sum()
    ref_grads = torch.autograd.grad(ref, [x[k] for k in GRAD_NAMES])
    torch.testing.assert_close(out, ref)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_no_grad_and_no_cfg():
    x = make_inputs((2, 3, 4, 5), cfg=False)
    with torch.no_grad():
        v, x_next, x_hat1 = call(**x)
    assert torch.equal(v, x["v_cond"]) and v.data_ptr() != x["v_cond"].data_ptr()
    h, t = x["h"].view(-1, 1, 1, 1), x["t"].view(-1, 1, 1, 1)
    torch.testing.assert_close(x_next, x["x"] + h * x["v_cond"])
    torch.testing.assert_close(x_hat1, x["x"] + (1 - t) * x["v_cond"])


def _bad(change):
    x = make_inputs((2, 3, 4, 5))
    return {**x, **change}


@pytest.mark.parametrize(
    "change, exc, needle",
    [
        ({"v_cond": torch.randn(2, 3, 4, 6)}, ValueError, "x"),
        ({"v_uncond": torch.randn(2, 3, 4, 6)}, ValueError, "v_uncond"),
        ({"x": torch.randn(3, 3, 4, 5)}, ValueError, "x"),
        ({"v_uncond": torch.randn(2, 3, 4, 5).int()}, TypeError, "v_uncond"),
        ({"x": torch.randn(2, 3, 4, 5).long()}, TypeError, "x"),
        ({"v_cond": "v"}, TypeError, "v_cond"),
        ({"w": torch.rand(3)}, ValueError, "w"),
        ({"h": torch.rand(2, 1)}, ValueError, "h"),
        ({"t": torch.rand(1, 2)}, ValueError, "t"),
        ({"h": float("nan")}, ValueError, "h"),
        ({"w": torch.tensor([1.0, float("inf")])}, ValueError, "w"),
        ({"t": "0.5"}, TypeError, "t"),
        ({"w": None}, ValueError, "w"),
        ({"mode": "sde"}, ValueError, "mode"),
        ({"mode": "memoryless"}, ValueError, "kappa"),
        ({"mode": "memoryless", "kappa": 1.0, "noise": torch.randn(2, 3, 4, 5)}, ValueError, "sigma"),
        ({"mode": "memoryless", "kappa": 1.0, "sigma": 1.0}, ValueError, "noise"),
        ({"mode": "memoryless", "kappa": 1.0, "sigma": 1.0, "noise": torch.randn(2, 3, 5)}, ValueError, "noise"),
        (
            {"mode": "memoryless", "kappa": float("inf"), "sigma": 1.0, "noise": torch.randn(2, 3, 4, 5)},
            ValueError,
            "kappa",
        ),  # fmt: skip
        ({"kappa": 1.0}, ValueError, "kappa"),
        ({"noise": torch.randn(2, 3, 4, 5)}, ValueError, "noise"),
        ({"detach_uncond": 1}, TypeError, "detach_uncond"),
        ({"v_cond": torch.randn(0, 3, 4, 5), "x": torch.randn(0, 3, 4, 5), "v_uncond": None}, ValueError, "v_cond"),
    ],
)
def test_bad_input(change, exc, needle):
    with pytest.raises(exc, match=needle):
        call(**_bad(change))


@pytest.mark.parametrize("name", ["v_uncond", "x", "noise"])
def test_mixed_devices_rejected(name):
    x = make_inputs((2, 3, 4, 5), mode="memoryless")
    x[name] = x[name].to("meta")
    with pytest.raises(ValueError, match=name):
        call(**x)


def test_coefficient_on_other_device_rejected():
    x = make_inputs((2, 3, 4, 5))
    x["h"] = x["h"].to("meta")
    with pytest.raises(ValueError, match="h"):
        call(**x)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["ode", "memoryless"])
@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (8, 16, 128, 128), (1, 32, 128, 128), (4, 4096, 64)])
def test_gpu_matches_reference(backend, dtype, mode, shape):
    require_gpu_backend(mod.IMPLS, backend)
    x = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in make_inputs(shape, mode=mode).items()}
    check_against_reference(call, x, backend, dtype, grad_names=GRAD_NAMES)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("mode", ["ode", "memoryless"])
def test_gpu_mixed_unaligned_batch_invariant(backend, mode):
    """bf16 velocities with fp32 states: 16-byte path == scalar path (misaligned copies) == sample alone."""
    require_gpu_backend(mod.IMPLS, backend)
    x = {
        k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in make_inputs((4, 16, 64, 64), mode=mode).items()
    }
    x["v_uncond"], x["v_cond"] = x["v_uncond"].bfloat16(), x["v_cond"].bfloat16().requires_grad_()
    x["x"].requires_grad_()
    with flowkern.use_backend(backend):
        full = call(**x)
        for b in range(4):
            one = call(**{k: (v[b : b + 1] if isinstance(v, torch.Tensor) else v) for k, v in x.items()})
            assert all(torch.equal(a[b : b + 1], c) for a, c in zip(full, one))
        shifted = call(
            **{k: (misaligned(v) if isinstance(v, torch.Tensor) and v.dim() > 1 else v) for k, v in x.items()}
        )
        assert all(torch.equal(a, b) for a, b in zip(full, shifted)), "the 16-byte and scalar forward paths differ"
        # the backward kernel's scalar path: the same cotangents in misaligned buffers (built on the GPU)
        cots = [o.detach() for o in full]
        inputs = [x["v_cond"], x["x"]]
        grads = torch.autograd.grad(full, inputs, cots, retain_graph=True)
        grads_shifted = torch.autograd.grad(full, inputs, [misaligned(c) for c in cots])
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_shifted)), "the 16-byte and scalar backward paths differ"

"""adjoint_step (M23, M25, M31): every CPU backend vs the reference, gradients through a_new and cot, parity with
autograd through an Euler step, opcheck, gradcheck, compile, batch invariance, bad input."""

import pytest
import torch

import flowkern
from tests.ops.harness import DTYPES, ODD_SHAPES, check_against_reference, cpu_backends, op_module, require_gpu_backend
from tests.utils import make_noncontiguous, misaligned

mod = op_module("adjoint_step")
BACKENDS = cpu_backends(mod.IMPLS)
GRAD_NAMES = ("a", "vjp_u", "vjp_c")


def make_inputs(shape, *, cfg=True, per_sample=True, noncontiguous=False, mode="ode", return_cot=True, seed=2):
    g = torch.Generator().manual_seed(seed)
    x = {k: torch.randn(shape, generator=g) for k in GRAD_NAMES}
    if noncontiguous:
        x = {k: make_noncontiguous(v) for k, v in x.items()}
    batch = shape[0]
    coef = lambda lo, hi, scalar: lo + (hi - lo) * torch.rand(batch, generator=g) if per_sample else scalar
    x["h"] = coef(0.01, 0.2, 0.05)
    x["w"] = coef(0.5, 6.0, 4.5) if cfg else None
    if not cfg:
        x["vjp_c"] = None
    x["kappa"] = coef(0.5, 3.0, 1.3) if mode == "memoryless" else None
    x["mode"], x["return_cot"] = mode, return_cot
    return x


def call(**kw):
    return flowkern.adjoint_step(**kw)


def grad_names(inputs):
    return tuple(n for n in GRAD_NAMES if inputs.get(n) is not None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ODD_SHAPES)
def test_matches_reference(backend, dtype, shape):
    check_against_reference(call, make_inputs(shape), backend, dtype, grad_names=GRAD_NAMES)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["ode", "memoryless"])
@pytest.mark.parametrize("cfg", [True, False])
@pytest.mark.parametrize("return_cot", [True, False])
def test_modes_and_flags(backend, mode, cfg, return_cot):
    odd = cfg != return_cot  # alternate layouts, coefficient kinds and dtypes over the matrix
    inputs = make_inputs((3, 5, 7, 9), cfg=cfg, per_sample=not odd, noncontiguous=odd, mode=mode,
                         return_cot=return_cot)  # fmt: skip
    dtype = torch.bfloat16 if mode == "memoryless" and odd else torch.float32
    check_against_reference(call, inputs, backend, dtype, grad_names=grad_names(inputs))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["ode", "memoryless"])
@pytest.mark.parametrize("output", [0, 1])
@pytest.mark.parametrize("cfg", [True, False])
def test_single_output_cotangent(backend, mode, output, cfg):
    """Only a_new or only cot carries a cotangent (the other arrives as None); d a = g_a needs no kernel."""
    inputs = make_inputs((2, 4, 33, 17), cfg=cfg, mode=mode)
    check_against_reference(lambda **kw: call(**kw)[output], inputs, backend, torch.float32, grad_names(inputs))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cfg", [True, False])
def test_mixed_dtypes(backend, cfg):
    """fp32 adjoint with bf16 VJPs (the lean-adjoint case): a_new fp32, cot bf16, gradients in the inputs' dtypes."""
    x = make_inputs((2, 4, 33, 17), cfg=cfg, mode="memoryless")
    x["a"].requires_grad_()
    x["vjp_u"] = x["vjp_u"].bfloat16().requires_grad_()
    if cfg:
        x["vjp_c"] = x["vjp_c"].half().requires_grad_()
    params = [x[k] for k in grad_names(x)]
    results = []
    for b in (backend, "torch"):
        with flowkern.use_backend(b):
            a_new, cot = call(**x)
            grads = torch.autograd.grad(a_new.sum() + cot.float().square().sum(), params)
        results.append(((a_new, cot), grads))
    (out, grads), (ref, ref_grads) = results
    assert out[0].dtype == torch.float32 and out[1].dtype == torch.bfloat16
    assert out[1].shape[0] == (4 if cfg else 2)
    assert [g.dtype for g in grads] == [p.dtype for p in params]
    for a, b in zip(out + grads, ref + ref_grads):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("mode", ["ode", "memoryless"])
@pytest.mark.parametrize("cfg", [True, False])
def test_literal_equations(mode, cfg):
    """Forward and every gradient of the reference vs autograd through (M25)/(M31) and cot = [a_new; a_new]."""
    x = make_inputs((3, 2, 4, 5), cfg=cfg, mode=mode)
    a, u = x["a"].double().requires_grad_(), x["vjp_u"].double().requires_grad_()
    c = x["vjp_c"].double().requires_grad_() if cfg else None
    col = lambda coef: coef.double().view(-1, 1, 1, 1)
    jta = (1 - col(x["w"])) * u + col(x["w"]) * c if cfg else u  # (M5)
    if mode == "ode":
        a_new = a + col(x["h"]) * jta  # (M25)
    else:
        a_new = a + col(x["h"]) * (2 * jta - col(x["kappa"]) * a)  # (M31)
    cot = torch.cat([a_new, a_new]) if cfg else a_new
    params = [p for p in (a, u, c) if p is not None]
    cots = [torch.randn_like(a_new), torch.randn_like(cot)]
    want = torch.autograd.grad((a_new * cots[0]).sum() + (cot * cots[1]).sum(), params)
    with flowkern.use_backend("torch"):
        got = call(**{**x, "a": a, "vjp_u": u, "vjp_c": c})
    torch.testing.assert_close(got[0], a_new)
    torch.testing.assert_close(got[1], cot)
    got_grads = torch.autograd.grad((got[0] * cots[0]).sum() + (got[1] * cots[1]).sum(), params)
    for g, e in zip(got_grads, want):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_autograd_through_euler_step(backend):
    """(M23)/(M25): the adjoint of x_{i+1} = x_i + h((1-w) v_u(x_i) + w v_c(x_i)) from VJPs on the [2B] batch."""
    g = torch.Generator().manual_seed(5)
    batch, dim = 3, 6
    weight = torch.randn(2, dim, dim, generator=g, dtype=torch.float64) / dim**0.5
    velocity = lambda x2: torch.tanh(torch.einsum("bij,bj->bi", weight.repeat_interleave(batch, 0), x2))
    x, a = torch.randn(batch, dim, generator=g, dtype=torch.float64), torch.randn(batch, dim, dtype=torch.float64)
    w, h = torch.tensor([1.0, 4.5, 7.0]), torch.tensor([0.1, 0.05, 0.2])
    x_leaf = x.clone().requires_grad_()
    v2 = velocity(torch.cat([x_leaf, x_leaf]))
    step = x_leaf + h.double()[:, None] * ((1 - w.double()[:, None]) * v2[:batch] + w.double()[:, None] * v2[batch:])
    (expected,) = torch.autograd.grad(step, x_leaf, a)
    x2 = torch.cat([x, x]).requires_grad_()
    (vjp,) = torch.autograd.grad(velocity(x2), x2, torch.cat([a, a]))
    with flowkern.use_backend(backend):
        a_new, cot = flowkern.adjoint_step(a, vjp[:batch], h, vjp[batch:], w, return_cot=True)
    torch.testing.assert_close(a_new, expected)
    assert torch.equal(cot, torch.cat([a_new, a_new]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["ode", "memoryless"])
def test_gradcheck_float64(backend, mode):
    x = make_inputs((2, 3, 4, 5), mode=mode)
    x = {k: (v.double() if isinstance(v, torch.Tensor) and v.dim() > 1 else v) for k, v in x.items()}
    params = [x[k].requires_grad_() for k in GRAD_NAMES]

    def f(a, vjp_u, vjp_c):
        return call(**{**x, "a": a, "vjp_u": vjp_u, "vjp_c": vjp_c})

    with flowkern.use_backend(backend):
        assert torch.autograd.gradcheck(f, params, fast_mode=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["ode", "memoryless"])
def test_batch_invariant_and_deterministic(backend, mode):
    x = make_inputs((3, 16, 37, 29), mode=mode)
    x["vjp_u"], x["vjp_c"] = x["vjp_u"].bfloat16(), x["vjp_c"].bfloat16().requires_grad_()
    sample = lambda b: {k: (v[b : b + 1] if isinstance(v, torch.Tensor) else v) for k, v in x.items()}
    with flowkern.use_backend(backend):
        a_new, cot = call(**x)
        (grad,) = torch.autograd.grad(a_new.sum() + cot.float().sum(), x["vjp_c"])
        again = call(**x)
        for b in range(3):
            one_new, one_cot = call(**sample(b))
            assert torch.equal(a_new[b : b + 1], one_new), f"sample {b} differs when computed alone"
            assert torch.equal(cot[b : b + 1], one_cot[:1]) and torch.equal(cot[3 + b : 4 + b], one_cot[1:])
            (one_grad,) = torch.autograd.grad(one_new.sum() + one_cot.float().sum(), x["vjp_c"])
            assert torch.equal(grad[b], one_grad[b])
    assert torch.equal(a_new, again[0]) and torch.equal(cot, again[1])


def test_opcheck():
    shape = (2, 3, 4, 5)
    g = torch.Generator().manual_seed(3)
    h, w, kappa = (torch.rand(2, generator=g) for _ in range(3))
    for mode in (0, 1):
        for cfg in (True, False):
            a, u, c = (torch.randn(shape, requires_grad=True) for _ in range(3))
            args = (a, u.bfloat16(), c.bfloat16() if cfg else None, h, 0.0, w if cfg else None, 0.5)
            torch.library.opcheck(
                torch.ops.flowkern.adjoint_step.default, (*args, kappa if mode else None, 0.0, mode, cfg)
            )
    grad_a, grad_cot = torch.randn(shape), torch.randn(4, 3, 4, 5).bfloat16()
    for mode in (0, 1):
        for grads in ((grad_a, None), (None, grad_cot), (grad_a, grad_cot)):
            args = (*grads, 2, h, 0.0, None, 0.5, kappa if mode else None, 0.0, mode, True, True, True, True)
            torch.library.opcheck(
                torch.ops.flowkern.adjoint_step_backward.default, args, test_utils=("test_schema", "test_faketensor")
            )


def test_compile_fullgraph():
    x = make_inputs((2, 3, 4, 5), mode="memoryless")
    for k in GRAD_NAMES:
        x[k].requires_grad_()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(a, vjp_u, vjp_c, h, w, kappa):
        a_new, cot = flowkern.adjoint_step(a, vjp_u, h, vjp_c, w, kappa, "memoryless", True)
        return a_new.square().sum() + cot.sum()

    out = f(*(x[k] for k in ("a", "vjp_u", "vjp_c", "h", "w", "kappa")))
    grads = torch.autograd.grad(out, [x[k] for k in GRAD_NAMES])
    a_new, cot = call(**x)
    ref = a_new.square().sum() + cot.sum()
    ref_grads = torch.autograd.grad(ref, [x[k] for k in GRAD_NAMES])
    torch.testing.assert_close(out, ref)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_no_cot_is_empty_and_no_grad():
    x = make_inputs((2, 3, 4, 5), cfg=False, return_cot=False)
    with torch.no_grad():
        a_new, cot = call(**x)
    assert cot.numel() == 0 and a_new.dtype == torch.float32
    torch.testing.assert_close(a_new, x["a"] + x["h"].view(-1, 1, 1, 1) * x["vjp_u"])


@pytest.mark.parametrize(
    "change, exc, needle",
    [
        ({"vjp_u": torch.randn(2, 3, 4, 6)}, ValueError, "vjp_u"),
        ({"vjp_c": torch.randn(3, 3, 4, 5)}, ValueError, "vjp_c"),
        ({"a": torch.randn(2, 3, 4, 5).int()}, TypeError, "a"),
        ({"vjp_c": torch.randn(2, 3, 4, 5).long()}, TypeError, "vjp_c"),
        ({"vjp_u": None}, TypeError, "vjp_u"),
        ({"h": torch.rand(3)}, ValueError, "h"),
        ({"w": torch.rand(2, 2)}, ValueError, "w"),
        ({"h": float("inf")}, ValueError, "h"),
        ({"w": torch.tensor([0.5, float("nan")])}, ValueError, "w"),
        ({"h": "0.1"}, TypeError, "h"),
        ({"w": None}, ValueError, "w"),
        ({"vjp_c": None}, ValueError, "w"),
        ({"mode": "sde"}, ValueError, "mode"),
        ({"mode": "memoryless"}, ValueError, "kappa"),
        ({"mode": "memoryless", "kappa": torch.tensor([1.0, float("inf")])}, ValueError, "kappa"),
        ({"mode": "memoryless", "kappa": torch.rand(3)}, ValueError, "kappa"),
        ({"kappa": 1.0}, ValueError, "kappa"),
        ({"return_cot": "yes"}, TypeError, "return_cot"),
        ({"a": torch.randn(0, 3, 4, 5)}, ValueError, "a"),
    ],
)
def test_bad_input(change, exc, needle):
    x = {**make_inputs((2, 3, 4, 5)), **change}
    with pytest.raises(exc, match=needle):
        call(**x)


@pytest.mark.parametrize("name", ["vjp_u", "vjp_c", "h"])
def test_mixed_devices_rejected(name):
    x = make_inputs((2, 3, 4, 5))
    x[name] = x[name].to("meta")
    with pytest.raises(ValueError, match=name):
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
@pytest.mark.parametrize("cfg", [True, False])
def test_gpu_mixed_unaligned_batch_invariant(backend, cfg):
    """fp32 a with bf16 VJPs: 16-byte path == scalar path (misaligned copies) == sample alone."""
    require_gpu_backend(mod.IMPLS, backend)
    x = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in make_inputs((4, 16, 64, 64), cfg=cfg).items()}
    x["vjp_u"] = x["vjp_u"].bfloat16().requires_grad_()
    if cfg:
        x["vjp_c"] = x["vjp_c"].bfloat16().requires_grad_()
    x["return_cot"] = True
    with flowkern.use_backend(backend):
        full = call(**x)
        for b in range(4):
            one_new, one_cot = call(**{k: (v[b : b + 1] if isinstance(v, torch.Tensor) else v) for k, v in x.items()})
            assert torch.equal(full[0][b : b + 1], one_new) and torch.equal(full[1][b : b + 1], one_cot[:1])
        shifted = call(
            **{k: (misaligned(v) if isinstance(v, torch.Tensor) and v.dim() > 1 else v) for k, v in x.items()}
        )
        assert all(torch.equal(a, b) for a, b in zip(full, shifted)), "the 16-byte and scalar forward paths differ"
        # the backward kernel's scalar path: the same cotangents in misaligned buffers (built on the GPU)
        cots = [o.detach() for o in full]
        inputs = [x["vjp_u"]] + ([x["vjp_c"]] if cfg else [])
        grads = torch.autograd.grad(full, inputs, cots, retain_graph=True)
        grads_shifted = torch.autograd.grad(full, inputs, [misaligned(c) for c in cots])
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_shifted)), "the 16-byte and scalar backward paths differ"

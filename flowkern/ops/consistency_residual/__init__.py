"""`consistency_residual` and `consistency_residual_exact`: VGG-Flow's value-net losses (M17, M18, M20, M21).

Finite differences (M20), `consistency_residual`, with e_b the signed time step (see `time_probe`):

    G   = c   - beta * eta(t)       * ghat              (M15; c = c_phi at (x, t))
    G_t = c_t - beta * eta(t + e_b) * ghat_t            (c_phi, ghat at (x, t + e_b))
    G_x = c_x - beta * eta(t)       * ghat_x            (c_phi, ghat at (x_w, t), x_w from `consistency_probes`)
    R   = (G_t - G)/e_b + rho_w (G_x - G)/eps_x + rho_G (vb_G - vb)/eps_x      (T1 + T2 + T3)
    L_cons = mean(R^2)                                  (M18, mean over all B*D_b elements)
    L_bnd  = (1/B) sum_b m_b mean_b(c_b^2)              (M17, m_b = 1 on the terminal transition)

    e_b = +eps_t if t_b + eps_t <= 1 else -eps_t        ((M20): "if t+eps_t > 1 use -eps_t"; fp32 test)

Exact (M21), `consistency_residual_exact`: R = dG + T3 with dG = d_tG + J_G w (one JVP), T3 detached;
L_cons, L_bnd as above.

Gradients (q = 2R/D, m = mask, D = B*D_b; nothing reaches ghat*, vb*, t3, rho*, t, mask):
    dL_cons/dc_t = q/e_b,  dL_cons/dc_x = q rho_w/eps_x,  dL_cons/dc = -q (1/e_b + rho_w/eps_x),  dL_bnd/dc = 2 m_b c/D
    exact: dL_cons/ddG = q,  dL_bnd/dc = 2 m_b c/D
L_cons and L_bnd have separate cotangents. The finite-difference forward saves only q (fp32, fp64 for fp64 c;
(M20) keeps these inputs fp32 anyway); one fused backward kernel reads q (and c on terminal samples only) and
writes the three gradients. Saving the three gradients instead (math.md's 8R+3W) costs 3R+3W in the backward:
    forward 8R + 1W = 9D,  backward 1R + 3W (+1R of c where m_b != 0): 13D in all, vs 17D.
The exact forward saves dL_cons/ddG in dG's dtype (like `vggflow_matching_loss`): 2R + 1W, plus c where m_b != 0;
its backward scales it (in place, nothing for a cotangent of 1) and forms 2 m_b c/D (1R + 1W).
Files: reference.py (torch backend, oracle), triton.py (+ its autograd), op.cpp (schemas, checks, autograd), cpu.cpp,
cuda.cu.

Shapes: every tensor [B, ...] of one shape (any layout); t, rho_w, rho_G, mask fp32 [B] or [].
Outputs: L_cons, L_bnd fp32 scalars (fp64 for fp64 c / dG). Reductions: fp32 partial sums per (sample, fixed
chunk), summed in a fixed order (deterministic).
"""

from __future__ import annotations

import torch

from flowkern.ops import _validate as V
from flowkern.ops._autograd import register_fake, schema_call
from flowkern.ops.backend import HAS_TRITON, backend_for, implementations, native_op
from flowkern.ops.consistency_residual.reference import consistency_residual as reference
from flowkern.ops.consistency_residual.reference import consistency_residual_exact as reference_exact
from flowkern.ops.consistency_residual.reference import signed_time_step

OP = "consistency_residual"
OP_EXACT = "consistency_residual_exact"
# The native ops' arguments, written once (C++ reads them from structs generated from these: docs/ops.md).
SCHEMA = (
    "consistency_residual(Tensor c, Tensor c_t, Tensor c_x, Tensor ghat, Tensor ghat_t, Tensor ghat_x, Tensor vb, "
    "Tensor vb_G, Tensor? t, float t_value, float beta, str eta_mode, float eps_t, float eps_x, Tensor? rho_w, "
    "float rho_w_value, Tensor? rho_G, float rho_G_value, Tensor? mask, float mask_value, bool compute_grad=False) "
    "-> (Tensor l_cons, Tensor l_bnd, Tensor q)"
)
BACKWARD_SCHEMA = (
    "consistency_residual_backward(Tensor grad_cons, Tensor grad_bnd, Tensor q, Tensor c, Tensor? t, float t_value, "
    "Tensor? rho_w, float rho_w_value, Tensor? mask, float mask_value, float eps_t, float eps_x, bool need_c, "
    "bool need_c_t, bool need_c_x, ScalarType out_type) -> (Tensor grad_c, Tensor grad_c_t, Tensor grad_c_x)"
)
EXACT_SCHEMA = (
    "consistency_residual_exact(Tensor dG, Tensor t3, Tensor c, Tensor? mask, float mask_value, "
    "bool compute_grad=False) -> (Tensor l_cons, Tensor l_bnd, Tensor grad)"
)


def bytes_moved(c: torch.Tensor, mode: str = "fwd", terminal_fraction: float = 1.0, exact: bool = False) -> int:
    """Minimal HBM traffic (module docstring) of 'fwd' (no gradient), 'bwd' or 'fwd_bwd' (forward saving q + backward).

    c: the primary input (dG for exact=True). terminal_fraction: share of samples with m_b != 0, whose c is read.
    """
    n, size = c.numel(), c.element_size()
    acc_size = 8 if c.dtype == torch.float64 else 4
    if exact:  # forward 2R (+ c on terminal samples), +1W with the gradient; backward 2R + 2W (dG, c)
        fwd, saved, bwd = n * size * (2 + terminal_fraction), n * size, 4 * n * size
    else:  # forward 8R, +1W of q (acc dtype); backward 1R of q + 3W (+ c on terminal samples)
        fwd, saved, bwd = 8 * n * size, n * acc_size, n * (acc_size + (3 + terminal_fraction) * size)
    return int({"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + saved + bwd}[mode])


def time_probe(t: torch.Tensor | float, eps_t: float = 1e-3) -> torch.Tensor:
    """t + e_b: where to evaluate c_phi and ghat for T1 of (M20); e_b = eps_t, or -eps_t where t + eps_t > 1.

    The one definition shared by callers and the kernels (which derive e_b from t themselves): the test
    t + eps_t <= 1 runs in fp32 (fp64 for an fp64 t). Returns a tensor of t's shape, fp32 (fp64 for fp64 t).
    """
    eps_t = V.check_float("eps_t", eps_t, positive=True)
    if isinstance(t, torch.Tensor):
        if not t.dtype.is_floating_point:
            raise TypeError(f"t must be a floating tensor or a float, got {t.dtype}")
        t = t.detach().to(torch.float64 if t.dtype == torch.float64 else torch.float32)
    else:
        t = torch.tensor(V.check_float("t", t), dtype=torch.float32)
    return t + signed_time_step(t, eps_t)


if HAS_TRITON:
    from flowkern.ops.consistency_residual import triton as _triton_module

    _triton = schema_call(_triton_module.consistency_residual, SCHEMA)
    _triton_exact = schema_call(_triton_module.consistency_residual_exact, EXACT_SCHEMA)
else:  # pragma: no cover
    _triton = _triton_exact = None

IMPLS = implementations(reference, _triton, native_op(OP))
EXACT_IMPLS = implementations(reference_exact, _triton_exact, native_op(OP_EXACT))


def _losses(primary: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    loss = primary.new_empty((), dtype=V.loss_dtype(primary))
    return loss, torch.empty_like(loss)


@register_fake(SCHEMA)
def _(a):
    acc = V.loss_dtype(a.c)
    return *_losses(a.c), a.c.new_empty(a.c.shape if a.compute_grad else (0,), dtype=acc)


@register_fake(BACKWARD_SCHEMA)
def _(a):
    shape = lambda need: a.q.shape if need else (0,)
    return tuple(a.q.new_empty(shape(need), dtype=a.out_type) for need in (a.need_c, a.need_c_t, a.need_c_x))


@register_fake(EXACT_SCHEMA)
def _(a):
    grad = torch.empty_like(a.dG, memory_format=torch.contiguous_format) if a.compute_grad else a.dG.new_empty(0)
    return *_losses(a.dG), grad


def _coefficients(primary: torch.Tensor, **coefs) -> list:
    """(tensor, value) per coefficient, flattened in the given order (checked, for the Python backends)."""
    out = []
    for name, value in coefs.items():
        out += V.coefficient(name, value, primary)
    return out


def consistency_residual(
    c: torch.Tensor,
    c_t: torch.Tensor,
    c_x: torch.Tensor,
    ghat: torch.Tensor,
    ghat_t: torch.Tensor,
    ghat_x: torch.Tensor,
    vb: torch.Tensor,
    vb_G: torch.Tensor,
    t: torch.Tensor | float,
    beta: float,
    eta_mode: str,
    eps_t: float,
    eps_x: float,
    rho_w: torch.Tensor | float,
    rho_G: torch.Tensor | float,
    mask: torch.Tensor | float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """VGG-Flow finite-difference consistency and boundary losses (M17, M18, M20): returns (L_cons, L_bnd), fp32.

    Args:
        c, c_t, c_x: value-net outputs c_phi at (x, t), (x, time_probe(t, eps_t)) and (x_w, t); the only inputs
            that receive gradients. ghat, ghat_t, ghat_x: clipped reward gradients (M8) at the same three points.
        vb, vb_G: base velocity at (x, t) and (x_G, t). x_w, x_G, rho_w, rho_G come from `consistency_probes`.
        t: paper time per sample ([B] or scalar); the time step e_b = +eps_t, or -eps_t where t + eps_t > 1,
            matching `time_probe`. beta: 1/lambda > 0. eta_mode: 'quad' | 'linear' | 'constant' (M15).
        eps_t, eps_x: finite-difference steps (M20), > 0. mask: m_b, 1 on the terminal transition (M17).

    The caller forms L_cons + alpha * L_bnd (M19).
    """
    backend = backend_for(OP, IMPLS, "c", c)
    if backend in V.NATIVE:  # every check in C++ (op.cpp)
        t, t_v, rho_w, rho_w_v, rho_G, rho_G_v, mask, mask_v = V.native_coefficients(t, rho_w, rho_G, mask)
        try:
            l_cons, l_bnd, _ = IMPLS[backend](
                c, c_t, c_x, ghat, ghat_t, ghat_x, vb, vb_G, t, t_v, beta, eta_mode, eps_t, eps_x, rho_w, rho_w_v,
                rho_G, rho_G_v, mask, mask_v,
            )  # fmt: skip
        except RuntimeError as error:
            V.raise_type_error(error)
            raise
        return l_cons, l_bnd
    V.check_tensors(c, "c", c_t=c_t, c_x=c_x, ghat=ghat, ghat_t=ghat_t, ghat_x=ghat_x, vb=vb, vb_G=vb_G)
    beta = V.check_float("beta", beta, positive=True)
    V.eta_code(eta_mode)
    eps_t = V.check_float("eps_t", eps_t, positive=True)
    eps_x = V.check_float("eps_x", eps_x, positive=True)
    t_, t_v, rho_w_, rho_w_v, rho_G_, rho_G_v, mask_, mask_v = _coefficients(
        c, t=t, rho_w=rho_w, rho_G=rho_G, mask=mask
    )
    if backend == "torch":
        return reference(
            c, c_t, c_x, ghat, ghat_t, ghat_x, vb, vb_G, t, beta, eta_mode, eps_t, eps_x, rho_w, rho_G, mask
        )
    l_cons, l_bnd, _ = IMPLS[backend](
        c, c_t, c_x, ghat, ghat_t, ghat_x, vb, vb_G, t_, t_v, beta, eta_mode, eps_t, eps_x, rho_w_, rho_w_v, rho_G_,
        rho_G_v, mask_, mask_v,
    )  # fmt: skip
    return l_cons, l_bnd


def consistency_residual_exact(
    dG: torch.Tensor, t3: torch.Tensor, c: torch.Tensor, mask: torch.Tensor | float
) -> tuple[torch.Tensor, torch.Tensor]:
    """VGG-Flow 'exact' consistency and boundary losses (M17, M18, M21): returns (L_cons, L_bnd), fp32.

    Args:
        dG: the JVP output d/ds G_phi(x + s w, t + s)|_0 = d_tG + J_G w (gradient 2R/D flows into it).
        t3: T3 = J_vbase^T sg(G) (detached). c: value-net output c_phi at (x, t) (gradient from L_bnd only).
        mask: m_b, 1 on the terminal transition (M17); [B] or scalar.

    R = dG + t3, L_cons = mean(R^2), L_bnd = (1/B) sum_b m_b mean_b(c_b^2). The caller forms L_cons + alpha L_bnd.
    """
    backend = backend_for(OP_EXACT, EXACT_IMPLS, "dG", dG)
    if backend in V.NATIVE:  # every check in C++ (op.cpp)
        try:
            l_cons, l_bnd, _ = EXACT_IMPLS[backend](dG, t3, c, *V.native_coefficients(mask))
        except RuntimeError as error:
            V.raise_type_error(error)
            raise
        return l_cons, l_bnd
    V.check_tensors(dG, "dG", t3=t3, c=c)
    mask_pair = V.coefficient("mask", mask, dG)
    if backend == "torch":
        return reference_exact(dG, t3, c, mask)
    l_cons, l_bnd, _ = EXACT_IMPLS[backend](dG, t3, c, *mask_pair)
    return l_cons, l_bnd

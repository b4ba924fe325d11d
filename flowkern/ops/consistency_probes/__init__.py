"""`consistency_probes`: the perturbed states of VGG-Flow's finite-difference residual (M20).

    G     = c_phi - beta * eta_t * ghat                 (M15; c_phi = value_out)
    w     = v_base - G                                  (= v*, shared by (M20)/(M21))
    rho_w = rms_b(w),  rho_G = rms_b(G)                 (rms_b = ||.||/sqrt(D_b), floored at 1e-12)
    x_w   = x + eps_x * w / rho_w                       (probe of T2 ~ J_G w)
    x_G   = x + eps_x * G / rho_G                       (probe of T3 ~ J_vbase G)

The caller evaluates c_phi, ghat at (x_w, t), v_base at (x_G, t) and c_phi, ghat at (x, time_probe(t, eps_t))
(see `consistency_residual.time_probe`), then calls `consistency_residual`.

Shapes: x, v_base, value_out, reward_grad [B, ...] (same shape, any layout); t fp32 [B] or [].
Outputs: x_w, x_G fp32 [B, ...] (fp64 for fp64 x: the perturbed inputs of (M20) are fp32), rho_w, rho_G fp32 [B].
Not differentiable: every input is stop-gradient in (M20), the outputs carry no autograd history.
Two passes, since the per-sample rms gates the elementwise pass: norms (3R), then probes (4R + 2W) = 9D.
Reductions: fp32 partial sums per (sample, fixed chunk), summed in a fixed order: deterministic, batch-invariant.
Files: reference.py (torch backend, oracle), triton.py, op.cpp (schema, checks), cpu.cpp, cuda.cu.
"""

from __future__ import annotations

import torch

from flowkern.ops import _validate as V
from flowkern.ops._autograd import register_fake, schema_call
from flowkern.ops.backend import HAS_TRITON, backend_for, implementations, native_op
from flowkern.ops.consistency_probes.reference import consistency_probes as reference

OP = "consistency_probes"
# The native op's arguments, written once (C++ reads them from a struct generated from this: docs/ops.md).
SCHEMA = (
    "consistency_probes(Tensor x, Tensor v_base, Tensor value_out, Tensor reward_grad, Tensor? t, float t_value, "
    "float beta, str eta_mode, float eps_x) -> (Tensor x_w, Tensor x_G, Tensor rho_w, Tensor rho_G)"
)


def bytes_moved(x: torch.Tensor) -> int:
    """Minimal HBM traffic of one call (math.md section 8): 7R in x's dtype + 2W in fp32 (= 9D for fp32)."""
    out_size = 8 if x.dtype == torch.float64 else 4
    return x.numel() * (7 * x.element_size() + 2 * out_size)


if HAS_TRITON:
    from flowkern.ops.consistency_probes.triton import consistency_probes as _triton_launch

    _triton = schema_call(_triton_launch, SCHEMA)
else:  # pragma: no cover
    _triton = None

IMPLS = implementations(reference, _triton, native_op(OP))


@register_fake(SCHEMA)
def _(a):
    out_dtype = V.loss_dtype(a.x)
    x_w = a.x.new_empty(a.x.shape, dtype=out_dtype)
    rho = a.x.new_empty((a.x.shape[0],), dtype=out_dtype)
    return x_w, torch.empty_like(x_w), rho, torch.empty_like(rho)


def consistency_probes(
    x: torch.Tensor,
    v_base: torch.Tensor,
    value_out: torch.Tensor,
    reward_grad: torch.Tensor,
    t: torch.Tensor | float,
    beta: float,
    eta_mode: str = "quad",
    eps_x: float = 1e-3,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Perturbed states of (M20): returns (x_w, x_G, rho_w, rho_G), fp32, without autograd history.

    Args:
        x: state x_t [B, ...]. v_base: base velocity v_base(x, t). value_out: value-net output c_phi (M15).
        reward_grad: clipped reward gradient ghat at x_hat1(x, t) (M8).
        t: paper time per sample ([B] or scalar). beta: 1/lambda > 0.
        eta_mode: 'quad' (t^2, default), 'linear' (t) or 'constant' (1). eps_x: per-element RMS step (M20).

    With G = value_out - beta*eta_t*reward_grad and w = v_base - G: x_w = x + eps_x*w/rho_w (where the caller
    evaluates c_phi and ghat for T2), x_G = x + eps_x*G/rho_G (where it evaluates v_base for T3);
    rho = rms over each sample, floored at 1e-12. Pass rho_w, rho_G on to `consistency_residual`.
    """
    backend = backend_for(OP, IMPLS, "x", x)
    if backend in V.NATIVE:  # every check in C++ (op.cpp); not differentiable: no autograd history
        try:
            return IMPLS[backend](x, v_base, value_out, reward_grad, *V.native_coefficients(t), beta, eta_mode, eps_x)
        except RuntimeError as error:
            V.raise_type_error(error)
            raise
    V.check_tensors(x, "x", v_base=v_base, value_out=value_out, reward_grad=reward_grad)
    beta = V.check_float("beta", beta, positive=True)
    V.eta_code(eta_mode)
    eps_x = V.check_float("eps_x", eps_x, positive=True)
    t_pair = V.coefficient("t", t, x)
    if backend == "torch":
        return reference(x, v_base, value_out, reward_grad, t, beta, eta_mode, eps_x)
    tensors = (x.detach(), v_base.detach(), value_out.detach(), reward_grad.detach())
    return IMPLS[backend](*tensors, *t_pair, beta, eta_mode, eps_x)

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
"""

from __future__ import annotations

import torch

from flowkern.ops import _validate as V
from flowkern.ops.backend import HAS_TRITON, ext_function, implementations, select_backend
from flowkern.ops.reference.consistency_probes import RMS_FLOOR
from flowkern.ops.reference.consistency_probes import consistency_probes as reference

OP = "consistency_probes"


def bytes_moved(x: torch.Tensor) -> int:
    """Minimal HBM traffic of one call (math.md section 8): 7R in x's dtype + 2W in fp32 (= 9D for fp32)."""
    out_size = 8 if x.dtype == torch.float64 else 4
    return x.numel() * (7 * x.element_size() + 2 * out_size)


# ---------------------------------------------------------------- Triton
if HAS_TRITON:
    import triton
    import triton.language as tl

    from flowkern.ops._triton_layout import acc_dtype, reduction_layout

    @triton.jit
    def _eta(t, ETA_MODE: tl.constexpr):
        # eta_t of (M15): quad t^2, linear t, constant 1
        if ETA_MODE == 0:
            eta = t * t
        elif ETA_MODE == 1:
            eta = t
        else:
            eta = t * 0 + 1
        return eta

    @triton.jit
    def _probe_norms_kernel(
        vb_ptr, value_ptr, ghat_ptr, t_ptr, partial_ptr,
        d, chunk, n_chunks, beta,
        ETA_MODE: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1).to(tl.int64)
        coef = beta * _eta(tl.load(t_ptr + b).to(ACC), ETA_MODE)
        acc_w = tl.zeros([BLOCK], dtype=ACC)
        acc_g = tl.zeros([BLOCK], dtype=ACC)
        start = c * chunk
        for off in range(0, chunk, BLOCK):
            idx = start + off + tl.arange(0, BLOCK)
            mask = idx < d
            ptr = b * d + idx
            # upcast right after every load (the interpreter miscomputes raw bf16)
            g = tl.load(value_ptr + ptr, mask=mask, other=0).to(ACC)
            g -= coef * tl.load(ghat_ptr + ptr, mask=mask, other=0).to(ACC)
            w = tl.load(vb_ptr + ptr, mask=mask, other=0).to(ACC) - g
            acc_w += w * w
            acc_g += g * g
        tile = (b * n_chunks + c) * 2
        tl.store(partial_ptr + tile, tl.sum(acc_w, axis=0))
        tl.store(partial_ptr + tile + 1, tl.sum(acc_g, axis=0))

    @triton.jit
    def _probe_write_kernel(
        x_ptr, vb_ptr, value_ptr, ghat_ptr, t_ptr, partial_ptr, x_w_ptr, x_g_ptr, rho_w_ptr, rho_g_ptr,
        d, chunk, n_chunks, beta, eps_x, rms_floor,
        ETA_MODE: tl.constexpr, BLOCK: tl.constexpr, CHUNKS_BLOCK: tl.constexpr, ACC: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1).to(tl.int64)
        # every program of sample b sums the same partials in the same order: identical rho everywhere
        p = tl.arange(0, CHUNKS_BLOCK)
        p_mask = p < n_chunks
        sum_w = tl.sum(tl.load(partial_ptr + (b * n_chunks + p) * 2, mask=p_mask, other=0).to(ACC), axis=0)
        sum_g = tl.sum(tl.load(partial_ptr + (b * n_chunks + p) * 2 + 1, mask=p_mask, other=0).to(ACC), axis=0)
        rho_w = tl.maximum(tl.sqrt(sum_w / d), rms_floor)
        rho_g = tl.maximum(tl.sqrt(sum_g / d), rms_floor)
        tl.store(rho_w_ptr + b, rho_w, mask=c == 0)
        tl.store(rho_g_ptr + b, rho_g, mask=c == 0)
        step_w = eps_x / rho_w
        step_g = eps_x / rho_g
        coef = beta * _eta(tl.load(t_ptr + b).to(ACC), ETA_MODE)
        start = c * chunk
        for off in range(0, chunk, BLOCK):
            idx = start + off + tl.arange(0, BLOCK)
            mask = idx < d
            ptr = b * d + idx
            g = tl.load(value_ptr + ptr, mask=mask, other=0).to(ACC)
            g -= coef * tl.load(ghat_ptr + ptr, mask=mask, other=0).to(ACC)
            w = tl.load(vb_ptr + ptr, mask=mask, other=0).to(ACC) - g
            x = tl.load(x_ptr + ptr, mask=mask, other=0).to(ACC)
            tl.store(x_w_ptr + ptr, x + step_w * w, mask=mask)
            tl.store(x_g_ptr + ptr, x + step_g * g, mask=mask)

    def _triton_impl(x, v_base, value_out, reward_grad, t, beta, eta_mode, eps_x):
        x, v_base, value_out, reward_grad = (a.contiguous() for a in (x, v_base, value_out, reward_grad))
        # the interpreter writes out of bounds silently: check what the kernels index before launching
        if any(a.shape != x.shape for a in (v_base, value_out, reward_grad)) or t.shape != (x.shape[0],):
            raise ValueError("consistency_probes: inputs must share x's shape and t must be [B]")
        batch, d = x.shape[0], x.numel() // x.shape[0]
        block, chunk, n_chunks = reduction_layout(d)
        out_dtype = V.loss_dtype(x)
        partial = torch.empty(batch * n_chunks * 2, dtype=out_dtype, device=x.device)
        x_w = torch.empty(x.shape, dtype=out_dtype, device=x.device)
        x_g = torch.empty_like(x_w)
        rho_w = torch.empty(batch, dtype=out_dtype, device=x.device)
        rho_g = torch.empty_like(rho_w)
        acc = acc_dtype(x)
        _probe_norms_kernel[(batch, n_chunks)](
            v_base, value_out, reward_grad, t, partial, d, chunk, n_chunks, beta,
            ETA_MODE=eta_mode, BLOCK=block, ACC=acc,
        )  # fmt: skip
        _probe_write_kernel[(batch, n_chunks)](
            x, v_base, value_out, reward_grad, t, partial, x_w, x_g, rho_w, rho_g,
            d, chunk, n_chunks, beta, eps_x, RMS_FLOOR,
            ETA_MODE=eta_mode, BLOCK=block, CHUNKS_BLOCK=triton.next_power_of_2(max(n_chunks, 2)), ACC=acc,
        )  # fmt: skip
        return x_w, x_g, rho_w, rho_g
else:  # pragma: no cover
    _triton_impl = None


# ---------------------------------------------------------------- C++ / CUDA (flowkern._C)
_ext_fwd = ext_function("consistency_probes_fwd")


def _ext_impl(x, v_base, value_out, reward_grad, t, beta, eta_mode, eps_x):
    dtype = V.common_compute_dtype(x, v_base, value_out, reward_grad)
    args = [a.to(dtype).contiguous() for a in (x, v_base, value_out, reward_grad)]
    t = t.to(V.coef_dtype(args[0]))
    outs = _ext_fwd(*args, t, beta, eta_mode, eps_x)
    out_dtype = V.loss_dtype(x)  # outputs follow x even when another input forced an fp64 compute dtype
    return tuple(o.to(out_dtype) for o in outs)


IMPLS = implementations(reference, _triton_impl, _ext_impl if _ext_fwd else None)


# ---------------------------------------------------------------- custom op
@torch.library.custom_op("flowkern::consistency_probes", mutates_args=())
def _op(
    x: torch.Tensor,
    v_base: torch.Tensor,
    value_out: torch.Tensor,
    reward_grad: torch.Tensor,
    t: torch.Tensor,
    beta: float,
    eta_mode: int,
    eps_x: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = select_backend(OP, IMPLS, x.device)
    return impl(x, v_base, value_out, reward_grad, t, beta, eta_mode, eps_x)


@_op.register_fake
def _(x, v_base, value_out, reward_grad, t, beta, eta_mode, eps_x):
    for other in (v_base, value_out, reward_grad):
        torch._check(other.shape == x.shape)
    torch._check(t.shape == (x.shape[0],))
    out_dtype = V.loss_dtype(x)
    x_w = x.new_empty(x.shape, dtype=out_dtype)
    rho = x.new_empty((x.shape[0],), dtype=out_dtype)
    return x_w, torch.empty_like(x_w), rho, torch.empty_like(rho)


def _setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(*output)  # (M20): probes are stop-gradient


def _backward(ctx, *grads):
    return (None,) * 8


_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------- public API
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
    V.check_tensor("x", x)
    V.check_tensor("v_base", v_base, x, "x")
    V.check_tensor("value_out", value_out, x, "x")
    V.check_tensor("reward_grad", reward_grad, x, "x")
    beta = V.check_float("beta", beta, positive=True)
    mode = V.eta_code(eta_mode)
    eps_x = V.check_float("eps_x", eps_x, positive=True)
    t = V.per_sample("t", t, x)
    return _op(x, v_base, value_out, reward_grad, t, beta, mode, eps_x)

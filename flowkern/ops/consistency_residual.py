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
its backward scales it (1R + 1W) and forms 2 m_b c/D (1R + 1W).

Shapes: every tensor [B, ...] of one shape (any layout); t, rho_w, rho_G, mask fp32 [B] or [].
Outputs: L_cons, L_bnd fp32 scalars (fp64 for fp64 c / dG). Reductions: fp32 partial sums per (sample, fixed
chunk), summed in a fixed order (deterministic).
"""

from __future__ import annotations

import torch

from flowkern.ops import _validate as V
from flowkern.ops._loss_autograd import _is_one
from flowkern.ops.backend import HAS_TRITON, ext_function, implementations, select_backend
from flowkern.ops.reference.consistency_residual import boundary_grad, signed_time_step
from flowkern.ops.reference.consistency_residual import consistency_residual as reference
from flowkern.ops.reference.consistency_residual import consistency_residual_backward as reference_backward
from flowkern.ops.reference.consistency_residual import consistency_residual_exact as reference_exact

OP = "consistency_residual"
OP_EXACT = "consistency_residual_exact"


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


# ---------------------------------------------------------------- Triton
if HAS_TRITON:
    import triton.language as tl
    from triton import jit

    from flowkern.ops._triton_layout import acc_dtype, reduction_layout
    from flowkern.ops.consistency_probes import _eta

    @jit
    def _signed_step(t, eps_t):
        # e_b of (M20), the same fp32 test as `signed_time_step`
        return tl.where(t + eps_t <= 1.0, eps_t, -eps_t).to(t.dtype)

    @jit
    def _residual_kernel(
        c_ptr, c_t_ptr, c_x_ptr, g_ptr, g_t_ptr, g_x_ptr, vb_ptr, vb_g_ptr, t_ptr, rho_w_ptr, rho_g_ptr,
        q_ptr, partial_ptr,
        d, chunk, n_chunks, beta, eps_t, eps_x, q_scale,
        ETA_MODE: tl.constexpr, COMPUTE_GRAD: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1).to(tl.int64)
        t = tl.load(t_ptr + b).to(ACC)
        step = _signed_step(t, eps_t)
        inv_step = 1.0 / step
        coef = beta * _eta(t, ETA_MODE)
        coef_t = beta * _eta(t + step, ETA_MODE)
        k_w = tl.load(rho_w_ptr + b).to(ACC) / eps_x
        k_g = tl.load(rho_g_ptr + b).to(ACC) / eps_x
        acc_r = tl.zeros([BLOCK], dtype=ACC)
        acc_c = tl.zeros([BLOCK], dtype=ACC)
        start = c * chunk
        for off in range(0, chunk, BLOCK):
            idx = start + off + tl.arange(0, BLOCK)
            mask = idx < d
            ptr = b * d + idx
            # upcast right after every load (the interpreter miscomputes raw bf16)
            cc = tl.load(c_ptr + ptr, mask=mask, other=0).to(ACC)
            g = cc - coef * tl.load(g_ptr + ptr, mask=mask, other=0).to(ACC)
            g_t = tl.load(c_t_ptr + ptr, mask=mask, other=0).to(ACC)
            g_t -= coef_t * tl.load(g_t_ptr + ptr, mask=mask, other=0).to(ACC)
            g_x = tl.load(c_x_ptr + ptr, mask=mask, other=0).to(ACC)
            g_x -= coef * tl.load(g_x_ptr + ptr, mask=mask, other=0).to(ACC)
            dvb = tl.load(vb_g_ptr + ptr, mask=mask, other=0).to(ACC)
            dvb -= tl.load(vb_ptr + ptr, mask=mask, other=0).to(ACC)
            r = (g_t - g) * inv_step + k_w * (g_x - g) + k_g * dvb
            acc_r += r * r
            acc_c += cc * cc
            if COMPUTE_GRAD:
                tl.store(q_ptr + ptr, r * q_scale, mask=mask)
        tile = (b * n_chunks + c) * 2
        tl.store(partial_ptr + tile, tl.sum(acc_r, axis=0))
        tl.store(partial_ptr + tile + 1, tl.sum(acc_c, axis=0))

    @jit
    def _residual_backward_kernel(
        q_ptr, c_ptr, t_ptr, rho_w_ptr, mask_ptr, grad_cons_ptr, grad_bnd_ptr, grad_c_ptr, grad_c_t_ptr, grad_c_x_ptr,
        d, chunk, eps_t, eps_x, bnd_scale,
        NEED_C: tl.constexpr, NEED_C_T: tl.constexpr, NEED_C_X: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1).to(tl.int64)
        t = tl.load(t_ptr + b).to(ACC)
        inv_step = 1.0 / _signed_step(t, eps_t)
        k_w = tl.load(rho_w_ptr + b).to(ACC) / eps_x
        g = tl.load(grad_cons_ptr).to(ACC)
        s_t = g * inv_step
        s_x = g * k_w
        s_c = -g * (inv_step + k_w)
        s_b = tl.load(grad_bnd_ptr).to(ACC) * tl.load(mask_ptr + b).to(ACC) * bnd_scale
        # c is read on terminal samples only (s_b == 0 elsewhere; c assumed finite there)
        c_limit = tl.where(s_b != 0, d, 0)
        start = c * chunk
        for off in range(0, chunk, BLOCK):
            idx = start + off + tl.arange(0, BLOCK)
            mask = idx < d
            ptr = b * d + idx
            q = tl.load(q_ptr + ptr, mask=mask, other=0).to(ACC)
            if NEED_C_T:
                tl.store(grad_c_t_ptr + ptr, (q * s_t).to(grad_c_t_ptr.dtype.element_ty), mask=mask)
            if NEED_C_X:
                tl.store(grad_c_x_ptr + ptr, (q * s_x).to(grad_c_x_ptr.dtype.element_ty), mask=mask)
            if NEED_C:
                cc = tl.load(c_ptr + ptr, mask=idx < c_limit, other=0).to(ACC)
                tl.store(grad_c_ptr + ptr, (q * s_c + s_b * cc).to(grad_c_ptr.dtype.element_ty), mask=mask)

    @jit
    def _exact_kernel(
        dg_ptr, t3_ptr, c_ptr, mask_ptr, grad_ptr, partial_ptr,
        d, chunk, n_chunks, grad_scale,
        COMPUTE_GRAD: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1).to(tl.int64)
        # c is read on terminal samples only (M17; c assumed finite elsewhere)
        c_limit = tl.where(tl.load(mask_ptr + b) != 0, d, 0)
        acc_r = tl.zeros([BLOCK], dtype=ACC)
        acc_c = tl.zeros([BLOCK], dtype=ACC)
        start = c * chunk
        for off in range(0, chunk, BLOCK):
            idx = start + off + tl.arange(0, BLOCK)
            mask = idx < d
            ptr = b * d + idx
            r = tl.load(dg_ptr + ptr, mask=mask, other=0).to(ACC) + tl.load(t3_ptr + ptr, mask=mask, other=0).to(ACC)
            acc_r += r * r
            if COMPUTE_GRAD:
                tl.store(grad_ptr + ptr, (r * grad_scale).to(grad_ptr.dtype.element_ty), mask=mask)
            cc = tl.load(c_ptr + ptr, mask=idx < c_limit, other=0).to(ACC)
            acc_c += cc * cc
        tile = (b * n_chunks + c) * 2
        tl.store(partial_ptr + tile, tl.sum(acc_r, axis=0))
        tl.store(partial_ptr + tile + 1, tl.sum(acc_c, axis=0))

    def _check_layout(primary, tensors, coefs):
        # the interpreter writes out of bounds silently: check what the kernels index before launching
        for x in tensors:
            if x.shape != primary.shape or not x.is_contiguous():
                raise ValueError(f"kernel input of shape {tuple(x.shape)} does not match {tuple(primary.shape)}")
        for x in coefs:
            if x.shape != (primary.shape[0],) or not x.is_contiguous():
                raise ValueError(f"per-sample coefficient of shape {tuple(x.shape)} is not [{primary.shape[0]}]")

    def _finish(partial, mask, batch, n_chunks, numel):
        """Losses from the per-(sample, chunk) partials (R^2, c^2), summed in a fixed order."""
        partial = partial.view(batch, n_chunks, 2)
        l_cons = partial[:, :, 0].sum() / numel
        l_bnd = (mask.to(partial.dtype) * partial[:, :, 1].sum(1)).sum() / numel  # (1/B) sum m_b sum_b c^2 / D_b
        return l_cons, l_bnd

    def _triton_impl(
        c, c_t, c_x, ghat, ghat_t, ghat_x, vb, vb_G, t, beta, eta_mode, eps_t, eps_x, rho_w, rho_G, mask, compute_grad
    ):
        tensors = [a.contiguous() for a in (c, c_t, c_x, ghat, ghat_t, ghat_x, vb, vb_G)]
        c = tensors[0]
        _check_layout(c, tensors, (t, rho_w, rho_G, mask))
        batch, d = c.shape[0], c.numel() // c.shape[0]
        block, chunk, n_chunks = reduction_layout(d)
        acc = V.loss_dtype(c)
        q = torch.empty(c.shape, dtype=acc, device=c.device) if compute_grad else c.new_empty(0, dtype=acc)
        partial = torch.empty(batch * n_chunks * 2, dtype=acc, device=c.device)
        _residual_kernel[(batch, n_chunks)](
            *tensors, t, rho_w, rho_G, q if compute_grad else partial, partial,
            d, chunk, n_chunks, beta, eps_t, eps_x, 2.0 / c.numel(),
            ETA_MODE=eta_mode, COMPUTE_GRAD=compute_grad, BLOCK=block, ACC=acc_dtype(c),
        )  # fmt: skip
        return (*_finish(partial, mask, batch, n_chunks, c.numel()), q)

    def _triton_backward_impl(grad_cons, grad_bnd, q, c, t, rho_w, mask, eps_t, eps_x, dtype_c, dtype_c_t, dtype_c_x):
        c = c.contiguous()
        _check_layout(q, (c,), (t, rho_w, mask))
        if grad_cons.numel() != 1 or grad_bnd.numel() != 1:
            raise ValueError("grad_cons and grad_bnd must be scalars")
        batch, d = q.shape[0], q.numel() // q.shape[0]
        block, chunk, n_chunks = reduction_layout(d)
        outs = [torch.empty(q.shape, dtype=dt, device=q.device) if dt is not None else q.new_empty(0)
                for dt in (dtype_c, dtype_c_t, dtype_c_x)]  # fmt: skip
        ptrs = [o if dt is not None else q for o, dt in zip(outs, (dtype_c, dtype_c_t, dtype_c_x))]
        _residual_backward_kernel[(batch, n_chunks)](
            q, c, t, rho_w, mask, grad_cons, grad_bnd, *ptrs,
            d, chunk, eps_t, eps_x, 2.0 / q.numel(),
            NEED_C=dtype_c is not None, NEED_C_T=dtype_c_t is not None, NEED_C_X=dtype_c_x is not None,
            BLOCK=block, ACC=acc_dtype(q),
        )  # fmt: skip
        return tuple(outs)

    def _triton_exact_impl(dG, t3, c, mask, compute_grad):
        dG, t3, c = (a.contiguous() for a in (dG, t3, c))
        _check_layout(dG, (t3, c), (mask,))
        batch, d = dG.shape[0], dG.numel() // dG.shape[0]
        block, chunk, n_chunks = reduction_layout(d)
        grad = torch.empty_like(dG) if compute_grad else dG.new_empty(0)
        partial = torch.empty(batch * n_chunks * 2, dtype=V.loss_dtype(dG), device=dG.device)
        _exact_kernel[(batch, n_chunks)](
            dG, t3, c, mask, grad if compute_grad else dG, partial,
            d, chunk, n_chunks, 2.0 / dG.numel(),
            COMPUTE_GRAD=compute_grad, BLOCK=block, ACC=acc_dtype(dG),
        )  # fmt: skip
        return (*_finish(partial, mask, batch, n_chunks, dG.numel()), grad)
else:  # pragma: no cover
    _triton_impl = _triton_backward_impl = _triton_exact_impl = None


# ---------------------------------------------------------------- C++ / CUDA (flowkern._C)
_ext_fwd = ext_function("consistency_residual_fwd")
_ext_bwd = ext_function("consistency_residual_bwd")
_ext_exact_fwd = ext_function("consistency_residual_exact_fwd")


def _ext_impl(c, c_t, c_x, ghat, ghat_t, ghat_x, vb, vb_G, t, beta, eta_mode, eps_t, eps_x, rho_w, rho_G, mask,
              compute_grad):  # fmt: skip
    tensors = (c, c_t, c_x, ghat, ghat_t, ghat_x, vb, vb_G)
    dtype = V.common_compute_dtype(*tensors)
    tensors = [a.to(dtype).contiguous() for a in tensors]
    coef = V.coef_dtype(tensors[0])
    l_cons, l_bnd, q = _ext_fwd(
        *tensors, t.to(coef), beta, eta_mode, eps_t, eps_x, rho_w.to(coef), rho_G.to(coef), mask.to(coef), compute_grad
    )
    acc = V.loss_dtype(c)  # q and the losses follow c even when another input forced fp64
    return l_cons.to(acc), l_bnd.to(acc), q.to(acc)


def _ext_backward_impl(grad_cons, grad_bnd, q, c, t, rho_w, mask, eps_t, eps_x, dtype_c, dtype_c_t, dtype_c_x):
    # one kernel element type: the gradients' common dtype (fp32/fp64 when they differ)
    dtypes = {c.dtype} | {dt for dt in (dtype_c, dtype_c_t, dtype_c_x) if dt is not None}
    dtype = dtypes.pop() if len(dtypes) == 1 else (torch.float64 if torch.float64 in dtypes else torch.float32)
    c = c.to(dtype).contiguous()
    coef = V.coef_dtype(c)
    outs = _ext_bwd(
        grad_cons.to(coef), grad_bnd.to(coef), q.to(coef).contiguous(), c, t.to(coef), rho_w.to(coef),
        mask.to(coef), eps_t, eps_x, dtype_c is not None, dtype_c_t is not None, dtype_c_x is not None,
    )  # fmt: skip
    return tuple(o.to(dt) if dt is not None else o for o, dt in zip(outs, (dtype_c, dtype_c_t, dtype_c_x)))


def _ext_exact_impl(dG, t3, c, mask, compute_grad):
    dtype = V.common_compute_dtype(dG, t3, c)
    args = [a.to(dtype).contiguous() for a in (dG, t3, c)]
    l_cons, l_bnd, grad = _ext_exact_fwd(*args, mask.to(V.coef_dtype(args[0])), compute_grad)
    acc = V.loss_dtype(dG)
    return l_cons.to(acc), l_bnd.to(acc), grad.to(dG.dtype) if compute_grad else grad


IMPLS = implementations(reference, _triton_impl, _ext_impl if _ext_fwd else None)
BACKWARD_IMPLS = implementations(reference_backward, _triton_backward_impl, _ext_backward_impl if _ext_bwd else None)
EXACT_IMPLS = implementations(reference_exact, _triton_exact_impl, _ext_exact_impl if _ext_exact_fwd else None)


def _loss_fakes(primary: torch.Tensor, others, coefs) -> tuple[torch.Tensor, torch.Tensor]:
    for other in others:
        torch._check(other.shape == primary.shape)
    for coef in coefs:
        torch._check(coef.shape == (primary.shape[0],))
    loss = primary.new_empty((), dtype=V.loss_dtype(primary))
    return loss, torch.empty_like(loss)


def _zero_if_none(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return grad if grad is not None else like.new_zeros(())


# ---------------------------------------------------------------- custom op: finite differences (M20)
@torch.library.custom_op("flowkern::consistency_residual", mutates_args=())
def _op(
    c: torch.Tensor,
    c_t: torch.Tensor,
    c_x: torch.Tensor,
    ghat: torch.Tensor,
    ghat_t: torch.Tensor,
    ghat_x: torch.Tensor,
    vb: torch.Tensor,
    vb_G: torch.Tensor,
    t: torch.Tensor,
    beta: float,
    eta_mode: int,
    eps_t: float,
    eps_x: float,
    rho_w: torch.Tensor,
    rho_G: torch.Tensor,
    mask: torch.Tensor,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = select_backend(OP, IMPLS, c.device)
    return impl(c, c_t, c_x, ghat, ghat_t, ghat_x, vb, vb_G, t, beta, eta_mode, eps_t, eps_x, rho_w, rho_G, mask,
                compute_grad)  # fmt: skip


@_op.register_fake
def _(c, c_t, c_x, ghat, ghat_t, ghat_x, vb, vb_G, t, beta, eta_mode, eps_t, eps_x, rho_w, rho_G, mask, compute_grad):
    l_cons, l_bnd = _loss_fakes(c, (c_t, c_x, ghat, ghat_t, ghat_x, vb, vb_G), (t, rho_w, rho_G, mask))
    q = c.new_empty(c.shape, dtype=V.loss_dtype(c)) if compute_grad else c.new_empty(0, dtype=V.loss_dtype(c))
    return l_cons, l_bnd, q


@torch.library.custom_op("flowkern::consistency_residual_backward", mutates_args=())
def _backward_op(
    grad_cons: torch.Tensor,
    grad_bnd: torch.Tensor,
    q: torch.Tensor,
    c: torch.Tensor,
    t: torch.Tensor,
    rho_w: torch.Tensor,
    mask: torch.Tensor,
    eps_t: float,
    eps_x: float,
    dtype_c: torch.dtype | None,
    dtype_c_t: torch.dtype | None,
    dtype_c_x: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = select_backend(OP + "_backward", BACKWARD_IMPLS, q.device)
    return impl(grad_cons, grad_bnd, q, c, t, rho_w, mask, eps_t, eps_x, dtype_c, dtype_c_t, dtype_c_x)


@_backward_op.register_fake
def _(grad_cons, grad_bnd, q, c, t, rho_w, mask, eps_t, eps_x, dtype_c, dtype_c_t, dtype_c_x):
    torch._check(c.shape == q.shape)
    return tuple(
        q.new_empty(q.shape, dtype=dt) if dt is not None else q.new_empty(0) for dt in (dtype_c, dtype_c_t, dtype_c_x)
    )


def _setup_context(ctx, inputs, output):
    c, c_t, c_x, t, eps_t, eps_x, rho_w, mask = (inputs[i] for i in (0, 1, 2, 8, 11, 12, 13, 15))
    ctx.set_materialize_grads(False)  # q gets no cotangent; a missing loss cotangent counts as zero
    ctx.save_for_backward(output[2], c, t, rho_w, mask)
    ctx.eps = (eps_t, eps_x)
    ctx.dtypes = (c.dtype, c_t.dtype, c_x.dtype)
    ctx.mark_non_differentiable(output[2])


def _backward(ctx, grad_cons, grad_bnd, _unused):
    q, c, t, rho_w, mask = ctx.saved_tensors
    grads: list = [None] * 17
    # L_cons alone reaches c_t, c_x; without its cotangent they get None (= zero) instead of written zeros
    need = (ctx.needs_input_grad[0], *(n and grad_cons is not None for n in ctx.needs_input_grad[1:3]))
    if q.numel() == 0 or not any(need) or (grad_cons is None and grad_bnd is None):
        return tuple(grads)
    dtypes = [dt if n else None for dt, n in zip(ctx.dtypes, need)]
    outs = _backward_op(
        _zero_if_none(grad_cons, q), _zero_if_none(grad_bnd, q), q, c, t, rho_w, mask, *ctx.eps, *dtypes
    )
    for i in range(3):
        if need[i]:
            grads[i] = outs[i]
    return tuple(grads)


_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------- custom op: exact (M21)
@torch.library.custom_op("flowkern::consistency_residual_exact", mutates_args=())
def _exact_op(
    dG: torch.Tensor, t3: torch.Tensor, c: torch.Tensor, mask: torch.Tensor, compute_grad: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = select_backend(OP_EXACT, EXACT_IMPLS, dG.device)
    return impl(dG, t3, c, mask, compute_grad)


@_exact_op.register_fake
def _(dG, t3, c, mask, compute_grad):
    l_cons, l_bnd = _loss_fakes(dG, (t3, c), (mask,))
    grad = torch.empty_like(dG, memory_format=torch.contiguous_format) if compute_grad else dG.new_empty(0)
    return l_cons, l_bnd, grad


@torch.library.custom_op("flowkern::consistency_residual_exact_backward", mutates_args=())
def _exact_backward_op(
    grad_cons: torch.Tensor,
    grad_bnd: torch.Tensor,
    grad_dG: torch.Tensor,
    c: torch.Tensor,
    mask: torch.Tensor,
    need_dG: bool,
    need_c: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    # two single-pass elementwise products (1R + 1W each): nothing to fuse, plain torch on every backend
    acc = mask.dtype
    out_dG = (grad_dG * grad_cons.to(acc)).to(grad_dG.dtype) if need_dG else grad_dG.new_empty(0)
    out_c = boundary_grad(grad_bnd, c, mask, acc).to(c.dtype) if need_c else c.new_empty(0)
    return out_dG, out_c


@_exact_backward_op.register_fake
def _(grad_cons, grad_bnd, grad_dG, c, mask, need_dG, need_c):
    out_dG = torch.empty_like(grad_dG) if need_dG else grad_dG.new_empty(0)
    out_c = torch.empty_like(c, memory_format=torch.contiguous_format) if need_c else c.new_empty(0)
    return out_dG, out_c


def _exact_setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[2], inputs[2], inputs[3])
    ctx.mark_non_differentiable(output[2])


def _exact_backward(ctx, grad_cons, grad_bnd, _unused):
    grad_dG, c, mask = ctx.saved_tensors
    need_dG = ctx.needs_input_grad[0] and grad_dG.numel() > 0 and grad_cons is not None
    need_c = ctx.needs_input_grad[2] and grad_bnd is not None
    out_dG = out_c = None
    if need_dG and _is_one(grad_cons):
        out_dG, need_dG = grad_dG, False  # L_cons.backward(): the saved gradient is the answer (no copy)
    if need_dG or need_c:
        scaled_dG, scaled_c = _exact_backward_op(
            _zero_if_none(grad_cons, mask), _zero_if_none(grad_bnd, mask), grad_dG, c, mask, need_dG, need_c
        )
        out_dG = scaled_dG if need_dG else out_dG
        out_c = scaled_c if need_c else None
    return out_dG, None, out_c, None, None


_exact_op.register_autograd(_exact_backward, setup_context=_exact_setup_context)


# ---------------------------------------------------------------- public API
def _any_requires_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(x.requires_grad for x in tensors)


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
    V.check_tensor("c", c)
    for name, x in (("c_t", c_t), ("c_x", c_x), ("ghat", ghat), ("ghat_t", ghat_t), ("ghat_x", ghat_x),
                    ("vb", vb), ("vb_G", vb_G)):  # fmt: skip
        V.check_tensor(name, x, c, "c")
    beta = V.check_float("beta", beta, positive=True)
    mode = V.eta_code(eta_mode)
    eps_t = V.check_float("eps_t", eps_t, positive=True)
    eps_x = V.check_float("eps_x", eps_x, positive=True)
    t = V.per_sample("t", t, c)
    rho_w = V.per_sample("rho_w", rho_w, c)
    rho_G = V.per_sample("rho_G", rho_G, c)
    mask = V.per_sample("mask", mask, c)
    compute_grad = _any_requires_grad(c, c_t, c_x)
    l_cons, l_bnd, _ = _op(
        c, c_t, c_x, ghat, ghat_t, ghat_x, vb, vb_G, t, beta, mode, eps_t, eps_x, rho_w, rho_G, mask, compute_grad
    )
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
    V.check_tensor("dG", dG)
    V.check_tensor("t3", t3, dG, "dG")
    V.check_tensor("c", c, dG, "dG")
    mask = V.per_sample("mask", mask, dG)
    compute_grad = _any_requires_grad(dG)
    l_cons, l_bnd, _ = _exact_op(dG, t3, c, mask, compute_grad)
    return l_cons, l_bnd

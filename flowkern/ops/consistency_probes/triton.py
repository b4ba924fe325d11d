"""Triton kernels of `consistency_probes` (M20): norms per (sample, chunk), then the probes."""

import torch
import triton
import triton.language as tl

from flowkern.ops import _validate as V
from flowkern.ops._reference import ETA_MODES
from flowkern.ops._triton import coef_tensor, eta, launch_device, reduction_layout, tl_acc
from flowkern.ops.consistency_probes.reference import RMS_FLOOR


@triton.jit
def _probe_norms_kernel(
    vb_ptr, value_ptr, ghat_ptr, t_ptr, partial_ptr,
    d, chunk, n_chunks, beta,
    ETA_MODE: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    coef = beta * eta(tl.load(t_ptr + b).to(ACC), ETA_MODE)
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
    coef = beta * eta(tl.load(t_ptr + b).to(ACC), ETA_MODE)
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


def consistency_probes(a):
    """(x_w, x_G, rho_w, rho_G) from the schema's arguments `a`: the native op's contract."""
    x, v_base, value_out, reward_grad = (y.contiguous() for y in (a.x, a.v_base, a.value_out, a.reward_grad))
    t = coef_tensor(a.t, a.t_value, x)
    # the interpreter writes out of bounds silently: check what the kernels index before launching
    if any(y.shape != x.shape for y in (v_base, value_out, reward_grad)) or t.shape != (x.shape[0],):
        raise ValueError("consistency_probes: inputs must share x's shape and t must be [B]")
    batch, d = x.shape[0], x.numel() // x.shape[0]
    block, chunk, n_chunks = reduction_layout(d)
    out_dtype = V.loss_dtype(x)
    partial = torch.empty(batch * n_chunks * 2, dtype=out_dtype, device=x.device)
    x_w = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    x_g = torch.empty_like(x_w)
    rho_w = torch.empty(batch, dtype=out_dtype, device=x.device)
    rho_g = torch.empty_like(rho_w)
    if d == 0:  # [B, 0]: rms over no elements is NaN, as in the reference (no launch)
        return x_w, x_g, rho_w.fill_(float("nan")), rho_g.fill_(float("nan"))
    acc, eta_mode = tl_acc(x), ETA_MODES[a.eta_mode]
    with launch_device(x):
        _probe_norms_kernel[(batch, n_chunks)](
            v_base, value_out, reward_grad, t, partial, d, chunk, n_chunks, a.beta,
            ETA_MODE=eta_mode, BLOCK=block, ACC=acc,
        )  # fmt: skip
        _probe_write_kernel[(batch, n_chunks)](
            x, v_base, value_out, reward_grad, t, partial, x_w, x_g, rho_w, rho_g,
            d, chunk, n_chunks, a.beta, a.eps_x, RMS_FLOOR,
            ETA_MODE=eta_mode, BLOCK=block, CHUNKS_BLOCK=triton.next_power_of_2(max(n_chunks, 2)), ACC=acc,
        )  # fmt: skip
    return x_w, x_g, rho_w, rho_g

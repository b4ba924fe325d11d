"""q*: the push-forward of x0 ~ N(0, I) under the per-particle optimal open-loop control (M37).

Per particle, min over u_{N-K}..u_{N-1} of J = sum_i h_i lam c(u_i) - r(x_N) on the Euler grid (M2) with the exact
v_base (M38), c as in (M26): the fixed point of deterministic adjoint matching (M25-M28) and, up to O(h), of VGG-Flow
(M10). Batched per-particle L-BFGS, best of several starts (u = 0, starts aimed at the reward's maxima, a
continuation in lam from a 16x stronger reward, in 2-D the grid-DP policy), because from u = 0 many particles stop at
a local optimum (M37).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from flowkern.sampling import sample_euler

from .dynamics import Reward, Velocity, check_lam, control_cost, controlled_euler, euler_inverse
from .grid_dp import GridDP2D


def aimed_start(
    x0: torch.Tensor,
    base_velocity: Velocity,
    ts: torch.Tensor,
    target: torch.Tensor,
    K: int | None = None,
    *,
    mode: str = "pullback",
    ramp: int | None = None,
) -> torch.Tensor:
    """Controls u [B, N, d] (zero before step N - K) aimed at endpoint `target` ([d] or [B, d]), a start for the
    q* solver (M37).

    mode "pullback" (default): pull the target back through the uncontrolled Euler map (y_N = target,
    y_i = Euler^{-1}(y_{i+1})), then blend the uncontrolled path x^0 into y over the first `ramp` active steps
    (default max(1, K // 4)), p_i = x^0_i + min(1, (i - N + K) / ramp) (y_i - x^0_i), and return the controls that
    realise p, u_i = (p_{i+1} - p_i) / h_i - v_base(p_i, t_i). It uses the flow's sensitivity: early, the base
    flow decides between modes at the price of a small displacement, which a constant push cannot see.
    mode "constant": u = (target - x_N^0) / sum_{active} h_i on every active step.
    """
    x0 = x0.detach()
    ts = torch.as_tensor(ts, dtype=x0.dtype)
    N = ts.shape[0] - 1
    K = N if K is None else K
    B, d = x0.shape
    target = torch.as_tensor(target, dtype=x0.dtype).expand(B, d)
    h = ts[1:] - ts[:-1]
    u = torch.zeros(B, N, d, dtype=x0.dtype)
    with torch.no_grad():
        path = [x0]  # the uncontrolled path; ts may be a sub-grid (a problem started at t_0 > 0)
        for i in range(N):
            path.append(path[-1] + h[i] * base_velocity(path[-1], ts[i]))
        if mode == "constant":
            u[:, N - K :] = ((target - path[N]) / (ts[N] - ts[N - K]))[:, None, :]
            return u
        if mode != "pullback":
            raise ValueError(f"unknown aimed_start mode {mode!r}")
        m = max(1, K // 4) if ramp is None else int(ramp)
        y = [target]
        for i in range(N - 1, N - K - 1, -1):
            y.insert(0, euler_inverse(y[0], base_velocity, ts[i], h[i]))
        # y[j] pairs with state index N - K + j
        p = [path[N - K]]
        for j in range(1, K + 1):
            rho = min(1.0, j / m)
            p.append(path[N - K + j] + rho * (y[j] - path[N - K + j]))
        for j in range(K):
            i = N - K + j
            u[:, i] = (p[j + 1] - p[j]) / h[i] - base_velocity(p[j], ts[i])
    return u


def _batched_lbfgs(fun, w0: torch.Tensor, *, max_iter: int, gtol: float, history: int, h0: float):
    """Minimise sum_b f_b(w_b) with independent per-particle L-BFGS (own memory, own Armijo backtracking).

    fun(w [b, D], idx [b]) -> f [b] (differentiable). Returns w, f, grad, iterations [B], status [B]
    (0 converged ||g||_inf <= gtol, 1 hit max_iter, 2 line search failed, 3 stalled: the accepted decrease of f was
    at its rounding level 10 times in a row; this happens on stiff particles (endpoints on the unstable ridge
    between two modes, curvature ~1e4) and for gtol below about sqrt(eps |f| lam)).
    """
    B, D = w0.shape

    def fg(w, idx):
        w = w.detach().requires_grad_(True)
        with torch.enable_grad():
            f = fun(w, idx)
            (g,) = torch.autograd.grad(f.sum(), w)
        return f.detach(), g.detach()

    all_idx = torch.arange(B)
    w = w0.detach().clone()
    f, g = fg(w, all_idx)
    S = torch.zeros(history, B, D, dtype=w.dtype)
    Y = torch.zeros_like(S)
    rho = torch.zeros(history, B, dtype=w.dtype)
    gamma = torch.full((B,), h0, dtype=w.dtype)
    iters = torch.zeros(B, dtype=torch.long)
    status = torch.ones(B, dtype=torch.long)
    active = g.abs().amax(-1) > gtol
    status[~active] = 0
    n_tiny = torch.zeros(B, dtype=torch.long)
    patience = 10
    c1 = 1e-4
    for it in range(max_iter):
        idx = active.nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        gi = g[idx]
        # two-loop recursion, newest pair first (slots are a ring buffer indexed by iteration)
        q = gi.clone()
        slots = [(it - 1 - j) % history for j in range(min(it, history))]
        alphas = []
        for s in slots:
            a = rho[s, idx] * (S[s, idx] * q).sum(-1)
            alphas.append(a)
            q = q - a[:, None] * Y[s, idx]
        r = gamma[idx, None] * q
        for s, a in zip(reversed(slots), reversed(alphas)):
            b = rho[s, idx] * (Y[s, idx] * r).sum(-1)
            r = r + S[s, idx] * (a - b)[:, None]
        d = -r
        gd = (gi * d).sum(-1)
        bad = ~(gd < 0) | ~torch.isfinite(gd)
        if bad.any():  # not a descent direction: restart from steepest descent, forget the history
            d[bad] = -gamma[idx[bad], None] * gi[bad]
            gd[bad] = (gi[bad] * d[bad]).sum(-1)
            rho[:, idx[bad]] = 0
        # per-particle backtracking (Armijo): alpha = 1 first, then 8 halvings per batched evaluation
        alpha = torch.ones(idx.numel(), dtype=w.dtype)
        wi, fi = w[idx], f[idx]
        with torch.no_grad():
            ft = fun(wi + d, idx)
            accepted = torch.isfinite(ft) & (ft <= fi + c1 * gd)
            for rnd in range(5):
                todo = (~accepted).nonzero().squeeze(1)
                if todo.numel() == 0:
                    break
                cand = 0.5 ** torch.arange(8 * rnd + 1, 8 * rnd + 9, dtype=w.dtype)  # [8]
                nt = todo.numel()
                trial = wi[todo, None, :] + cand[None, :, None] * d[todo, None, :]  # [nt, 8, D]
                ft = fun(trial.reshape(nt * 8, -1), idx[todo].repeat_interleave(8)).view(nt, 8)
                ok = torch.isfinite(ft) & (ft <= fi[todo, None] + c1 * cand[None] * gd[todo, None])
                any_ok = ok.any(1)
                first = ok.float().argmax(1)  # the largest acceptable step
                alpha[todo[any_ok]] = cand[first[any_ok]]
                accepted[todo[any_ok]] = True
        alpha[~accepted] = 0.0
        w_new = wi + alpha[:, None] * d
        f_new, g_new = fg(w_new, idx)
        s_vec, y_vec = w_new - wi, g_new - gi
        sy = (s_vec * y_vec).sum(-1)
        valid = accepted & (sy > 1e-12 * s_vec.norm(dim=-1) * y_vec.norm(dim=-1)) & (sy > 0)
        slot = it % history
        S[slot, idx], Y[slot, idx] = s_vec, y_vec
        rho[slot, idx] = torch.where(valid, 1.0 / torch.where(valid, sy, torch.ones_like(sy)), torch.zeros_like(sy))
        yy = (y_vec * y_vec).sum(-1)
        gamma[idx] = torch.where(valid, sy / torch.where(valid, yy, torch.ones_like(yy)), gamma[idx])
        w[idx], f[idx], g[idx] = w_new, f_new, g_new
        iters[idx] += 1
        done = g_new.abs().amax(-1) <= gtol
        # decreases at the rounding level of f for `patience` iterations in a row: no further progress possible
        tiny = accepted & ~done & (fi - f_new <= 1e-14 * (1 + fi.abs()))
        n_tiny[idx] = torch.where(tiny, n_tiny[idx] + 1, torch.zeros_like(n_tiny[idx]))
        stalled = n_tiny[idx] >= patience
        status[idx[done]] = 0
        status[idx[~accepted & ~done]] = 2
        status[idx[stalled]] = 3
        active[idx[done | ~accepted | stalled]] = False
    return w, f, g, iters, status


def solve_optimal_controls(
    x0: torch.Tensor,
    base_velocity: Velocity,
    reward: Reward,
    lam: float,
    ts: torch.Tensor,
    K: int | None = None,
    p: float = 2.0,
    *,
    cost: str = "norm",
    starts: Sequence[str | torch.Tensor] | None = None,
    max_iter: int = 500,
    gtol: float = 1e-7,
    history: int = 30,
    improve_tol: float = 1e-6,
    dp_grid: int = 241,
    dp_lim: float | None = None,
    continuation_scales: Sequence[float] = (1 / 16, 1 / 8, 1 / 4, 1 / 2),
):
    """Per particle, min over u_0..u_{N-1} of J = sum_i h_i lam c(u_i) - r(x_N) on the Euler grid ts with the exact
    v_base (M37); u_i = 0 for i < N - K (truncated horizon). c as in (M26): p = 2 quadratic, else 'norm'
    (||u||^p / p) or 'elementwise' (sum |u_j|^p / p), p > 1. base_velocity: a callable v(x, t) evaluated in fp64
    (a GaussianMixtureVelocity of any dtype, or a FlowModel's frozen `.base`), x0 [B, d].

    Computed in fp64 (x0 is cast). Optimisation variable w_i = sqrt(h_i) u_i (so the p = 2 cost is lam/2 ||w||^2
    for any grid), per-particle L-BFGS with Armijo backtracking, stop at ||grad_w J||_inf <= gtol.

    starts: "zero" (u = 0), "aimed" (one pull-back `aimed_start` per target of reward.aim_targets: a bump's centres,
    or x_N^0 + a / lam for a linear reward), "aimed_constant" (the same targets, constant controls), a tensor of
    target endpoints [d] / [B, d] (pull-back), a tensor of controls [B, N, d] (used as given on the active steps:
    e.g. a trained model's own controls, to find the local optimum it sits near), or "dp" (2-D: the greedy policy of
    `GridDP2D` with dp_grid^2 points on [-dp_lim, dp_lim]^2, default lim = 2 + max(|x_N^0|, |aim targets|)). Default
    (None): ("zero", "aimed", "dp") in 2-D with a separable cost, else ("zero", "aimed"). Each start is solved to
    convergence; the best J per particle is kept (M37: from u = 0 many particles stop at a local optimum; in 2-D the
    DP start finds the better optimum for 25-50% of them on the chosen settings).

    Returns (u [B, N, d], x_N [B, d], info): info["objective"] [B], ["objective_by_start"] [S, B],
    ["start_names"], ["improved"] (particles whose best J beats the first start's by more than
    improve_tol * (1 + |J|)), ["improved_by_start"], ["best_start"] [B], ["grad_norm"] [B] (||grad_w J||_inf at
    the kept solution), ["grad_norm_max"], ["grad_norm_median"], ["converged_frac"], ["status"] [B], ["iterations"],
    ["reward"] [B], ["control_cost"] [B].
    """
    check_lam(lam)
    if not (math.isfinite(p) and p > 1):
        raise ValueError(f"p must be > 1, got {p}")
    if cost not in ("norm", "elementwise"):
        raise ValueError(f"cost must be 'norm' or 'elementwise', got {cost!r}")
    x0 = x0.detach().to(torch.float64)
    ts = torch.as_tensor(ts, dtype=torch.float64)
    N = ts.shape[0] - 1
    K = N if K is None else int(K)
    if not 1 <= K <= N:
        raise ValueError(f"K must be in [1, {N}], got {K}")
    B, d = x0.shape
    h = ts[1:] - ts[:-1]
    if not bool((h > 0).all()):
        raise ValueError("ts must be strictly increasing")
    ts_act, h_act = ts[N - K :], h[N - K :]
    sq = h_act.sqrt()
    with torch.no_grad():
        x_start = controlled_euler(x0, base_velocity, ts[: N - K + 1])  # the fixed, uncontrolled prefix
        x_end0 = controlled_euler(x_start, base_velocity, ts_act)

    def objective_at(lam_: float):
        def objective(w_flat: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            w = w_flat.view(-1, K, d)
            x = x_start[idx]
            total = torch.zeros(x.shape[0], dtype=x.dtype)
            for i in range(K):
                u = w[:, i] / sq[i]
                x = x + h_act[i] * (base_velocity(x, ts_act[i]) + u)
                total = total + h_act[i] * lam_ * control_cost(u, p, cost)
            return total - reward(x)

        return objective

    objective = objective_at(lam)

    if starts is None:
        starts = ("zero", "aimed", "continuation") + (("dp",) if d == 2 and (p == 2 or cost == "elementwise") else ())

    def w_from_u(u: torch.Tensor) -> torch.Tensor:
        return (u[:, N - K :] * sq[None, :, None]).contiguous()

    aim = getattr(reward, "aim_targets", None)
    targets = [q.to(torch.float64) for q in aim(x_end0, lam)] if aim is not None else []  # the reward's maxima
    inits: list[tuple[str, torch.Tensor]] = []
    for s in starts:
        if isinstance(s, str):
            if s == "zero":
                inits.append(("zero", torch.zeros(B, K, d, dtype=torch.float64)))
            elif s == "dp":
                if d != 2:
                    raise ValueError("the 'dp' start is 2-D only")
                if dp_lim is not None:
                    lim = float(dp_lim)
                else:  # cover the uncontrolled endpoints and the reward's aim targets
                    pts = [x_end0] + targets
                    lim = 2.0 + max(2.0, max(float(q.abs().max()) for q in pts))
                dp = GridDP2D(base_velocity, reward, lam, ts, K, p, cost, lim=lim, G=dp_grid)
                inits.append(("dp", w_from_u(dp.controls(x0))))
            elif s == "continuation":
                # (M37) homotopy in lam: solve with a reward 16x stronger than the target (every particle that
                # can reach a reward maximum does), then relax lam by factors of 2, warm-starting each stage.
                # It follows the "moved" branch of a particle's optima as far as that branch exists, which the
                # zero and aimed starts do not reach on mode-switching rewards (8-D bump: it improves J for
                # about half of the particles over both).
                w = w_from_u(aimed_start(x0, base_velocity, ts, targets[0], K)) if targets else \
                    torch.zeros(B, K, d, dtype=torch.float64)  # fmt: skip
                for scale in continuation_scales:
                    w = _batched_lbfgs(objective_at(lam * scale), w.reshape(B, K * d), max_iter=max_iter,
                                       gtol=gtol * 10, history=history, h0=1 / (lam * scale))[0]  # fmt: skip
                inits.append(("continuation", w.reshape(B, K, d)))
            elif s in ("aimed", "aimed_constant"):
                mode = "pullback" if s == "aimed" else "constant"
                for j, tgt in enumerate(targets):
                    u0 = aimed_start(x0, base_velocity, ts, tgt, K, mode=mode)
                    inits.append((f"{s}{j}", w_from_u(u0)))
            else:
                raise ValueError(f"unknown start {s!r}")
        else:
            tgt = torch.as_tensor(s, dtype=torch.float64)
            if tgt.dim() == 3:  # controls [B, N, d]: start from them (e.g. a trained model's own controls)
                if tuple(tgt.shape) != (B, N, d):
                    raise ValueError(f"a control start must be [B, N, d] = {(B, N, d)}, got {tuple(tgt.shape)}")
                inits.append((f"controls{len(inits)}", w_from_u(tgt)))
                continue
            inits.append((f"target{len(inits)}", w_from_u(aimed_start(x0, base_velocity, ts, tgt, K))))
    if not inits:
        raise ValueError("no starts (the reward has no aim_targets and no other start was given)")

    results = []
    for _, w0 in inits:
        results.append(
            _batched_lbfgs(objective, w0.reshape(B, K * d), max_iter=max_iter, gtol=gtol, history=history, h0=1 / lam)
        )
    F = torch.stack([r[1] for r in results])  # [S, B]
    best = F.argmin(0)
    ar = torch.arange(B)
    W = torch.stack([r[0] for r in results])[best, ar]
    G = torch.stack([r[2] for r in results])[best, ar]
    status = torch.stack([r[4] for r in results])[best, ar]
    f_best = F[best, ar]
    tol = improve_tol * (1 + F[0].abs())
    improved = F[0] - f_best > tol
    improved_by_start = {name: int((F[0] - F[j] > tol).sum()) for j, (name, _) in enumerate(inits) if j > 0}

    u_full = torch.zeros(B, N, d, dtype=torch.float64)
    u_full[:, N - K :] = W.view(B, K, d) / sq[None, :, None]
    with torch.no_grad():
        x_N = controlled_euler(x_start, base_velocity, ts_act, u_full[:, N - K :])
        r_end = reward(x_N).to(torch.float64)
    ccost = (h_act[None, :] * lam * control_cost(u_full[:, N - K :], p, cost)).sum(-1)
    gn = G.abs().amax(-1)
    info = {
        "objective": f_best,
        "objective_by_start": F,
        "start_names": [name for name, _ in inits],
        "best_start": best,
        "improved": int(improved.sum()),
        "improved_frac": float(improved.float().mean()),
        "improved_by_start": improved_by_start,
        "grad_norm": gn,
        "grad_norm_max": float(gn.max()),
        "grad_norm_median": float(gn.median()),
        "converged_frac": float((status == 0).float().mean()),
        "status": status,
        "iterations": [int(r[3].max()) for r in results],
        "reward": r_end,
        "control_cost": ccost,
        "K": K,
    }
    return u_full, x_N, info


def model_controls(model, x0: torch.Tensor, ts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(u [B, N, d], x_N [B, d]): the open-loop controls u_i = v_theta(x_i, t_i) - v_base(x_i, t_i) that reproduce a
    FlowModel's own N-step Euler path from x0 (M2, M24), in x0's dtype, without gradient.

    Passed as a start to `solve_optimal_controls` (starts=(u,)), L-BFGS finds the local optimum of (M37) that the
    model sits near: its distance to the model's samples measures training error, its distance to q* (the best
    of several starts) the cost of landing in another basin."""
    path = sample_euler(model, x0, ts, return_velocities=True)
    times = path.ts.to(x0.dtype)
    with torch.no_grad(), model.base_velocity():
        v_base = torch.stack([model.velocity(path.states[i], times[i]) for i in range(path.num_steps)])
    return (path.velocities - v_base).transpose(0, 1), path.final


def q_star_samples(
    base_velocity: Velocity,
    reward: Reward,
    lam: float,
    n: int,
    ts: torch.Tensor,
    *,
    dim: int | None = None,
    K: int | None = None,
    p: float = 2.0,
    generator: torch.Generator | None = None,
    return_info: bool = False,
    **solver_kwargs,
):
    """n samples of q* (M37): x0 ~ N(0, I) (fp64, from `generator`) pushed forward under its optimal control."""
    d = dim if dim is not None else getattr(base_velocity, "dim", None)
    if d is None:
        raise ValueError("pass dim= for a velocity without a .dim attribute")
    x0 = torch.randn(n, d, dtype=torch.float64, generator=generator)
    _, x_N, info = solve_optimal_controls(x0, base_velocity, reward, lam, ts, K, p, **solver_kwargs)
    return (x_N, info) if return_info else x_N

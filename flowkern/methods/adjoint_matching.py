"""Adjoint matching: deterministic, truncated (DAM, math.md section 5, M24-M28) and memoryless (AM, section 6,
M29-M33).

kind='ode' (default, [R] per math.md section 5): on-policy Euler rollouts (M2) of v_theta;

    a_N = -grad r(x_N),  a_i = a_{i+1} + J_vb(x_i, t_i)^T (h_i a_{i+1})        (M25, lean adjoint, K-1 VJPs)
    u*_i = -grad c*(a_{i+1} / lam)                                           (M26, paired with a_{i+1}: M27)
    L = (1/K) sum_{i=N-K}^{N-1} mean((v_theta(x_i,t_i) - sg v_base(x_i,t_i) - sg u*_i)^2)   (M28)

kind='memoryless' (the original stochastic AM baseline, [S]): memoryless rollouts (M30) with sigma, kappa of (M29);

    a_N = -lam_r grad r(x_hat1),  a_i = a_{i+1} + h (2 J_vb^T a_{i+1} - kappa_i a_{i+1})   (M31)
    L = mean_{b, i in T} min(||(2/sigma_i)(v_theta - v_base) + sigma_i a_{i+1}||^2, LCT)    (M32)

with the reward multiplier lam_r = beta = 1/lam, so the fixed point is p* ∝ p_base exp(beta r) (M36).

Memory (``micro_batch``): the lean adjoint runs over trajectories ``micro_batch`` at a time, and the loss over its
(transition, trajectory) samples ``micro_batch`` at a time, each term backpropagated at once
(`flowkern.methods._common.MicroBatchGradients`): the peak is the stored trajectory and adjoints plus one
micro-batch's graph, whatever K and B. 'ode' rollouts also take r(x_N) and grad r(x_N) (the batch's
'terminal_reward', 'terminal_reward_grad'), which the loss uses and the Trainer logs: x_N is decoded once.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from flowkern.adjoint import lean_adjoint
from flowkern.methods import _common as C
from flowkern.methods.base import MethodBase
from flowkern.ops import _validate as V
from flowkern.ops import adjoint_matching_loss
from flowkern.sampling import memoryless_coefficients, sample_euler, sample_memoryless

KINDS = ("ode", "memoryless")
COSTS = ("elementwise", "norm")


class AdjointMatching(MethodBase):
    """Deterministic lean-adjoint matching truncated to the last K steps, or memoryless AM.

    Args:
        velocity, base_velocity, reward: see :mod:`flowkern.methods._common`.
        beta or lam: regularisation, beta = 1/lam > 0 (exactly one of them).
        kind: 'ode' (M24-M28) or 'memoryless' (M29-M33).
        K: ode only, the number of trained steps (last K of N); None = ceil(N/4) (M28 default).
        p: control-cost power (> 1), cost: 'elementwise' | 'norm' (M26); p = 2 is quadratic.
        lct: memoryless only, per-sample loss clip LCT (M32); None = 1.6 beta^2 (M33); math.inf = no clamp.
        n_last, n_random: memoryless only, transitions T = the last n_last steps plus n_random drawn without
            replacement from the others, per trajectory. None (default) = max(1, N // 4) each: M33's 10 + 10 of
            N = 40 at any N (fixed 10 + 10 trained every transition of a 20-step grid, twice the reference's share).
        generator: torch.Generator for the memoryless noise and transition draws.
        micro_batch: samples per network call with grad, per VJP batch and per reward gradient (None: all at once).
    """

    def __init__(
        self,
        velocity: C.Velocity,
        base_velocity: C.Velocity,
        reward: C.Reward,
        *,
        beta: float | None = None,
        lam: float | None = None,
        kind: str = "ode",
        K: int | None = None,
        p: float = 2.0,
        cost: str = "elementwise",
        lct: float | None = None,
        n_last: int | None = None,
        n_random: int | None = None,
        generator: torch.Generator | None = None,
        micro_batch: int | None = None,
    ):
        self.velocity = C.check_callable("velocity", velocity)
        self.base_velocity = C.check_callable("base_velocity", base_velocity)
        self.reward = C.check_callable("reward", reward)
        if (beta is None) == (lam is None):
            raise ValueError("pass exactly one of beta and lam (beta = 1/lam)")
        if beta is not None:
            self.beta = C.check_positive("beta", beta)
            self.lam = 1.0 / self.beta
        else:
            self.lam = C.check_positive("lam", lam)
            self.beta = 1.0 / self.lam
        self.kind = V.check_choice("kind", kind, KINDS)
        self.K = None if K is None else C.check_int("K", K)
        self.p = C.check_positive("p", p)
        if self.p <= 1:
            raise ValueError(f"p must be > 1 (a strictly convex cost, M26), got {p}")
        self.cost = V.check_choice("cost", cost, COSTS)
        if lct is None:
            self.lct = 1.6 * self.beta**2  # (M33) LCT = 1.6 lam_r^2
        elif isinstance(lct, float) and lct == math.inf:
            self.lct = math.inf  # no clamp
        else:
            self.lct = C.check_positive("lct", lct)
        self.n_last = None if n_last is None else C.check_int("n_last", n_last)
        self.n_random = None if n_random is None else C.check_int("n_random", n_random, minimum=0)
        self.generator = generator
        self.micro_batch = C.check_micro_batch(micro_batch)

    # ------------------------------------------------------------ rollout
    def rollout(self, x0: torch.Tensor, ts: torch.Tensor, cond: Any = None, generator: torch.Generator | None = None):
        """On-policy rollout without grad: Euler (M2) for 'ode', the memoryless SDE (M30) for 'memoryless'.

        'ode' also returns r(x_N) and grad r(x_N) ('terminal_reward', 'terminal_reward_grad'; a_N = -grad r, M25)."""
        if self.kind == "ode":
            traj = sample_euler(self.velocity, x0, ts, cond, **self.trajectory_store())
        else:
            gen = generator or self.generator
            if gen is None:
                gen = torch.Generator(device=x0.device).manual_seed(0)
                self.generator = gen
            traj = sample_memoryless(self.velocity, x0, ts, gen, cond, **self.trajectory_store())
        batch = {"states": traj.states, "ts": traj.ts, "cond": cond}
        if self.kind == "ode":
            x_end = C.fetch(traj.states[-1], x0.device)
            batch["terminal_reward"], batch["terminal_reward_grad"] = self._terminal(x_end)
        return batch

    def _terminal(self, x_end: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(r(x_N), grad r(x_N)) in the adjoint dtype, ``micro_batch`` samples per decode."""
        return C.reward_and_grad(self.reward, x_end.detach().to(C.acc_dtype(x_end)), micro_batch=self.micro_batch)

    # ------------------------------------------------------------ loss
    def resolve_K(self, n_steps: int) -> int:
        """K, default ceil(N/4) (M28); 1 <= K <= N."""
        if self.K is None:
            return max(1, math.ceil(n_steps / 4))
        if self.K > n_steps:
            raise ValueError(f"K must be in [1, N] = [1, {n_steps}], got {self.K}")
        return self.K

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """The adjoint-matching loss of ``batch`` ('states' [N+1, B, ...], 'ts' [N+1], optional 'cond'; 'ode' reuses
        the batch's 'terminal_reward' and 'terminal_reward_grad' when the rollout provided them)."""
        states, ts, cond = C.unpack_batch(batch)
        if self.kind == "ode":
            terminal = batch.get("terminal_reward"), batch.get("terminal_reward_grad")
            return self._loss_ode(states, ts, cond, terminal)
        return self._loss_memoryless(states, ts, cond)

    def _lean_adjoint(self, states, ts, terminal, n_vjp, cond, kind):
        """[a_{N-n_vjp}, ..., a_N] by ``flowkern.adjoint.lean_adjoint`` (M25/M31), ``micro_batch`` trajectories per
        sweep (the adjoint of each trajectory is its own); n_vjp = 0 gives [a_N]."""
        if n_vjp == 0:
            return [terminal.to(C.acc_dtype(terminal))]
        n_traj, out = states.shape[1], None
        for lo, hi in C.micro_batches(n_traj, self.micro_batch):
            c_rows = cond if (lo, hi) == (0, n_traj) else C.gather_cond(cond, torch.arange(lo, hi))
            base = lambda x, t, c_rows=c_rows: self.base_velocity(x, t, c_rows)
            part = lean_adjoint(base, states[:, lo:hi], ts, terminal[lo:hi], n_vjp, kind=kind)
            if (lo, hi) == (0, n_traj):
                return part
            if out is None:  # filled in place: the adjoints are held once, plus one micro-batch's
                out = [a.new_empty((n_traj, *a.shape[1:])) for a in part]
            for a_all, a in zip(out, part, strict=True):
                a_all[lo:hi] = a
            del part
        return out

    def _loss_ode(self, states, ts, cond, terminal):
        n_steps, n_traj = ts.numel() - 1, states.shape[1]
        K = self.resolve_K(n_steps)
        acc = C.acc_dtype(states)
        r_end, g_end = terminal
        if g_end is None:
            r_end, g_end = self._terminal(C.fetch(states[-1], self.compute_device(states, ts)))
        # a_N = -grad r(x_N); a_{N-K+1} .. a_N need K-1 VJPs (M25, M28); list index j = a_{N-K+1+j}
        adj = self._lean_adjoint(states, ts, -g_end.to(acc), K - 1, cond, "ode")
        # sample s = k B + b is (transition i = N-K+k, trajectory b), paired with a_{i+1} = adj[k] (M27)
        n = K * n_traj
        grads, value = C.MicroBatchGradients(), None
        for lo, hi in C.micro_batches(n, self.micro_batch):
            s = torch.arange(lo, hi, device=states.device)
            k, traj = s // n_traj, s % n_traj
            x = C.fetch(states[n_steps - K + k, traj], self.compute_device(states, ts)).detach().to(acc)
            t = ts.to(device=x.device, dtype=acc)[n_steps - K + k]
            a = torch.stack([adj[j][b] for j, b in zip(k.tolist(), traj.tolist(), strict=True)]).to(acc)
            c_y = C.gather_cond(cond, traj)
            v_ft = self.velocity(x, t, c_y)
            with torch.no_grad():
                v_b = self.base_velocity(x, t, c_y).to(acc)
            # the mean over all K*B samples is (1/K) sum_i mean_i (equal sizes, M28): micro-batch means weighted
            term = adjoint_matching_loss(v_ft, v_b, a, self.lam, p=self.p, mode=self.cost) * ((hi - lo) / n)
            del v_ft, v_b
            part = grads.add(term)
            value = part if value is None else value + part
        metrics = {
            "loss": float(value),
            "K": float(K),
            "adjoint_norm": float(torch.cat([a.flatten(1).norm(dim=1) for a in adj]).mean()),
            "rollout_reward": float(r_end.mean()),
        }
        return grads.loss(value), metrics

    def _transitions(self, n_steps: int, n_traj: int, device) -> torch.Tensor:
        """[B, n] memoryless transitions T: the last n_last plus n_random others per trajectory (M33)."""
        quarter = max(1, n_steps // 4)  # (M33) 10 + 10 of 40
        n_last = min(quarter if self.n_last is None else self.n_last, n_steps)
        last = torch.arange(n_steps - n_last, n_steps)
        n_early = n_steps - n_last
        n_rand = min(quarter if self.n_random is None else self.n_random, n_early)
        if n_rand == 0:
            return last.expand(n_traj, n_last).to(device)
        keys = torch.rand((n_traj, n_early), generator=self.generator)
        early = keys.argsort(dim=1)[:, :n_rand]
        return torch.cat([early, last.expand(n_traj, n_last)], dim=1).to(device)

    def _loss_memoryless(self, states, ts, cond):
        n_steps, n_traj = ts.numel() - 1, states.shape[1]
        sigma, _ = memoryless_coefficients(ts)  # (M29)
        acc = C.acc_dtype(states)
        h_last = float(ts[-1] - ts[-2])
        r_hat, terminal = [], []
        for lo, hi in C.micro_batches(n_traj, self.micro_batch):  # a_N = -lam_r grad r(x_hat1) per trajectory
            x_prev = C.fetch(states[-2, lo:hi], self.compute_device(states, ts)).detach().to(acc)
            c_rows = cond if (lo, hi) == (0, n_traj) else C.gather_cond(cond, torch.arange(lo, hi))
            t_last = ts[-2].to(device=x_prev.device, dtype=acc).expand(hi - lo)
            with torch.no_grad():
                x_hat1 = x_prev + h_last * self.base_velocity(x_prev, t_last, c_rows).to(acc)  # (M31)
            r, g_hat = C.reward_and_grad(self.reward, x_hat1)
            r_hat.append(r)
            terminal.append(-self.beta * g_hat)  # lam_r = beta (M31, M32)
        r_hat, terminal = torch.cat(r_hat), torch.cat(terminal)
        adj = self._lean_adjoint(states, ts, terminal, n_steps - 1, cond, "memoryless")  # [a_1 .. a_N]
        idx = self._transitions(n_steps, n_traj, states.device)  # [B, n]
        traj_all = torch.arange(n_traj, device=states.device)[:, None].expand_as(idx).reshape(-1)
        step_all = idx.reshape(-1)
        n = step_all.numel()
        grads, value, clipped, adj_norm = C.MicroBatchGradients(), None, 0.0, 0.0
        for lo, hi in C.micro_batches(n, self.micro_batch):
            step, traj = step_all[lo:hi], traj_all[lo:hi]
            x = C.fetch(states[step, traj], self.compute_device(states, ts)).detach().to(acc)
            t = ts.to(device=x.device, dtype=acc)[step]
            a = torch.stack([adj[i][b] for i, b in zip(step.tolist(), traj.tolist(), strict=True)]).to(acc)
            c_y = C.gather_cond(cond, traj)
            v_ft = self.velocity(x, t, c_y)  # a_{i+1} sits at list index i (M31 indexing)
            with torch.no_grad():
                v_b = self.base_velocity(x, t, c_y).to(acc)
            sig = sigma.to(device=x.device, dtype=acc)[step]
            term = adjoint_matching_loss(v_ft, v_b, a, self.lam, mode="memoryless", sigma=sig, lct=self.lct)
            s = ((2 / C.batch_column(sig, x)) * (v_ft.detach().to(acc) - v_b) + C.batch_column(sig, x) * a).flatten(1)
            clipped += float((s.square().sum(1) >= self.lct).float().sum())
            adj_norm += float(a.flatten(1).norm(dim=1).sum())
            del v_ft, v_b, s
            part = grads.add(term * ((hi - lo) / n))
            value = part if value is None else value + part
        metrics = {
            "loss": float(value),
            "clipped_fraction": clipped / n,
            "adjoint_norm": adj_norm / n,
            "rollout_reward": float(r_hat.mean()),
        }
        return grads.loss(value), metrics

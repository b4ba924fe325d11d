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
"""

from __future__ import annotations

import math
from typing import Any

import torch

from flowkern.adjoint import lean_adjoint
from flowkern.methods import _common as C
from flowkern.ops import _validate as V
from flowkern.ops import adjoint_matching_loss
from flowkern.sampling import memoryless_coefficients, sample_euler, sample_memoryless

KINDS = ("ode", "memoryless")
COSTS = ("elementwise", "norm")


class AdjointMatching:
    """Deterministic lean-adjoint matching truncated to the last K steps, or memoryless AM.

    Args:
        velocity, base_velocity, reward: see :mod:`flowkern.methods._common`.
        beta or lam: regularisation, beta = 1/lam > 0 (exactly one of them).
        kind: 'ode' (M24-M28) or 'memoryless' (M29-M33).
        K: ode only, the number of trained steps (last K of N); None = ceil(N/4) (M28 default).
        p: control-cost power (> 1), cost: 'elementwise' | 'norm' (M26); p = 2 is quadratic.
        lct: memoryless only, per-sample loss clip LCT (M32); None = 1.6 beta^2 (M33); math.inf = no clamp.
        n_last, n_random: memoryless only, transitions T = the last n_last steps plus n_random drawn without
            replacement from the others, per trajectory (M33: 10 + 10 of N = 40).
        generator: torch.Generator for the memoryless noise and transition draws.
    """

    has_value_net = False

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
        n_last: int = 10,
        n_random: int = 10,
        generator: torch.Generator | None = None,
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
        self.n_last = C.check_int("n_last", n_last)
        self.n_random = C.check_int("n_random", n_random, minimum=0)
        self.generator = generator

    def value_parameters(self) -> list:
        return []

    # ------------------------------------------------------------ rollout
    def rollout(self, x0: torch.Tensor, ts: torch.Tensor, cond: Any = None, generator: torch.Generator | None = None):
        """On-policy rollout without grad: Euler (M2) for 'ode', the memoryless SDE (M30) for 'memoryless'."""
        if self.kind == "ode":
            traj = sample_euler(self.velocity, x0, ts, cond)
        else:
            gen = generator or self.generator
            if gen is None:
                gen = torch.Generator(device=x0.device).manual_seed(0)
                self.generator = gen
            traj = sample_memoryless(self.velocity, x0, ts, gen, cond)
        return {"states": traj.states, "ts": traj.ts, "cond": cond}

    # ------------------------------------------------------------ loss
    def resolve_K(self, n_steps: int) -> int:
        """K, default ceil(N/4) (M28); 1 <= K <= N."""
        if self.K is None:
            return max(1, math.ceil(n_steps / 4))
        if self.K > n_steps:
            raise ValueError(f"K must be in [1, N] = [1, {n_steps}], got {self.K}")
        return self.K

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """The adjoint-matching loss of ``batch`` ('states' [N+1, B, ...], 'ts' [N+1], optional 'cond')."""
        states, ts, cond = C.unpack_batch(batch)
        if self.kind == "ode":
            return self._loss_ode(states, ts, cond)
        return self._loss_memoryless(states, ts, cond)

    def _lean_adjoint(self, states, ts, terminal, n_vjp, cond, kind):
        """[a_{N-n_vjp}, ..., a_N] by ``flowkern.adjoint.lean_adjoint`` (M25/M31); n_vjp = 0 gives [a_N]."""
        if n_vjp == 0:
            return [terminal.to(C.acc_dtype(terminal))]
        base = lambda x, t: self.base_velocity(x, t, cond)
        return lean_adjoint(base, states, ts, terminal, n_vjp, kind=kind)

    def _loss_ode(self, states, ts, cond):
        n_steps, n_traj = ts.numel() - 1, states.shape[1]
        K = self.resolve_K(n_steps)
        acc = C.acc_dtype(states)
        x_end = states[-1].detach().to(acc)
        r_end, g_end = C.reward_and_grad(self.reward, x_end)
        # a_N = -grad r(x_N); a_{N-K+1} .. a_N need K-1 VJPs (M25, M28); list index j = a_{N-K+1+j}
        adj = self._lean_adjoint(states, ts, -g_end, K - 1, cond, "ode")
        paired = torch.stack(adj)  # a_{i+1} for i = N-K .. N-1 (M27 pairing)
        x = states[n_steps - K : n_steps].detach().to(acc).reshape(K * n_traj, *states.shape[2:])
        t = ts.to(device=x.device, dtype=acc)[n_steps - K : n_steps].repeat_interleave(n_traj)
        traj = torch.arange(n_traj, device=x.device).repeat(K)
        c_y = C.gather_cond(cond, traj)
        v_ft = self.velocity(x, t, c_y)
        with torch.no_grad():
            v_b = self.base_velocity(x, t, c_y).to(acc)
        a = paired.reshape(K * n_traj, *states.shape[2:]).to(acc)
        # one op call over the K steps: the mean over all K*B samples is (1/K) sum_i mean_i (equal sizes, M28)
        loss = adjoint_matching_loss(v_ft, v_b, a, self.lam, p=self.p, mode=self.cost)
        metrics = {
            "loss": float(loss.detach()),
            "K": float(K),
            "adjoint_norm": float(a.flatten(1).norm(dim=1).mean()),
            "rollout_reward": float(r_end.mean()),
        }
        return loss, metrics

    def _transitions(self, n_steps: int, n_traj: int, device) -> torch.Tensor:
        """[B, n] memoryless transitions T: the last n_last plus n_random others per trajectory (M33)."""
        n_last = min(self.n_last, n_steps)
        last = torch.arange(n_steps - n_last, n_steps)
        n_early = n_steps - n_last
        n_rand = min(self.n_random, n_early)
        if n_rand == 0:
            return last.expand(n_traj, n_last).to(device)
        keys = torch.rand((n_traj, n_early), generator=self.generator)
        early = keys.argsort(dim=1)[:, :n_rand]
        return torch.cat([early, last.expand(n_traj, n_last)], dim=1).to(device)

    def _loss_memoryless(self, states, ts, cond):
        n_steps, n_traj = ts.numel() - 1, states.shape[1]
        sigma, _ = memoryless_coefficients(ts)  # (M29)
        acc = C.acc_dtype(states)
        x_prev = states[-2].detach().to(acc)
        t_last = ts[-2].to(device=x_prev.device, dtype=acc).expand(n_traj)
        h_last = float(ts[-1] - ts[-2])
        with torch.no_grad():
            x_hat1 = x_prev + h_last * self.base_velocity(x_prev, t_last, cond).to(acc)  # (M31)
        r_hat, g_hat = C.reward_and_grad(self.reward, x_hat1)
        terminal = -self.beta * g_hat  # a_N = -lam_r grad r(x_hat1), lam_r = beta (M31, M32)
        adj = self._lean_adjoint(states, ts, terminal, n_steps - 1, cond, "memoryless")  # [a_1 .. a_N]
        idx = self._transitions(n_steps, n_traj, states.device)  # [B, n]
        traj = torch.arange(n_traj, device=states.device)[:, None].expand_as(idx).reshape(-1)
        step = idx.reshape(-1)
        x = states[step, traj].detach().to(acc)
        t = ts.to(device=x.device, dtype=acc)[step]
        a = torch.stack(adj)[step, traj].to(acc)  # a_{i+1} sits at list index i (M31 indexing)
        c_y = C.gather_cond(cond, traj)
        v_ft = self.velocity(x, t, c_y)
        with torch.no_grad():
            v_b = self.base_velocity(x, t, c_y).to(acc)
        sig = sigma.to(device=x.device, dtype=acc)[step]
        loss = adjoint_matching_loss(v_ft, v_b, a, self.lam, mode="memoryless", sigma=sig, lct=self.lct)
        s = ((2 / C.per_sample(sig, x)) * (v_ft.detach().to(acc) - v_b) + C.per_sample(sig, x) * a).flatten(1)
        metrics = {
            "loss": float(loss.detach()),
            "clipped_fraction": float((s.square().sum(1) >= self.lct).float().mean()),
            "adjoint_norm": float(a.flatten(1).norm(dim=1).mean()),
            "rollout_reward": float(r_hat.mean()),
        }
        return loss, metrics

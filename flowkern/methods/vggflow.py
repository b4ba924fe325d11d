"""VGG-Flow (math.md section 3, M6-M22): value-gradient guidance for flow-matching alignment.

Per selected transition (x, t) of an on-policy rollout (M22 subsampling, M2 Euler):

    x_hat1 = x + (1 - t) sg(v_theta(x, t))                               (M6, one definition everywhere)
    ghat   = rho_b grad r(x_hat1),  rho_b = min(n_b, tau) / max(n_b, 1e-12)  (M7, M8)
    G_phi  = -beta eta_t ghat + c_phi(x, t, y)                           (M15, velocity units M14)
    L      = mean((v_theta - sg(v_base - G_phi))^2)                      (M16, ops.vggflow_matching_loss)
           + mean(R^2)                                                   (M18; R by 'fd' M20 or 'exact' M21)
           + alpha 1[i = N-1] mean(c_phi^2)                              (M17)

theta (the flow model) and phi (the value network c_phi) are disjoint; one backward, one optimizer step
(M19); after it tau <- Quantile_0.8 of the unperturbed norms n_b of that update (M9).

Memory (``micro_batch``): the transitions are processed ``micro_batch`` at a time, each through the whole pipeline:
reward gradients first (no graph of v_theta alive while the decoder's backward runs), then the phi terms
(consistency, boundary) and their backward, then the v_theta graph and its backward
(`flowkern.methods._common.MicroBatchGradients`). Only the rollout's states outlive a micro-batch, so the peak
does not grow with the number of transitions. The same L, gradients and tau as one batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from flowkern.methods import _common as C
from flowkern.methods.base import MethodBase
from flowkern.ops import _validate as V
from flowkern.ops import (
    consistency_probes,
    consistency_residual,
    consistency_residual_exact,
    reward_grad_clip,
    time_probe,
    vggflow_matching_loss,
)
from flowkern.ops._reference import eta
from flowkern.ops.consistency_residual.reference import boundary_loss
from flowkern.sampling import sample_euler, subsample_transitions

CONSISTENCY_MODES = ("fd", "exact")
JVP_ATTENTION_CHUNK = 1024  # query rows per math-kernel attention call under M21's JVPs (C.query_chunked_attention)
FD_SCHEMES = ("forward", "central")


class SmallValueNet(nn.Module):
    """c_phi(x, t, cond) for the 'small' value-net option (M15, section 3 'Value net'): zero-initialised output.

    Vector samples [B, d] (and any layout that is not [B, C, H, W]): an MLP on (flattened x, time features,
    cond). Image-like samples [B, C, H, W]: a small conv net, time/cond features added per channel (FiLM
    shift). ``cond``: None, a floating tensor [B, ..., cond_dim] (mean-pooled over the middle dims; the prompt
    embedding, never the negative prompt, M15) or an integer label tensor [B] (``num_classes``).

    Defaults: hidden 64, depth 3, the net the CLI and demo runs were tuned and measured with (docs/results.md). The
    paper's 'small' net is a reduced U-Net, so there is no reference width to follow; the CLI once had 64 while this
    class said 128 (one default now).
    """

    def __init__(
        self,
        sample_shape: Sequence[int],
        *,
        hidden: int = 64,
        depth: int = 3,
        n_freq: int = 4,
        cond_dim: int | None = None,
        num_classes: int | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.sample_shape = tuple(C.check_int("sample_shape entry", s) for s in sample_shape)
        if not self.sample_shape:
            raise ValueError("sample_shape must have at least one dimension")
        hidden, depth = C.check_int("hidden", hidden), C.check_int("depth", depth)
        self.n_freq = C.check_int("n_freq", n_freq, minimum=0)
        self.register_buffer("freqs", 2 * math.pi * torch.arange(1, self.n_freq + 1, dtype=dtype))
        emb_in = 1 + 2 * self.n_freq
        self.cond_proj = None
        self.label_emb = None
        if cond_dim is not None:
            self.cond_proj = nn.Linear(C.check_int("cond_dim", cond_dim), hidden, dtype=dtype)
        if num_classes is not None:
            self.label_emb = nn.Embedding(C.check_int("num_classes", num_classes), hidden, dtype=dtype)
        self.time_proj = nn.Linear(emb_in, hidden, dtype=dtype)
        self.image = len(self.sample_shape) == 3
        act = nn.SiLU
        if self.image:
            ch = self.sample_shape[0]
            self.inp = nn.Conv2d(ch, hidden, 3, padding=1, dtype=dtype)
            self.body = nn.ModuleList(nn.Conv2d(hidden, hidden, 3, padding=1, dtype=dtype) for _ in range(depth - 1))
            self.out = nn.Conv2d(hidden, ch, 3, padding=1, dtype=dtype)
        else:
            d = math.prod(self.sample_shape)
            self.inp = nn.Linear(d, hidden, dtype=dtype)
            self.body = nn.ModuleList(nn.Linear(hidden, hidden, dtype=dtype) for _ in range(depth - 1))
            self.out = nn.Linear(hidden, d, dtype=dtype)
        self.act = act()
        nn.init.zeros_(self.out.weight)  # c_phi = 0 at init (paper: "tiny weights")
        nn.init.zeros_(self.out.bias)

    def _embedding(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        batch = x.shape[0]
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        t = t.expand(batch) if t.dim() == 0 else t.reshape(batch)
        ft = t[:, None] * self.freqs.to(x.dtype)[None]
        emb = self.time_proj(torch.cat([t[:, None], torch.sin(ft), torch.cos(ft)], dim=1))
        if cond is not None:
            if not isinstance(cond, torch.Tensor):
                raise TypeError(f"SmallValueNet: cond must be a tensor or None, got {type(cond).__name__}")
            if cond.dtype.is_floating_point:
                if self.cond_proj is None:
                    raise ValueError("SmallValueNet got a floating cond but was built without cond_dim")
                pooled = cond.reshape(batch, -1, cond.shape[-1]).mean(1) if cond.dim() > 2 else cond
                emb = emb + self.cond_proj(pooled.to(x.dtype))
            else:
                if self.label_emb is None:
                    raise ValueError("SmallValueNet got integer labels but was built without num_classes")
                emb = emb + self.label_emb(cond.reshape(batch))
        return emb

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.sample_shape:
            raise ValueError(f"SmallValueNet: x must be [B, {self.sample_shape}], got {tuple(x.shape)}")
        emb = self._embedding(x, t, cond)
        if self.image:
            h = self.act(self.inp(x) + emb[:, :, None, None])
            for layer in self.body:
                h = self.act(layer(h) + emb[:, :, None, None])
            return self.out(h)
        h = self.act(self.inp(x.flatten(1)) + emb)
        for layer in self.body:
            h = self.act(layer(h) + emb)
        return self.out(h).reshape(x.shape)


class VGGFlow(MethodBase):
    """VGG-Flow (M6-M22). One entry point: ``loss(batch) -> (loss, metrics)``; then the caller's backward and
    optimizer step on ``flow parameters`` (theta) and :meth:`value_parameters` (phi), then
    :meth:`after_optimizer_step` (tau update, M9).

    Args:
        velocity: v_theta(x, t, cond), CFG-combined, unconditional branch's parameters detached (M5).
        base_velocity: v_base(x, t, cond) (frozen).
        reward: r(x) -> [B] (differentiable, fp32).
        value_net: 'small' (a :class:`SmallValueNet` on ``sample_shape``) or any module/callable
            ``(x, t, cond) -> c_phi`` shaped like x, in velocity units (e.g. a LoRA copy of the transformer).
        beta: 1/lambda > 0 (M10). alpha: boundary weight (M17, M19). eta_mode: 'quad' | 'linear' | 'constant'.
        consistency: 'fd' (M20) or 'exact' (M21).
        reward_hvp: 'exact' only: M21's H(y) dy by 'autograd' (double backward, exact) or 'central' (a central
            difference of two reward gradients, O(eps^2), ordinary backwards: ``_common.reward_grad_and_hvp``).
        eps_x, eps_t: finite-difference steps (per-element RMS step
            and paper time, per unit t).
        fd_scheme: 'fd' only. 'forward' (default, M20: one-sided differences reusing the centre, the fused
            ``consistency_residual`` op) or 'central' (M20's option, paper Eqs. 44-45 as printed: T1, T2, T3 by
            central differences, O(eps^2) instead of O(eps), two more value-net and reward-gradient evaluations
            and one more v_base call per transition; computed in PyTorch, no fused op).
        subsample_fraction: f of (M22); None uses every transition.
        clip_quantile, tau0: running-quantile clipping (M9); clip=False disables clipping (rho = 1).
        tau_gather: optional callable gathering the update's norms over ranks before the quantile (M9); the
            Trainer sets it through :meth:`share_across_processes` under data parallel.
        generator: torch.Generator for the subsampling draws.
        micro_batch: transitions per micro-batch (None: all at once); see the module docstring.
    """

    def __init__(
        self,
        velocity: C.Velocity,
        base_velocity: C.Velocity,
        reward: C.Reward,
        *,
        value_net: str | nn.Module | Callable = "small",
        sample_shape: Sequence[int] | None = None,
        cond_dim: int | None = None,
        beta: float,
        alpha: float = 1e4,
        eta_mode: str = "quad",
        consistency: str = "fd",
        reward_hvp: str = "autograd",
        fd_scheme: str = "forward",
        eps_x: float = 1e-3,
        eps_t: float = 1e-3,
        subsample_fraction: float | None = 0.25,
        clip: bool = True,
        clip_quantile: float = 0.8,
        tau0: float = 1.0,
        tau_gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
        micro_batch: int | None = None,
    ):
        self.velocity = C.check_callable("velocity", velocity)
        self.base_velocity = C.check_callable("base_velocity", base_velocity)
        self.reward = C.check_callable("reward", reward)
        self.micro_batch = C.check_micro_batch(micro_batch)
        self.beta = C.check_positive("beta", beta)
        self.alpha = C.check_positive("alpha", alpha)
        V.eta_code(eta_mode)  # ValueError naming eta_mode
        self.eta_mode = eta_mode
        self.consistency = V.check_choice("consistency", consistency, CONSISTENCY_MODES)
        self.fd_scheme = V.check_choice("fd_scheme", fd_scheme, FD_SCHEMES)
        self.reward_hvp = V.check_choice("reward_hvp", reward_hvp, C.REWARD_HVP_MODES)
        if self.fd_scheme != "forward" and self.consistency != "fd":
            raise ValueError(f"fd_scheme={fd_scheme!r} needs consistency='fd', got consistency={consistency!r}")
        self.eps_x = C.check_positive("eps_x", eps_x)
        self.eps_t = C.check_positive("eps_t", eps_t)
        if self.eps_t >= 0.5:
            raise ValueError(f"eps_t must be < 0.5 (a time step inside [0, 1]), got {eps_t}")
        if subsample_fraction is not None:
            subsample_fraction = C.check_positive("subsample_fraction", subsample_fraction)
            if subsample_fraction > 1:
                raise ValueError(f"subsample_fraction must be in (0, 1], got {subsample_fraction}")
        self.subsample_fraction = subsample_fraction
        self.clip = bool(clip)
        self.clip_quantile = C.check_positive("clip_quantile", clip_quantile)
        if self.clip_quantile > 1:
            raise ValueError(f"clip_quantile must be in (0, 1], got {clip_quantile}")
        self.tau = C.check_positive("tau0", tau0)
        self.tau_gather = tau_gather
        self.generator = generator
        if isinstance(value_net, str):
            if value_net != "small":
                raise ValueError(f"value_net must be 'small' or a module/callable, got {value_net!r}")
            if sample_shape is None:
                raise ValueError("value_net='small' needs sample_shape (the shape of one sample x)")
            value_net = SmallValueNet(sample_shape, cond_dim=cond_dim)
        self.value_net = C.check_callable("value_net", value_net)
        self._pending_norms: list[torch.Tensor] = []

    # ------------------------------------------------------------ parameters and hooks
    def value_parameters(self) -> list[nn.Parameter]:
        """phi: the value network's trainable parameters (their own optimizer group, M19 update)."""
        if isinstance(self.value_net, nn.Module):
            return [p for p in self.value_net.parameters() if p.requires_grad]
        params = getattr(self.value_net, "trainable_parameters", None)
        return list(params()) if callable(params) else []

    def value_module(self) -> nn.Module | None:
        return self.value_net if isinstance(self.value_net, nn.Module) else None

    def share_across_processes(self, gather: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """tau from the norms of every process (M9), unless a ``tau_gather`` was given."""
        if self.tau_gather is None:
            self.tau_gather = gather

    def after_optimizer_step(self) -> None:
        """tau <- linear Quantile_q of the n_b of all unperturbed evaluations of this update (M9)."""
        if not self._pending_norms:
            return
        norms = torch.cat(self._pending_norms)
        self._pending_norms = []
        if self.tau_gather is not None:
            norms = self.tau_gather(norms)
        norms = norms[torch.isfinite(norms)].double()
        if norms.numel():
            tau = float(torch.quantile(norms, self.clip_quantile, interpolation="linear"))
            if math.isfinite(tau) and tau > 0:
                self.tau = tau

    def discard_step(self) -> None:
        """The update was skipped (non-finite loss or gradient): forget its norms, keep tau."""
        self._pending_norms = []

    def state_dict(self) -> dict:
        return {"tau": self.tau}

    def load_state_dict(self, state: dict) -> None:
        self.tau = C.check_positive("tau", state["tau"])

    # ------------------------------------------------------------ rollout
    def rollout(self, x0: torch.Tensor, ts: torch.Tensor, cond: Any = None, generator: torch.Generator | None = None):
        """On-policy Euler rollout (M2) without grad: {'states' [N+1, B, ...], 'ts', 'cond'}."""
        traj = sample_euler(self.velocity, x0, ts, cond, **self.trajectory_store())
        return {"states": traj.states, "ts": traj.ts, "cond": cond}

    # ------------------------------------------------------------ pieces
    def _transitions(self, n_steps: int, batch: int, device: torch.device) -> torch.Tensor:
        """[B, n] transition indices per trajectory (M22), or every transition."""
        if self.subsample_fraction is None:
            return torch.arange(n_steps, device=device).expand(batch, n_steps)
        rows = subsample_transitions(n_steps, batch, self.generator, fraction=self.subsample_fraction)
        return torch.tensor(rows, dtype=torch.long, device=device)

    def _x_hat1(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        """x_hat1 = x + (1-t) sg(v_theta(x, t)) (M6), re-evaluated at each point."""
        with torch.no_grad():
            v = self.velocity(x, t, cond)
        return x + C.batch_column(1 - t, x) * v.detach().to(x.dtype)

    def _ghat_at(self, x: torch.Tensor, t: torch.Tensor, cond: Any, rho: torch.Tensor) -> torch.Tensor:
        """rho_b grad r(x_hat1(x, t)) at a perturbed point, rho_b from the unperturbed (x, t) (M9)."""
        _, g = C.reward_and_grad(self.reward, self._x_hat1(x, t, cond))
        return g * C.batch_column(rho, g)

    def _value(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        c = self.value_net(x, t, cond)
        if not isinstance(c, torch.Tensor) or c.shape != x.shape:
            raise ValueError(
                f"value_net(x, t, cond) must return a tensor shaped like x {tuple(x.shape)}, "
                f"got {tuple(c.shape) if isinstance(c, torch.Tensor) else type(c).__name__}"
            )
        return c

    # ------------------------------------------------------------ loss
    def loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """L = L_match + L_cons + alpha L_bnd over the selected transitions of ``batch`` (M16-M19).

        batch: 'states' [N+1, B, ...] (or a list of N+1 [B, ...] tensors) from an on-policy rollout,
        'ts' [N+1] (M2), optional 'cond' (per trajectory, gathered along dim 0).
        """
        states, ts, cond = C.unpack_batch(batch)
        n_steps, n_traj = ts.numel() - 1, states.shape[1]
        idx = self._transitions(n_steps, n_traj, states.device)  # [B, n]
        traj = torch.arange(n_traj, device=states.device)[:, None].expand_as(idx).reshape(-1)
        step = idx.reshape(-1)
        n = step.numel()
        tau = self.tau if self.clip else float("inf")
        grads = C.MicroBatchGradients()
        sums = dict.fromkeys(("loss", "loss_match", "loss_cons", "loss_bnd", "value_sq"), 0.0)
        total, norms = None, []
        for lo, hi in C.micro_batches(n, self.micro_batch):
            # each micro-batch's mean weighted by its share: the sum is the mean over all transitions (M19)
            rows = slice(lo, hi)
            out = self._micro_batch(states, ts, cond, step[rows], traj[rows], tau, (hi - lo) / n, grads)
            if out is None:  # a non-finite reward gradient: a non-finite loss, which the caller skips
                nan = float("nan")
                return torch.tensor(nan), {"loss": nan, "reward_grad_norm": nan, "tau": tau}
            value, parts, norm = out
            total = value if total is None else total + value
            for key, v in parts.items():
                sums[key] += v
            norms.append(norm)
        norms = torch.cat(norms)
        self._pending_norms.append(norms.double().cpu())  # queued for tau only once the whole loss is finite (M9)
        metrics = {
            "loss": float(total),
            "loss_match": sums["loss_match"],
            "loss_cons": sums["loss_cons"],
            "loss_bnd": sums["loss_bnd"],
            "tau": tau,
            "reward_grad_norm": float(norms.mean()),
            "clip_fraction": float((norms > tau).float().mean()) if self.clip else 0.0,
            "value_rms": sums["value_sq"] ** 0.5,
            "transitions": float(n),
        }
        return grads.loss(total), metrics

    def _micro_batch(self, states, ts, cond, step, traj, tau, weight, grads):
        """One micro-batch of transitions: (weighted loss value, weighted parts, norms n_b); its gradients go to
        ``grads`` (phi's backward before v_theta's graph is built). None when a reward gradient or its norm is
        non-finite (NaN/inf, or a finite gradient whose norm overflows): nothing of this update may be applied."""
        device = self.compute_device(states, ts)
        n_steps = ts.numel() - 1
        acc = C.acc_dtype(states)  # fp32 (fp64 for fp64 states): losses and differences in fp32 at least (M20)
        x = C.fetch(states[step, traj], device).detach().to(acc)
        t = ts.to(device=device, dtype=acc)[step]
        mask = (step == n_steps - 1).to(device=device, dtype=acc)  # boundary transitions (M17)
        c_y = C.gather_cond(cond, traj)

        with torch.no_grad(), C.no_autocast(device):
            v_b = self.base_velocity(x, t, c_y).to(acc)
        g_raw = C.reward_and_grad(self.reward, self._x_hat1(x, t, c_y))[1]
        if self.clip:
            ghat, norms = reward_grad_clip(g_raw, tau)
        else:
            ghat, norms = g_raw, g_raw.flatten(1).norm(dim=1)
        if not (bool(torch.isfinite(norms).all()) and bool(torch.isfinite(ghat).all())):
            return None
        ghat = ghat.to(acc)
        rho = norms.clamp(max=tau) / norms.clamp(min=1e-12) if self.clip else torch.ones_like(norms)
        del g_raw

        if self.consistency == "fd":
            with C.no_autocast(device):
                c = self._value(x, t, c_y)
            fd = self._consistency_fd if self.fd_scheme == "forward" else self._consistency_central
            l_cons, l_bnd = fd(x, t, c_y, c, v_b, ghat, rho, mask)
        else:
            c, l_cons, l_bnd = self._consistency_exact(x, t, c_y, v_b, ghat, rho, mask)
        c = c.detach().to(acc)
        grads.add((l_cons + self.alpha * l_bnd) * weight)  # phi (M17, M18)
        v_ft = self.velocity(x, t, c_y)  # grad to theta
        l_match = vggflow_matching_loss(v_ft, v_b, ghat, c, t, self.beta, self.eta_mode)
        grads.add(l_match * weight)  # theta (M16)
        l_match, l_cons, l_bnd = l_match.detach(), l_cons.detach(), l_bnd.detach()
        value = (l_match + l_cons + self.alpha * l_bnd) * weight  # (M19)
        parts = {
            "loss_match": float(l_match) * weight,
            "loss_cons": float(l_cons) * weight,
            "loss_bnd": float(l_bnd) * weight,
            "value_sq": float(c.square().mean()) * weight,
        }
        return value, parts, norms.detach()

    def _consistency_fd(self, x, t, cond, c, v_b, ghat, rho, mask):
        """(M20) forward differences at (x, t+e_b) and (x + eps_x w/rho_w, t), T3 along sg(G); fp32, autocast off."""
        device = x.device
        x_w, x_g, rho_w, rho_g = consistency_probes(
            x, v_b, c.detach(), ghat, t, self.beta, eta_mode=self.eta_mode, eps_x=self.eps_x
        )
        t_p = time_probe(t, self.eps_t)  # t + e_b, e_b = -eps_t where t + eps_t > 1 (M20)
        with C.no_autocast(device):
            c_t = self._value(x, t_p, cond)
            c_x = self._value(x_w.to(x.dtype), t, cond)
            with torch.no_grad():
                g_t = self._ghat_at(x, t_p, cond, rho)
                g_x = self._ghat_at(x_w.to(x.dtype), t, cond, rho)
                vb_g = self.base_velocity(x_g.to(x.dtype), t, cond).to(x.dtype)
        return consistency_residual(
            c.to(x.dtype), c_t.to(x.dtype), c_x.to(x.dtype), ghat, g_t, g_x, v_b, vb_g, t, self.beta,
            self.eta_mode, self.eps_t, self.eps_x, rho_w, rho_g, mask,
        )  # fmt: skip

    def _consistency_central(self, x, t, cond, c, v_b, ghat, rho, mask):
        """(M20) with fd_scheme='central' (paper Eqs. 44-45):

            T1 = [G(x, t+) - G(x, t-)] / (t+ - t-),     t+- = t +- eps_t clipped to [0, 1]
            T2 = rho_w [G(x + eps_x w/rho_w, t) - G(x - eps_x w/rho_w, t)] / (2 eps_x)
            T3 = rho_G [v_base(x + eps_x sg(G)/rho_G, t) - v_base(x - eps_x sg(G)/rho_G, t)] / (2 eps_x)

        Each shifted G re-evaluates c_phi (with grad to phi), v_theta (x_hat1), the reward gradient (rho_b of the
        unperturbed point, M9) and eta at its own point; w, rho, the probes and T3 are detached (M21 gradient
        paths). At t = 0 or t + eps_t > 1 the time difference is one-sided over the part of [t - eps_t, t + eps_t]
        inside [0, 1] (the grid never leaves [0, 1]). fp32 (fp64 for fp64 states), autocast off.
        """
        device = x.device
        beta, mode = self.beta, self.eta_mode
        x_w, x_g, rho_w, rho_g = consistency_probes(x, v_b, c.detach(), ghat, t, beta, eta_mode=mode, eps_x=self.eps_x)
        x_w, x_g = x_w.to(x.dtype), x_g.to(x.dtype)
        x_w_minus, x_g_minus = 2 * x - x_w, 2 * x - x_g  # x -+ eps_x w/rho_w, x -+ eps_x G/rho_G
        t_plus = (t + self.eps_t).clamp(max=1.0)
        t_minus = (t - self.eps_t).clamp(min=0.0)

        def g_phi(xx, tt):  # G_phi (M15) at a perturbed point: c_phi with grad, ghat detached
            with torch.no_grad():
                g = self._ghat_at(xx, tt, cond, rho)
            return self._value(xx, tt, cond).to(x.dtype) - C.batch_column(beta * eta(tt, mode), g) * g

        with C.no_autocast(device):
            t1 = (g_phi(x, t_plus) - g_phi(x, t_minus)) / C.batch_column(t_plus - t_minus, x)
            t2 = C.batch_column(rho_w.to(x.dtype) / (2 * self.eps_x), x) * (g_phi(x_w, t) - g_phi(x_w_minus, t))
            with torch.no_grad():
                vb_plus = self.base_velocity(x_g, t, cond).to(x.dtype)
                vb_minus = self.base_velocity(x_g_minus, t, cond).to(x.dtype)
                t3 = C.batch_column(rho_g.to(x.dtype) / (2 * self.eps_x), x) * (vb_plus - vb_minus)
        l_cons = (t1 + t2 + t3).square().mean()  # (M18)
        return l_cons, boundary_loss(c, mask, x.dtype)  # (M17), the op reference's definition

    def _consistency_exact(self, x, t, cond, v_b, ghat, rho, mask):
        """(M21) T1+T2 = d/ds G_phi(x + s w, t + s) by forward-mode JVPs (c_phi with grad to phi; x_hat1 through
        v_theta; SDPA's math kernel), the reward gradient's derivative by a Hessian-vector product (detached,
        ``reward_hvp``), T3 = J_vb^T sg(G) (reverse mode, the default attention kernels)."""
        device = x.device
        beta, mode = self.beta, self.eta_mode
        with torch.no_grad(), C.no_autocast(device):
            c0 = self._value(x, t, cond).to(x.dtype)
        eta_t = C.batch_column(eta(t, mode), x)
        g_phi = c0 - beta * eta_t * ghat  # G_phi (M15)
        w = (v_b - g_phi).detach()  # w = sg(v_base - G_phi) (shared by M20/M21)
        ones = torch.ones_like(t)
        # forward-mode AD through attention: only SDPA's math kernel has a JVP rule (the fused ones raise); its
        # L x L scores in query chunks (at 1024 px SD3 has L = 4429: 1.75 GiB of fp32 scores per unchunked call)
        with C.no_autocast(device):
            with sdpa_kernel(SDPBackend.MATH), C.query_chunked_attention(JVP_ATTENTION_CHUNK):
                c, dc = torch.func.jvp(lambda xx, tt: self._value(xx, tt, cond), (x, t), (w, ones))

                def x_hat1(xx, tt):  # (M6), differentiated along (w, 1) through v_theta
                    return xx + C.batch_column(1 - tt, xx) * self.velocity(xx, tt, cond).to(xx.dtype)

                with torch.no_grad():
                    y, dy = torch.func.jvp(x_hat1, (x, t), (w, ones))
            with torch.no_grad():
                eta_y, d_eta = torch.func.jvp(lambda tt: eta(tt, mode), (t,), (ones,))
            # d/ds [eta rho grad r(y)] = eta' rho grad r(y) + eta rho H(y) dy (M7; rho fixed, M9)
            g_y, h_dy = C.reward_grad_and_hvp(self.reward, y, dy, self.reward_hvp)
            d_eta_ghat = C.batch_column(d_eta * rho, x) * g_y.to(x.dtype) + C.batch_column(eta_y * rho, x) * h_dy.to(
                x.dtype
            )
            del g_y, h_dy, y, dy
            with torch.enable_grad():  # T3: reverse mode only, any attention kernel (flash/efficient on a GPU)
                xr = x.detach().requires_grad_(True)
                vb = self.base_velocity(xr, t, cond)
                (t3,) = torch.autograd.grad(vb, xr, grad_outputs=g_phi.detach().to(vb.dtype))
        dg = dc.to(x.dtype) - beta * d_eta_ghat.detach()  # DG = d/ds c_phi - beta d/ds (eta ghat)
        l_cons, l_bnd = consistency_residual_exact(dg, t3.to(x.dtype).detach(), c.to(x.dtype), mask)
        return c, l_cons, l_bnd

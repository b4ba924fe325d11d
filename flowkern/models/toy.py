"""Low-dimensional toy with ground truth (math.md section 10): Gaussian mixtures, their exact
rectified-flow velocity (M38), a zero-initialised residual network and smooth rewards.

Paper time throughout (M1): t=0 noise x0 ~ N(0, I), t=1 data x1 ~ p_base, x_t = (1-t) x0 + t x1.

Exact velocity (M38). Given component k, x_t ~ N(t mu_k, S_k) with S_k = t^2 Sigma_k + (1-t)^2 I and
E[x1 | x_t, k] = m_k = mu_k + t Sigma_k S_k^{-1} (x - t mu_k); v = (sum_k gamma_k m_k - x) / (1-t) with
gamma_k ∝ pi_k N(x; t mu_k, S_k). Near t = 1 we do not divide by 1-t: since
t Sigma_k S_k^{-1} - I = (1-t)(t Sigma_k - (1-t) I) S_k^{-1}, the same field is

    v(x, t) = sum_k gamma_k v_k,   v_k = mu_k + (t Sigma_k - (1-t) I) S_k^{-1} (x - t mu_k),

which is smooth on all of [0, 1] (v(x, 1) = x, v(x, 0) = E[x1] - x) and needs no clamp. Sigma_k = U diag(e) U^T
and S_k share eigenvectors, so S_k^{-1}, log det S_k and the solve are elementwise in the eigenbasis. gamma
is a softmax of log-weights (log-sum-exp). Everything is batched over x [B, d], t is 0-dim or [B], the
mixture buffers are cast to x's dtype (fp32 or fp64) and the field is differentiable w.r.t. x.

Layering (design.md section 1, L5): imports only torch, safetensors (ToyFlow.save_lora) and flowkern.models.base.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
from torch import nn

from flowkern.models.base import ResidualFlowModel

__all__ = [
    "GaussianMixture",
    "GaussianMixtureVelocity",
    "ResidualMLP",
    "make_toy_model",
    "ToyFlow",
    "LinearReward",
    "BumpReward",
    "QuadraticReward",
]


def _as_t(t, x: torch.Tensor) -> torch.Tensor:
    """t as a tensor: 0-dim stays 0-dim, [B] becomes [B, 1, 1] (validated against x [B, d])."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.dim() == 0:
        return t
    if t.dim() == 1 and t.shape[0] == x.shape[0]:
        return t[:, None, None]
    raise ValueError(f"t must be 0-dim or [B] with B={x.shape[0]}, got shape {tuple(t.shape)}")


class GaussianMixture:
    """p = sum_k pi_k N(mu_k, Sigma_k) in d dimensions, stored in fp64.

    means [K, d], covariances [K, d, d] (symmetric positive definite) or [K] / [K, d] (isotropic /
    diagonal shorthands), weights [K] (normalised here).
    """

    def __init__(self, means, covariances, weights=None):
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.dim() != 2:
            raise ValueError(f"means must be [K, d], got {tuple(means.shape)}")
        K, d = means.shape
        cov = torch.as_tensor(covariances, dtype=torch.float64)
        if cov.dim() == 0:
            cov = cov * torch.eye(d, dtype=torch.float64).expand(K, d, d)
        elif cov.dim() == 1:
            cov = cov[:, None, None] * torch.eye(d, dtype=torch.float64)
        elif cov.dim() == 2:
            cov = torch.diag_embed(cov)
        if cov.shape != (K, d, d):
            raise ValueError(f"covariances must be [K, d, d], got {tuple(cov.shape)}")
        cov = 0.5 * (cov + cov.transpose(-1, -2))
        evals, evecs = torch.linalg.eigh(cov)
        if not bool((evals > 0).all()):
            raise ValueError("covariances must be positive definite")
        if weights is None:
            weights = torch.full((K,), 1.0 / K, dtype=torch.float64)
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (K,) or not bool((weights > 0).all()) or not bool(torch.isfinite(weights).all()):
            raise ValueError("weights must be [K], positive and finite")
        self.means = means
        self.covariances = cov
        self.weights = weights / weights.sum()
        self.evals = evals  # [K, d]
        self.evecs = evecs  # [K, d, d], columns are eigenvectors
        self.chol = torch.linalg.cholesky(cov)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def n_modes(self) -> int:
        return self.means.shape[0]

    def sample(self, n: int, generator: torch.Generator | None = None, dtype=torch.float64) -> torch.Tensor:
        """n exact samples [n, d]."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        x = self.means[k] + torch.einsum("nij,nj->ni", self.chol[k], eps)
        return x.to(dtype)

    def component_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """[B, K]: log pi_k + log N(x; mu_k, Sigma_k), computed in x's dtype."""
        dt = x.dtype
        diff = x[:, None, :] - self.means.to(device=x.device, dtype=dt)[None]
        z = torch.einsum("bkd,kde->bke", diff, self.evecs.to(device=x.device, dtype=dt))
        ev = self.evals.to(device=x.device, dtype=dt)
        quad = (z * z / ev).sum(-1)
        logdet = torch.log(ev).sum(-1)
        return torch.log(self.weights.to(device=x.device, dtype=dt)) - 0.5 * (
            quad + logdet + self.dim * math.log(2 * math.pi)
        )

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """[B]: log p(x) by log-sum-exp over components."""
        return torch.logsumexp(self.component_log_prob(x), dim=-1)

    def mean(self) -> torch.Tensor:
        return (self.weights[:, None] * self.means).sum(0)

    def velocity(self) -> GaussianMixtureVelocity:
        return GaussianMixtureVelocity(self)

    # ---- constructors -------------------------------------------------------------------------

    @classmethod
    def ring(cls, n_modes: int = 8, radius: float = 4.0, std: float = 0.4, weights=None) -> GaussianMixture:
        """2-D ring: n_modes isotropic modes at angles 2 pi k / n_modes on a circle of `radius`."""
        ang = 2 * math.pi * torch.arange(n_modes, dtype=torch.float64) / n_modes
        means = radius * torch.stack([torch.cos(ang), torch.sin(ang)], dim=1)
        return cls(means, torch.full((n_modes,), std**2, dtype=torch.float64), weights)

    @classmethod
    def random(
        cls,
        dim: int = 8,
        n_modes: int = 6,
        seed: int = 0,
        spread: float = 3.0,
        std_range: tuple[float, float] = (0.3, 0.7),
    ) -> GaussianMixture:
        """Random mixture: means N(0, spread^2 I), anisotropic covariances U diag(s^2) U^T with random
        rotations U and s ~ U(std_range), Dirichlet(2)-ish unequal weights. Deterministic in `seed`."""
        g = torch.Generator().manual_seed(seed)
        means = spread * torch.randn(n_modes, dim, dtype=torch.float64, generator=g)
        q, r = torch.linalg.qr(torch.randn(n_modes, dim, dim, dtype=torch.float64, generator=g))
        q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]
        lo, hi = std_range
        s = lo + (hi - lo) * torch.rand(n_modes, dim, dtype=torch.float64, generator=g)
        cov = q @ torch.diag_embed(s**2) @ q.transpose(-1, -2)
        w = -torch.log(torch.rand(n_modes, dtype=torch.float64, generator=g)) - torch.log(
            torch.rand(n_modes, dtype=torch.float64, generator=g)
        )
        return cls(means, cov, w)

    @classmethod
    def gaussian(cls, mean, covariance) -> GaussianMixture:
        """A single Gaussian (one-component mixture)."""
        mean = torch.as_tensor(mean, dtype=torch.float64)
        cov = torch.as_tensor(covariance, dtype=torch.float64)
        return cls(mean[None], cov[None] if cov.dim() >= 1 else cov)


class GaussianMixtureVelocity(nn.Module):
    """The exact rectified-flow velocity of a GaussianMixture (M38), singularity-free form (module doc)."""

    def __init__(self, mixture: GaussianMixture):
        super().__init__()
        self.mixture = mixture
        cov = mixture.covariances
        self.diagonal = bool((cov == torch.diag_embed(torch.diagonal(cov, dim1=-2, dim2=-1))).all())
        self.register_buffer("means", mixture.means.clone())
        # diagonal covariances: eigenbasis = coordinate axes, eigenvalues = the diagonal (no rotation needed)
        evals = torch.diagonal(cov, dim1=-2, dim2=-1).clone() if self.diagonal else mixture.evals.clone()
        self.register_buffer("evals", evals)
        self.register_buffer("evecs", mixture.evecs.clone())
        self.register_buffer("log_weights", torch.log(mixture.weights))

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    # Internal layout [d, B, K]: reductions over the (small) last dim d are slow on CPU, over the first fast.

    def _coords(self, x: torch.Tensor, t):
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must be [B, {self.dim}], got {tuple(x.shape)}")
        dt = x.dtype
        muT = self.means.to(dt).T[:, None, :]  # [d, 1, K]
        evT = self.evals.to(dt).T[:, None, :]  # [d, 1, K]
        tt = _as_t(t, x)  # 0-dim or [B, 1, 1]
        if tt.dim():
            tt = tt.reshape(1, -1, 1)  # [1, B, 1]
        if self.diagonal:
            z = x.T.contiguous()[:, :, None] - tt * muT  # [d, B, K], laid out d-major
        else:  # z = U_k^T (x - t mu_k): a batched matmul in [K, B, d], then to [d, B, K]
            diff = x[None] - tt * self.means.to(dt)[:, None, :]
            z = torch.bmm(diff, self.evecs.to(dt)).permute(2, 1, 0).contiguous()
        s = tt * tt * evT + (1 - tt) ** 2  # eigenvalues of S_k = t^2 Sigma_k + (1-t)^2 I
        return muT, evT, tt, z, s

    def _log_n(self, z: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """[B, K]: log N(x; t mu_k, S_k) up to the constant -d/2 log(2 pi)."""
        return -0.5 * ((z * z / s).sum(0) + torch.log(s).sum(0))

    def _gamma(self, z: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        logits = self.log_weights.to(z.dtype)[None] + self._log_n(z, s)
        e = torch.exp(logits - logits.amax(-1, keepdim=True))  # log-sum-exp-stable softmax (M38)
        return e / e.sum(-1, keepdim=True)  # [B, K]

    def _rotate_back(self, y: torch.Tensor) -> torch.Tensor:
        """U y for eigen-coordinates y [e, B, K] -> [d, B, K]."""
        if self.diagonal:
            return y
        yk = torch.bmm(y.permute(2, 1, 0), self.evecs.to(y.dtype).transpose(1, 2))  # [K, B, d]
        return yk.permute(2, 1, 0).contiguous()

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        muT, evT, tt, z, s = self._coords(x, t)
        gamma = self._gamma(z, s)
        coef = (tt * evT - (1 - tt)) / s  # (t Sigma - (1-t) I) S^{-1} in the eigenbasis
        vk = muT + self._rotate_back(coef * z)  # [d, B, K]
        return (gamma[None] * vk).sum(-1).T.contiguous()

    def posterior_mean(self, x: torch.Tensor, t) -> torch.Tensor:
        """E[x1 | x_t = x] = sum_k gamma_k m_k, m_k = mu_k + t Sigma_k S_k^{-1} (x - t mu_k) (M38)."""
        muT, evT, tt, z, s = self._coords(x, t)
        gamma = self._gamma(z, s)
        mk = muT + self._rotate_back(tt * evT / s * z)
        return (gamma[None] * mk).sum(-1).T.contiguous()

    def marginal_log_prob(self, x: torch.Tensor, t) -> torch.Tensor:
        """log p_t(x) of the interpolant marginal sum_k pi_k N(t mu_k, S_k)."""
        _, _, _, z, s = self._coords(x, t)
        logits = self.log_weights.to(x.dtype)[None] + self._log_n(z, s)
        return torch.logsumexp(logits, dim=-1) - 0.5 * self.dim * math.log(2 * math.pi)


class ResidualMLP(nn.Module):
    """Small MLP on (x, t) -> R^d with a zero-initialised output layer, so it starts at exactly 0.

    t enters as [t, sin(2 pi f t), cos(2 pi f t)] for f = 1..n_freq. Parameters are created in `dtype`.
    Also usable as a small value network (VGG-Flow's nu_phi) with `out_dim`.
    """

    def __init__(
        self,
        dim: int,
        hidden: int = 128,
        depth: int = 3,
        n_freq: int = 4,
        out_dim: int | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        if depth < 1 or hidden < 1:
            raise ValueError("depth and hidden must be >= 1")
        self.dim, self.n_freq = dim, n_freq
        layers: list[nn.Module] = []
        width = dim + 1 + 2 * n_freq
        for _ in range(depth):
            layers += [nn.Linear(width, hidden, dtype=dtype), nn.SiLU()]
            width = hidden
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(width, out_dim or dim, dtype=dtype)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.register_buffer("freqs", 2 * math.pi * torch.arange(1, n_freq + 1, dtype=dtype))

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        t = t.expand(x.shape[0]) if t.dim() == 0 else t.reshape(x.shape[0])
        ft = t[:, None] * self.freqs.to(x.dtype)[None]
        h = torch.cat([x, t[:, None], torch.sin(ft), torch.cos(ft)], dim=1)
        return self.out(self.body(h))


def make_toy_model(
    mixture: GaussianMixture, hidden: int = 128, depth: int = 3, dtype: torch.dtype = torch.float32
) -> ResidualFlowModel:
    """v_theta = exact v_base (M38) + ResidualMLP (zero output at init), via the FlowModel protocol."""
    base = GaussianMixtureVelocity(mixture).to(dtype)
    return ResidualFlowModel(base, ResidualMLP(mixture.dim, hidden=hidden, depth=depth, dtype=dtype))


# ---- rewards: r(x) -> [B], smooth and differentiable; computed in x's dtype ------------------------


class _Reward:
    def _p(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return v.to(dtype=x.dtype, device=x.device)

    def aim_targets(self, x_end: torch.Tensor, lam: float) -> list[torch.Tensor]:
        """Endpoints [B, d] that aimed starts of the q* solver steer the uncontrolled endpoint to."""
        return []


class LinearReward(_Reward):
    """r(x) = a^T x: unbounded above (reward-hacking test); p* and q* known in closed form for v_base = 0
    (M37) and p* for any Gaussian mixture (M39)."""

    def __init__(self, a):
        self.a = torch.as_tensor(a, dtype=torch.float64)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self._p(self.a, x)

    def grad(self, x: torch.Tensor) -> torch.Tensor:
        return self._p(self.a, x).expand_as(x)

    def aim_targets(self, x_end, lam):
        # the v_base = 0 optimum shifts every endpoint by a / lam (M37)
        return [x_end + self._p(self.a, x_end) / lam]


class BumpReward(_Reward):
    """r(x) = sum_j height_j exp(-||x - c_j||^2 / (2 width_j^2)): favours the modes near the centres.

    center [d] or [J, d]; width, height scalars or [J]. Bounded; its gradient vanishes far from the
    centres, so the per-particle control problem has local optima (M37).
    """

    def __init__(self, center, width: float | Sequence[float] = 1.0, height: float | Sequence[float] = 1.0):
        c = torch.as_tensor(center, dtype=torch.float64)
        self.centers = c[None] if c.dim() == 1 else c
        J = self.centers.shape[0]
        self.width = torch.as_tensor(width, dtype=torch.float64).expand(J).clone()
        self.height = torch.as_tensor(height, dtype=torch.float64).expand(J).clone()
        if not bool((self.width > 0).all()):
            raise ValueError("width must be positive")

    @property
    def center(self) -> torch.Tensor:
        return self.centers[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        c, w, h = (self._p(v, x) for v in (self.centers, self.width, self.height))
        d2 = ((x[:, None, :] - c[None]) ** 2).sum(-1)
        return (h * torch.exp(-0.5 * d2 / w**2)).sum(-1)

    def aim_targets(self, x_end, lam):
        return [self._p(c, x_end).expand_as(x_end) for c in self.centers]


class QuadraticReward(_Reward):
    """r(x) = -1/2 x^T A x + b^T x (A symmetric). The (M37) Gaussian example is b = 0, A PSD."""

    def __init__(self, A, b=None):
        A = torch.as_tensor(A, dtype=torch.float64)
        self.A = 0.5 * (A + A.T)
        self.b = torch.zeros(A.shape[0], dtype=torch.float64) if b is None else torch.as_tensor(b, dtype=torch.float64)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        A, b = self._p(self.A, x), self._p(self.b, x)
        return -0.5 * ((x @ A) * x).sum(-1) + x @ b

    def aim_targets(self, x_end, lam):
        try:
            xs = torch.linalg.solve(self.A, self.b)
        except RuntimeError:
            return []
        return [self._p(xs, x_end).expand_as(x_end)]


class ToyFlow(nn.Module):
    """The 2-D toy (``flowkern.models.toy``) with the same interface: ``cond`` is ignored (no prompts)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def velocity(self, x, t, cond=None, *, detach_uncond=False):
        return self.model.velocity(x, t)

    def base_velocity(self):
        return self.model.base_velocity()

    def trainable_parameters(self):
        return self.model.trainable_parameters()

    def save_lora(self, path: str | os.PathLike) -> str:
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        file = os.path.join(path, "toy_residual.safetensors")
        save_file({k: v.detach().contiguous() for k, v in self.model.residual.state_dict().items()}, file)
        return file

    def load_lora(self, path: str | os.PathLike) -> None:
        from safetensors.torch import load_file

        file = os.path.join(path, "toy_residual.safetensors") if os.path.isdir(path) else os.fspath(path)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no toy residual weights at {file}")
        try:
            self.model.residual.load_state_dict(load_file(file))
        except RuntimeError as err:
            raise ValueError(f"{file} does not match the toy model: {str(err).splitlines()[0]}") from None

"""Grid dynamic programming for the 2-D control problem of (M37): an independent check of the q* solver and one of
its starts (in 2-D, on the chosen settings, it finds the better optimum for 25-50% of the particles)."""

from __future__ import annotations

import torch

from .dynamics import Reward, Velocity, check_lam, controlled_euler


def _bilinear(V: torch.Tensor, lo: float, step: float, pts: torch.Tensor) -> torch.Tensor:
    """Bilinear interpolation of V [G, G] (V[i, j] at (lo + i step, lo + j step)) at pts [..., 2], clamped."""
    G = V.shape[0]
    f = ((pts - lo) / step).clamp(0, G - 1 - 1e-9)
    i0 = f.floor().long()
    fr = f - i0
    i, j = i0[..., 0], i0[..., 1]
    a, b = fr[..., 0], fr[..., 1]
    return V[i, j] * (1 - a) * (1 - b) + V[i + 1, j] * a * (1 - b) + V[i, j + 1] * (1 - a) * b + V[i + 1, j + 1] * a * b


def _infconv_1d(V: torch.Tensor, pen: torch.Tensor, dim: int, chunk: int = 32) -> torch.Tensor:
    """E[i] = min_k pen[|i - k|] + V[k] along `dim` of a [G, G] grid (brute force, chunked)."""
    if dim == 1:
        return _infconv_1d(V.T.contiguous(), pen, 0, chunk).T.contiguous()
    G = V.shape[0]
    idx = torch.arange(G)
    out = torch.empty_like(V)
    for s in range(0, G, chunk):
        P = pen[(idx[s : s + chunk, None] - idx[None, :]).abs()]  # [c, G]
        out[s : s + chunk] = (P[:, :, None] + V[None, :, :]).amin(1)
    return out


class GridDP2D:
    """Grid dynamic programming for the 2-D control problem of (M37); an independent check of, and a start for,
    the L-BFGS solver.

    Backward: V_N = -r; V_i(x) = min_y h_i lam c((y - z) / h_i) + V_{i+1}(y), z = x + h_i v_base(x, t_i), with the
    minimum over y on the G x G grid of [-lim, lim]^2 (a separable inf-convolution: c = |u|^2 / 2 (p = 2) or the
    elementwise sum |u_j|^p / p), then bilinear interpolation at z. Accurate to about the grid spacing (the value
    function is steep where the base flow splits between modes). `value(x0)` = V at the state the uncontrolled
    prefix reaches (comparable with the solver's objective); `controls(x0)` = the greedy DP policy, its jump
    searched on a window fine enough to resolve the grid and wide enough for the largest worthwhile jump.
    """

    def __init__(
        self,
        base_velocity: Velocity,
        reward: Reward,
        lam: float,
        ts: torch.Tensor,
        K: int | None = None,
        p: float = 2.0,
        cost: str = "norm",
        *,
        lim: float = 7.0,
        G: int = 241,
    ):
        check_lam(lam)
        if not (p == 2 or cost == "elementwise"):
            raise ValueError("GridDP2D needs a separable cost: p = 2 or cost='elementwise'")
        self.base_velocity, self.reward, self.lam, self.p = base_velocity, reward, float(lam), float(p)
        self.ts = torch.as_tensor(ts, dtype=torch.float64)
        self.N = self.ts.shape[0] - 1
        self.K = self.N if K is None else int(K)
        self.lim, self.G = float(lim), int(G)
        ax = torch.linspace(-lim, lim, G, dtype=torch.float64)
        self.step = float(ax[1] - ax[0])
        grid = torch.stack(torch.meshgrid(ax, ax, indexing="ij"), -1).reshape(-1, 2)
        N, K = self.N, self.K
        offs = torch.arange(G, dtype=torch.float64) * self.step
        with torch.no_grad():
            V = -reward(grid).reshape(G, G).to(torch.float64)
            self.V = [V]  # self.V[j] is the value at state index N - j ... reversed below
            for i in range(N - 1, N - K - 1, -1):
                h = float(self.ts[i + 1] - self.ts[i])
                pen = h * self.lam * self._c1(offs / h)
                E = _infconv_1d(_infconv_1d(V, pen, 0), pen, 1)
                z = grid + h * base_velocity(grid, self.ts[i])
                V = _bilinear(E, -self.lim, self.step, z).reshape(G, G)
                self.V.append(V)
        self.V.reverse()  # self.V[j]: value at state index N - K + j

    def _c1(self, u: torch.Tensor) -> torch.Tensor:
        return 0.5 * u * u if self.p == 2 else u.abs() ** self.p / self.p

    def _prefix(self, x0: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return controlled_euler(x0.to(torch.float64), self.base_velocity, self.ts[: self.N - self.K + 1])

    def value(self, x0: torch.Tensor) -> torch.Tensor:
        """DP approximation of min_u J for particles starting at x0 [B, 2] (t = 0)."""
        return _bilinear(self.V[0], -self.lim, self.step, self._prefix(x0))

    def controls(self, x0: torch.Tensor, max_window: int = 41, chunk: int = 512) -> torch.Tensor:
        """Greedy DP policy from x0 [B, 2]: controls u [B, N, 2] (zero before step N - K)."""
        N, K = self.N, self.K
        x = self._prefix(x0)
        B = x.shape[0]
        u = torch.zeros(B, N, 2, dtype=torch.float64)
        with torch.no_grad():
            for j in range(K):
                i = N - K + j
                h = float(self.ts[i + 1] - self.ts[i])
                Vn = self.V[j + 1]
                spread = float(Vn.max() - Vn.min())
                # largest worthwhile jump: h lam c(jump / h) <= spread
                reach = (
                    h * (2 * spread / (h * self.lam)) ** 0.5
                    if self.p == 2
                    else h * (self.p * spread / (h * self.lam)) ** (1 / self.p)
                )
                half = (max_window - 1) // 2
                sp = max(self.step / 2, reach / half)
                o = torch.arange(-half, half + 1, dtype=torch.float64) * sp
                offs = torch.stack(torch.meshgrid(o, o, indexing="ij"), -1).reshape(-1, 2)  # [C, 2]
                cost_o = h * self.lam * self._c1(offs / h).sum(-1)  # [C]
                z = x + h * self.base_velocity(x, self.ts[i])
                best = torch.empty(B, dtype=torch.long)
                for s in range(0, B, chunk):
                    cand = z[s : s + chunk, None, :] + offs[None]
                    tot = cost_o[None] + _bilinear(Vn, -self.lim, self.step, cand)
                    best[s : s + chunk] = tot.argmin(-1)
                jump = offs[best]
                u[:, i] = jump / h
                x = z + jump
        return u

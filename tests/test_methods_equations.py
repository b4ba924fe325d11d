"""Each method's loss equals a literal transcription of its math.md equations on random inputs (design.md section 5).

The transcriptions below are written from the equations (per transition, per sample, explicit Jacobians), in fp64
with analytic velocity fields, not from the methods' code. Bad input raises clear errors naming the argument.
"""

from __future__ import annotations

import math

import pytest
import torch

from flowkern.methods import AdjointMatching, DRaFT, ReFL, SmallValueNet, VGGFlow
from flowkern.train import TrainConfig, Trainer

D = 3
DT = torch.float64


# ---------------------------------------------------------------- analytic fields (fp64)
class Fields(torch.nn.Module):
    """v_base(x, t) = A x + t tanh(x) + b (A not symmetric, so J^T G != J G), v_theta = v_base + residual_theta,
    r(y) = -0.3 ||y - m||^2 + sin(y_0), c_phi(x, t) = (1 + t) tanh(x P) + t^2 q."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        rnd = lambda *s: torch.randn(*s, generator=g, dtype=DT)
        self.A = rnd(D, D) * 0.5
        self.b = rnd(D) * 0.3
        self.m = rnd(D)
        self.W = torch.nn.Parameter(rnd(D, D) * 0.3)  # theta
        self.u = torch.nn.Parameter(rnd(D) * 0.3)  # theta
        self.P = torch.nn.Parameter(rnd(D, D) * 0.5)  # phi
        self.q = torch.nn.Parameter(rnd(D) * 0.5)  # phi

    @staticmethod
    def _t(t, x):
        t = torch.as_tensor(t, dtype=x.dtype)
        return t.reshape(-1, 1) if t.dim() == 1 else t

    def v_base(self, x, t, cond=None):
        t = self._t(t, x)
        return x @ self.A.T + t * torch.tanh(x) + self.b

    def v_theta(self, x, t, cond=None):
        tt = self._t(t, x)
        return self.v_base(x, t) + tt * (x @ self.W) + (1 - tt) * torch.sin(x) * self.u

    def reward(self, y):
        return -0.3 * (y - self.m).square().sum(-1) + torch.sin(y[..., 0])

    def value(self, x, t, cond=None):
        tt = self._t(t, x)
        return (1 + tt) * torch.tanh(x @ self.P) + tt * tt * self.q

    def theta(self):
        return [self.W, self.u]

    def phi(self):
        return [self.P, self.q]


def grid(n: int) -> torch.Tensor:
    """A non-uniform grid with h_{N-1} = 0.05."""
    inner = torch.linspace(0, 1, n, dtype=DT) ** 1.3 * 0.95
    return torch.cat([inner, torch.ones(1, dtype=DT)])


def rollout(f: Fields, x0: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
    """(M2) x_{i+1} = x_i + h_i v_theta(x_i, t_i)."""
    xs = [x0]
    with torch.no_grad():
        for i in range(len(ts) - 1):
            xs.append(xs[-1] + (ts[i + 1] - ts[i]) * f.v_theta(xs[-1], ts[i]))
    return torch.stack(xs)


def grad_r(f: Fields, y: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    if not y.requires_grad:
        y = y.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(f.reward(y).sum(), y, create_graph=create_graph)
    return g


def eta(t, mode):
    return {"quad": t * t, "linear": t, "constant": 1.0 + 0 * t}[mode]


def param_grads(params):
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]


def zero(params):
    for p in params:
        p.grad = None


def assert_grads_close(a, b, rtol=1e-8, atol=1e-10):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


def setup(seed=0, n_traj=4, n_steps=6):
    f = Fields(seed)
    ts = grid(n_steps)
    x0 = torch.randn(n_traj, D, generator=torch.Generator().manual_seed(seed + 1), dtype=DT)
    return f, ts, rollout(f, x0, ts)


# ---------------------------------------------------------------- VGG-Flow transcription (M6-M21)
def vggflow_reference(f, states, ts, beta, alpha, mode, tau, eps_x, eps_t, consistency, scheme="forward"):
    """Total loss (M19) over every transition, per (b, i), from (M6)-(M21)."""
    n_steps, n_traj = len(ts) - 1, states.shape[1]
    match_terms, cons_terms, bnd_terms, norms = [], [], [], []
    for b in range(n_traj):
        for i in range(n_steps):
            x, t = states[i, b : b + 1].detach(), ts[i]

            def x_hat1(xx, tt):  # (M6), sg(v_theta)
                return xx + (1 - tt) * f.v_theta(xx, tt).detach()

            g0 = grad_r(f, x_hat1(x, t))  # (M7)
            n = g0.norm()
            rho = min(float(n), tau) / max(float(n), 1e-12)  # (M8)
            norms.append(float(n))
            ghat = rho * g0

            def ghat_at(xx, tt, rho=rho):  # (M20): re-evaluated at the perturbed point, rho from (x, t) (M9)
                return rho * grad_r(f, x_hat1(xx, tt))

            c = f.value(x, t)
            G = -beta * eta(t, mode) * ghat + c  # (M15)
            vb = f.v_base(x, t)
            T = vb - G  # (M16)
            match_terms.append(((f.v_theta(x, t) - T.detach()) ** 2).mean())
            w = (vb - G).detach()
            Db = x.numel()
            if consistency == "fd" and scheme == "central":  # (M20) option, paper Eqs. 44-45 (central)
                rho_w = max(float(w.norm() / math.sqrt(Db)), 1e-12)
                rho_G = max(float(G.detach().norm() / math.sqrt(Db)), 1e-12)

                def G_at(xx, tt):
                    return -beta * eta(tt, mode) * ghat_at(xx, tt) + f.value(xx, tt)

                t_hi, t_lo = min(float(t) + eps_t, 1.0), max(float(t) - eps_t, 0.0)  # inside [0, 1]
                T1 = (G_at(x, t_hi) - G_at(x, t_lo)) / (t_hi - t_lo)
                T2 = rho_w * (G_at(x + eps_x * w / rho_w, t) - G_at(x - eps_x * w / rho_w, t)) / (2 * eps_x)
                dG = eps_x * G.detach() / rho_G
                T3 = rho_G * (f.v_base(x + dG, t) - f.v_base(x - dG, t)) / (2 * eps_x)
                R = T1 + T2 + T3.detach()
            elif consistency == "fd":  # (M20)
                rho_w = max(float(w.norm() / math.sqrt(Db)), 1e-12)
                rho_G = max(float(G.detach().norm() / math.sqrt(Db)), 1e-12)
                e = eps_t if float(t) + eps_t <= 1 else -eps_t
                G_t = -beta * eta(t + e, mode) * ghat_at(x, t + e) + f.value(x, t + e)
                x_w = x + eps_x * w / rho_w
                G_x = -beta * eta(t, mode) * ghat_at(x_w, t) + f.value(x_w, t)
                x_G = x + eps_x * G.detach() / rho_G
                T1 = (G_t - G) / e
                T2 = rho_w * (G_x - G) / eps_x
                T3 = rho_G * (f.v_base(x_G, t) - vb) / eps_x
                R = T1 + T2 + T3.detach()
            else:  # (M21): T1 + T2 = d/ds G(x + s w, t + s), T3 = J_vb^T sg(G)
                t_ = torch.as_tensor(t, dtype=DT)

                def c_fn(xx, tt):
                    return f.value(xx, tt)

                def g_fn(xx, tt, rho=rho):
                    xx = xx if xx.requires_grad else xx.requires_grad_(True)
                    y = xx + (1 - tt) * f.v_theta(xx, tt)  # differentiated through v_theta along (w, 1)
                    return -beta * eta(tt, mode) * rho * grad_r(f, y, create_graph=True)

                _, dc = torch.autograd.functional.jvp(c_fn, (x, t_), (w, torch.ones_like(t_)), create_graph=True)
                _, dg = torch.autograd.functional.jvp(g_fn, (x, t_), (w, torch.ones_like(t_)))
                J = torch.autograd.functional.jacobian(lambda z, t=t: f.v_base(z[None], t)[0], x[0])  # dv_j/dx_k
                T3 = (J.T @ G.detach()[0])[None]
                R = dc + dg.detach() + T3
            cons_terms.append((R**2).mean())
            bnd_terms.append(float(i == n_steps - 1) * (c**2).mean())  # (M17)
    mean = lambda xs: torch.stack(list(xs)).mean()
    l_match, l_cons, l_bnd = mean(match_terms), mean(cons_terms), mean(bnd_terms)
    return l_match + l_cons + alpha * l_bnd, (l_match, l_cons, l_bnd), norms


def make_vggflow(f, **kw):
    base = dict(value_net=f.value, beta=1.7, alpha=3.0, eta_mode="quad", consistency="fd", subsample_fraction=None)
    base.update(kw)
    vgg = VGGFlow(f.v_theta, f.v_base, f.reward, **base)
    vgg.value_parameters = f.phi  # the value net here is a bound method of the fields module
    return vgg


@pytest.mark.parametrize(
    "mode,consistency,eps_x,eps_t,scheme,micro_batch",
    [
        ("quad", "fd", 1e-3, 1e-3, "forward", None),
        ("quad", "fd", 1e-3, 1e-3, "forward", 5),  # 24 transitions in micro-batches of 5 (the last one 4)
        ("linear", "fd", 1e-2, 0.06, "forward", None),
        ("quad", "fd", 1e-3, 1e-3, "central", None),
        ("linear", "fd", 1e-2, 0.06, "central", 1),  # t_0 = 0 and t + eps_t > 1 take the clipped one-sided branch
        ("constant", "exact", None, None, "forward", None),
        ("quad", "exact", None, None, "forward", None),
        ("quad", "exact", None, None, "forward", 7),
    ],
)
def test_vggflow_loss_matches_transcription(mode, consistency, eps_x, eps_t, scheme, micro_batch):
    f, ts, states = setup()
    beta, alpha = 1.7, 3.0
    g_norms = [float(grad_r(f, states[-1, b : b + 1]).norm()) for b in range(states.shape[1])]
    tau = sorted(g_norms)[len(g_norms) // 2]  # some transitions clip, some do not
    kw = dict(eta_mode=mode, consistency=consistency, tau0=tau, micro_batch=micro_batch)
    if consistency == "fd":
        kw.update(eps_x=eps_x, eps_t=eps_t, fd_scheme=scheme)
    vgg = make_vggflow(f, **kw)
    loss, metrics = vgg.loss({"states": states, "ts": ts})
    loss.backward()
    got_theta, got_phi = param_grads(f.theta()), param_grads(f.phi())
    zero(f.theta() + f.phi())
    ref, (l_match, l_cons, l_bnd), norms = vggflow_reference(
        f, states, ts, beta, alpha, mode, tau, eps_x, eps_t, consistency, scheme
    )
    ref.backward()
    # rtol 1e-6, not 1e-12: Triton kernels take float hyperparameters (tau, eps) as fp32 scalars, and the
    # finite differences amplify that 1e-8 relative rounding by 1/eps even for fp64 tensors
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-6, atol=1e-12)
    assert metrics["loss_match"] == pytest.approx(float(l_match.detach()), rel=1e-6)
    assert metrics["loss_cons"] == pytest.approx(float(l_cons.detach()), rel=1e-6)
    assert metrics["loss_bnd"] == pytest.approx(float(l_bnd.detach()), rel=1e-9)
    assert_grads_close(got_theta, param_grads(f.theta()), rtol=1e-6)
    assert_grads_close(got_phi, param_grads(f.phi()), rtol=1e-6)
    # (M9): tau <- linear 0.8-quantile of the unperturbed norms of this update
    vgg.after_optimizer_step()
    srt = sorted(norms)
    pos = 0.8 * (len(srt) - 1)
    lo = int(math.floor(pos))
    expected = srt[lo] + (pos - lo) * (srt[min(lo + 1, len(srt) - 1)] - srt[lo])
    assert vgg.tau == pytest.approx(expected, rel=1e-12)


def test_vggflow_exact_with_a_linear_reward_matches_transcription():
    """(M21) a reward linear in y (a pixel reward through a linear decoder: redness, brightness) has H = 0, so the
    reward gradient's derivative along dy is zero, not an autograd error ("does not require grad")."""
    f, ts, states = setup(seed=2)
    a = torch.tensor([0.7, -0.4, 1.1], dtype=DT)
    f.reward = lambda y: y @ a  # grad r = a everywhere
    kw = dict(eta_mode="quad", consistency="exact", tau0=1e6)
    loss, metrics = make_vggflow(f, **kw).loss({"states": states, "ts": ts})
    loss.backward()
    got_theta, got_phi = param_grads(f.theta()), param_grads(f.phi())
    zero(f.theta() + f.phi())
    ref, (_, l_cons, _), _ = vggflow_reference(f, states, ts, 1.7, 3.0, "quad", 1e6, None, None, "exact")
    ref.backward()
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-6, atol=1e-12)
    assert metrics["loss_cons"] == pytest.approx(float(l_cons.detach()), rel=1e-6)
    assert_grads_close(got_theta, param_grads(f.theta()), rtol=1e-6)
    assert_grads_close(got_phi, param_grads(f.phi()), rtol=1e-6)


def test_reward_hessian_vector_product_of_linear_and_constant_rewards():
    """H v = 0 for a reward linear in y, also when its gradient has a graph that does not reach y (a weight that
    requires grad); a reward that does not depend on y is a ValueError, as for the reward gradient (M7)."""
    from flowkern.methods._common import reward_grad_and_hvp

    y, v = torch.randn(2, D, dtype=DT), torch.randn(2, D, dtype=DT)
    a = torch.tensor([0.7, -0.4, 1.1], dtype=DT)
    for weight in (a, a.clone().requires_grad_(True)):
        g, hv = reward_grad_and_hvp(lambda yy, w=weight: yy @ w, y, v)
        torch.testing.assert_close(g, a.expand(2, D), rtol=0, atol=0)
        assert hv.shape == y.shape and torch.equal(hv, torch.zeros_like(y))
    with pytest.raises(ValueError, match="does not depend differentiably"):
        reward_grad_and_hvp(lambda yy: torch.ones(yy.shape[0], dtype=DT), y, v)


def test_vggflow_exact_and_fd_agree_on_symmetric_jacobian():
    """(M21): 'fd' and 'exact' agree as eps -> 0 where J_vbase is symmetric (a gradient field)."""
    f, ts, states = setup(seed=3)
    f.A = 0.5 * (f.A + f.A.T)  # v_base = grad of a potential: J symmetric
    kw = dict(tau0=1e6)
    fd, _ = make_vggflow(f, consistency="fd", eps_x=1e-6, eps_t=1e-6, **kw).loss({"states": states, "ts": ts})
    ex, _ = make_vggflow(f, consistency="exact", **kw).loss({"states": states, "ts": ts})
    torch.testing.assert_close(fd.detach(), ex.detach(), rtol=1e-4, atol=1e-8)


def test_vggflow_central_differences_are_second_order():
    """(M20) 'central' vs 'forward' against 'exact' (M21) on a symmetric J_vbase, where all three share the
    limit: the central error falls ~100x per 10x smaller eps (O(eps^2)), the forward one ~10x (O(eps))."""
    f, ts, states = setup(seed=3, n_steps=8)
    f.A = 0.5 * (f.A + f.A.T)
    batch = {"states": states, "ts": ts}
    # (M22) subsampling with one seed: the same transitions i >= 1 every time (t_0 = 0 would be one-sided)
    kw = lambda: dict(subsample_fraction=0.25, generator=torch.Generator().manual_seed(1), tau0=1e6)
    ex = float(make_vggflow(f, consistency="exact", **kw()).loss(batch)[1]["loss_cons"])
    err = {}
    for scheme in ("forward", "central"):
        for eps in (1e-2, 1e-3):
            vgg = make_vggflow(f, consistency="fd", fd_scheme=scheme, eps_x=eps, eps_t=eps, **kw())
            err[scheme, eps] = abs(float(vgg.loss(batch)[1]["loss_cons"]) - ex) / ex
    assert err["central", 1e-2] < 0.1 * err["forward", 1e-2]
    assert err["central", 1e-3] < 0.03 * err["central", 1e-2]  # second order (ideal 0.01)
    assert 0.05 < err["forward", 1e-3] / err["forward", 1e-2] < 0.2  # first order (ideal 0.1)


def test_vggflow_subsampling_selects_m22_transitions():
    """With subsampling, the loss equals the transcription restricted to the (M22) transitions drawn."""
    from flowkern.sampling import subsample_transitions

    f, ts, states = setup(n_steps=8)
    vgg = make_vggflow(f, subsample_fraction=0.25, tau0=1e6, generator=torch.Generator().manual_seed(5))
    loss, metrics = vgg.loss({"states": states, "ts": ts})
    rows = subsample_transitions(8, states.shape[1], torch.Generator().manual_seed(5), fraction=0.25)
    assert metrics["transitions"] == sum(len(r) for r in rows) == states.shape[1] * 3  # n_bin + 1 = 3 each
    terms = []
    for b, row in enumerate(rows):
        assert row[0] == 7 and all(i >= 1 for i in row)
        for i in row:
            sub_states = states[:, b : b + 1]
            x, t = sub_states[i], ts[i]
            g = grad_r(f, x + (1 - t) * f.v_theta(x, t).detach())
            G = -1.7 * t * t * g + f.value(x, t)
            terms.append(((f.v_theta(x, t) - (f.v_base(x, t) - G)) ** 2).mean())
    assert metrics["loss_match"] == pytest.approx(float(torch.stack(terms).mean().detach()), rel=1e-6)


def test_small_value_net_starts_at_zero():
    for shape in [(5,), (2, 4, 4)]:
        net = SmallValueNet(shape, cond_dim=6)
        x = torch.randn(3, *shape)
        out = net(x, torch.rand(3), torch.randn(3, 7, 6))
        assert out.shape == x.shape and torch.equal(out, torch.zeros_like(out))


# ---------------------------------------------------------------- DAM transcription (M25-M28)
def lean_adjoint_reference(f, states, ts, a_N, kind="ode"):
    """(M25) a_i = a_{i+1} + h_i J_vb(x_i, t_i)^T a_{i+1}; (M31) a_i = a_{i+1} + h (2 J^T a_{i+1} - kappa_i a_{i+1})."""
    n_steps = len(ts) - 1
    a = [None] * (n_steps + 1)
    a[n_steps] = a_N
    for i in range(n_steps - 1, -1, -1):
        h = ts[i + 1] - ts[i]
        rows = []
        for b in range(states.shape[1]):
            J = torch.autograd.functional.jacobian(lambda z, i=i: f.v_base(z[None], ts[i])[0], states[i, b])
            if kind == "ode":
                rows.append(a[i + 1][b] + h * J.T @ a[i + 1][b])
            else:
                kappa = 1 / (ts[i] + h)
                rows.append(a[i + 1][b] + h * (2 * J.T @ a[i + 1][b] - kappa * a[i + 1][b]))
        a[i] = torch.stack(rows)
    return a


def optimal_control(a, lam, p, cost):
    """(M26) u* = -grad c*(a/lam)."""
    if p == 2:
        return -a / lam
    if cost == "elementwise":
        return -torch.sign(a) * (a / lam).abs() ** (1 / (p - 1))
    omega = a / lam
    return -omega * omega.norm(dim=-1, keepdim=True) ** ((2 - p) / (p - 1))


@pytest.mark.parametrize(
    "K,p,cost,micro_batch",
    [
        (1, 2.0, "elementwise", None),
        (3, 2.0, "elementwise", None),
        (3, 2.0, "elementwise", 1),  # 12 samples one at a time, the lean adjoint one trajectory at a time
        (6, 3.0, "elementwise", 5),
        (4, 1.5, "norm", None),
    ],
)
def test_dam_loss_matches_transcription(K, p, cost, micro_batch):
    f, ts, states = setup()
    lam = 0.7
    am = AdjointMatching(f.v_theta, f.v_base, f.reward, lam=lam, K=K, p=p, cost=cost, micro_batch=micro_batch)
    loss, _ = am.loss({"states": states, "ts": ts})
    loss.backward()
    got = param_grads(f.theta())
    zero(f.theta())
    n_steps = len(ts) - 1
    a = lean_adjoint_reference(f, states, ts, -grad_r(f, states[-1]))  # a_N = -grad r(x_N)
    terms = []
    for i in range(n_steps - K, n_steps):  # (M28), paired with a_{i+1} (M27)
        x, t = states[i], ts[i]
        u = optimal_control(a[i + 1], lam, p, cost)
        terms.append(((f.v_theta(x, t) - f.v_base(x, t).detach() - u.detach()) ** 2).mean())
    ref = torch.stack(terms).sum() / K
    ref.backward()
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-9, atol=1e-12)
    assert_grads_close(got, param_grads(f.theta()))


def test_dam_k1_target_is_vggflow_terminal_target():
    """(M28) check: K = 1, p = 2 gives the target v_base(x_{N-1}) + grad r(x_N)/lam = VGG-Flow's T at i = N-1 with
    eta = 1, c = 0 (since x_hat1(x_{N-1}) = x_N, M7)."""
    f, ts, states = setup()
    lam = 0.4
    am, _ = AdjointMatching(f.v_theta, f.v_base, f.reward, lam=lam, K=1).loss({"states": states, "ts": ts})
    x, t = states[-2], ts[-2]
    target = f.v_base(x, t) + grad_r(f, states[-1]) / lam
    ref = ((f.v_theta(x, t) - target) ** 2).mean()
    torch.testing.assert_close(am.detach(), ref.detach(), rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------- memoryless AM transcription (M29-M32)
@pytest.mark.parametrize("lct,micro_batch", [(math.inf, None), ("some", None), ("some", 3)])
def test_memoryless_am_loss_matches_transcription(lct, micro_batch):
    f = Fields(1)
    n_steps = 5
    ts = torch.linspace(0, 1, n_steps + 1, dtype=DT)
    x0 = torch.randn(4, D, generator=torch.Generator().manual_seed(2), dtype=DT)
    states = rollout(f, x0, ts)  # the loss only reads the states; any process will do
    beta = 1.3
    h = float(ts[1] - ts[0])
    sigma = [math.sqrt(2 * (1 - float(ts[i]) + h) / (float(ts[i]) + h)) for i in range(n_steps)]  # (M29)
    x_hat1 = states[-2] + h * f.v_base(states[-2], ts[-2])  # (M31)
    a = lean_adjoint_reference(f, states, ts, -beta * grad_r(f, x_hat1), kind="memoryless")  # lam_r = beta
    s = torch.stack(
        [
            ((2 / sigma[i]) * (f.v_theta(states[i], ts[i]) - f.v_base(states[i], ts[i]).detach()) + sigma[i] * a[i + 1])
            .square()
            .sum(-1)
            for i in range(n_steps)
        ]
    )  # (M32) s_{b,i}
    srt = s.detach().flatten().sort().values
    mid = len(srt) // 2
    lct_value = math.inf if lct == math.inf else float(srt[mid - 1] + srt[mid]) / 2  # between two s: no ties
    ref = s.clamp(max=lct_value).mean()
    ref.backward()
    want = param_grads(f.theta())
    zero(f.theta())
    am = AdjointMatching(
        f.v_theta, f.v_base, f.reward, beta=beta, kind="memoryless", lct=lct_value, n_last=n_steps,
        micro_batch=micro_batch,
    )  # fmt: skip
    loss, metrics = am.loss({"states": states, "ts": ts})
    loss.backward()
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-9, atol=1e-12)
    assert_grads_close(param_grads(f.theta()), want)
    if lct != math.inf:
        assert 0 < metrics["clipped_fraction"] < 1


# ---------------------------------------------------------------- ReFL (M34), DRaFT (M35)
def test_refl_loss_matches_transcription():
    f, ts, states = setup(n_traj=6)
    offset = -float(f.reward(states[-1]).median())  # ReLU active for some samples only
    reward = lambda y: f.reward(y) + offset
    loss, _ = ReFL(f.v_theta, reward, last_steps=1).loss({"states": states, "ts": ts})
    loss.backward()
    got = param_grads(f.theta())
    zero(f.theta())
    x, t = states[-2], ts[-2]
    ref = -torch.relu(reward(x + (1 - t) * f.v_theta(x, t))).mean()  # (M34), no sg
    ref.backward()
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-12, atol=1e-14)
    assert_grads_close(got, param_grads(f.theta()))


def test_refl_draws_from_the_last_steps():
    f, ts, states = setup(n_traj=2)
    loss, _ = ReFL(f.v_theta, f.reward, last_steps=3, generator=torch.Generator().manual_seed(0)).loss(
        {"states": states, "ts": ts}
    )
    n = len(ts) - 1
    with torch.no_grad():
        per = [
            [float(-torch.relu(f.reward(states[i, b] + (1 - ts[i]) * f.v_theta(states[i, b : b + 1], ts[i])[0])))
             for i in range(n - 3, n)]
            for b in range(2)
        ]  # fmt: skip
    candidates = [(per[0][i] + per[1][j]) / 2 for i in range(3) for j in range(3)]
    assert min(abs(float(loss.detach()) - c) for c in candidates) < 1e-12


@pytest.mark.parametrize("K", [1, 3])
def test_draft_gradient_matches_unrolled_autograd(K):
    f, ts, states = setup(n_traj=6)
    offset = -float(f.reward(states[-1]).median())  # r > 0 for some samples, < 0 (ReLU off) for others
    reward = lambda y: f.reward(y) + offset
    draft = DRaFT(f.v_theta, reward, K=K)
    loss, _ = draft.loss({"states": states, "ts": ts})
    (0.5 * loss).backward()
    got = param_grads(f.theta())
    zero(f.theta())
    n = len(ts) - 1
    x = states[n - K].detach()  # x_{N-K} held constant (M35)
    for i in range(n - K, n):
        x = x + (ts[i + 1] - ts[i]) * f.v_theta(x, ts[i])
    ref = -torch.relu(reward(x)).mean()
    (0.5 * ref).backward()
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-12, atol=1e-14)
    assert_grads_close(got, param_grads(f.theta()))


def test_draft_random_k_in_range():
    f, ts, states = setup()
    draft = DRaFT(f.v_theta, f.reward, K=4, random_K=True, generator=torch.Generator().manual_seed(0))
    ks = {draft.loss({"states": states, "ts": ts})[1]["K"] for _ in range(20)}
    assert ks <= {1.0, 2.0, 3.0, 4.0} and len(ks) > 1


# ---------------------------------------------------------------- bad input
def _vgg(**kw):
    f = Fields()
    base = dict(value_net=f.value, beta=1.0)
    base.update(kw)
    return VGGFlow(f.v_theta, f.v_base, f.reward, **base)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf])
@pytest.mark.parametrize("name", ["beta", "eps_x", "eps_t"])
def test_vggflow_rejects_bad_positive_floats(name, bad):
    with pytest.raises(ValueError, match=name):
        _vgg(**{name: bad})


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf])
def test_vggflow_rejects_bad_alpha(bad):
    with pytest.raises(ValueError, match="alpha"):
        _vgg(alpha=bad)


def test_vggflow_rejects_bad_modes_and_types():
    with pytest.raises(ValueError, match="eta_mode"):
        _vgg(eta_mode="cubic")
    with pytest.raises(ValueError, match="consistency"):
        _vgg(consistency="central")
    with pytest.raises(ValueError, match="fd_scheme"):
        _vgg(fd_scheme="backward")
    with pytest.raises(ValueError, match="fd_scheme"):
        _vgg(consistency="exact", fd_scheme="central")
    with pytest.raises(TypeError, match="beta"):
        _vgg(beta="1")
    with pytest.raises(ValueError, match="sample_shape"):
        _vgg(value_net="small")
    with pytest.raises(ValueError, match="value_net"):
        _vgg(value_net="large")
    with pytest.raises(TypeError, match="reward"):
        VGGFlow(Fields().v_theta, Fields().v_base, None, value_net="small", sample_shape=(3,), beta=1.0)


@pytest.mark.parametrize("kw,match", [
    (dict(lam=0.0), "lam"), (dict(lam=math.nan), "lam"), (dict(beta=-2.0), "beta"), (dict(beta=math.inf), "beta"),
    (dict(beta=1.0, K=0), "K"), (dict(beta=1.0, p=1.0), "p"), (dict(beta=1.0, p=math.nan), "p"),
    (dict(beta=1.0, kind="sde"), "kind"), (dict(beta=1.0, cost="l1"), "cost"), (dict(beta=1.0, lct=-1.0), "lct"),
    (dict(beta=1.0, lam=1.0), "exactly one"), (dict(), "exactly one"),
])  # fmt: skip
def test_adjoint_matching_rejects_bad_arguments(kw, match):
    f = Fields()
    with pytest.raises((ValueError, TypeError), match=match):
        AdjointMatching(f.v_theta, f.v_base, f.reward, **kw)


def test_k_out_of_range_at_loss_time():
    f, ts, states = setup()  # N = 6
    batch = {"states": states, "ts": ts}
    with pytest.raises(ValueError, match="K must be in"):
        AdjointMatching(f.v_theta, f.v_base, f.reward, beta=1.0, K=7).loss(batch)
    with pytest.raises(ValueError, match="K must be in"):
        DRaFT(f.v_theta, f.reward, K=7).loss(batch)
    with pytest.raises(ValueError, match="last_steps"):
        ReFL(f.v_theta, f.reward, last_steps=7).loss(batch)
    with pytest.raises(ValueError, match="K"):
        DRaFT(f.v_theta, f.reward, K=0)


@pytest.mark.parametrize("bad_reward,err", [
    (lambda y: y.sum(-1, keepdim=True), ValueError), (lambda y: y.sum(), ValueError),
    (lambda y: y, ValueError), (lambda y: 1.0, TypeError),
])  # fmt: skip
def test_reward_wrong_shape_is_a_clear_error(bad_reward, err):
    f, ts, states = setup()
    batch = {"states": states, "ts": ts}
    methods = [
        make_vggflow(f, tau0=1.0),
        AdjointMatching(f.v_theta, f.v_base, f.reward, beta=1.0),
        ReFL(f.v_theta, f.reward),
        DRaFT(f.v_theta, f.reward),
    ]
    for method in methods:
        method.reward = bad_reward
        with pytest.raises(err, match="reward"):
            method.loss(batch)


def test_reward_nan_in_training_is_a_skipped_logged_step(caplog):
    from flowkern.models.toy import GaussianMixture, make_toy_model

    model = make_toy_model(GaussianMixture.ring(4, radius=2.0), hidden=16)
    calls = {"n": 0}

    def reward(x):
        calls["n"] += 1
        r = -(x - 1).square().sum(-1)
        return r * math.nan if calls["n"] == 1 else r  # NaN in the first update's rollout

    from flowkern.methods import flow_callables

    v, vb = flow_callables(model)
    method = AdjointMatching(v, vb, reward, beta=1.0, K=2)
    trainer = Trainer(model, reward, method, TrainConfig(batch_size=8, num_steps=4, lr=1e-2), sample_shape=(2,))
    before = [p.detach().clone() for p in model.trainable_parameters()]
    with caplog.at_level("WARNING", logger="flowkern.train"):
        m0 = trainer.train_step()
    assert m0["skipped"] == 1.0 and trainer.skipped[0][1] == "non-finite reward"
    assert "skipped" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(before, model.trainable_parameters()))
    assert not trainer.optimizer.state  # AdamW state untouched
    m1 = trainer.train_step()
    assert m1["skipped"] == 0.0 and trainer.updates == 1

"""The toy with ground truth (math.md section 10): exact mixture velocity (M38), references p* (M36, M39) and
q* (M37), energy distance (M40), W2 diagnostic (M41)."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.toy import (
    TOY_SETTINGS,
    GridDP2D,
    aimed_start,
    controlled_euler,
    discretization_gap,
    energy_distance,
    expected_floor,
    mode_coverage,
    mode_masses,
    model_controls,
    noise_floor,
    q_star_samples,
    sample_tilted,
    solve_optimal_controls,
    tilt_linear,
    toy_problem,
    toy_q_star_fine,
    toy_settings,
    w2_bound_diagnostic,
)
from flowkern.metrics.diversity import FlattenFeatures, diversity
from flowkern.models.base import FlowModel
from flowkern.models.toy import (
    BumpReward,
    GaussianMixture,
    GaussianMixtureVelocity,
    LinearReward,
    QuadraticReward,
    ResidualMLP,
    make_toy_model,
)
from flowkern.sampling import sample_euler, uniform_grid

F64 = torch.float64


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # tiny tensors: extra intra-op threads only add contention (10x slower on a loaded 2-core machine)
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _m38_literal(mix: GaussianMixture, x: torch.Tensor, t: float) -> torch.Tensor:
    """(M38) as written: (sum_k gamma_k m_k - x) / (1 - t), with explicit inverses."""
    d = mix.dim
    T = torch.tensor(t, dtype=F64)
    S = T**2 * mix.covariances + (1 - T) ** 2 * torch.eye(d, dtype=F64)
    diff = x[:, None] - T * mix.means[None]
    mk = mix.means[None] + T * torch.einsum("kij,kjl,bkl->bki", mix.covariances, torch.linalg.inv(S), diff)
    logn = torch.distributions.MultivariateNormal(T * mix.means, S).log_prob(x[:, None])
    gamma = torch.softmax(logn + torch.log(mix.weights), -1)
    return ((gamma[..., None] * mk).sum(1) - x) / (1 - T)


def _zero_velocity(x, t):
    return torch.zeros_like(x)


# ---- the exact velocity (M38) ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mix", [GaussianMixture.ring(), GaussianMixture.random(8, 5, seed=3)], ids=["ring2d", "rand8d"]
)
def test_velocity_matches_m38(mix):
    v = GaussianMixtureVelocity(mix)
    x = 2.5 * torch.randn(64, mix.dim, dtype=F64, generator=_gen(1))
    for t in (0.0, 0.2, 0.5, 0.9, 0.995):
        ref = _m38_literal(mix, x, t)
        got = v(x, torch.tensor(t, dtype=F64))
        assert torch.allclose(got, ref, atol=1e-9 * (1 + ref.abs().max()), rtol=0), t
        # fp32 on a float32 copy of the module
        got32 = GaussianMixtureVelocity(mix).float()(x.float(), torch.tensor(t))
        assert got32.dtype == torch.float32
        assert (got32.double() - ref).abs().max() <= 1e-4 * (1 + ref.abs().max()), t
    # the end points of the singularity-free form: v(x, 0) = E[x1] - x, v(x, 1) = x (x0 independent of x1)
    assert torch.allclose(v(x, torch.tensor(0.0, dtype=F64)), mix.mean()[None] - x, atol=1e-12)
    assert torch.allclose(v(x, torch.tensor(1.0, dtype=F64)), x, atol=1e-12)
    assert torch.isfinite(v(x.float(), torch.tensor(1.0 - 1e-7))).all()
    # per-sample t [B] equals the scalar calls
    tb = torch.rand(8, dtype=F64, generator=_gen(2))
    rows = torch.cat([v(x[i : i + 1], tb[i]) for i in range(8)])
    assert torch.allclose(v(x[:8], tb), rows, atol=1e-12)


def test_velocity_small_t_is_mean_minus_x():
    mix = GaussianMixture.ring()
    v = GaussianMixtureVelocity(mix)
    x = torch.randn(32, 2, dtype=F64, generator=_gen(3))
    errs = [(v(x, torch.tensor(t, dtype=F64)) - (mix.mean() - x)).abs().max().item() for t in (1e-3, 1e-4)]
    assert errs[1] < 2e-3 and errs[0] / errs[1] == pytest.approx(10, rel=0.05)  # O(t)


def test_single_gaussian_flow_is_closed_form():
    """One Gaussian N(mu, Sigma): the flow map is x_t = t mu + (t^2 Sigma + (1-t)^2 I)^{1/2} x0 (M38 with K = 1)."""
    A = torch.tensor([[1.0, 0.6], [0.6, 0.5]], dtype=F64)
    Sigma = A @ A.T + 0.05 * torch.eye(2, dtype=F64)
    mu = torch.tensor([1.5, -2.0], dtype=F64)
    v = GaussianMixtureVelocity(GaussianMixture.gaussian(mu, Sigma))
    x0 = torch.randn(16, 2, dtype=F64, generator=_gen(4))

    def sqrtm(M):
        e, U = torch.linalg.eigh(M)
        return U @ torch.diag(e.sqrt()) @ U.T

    x, n = x0.clone(), 400  # RK4
    ts = torch.linspace(0, 1, n + 1, dtype=F64)
    for i in range(n):
        t, h = ts[i], ts[i + 1] - ts[i]
        k1 = v(x, t)
        k2 = v(x + h / 2 * k1, t + h / 2)
        k3 = v(x + h / 2 * k2, t + h / 2)
        k4 = v(x + h * k3, t + h)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        if i + 1 == n // 2:
            tm = ts[i + 1]
            St = tm**2 * Sigma + (1 - tm) ** 2 * torch.eye(2, dtype=F64)
            assert torch.allclose(x, tm * mu + x0 @ sqrtm(St), atol=1e-9)
    assert torch.allclose(x, mu + x0 @ sqrtm(Sigma), atol=1e-9)


def test_euler_flow_transports_noise_to_the_mixture():
    mix = GaussianMixture.ring()
    v = GaussianMixtureVelocity(mix)
    n = 1500
    xs = sample_euler(v, torch.randn(n, 2, dtype=F64, generator=_gen(5)), uniform_grid(400)).final
    ref = mix.sample(n, _gen(6))
    assert energy_distance(xs, ref) < 2.5 * expected_floor(ref)


def test_velocity_is_differentiable_in_x():
    mix = GaussianMixture.random(3, 3, seed=1)
    v = GaussianMixtureVelocity(mix)
    x = torch.randn(4, 3, dtype=F64, generator=_gen(7), requires_grad=True)
    t = torch.rand(4, dtype=F64, generator=_gen(8))
    assert torch.autograd.gradcheck(lambda y: v(y, t), (x,))
    assert torch.autograd.gradcheck(lambda y: v(y, torch.tensor(0.999, dtype=F64)), (x,))
    vf = GaussianMixtureVelocity(GaussianMixture.ring()).float()
    xf = torch.randn(5, 2, requires_grad=True)
    (g,) = torch.autograd.grad(vf(xf, torch.tensor(0.7)), xf, torch.ones(5, 2))
    assert g.dtype == torch.float32 and torch.isfinite(g).all()


def test_mixture_log_prob_and_sampling():
    mix = GaussianMixture.random(8, 4, seed=2)
    x = torch.randn(10, 8, dtype=F64, generator=_gen(9)) * 3
    comps = torch.distributions.MultivariateNormal(mix.means, mix.covariances).log_prob(x[:, None])
    assert torch.allclose(mix.log_prob(x), torch.logsumexp(comps + torch.log(mix.weights), -1), atol=1e-10)
    s = mix.sample(40000, _gen(10))
    assert torch.allclose(s.mean(0), mix.mean(), atol=0.1)
    shares, off = mode_masses(s, mix)
    assert torch.allclose(shares, mix.weights, atol=0.02) and off < 0.01


def test_toy_model_protocol_and_zero_init():
    mix = GaussianMixture.ring()
    model = make_toy_model(mix, hidden=32)
    assert isinstance(model, FlowModel)
    x, t = torch.randn(6, 2), torch.rand(6)
    with torch.no_grad():
        base = GaussianMixtureVelocity(mix).float()(x, t)
        assert torch.equal(model.velocity(x, t), base)
        for p in model.trainable_parameters():
            p.add_(0.1 * torch.randn_like(p))
        assert not torch.allclose(model.velocity(x, t), base)
        with model.base_velocity():
            assert torch.equal(model.velocity(x, t), base)
    params = {id(p) for p in model.residual.parameters()}
    assert {id(p) for p in model.trainable_parameters()} == params
    assert ResidualMLP(2, hidden=8)(x, torch.tensor(0.3)).abs().max() == 0


def test_rewards():
    x = torch.randn(7, 2, dtype=F64, generator=_gen(11), requires_grad=True)
    bump = BumpReward([1.0, 0.0], width=0.7, height=2.0)
    r = bump(x)
    assert r.shape == (7,) and (r > 0).all() and (r <= 2).all()
    (g,) = torch.autograd.grad(r.sum(), x)
    c = torch.tensor([1.0, 0.0], dtype=F64)
    assert torch.allclose(g, -(x - c) / 0.49 * r[:, None], atol=1e-12)
    lin = LinearReward([1.0, -2.0])
    assert torch.allclose(lin(x), x[:, 0] - 2 * x[:, 1]) and lin(x.float()).dtype == torch.float32
    quad = QuadraticReward(torch.eye(2), b=[1.0, 0.0])
    assert torch.allclose(quad.aim_targets(x.detach(), 1.0)[0][0], torch.tensor([1.0, 0.0], dtype=F64))


# ---- energy distance and floors (M40) -------------------------------------------------------------------


def test_energy_distance():
    X = torch.randn(300, 1, dtype=F64, generator=_gen(12))
    assert energy_distance(X, X) == 0.0  # V-statistic: ED of identical empirical measures
    assert energy_distance(X, X, chunk_elems=1000) == pytest.approx(0.0, abs=1e-12)
    n = 3000
    A, B = torch.randn(n, 1, dtype=F64, generator=_gen(13)), 1 + torch.randn(n, 1, dtype=F64, generator=_gen(14))

    def e_abs(m, s):  # E|Z|, Z ~ N(m, s^2)
        return s * math.sqrt(2 / math.pi) * math.exp(-(m**2) / (2 * s**2)) + m * math.erf(m / (s * math.sqrt(2)))

    exact = 2 * e_abs(1.0, math.sqrt(2)) - 2 * e_abs(0.0, math.sqrt(2))
    assert energy_distance(A, B, unbiased=True) == pytest.approx(exact, abs=0.03)
    assert energy_distance(A, B, chunk_elems=10_000) == pytest.approx(energy_distance(A, B), rel=1e-10)
    # unbiased: expectation 0 for one distribution; V-statistic: expectation 2 E|X - X'| / n
    C = torch.randn(n, 1, dtype=F64, generator=_gen(15))
    assert abs(energy_distance(A, C, unbiased=True)) < 3 * expected_floor(A)
    fl = noise_floor(lambda k, g: torch.randn(k, 2, dtype=F64, generator=g), 500, repeats=8, generator=_gen(16))
    ref = expected_floor(torch.randn(4000, 2, dtype=F64, generator=_gen(17)), 500)
    assert fl["mean"] == pytest.approx(ref, rel=0.35)


# ---- p* (M36, M39) ------------------------------------------------------------------------------------


def test_tilted_resampling_matches_linear_closed_form():
    mix = GaussianMixture.ring()
    reward, lam, n = LinearReward([0.6, 0.3]), 1.0, 1500
    xr, info = sample_tilted(mix, reward, lam, n, _gen(18), method="resample", return_info=True)
    assert info["ess"] >= 0.1 * info["pool"]
    xc = sample_tilted(mix, reward, lam, n, _gen(19))  # closed form (auto)
    base = mix.sample(n, _gen(20))
    floor = expected_floor(xc)
    assert energy_distance(xr, xc) < 3 * floor
    assert energy_distance(base, xc) > 30 * floor
    # (M39) on a single Gaussian N(0, I): p* = N(a / lam, I)
    g = tilt_linear(GaussianMixture.gaussian(torch.zeros(2), torch.eye(2)), [1.0, -0.5], 0.5)
    assert torch.allclose(g.means[0], torch.tensor([2.0, -1.0], dtype=F64))
    with pytest.raises(ValueError, match="ESS"):
        sample_tilted(mix, LinearReward([5.0, 0.0]), 0.05, 100, _gen(21), method="resample")


# ---- q* (M37) --------------------------------------------------------------------------------------------


def _shifted_grid(N: int, shift: float = 3.0) -> torch.Tensor:
    s = torch.linspace(1, 0, N + 1, dtype=F64)
    return 1 - shift * s / (1 + (shift - 1) * s)  # non-uniform, (M4)-like


def test_q_star_quadratic_gaussian_closed_form():
    """(M37): v_base = 0, r = -x^T A x / 2: x_N = (I + T_K A / lam)^{-1} x0, T_K = the controlled time (1 if K = N)."""
    A = torch.tensor([[2.0, 0.7], [0.7, 1.0]], dtype=F64)
    lam, N = 0.7, 12
    x0 = torch.randn(50, 2, dtype=F64, generator=_gen(22))
    ts = _shifted_grid(N)
    for K in (N, 4):
        u, xN, info = solve_optimal_controls(x0, _zero_velocity, QuadraticReward(A), lam, ts, K=K, starts=("zero",))
        T = float(ts[N] - ts[N - K])
        expect = x0 @ torch.linalg.inv(torch.eye(2, dtype=F64) + T * A / lam).T
        assert torch.allclose(xN, expect, atol=1e-6), K
        assert info["grad_norm_max"] <= 1e-6 and (u[:, : N - K] == 0).all()
    # q* = N(0, (I + A/lam)^-2) differs from p* = N(0, (I + A/lam)^-1)
    xq = q_star_samples(_zero_velocity, QuadraticReward(A), lam, 4000, ts, dim=2, generator=_gen(23), starts=("zero",))
    M = torch.linalg.inv(torch.eye(2, dtype=F64) + A / lam)
    assert torch.allclose(torch.cov(xq.T), M @ M, atol=0.03)


@pytest.mark.parametrize(("p", "cost"), [(2.0, "norm"), (3.0, "elementwise"), (1.5, "norm")])
def test_q_star_linear_gaussian_closed_form(p, cost):
    """(M37) linear r = a^T x, v_base = 0: x_N = x0 + u*, u* = -grad c*(-a / lam) (M26).
    p = 2: both references are N(a / lam, I)."""
    a, lam = torch.tensor([1.0, -0.5], dtype=F64), 0.5
    x0 = torch.randn(40, 2, dtype=F64, generator=_gen(24))
    u, xN, info = solve_optimal_controls(
        x0, _zero_velocity, LinearReward(a), lam, uniform_grid(10), p=p, cost=cost, starts=("zero", "aimed")
    )
    w = a / lam
    if p == 2:
        ustar = w
    elif cost == "elementwise":
        ustar = torch.sign(w) * w.abs() ** (1 / (p - 1))
    else:
        ustar = w * w.norm() ** ((2 - p) / (p - 1))
    assert torch.allclose(u, ustar.expand_as(u), atol=1e-5)
    assert torch.allclose(xN, x0 + ustar, atol=1e-6)
    if p == 2:
        mix = GaussianMixture.gaussian(torch.zeros(2), torch.eye(2))
        xq = q_star_samples(
            _zero_velocity, LinearReward(a), lam, 2000, uniform_grid(10), dim=2, generator=_gen(25), starts=("zero",)
        )
        xp = sample_tilted(mix, LinearReward(a), lam, 2000, _gen(26))
        assert energy_distance(xq, xp) < 3 * expected_floor(xp)


def _lean_adjoint_kkt(v, reward, lam, ts, x0, u):
    """max_i |lam u_i + a_{i+1}| with the discrete lean adjoint of (M25): the (M27) stationarity of (M28)."""
    N = ts.shape[0] - 1
    xs = [x0]
    with torch.no_grad():
        for i in range(N):
            xs.append(xs[-1] + (ts[i + 1] - ts[i]) * (v(xs[-1], ts[i]) + u[:, i]))
    xN = xs[-1].clone().requires_grad_(True)
    (a,) = torch.autograd.grad(-reward(xN).sum(), xN)
    res = (lam * u[:, N - 1] + a).abs().amax(-1)
    for i in range(N - 1, 0, -1):
        xi = xs[i].clone().requires_grad_(True)
        (jta,) = torch.autograd.grad(v(xi, ts[i]), xi, (ts[i + 1] - ts[i]) * a)
        a = a + jta
        res = torch.maximum(res, (lam * u[:, i - 1] + a).abs().amax(-1))
    return res


def test_best_of_starts_on_the_bump():
    P = toy_problem("bump")
    v, reward, lam, ts = P["base_velocity"], P["reward"], P["lam"], P["ts"]
    x0 = torch.randn(120, 2, dtype=F64, generator=_gen(27))
    u, xN, info = solve_optimal_controls(x0, v, reward, lam, ts, starts=("zero", "aimed", "dp"), dp_grid=121)
    F = info["objective_by_start"]
    assert info["start_names"] == ["zero", "aimed0", "dp"]
    assert info["improved"] > 0.1 * x0.shape[0]  # u = 0 ends at a local optimum for many particles
    assert info["improved_by_start"]["aimed0"] > 0
    assert (info["objective"] <= F.amin(0) + 1e-12).all()  # best of starts never worsens a particle
    kept = info["best_start"] == 0
    assert torch.allclose(info["objective"][kept], F[0][kept])
    # the returned controls realise the reported objective
    J = (lam * 0.5 * (u**2).sum(-1) * (ts[1:] - ts[:-1])).sum(-1) - reward(xN)
    assert torch.allclose(J, info["objective"], atol=1e-10)
    # an independent, finer grid DP finds nothing better (to its grid accuracy)
    dp = GridDP2D(v, reward, lam, ts, lim=7.0, G=161)
    assert (dp.value(x0) > info["objective"] - 0.1).all()
    assert (dp.value(x0) < F[0] - 0.1).sum() > 0.1 * x0.shape[0]
    # q* is the fixed point of deterministic adjoint matching: lam u_i = -a_{i+1} (M25-M28)
    ok = info["status"] == 0
    assert ok.float().mean() > 0.8
    assert _lean_adjoint_kkt(v, reward, lam, ts, x0[ok], u[ok]).max() < 1e-5
    # the pull-back aimed start realises a path that ends exactly at its target
    ua = aimed_start(x0[:5], v, ts, torch.tensor([4.0, 0.0], dtype=F64), ramp=5)
    assert torch.allclose(controlled_euler(x0[:5], v, ts, ua), torch.tensor([[4.0, 0.0]], dtype=F64), atol=1e-6)


# ---- yardsticks and diagnostics (M40, M41) ---------------------------------------------------------------


def test_discretization_gap_mode_coverage_diversity():
    mix = GaussianMixture.ring()
    v = GaussianMixtureVelocity(mix)
    coarse = discretization_gap(v, N=3, N_fine=200, n=800, generator=_gen(28))
    fine = discretization_gap(v, N=50, N_fine=200, n=800, generator=_gen(28))
    assert coarse > 3 * fine > 0
    exact = mix.sample(2000, _gen(29))
    assert mode_coverage(exact, mix) == 1.0
    one = mix.means[0] + 0.4 * torch.randn(500, 2, dtype=F64, generator=_gen(30))
    assert mode_coverage(one, mix) == 1 / 8
    assert diversity(one, FlattenFeatures()) < diversity(exact, FlattenFeatures())
    _, off = mode_masses(torch.zeros(10, 2, dtype=F64), mix)
    assert off == 1.0


def test_w2_bound_diagnostic():
    model = make_toy_model(GaussianMixture.ring(), hidden=16)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=_gen(31)))
    out = w2_bound_diagnostic(model, n=200, N=20, generator=_gen(32))
    assert out["w2_sq_coupled"] > 0 and out["energy"] > 0 and out["holds"]


def test_bad_inputs():
    P = toy_problem("linear")
    x0 = torch.zeros(2, 2, dtype=F64)
    for lam in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="lam"):
            solve_optimal_controls(x0, P["base_velocity"], P["reward"], lam, P["ts"])
    with pytest.raises(ValueError, match="K"):
        solve_optimal_controls(x0, P["base_velocity"], P["reward"], 0.5, P["ts"], K=0)
    with pytest.raises(ValueError, match="p must"):
        solve_optimal_controls(x0, P["base_velocity"], P["reward"], 0.5, P["ts"], p=1.0)
    with pytest.raises(ValueError, match="unknown toy setting"):
        toy_problem("nope")
    with pytest.raises(ValueError):
        GaussianMixture(torch.zeros(2, 2), torch.tensor([1.0, -1.0]))
    assert set(TOY_SETTINGS["rewards"]) == {"linear", "quad", "bump", "bump_gap", "linear_8d", "quad_8d", "bump_8d"}
    with pytest.raises(ValueError, match="control start"):
        solve_optimal_controls(x0, P["base_velocity"], P["reward"], 0.5, P["ts"], starts=(torch.zeros(2, 3, 2),))


# ---- the 8-D setting ---------------------------------------------------------------------------------------


def test_8d_setting_references_are_distinct_and_q_star_is_the_dam_fixed_point():
    """8-D mixture (TOY_SETTINGS 'gmm8'): exact velocity, both references, q* by L-BFGS best of zero/aimed starts
    (no DP in 8-D), distinguishable from p* and far from the base; q* satisfies the lean-adjoint KKT (M25-M28)."""
    assert toy_settings(8) == ["linear_8d", "quad_8d", "bump_8d"]
    assert toy_settings(2) == ["linear", "quad", "bump", "bump_gap"]
    for name, n in (("linear_8d", 96), ("quad_8d", 32), ("bump_8d", 32)):  # few particles: 8-D solves are slow
        P = toy_problem(name)
        mix, v, reward, lam, ts = P["mixture"], P["base_velocity"], P["reward"], P["lam"], P["ts"]
        assert P["dim"] == 8 and mix.n_modes == 8 and not v.diagonal  # rotated covariances: the general path
        x = torch.randn(4, 8, dtype=F64, generator=_gen(40))
        torch.testing.assert_close(v(x, torch.tensor(0.6, dtype=F64)), _m38_literal(mix, x, 0.6))
        x0 = torch.randn(n, 8, dtype=F64, generator=_gen(41))
        u, xq, info = solve_optimal_controls(x0, v, reward, lam, ts)
        assert info["start_names"] == ["zero", "aimed0", "continuation"]
        assert info["converged_frac"] > 0.9
        if name == "bump_8d":  # the homotopy in lam reaches the bump for particles the zero/aimed starts leave behind
            assert info["improved_by_start"]["continuation"] >= 0.2 * n
            assert info["improved_by_start"]["continuation"] > info["improved_by_start"]["aimed0"]
        ok = info["status"] == 0
        assert _lean_adjoint_kkt(v, reward, lam, ts, x0[ok], u[ok]).max() < 1e-5
        m = 2000  # p* and base are cheap: large sets, so the floor is set by the n q* samples
        xp = sample_tilted(mix, reward, lam, m, _gen(42))
        xb = sample_euler(v, torch.randn(m, 8, dtype=F64, generator=_gen(43)), ts).final
        floor = expected_floor(xq, n, m)
        assert energy_distance(xq, xp) > 3 * floor  # the references can tell the methods apart
        assert energy_distance(xb, xq) > 3 * floor
        assert energy_distance(xb, xp) > 3 * expected_floor(xp, m, m)
        assert float(reward(xq).mean()) > float(reward(xb).mean()) + 0.3
    # q* on a finer grid (VGG-Flow's continuous-time reference) runs in 8-D too
    fine = toy_q_star_fine("linear_8d", n=16, N_fine=30)
    assert fine["q_star"].shape == (16, 8) and fine["N_fine"] == 30 and fine["q_floor"] > 0


def test_model_controls_reproduce_the_path_and_start_the_solver():
    """model_controls: open-loop controls v_theta - v_base along the model's own Euler path (M24); L-BFGS started
    there never ends worse than the model's own objective."""
    P = toy_problem("bump")
    model = make_toy_model(P["mixture"], hidden=16, dtype=F64)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=_gen(44), dtype=F64))
    x0 = torch.randn(50, 2, dtype=F64, generator=_gen(45))
    u, x_end = model_controls(model, x0, P["ts"])
    assert u.shape == (50, P["N"], 2) and u.abs().max() > 0
    torch.testing.assert_close(controlled_euler(x0, P["base_velocity"], P["ts"], u), x_end)
    torch.testing.assert_close(sample_euler(model, x0, P["ts"]).final, x_end)
    lam, ts = P["lam"], P["ts"]
    J_model = (lam * 0.5 * (u**2).sum(-1) * (ts[1:] - ts[:-1])).sum(-1) - P["reward"](x_end)
    _, _, info = solve_optimal_controls(x0, P["base_velocity"], P["reward"], lam, ts, starts=(u,))
    assert info["start_names"] == ["controls0"]
    assert (info["objective"] <= J_model + 1e-12).all() and (info["objective"] < J_model - 1e-3).any()

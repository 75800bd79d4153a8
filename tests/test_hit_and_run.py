"""Exact Hit-and-Run sampling of Gaussian transport plans (scotgm_pp.inference.hit_and_run / step)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import stats

from scotgm_pp.inference.hit_and_run import (
    _BallState,
    chord,
    coupling_geometry,
    covariance_estimation_noise,
    default_temperature,
    effective_dimension,
    run_chain,
    sample_coupling,
    truncated_exponential,
)
from scotgm_pp.inference.ot import gaussian_w2, ot_cross_covariance


def _random_cov(m: int, rng: np.random.Generator, ridge: float = 0.1) -> np.ndarray:
    A = rng.standard_normal((m, m))
    return A @ A.T / m + ridge * np.eye(m)


def _pair(m: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    return _random_cov(m, rng), _random_cov(m, rng)


def _rel(A, B) -> float:
    return float(np.linalg.norm(A - B) / np.linalg.norm(B))


# ------------------------------------------------------------------------------------------
# chord and truncated exponential
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("radius", [0.3, 0.9, 0.999])
@pytest.mark.parametrize("rank_one", [True, False])
def test_chord_endpoints_lie_on_the_unit_sphere(radius, rank_one):
    rng = np.random.default_rng(int(radius * 1000) + rank_one)
    m = 5
    for _ in range(5):
        K = rng.standard_normal((m, m))
        K *= radius / np.linalg.norm(K, 2)
        D = np.outer(rng.standard_normal(m), rng.standard_normal(m)) if rank_one else rng.standard_normal((m, m))
        t_lo, t_hi = chord(K, D)
        assert t_lo < 0 < t_hi
        for t in (t_lo, t_hi):
            assert abs(np.linalg.norm(K + t * D, 2) - 1.0) < 1e-8
            assert np.linalg.norm(K + 0.999 * t * D, 2) < 1.0
            assert np.linalg.norm(K + 1.001 * t * D, 2) > 1.0


def test_chord_of_updated_state_matches_direct_chord():
    """The O(m^2) rank-two-updated inverses give the same chords as an SVD from scratch."""
    rng = np.random.default_rng(3)
    m = 6
    S = _random_cov(m, rng)
    geom = coupling_geometry(S, 2 * S)
    state = _BallState(0.5 * geom.K_star)
    for _ in range(200):
        u, v = rng.standard_normal(m), rng.standard_normal(m)
        u /= np.linalg.norm(u)
        v /= np.linalg.norm(v)
        K_before = state.materialise().copy()
        t, t_lo, t_hi = state.step(u, v, 2.0 * u @ geom.G @ v / 0.05, 1.0 - rng.random())
        lo, hi = chord(K_before, np.outer(u, v))
        assert t_lo == pytest.approx(lo, rel=1e-6) and t_hi == pytest.approx(hi, rel=1e-6)
        assert t_lo <= t <= t_hi
    assert np.linalg.norm(state.materialise(), 2) < 1.0


def test_rank_two_skew_moves_match_direct_chord_and_inverse():
    """Skew directions Q (a b^T - b a^T) P^T: compiled chord == generic eigen-chord; inverse stays exact."""
    from scotgm_pp.inference._har_directions import DirectionMixture

    rng = np.random.default_rng(4)
    m = 5
    geom = coupling_geometry(*_pair(m, seed=4))
    dirs = DirectionMixture(geom.G, weights=(0.0, 0.5, 0.5))
    state = _BallState(0.9 * geom.K_star)
    U, V, ranks, slopes = dirs.draw(300, rng)
    assert set(ranks) == {1, 2}
    np.testing.assert_allclose(slopes, np.einsum("nli,ij,nlj->n", U, geom.G, V), rtol=1e-10, atol=1e-12)
    for j in range(300):
        D = U[j, 0][:, None] * V[j, 0] + U[j, 1][:, None] * V[j, 1]
        if ranks[j] == 2:  # skew in the SVD frame: Q^T D P is antisymmetric
            Dj = geom.Q.T @ D @ geom.Pt.T
            np.testing.assert_allclose(Dj, -Dj.T, atol=1e-12)
        K_before = state.materialise().copy()
        t, t_lo, t_hi = state.move(U[j], V[j], ranks[j], 2.0 * slopes[j] / 0.05, 1.0 - rng.random())
        lo, hi = chord(K_before, D)  # generic generalised eigenproblem: accurate to ~1e-16 cond(M)
        assert t_lo == pytest.approx(lo, rel=1e-4) and t_hi == pytest.approx(hi, rel=1e-4)
        for end in (t_lo, t_hi):  # the compiled ends lie on the unit sphere
            assert abs(np.linalg.norm(K_before + end * D, 2) - 1.0) < 1e-7
        np.testing.assert_allclose(state.materialise(), K_before + t * D, atol=1e-12)
    K = state.materialise()
    M = np.block([[np.eye(m), K], [K.T, np.eye(m)]])
    np.testing.assert_allclose(state.Minv, np.linalg.inv(M), rtol=1e-6, atol=1e-6 * np.abs(state.Minv).max())


def test_chord_rejects_bad_input():
    K = np.zeros((3, 3))
    with pytest.raises(ValueError, match="strictly inside"):
        chord(np.eye(3), np.ones((3, 3)))
    with pytest.raises(ValueError, match="same shape"):
        chord(K, np.ones((3, 2)))
    with pytest.raises(ValueError, match="zero"):
        chord(K, np.zeros((3, 3)))


@pytest.mark.parametrize("rate", [-40.0, -1e-15, 0.0, 2.5, 1e4])
def test_truncated_exponential_matches_its_cdf(rate):
    lo, hi = -0.3, 0.7
    rng = np.random.default_rng(5)
    draws = np.array([truncated_exponential(rate, lo, hi, rng) for _ in range(3000)])
    assert np.all((draws >= lo) & (draws <= hi))
    if abs(rate) * (hi - lo) < 1e-12:
        cdf = lambda x: (x - lo) / (hi - lo)  # noqa: E731
    elif rate > 0:  # written from the top end, so that exp never overflows
        cdf = lambda x: np.exp(rate * (x - hi)) * np.expm1(-rate * (x - lo)) / np.expm1(-rate * (hi - lo))  # noqa: E731
    else:
        cdf = lambda x: np.expm1(rate * (x - lo)) / np.expm1(rate * (hi - lo))  # noqa: E731
    assert stats.kstest(draws, cdf).pvalue > 0.01


def test_truncated_exponential_is_stable_at_extreme_rates():
    rng = np.random.default_rng(0)
    assert truncated_exponential(1e300, 0.0, 1.0, rng) == pytest.approx(1.0)
    assert truncated_exponential(-1e300, 0.0, 1.0, rng) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        truncated_exponential(1.0, 1.0, 0.0, rng)


# ------------------------------------------------------------------------------------------
# the chain targets the right distribution
# ------------------------------------------------------------------------------------------
def _rejection_sample(G: np.ndarray, eps: float, n: int, rng) -> np.ndarray:
    """Exact draws from exp(2 <K, G> / eps) on the 2x2 spectral ball: uniform box proposals."""
    s_sum = np.linalg.svd(G, compute_uv=False).sum()
    K = rng.uniform(-1, 1, size=(n, 2, 2))
    fro2 = np.sum(K**2, axis=(1, 2))
    det = K[:, 0, 0] * K[:, 1, 1] - K[:, 0, 1] * K[:, 1, 0]
    top2 = 0.5 * (fro2 + np.sqrt(np.maximum(fro2**2 - 4 * det**2, 0.0)))
    logp = 2.0 * (np.einsum("nij,ij->n", K, G) - s_sum) / eps
    keep = (top2 < 1.0) & (np.log(rng.random(n)) < logp)
    return K[keep]


def test_chain_matches_exact_rejection_sampler_in_2x2():
    Sx, Sy = _pair(2, seed=7)
    geom = coupling_geometry(Sx, Sy)
    eps = 0.5 * geom.singular_values.sum()
    exact = _rejection_sample(geom.G, eps, 600_000, np.random.default_rng(11))
    assert len(exact) > 3000
    out = run_chain(geom.G, eps, np.zeros((2, 2)), n_steps=120_000, burn_in=1000, thin=40,
                    rng=np.random.default_rng(12), store_draws=True)
    chain = out.K_draws
    cost_exact = geom.cost(np.einsum("nij,ij->n", exact, geom.G))
    assert stats.ks_2samp(geom.cost(out.inner_draws), cost_exact).pvalue > 0.01
    for i, j in [(0, 0), (1, 0)]:
        assert stats.ks_2samp(chain[:, i, j], exact[:, i, j]).pvalue > 0.01


def test_low_temperature_recovers_the_ot_coupling_m10():
    """Default temperature (mean excess cost 1% of the independent-vs-OT gap), default starts and
    settings, the call ``scotgm_pp.tl`` makes: within 5% of the OT cross-covariance, converged."""
    Sx, Sy = _pair(10)
    res = sample_coupling(Sx, Sy, return_idata=False, random_state=3)
    C_star = ot_cross_covariance(Sx, Sy)
    assert _rel(res.cross_covariance, C_star) < 0.05
    assert res.rhat < 1.05 and res.ess > 100
    # the excess cost over W2^2 is ~Gamma(d_eff, eps): mean d_eff * eps
    excess = res.cost_draws.mean() - gaussian_w2(np.zeros(10), Sx, np.zeros(10), Sy)
    assert excess == pytest.approx(effective_dimension(res.sampled_rank) * res.temperature, rel=0.15)


def test_pipeline_call_at_m40_is_converged_and_quiet():
    """The call scotgm_pp.tl makes (cell counts given, defaults): no warning, diagnostics fine."""
    Sx, Sy = _pair(40, seed=5)
    rng = np.random.default_rng(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        res = sample_coupling(Sx, Sy, mu_x=rng.standard_normal(40), mu_y=rng.standard_normal(40), n_x=250.0,
                              n_y=180.0, random_state=7, return_idata=False)
    assert res.sampled_rank == 6 and res.cost_draws.shape[0] == 4
    assert res.rhat < 1.05 and res.ess > 100
    assert _rel(res.cross_covariance, ot_cross_covariance(Sx, Sy)) < 0.05


def test_adapted_directions_mix_faster_than_isotropic():
    """Same budget, same starts: the adapted mixture has a far larger ESS of the transport cost."""
    Sx, Sy = _pair(6, seed=2)
    kw = dict(n_steps=6000, burn_in=2000, n_chains=2, return_idata=False, random_state=1)
    with pytest.warns(RuntimeWarning):  # the isotropic kernel has not converged: it says so
        iso = sample_coupling(Sx, Sy, directions="isotropic", **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a short budget on purpose
        ada = sample_coupling(Sx, Sy, directions="adapted", **kw)
    assert ada.ess > 4 * iso.ess
    assert ada.rhat < iso.rhat


def test_reduced_rank_fixes_trailing_directions_at_the_ot_plan():
    """max_rank = r: K = Q diag(J_r, I) P^T with J_r sampled from the r x r problem of the leading s."""
    m, r = 8, 3
    Sx, Sy = _pair(m, seed=6)
    geom = coupling_geometry(Sx, Sy)
    eps = default_temperature(Sx, Sy)
    res = sample_coupling(Sx, Sy, temperature=eps, max_rank=r, n_steps=8000, return_idata=False, random_state=2)
    J = geom.Q.T @ res.K_mean @ geom.Pt.T
    np.testing.assert_allclose(J[r:, r:], np.eye(m - r), atol=1e-12)
    np.testing.assert_allclose(J[:r, r:], 0.0, atol=1e-12)
    np.testing.assert_allclose(J[r:, :r], 0.0, atol=1e-12)
    # the cost is exact: the trailing block contributes its optimal share; the excess is Gamma(d_eff(r), eps)
    excess = res.cost_draws.mean() - res.w2_squared
    assert excess == pytest.approx(effective_dimension(r) * eps, rel=0.15)
    assert np.all(res.cost_draws >= res.w2_squared)


@pytest.mark.filterwarnings("ignore:Hit-and-Run chains have not converged")
def test_high_temperature_gives_the_independent_coupling():
    Sx, Sy = _pair(3)
    res = sample_coupling(Sx, Sy, temperature=1e6, n_chains=2, n_steps=20_000, burn_in=500,
                          return_idata=False)
    C_star = ot_cross_covariance(Sx, Sy)
    assert np.linalg.norm(res.cross_covariance) / np.linalg.norm(C_star) < 0.1


@pytest.fixture(scope="module")
def converged_m3():
    Sx, Sy = _pair(3, seed=2)
    return Sx, Sy, sample_coupling(Sx, Sy, n_steps=20_000, burn_in=10_000, random_state=4)


def test_rhat_and_ess_on_a_converged_case(converged_m3):
    Sx, Sy, res = converged_m3
    assert res.rhat < 1.01
    assert res.ess > 400
    assert res.idata.posterior["transport_cost"].dims == ("chain", "draw")
    assert res.cost_draws.shape == (4, 1000)
    assert np.all(res.step_stats["n_reprojections"] == 0)
    assert np.all(res.step_stats["max_refresh_drift"] < 1e-5)  # round-off bound tol = 1e-6 (BallState)
    # default temperature: mean excess cost = d_eff * eps = 1% of the independent-vs-OT gap
    gap = 2 * coupling_geometry(Sx, Sy).singular_values.sum()
    assert res.cost_draws.mean() - res.w2_squared == pytest.approx(0.01 * gap, rel=0.1)


def test_same_seed_same_result():
    Sx, Sy = _pair(4)
    kw = dict(n_steps=1000, burn_in=500, n_chains=2, return_idata=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # short on purpose
        a = sample_coupling(Sx, Sy, random_state=9, **kw)
        b = sample_coupling(Sx, Sy, random_state=9, **kw)
        c = sample_coupling(Sx, Sy, random_state=10, **kw)
    np.testing.assert_array_equal(a.cost_draws, b.cost_draws)
    np.testing.assert_array_equal(a.cross_covariance, b.cross_covariance)
    assert not np.array_equal(a.cost_draws, c.cost_draws)


@pytest.mark.filterwarnings("ignore:Hit-and-Run chains have not converged")
def test_store_cross_covariance_draws_in_idata():
    Sx, Sy = _pair(3)
    res = sample_coupling(Sx, Sy, n_steps=2000, burn_in=500, thin=20, n_chains=2, store_cross_covariance=True)
    C = res.idata.posterior["cross_covariance"]
    assert C.dims == ("chain", "draw", "pc", "pc_target") and C.shape == (2, 100, 3, 3)


# ------------------------------------------------------------------------------------------
# temperature and input checks
# ------------------------------------------------------------------------------------------
def test_estimation_noise_matches_simulated_plugin_error():
    rng = np.random.default_rng(0)
    m, n = 4, 300
    Sx, Sy = _pair(m, seed=5)
    truth = gaussian_w2(np.zeros(m), Sx, np.zeros(m), Sy)
    Lx, Ly = np.linalg.cholesky(Sx), np.linalg.cholesky(Sy)
    errs = []
    for _ in range(300):
        X = rng.standard_normal((n, m)) @ Lx.T
        Y = rng.standard_normal((n, m)) @ Ly.T
        errs.append(gaussian_w2(np.zeros(m), np.cov(X.T), np.zeros(m), np.cov(Y.T)) - truth)
    rmse = np.sqrt(np.mean(np.square(errs)))
    assert covariance_estimation_noise(Sx, Sy, n, n) == pytest.approx(rmse, rel=0.3)
    eps_cells = default_temperature(Sx, Sy, n_x=n, n_y=n)
    assert eps_cells * effective_dimension(m) == pytest.approx(covariance_estimation_noise(Sx, Sy, n, n))


@pytest.mark.parametrize(
    ("Sx", "Sy", "match"),
    [
        (np.ones((2, 3)), np.eye(2), "square"),
        (np.eye(2), np.eye(3), "same shape"),
        (np.array([[1.0, np.nan], [np.nan, 1.0]]), np.eye(2), "non-finite"),
        (np.diag([1.0, -1.0]), np.eye(2), "positive semi-definite"),
        (np.array([[1.0, 0.5], [0.0, 1.0]]), np.eye(2), "symmetric"),
    ],
)
def test_bad_covariances_are_rejected(Sx, Sy, match):
    with pytest.raises(ValueError, match=match):
        sample_coupling(Sx, Sy, n_steps=10)


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="temperature"):
        sample_coupling(np.eye(2), np.eye(2), temperature=-1.0, n_steps=10)
    with pytest.raises(ValueError, match="n_steps"):
        sample_coupling(np.eye(2), np.eye(2), n_steps=0)
    with pytest.raises(ValueError, match="mu_x"):
        sample_coupling(np.eye(2), np.eye(2), mu_x=np.zeros(3), n_steps=10)
    with pytest.raises(ValueError, match="n_x and n_y"):
        default_temperature(np.eye(2), np.eye(2), n_x=10)


# ------------------------------------------------------------------------------------------
# the PyMC step method
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pymc_run():
    pm = pytest.importorskip("pymc")
    import pymc.pytensorf
    import pytensor.gradient

    from scotgm_pp.inference.step import HitAndRun, build_coupling_model, dispersed_initvals

    Sx, Sy = _pair(2, seed=8)
    eps = 0.3
    model = build_coupling_model(Sx, Sy, eps)
    real_grad = pytensor.gradient.grad

    def no_grad(*args, **kwargs):  # pm.sample must not differentiate anything
        raise AssertionError("a gradient was requested")

    # the two references pm.sample and model.dlogp go through
    pytensor.gradient.grad = pymc.pytensorf.grad = no_grad
    try:
        with model:
            step = HitAndRun([model["K"]], Sx=Sx, Sy=Sy, temperature=eps, steps_per_draw=5)
            idata = pm.sample(draws=1000, tune=200, chains=2, cores=1, step=step, random_seed=1,
                              initvals=dispersed_initvals(model, 2), progressbar=False,
                              compute_convergence_checks=False)
    finally:
        pytensor.gradient.grad = pymc.pytensorf.grad = real_grad
    return Sx, Sy, eps, model, idata


def test_hit_and_run_step_inside_pm_sample(pymc_run):
    import arviz as az

    Sx, Sy, eps, model, idata = pymc_run
    post = idata.posterior
    assert post["K"].shape == (2, 1000, 2, 2)
    assert post["K"].dims == ("chain", "draw", "pc", "pc_target")
    assert {"chord_length", "step_size", "transport_cost"} <= set(idata.sample_stats.data_vars)
    assert float(az.rhat(idata, var_names=["transport_cost"])["transport_cost"]) < 1.02
    norms = np.linalg.norm(post["K"].values.reshape(-1, 2, 2), ord=2, axis=(1, 2))
    assert norms.max() < 1.0
    # the model's own deterministic agrees with the step's stat
    np.testing.assert_allclose(post["transport_cost"].values, idata.sample_stats["transport_cost"].values)


def test_pm_sample_agrees_with_sample_coupling(pymc_run):
    import arviz as az

    Sx, Sy, eps, model, idata = pymc_run
    ref = sample_coupling(Sx, Sy, temperature=eps, n_steps=20_000, burn_in=1000, n_chains=2, random_state=2)
    cost = idata.posterior["transport_cost"].values
    se = np.sqrt(cost.var() / float(az.ess(cost)) + ref.cost_draws.var() / ref.ess)
    assert abs(cost.mean() - ref.cost_draws.mean()) < 4 * se


def test_hit_and_run_refuses_a_different_target(pymc_run):
    from scotgm_pp.inference.step import HitAndRun

    Sx, Sy, eps, model, _ = pymc_run
    with model, pytest.raises(ValueError, match="differ"):
        HitAndRun([model["K"]], Sx=Sx, Sy=2 * Sy, temperature=eps)
    with model:
        step = HitAndRun([model["K"]])  # reads G and the temperature from the model
    np.testing.assert_allclose(step.G, coupling_geometry(Sx, Sy).G)
    assert step.temperature == eps

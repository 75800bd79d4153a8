"""Sampling transport plans (scotgm_pp.inference.hit_and_run, its kernels, and the PyMC step)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

import scotgm_pp
from scotgm_pp.inference import _har_rotations as hr
from scotgm_pp.inference import _har_spectral as hsp
from scotgm_pp.inference._har_diagnostics import (
    ess_bulk,
    ess_tail,
    rank_normalized_rhat,
)
from scotgm_pp.inference._har_temperature import _inverse_factor, _inverse_wishart_sqrt
from scotgm_pp.inference.hit_and_run import (
    ESS_MIN,
    RHAT_MAX,
    SweepMoves,
    _BallState,
    chord,
    coupling_geometry,
    default_temperature,
    effective_dimension,
    plan_regret_draws,
    run_chain,
    sample_coupling,
    truncated_exponential,
)
from scotgm_pp.inference.ot import ot_cross_covariance


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
    """The O(m^2) Woodbury-updated inverses give the same chords as an SVD from scratch."""
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
        np.testing.assert_allclose(state.materialise(), K_before + t * np.outer(u, v), atol=1e-12)
    assert np.linalg.norm(state.materialise(), 2) < 1.0


def test_chords_are_exact_at_the_default_temperature(chain_m20):
    """Near the boundary (a chain's state at the default temperature, m = 20) the updated inverses
    still give chords within 1e-6 (relative) of chords recomputed from an SVD."""
    s, eps, J = chain_m20
    rng = np.random.default_rng(5)
    state = _BallState(J)
    assert 1.0 - np.linalg.norm(J, 2) < 1e-2  # genuinely close to the boundary
    for it in range(40):
        if it % 2:
            u = v = np.eye(s.size)[rng.integers(s.size)]
        else:
            u, v = rng.standard_normal(s.size), rng.standard_normal(s.size)
            u, v = u / np.linalg.norm(u), v / np.linalg.norm(v)
        K_before = state.materialise().copy()
        _, t_lo, t_hi = state.step(u, v, 2.0 * (s @ (u * v)) / eps, 1.0 - rng.random())
        lo, hi = chord(K_before, np.outer(u, v))
        assert t_lo == pytest.approx(lo, rel=1e-6) and t_hi == pytest.approx(hi, rel=1e-6)


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
        cdf = lambda x: (x - lo) / (hi - lo)
    elif rate > 0:  # written from the top end, so that exp never overflows
        cdf = lambda x: np.exp(rate * (x - hi)) * np.expm1(-rate * (x - lo)) / np.expm1(-rate * (hi - lo))
    else:
        cdf = lambda x: np.expm1(rate * (x - lo)) / np.expm1(rate * (hi - lo))
    assert stats.kstest(draws, cdf).pvalue > 0.01


def test_truncated_exponential_is_stable_at_extreme_rates():
    rng = np.random.default_rng(0)
    assert truncated_exponential(1e300, 0.0, 1.0, rng) == pytest.approx(1.0)
    assert truncated_exponential(-1e300, 0.0, 1.0, rng) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        truncated_exponential(1.0, 1.0, 0.0, rng)


@pytest.mark.parametrize("kappa", [0.0, 3e-6, 0.7, 8.0, 650.0, 5e3, 1e9])
def test_von_mises_draws_match_the_von_mises_law(kappa):
    """All three branches (uniform, Best-Fisher, half-normal rejection) against scipy's CDF."""
    rng = np.random.default_rng(int(kappa) + 1)
    x = np.array([hr.von_mises(rng, kappa) for _ in range(4000)])
    assert np.all(np.abs(x) <= np.pi)
    if kappa == 0.0:
        assert stats.kstest(x, stats.uniform(-np.pi, 2 * np.pi).cdf).pvalue > 0.01
    elif kappa >= 5e3:  # scipy's CDF loses accuracy here: compare the scaled angle with its normal limit
        z = x * np.sqrt(kappa)
        assert stats.kstest(z, "norm").pvalue > 0.01
    else:
        assert stats.kstest(x, stats.vonmises(kappa).cdf).pvalue > 0.01


# ------------------------------------------------------------------------------------------
# every move leaves the target invariant (2 x 2, against exact rejection draws)
# ------------------------------------------------------------------------------------------
def _rejection_sample(s: np.ndarray, eps: float, n: int, rng) -> np.ndarray:
    """Exact draws from exp(2 <J, diag(s)> / eps) on the 2x2 spectral ball: uniform box proposals."""
    J = rng.uniform(-1, 1, size=(n, 2, 2))
    fro2 = np.sum(J**2, axis=(1, 2))
    det = J[:, 0, 0] * J[:, 1, 1] - J[:, 0, 1] * J[:, 1, 0]
    top2 = 0.5 * (fro2 + np.sqrt(np.maximum(fro2**2 - 4 * det**2, 0.0)))
    logp = 2.0 * (J[:, 0, 0] * s[0] + J[:, 1, 1] * s[1] - s.sum()) / eps
    keep = (top2 < 1.0) & (np.log(rng.random(n)) < logp)
    return J[keep]


@pytest.fixture(scope="module")
def exact_2x2():
    """Two independent exact samples (s = (1, 0.4), eps = 0.8)."""
    s = np.array([1.0, 0.4])
    eps = 0.8
    a = _rejection_sample(s, eps, 2_000_000, np.random.default_rng(11))
    b = _rejection_sample(s, eps, 2_000_000, np.random.default_rng(12))
    assert min(len(a), len(b)) > 20_000
    return s, eps, a, b


def _same_law(a: np.ndarray, b: np.ndarray, s: np.ndarray) -> None:
    """Two samples of 2 x 2 plans agree: cost, two entries, the largest singular value (KS)."""
    for f in (lambda J: J[:, 0, 0] * s[0] + J[:, 1, 1] * s[1], lambda J: J[:, 0, 0], lambda J: J[:, 1, 0],
              lambda J: np.linalg.norm(J, 2, axis=(1, 2))):
        assert stats.ks_2samp(f(a), f(b)).pvalue > 1e-3


@pytest.mark.parametrize("family", ["rows", "cols", "conj", "twist"])
def test_each_rotation_move_preserves_the_target(exact_2x2, family):
    s, eps, draws, reference = exact_2x2
    code = SweepMoves(rotations=(family,)).family_codes[0]
    rng = np.random.default_rng(1)
    moved = draws.copy()
    for J in moved:
        hr.rotation_move(J, s, 2.0 / eps, 0, 1, code, rng)
    assert np.abs(moved - draws).max() > 0.5  # the move does move
    _same_law(moved, reference, s)


def test_breathing_move_preserves_the_target(exact_2x2):
    s, eps, draws, reference = exact_2x2
    rng = np.random.default_rng(2)
    moved = draws.copy()
    acc = np.zeros(16)
    for J in moved:
        hsp.spectral_moves(J, s, 2.0 / eps, rng, acc, 1.0, True, False)
    assert np.abs(moved - draws).max() > 0.1
    _same_law(moved, reference, s)


def test_singular_value_updates_preserve_the_target(exact_2x2):
    s, eps, draws, reference = exact_2x2
    rng = np.random.default_rng(3)
    moved = draws.copy()
    acc = np.zeros(16)
    for J in moved:
        hsp.spectral_moves(J, s, 2.0 / eps, rng, acc, 1.0, False, True)
    assert np.abs(moved - draws).max() > 0.5
    assert np.mean(np.linalg.det(moved) < 0) > 0.01  # signs change: the determinant can cross zero
    _same_law(moved, reference, s)


@pytest.mark.parametrize("moves", [SweepMoves(), SweepMoves(rotations=("rows", "cols"), coordinate=True, singular=False)],
                         ids=["default", "coordinate-line-moves"])
def test_chain_matches_exact_rejection_sampler_in_2x2(exact_2x2, moves):
    s, eps, exact, _ = exact_2x2
    out = run_chain(s, eps, np.zeros((2, 2)), n_steps=20_000, burn_in=100, thin=2, rng=np.random.default_rng(12),
                    moves=moves, store_draws=True)
    _same_law(out.J_draws, exact, s)


# ------------------------------------------------------------------------------------------
# the default sampler at m >= 10: limits, temperature, diagnostics
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pair_m10():
    return _pair(10, seed=2)


@pytest.fixture(scope="module")
def default_m10(pair_m10):
    """The default call (no cell counts: 100 each) at m = 10, with more steps for a sharper mean."""
    Sx, Sy = pair_m10
    return sample_coupling(Sx, Sy, n_steps=4000, random_state=3)


@pytest.fixture(scope="module")
def chain_m20():
    Sx, Sy = _pair(20, seed=4)
    geom = coupling_geometry(Sx, Sy)
    eps = default_temperature(Sx, Sy, n_x=300, n_y=300)
    out = run_chain(geom.singular_values, eps, 0.9 * np.eye(20), n_steps=50, burn_in=50, thin=50,
                    rng=np.random.default_rng(0))
    return geom.singular_values, eps, out.J_last


def test_high_temperature_gives_the_independent_coupling(pair_m10):
    Sx, Sy = pair_m10
    res = sample_coupling(Sx, Sy, temperature=1e6, return_idata=False, random_state=1)
    assert np.linalg.norm(res.cross_covariance) / np.linalg.norm(ot_cross_covariance(Sx, Sy)) < 0.1
    assert res.converged


def test_low_temperature_recovers_the_ot_coupling(pair_m10):
    Sx, Sy = pair_m10
    res = sample_coupling(Sx, Sy, temperature=1e-3, return_idata=False, random_state=1)
    assert _rel(res.cross_covariance, ot_cross_covariance(Sx, Sy)) < 0.05
    assert res.converged
    # the excess cost over W2^2 is ~Gamma(d_eff, eps) at low temperature: mean d_eff * eps
    excess = res.cost_draws.mean() - res.w2_squared
    assert excess == pytest.approx(effective_dimension(10) * 1e-3, rel=0.05)


def test_default_result_is_not_the_closed_form(default_m10, pair_m10):
    """At the default temperature the posterior-mean C is further from C* than its Monte-Carlo error."""
    res = default_m10
    C_star = ot_cross_covariance(*pair_m10)
    draws = res.idata.posterior["cross_covariance"].values
    mc_error = np.sqrt(np.sum(draws.var(axis=(0, 1)) / res.diagnostics.ess_bulk))  # Frobenius
    assert np.linalg.norm(res.cross_covariance - C_star) > 2.0 * mc_error
    # sharper, through the linear cost: the mean plan costs more than W2^2 by far more than its error
    excess = res.cost_draws.mean() - res.w2_squared
    assert excess > 20 * res.cost_draws.std() / np.sqrt(res.ess)


def test_default_temperature_matches_the_expected_plan_regret(default_m10):
    """The property the default temperature promises: sampled plans exceed W2^2, on average, by the
    expected regret of the OT plans of posterior covariance draws (within 5%)."""
    res = default_m10
    excess = res.cost_draws.mean() - res.w2_squared
    assert res.settings["temperature_rule"] == "plan regret, n_x=100, n_y=100"
    assert excess == pytest.approx(res.settings["expected_regret"], rel=0.05)
    assert res.settings["expected_regret_se"] < 0.05 * res.settings["expected_regret"]


def test_plan_regret_shrinks_like_one_over_cells(pair_m10):
    Sx, Sy = pair_m10
    r100 = plan_regret_draws(Sx, Sy, 100, 100, random_state=0).mean()
    r400 = plan_regret_draws(Sx, Sy, 400, 400, random_state=0).mean()
    assert r100 / r400 == pytest.approx(4.0, rel=0.15)
    assert default_temperature(Sx, Sy, n_x=100, n_y=100) == pytest.approx(r100 / effective_dimension(10))


def test_inverse_wishart_posterior_is_centred_on_the_estimate():
    """IW(n + m + 2, (n + 1) S) has mean S: the square roots drawn square back to S on average."""
    rng = np.random.default_rng(0)
    S = _random_cov(3, rng)
    n = 20.0
    B = _inverse_factor((n + 1) * S, "S")
    draws = [L @ L for L in (_inverse_wishart_sqrt(B, n + 3 + 2, rng) for _ in range(20_000))]
    np.testing.assert_allclose(np.mean(draws, axis=0), S, atol=0.02 * np.abs(S).max())


def test_diagnostics_on_the_entries_of_C_are_stored(default_m10):
    res = default_m10
    d = res.diagnostics
    assert d.rhat.shape == (10, 10) and d.ess_bulk.shape == (10, 10) and d.ess_tail.shape == (10, 10)
    assert d.rhat_max <= RHAT_MAX and d.ess_bulk_min >= ESS_MIN and d.ess_tail_min >= ESS_MIN
    assert d.rhat_max == pytest.approx(d.rhat.max()) and d.ess_bulk_min == pytest.approx(d.ess_bulk.min())
    assert res.sampled_rank == 10 and res.converged
    post = res.idata.posterior
    assert post["cross_covariance"].dims == ("chain", "draw", "pc", "pc_target")
    assert post["cross_covariance"].shape == (4, 500, 10, 10)
    attrs = res.idata.attrs
    assert attrs["rhat_max_cross_cov"] == pytest.approx(d.rhat_max) and attrs["sampled_rank"] == 10
    rec = res.summary()
    for key in ("sampled_rank", "n_steps", "burn_in", "n_chains", "rhat_max_cross_cov", "ess_bulk_min_cross_cov",
                "ess_tail_min_cross_cov", "converged", "rhat", "ess", "cost_mean", "cost_sd", "temperature"):
        assert key in rec
    assert rec["n_steps"] == 4000 and rec["n_chains"] == 4 and rec["converged"] is True


def test_vectorised_diagnostics_equal_arviz():
    import arviz as az
    import xarray as xr

    rng = np.random.default_rng(0)
    X = np.zeros((4, 301, 6))
    for t in range(1, 301):  # AR(1) chains, a slow one, a tied one and a constant one
        X[:, t] = [0.0, 0.5, 0.95, 0.99, 0.3, 0.0] * X[:, t - 1] + rng.standard_normal((4, 6))
    X[:, :, 4] = np.round(X[:, :, 4])
    X[:, :, 5] = 2.0
    ds = xr.Dataset({"x": (("chain", "draw", "v"), X)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # 0 / 0 for the constant variable, in both
        ref = [az.rhat(ds)["x"].values, az.ess(ds)["x"].values, az.ess(ds, method="tail", prob=(0.05, 0.95))["x"].values]
        ours = [rank_normalized_rhat(X), ess_bulk(X), ess_tail(X)]
    for a, b in zip(ref, ours):
        np.testing.assert_allclose(b, a, rtol=1e-10, equal_nan=True)


def test_unconverged_chains_warn_and_say_what_failed(pair_m10):
    Sx, Sy = pair_m10
    with pytest.warns(RuntimeWarning, match="Hit-and-Run chains have not converged: .*ESS"):
        res = sample_coupling(Sx, Sy, n_steps=40, burn_in=0, return_idata=False)
    assert not res.converged and res.diagnostics.failures()


def test_same_seed_same_result():
    Sx, Sy = _pair(4)
    kw = {"n_steps": 60, "n_chains": 2, "return_idata": False, "warn": False}
    a = sample_coupling(Sx, Sy, random_state=9, **kw)
    b = sample_coupling(Sx, Sy, random_state=9, **kw)
    c = sample_coupling(Sx, Sy, random_state=10, **kw)
    np.testing.assert_array_equal(a.cost_draws, b.cost_draws)
    np.testing.assert_array_equal(a.cross_covariance, b.cross_covariance)
    assert a.temperature == b.temperature
    assert not np.array_equal(a.cost_draws, c.cost_draws)


def test_annealed_burn_in_brings_far_starts_to_the_target():
    """Cold target (eps = 1e-5, m = 20), dispersed starts (one near the costliest plan), a burn-in of
    60 steps: with the default annealing every chain starts its kept steps at the target's excess
    cost (Gamma(d_eff, eps): mean d_eff eps).  Without it, chains linger in states with reversed
    singular directions (measured: 20 of 20 seeds had such a chain)."""
    Sx, Sy = _pair(20, seed=1)
    for seed in range(3):
        res = sample_coupling(Sx, Sy, temperature=1e-5, random_state=seed, n_steps=40, burn_in=60, thin=1,
                              return_idata=False, warn=False)
        per_chain = (res.cost_draws.mean(axis=1) - res.w2_squared) / (effective_dimension(20) * 1e-5)
        np.testing.assert_allclose(per_chain, 1.0, atol=0.1)
        assert res.settings["anneal_from"] > 1e-5


def test_initial_plans_and_local_starts_reach_the_same_target():
    Sx, Sy = _pair(3, seed=5)
    geom = coupling_geometry(Sx, Sy)
    kw = {"temperature": 0.05, "n_chains": 2, "return_idata": False}
    ref = sample_coupling(Sx, Sy, random_state=1, **kw)
    far = sample_coupling(Sx, Sy, initial_plans=[-0.99 * geom.K_star, 0.99 * geom.K_star], random_state=2, **kw)
    local = sample_coupling(Sx, Sy, start="local", random_state=3, **kw)
    assert far.settings["start"] == "initial_plans" and local.settings["start"] == "local"
    for res in (far, local):
        assert res.converged
        np.testing.assert_allclose(res.cross_covariance, ref.cross_covariance, atol=0.02 * np.abs(ref.cross_covariance).max())
    with pytest.raises(ValueError, match="initial_plans has 1 entries"):
        sample_coupling(Sx, Sy, initial_plans=[geom.K_star * 0.5], n_chains=2, n_steps=10)
    with pytest.raises(ValueError, match="strictly inside"):
        sample_coupling(Sx, Sy, initial_plans=[geom.K_star] * 2, n_chains=2, n_steps=10)


def test_isotropic_hit_and_run_is_available_as_a_baseline_and_mixes_worse(pair_m10):
    """Plain rank-one Hit-and-Run (the original kernel) at the same number of steps: far smaller ESS."""
    Sx, Sy = pair_m10
    iso = SweepMoves(rotations=(), n_isotropic=20, breathing=False, singular=False)
    kw = {"temperature": 1e-3, "n_steps": 400, "random_state": 0, "return_idata": False, "warn": False}
    base = sample_coupling(Sx, Sy, moves=iso, **kw)
    ours = sample_coupling(Sx, Sy, **kw)
    assert base.diagnostics.ess_bulk_min < 0.1 * ours.diagnostics.ess_bulk_min
    assert base.diagnostics.rhat_max > 1.1


def test_compiled_kernels_are_not_cached_inside_the_package():
    from scotgm_pp.inference._har_cache import enable_kernel_cache, kernel_cache_dir

    package = Path(scotgm_pp.__file__).resolve().parent
    assert package not in kernel_cache_dir().resolve().parents
    if enable_kernel_cache():
        assert not list(package.rglob("*.nbi")) and not list(package.rglob("*.nbc"))


# ------------------------------------------------------------------------------------------
# input checks
# ------------------------------------------------------------------------------------------
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
    with pytest.raises(ValueError, match="singular"):
        default_temperature(np.diag([1.0, 0.0]), np.eye(2))
    with pytest.raises(ValueError, match="unknown rotation"):
        SweepMoves(rotations=("spin",))
    with pytest.raises(ValueError, match="start"):
        sample_coupling(np.eye(2), np.eye(2), start="far", n_steps=10)


# ------------------------------------------------------------------------------------------
# the PyMC step method
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pymc_run():
    pm = pytest.importorskip("pymc")
    import pymc.pytensorf
    import pytensor.gradient

    from scotgm_pp.inference.step import (
        HitAndRun,
        build_coupling_model,
        dispersed_initvals,
    )

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
            step = HitAndRun([model["K"]], Sx=Sx, Sy=Sy, temperature=eps, steps_per_draw=1)
            idata = pm.sample(draws=1000, tune=200, chains=2, cores=1, step=step, random_seed=1,
                              initvals=dispersed_initvals(model, 2), progressbar=False,
                              compute_convergence_checks=False)
    finally:
        pytensor.gradient.grad = pymc.pytensorf.grad = real_grad
    return Sx, Sy, eps, model, idata


def test_hit_and_run_step_inside_pm_sample(pymc_run):
    import arviz as az

    idata = pymc_run[-1]
    post = idata.posterior
    assert post["K"].shape == (2, 1000, 2, 2)
    assert post["K"].dims == ("chain", "draw", "pc", "pc_target")
    assert {"chord_length", "step_size", "transport_cost"} <= set(idata.sample_stats.data_vars)
    assert float(az.rhat(idata, var_names=["transport_cost"])["transport_cost"]) < 1.01
    assert float(az.rhat(idata, var_names=["cross_covariance"])["cross_covariance"].max()) < 1.01
    norms = np.linalg.norm(post["K"].values.reshape(-1, 2, 2), ord=2, axis=(1, 2))
    assert norms.max() < 1.0
    # the model's own deterministic agrees with the step's stat
    np.testing.assert_allclose(post["transport_cost"].values, idata.sample_stats["transport_cost"].values)


def test_pm_sample_agrees_with_sample_coupling(pymc_run):
    import arviz as az

    Sx, Sy, eps, _, idata = pymc_run
    ref = sample_coupling(Sx, Sy, temperature=eps, n_steps=4000, n_chains=2, random_state=2)
    cost = idata.posterior["transport_cost"].values
    se = math.sqrt(cost.var() / float(az.ess(cost)) + ref.cost_draws.var() / ref.ess)
    assert abs(cost.mean() - ref.cost_draws.mean()) < 4 * se
    C = idata.posterior["cross_covariance"].values.mean(axis=(0, 1))
    np.testing.assert_allclose(C, ref.cross_covariance, atol=0.05 * np.abs(ref.cross_covariance).max())


def test_hit_and_run_refuses_a_different_target(pymc_run):
    from scotgm_pp.inference.step import HitAndRun

    Sx, Sy, eps, model, _ = pymc_run
    with model, pytest.raises(ValueError, match="differ"):
        HitAndRun([model["K"]], Sx=Sx, Sy=2 * Sy, temperature=eps)
    with model:
        step = HitAndRun([model["K"]])  # reads G and the temperature from the model
    np.testing.assert_allclose(step.G, coupling_geometry(Sx, Sy).G)
    assert step.temperature == eps

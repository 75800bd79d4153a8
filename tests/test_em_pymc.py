"""EM and the PyMC graph are one model: same log density, EM climbs it, EM stops where its gradient is 0.

Compiled PyMC functions are built once per module (module-scoped fixtures).
"""

from __future__ import annotations

import warnings

import numpy as np
import pymc as pm
import pytest

from scotgm_pp.inference.em import _m_step, default_prior, fit_em, log_density
from scotgm_pp.models import build_model, model_point

pytestmark = pytest.mark.slow


def _semi_supervised(rng, n_ctrl=150, n_guide=150, d=3):
    X_ctrl = rng.normal(0.0, 1.0, (n_ctrl, d))
    perturbed = rng.random(n_guide) < 0.6
    X_guide = rng.normal(0.0, 1.0, (n_guide, d))
    X_guide[perturbed] = rng.normal(0.0, 0.7, (perturbed.sum(), d)) + 2.0
    X = np.vstack([X_ctrl, X_guide])
    fixed = np.r_[np.zeros(n_ctrl, int), -np.ones(n_guide, int)]
    return X, fixed


@pytest.fixture(scope="module")
def semi():
    X, fixed = _semi_supervised(np.random.default_rng(0))
    model = build_model(X, fixed_state=fixed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logp = model.compile_logp(jacobian=False)
    return X, fixed, model, logp


@pytest.fixture(scope="module")
def unsup():
    rng = np.random.default_rng(1)
    X = np.vstack([rng.normal(-2.0, 1.0, (150, 2)), rng.normal(2.0, 1.0, (150, 2))])
    model = build_model(X)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logp = model.compile_logp(jacobian=False)
        dlogp = model.compile_dlogp(jacobian=False)
    return X, model, logp, dlogp


def _flat_grad(dlogp, model, point):
    return np.asarray(dlogp(point))


def test_pymc_logp_equals_em_at_every_iterate_and_never_decreases(semi):
    X, fixed, model, logp = semi
    prior = default_prior(X, 2)
    full = fit_em(X, fixed_state=fixed, prior=prior, tol=0.0, max_iter=25, random_state=0)
    pymc_trace = []
    for t in range(1, 26):
        r = fit_em(X, fixed_state=fixed, prior=prior, tol=0.0, max_iter=t, random_state=0)
        value = float(logp(model_point(model, r.weights, r.means, np.linalg.inv(r.covariances))))
        ours = log_density(X, r.weights, r.means, r.covariances, prior, fixed)
        assert value == pytest.approx(ours, rel=1e-6)
        assert value == pytest.approx(full.logp_trace[t - 1], rel=1e-6)
        pymc_trace.append(value)
    steps = np.diff(pymc_trace)
    assert np.all(steps >= -1e-8 * np.abs(pymc_trace[:-1]))
    assert pymc_trace[-1] - pymc_trace[0] > 10.0  # EM actually climbed


def test_pymc_logp_equals_em_with_three_states_partly_pinned():
    rng = np.random.default_rng(2)
    centres = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0]])
    z = rng.integers(0, 3, 240)
    X = centres[z] + rng.normal(0.0, 0.6, (240, 2))
    fixed = np.where((z == 0) & (rng.random(240) < 0.5), 0, -1)
    model = build_model(X, fixed_state=fixed, n_states=3, state_names=["a", "b", "c"])
    assert model.coords["state"] == ("a", "b", "c")
    assert model.coords["contrast"] == ("b - a", "c - a")
    r = fit_em(X, fixed_state=fixed, n_states=3, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = float(model.compile_logp(jacobian=False)(model_point(model, r.weights, r.means, r.precisions)))
    assert value == pytest.approx(r.logp, rel=1e-6)
    # the three states are recovered (state 0 by its pinned cells)
    assert np.linalg.norm(r.means[0] - centres[0]) < 0.2
    assert min(np.linalg.norm(r.means[1:] - c, axis=1).min() for c in centres[1:]) < 0.3


def test_gradient_vanishes_at_em_fixed_point(unsup):
    X, model, logp, dlogp = unsup
    # tol=0: iterate until the log density stops changing in floating point
    r = fit_em(X, tol=0.0, max_iter=5000, random_state=0)
    assert r.converged
    g_fixed = _flat_grad(dlogp, model, model_point(model, r.weights, r.means, r.precisions))
    first = fit_em(X, max_iter=1, random_state=0)  # EM's starting point, for the gradient's scale
    g_start = _flat_grad(dlogp, model, model_point(model, first.weights, first.means, first.precisions))
    rel = np.linalg.norm(g_fixed) / np.linalg.norm(g_start)
    print(f"|grad| at EM fixed point {np.linalg.norm(g_fixed):.3e}, at EM start {np.linalg.norm(g_start):.3e}, "
          f"ratio {rel:.3e}")
    assert rel < 1e-5
    assert np.linalg.norm(g_fixed) / X.shape[0] < 1e-7  # per cell


def test_find_map_stalls_at_symmetric_saddle_where_em_separates(unsup):
    X, model, logp, dlogp = unsup
    prior = default_prior(X, 2)
    n = X.shape[0]
    # both states equal: the M-step of uniform responsibilities (a stationary point of the density)
    w, mu, cov = _m_step(X, np.full((n, 2), 0.5), np.ones(n, bool), prior, "map")
    start = model_point(model, w, mu, np.linalg.inv(cov))
    assert np.linalg.norm(_flat_grad(dlogp, model, start)) < 1e-8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        point = pm.find_MAP(initvals=start, model=model, jitter=False, progressbar=False)
    map_sep = float(np.linalg.norm(point["means"][0] - point["means"][1]))
    map_lp = float(logp({k: point[k] for k in start}))
    em = fit_em(X, prior=prior, random_state=0)
    em_sep = float(np.linalg.norm(em.means[0] - em.means[1]))
    print(f"find_MAP from the symmetric start: mean distance {map_sep:.2e}, logp {map_lp:.2f}; "
          f"EM: mean distance {em_sep:.3f}, logp {em.logp:.2f}; gap {em.logp - map_lp:.2f}")
    assert map_sep < 1e-6  # stalled: the states never split
    assert em_sep > 5.0  # true distance 4 * sqrt(2) = 5.66
    assert em.logp - map_lp > 100.0
    # EM itself does not leave an exact saddle either: it needs its asymmetric start
    stuck = fit_em(X, prior=prior, init_responsibilities=np.full((n, 2), 0.5), max_iter=50)
    assert np.linalg.norm(stuck.means[0] - stuck.means[1]) < 1e-8


def test_build_model_dims_and_bad_inputs(semi):
    X, fixed, model, _ = semi
    assert model.named_vars_to_dims["means"] == ("state", "pc")
    assert model.named_vars_to_dims["covariances"] == ("state", "pc", "pc_bis")
    assert model.named_vars_to_dims["perturbation_mean"] == ("contrast", "pc")
    # one observed variable over all cells, whichever cells are pinned, and no initval anywhere
    assert model.named_vars_to_dims["X"] == ("cell", "pc")
    assert [v.name for v in model.observed_RVs] == ["X"]
    assert all(v is None for v in model.rvs_to_initial_values.values())
    assert "gene" not in model.coords and "perturbation_gene_mean" not in model.named_vars  # no loadings given
    np.testing.assert_array_equal(model["allowed_states"].get_value()[:, 1], (fixed < 0).astype(np.int8))
    with pytest.raises(ValueError, match="fixed_state"):
        build_model(X, fixed_state=fixed[:-1])
    with pytest.raises(ValueError, match="dof"):
        prior = default_prior(X, 2)
        build_model(X, prior=type(prior)(prior.mean, prior.kappa, prior.dof + 0.5, prior.scale_inv, prior.dirichlet))
    with pytest.raises(ValueError, match="state_names"):
        build_model(X, state_names=["a"])


def test_tied_em_is_the_map_of_the_tied_pymc_graph():
    """The escape model's classification step: EM with one shared precision maximises the
    log density of ``build_model(..., covariance="tied")``, iterate by iterate."""
    from scotgm_pp.inference import default_prior, fit_em
    from scotgm_pp.models import build_model, model_point

    rng = np.random.default_rng(11)
    d = 3
    X = np.vstack([rng.normal(size=(120, d)), rng.normal(size=(60, d)) + [2.5, 0, 0], rng.normal(size=(40, d))])
    fixed = np.r_[np.zeros(120, int), -np.ones(100, int)]
    prior = default_prior(X, 2)
    model = build_model(X, fixed_state=fixed, prior=prior, covariance="tied")
    logp = model.compile_logp(jacobian=False)
    traces = []
    for n_iter in range(1, 8):
        res = fit_em(X, fixed_state=fixed, prior=prior, covariance="tied", max_iter=n_iter, tol=0.0)
        assert np.allclose(res.covariances[0], res.covariances[1])
        point = model_point(model, res.weights, res.means, np.linalg.inv(res.covariances))
        traces.append(float(logp(point)))
        assert traces[-1] == pytest.approx(res.logp_trace[-1], rel=1e-6)
    assert np.all(np.diff(traces) >= -1e-8)
    # The shifted guide cells are the perturbed ones.
    r1 = res.responsibilities[120:, 1]
    assert r1[:60].mean() > 0.8 and r1[60:].mean() < 0.2


def test_partly_restricted_cells_em_is_the_map_of_the_graph():
    """Guide cells of two perturbations allowed {basal, their own state}: EM climbs the graph's
    own log density, the weights' minorise-maximise step included, and finds each state's shift."""
    from scotgm_pp.inference import default_prior, fit_em
    from scotgm_pp.inference.em import log_density
    from scotgm_pp.models import build_model, model_point

    rng = np.random.default_rng(5)
    d = 3
    shift_a, shift_b = np.array([3.0, 0, 0]), np.array([0, 3.0, 0])
    esc_a, esc_b = rng.random(80) < 0.3, rng.random(80) < 0.5
    X = np.vstack([rng.normal(size=(150, d)), rng.normal(size=(80, d)) + np.where(esc_a[:, None], 0, shift_a),
                   rng.normal(size=(80, d)) + np.where(esc_b[:, None], 0, shift_b)])
    mask = np.zeros((310, 3), bool)
    mask[:, 0] = True
    mask[150:230, 1] = True
    mask[230:, 2] = True
    prior = default_prior(X, 3)
    model = build_model(X, allowed_states=mask, n_states=3, prior=prior)
    logp = model.compile_logp(jacobian=False)
    # one EM path (a given start), stopped after 1, 2, 4, ... iterations; then the default fit
    start = mask / mask.sum(axis=1, keepdims=True)  # restricted cells half basal, half their own state
    traces = []
    for n_iter in (1, 2, 4, 8, 30):
        res = fit_em(X, allowed_states=mask, n_states=3, prior=prior, max_iter=n_iter, tol=0.0,
                     init_responsibilities=start)
        point = model_point(model, res.weights, res.means, np.linalg.inv(res.covariances))
        traces.append(float(logp(point)))
        assert traces[-1] == pytest.approx(res.logp_trace[-1], rel=1e-8)
        assert res.logp_trace[-1] == pytest.approx(
            log_density(X, res.weights, res.means, res.covariances, prior, allowed_states=mask), rel=1e-12)
    assert np.all(np.diff(traces) >= -1e-8)
    assert np.all(np.diff(res.logp_trace) >= -1e-8)
    best = fit_em(X, allowed_states=mask, n_states=3, prior=prior, random_state=0, n_init=4)
    assert np.all(np.diff(best.logp_trace) >= -1e-8)
    assert best.logp >= res.logp - 1e-6 * abs(res.logp)  # the best of its starts is at least as good
    res = best
    np.testing.assert_allclose(res.means[1] - res.means[0], shift_a, atol=0.5)
    np.testing.assert_allclose(res.means[2] - res.means[0], shift_b, atol=0.5)
    # escaped shares: the renormalised weights of basal within each guide's allowed pair
    w = res.weights
    assert abs(w[0] / (w[0] + w[1]) - esc_a.mean()) < 0.12
    assert abs(w[0] / (w[0] + w[2]) - esc_b.mean()) < 0.12
    # restricted cells never sit in a state they may not take
    assert np.all(res.responsibilities[150:230, 2] == 0) and np.all(res.responsibilities[230:, 1] == 0)

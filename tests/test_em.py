"""Numeric tests of the EM backend on simulated mixtures with known parameters."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from scotgm_pp.inference.em import NormalWishartPrior, default_prior, fit_em, log_density


def _auc(score: np.ndarray, truth: np.ndarray) -> float:
    """Area under the ROC curve by the rank-sum (Mann-Whitney) formula."""
    ranks = stats.rankdata(score)
    pos = truth.astype(bool)
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _match(est: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Index of the estimated state closest to each true state."""
    return np.array([np.argmin(np.linalg.norm(est - t, axis=1)) for t in true])


@pytest.fixture(scope="module")
def three_states():
    rng = np.random.default_rng(0)
    d = 4
    means = np.array([[0.0, 0, 0, 0], [4.0, 0, 1, 0], [0.0, 4, 0, -1]])
    A = rng.normal(size=(3, d, d)) * 0.3
    covs = np.array([np.eye(d) * s + a @ a.T for s, a in zip([1.0, 0.5, 0.8], A)])
    weights = np.array([0.5, 0.3, 0.2])
    n = 3000
    z = rng.choice(3, size=n, p=weights)
    X = np.array([rng.multivariate_normal(means[k], covs[k]) for k in z])
    return X, z, weights, means, covs


def test_recovers_known_parameters(three_states):
    X, z, weights, means, covs = three_states
    prior = default_prior(X, 3, regularization=1e-4)
    r = fit_em(X, n_states=3, prior=prior, random_state=0)
    assert r.converged
    idx = _match(r.means, means)
    assert sorted(idx.tolist()) == [0, 1, 2]
    assert np.max(np.abs(r.means[idx] - means)) < 0.15
    rel_cov = np.linalg.norm(r.covariances[idx] - covs, axis=(1, 2)) / np.linalg.norm(covs, axis=(1, 2))
    assert np.all(rel_cov < 0.15)  # sampling error alone is 0.04-0.07 at these sizes
    assert np.max(np.abs(r.weights[idx] - weights)) < 0.03
    accuracy = np.mean(np.argmax(r.responsibilities[:, idx], axis=1) == z)
    assert accuracy > 0.97


def test_monotone_trace(three_states):
    X = three_states[0]
    r = fit_em(X, n_states=3, random_state=3, tol=0.0, max_iter=60)
    steps = np.diff(r.logp_trace)
    assert len(r.logp_trace) == 60
    assert np.all(steps >= -1e-9 * np.abs(r.logp_trace[:-1]))


def test_log_density_matches_scipy(three_states):
    X = three_states[0][:200]
    prior = default_prior(X, 3, dirichlet=2.0)
    r = fit_em(X, n_states=3, prior=prior, random_state=0, max_iter=5)
    fixed = np.r_[np.zeros(20, int), -np.ones(180, int)]
    lik = sum(stats.multivariate_normal(r.means[0], r.covariances[0]).logpdf(X[:20]))
    comp = np.stack([stats.multivariate_normal(m, c).logpdf(X[20:]) for m, c in zip(r.means, r.covariances)], 1)
    lik += np.sum(np.log(np.exp(comp) @ r.weights))
    pri = stats.dirichlet(prior.dirichlet).logpdf(r.weights)
    for m, c in zip(r.means, r.covariances):
        pri += stats.wishart(df=prior.dof, scale=prior.scale).logpdf(np.linalg.inv(c))
        pri += stats.multivariate_normal(prior.mean, c / prior.kappa).logpdf(m)
    ours = log_density(X, r.weights, r.means, r.covariances, prior, fixed)
    assert ours == pytest.approx(lik + pri, rel=1e-10)


@pytest.fixture(scope="module")
def screen():
    """Controls pinned to state 0; guide cells: 60% perturbed (shifted), 40% escaped (like controls)."""
    rng = np.random.default_rng(5)
    d = 6
    shift = np.array([1.5, -1.0, 0.5, 0, 0, 0])
    n_ctrl, n_guide = 400, 400
    X_ctrl = rng.normal(size=(n_ctrl, d))
    perturbed = rng.random(n_guide) < 0.6
    X_guide = rng.normal(size=(n_guide, d)) + perturbed[:, None] * shift
    X = np.vstack([X_ctrl, X_guide])
    fixed = np.r_[np.zeros(n_ctrl, int), -np.ones(n_guide, int)]
    return X, fixed, perturbed, shift


def _oracle_auc(X, fixed, perturbed, shift):
    """AUC of the true likelihood ratio (the best any method can do on this sample)."""
    Xg = X[fixed < 0]
    llr = Xg @ shift - 0.5 * shift @ shift
    return _auc(llr, perturbed)


def test_semi_supervised_escape_detection(screen):
    X, fixed, perturbed, shift = screen
    r = fit_em(X, fixed_state=fixed, random_state=0)
    p = r.responsibilities[fixed < 0, 1]
    auc, oracle = _auc(p, perturbed), _oracle_auc(X, fixed, perturbed, shift)
    print(f"escape detection AUC {auc:.3f} (oracle {oracle:.3f})")
    assert auc > 0.85
    assert auc > oracle - 0.02
    assert np.all(r.responsibilities[fixed == 0] == [1.0, 0.0])
    assert abs(r.weights[1] - perturbed.mean()) < 0.1
    assert np.linalg.norm(r.means[1] - r.means[0] - shift) < 0.35


def test_map_m_step_is_the_closed_form(screen):
    X, fixed, _, _ = screen
    n, d = X.shape
    prior = default_prior(X, 2)
    R0 = np.random.default_rng(0).dirichlet([1.0, 1.0], size=n)
    r = fit_em(X, fixed_state=None, prior=prior, init_responsibilities=R0, max_iter=1)
    Nk = R0.sum(0)
    for k in range(2):
        mu = (R0[:, k] @ X + prior.kappa * prior.mean) / (Nk[k] + prior.kappa)
        D = X - mu
        dm = mu - prior.mean
        cov = (prior.scale_inv + (D * R0[:, [k]]).T @ D + prior.kappa * np.outer(dm, dm)) / (Nk[k] + prior.dof - d)
        np.testing.assert_allclose(r.means[k], mu, rtol=1e-12)
        np.testing.assert_allclose(r.covariances[k], cov, rtol=1e-10)
    np.testing.assert_allclose(r.weights, Nk / n, rtol=1e-12)  # alpha = 1


def test_paper_regularization_is_ml_plus_ridge(screen):
    X, fixed, perturbed, shift = screen
    n, d = X.shape
    R0 = np.random.default_rng(1).dirichlet([1.0, 1.0], size=n)
    r = fit_em(X, regularization="paper", init_responsibilities=R0, max_iter=1)
    for k in range(2):
        rk = R0[:, k]
        mu = rk @ X / rk.sum()
        D = X - mu
        ml = (D * rk[:, None]).T @ D / rk.sum()
        ridge = 0.01 * np.mean(np.diag(ml))
        np.testing.assert_allclose(r.means[k], mu, rtol=1e-12)
        np.testing.assert_allclose(r.covariances[k], ml + (ridge + 1e-9) * np.eye(d), rtol=1e-10)
    # run to convergence: it detects escapes as well as the MAP M-step does
    paper = fit_em(X, fixed_state=fixed, regularization="paper", random_state=0)
    assert paper.regularization == "paper"
    assert _auc(paper.responsibilities[fixed < 0, 1], perturbed) > _oracle_auc(X, fixed, perturbed, shift) - 0.02


def test_reproducible_given_random_state(three_states):
    X = three_states[0][:500]
    a = fit_em(X, n_states=3, random_state=7)
    b = fit_em(X, n_states=3, random_state=np.random.default_rng(7))
    np.testing.assert_array_equal(a.means, b.means)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"X": np.zeros(10)}, "2-D"),
        ({"X": np.full((10, 2), np.nan)}, "non-finite"),
        ({"fixed_state": np.zeros(5, int)}, "fixed_state must have length"),
        ({"fixed_state": np.full(20, 2)}, "fixed_state values"),
        ({"fixed_state": np.zeros(20, bool)}, "must be integers"),
        ({"fixed_state": np.full(20, 0.5)}, "must hold integers"),
        ({"regularization": "ridge"}, "regularization must be"),
        ({"n_states": 0}, "n_states"),
        ({"prior": default_prior(np.zeros((20, 3)) + np.arange(3), 2)}, "prior does not match"),
        ({"init_responsibilities": np.ones((20, 3))}, "init_responsibilities"),
        ({"max_iter": 0}, "max_iter"),
    ],
)
def test_bad_inputs_are_named(kwargs, match):
    X = kwargs.pop("X", np.random.default_rng(0).normal(size=(20, 2)))
    with pytest.raises(ValueError, match=match):
        fit_em(X, **kwargs)


def test_prior_validation():
    with pytest.raises(ValueError, match="dof"):
        NormalWishartPrior(np.zeros(3), 1.0, 1.5, np.eye(3), np.ones(2))
    with pytest.raises(ValueError, match="Dirichlet"):
        NormalWishartPrior(np.zeros(3), 1.0, 5.0, np.eye(3), np.array([0.5, 1.0]))


def test_normal_wishart_draws_have_the_closed_form_moments():
    from scotgm_pp.inference.gibbs import _sample_normal_wishart

    rng = np.random.default_rng(0)
    d, nu, kn = 3, 12.0, 5.0
    psi = np.array([[2.0, 0.3, 0.0], [0.3, 1.0, 0.2], [0.0, 0.2, 0.5]]) * nu
    mn = np.array([1.0, -1.0, 0.5])
    draws = [_sample_normal_wishart(kn, mn, nu, psi, rng) for _ in range(6000)]
    mus = np.array([m for m, _ in draws])
    sigmas = np.array([s for _, s in draws])
    # E[Sigma] = Psi / (nu - d - 1) for Sigma ~ inverse-Wishart(nu, Psi); E[mu] = m_n
    np.testing.assert_allclose(sigmas.mean(0), psi / (nu - d - 1), atol=0.08)
    np.testing.assert_allclose(mus.mean(0), mn, atol=0.03)
    # Cov[mu] = E[Sigma] / kappa_n
    np.testing.assert_allclose(np.cov(mus.T), psi / (nu - d - 1) / kn, atol=0.05)


def test_gibbs_unsupervised_is_relabelled_to_em(three_states):
    from scotgm_pp.inference.gibbs import sample_gibbs

    X = three_states[0][:600]
    em = fit_em(X, n_states=3, random_state=0, n_init=2)
    g = sample_gibbs(X, n_states=3, init=em, draws=150, tune=50, chains=2, random_state=1)
    assert g.means.shape == (2, 150, 3, X.shape[1])
    post_mean = g.means.mean(axis=(0, 1))
    np.testing.assert_allclose(post_mean, em.means, atol=0.15)  # labels agree with EM's
    np.testing.assert_allclose(g.mean_responsibilities.sum(1), 1.0)
    assert np.all(np.isfinite(g.lp))

"""The per-gene marginal count likelihood ``sum_i log sum_k r_ik NB(y_ig | k)`` (count_likelihood="marginal")."""

import warnings
from dataclasses import replace

import numpy as np
import pytest
from scipy import optimize, stats
from scipy.special import logsumexp

from scotgm_pp.inference import count_fit as cf
from scotgm_pp.inference import count_layer as cl
from scotgm_pp.tl import fit_count_layer
from scotgm_pp.tl._plan import RunSettings
from scotgm_pp._validation import InputError


def _screen(seed=1, n0=300, n1=150, G=120, n_target=20, effect=-2.0, phi=0.2, batches=False):
    """Controls pinned to state 0, guide cells free with calibrated P(perturbed) (the exact
    posterior of a Gaussian score, 70% perturbed), the first ``n_target`` genes moved by ``effect``."""
    rng = np.random.default_rng(seed)
    base = rng.normal(-6.5, 1.0, G)
    eff = np.zeros(G)
    eff[:n_target] = effect
    z = rng.random(n1) < 0.7
    score = rng.normal(np.where(z, 1.5, 0.0), 1.0)
    lw = np.log(0.7) - 0.5 * (score - 1.5) ** 2 - (np.log(0.3) - 0.5 * score**2)
    w = 1.0 / (1.0 + np.exp(-lw))
    s = np.exp(rng.normal(np.log(3000), 0.3, n0 + n1))
    state = np.r_[np.zeros(n0, bool), z]
    batch = rng.integers(0, 2, n0 + n1).astype(str) if batches else None
    shift = 0.3 * (batch == "1")[:, None] if batches else 0.0
    mu = s[:, None] * np.exp(base + eff * state[:, None] + shift)
    y = rng.negative_binomial(1 / phi, (1 / phi) / (1 / phi + mu)).astype(float)
    fixed = np.r_[np.zeros(n0, int), -np.ones(n1, int)]
    R = np.zeros((n0 + n1, 2))
    R[:n0, 0] = 1.0
    R[n0:, 1] = w
    R[n0:, 0] = 1.0 - w
    return y, s, fixed, R, eff, phi, batch


def _log_nb(y, s, lam, alpha):
    mu = s * np.exp(lam)
    return stats.nbinom.logpmf(y, alpha, alpha / (alpha + mu))


def _marginal_log_posterior(theta, data, y, s, R, batch_codes, prior, g):
    """One gene's ``sum_i log sum_k r_ik NB(y_ig | k) + log prior`` at ``theta`` (beta, delta_1, gamma..)."""
    K, B = data.n_states, data.n_batches
    theta = np.asarray(theta, float)
    p = CountParams_from(theta, K, B)
    lam = p.log_rates()[:, :, 0]  # (K, B)
    alpha = data.alpha[batch_codes, g]
    with np.errstate(divide="ignore"):
        terms = np.log(R).T + np.stack([_log_nb(y[:, g], s, lam[k, batch_codes], alpha) for k in range(K)])
    return logsumexp(terms, axis=0).sum() + cl.log_prior_per_gene(theta[None], _gene_prior(prior, g), K)[0]


def CountParams_from(theta, K, B):
    return cl.CountParams.from_theta(np.asarray(theta, float)[None], K, B)


def _gene_prior(prior, g):
    return replace(prior, beta_mean=np.atleast_1d(np.asarray(prior.beta_mean, float)[g]))


def test_fit_marginal_equals_direct_1d_maximisation():
    y, s, fixed, R, eff, phi, _ = _screen(G=60)
    data = cl.CountData(y, s, np.full(y.shape[1], phi), fixed, 2)
    prior = cl.default_count_prior(y, s)
    cp, Q, it, ok = cf.fit_marginal(data, R, prior, tol=1e-8)
    assert ok and it < 20
    codes = np.zeros(len(s), int)
    for g in (0, 1, 5, 30, 45):  # three moved genes, two null ones
        beta = cp.params.beta[g]
        f = lambda d: -_marginal_log_posterior([beta, d], data, y, s, R, codes, prior, g)  # noqa: E731
        d0 = cp.params.delta[1, g]
        best = optimize.minimize_scalar(f, bounds=(d0 - 1.0, d0 + 1.0), method="bounded",
                                        options={"xatol": 1e-9}).x
        assert cp.params.delta[1, g] == pytest.approx(best, abs=2e-6)
    # Q is the per-gene posterior of the states at the fit
    assert Q.shape == (2, 150, 60)
    np.testing.assert_allclose(Q, cf.entry_posteriors(data, cf.evaluate(data, cp.params), R), atol=1e-12)


def test_fit_marginal_stationary_and_louis_se_is_observed_information():
    """With batches (theta = beta, delta, gamma): the numerical gradient of the full marginal log
    posterior at the fit is ~0, and the Louis SE is that of its numerical Hessian."""
    y, s, fixed, R, eff, phi, batch = _screen(seed=3, G=40, batches=True)
    data = cl.CountData(y, s, np.full(y.shape[1], phi), fixed, 2, batch)
    prior = cl.default_count_prior(y, s)
    cp, Q, _, ok = cf.fit_marginal(data, R, prior, tol=1e-9)
    assert ok
    codes = cl.batch_codes(batch, len(s))[0]
    se = cf.effect_standard_errors(data, cp, R, prior, correction="louis", Q=Q)[1]
    theta = cp.params.theta()
    h = 1e-4
    for g in (0, 7, 25):
        f = lambda t: _marginal_log_posterior(t, data, y, s, R, codes, prior, g)  # noqa: E731
        t0 = theta[g]
        p = t0.size
        E = np.eye(p) * h
        grad = np.array([(f(t0 + E[j]) - f(t0 - E[j])) / (2 * h) for j in range(p)])
        assert np.abs(grad).max() < 1e-4
        H = np.array([[(f(t0 + E[i] + E[j]) - f(t0 + E[i] - E[j]) - f(t0 - E[i] + E[j]) + f(t0 - E[i] - E[j]))
                       / (4 * h * h) for j in range(p)] for i in range(p)])
        assert se[g] == pytest.approx(np.sqrt(np.linalg.inv(-H)[1, 1]), rel=1e-3)


def test_pinned_only_is_fit_given_states():
    y, s, _, _, eff, phi, _ = _screen(G=50)
    fixed = np.r_[np.zeros(300, int), np.ones(150, int)]  # escape model off: guide cells pinned perturbed
    R = np.eye(2)[fixed]
    data = cl.CountData(y, s, np.full(y.shape[1], phi), fixed, 2)
    prior = cl.default_count_prior(y, s)
    cut, _, _ = cf.fit_given_states(data, R, prior, tol=1e-6)
    marg, Q, _, ok = cf.fit_marginal(data, R, prior, tol=1e-6)
    assert ok and Q.shape == (2, 0, 50)
    np.testing.assert_array_equal(marg.params.theta(), cut.params.theta())
    np.testing.assert_array_equal(marg.row_loglik, cut.row_loglik)
    w = fit_count_layer(y, fixed, R, size_factors=s, dispersion=np.full(50, phi), count_likelihood="weighted")
    m = fit_count_layer(y, fixed, R, size_factors=s, dispersion=np.full(50, phi))
    assert (w.count_likelihood, m.count_likelihood, m.se_method) == ("weighted", "marginal", "louis")
    np.testing.assert_array_equal(m.params.delta, w.params.delta)
    np.testing.assert_array_equal(m.effect_se, w.effect_se)
    np.testing.assert_allclose(m.effect_se_robust, w.effect_se_robust, rtol=1e-12)
    # without free cells the two likelihoods are one: the same unshrunk effects (the weighted
    # layer's Newton from the MAP, one step where it is short: within 1e-3 of the converged fit)
    np.testing.assert_array_equal(m.effect_unshrunk, w.effect_unshrunk)
    np.testing.assert_array_equal(m.effect_unshrunk_se, w.effect_unshrunk_se)
    flat, _, _ = cf.fit_given_states(data, R, replace(prior, delta_sd=cf.FLAT_DELTA_SD), init=cut.params, tol=1e-10)
    ok = np.isfinite(m.effect_unshrunk[1])
    assert ok.mean() > 0.8
    np.testing.assert_allclose(w.effect_unshrunk[1, ok], flat.params.delta[1, ok], atol=1e-3)


def test_marginal_target_effect_closer_to_truth():
    """Calibrated state probabilities, 30% escaped guide cells, 20 genes knocked down by 2 (e-fold):
    the weighted likelihood measures them far too weak, the marginal one close to the truth."""
    errs = {}
    for lik in ("weighted", "marginal"):
        e = []
        for seed in (1, 2):
            y, s, fixed, R, eff, phi, _ = _screen(seed=seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                fit = fit_count_layer(y, fixed, R, size_factors=s, dispersion=np.full(y.shape[1], phi),
                                      count_likelihood=lik)
            moved = eff < 0
            # the library-share scale: the offset is the cell's total count (nearly the same here)
            e.append(np.nanmean(fit.effect_unshrunk[1, moved] - eff[moved]))
            assert np.isfinite(fit.effect_unshrunk[1, moved]).mean() > 0.9
        errs[lik] = np.mean(e)
    assert errs["weighted"] > 0.4
    assert abs(errs["marginal"]) < 0.15
    assert abs(errs["marginal"]) < 0.3 * errs["weighted"]


def test_count_likelihood_validated():
    y, s, fixed, R, eff, phi, _ = _screen(G=10)
    with pytest.raises(ValueError, match="count_likelihood"):
        fit_count_layer(y, fixed, R, size_factors=s, dispersion=np.full(10, phi), count_likelihood="mixture")
    with pytest.raises(InputError, match="count_likelihood"):
        RunSettings("perturbation", "control", count_likelihood="mixture")
    assert RunSettings("perturbation", "control").to_dict()["count_likelihood"] == "marginal"
    from scotgm_pp.cli import COUNT_LIKELIHOODS_CLI
    from scotgm_pp.inference.joint_em import COUNT_LIKELIHOODS

    assert COUNT_LIKELIHOODS_CLI == COUNT_LIKELIHOODS
    assert RunSettings("perturbation", "control", count_likelihood="weighted").to_dict()["count_likelihood"] == "weighted"


def test_benchmark_method_weighted_suffix():
    from scotgm_pp.benchmark._methods import resolve_methods, scotgm_method

    funcs = resolve_methods(["scotgm-ot:effect_shrunk", "scotgm-ot:effect_shrunk_weighted"])
    assert funcs["scotgm-ot:effect_shrunk_weighted"].__name__ == "scotgm_ot_effect_shrunk_weighted"
    assert scotgm_method("ot", score="effect_bound_weighted").__name__ == "scotgm_ot_effect_bound_weighted"
    with pytest.raises(ValueError, match="unknown method"):
        resolve_methods(["scotgm-ot:mu_sigma_weighted"])


def test_the_cli_chooses_the_count_likelihood(tmp_path):
    import json

    import scotgm_pp as sg
    from scotgm_pp.cli import main

    adata = sg.datasets.simulate(n_genes=60, n_perturbations=1, n_control=120, n_cells_per_perturbation=40,
                                 random_state=1)
    path = tmp_path / "screen.h5ad"
    adata.write_h5ad(path)
    for flag, lik in (([], "marginal"), (["--count-likelihood", "weighted"], "weighted")):
        out = tmp_path / lik
        assert main(["run", str(path), "--perturbation-key", "perturbation", "--control", "control",
                     "--out", str(out), "--n-pcs", "3", "--quiet", *flag]) == 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["params"]["count_likelihood"] == lik
    with pytest.raises(SystemExit):
        main(["run", str(path), "--perturbation-key", "perturbation", "--control", "control",
              "--out", str(tmp_path / "bad"), "--count-likelihood", "mixture"])


def test_the_calibration_cli_fits_the_likelihood_and_dispersion_it_is_asked_for(tmp_path, monkeypatch):
    import scotgm_pp as sg
    import scotgm_pp.tl._pair as pair
    from scotgm_pp.cli import main

    seen = []
    fit = pair.fit_count_layer

    def spy(*args, **kwargs):
        out = fit(*args, **kwargs)
        seen.append((out.count_likelihood, out.dispersion.shape))
        return out

    monkeypatch.setattr(pair, "fit_count_layer", spy)
    adata = sg.datasets.simulate(n_genes=60, n_perturbations=2, n_control=300, n_cells_per_perturbation=80,
                                 n_batches=2, random_state=0)
    path = tmp_path / "screen.h5ad"
    adata.write_h5ad(path)
    common = ["calibrate", str(path), "--perturbation-key", "perturbation", "--control", "control", "--n-null", "2",
              "--null-size", "60", "--batch-key", "batch", "--n-workers", "1", "--quiet"]
    assert main([*common, "--out", str(tmp_path / "a")]) == 0
    assert seen and all(s == ("marginal", (2, 60)) for s in seen)
    seen.clear()
    assert main([*common, "--out", str(tmp_path / "b"), "--count-likelihood", "weighted", "--pooled-dispersion"]) == 0
    assert seen and all(s == ("weighted", (60,)) for s in seen)


def test_an_unknown_count_likelihood_is_refused_before_any_fit():
    import scotgm_pp as sg
    from scotgm_pp.benchmark._methods import scotgm_method
    from scotgm_pp.pp import PreprocessParams
    from scotgm_pp.tl._pair import analyse_pair

    adata = sg.datasets.simulate(n_genes=30, n_perturbations=1, n_control=60, n_cells_per_perturbation=30,
                                 random_state=0)
    ctrl = (adata.obs["perturbation"] == "control").to_numpy()
    with pytest.raises(ValueError, match="count_likelihood"):
        analyse_pair(adata, ctrl, params=PreprocessParams(), coupling="ot", escape_model=True, regularization=0.01,
                     count_likelihood="mixture")
    # a weighted method is named so, however it was asked for
    assert scotgm_method("ot", count_likelihood="weighted").__name__ == "scotgm_ot_effect_shrunk_weighted"
    assert scotgm_method("ot").__name__ == "scotgm_ot_effect_shrunk"

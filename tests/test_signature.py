"""The perturbation signature (issue 23): empirical-Bayes shrinkage, residuals, cross-fitting,
and escaped cells found among thousands of genes."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from scipy import stats
from sklearn.metrics import roc_auc_score

import scotgm_pp as sg
from scotgm_pp.inference.normal_means import normal_means
from scotgm_pp.tl._signature import basal_factors, fit_signature_states, pearson_residuals


def test_normal_means_posterior_is_the_closed_form_for_given_weights():
    d = np.array([-2.0, -0.3, 0.0, 0.4, 3.0])
    se = np.array([0.5, 0.2, 1.0, 0.3, 1.5])
    grid, pi = np.array([0.0, 1.0]), np.array([0.3, 0.7])
    fit = normal_means(d, se, grid=grid, init=pi, max_iter=0)  # no EM step: the weights as given
    w0 = pi[0] * stats.norm.pdf(d, 0, se)
    w1 = pi[1] * stats.norm.pdf(d, 0, np.sqrt(1 + se**2))
    p1 = w1 / (w0 + w1)
    shrink = 1 / (1 + se**2)
    np.testing.assert_allclose(fit.mean, p1 * shrink * d, rtol=1e-12)
    post_var = p1 * (shrink * se**2 + (shrink * d) ** 2) - (p1 * shrink * d) ** 2
    np.testing.assert_allclose(fit.sd**2, post_var, rtol=1e-10, atol=1e-14)
    # lfsr: P(theta = 0) plus the smaller of P(theta < 0), P(theta > 0)
    neg = p1 * stats.norm.cdf(0, shrink * d, np.sqrt(shrink) * se)
    np.testing.assert_allclose(fit.lfsr, (1 - p1) + np.minimum(neg, p1 - neg), rtol=1e-10)


def test_normal_means_shrinks_noise_and_keeps_signals():
    rng = np.random.default_rng(0)
    G = 2000
    theta = np.zeros(G)
    theta[:40] = rng.normal(0, 2.0, 40)
    se = rng.uniform(0.2, 0.6, G)
    d = theta + rng.normal(0, se)
    fit = normal_means(d, se)
    mse_raw, mse_eb = np.mean((d - theta) ** 2), np.mean((fit.mean - theta) ** 2)
    print(f"MSE raw {mse_raw:.4f}, shrunk {mse_eb:.4f}; null weight {fit.weights[0]:.3f}")
    assert mse_eb < 0.25 * mse_raw
    assert fit.weights[0] > 0.9  # about 98% of the effects are null
    called = fit.lfsr < 0.05
    clear = np.abs(theta) > 5 * se  # signals five standard errors out
    false_sign = np.sum(called & (np.sign(fit.mean) != np.sign(theta)))
    print(f"called {called.sum()}, of the {clear.sum()} clear signals {called[clear].sum()}; wrong sign {false_sign}")
    assert called[clear].mean() >= 0.9 and false_sign <= 0.05 * max(called.sum(), 1)


@pytest.fixture(scope="module")
def null_pair():
    """Guide cells drawn exactly like the controls: no effect."""
    a = sg.datasets.simulate(n_genes=300, n_perturbations=1, n_control=900, n_cells_per_perturbation=10,
                             library_size=2000.0, random_state=3)
    return a[a.obs["perturbation"] == "control"].copy()


def test_residuals_are_in_basal_units_and_ignore_library_size(null_pair):
    """Guide cells sequenced 25% less deeply than the controls, nothing else different (binomial
    thinning of their counts): the residuals must not read the depth as a perturbation."""
    rng = np.random.default_rng(2)
    Y = null_pair.X.toarray()
    ctrl = rng.random(Y.shape[0]) < 0.7
    Y[~ctrl] = rng.binomial(Y[~ctrl], 0.75)
    lib = Y.sum(axis=1).astype(float)
    Z, used = pearson_residuals(Y, lib, ctrl)
    np.testing.assert_allclose(Z[ctrl].mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(Z[ctrl].std(axis=0, ddof=1), 1.0, atol=1e-3)
    detected = (Y[ctrl] > 0).sum(axis=0)
    assert set(used) == set(np.flatnonzero(detected >= 5))
    t = stats.ttest_ind(Z[~ctrl], Z[ctrl], axis=0).statistic
    # with the library-size trend removed, the share of genes with |t| > 2 is about the 5% of a null
    print(f"share |t| > 2 between thinned and full-depth cells: {np.mean(np.abs(t) > 2):.3f}")
    assert np.mean(np.abs(t) > 2) < 0.1


def _residuals_reference(Y, lib, ctrl, batch, phi, clip=2.0):
    """The residuals of pearson_residuals' docstring, written out on whole arrays in double precision."""
    Z = np.zeros(Y.shape)
    for b in np.unique(batch):
        rows = batch == b
        rate = Y[rows & ctrl].sum(axis=0) / lib[rows & ctrl].sum()
        mu = lib[rows, None] * rate[None, :]
        Z[rows] = np.clip((Y[rows] - mu) / np.sqrt(mu * (1 + phi * mu) + 1e-12), -clip, clip)
    x = np.log(lib) - np.log(lib[ctrl]).mean()
    Z -= x[:, None] * ((x[ctrl] @ Z[ctrl]) / (x[ctrl] @ x[ctrl]))[None, :]
    return (Z - Z[ctrl].mean(axis=0)) / Z[ctrl].std(axis=0, ddof=1)


def test_residuals_equal_their_formula_in_batches_and_from_sparse_counts(null_pair):
    """Residuals computed a block of rows at a time (views for one batch, copies written back for
    interleaved batches), from dense or sparse counts, against the formula on whole arrays."""
    from scotgm_pp.tl._signature import _column_mean_sd

    rng = np.random.default_rng(5)
    Y = null_pair.X.toarray().astype(float)
    n = Y.shape[0]
    lib = Y.sum(axis=1)
    ctrl = rng.random(n) < 0.8
    batch = np.where(rng.random(n) < 0.5, "a", "b")  # interleaved rows
    Y = Y[:, (Y[ctrl] > 0).sum(axis=0) >= 5]  # the genes pearson_residuals keeps
    phi = rng.uniform(0.0, 0.5, Y.shape[1])
    for b in (None, batch):
        ref = _residuals_reference(Y, lib, ctrl, np.zeros(n) if b is None else b, phi)
        for counts in (Y, sp.csr_matrix(Y)):
            Z, used = pearson_residuals(counts, lib, ctrl, batch=b, dispersion=phi)
            assert used.size == Y.shape[1] and Z.dtype == np.float32
            assert np.max(np.abs(Z - ref)) < 2e-4  # single precision
    m, sd = _column_mean_sd(Z, np.flatnonzero(ctrl))
    np.testing.assert_allclose(m, Z[ctrl].astype(float).mean(axis=0), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(sd, Z[ctrl].astype(float).std(axis=0, ddof=1), rtol=1e-12)


def test_basal_factors_reproduce_the_controls_covariance():
    rng = np.random.default_rng(1)
    n, g, r = 800, 60, 3
    L = rng.normal(0, 0.7, (g, r))
    psi = rng.uniform(0.3, 1.0, g)
    Z = rng.normal(size=(n, r)) @ L.T + rng.normal(size=(n, g)) * np.sqrt(psi)
    L_hat, psi_hat = basal_factors(Z - Z.mean(axis=0), rank=r)
    S = L @ L.T + np.diag(psi)
    S_hat = L_hat @ L_hat.T + np.diag(psi_hat)
    err = np.linalg.norm(S_hat - S) / np.linalg.norm(S)
    print(f"relative error of the factor-model covariance: {err:.3f}")
    assert err < 0.15


def test_cross_fitted_scores_do_not_invent_a_perturbation(null_pair):
    """Under no effect the held-out signature of guide cells has the controls' law: the KS test
    of the first round rejects at about its level, over 40 random splits."""
    Y = null_pair.X.tocsr()
    lib = np.asarray(Y.sum(axis=1)).ravel()
    rng = np.random.default_rng(0)
    pvals = []
    for _ in range(40):
        ctrl = np.ones(Y.shape[0], bool)
        ctrl[rng.choice(Y.shape[0], 120, replace=False)] = False
        Z, _ = pearson_residuals(Y, lib, ctrl)
        fit = fit_signature_states(Z, ctrl, random_state=rng)
        pvals.append(fit.shift_pvalue)
    pvals = np.array(pvals)
    print(f"null KS p < 0.05 in {np.mean(pvals < 0.05):.3f} of 40 splits; median p {np.median(pvals):.2f}")
    assert np.mean(pvals < 0.05) <= 0.15 and np.median(pvals) > 0.25


@pytest.fixture(scope="module")
def wide_screen():
    """2,000 genes, 3,000 UMIs per cell, 40% escaped: where the per-experiment PCA sees nothing."""
    a = sg.datasets.simulate(n_genes=2000, n_perturbations=3, n_control=600, n_cells_per_perturbation=150,
                             escape_fraction=0.4, library_size=3000.0, random_state=11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sg.tl.perturbation_response(a, "perturbation", "control", n_jobs=1)
        pca = sg.tl.perturbation_response(a, "perturbation", "control", n_jobs=1, state_space="pca", copy=True)
    return a, pca


def _aucs(a):
    lab = a.obs["perturbation"].astype(str).to_numpy()
    return {p: roc_auc_score(~a.obs["escaped"].to_numpy()[lab == p], a.obs["scotgm_p_perturbed"].to_numpy()[lab == p])
            for p in sorted(set(lab) - {"control"})}


def test_escaped_cells_are_found_among_2000_genes(wide_screen):
    a, pca = wide_screen
    sig, paper = _aucs(a), _aucs(pca)
    print("escape AUC, signature:", {p: round(v, 3) for p, v in sig.items()},
          "PCA:", {p: round(v, 3) for p, v in paper.items()})
    assert min(sig.values()) >= 0.8 and np.mean(list(sig.values())) >= 0.88
    assert np.mean(list(sig.values())) >= np.mean(list(paper.values())) + 0.2
    summary = a.uns["scotgm"]["summary"]
    assert (summary["escape_model"] == "on").all() and (summary["state_space"] == "signature").all()
    print(summary[["signature_shift_pvalue", "pval_any", "escape_test_pvalue"]])
    assert (summary["escape_test_pvalue"] < 1e-3).all()
    # the calls read the states: the target's effect is a strong knock-down in the perturbed state
    assert (summary["target_rank"] == 1).all()


def test_no_effect_falls_back_and_says_why():
    """Six pseudo-perturbations of control cells: the escape model's test holds its level (at most
    one of six fitted at 5%), and every fallback says why."""
    a = sg.datasets.simulate(n_genes=300, n_perturbations=1, n_control=660, n_cells_per_perturbation=40,
                             random_state=5)
    lab = a.obs["perturbation"].astype(str).to_numpy().astype(object)
    rng = np.random.default_rng(0)
    fake = rng.permutation(np.flatnonzero(lab == "control"))[:360]
    for j in range(6):
        lab[fake[60 * j: 60 * (j + 1)]] = f"NULL{j}"
    a.obs["perturbation"] = lab
    nulls = [f"NULL{j}" for j in range(6)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sg.tl.perturbation_response(a, "perturbation", "control", n_jobs=1, perturbations=nulls)
    rows = a.uns["scotgm"]["summary"].loc[nulls]
    print(rows[["escape_model", "signature_shift_pvalue", "pval_any", "escape_test_pvalue"]])
    fitted = rows["escape_model"] == "on"
    assert fitted.sum() <= 1
    assert (rows.loc[fitted, "escape_test_pvalue"] < 0.05).all()
    fell = rows[~fitted]
    assert (fell["escape_model"].str.startswith("fallback")).all()
    tested = fell["escape_test_pvalue"] >= 0.05
    assert fell.loc[tested, "escape_model"].str.contains("do not differ from the controls").all()
    assert fell.loc[~tested, "escape_model"].str.contains("perturbed state too small").all()

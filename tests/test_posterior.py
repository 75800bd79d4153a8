"""Posterior draws of a fitted perturbation: closed forms, the coupling per draw, the count layer, ArviZ groups."""

from __future__ import annotations

import warnings

import arviz as az
import numpy as np
import pytest
import xarray as xr
from scipy import stats

import scotgm_pp as sg
from scotgm_pp._validation import InputError
from scotgm_pp.inference.em import default_prior
from scotgm_pp.inference.gibbs import _sample_normal_wishart
from scotgm_pp.inference.ot import ot_cross_covariance
from scotgm_pp.tl._core import couple
from scotgm_pp.tl._posterior import draw_posterior, plan_kernel, sample_normal_wishart, state_posterior


@pytest.fixture(scope="module")
def pert(sim_fitted):
    return sorted(sim_fitted.uns["scotgm"]["summary"].index)[0]


@pytest.fixture(scope="module")
def record(sim_fitted, pert):
    return sg.tl.get_record(sim_fitted, pert)


def test_the_posterior_mode_is_the_fitted_point(record):
    """The Normal-Wishart posterior given the responsibilities has the record's means and covariances as mode."""
    d = record["nw_mean"].shape[1]
    mode = record["nw_scale_inv"] / (record["nw_dof"] - d)[:, None, None]
    np.testing.assert_allclose(mode, record["covariances"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(record["nw_mean"], record["means"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(record["nw_kappa"] - record["state_cells"], 0.01)
    np.testing.assert_allclose(record["state_cells"].sum(), record["n_control"] + record["n_guide"])


def test_state_posterior_is_the_conjugate_update():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(50, 2)) + [1.0, -2.0]
    R = np.c_[np.ones(50), np.zeros(50)]
    prior = default_prior(X, 2)
    post = state_posterior(X, R, prior)
    xbar, S = X.mean(0), (X - X.mean(0)).T @ (X - X.mean(0))
    kn = prior.kappa + 50
    np.testing.assert_allclose(post["nw_mean"][0], (prior.kappa * prior.mean + 50 * xbar) / kn)
    dm = xbar - prior.mean
    np.testing.assert_allclose(post["nw_scale_inv"][0], prior.scale_inv + S + prior.kappa * 50 / kn * np.outer(dm, dm))
    assert post["nw_dof"][0] == prior.dof + 50


def test_normal_wishart_draws_match_the_closed_form_and_the_gibbs_step():
    rng = np.random.default_rng(1)
    d, n = 3, 6000
    A = rng.normal(size=(d, d))
    psi, m, kappa, nu = A @ A.T + 5 * np.eye(d), np.array([1.0, 0.0, -1.0]), 20.0, 30.0
    mu, Sigma = sample_normal_wishart(rng, m, kappa, nu, psi, n)
    E_sigma = psi / (nu - d - 1)
    # Var(Sigma_ii) of an inverse Wishart: 2 psi_ii^2 / ((nu-d-1)^2 (nu-d-3))
    se = np.sqrt(2 * np.diag(psi) ** 2 / ((nu - d - 1) ** 2 * (nu - d - 3)) / n)
    assert np.all(np.abs(np.diag(Sigma.mean(0)) - np.diag(E_sigma)) < 4 * se)
    np.testing.assert_allclose(Sigma.mean(0), E_sigma, atol=8 * se.max())
    np.testing.assert_allclose(mu.mean(0), m, atol=4 * np.sqrt(np.diag(E_sigma) / kappa / n).max())
    np.testing.assert_allclose(np.cov(mu.T), E_sigma / kappa, rtol=0.08, atol=1e-3)
    gibbs = [_sample_normal_wishart(kappa, m, nu, psi, rng) for _ in range(2000)]
    for j in range(d):
        assert stats.ks_2samp(Sigma[:, j, j], [g[1][j, j] for g in gibbs]).pvalue > 1e-3
        assert stats.ks_2samp(mu[:, j], [g[0][j] for g in gibbs]).pvalue > 1e-3


def test_draws_recompute_the_ot_coupling_and_carry_the_count_layer(record):
    draws = draw_posterior(record, 400, np.random.default_rng(2))
    for s in range(0, 400, 97):
        np.testing.assert_allclose(draws.cross_covariance[s],
                                   ot_cross_covariance(draws.covariances[s, 0], draws.covariances[s, 1]), atol=1e-10)
    np.testing.assert_allclose(draws.perturbation_mean, draws.means[:, 1] - draws.means[:, 0])
    assert min(np.linalg.eigvalsh(c).min() for c in draws.perturbation_cov) > -1e-8
    # count layer: delta has the fitted mean and standard error, and cov(beta, delta) = -var(beta)
    se = record["count_effect_se"]
    z = (draws.effect.mean(0) - record["count_effect"]) / (se / np.sqrt(400))
    assert np.abs(z).max() < 4.5
    ratio = draws.effect.std(0, ddof=1) / se
    assert 0.85 < ratio.min() and ratio.max() < 1.15
    c = np.mean((draws.log_rate_basal - draws.log_rate_basal.mean(0)) * (draws.effect - draws.effect.mean(0)), axis=0)
    np.testing.assert_allclose(c, -draws.log_rate_basal.var(0), atol=4 * se.max() ** 2 / np.sqrt(400))
    # weights: Dirichlet posterior
    np.testing.assert_allclose(draws.weights.mean(0), record["dirichlet_posterior"] / record["dirichlet_posterior"].sum(),
                               atol=0.02)


def test_hit_and_run_plans_are_carried_per_draw(record):
    rng = np.random.default_rng(3)
    m = record["nw_mean"].shape[1]
    plans = []
    for _ in range(3):
        Q1, _ = np.linalg.qr(rng.normal(size=(m, m)))
        plans.append(0.8 * Q1)
    rec = {**record, "coupling": "hit_and_run", "coupling_plan_draws": np.stack(plans)}
    draws = draw_posterior(rec, 30, rng)
    for s in range(30):
        K = plan_kernel(draws.covariances[s, 0], draws.covariances[s, 1], draws.cross_covariance[s])
        assert min(np.abs(K - P).max() for P in plans) < 1e-6
    # the coupling step keeps the chain's plans in that convention
    S0, S1 = np.array([[1.0, 0.3], [0.3, 2.0]]), np.array([[1.5, -0.2], [-0.2, 0.8]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a short chain; its convergence is not the point here
        C, info = couple(np.zeros(2), S0, np.ones(2), S1, "hit_and_run", rng=np.random.default_rng(0),
                         coupling_kwargs={"n_steps": 400, "n_chains": 2, "temperature": 0.5})
    P = info["plan_draws"]
    assert P.shape[1:] == (2, 2) and 10 <= P.shape[0] <= 100
    assert np.linalg.norm(P, ord=2, axis=(1, 2)).max() <= 1 + 1e-8
    L0, L1 = np.linalg.cholesky(S0), np.linalg.cholesky(S1)
    np.testing.assert_allclose((L0 @ P @ L1.T).mean(0), C, atol=0.15)


def test_posterior_group_works_with_arviz(sim_fitted, pert, tmp_path):
    idata = sg.tl.posterior_draws(sim_fitted, pert, draws=100, chains=2, random_state=0)
    summary = az.summary(idata, var_names=["weights", "perturbation_mean", "effect"])
    assert summary["r_hat"].max() < 1.05 and summary["ess_bulk"].min() > 100
    post = idata.posterior
    assert post["covariances"].dims == ("chain", "draw", "state", "pc", "pc_bis")
    assert list(post["state"].values) == ["basal", "perturbed"]
    np.testing.assert_array_equal(post["gene"].values, sg.tl.get_record(sim_fitted, pert)["genes"])


def test_posterior_predictive_round_trips_and_covers_the_gene_means(sim_fitted, pert, tmp_path):
    pp = sg.tl.posterior_predictive(sim_fitted, pert, draws=10, chains=2, random_state=0)
    assert pp.posterior_predictive["counts"].dims == ("chain", "draw", "cell", "gene")
    n_guide = int(((sim_fitted.obs["perturbation"] == pert) & sim_fitted.obs["scotgm_p_perturbed"].notna()).sum())
    assert pp.observed_data["counts"].shape[0] == n_guide
    path = tmp_path / "ppc.nc"
    pp.to_netcdf(str(path))
    back = az.from_netcdf(str(path))
    assert isinstance(back, xr.DataTree) and isinstance(pp, xr.DataTree)
    for group in ("posterior_predictive", "observed_data", "posterior"):
        a, b = getattr(pp, group), getattr(back, group)
        for name in a.data_vars:
            np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=f"{group}/{name}")
    table = sg.tl.ppc_statistics(pp)
    # Measured: every gene's observed mean inside its 90% replicated interval; zero fractions of
    # the simulator's dropout (5% extra zeros) fall outside for the deep genes.
    assert table["mean_inside"].mean() >= 0.9
    assert table["zero_inside"].mean() >= 0.5
    # the response of every gene, per draw, is the predictor's
    assert np.isfinite(pp.posterior_predictive["response"].values).all()


def test_errors_name_the_fix(sim_fitted, pert, record):
    old = {k: v for k, v in record.items() if not k.startswith(("nw_", "count_effect_se"))}
    with pytest.raises(InputError, match="rerun scotgm_pp.tl.perturbation_response"):
        draw_posterior(old, 5, np.random.default_rng(0))
    with pytest.raises(InputError, match="positive"):
        sg.tl.posterior_draws(sim_fitted, pert, draws=0)
    with pytest.raises(InputError, match="'guide' or 'control'"):
        sg.tl.posterior_predictive(sim_fitted, pert, cells="escaped")


def test_ppc_figure_shows_every_gene(sim_fitted, pert):
    from matplotlib.figure import Figure

    from scotgm_pp import pl

    table = sg.tl.ppc_statistics(sg.tl.posterior_predictive(sim_fitted, pert, draws=5, chains=2))
    fig = pl.posterior_predictive_check(table)
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    for ax, col in zip(fig.axes, ("mean_inside", "zero_inside")):
        shown = sum(len(c.get_offsets()) for c in ax.collections if type(c).__name__ == "PathCollection")
        assert shown == len(table)
        assert f"{table[col].mean():.0%} of {len(table)} genes" in ax.get_title()
    with pytest.raises(ValueError, match="ppc_statistics"):
        pl.posterior_predictive_check(table[["gene"]])

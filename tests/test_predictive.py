"""The NumPy posterior predictive draws the declared graph's cells: held to pm.sample_posterior_predictive.

One small graph with the count layer and one without are compiled once per module; the same
parameter draws go through PyMC and through :mod:`scotgm_pp.models.predictive` /
``ScOTGM.sample_posterior_predictive``, and the two sets of cells are compared moment by moment
and by two-sample KS tests.
"""

from __future__ import annotations

import warnings

import arviz as az
import numpy as np
import pymc as pm
import pytest
from scipy import stats

from scotgm_pp.models import ScOTGM, build_model
from scotgm_pp.models.predictive import counterfactual_counts, draw_cells, draw_counts, draw_states, latent_scale

pytestmark = pytest.mark.slow

N_DRAWS, D, G = 300, 2, 6


def _pymc_draws(model, post: dict, var_names: list[str], seed: int = 1):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with model:
            pp = pm.sample_posterior_predictive(az.from_dict({"posterior": post}), var_names=var_names, random_seed=seed,
                                                progressbar=False)
    return pp.posterior_predictive


@pytest.fixture(scope="module")
def count_graph():
    """20 pinned controls and 40 free cells, 2 PCs, 6 genes; parameters that vary between draws."""
    rng = np.random.default_rng(0)
    n = 60
    X = rng.normal(size=(n, D))
    y = rng.poisson(5, size=(n, G))
    s = rng.uniform(500, 1500, n)
    fixed = np.r_[np.zeros(20, int), -np.ones(40, int)]
    phi = np.linspace(0.05, 0.6, G)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(X, counts=y, size_factors=s, dispersion=phi, fixed_state=fixed)
    S = N_DRAWS
    w1 = rng.uniform(0.5, 0.8, S)
    params = {
        "weights": np.c_[1 - w1, w1],
        "means": np.stack([np.zeros((S, D)), np.c_[2.0 + 0.2 * rng.normal(size=S), -1.0 + 0.2 * rng.normal(size=S)]], 1),
        "covs": np.stack([np.tile(np.eye(D), (S, 1, 1)), np.tile([[0.5, 0.2], [0.2, 1.0]], (S, 1, 1))], 1),
        "beta": np.log(np.linspace(1e-3, 1e-2, G)) + 0.05 * rng.normal(size=(S, G)),
        "delta": np.linspace(-1, 1, G) + 0.05 * rng.normal(size=(S, G)),
    }
    post = {"weights": params["weights"][None], "mean_0": params["means"][None, :, 0],
            "mean_1": params["means"][None, :, 1], "precision_0": np.linalg.inv(params["covs"][:, 0])[None],
            "precision_1": np.linalg.inv(params["covs"][:, 1])[None], "beta": params["beta"][None],
            "delta": params["delta"][None, :, None]}
    ref = _pymc_draws(model, post, ["XY"])["XY"].values  # (chain, draw, cell, PCs + genes)
    return dict(s=s, fixed=fixed, phi=phi, params=params, ref=ref)


def _numpy_free_cells(g, dependence, rng, loadings=None, resid=None):
    p, s, free = g["params"], g["s"][g["fixed"] < 0], g["fixed"] < 0
    n = int(free.sum())
    xs, ys = [], []
    for d in range(N_DRAWS):
        z = draw_states(rng, np.tile(p["weights"][d], (n, 1)))
        log_mu = np.log(s)[:, None] + p["beta"][d] + np.where(z[:, None] == 1, p["delta"][d], 0.0)
        chol = np.linalg.cholesky(p["covs"][d])
        scale = latent_scale(loadings, p["covs"][d], resid)[z] if dependence == "state" else None
        x, y = draw_cells(rng, means=p["means"][d, z], chols=chol[z], log_mu=log_mu, alpha=1 / g["phi"],
                          dependence=dependence, loadings=loadings, residual_variance=resid, scale=scale)
        xs.append(x)
        ys.append(y)
    return np.stack(xs), np.stack(ys)


def _same_law(a: np.ndarray, b: np.ndarray, what: str, rel: float = 0.03, rel_sd: float = 0.05) -> None:
    assert stats.ks_2samp(a, b).pvalue > 1e-3, what
    scale = max(np.std(b), 1e-9)
    assert abs(np.mean(a) - np.mean(b)) < rel * max(abs(np.mean(b)), scale) + 4 * scale / np.sqrt(a.size), what
    assert np.std(a) == pytest.approx(np.std(b), rel=rel_sd), what


@pytest.mark.parametrize("dependence", ["independent", "state"])
def test_numpy_cells_follow_the_graphs_posterior_predictive(count_graph, dependence):
    g, ref = count_graph, count_graph["ref"]
    V = np.array([[0.8, 0.1], [0.6, -0.2], [0.1, 0.9], [0.0, 0.7], [-0.5, 0.3], [0.2, 0.2]])
    resid = np.full(G, 0.3)
    x, y = _numpy_free_cells(g, dependence, np.random.default_rng(5), V, resid)
    pm_free = ref[0][:, g["fixed"] < 0]  # (draw, free cell, PCs + genes)
    for j in range(D):
        _same_law(x[..., j].ravel(), pm_free[..., j].ravel(), f"PC{j + 1}")
    for j in range(G):
        _same_law(y[..., j].ravel().astype(float), pm_free[..., D + j].ravel(), f"gene {j}")
        assert np.mean(y[..., j] == 0) == pytest.approx(np.mean(pm_free[..., D + j] == 0), abs=0.02)
    # Genes 0 and 1 load on PC1. Given the state the graph keeps them independent (their correlation
    # below comes from shared library sizes and mixed states only); the copula ties them.
    def corr(scores, counts):
        keep = scores[..., 0] > 1.0
        return np.corrcoef(counts[..., 0][keep], counts[..., 1][keep])[0, 1]

    r = corr(x, y)
    r_pm = corr(pm_free[..., :D], pm_free[..., D:])
    if dependence == "independent":
        assert r == pytest.approx(r_pm, abs=0.04)
    else:
        assert r > r_pm + 0.2


def test_pinned_cells_and_nb_draws_follow_the_graph(count_graph):
    g, ref = count_graph, count_graph["ref"]
    rng = np.random.default_rng(7)
    s0 = g["s"][g["fixed"] == 0]
    mu = s0[None, :, None] * np.exp(g["params"]["beta"])[:, None, :]  # (draw, cell, gene)
    y = draw_counts(rng, mu, 1 / g["phi"])
    for j in range(G):
        # heavy-tailed NB counts (dispersion up to 0.6) on 6,000 draws: the SD is noisier than the mean
        _same_law(y[..., j].ravel().astype(float), ref[0][:, g["fixed"] == 0, D + j].ravel(), f"gene {j}",
                  rel_sd=0.08)


def test_counterfactual_counts_have_the_target_law_and_keep_the_cells_rank():
    """Cells drawn in state 0 and moved give state-1 counts; each gene keeps the cell's quantile."""
    rng = np.random.default_rng(3)
    n, d, Gs = 20000, 2, 4
    alpha = np.array([2.0, 5.0, 0.8, 50.0])
    mu0 = np.array([3.0, 10.0, 0.5, 40.0])
    mu1 = mu0 * np.exp([-1.0, 0.5, 0.7, -0.3])
    y0 = draw_counts(rng, np.tile(mu0, (n, 1)), alpha)
    V = np.array([[0.7, 0.0], [0.7, 0.0], [0.0, 0.7], [0.0, 0.7]])
    scale = np.ones((n, Gs))
    eye = np.tile(np.eye(d), (n, 1, 1))
    y1, a, a1 = counterfactual_counts(rng, y0, log_mu_from=np.log(np.tile(mu0, (n, 1))),
                                      log_mu_to=np.log(np.tile(mu1, (n, 1))), alpha=alpha, loadings=V,
                                      scale_from=scale, scale_to=scale, transport=eye, noise_chol=0 * eye)
    ref = draw_counts(rng, np.tile(mu1, (n, 1)), alpha)
    for j in range(Gs):
        assert y1[:, j].mean() == pytest.approx(mu1[j], rel=0.03)
        assert y1[:, j].var() == pytest.approx(ref[:, j].var(), rel=0.08)
        assert np.mean(y1[:, j] == 0) == pytest.approx(np.mean(ref[:, j] == 0), abs=0.01)
        assert stats.spearmanr(y0[:, j], y1[:, j]).correlation > 0.8
    np.testing.assert_allclose(a1, a)


@pytest.fixture(scope="module")
def gaussian_fit():
    rng = np.random.default_rng(11)
    X = np.vstack([rng.normal(size=(80, D)), rng.normal(size=(80, D)) * [1.0, 0.6] + [2.5, -1.0]])
    fixed = np.r_[np.zeros(40, int), -np.ones(120, int)]
    model = ScOTGM(random_state=0, draws=150, tune=50, chains=2).fit(X, fixed_state=fixed, method="mcmc")
    return X, fixed, model


def test_scotgm_replicates_follow_pymc_on_the_gaussian_graph(gaussian_fit):
    X, fixed, model = gaussian_fit
    post = model.idata.posterior  # named as the graph's variables: PyMC reads it as it is
    pm_post = {name: post[name].values for name in ("weights", "mean_0", "mean_1", "precision_0", "precision_1")}
    ref = _pymc_draws(model.model, pm_post, ["X"])["X"].values
    ours = model.sample_posterior_predictive(random_state=2)
    Xr = ours.posterior_predictive["X"]
    assert Xr.dims == ("chain", "draw", "cell", "pc") and Xr.shape[:2] == (2, 150)
    free = fixed < 0
    for j in range(D):
        _same_law(Xr.values[:, :, free, j].ravel(), ref[:, :, free, j].ravel(), f"free PC{j + 1}")
        _same_law(Xr.values[:, :, ~free, j].ravel(), ref[:, :, ~free, j].ravel(), f"pinned PC{j + 1}")
    np.testing.assert_array_equal(ours.posterior_predictive["state"].values[:, :, ~free], 0)
    assert "observed_data" in ours.children


def test_scotgm_new_cells_and_round_trip(gaussian_fit, tmp_path):
    model = gaussian_fit[2]
    new = model.sample_posterior_predictive(500, state="perturbed", draws=20, random_state=0,
                                            extend_inferencedata=True)
    x = new.posterior_predictive["X"].values
    assert x.shape == (2, 20, 500, D)
    post = model.idata.posterior
    np.testing.assert_allclose(x.mean((0, 1, 2)), post["means"].values[:, :, 1].mean((0, 1)), atol=0.05)
    again = model.sample_posterior_predictive(500, state="perturbed", draws=20, random_state=0)
    np.testing.assert_array_equal(again.posterior_predictive["X"].values, x)
    loaded = ScOTGM.load(model.save(tmp_path / "with_pp.nc"))
    np.testing.assert_array_equal(loaded.idata.posterior_predictive["X"].values, x)
    with pytest.raises(ValueError, match="pass n="):
        model.sample_posterior_predictive(state="perturbed")

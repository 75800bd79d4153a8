"""A modeller's package (issue 16): every fit hands back its PyMC model, which PyMC and ArviZ tools
accept as they are: clone, NUTS with a per-cell log-likelihood, LOO, prior and posterior predictive."""

from __future__ import annotations

import warnings

import arviz as az
import numpy as np
import pymc as pm
import pytest

import scotgm_pp as sg
from scotgm_pp.models import ConvergenceWarning, ScOTGM, model_point

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def screen():
    adata = sg.datasets.simulate(n_genes=200, n_perturbations=3, n_control=300, n_cells_per_perturbation=80,
                                 random_state=0)
    sg.tl.perturbation_response(adata, "perturbation", "control", n_pcs=5, n_jobs=1)
    return adata


@pytest.fixture(scope="module")
def screen_pca():
    adata = sg.datasets.simulate(n_genes=200, n_perturbations=3, n_control=300, n_cells_per_perturbation=80,
                                 random_state=0)
    sg.tl.perturbation_response(adata, "perturbation", "control", n_pcs=5, n_jobs=1, state_space="pca")
    return adata


@pytest.fixture(scope="module")
def nuts_fit(screen):
    P = sorted(sg.tl.get_responses(screen).obs_names)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return sg.tl.get_model(screen, P, method="nuts", draws=300, tune=300, chains=2)


def _three_perturbation_cells(seed: int):
    """Controls, and guide cells of perturbations A and B with 30% / 50% escaped cells."""
    rng = np.random.default_rng(seed)
    d = 4
    shift = {"A": np.array([3.0, 0, 0, 0]), "B": np.array([0, 3.0, 0, 0])}
    X = [rng.normal(size=(200, d))]
    labels = ["NT"] * 200
    truth = [np.zeros(200, int)]
    for k, (g, esc) in enumerate((("A", 0.3), ("B", 0.5)), start=1):
        escaped = rng.random(100) < esc
        X.append(rng.normal(size=(100, d)) + np.where(escaped[:, None], 0.0, shift[g]))
        labels += [g] * 100
        truth.append(np.where(escaped, 0, k))
    return np.vstack(X), np.array(labels), np.concatenate(truth)


def test_get_model_is_the_signature_state_model_that_made_the_calls(screen):
    from scotgm_pp.inference.em import default_prior
    from scotgm_pp.inference.joint_em import conditional_full_m_step

    for P in sg.tl.get_responses(screen).obs_names:
        fit = sg.tl.get_model(screen, P)
        record = sg.tl.get_record(screen, P)
        assert record["state_space"] == "signature" and fit.idata.observed_data["X"].shape[1] == 1
        assert np.max(np.abs(fit.idata.map_estimate["means"].values - record["state_means"])) <= 1e-10
        assert np.max(np.abs(fit.idata.map_estimate["weights"].values - record["weights"])) <= 1e-10
        # the screen's escaped / perturbed calls are the graph's state posteriors
        cells = fit.idata.observed_data["cell"].values.astype(str)
        guide = record["state_fixed_state"] < 0
        p = screen.obs.loc[cells[guide], "scotgm_p_perturbed"].to_numpy()
        np.testing.assert_allclose(fit.responsibilities[guide, 1], p, atol=1e-10)
        # the PCA-space states (coupling, mu, sigma) are the M-step given those posteriors
        pca = conditional_full_m_step(record["pca_scores"], fit.responsibilities,
                                      default_prior(record["pca_scores"], 2, regularization=0.01))
        np.testing.assert_allclose(record["means"], pca[0], atol=1e-8)


def test_get_model_returns_the_screens_own_fit_as_a_pymc_model(screen_pca):
    from pymc.model.fgraph import clone_model

    screen = screen_pca
    for P in sg.tl.get_responses(screen).obs_names:
        fit = sg.tl.get_model(screen, P)
        record = sg.tl.get_record(screen, P)
        assert np.max(np.abs(fit.idata.map_estimate["means"].values - record["means"])) <= 1e-10
        assert np.max(np.abs(fit.idata.map_estimate["weights"].values - record["weights"])) <= 1e-10
        # the graph's gene-level shift V (mean_1 - mean_0) is the screen's mu layer (loadings kept as float32)
        gene_mean = fit.idata.map_estimate["perturbation_gene_mean"].sel(contrast="perturbed - basal")
        mu = sg.tl.get_responses(screen)[P].to_df(layer="mu").iloc[0].reindex(gene_mean["gene"].values)
        np.testing.assert_allclose(gene_mean.values, mu.to_numpy(), atol=1e-5 * np.abs(mu.to_numpy()).max())
    model = fit.model
    assert isinstance(model, pm.Model)
    assert {"state", "pc", "cell", "gene"} <= set(model.coords)
    assert len(model.coords["cell"]) == fit.idata.observed_data.sizes["cell"]
    assert model.named_vars_to_dims["X"] == ("cell", "pc")
    # the graph's own deterministics at the EM point are the map group's values
    point = model_point(model, fit.idata.map_estimate["weights"].values, fit.idata.map_estimate["means"].values,
                        fit.idata.map_estimate["precisions"].values)
    for name in ("perturbation_gene_mean", "covariances"):
        out = model.replace_rvs_by_values([model[name]])[0]
        fn = model.compile_fn(out, inputs=model.value_vars, on_unused_input="ignore")
        np.testing.assert_allclose(fn(point), fit.idata.map_estimate[name].values, rtol=1e-8, atol=1e-12)
    clone = clone_model(model)  # no initval= in the graph, so PyMC's own tools take it
    assert set(clone.named_vars) == set(model.named_vars)
    with pytest.raises(KeyError, match="no results"):
        sg.tl.get_model(screen, "not_a_perturbation")


def test_get_model_takes_model_config_changes_such_as_a_shift_prior(screen):
    """Issue 24 item 3 through get_model: the shift parametrisation with its own prior, fitted by
    MAP; EM refuses the changed graph and says what to call."""
    P = sorted(sg.tl.get_responses(screen).obs_names)[1]
    em = sg.tl.get_model(screen, P)
    fit = sg.tl.get_model(screen, P, method="map", model_config={"mean_parametrization": "shift", "shift_sd": 2.0})
    assert fit.model_config["mean_parametrization"] == "shift" and fit.model_config["shift_sd"] == 2.0
    # the screen's prior settings are the base
    assert fit.model_config["prior"] == em.model_config["prior"]
    assert "shift_1" in {v.name for v in fit.model.free_RVs}
    point = fit.idata.map_estimate
    np.testing.assert_allclose(point["means"].values[1] - point["means"].values[0], point["shift_1"].values,
                               atol=1e-10)
    # on one signature score with 80 guide cells the N(0, 2) shift prior barely moves the means
    np.testing.assert_allclose(point["means"].values, em.idata.map_estimate["means"].values, atol=0.05)
    with pytest.raises(ValueError, match="method='map'"):
        sg.tl.get_model(screen, P, model_config={"mean_parametrization": "shift"})
    with pytest.raises(ValueError, match="mean_parametrization"):
        sg.tl.get_model(screen, P, method="map", model_config={"mean_parametrization": "sideways"})


def test_nuts_fit_has_log_likelihood_loo_and_a_posterior_predictive(nuts_fit):
    import matplotlib

    matplotlib.use("Agg")
    idata = nuts_fit.idata
    assert {"posterior", "log_likelihood", "sample_stats"} <= set(idata.children)
    assert idata.log_likelihood["X"].dims == ("chain", "draw", "cell")
    loo = az.loo(idata)
    assert np.isfinite(loo.elpd) and loo.pareto_k.shape == (idata.observed_data["X"].shape[0],)
    rhat = az.rhat(idata, var_names=["weights", "means", "covariances"])
    assert max(float(rhat[v].max()) for v in ("weights", "means", "covariances")) <= 1.05
    assert set(idata.posterior.data_vars) <= set(nuts_fit.model.named_vars)
    ppc = nuts_fit.sample_posterior_predictive(draws=50)
    assert ppc.posterior_predictive["X"].dims == ("chain", "draw", "cell", "pc")
    pc = az.plot_ppc_dist(ppc, var_names=["X"], num_samples=20, backend="matplotlib")
    ax = pc.viz["plot"]["X"].values.ravel()[0]
    assert len(ax.lines) >= 20 + 1  # the predictive draws, and the observed density
    # PyMC's own posterior predictive reads the posterior as it is (names shared with the graph):
    # no parameter is redrawn from the prior, so the replicated cells have the observed spread
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pp = pm.sample_posterior_predictive(idata, model=nuts_fit.model, var_names=["X"], random_seed=0,
                                            progressbar=False)
    sd_rep = pp.posterior_predictive["X"].values.std(axis=(0, 1, 2))
    sd_obs = idata.observed_data["X"].values.std(axis=0)
    np.testing.assert_allclose(sd_rep, sd_obs, rtol=0.15)
    # NUTS agrees with the EM point within its posterior spread
    em = ScOTGM(model_config=nuts_fit.model_config, m_step=nuts_fit.settings["m_step"], max_iter=500,
                tol=1e-10).fit(idata.observed_data["X"].values, allowed_states=idata.constant_data["allowed_states"].values)
    post = idata.posterior["means"].values.reshape(-1, 2, idata.posterior.sizes["pc"])
    assert np.all(np.abs(post.mean(0) - em.idata.map_estimate["means"].values) < 3 * post.std(0) + 0.05)


def test_default_prior_predictive_stays_on_the_data_scale(screen):
    P = sorted(sg.tl.get_responses(screen).obs_names)[1]
    X = sg.tl.get_record(screen, P)["state_scores"]
    fixed = sg.tl.get_record(screen, P)["state_fixed_state"]
    model = ScOTGM(random_state=0)
    model.build_model(X, fixed_state=np.where(fixed == 0, 0, -1))
    pp = model.sample_prior_predictive(500)
    p99 = float(np.percentile(np.abs(pp.prior_predictive["X"].values), 99))
    observed = float(np.abs(X).max())
    print(f"prior predictive 99th percentile |x| {p99:.1f}, largest |observed| {observed:.1f}")
    assert p99 <= 10 * observed
    assert {"prior", "prior_predictive"} <= set(model.idata.children)
    assert set(pp.prior.data_vars) <= set(model.model.named_vars)


def test_save_load_keeps_model_config_and_refits_the_same(tmp_path):
    X, labels, _ = _three_perturbation_cells(1)
    config = {"n_states": 3, "state_names": ["basal", "A", "B"], "covariance": "tied"}
    fit = ScOTGM(model_config=config, random_state=0).fit(X, labels=labels, control="NT")
    loaded = ScOTGM.load(fit.save(tmp_path / "tied3.nc"))
    assert loaded.model_config == fit.model_config and loaded.model_config["covariance"] == "tied"
    assert loaded.sampler_config == fit.sampler_config and loaded.settings == fit.settings
    # the rebuilt graph is the same model: same log density at the fitted point
    point = {k: fit.idata.map_estimate[k].values for k in ("weights", "mean_0", "mean_1", "mean_2", "precision")}
    lp_fit = fit.model.compile_logp(jacobian=False)(fit.model.initial_point() | _transformed(fit.model, point))
    lp_loaded = loaded.model.compile_logp(jacobian=False)(loaded.model.initial_point() | _transformed(loaded.model, point))
    assert lp_fit == pytest.approx(lp_loaded, rel=1e-12)
    assert lp_fit == pytest.approx(float(fit.idata.map_estimate["lp"].values), rel=1e-9)
    refit = loaded.fit(X, labels=labels, control="NT")
    np.testing.assert_array_equal(refit.idata.map_estimate["means"].values, fit.idata.map_estimate["means"].values)


def _transformed(model, values: dict) -> dict:
    out = {}
    for rv in model.free_RVs:
        value_var = model.rvs_to_values[rv]
        transform = model.rvs_to_transforms.get(rv)
        raw = values[rv.name]
        out[value_var.name] = raw if transform is None else transform.forward(raw).eval()
    return out


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_guide_cells_restricted_to_basal_or_their_own_state(seed):
    """One perturbed state per perturbation, guide cells allowed {basal, their own state}. The tied
    covariance, as in the screen's escape model: with full covariances a state may widen to cover
    both modes of its guide cells (seed 2: that is the higher log density, accuracy 0.74)."""
    X, labels, truth = _three_perturbation_cells(seed)
    fit = ScOTGM(state_names=["basal", "A", "B"], n_states=3, covariance="tied", random_state=0).fit(
        X, labels=labels, control="NT")
    R = fit.responsibilities
    guide = labels != "NT"
    assert np.all(R[labels == "A", 2] == 0) and np.all(R[labels == "B", 1] == 0)
    accuracy = float(np.mean(R[guide].argmax(1) == truth[guide]))
    print(f"seed {seed}: guide-cell state accuracy {accuracy:.3f}")
    assert accuracy >= 0.88  # Bayes error at a 3-SD shift in 4 PCs is about 7%
    means = fit.idata.map_estimate["means"].values
    np.testing.assert_allclose(means[1] - means[0], [3, 0, 0, 0], atol=0.6)
    np.testing.assert_allclose(means[2] - means[0], [0, 3, 0, 0], atol=0.6)
    with pytest.raises(ValueError, match="method='nuts'"):
        ScOTGM(state_names=["basal", "A", "B"], n_states=3).fit(X, labels=labels, control="NT", method="mcmc")
    with pytest.raises(ValueError, match="name no state"):
        ScOTGM(state_names=["basal", "A", "C"], n_states=3).fit(X, labels=labels, control="NT")


def test_tied_covariance_runs_every_method_and_samplers_warn():
    X, labels, _ = _three_perturbation_cells(4)
    two = np.where(labels == "B", "A", labels)
    em = ScOTGM(covariance="tied", random_state=0).fit(X, labels=two, control="NT")
    map_ = ScOTGM(covariance="tied", random_state=0).fit(X, labels=two, control="NT", method="map")
    assert float(map_.idata.map_estimate["lp_gain_over_em"].values) <= 1e-6 * abs(float(em.idata.map_estimate["lp"].values))
    with pytest.warns(ConvergenceWarning, match="R-hat"):
        gibbs = ScOTGM(covariance="tied", random_state=0, draws=30, tune=5).fit(X, labels=two, control="NT",
                                                                                method="mcmc")
    covs = gibbs.idata.posterior["covariances"].values
    np.testing.assert_array_equal(covs[:, :, 0], covs[:, :, 1])  # one shared covariance per draw
    assert "precision" in gibbs.idata.posterior and "precision_0" not in gibbs.idata.posterior
    assert gibbs.idata.log_likelihood["X"].shape == (2, 30, X.shape[0])


def test_an_extended_graph_is_fitted_by_gradient_methods_and_refused_by_em():
    """clone_model + a shrinkage prior on the perturbation: MAP fits it from the EM start of the
    built graph; EM and Gibbs say which variable they do not know."""
    from pymc.model.fgraph import clone_model

    X, labels, _ = _three_perturbation_cells(5)
    two = np.where(labels == "B", "A", labels)
    base = ScOTGM(random_state=0).fit(X, labels=two, control="NT")
    extended = clone_model(base.model)
    with extended:
        scale = pm.HalfNormal("shift_scale", 0.05)  # a strong pull of the shift towards 0
        pm.Potential("shift_shrinkage", pm.logp(pm.Normal.dist(0.0, scale), extended["perturbation_mean"][0]).sum())
    for method in ("em", "mcmc"):
        with pytest.raises(ValueError, match=r"adds \['shift_scale'\]"):
            ScOTGM(random_state=0).fit(X, labels=two, control="NT", method=method, model=extended)
    shrunk = ScOTGM(random_state=0).fit(X, labels=two, control="NT", method="map", model=extended)
    assert shrunk.model is extended and "shift_scale" in shrunk.model.named_vars
    free = np.linalg.norm(base.idata.map_estimate["perturbation_mean"].values)
    pulled = np.linalg.norm(shrunk.idata.map_estimate["perturbation_mean"].values)
    print(f"|shift| {free:.2f} without the shrinkage prior, {pulled:.2f} with it")
    assert pulled < 0.8 * free

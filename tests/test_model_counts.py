"""The modeller's graph is the graph that answers (issue 24).

``sg.tl.get_model(..., counts=True)`` is the graph of the states and the negative-binomial count
layer (by default the cut the screen answers with); fitted by EM it reproduces the screen's
effects and NUTS samples the same graph; every helper either works through
PyMC on ``.model`` or refuses an extended graph; the keywords, seeds and flags a PyMC user
expects behave as PyMC's do.
"""

from __future__ import annotations

import warnings

import arviz as az
import numpy as np
import pymc as pm
import pytensor.tensor as pt
import pytest
import xarray as xr

import scotgm_pp as sg
from scotgm_pp.models import ConvergenceWarning, ScOTGM
from scotgm_pp.models.graph import cell_log_weights, gaussian_log_densities

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def screen():
    adata = sg.datasets.simulate(n_genes=200, n_perturbations=3, n_control=300, n_cells_per_perturbation=80,
                                 random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sg.tl.perturbation_response(adata, "perturbation", "control", n_pcs=5, n_jobs=1)
    return adata


@pytest.fixture(scope="module")
def count_nuts(screen):
    """NUTS on the default (cut) count graph of one perturbation with its target and four more genes."""
    P = sorted(sg.tl.get_responses(screen).obs_names)[0]
    genes = _screen_genes(screen, P, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        fit = sg.tl.get_model(screen, P, method="nuts", counts=True, genes=genes, draws=200, tune=200, chains=2,
                              random_seed=1)
    return P, genes, fit


def _screen_genes(adata, P, n):
    """The target and the genes the screen ranked highest by |effect_z|."""
    z = sg.tl.get_responses(adata)[P].to_df(layer="effect_z").iloc[0].dropna()
    others = [g for g in z.abs().sort_values(ascending=False).index if g != P]
    return [P] + others[: n - 1]


def _screen_layer(adata, P, layer, genes):
    return sg.tl.get_responses(adata)[P].to_df(layer=layer).iloc[0].reindex(genes).to_numpy()


def test_get_model_with_counts_reproduces_the_screens_effects(screen):
    for P in sorted(sg.tl.get_responses(screen).obs_names):
        fit = sg.tl.get_model(screen, P, counts=True)
        assert [v.name for v in fit.model.observed_RVs] == ["XY"]
        assert {"beta", "delta"} <= {v.name for v in fit.model.free_RVs}
        table = fit.effects()
        genes = table["gene"].tolist()
        assert len(genes) == 20 and genes[0] == P  # the target first, then the screen's top genes
        effect = _screen_layer(screen, P, "effect", genes)
        assert np.max(np.abs(table["effect"].to_numpy() - effect)) <= 1e-4
        se = _screen_layer(screen, P, "effect_se", genes)
        assert np.max(np.abs(table["effect_se"].to_numpy() - se)) <= 1e-4
        assert {"effect", "effect_se", "effect_z", "effect_bound", "effect_pvalue"} <= set(table.columns)
        assert fit.effect(P)["effect"] == pytest.approx(effect[0], abs=1e-4)
        # the cut EM's states are the screen's escape calls
        cells = fit.idata.observed_data["cell"].values.astype(str)
        guide = sg.tl.get_record(screen, P)["state_fixed_state"] < 0
        np.testing.assert_allclose(fit.responsibilities[guide, 1],
                                   screen.obs.loc[cells[guide], "scotgm_p_perturbed"].to_numpy(), atol=1e-8)
    with pytest.raises(KeyError, match="not in the count layer"):
        fit.effect("no_such_gene")
    with pytest.raises(ValueError, match="not genes the screen kept"):
        sg.tl.get_model(screen, P, counts=True, genes=["no_such_gene"])
    with pytest.raises(ValueError, match="no count layer"):
        sg.tl.get_model(screen, P).effects()


def test_a_count_fit_saves_loads_and_replicates_counts_through_pymc(screen, tmp_path):
    P = sorted(sg.tl.get_responses(screen).obs_names)[1]
    fit = sg.tl.get_model(screen, P, counts=True, genes=_screen_genes(screen, P, 6))
    back = ScOTGM.load(fit.save(tmp_path / "fit.nc"))
    np.testing.assert_allclose(back.effects()["effect"].to_numpy(), fit.effects()["effect"].to_numpy(), atol=1e-12)
    np.testing.assert_allclose(back.responsibilities, fit.responsibilities, atol=1e-12)
    assert [v.name for v in back.model.observed_RVs] == ["XY"]
    pp = back.sample_posterior_predictive(draws=1, random_seed=0)
    rep = pp.posterior_predictive["XY"].values[0, 0]
    observed = fit.idata.observed_data["XY"].values
    d = fit.idata.constant_data.sizes["pc"]
    counts = rep[:, d:]
    assert rep.shape == observed.shape and np.all(counts >= 0) and np.all(counts == np.round(counts))
    # replicated counts per gene on the observed scale (one draw of a few hundred cells)
    ratio = counts.mean(0) / observed[:, d:].mean(0)
    assert np.all((ratio > 0.6) & (ratio < 1.6)), ratio
    with pytest.raises(ValueError, match="replicate the observed cells"):
        back.sample_posterior_predictive(n=10)


def test_count_graph_nuts_samples_the_cut_the_screen_answers_with(screen, count_nuts):
    P, genes, fit = count_nuts
    idata = fit.idata
    assert idata.log_likelihood["XY"].dims == ("chain", "draw", "cell")
    assert np.isfinite(az.loo(idata).elpd)
    rhat = float(az.rhat(idata, var_names=["delta"])["delta"].max())
    assert rhat <= 1.1
    row = fit.effect(P)
    screen_effect = _screen_layer(screen, P, "effect", [P])[0]
    # the default graph is the cut: NUTS samples the graph whose mode is the screen's effect
    assert "state_probability" in fit.model.named_vars
    print(f"NUTS (cut) target {row['effect']:.3f} +- {row['effect_se']:.3f}; screen {screen_effect:.3f}; "
          f"R-hat {rhat:.3f}")
    assert abs(row["effect"] - screen_effect) <= 2 * row["effect_se"]
    assert idata.attrs["weights_from_prior_only"] == 0
    # the cut's states see the scores only: the responsibilities are the Gaussian graph's,
    # averaged over the draws (controls stay basal)
    R = fit.responsibilities
    controls = idata.constant_data["allowed_states"].values.sum(axis=1) == 1
    np.testing.assert_allclose(R.sum(axis=1), 1.0, atol=1e-12)
    np.testing.assert_array_equal(R[controls, 0], 1.0)
    em_R = fit.model["state_probability"].get_value()
    np.testing.assert_allclose(idata.constant_data["state_probability"].values, em_R, atol=0)
    assert np.corrcoef(R[~controls, 1], em_R[~controls, 1])[0, 1] > 0.9


def test_cut_and_joint_graphs_have_the_closed_form_log_density(screen):
    """``compile_logp`` of both count graphs at the EM point equals the NumPy log density: the
    joint marginal, and the cut's scores' mixture plus the responsibility-weighted count terms."""
    from scotgm_pp.inference.joint_em import joint_log_density
    from scotgm_pp.models._counts import count_params_from
    from scotgm_pp.models.graph import model_point

    P = sorted(sg.tl.get_responses(screen).obs_names)[2]
    genes = _screen_genes(screen, P, 4)
    fits = {e: sg.tl.get_model(screen, P, counts=True, genes=genes, count_evidence=e) for e in ("cut", "joint")}
    cut = fits["cut"]
    point = cut.idata["map_estimate"].to_dataset()  # the cut EM's point, where both graphs are evaluated
    counts = count_params_from(point, cut.n_states)
    w, m, c = (point[v].values for v in ("weights", "means", "covariances"))
    R = cut.idata["em"]["responsibilities"].values
    values = {}
    for evidence, fit in fits.items():
        model, data = fit.model, fit._data
        lp = float(model.compile_logp(jacobian=False)(
            model.initial_point(random_seed=0) | model_point(model, w, m, np.linalg.inv(c), counts)))
        cd = data["counts"]
        closed = joint_log_density(data["X"], cd.Y, size_factors=cd.size_factors, dispersion=cd.dispersion,
                                   weights=w, means=m, covariances=c, params=counts, prior=data["prior"],
                                   count_prior=cd.prior, fixed_state=data["fixed"], batch=cd.batch,
                                   covariance=fit.model_config["covariance"],
                                   state_probability=R if evidence == "cut" else None)
        assert lp == pytest.approx(closed, rel=1e-9, abs=1e-6)
        values[evidence] = lp
    # the cut EM's reported log density is its graph's
    assert float(point["lp"]) == pytest.approx(values["cut"], rel=1e-9, abs=1e-6)
    # two different densities at the same point
    assert abs(values["cut"] - values["joint"]) > 1.0


def test_no_group_of_a_fit_is_named_like_a_tree_or_dataset_attribute(screen, count_nuts):
    P = sorted(sg.tl.get_responses(screen).obs_names)[0]
    fits = [sg.tl.get_model(screen, P), sg.tl.get_model(screen, P, counts=True), count_nuts[2]]
    X = sg.tl.get_record(screen, P)["state_scores"]
    fixed = sg.tl.get_record(screen, P)["state_fixed_state"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # 20 draws: only the tree's layout matters here
        fits.append(ScOTGM(random_state=0).fit(X, fixed_state=fixed, method="mcmc", draws=20, tune=20, chains=2))
    reserved = set(dir(xr.DataTree)) | set(dir(xr.Dataset))
    for fit in fits:
        names = set(fit.idata.children)
        assert names and not names & reserved, names & reserved
        fit.idata.map_over_datasets(lambda ds: ds)  # no group shadows a method


def test_get_model_prior_predictive_is_on_the_scale_of_the_scores(screen):
    for P in sorted(sg.tl.get_responses(screen).obs_names):
        model = sg.tl.get_model(screen, P)
        pp = model.sample_prior_predictive(500, random_seed=0, extend_inferencedata=False)
        p99 = float(np.percentile(np.abs(pp.prior_predictive["X"].values), 99))
        observed = float(np.abs(model.idata.observed_data["X"].values).max())
        print(f"{P}: prior predictive p99 |x| {p99:.2f}, largest |observed| {observed:.2f}")
        assert p99 <= 10 * observed


def _offset_screen(seed=0):
    """Controls and guide cells (30% escaped) from three replicates whose means differ."""
    rng = np.random.default_rng(seed)
    n_ctrl, n_guide, d = 240, 160, 2
    rep = rng.integers(0, 3, n_ctrl + n_guide)
    offset = np.array([[0.0, 0.0], [0.4, 0.2], [-0.6, -0.4]])
    perturbed = np.r_[np.zeros(n_ctrl, bool), rng.random(n_guide) > 0.3]
    X = rng.normal(size=(n_ctrl + n_guide, d)) + offset[rep] + np.where(perturbed[:, None], [2.5, 0.0], 0.0)
    labels = np.r_[np.repeat("NT", n_ctrl), np.repeat("G", n_guide)]
    return X, labels, rep


def _rep_offset_graph(base: ScOTGM, rep: np.ndarray) -> pm.Model:
    """The built graph's states, with a per-replicate offset on every state mean (an extension)."""
    coords = {k: v for k, v in base.model.coords.items()} | {"rep": ["r0", "r1", "r2"]}
    data = base.idata.constant_data
    with pm.Model(coords=coords) as model:
        allowed = pm.Data("allowed_states", data["allowed_states"].values, dims=("cell", "state"))
        weights = pm.Dirichlet("weights", a=np.ones(2), dims="state")
        mean_0 = pm.Normal("mean_0", 0.0, 5.0, dims="pc")
        mean_1 = pm.Normal("mean_1", 0.0, 5.0, dims="pc")
        sd = pm.HalfNormal("sd", 2.0, dims="pc")
        offset = pm.Normal("rep_offset", 0.0, 1.0, dims=("rep", "pc"))
        shift = pt.concatenate([pt.zeros((1, 2)), offset[1:]])[rep]  # r0 is the reference
        means = pm.Deterministic("means", pt.stack([mean_0, mean_1]), dims=("state", "pc"))
        lam = pt.diag(1.0 / sd**2)
        precisions = pm.Deterministic("precisions", pt.stack([lam, lam]), dims=("state", "pc", "pc_bis"))
        pm.Deterministic("covariances", pt.stack([pt.diag(sd**2)] * 2), dims=("state", "pc", "pc_bis"))
        log_w = cell_log_weights(weights, allowed)

        def logp(value, means, precisions, log_w, shift, sd):
            return pt.logsumexp(gaussian_log_densities(value - shift, means, precisions, 2) + log_w, axis=-1)

        def draw(means, precisions, log_w, shift, sd, size):
            z = pm.Categorical.dist(logit_p=log_w)
            return means[z] + shift + pm.Normal.dist(0.0, 1.0, shape=shift.shape) * sd

        pm.CustomDist("X", means, precisions, log_w, shift, sd, logp=logp, dist=draw,
                      observed=base.idata.observed_data["X"].values, dims=("cell", "pc"))
    return model


def test_an_extended_graph_predicts_through_pymc_and_its_helpers_refuse(tmp_path):
    X, labels, rep = _offset_screen()
    base = ScOTGM(random_state=0).fit(X, labels=labels, control="NT")
    ext = _rep_offset_graph(base, rep)
    fit = ScOTGM(random_state=0).fit(X, labels=labels, control="NT", method="map", model=ext)
    point = fit.idata.map_estimate
    assert "rep_offset" in point and "sd" in point  # every MAP value kept
    assert "lp_gain_over_em" not in point  # no gain across two different graphs
    np.testing.assert_allclose(point["rep_offset"].values[1:], [[0.4, 0.2], [-0.6, -0.4]], atol=0.2)
    ours = fit.sample_posterior_predictive(draws=1, random_seed=0)["posterior_predictive"]["X"].values
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = pm.sample_posterior_predictive(fit.point_as_posterior(), model=fit.model, var_names=["X"],
                                                random_seed=1, progressbar=False).posterior_predictive["X"].values
    replicates = 40
    ours = np.concatenate([ours] + [fit.sample_posterior_predictive(draws=1, random_seed=s)["posterior_predictive"]
                                    ["X"].values for s in range(1, replicates)], axis=1)[0]
    for r in range(3):
        mine, pymc_means = ours[:, rep == r].mean(axis=(0, 1)), theirs[0, 0, rep == r].mean(axis=0)
        observed = X[rep == r].mean(axis=0)
        se = X[rep == r].std(axis=0) / np.sqrt((rep == r).sum())
        assert np.all(np.abs(mine - observed) <= 3 * se / np.sqrt(replicates) + 0.05), (r, mine, observed)
        assert np.all(np.abs(pymc_means - mine) <= 4 * se), (r, pymc_means, mine)
    for name, call in (("responsibilities", lambda f: f.responsibilities), ("predict_proba", lambda f: f.predict_proba(X))):
        with pytest.raises(ValueError, match=f"{name} knows only the built graph.*rep_offset"):
            call(fit)
    path = fit.save(tmp_path / "extended.nc")
    with pytest.warns(UserWarning, match=r"extended graph \(extra variables \['rep_offset', 'sd'\]\)"):
        back = ScOTGM.load(path)
    with pytest.raises(ValueError, match="extended"):
        back.responsibilities


def test_pymc_names_and_method_keywords():
    X, labels, _ = _offset_screen(1)
    a = ScOTGM().fit(X, labels=labels, control="NT", random_seed=3, n_init=2)
    b = ScOTGM(random_state=3).fit(X, labels=labels, control="NT", n_init=2)
    np.testing.assert_array_equal(a.idata.map_estimate["means"].values, b.idata.map_estimate["means"].values)
    with pytest.raises(TypeError, match=r"method='em' takes init_responsibilities, max_iter, n_init, tol .*'draws'.*method='nuts'"):
        ScOTGM().fit(X, labels=labels, control="NT", draws=100)
    with pytest.raises(TypeError, match=r"method='mcmc' takes chains, draws, tune .*'max_iter'"):
        ScOTGM().fit(X, labels=labels, control="NT", method="mcmc", max_iter=5)
    p1 = a.sample_prior_predictive(20, random_seed=5, extend_inferencedata=False).prior_predictive["X"].values
    p2 = a.sample_prior_predictive(20, random_state=5, extend_inferencedata=False).prior_predictive["X"].values
    np.testing.assert_array_equal(p1, p2)
    with pytest.raises(TypeError, match="random_seed or random_state, not both"):
        a.sample_posterior_predictive(random_seed=1, random_state=1)


def test_weights_from_the_prior_alone_are_flagged():
    X, labels, _ = _offset_screen(2)
    fixed = np.where(labels == "NT", 0, 1)  # every cell pinned: nothing informs the weights
    with pytest.warns(UserWarning, match="no cell is free"):
        fit = ScOTGM(random_state=0).fit(X, fixed_state=fixed)
    assert fit.idata.attrs["weights_from_prior_only"] == 1
    free = ScOTGM(random_state=0).fit(X, labels=labels, control="NT")
    assert free.idata.attrs["weights_from_prior_only"] == 0


def test_other_chains_start_from_em_runs_of_random_states():
    """A screen whose free cells split two ways: the chains' starting points are EM solutions
    from random state assignments, not all the EM solution chain 0 starts from."""
    rng = np.random.default_rng(0)
    X = np.vstack([rng.normal(size=(150, 2)) + [2.0, 0], rng.normal(size=(150, 2)) - [2.0, 0]])
    from scotgm_pp.inference.em import fit_em

    model = ScOTGM(random_state=0)
    model.build_model(X)  # every cell free: the two labellings are both modes
    start = fit_em(X, n_states=2, prior=model._data["prior"], random_state=np.random.default_rng(0))
    starts = model._dispersed_starts(start, np.random.default_rng(0), 8)
    firsts = np.array([s.means[0, 0] for s in starts])
    assert len(starts) == 8 and all(s.converged for s in starts)
    assert np.any(np.sign(firsts) != np.sign(firsts[0]))  # some chain starts in the other labelling

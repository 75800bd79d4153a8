"""Issue 24, build item 3: the shift as a parameter (``mean_k = mean_0 + shift_k``) with its prior
in ``model_config``, and a per-cell design matrix on the state means and the count layer's log
rate. Fitted by MAP and NUTS; EM refuses them; save/load keeps them.

The MAP fits are compiled in pytensor's FAST_COMPILE mode (a module fixture): the default numba
backend took about 30 s to compile each graph on the test machine, FAST_COMPILE about 3 s, and the
optimum does not depend on the backend. NUTS evaluates the gradient thousands of times, too slowly
in FAST_COMPILE's Python VM (83 s for 400 draws), so it runs in FAST_RUN (C, whose compiled ops are
cached on disk: about 18 s once cached, about 70 s on a cold cache).
"""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytensor
import pytest

from scotgm_pp.models import ConvergenceWarning, ScOTGM, build_model, model_point
from scotgm_pp.models.graph import state_log_terms_function

pytestmark = pytest.mark.slow

SHIFT = np.array([3.0, -1.5, 0.0])
"""The perturbed state's mean minus the basal state's, in the 3 PCs."""
BATCH_OFFSET = np.array([1.0, 0.5, -0.5])
"""What the second batch adds to every cell's scores, whatever its state."""
COUNT_BATCH = np.array([0.5, -0.4, 0.3, 0.0])
"""What the second batch adds to the log rate of each of the four genes."""
COUNT_DELTA = np.array([-1.0, 0.0, 0.6, 0.0])
"""The perturbed state's log fold change of each gene."""
PHI = 0.1


def _cells(seed: int, batch_effect: bool):
    """100 control cells (pinned basal) and 100 guide cells of which 70% are perturbed, in two
    batches drawn at random; the second batch moves every cell by ``BATCH_OFFSET`` when
    ``batch_effect``."""
    rng = np.random.default_rng(seed)
    n_ctrl, n_guide = 100, 100
    fixed = np.r_[np.zeros(n_ctrl, int), -np.ones(n_guide, int)]
    perturbed = np.r_[np.zeros(n_ctrl, bool), rng.random(n_guide) < 0.7]
    batch = rng.integers(0, 2, n_ctrl + n_guide)
    X = rng.normal(size=(n_ctrl + n_guide, 3)) + perturbed[:, None] * SHIFT
    if batch_effect:
        X = X + batch[:, None] * BATCH_OFFSET
    return X, fixed, perturbed, batch


def _counts(seed: int, perturbed: np.ndarray, batch: np.ndarray):
    """Negative-binomial counts of four genes: log rate ``log s + beta + delta[z] + batch * COUNT_BATCH``."""
    rng = np.random.default_rng(seed)
    n = perturbed.size
    s = rng.uniform(1500, 2500, n)
    beta = np.log(np.array([0.01, 0.005, 0.02, 0.008]))
    mu = s[:, None] * np.exp(beta + perturbed[:, None] * COUNT_DELTA + batch[:, None] * COUNT_BATCH)
    r = 1.0 / PHI
    Y = rng.negative_binomial(r, r / (r + mu))
    return Y, s


@pytest.fixture(scope="module", autouse=True)
def fast_compile():
    with pytensor.config.change_flags(mode="FAST_COMPILE"):
        yield


@pytest.fixture(scope="module")
def plain_cells():
    return _cells(0, batch_effect=False)


@pytest.fixture(scope="module")
def batch_cells():
    return _cells(0, batch_effect=True)


@pytest.fixture(scope="module")
def batch_adata(batch_cells):
    X, fixed, _, batch = batch_cells
    adata = ad.AnnData(X=np.zeros((X.shape[0], 0), np.float32),
                       obs=pd.DataFrame({"batch": pd.Categorical(np.where(batch == 1, "b2", "b1")), "state0": fixed},
                                        index=[f"c{i}" for i in range(X.shape[0])]))
    adata.obsm["X_pca"] = X
    return adata


@pytest.fixture(scope="module")
def shift_fit(plain_cells):
    X, fixed, _, _ = plain_cells
    return ScOTGM(mean_parametrization="shift", random_state=0).fit(X, fixed_state=fixed, method="map")


@pytest.fixture(scope="module")
def design_fit(batch_adata):
    return ScOTGM(random_state=0).fit(batch_adata, fixed_state="state0", method="map", design="batch")


@pytest.fixture(scope="module")
def count_design_fit(batch_cells):
    X, fixed, perturbed, batch = batch_cells
    Y, s = _counts(1, perturbed, batch)
    return ScOTGM(random_state=0).fit(X, fixed_state=fixed, method="map", counts=Y, size_factors=s,
                                      dispersion=np.full(Y.shape[1], PHI), genes=["g0", "g1", "g2", "g3"],
                                      design=batch.astype(float))


def test_the_shift_graph_has_a_free_shift_with_a_real_prior(plain_cells, shift_fit):
    X, fixed, _, _ = plain_cells
    default = build_model(X, fixed_state=fixed)
    assert [v.name for v in default.free_RVs] == ["weights", "precision_0", "mean_0", "precision_1", "mean_1"]
    assert [v.name for v in shift_fit.model.free_RVs] == ["weights", "precision_0", "mean_0", "precision_1",
                                                          "shift_1"]
    assert shift_fit.model.potentials == []
    assert {"mean_1", "means", "perturbation_mean"} <= {v.name for v in shift_fit.model.deterministics}
    # the default prior SD: the scores' SD along each PC
    np.testing.assert_allclose(shift_fit.idata.constant_data["shift_prior_sd"].values, X.std(axis=0), rtol=1e-12)
    model = ScOTGM(mean_parametrization="shift", shift_sd=0.7)
    model.build_model(X, fixed_state=fixed)
    prior = model.sample_prior_predictive(2000, random_seed=0, extend_inferencedata=False).prior
    sd = prior["shift_1"].values.reshape(-1, 3).std(axis=0)
    print(f"prior SD of shift_1 over 2000 draws: {np.round(sd, 3)} (configured 0.7)")
    assert np.all(np.abs(sd / 0.7 - 1) <= 0.10)
    # the deterministic state means follow: mean_1 = mean_0 + shift_1 in every draw
    np.testing.assert_allclose(prior["mean_1"].values, prior["mean_0"].values + prior["shift_1"].values, atol=1e-12)


def test_map_of_the_shift_graph_recovers_the_shift(plain_cells, shift_fit):
    X, fixed, _, _ = plain_cells
    shift = shift_fit.idata.map_estimate["shift_1"].values
    pm_mean = shift_fit.idata.map_estimate["perturbation_mean"].values[0]
    em = ScOTGM(random_state=0).fit(X, fixed_state=fixed)
    em_shift = em.idata.map_estimate["perturbation_mean"].values[0]
    print(f"shift MAP {np.round(shift, 3)}, truth {SHIFT}, EM of the default graph {np.round(em_shift, 3)}")
    np.testing.assert_allclose(pm_mean, shift, atol=1e-12)  # the deterministic reads the parameter
    # three standard errors of a difference of means of ~70 and ~130 cells: 3 sqrt(1/70 + 1/130) = 0.44
    assert np.max(np.abs(shift - SHIFT)) <= 0.44
    # the shift prior (SD ~1.4 per PC) and the state graph's prior on mean_1 barely move the MAP
    assert np.max(np.abs(shift - em_shift)) <= 0.1
    assert "lp_gain_over_em" not in shift_fit.idata.map_estimate  # EM fitted another graph


def test_a_design_moves_every_cells_mean_and_the_map_finds_the_batch_offset(batch_cells, design_fit):
    X, fixed, perturbed, batch = batch_cells
    point = design_fit.idata.map_estimate
    assert list(point["design_coef"].coords["covariate"].values) == ["batch[b2]"]  # b1 is the reference level
    np.testing.assert_array_equal(design_fit.idata.constant_data["design"].values[:, 0], batch.astype(float))
    coef = point["design_coef"].values[0]
    truth = np.vstack([np.zeros(3), SHIFT])  # the state means of the reference batch
    without = ScOTGM(random_state=0).fit(X, fixed_state=fixed)
    err_with = float(np.max(np.abs(point["means"].values - truth)))
    err_without = float(np.max(np.abs(without.idata.map_estimate["means"].values - truth)))
    accuracy = float(np.mean((design_fit.responsibilities[:, 1] > 0.5) == perturbed))
    print(f"design_coef {np.round(coef, 3)} (truth {BATCH_OFFSET}); state means' max error {err_with:.3f} with the "
          f"design, {err_without:.3f} without; state accuracy {accuracy:.3f}")
    # three standard errors of a difference of two batch means of ~100 cells: 3 sqrt(2 / 100) = 0.42
    assert np.max(np.abs(coef - BATCH_OFFSET)) <= 0.42
    assert err_with <= 0.35 and err_without >= 0.45 and err_with <= 0.6 * err_without
    assert accuracy >= 0.9
    R = design_fit.responsibilities
    np.testing.assert_array_equal(R[fixed == 0, 0], 1.0)  # controls stay basal
    with pytest.raises(ValueError, match="predict_proba takes scores only"):
        design_fit.predict_proba(X)
    with pytest.raises(ValueError, match="replicate the observed cells"):
        design_fit.sample_posterior_predictive(n=5)
    pp = design_fit.sample_posterior_predictive(random_seed=0).posterior_predictive["X"].values[0, 0]
    gap = pp[batch == 1].mean(axis=0) - pp[batch == 0].mean(axis=0)
    observed_gap = X[batch == 1].mean(axis=0) - X[batch == 0].mean(axis=0)
    assert np.max(np.abs(gap - observed_gap)) <= 0.45  # replicated cells carry the batch offset


def test_the_graphs_state_terms_are_the_class_formulas_on_the_default_graph(plain_cells):
    X, fixed, _, _ = plain_cells
    fit = ScOTGM(random_state=0).fit(X, fixed_state=fixed)
    terms = state_log_terms_function(fit.model)
    point = fit.idata.map_estimate
    values = {rv.name: point[rv.name].values for rv in fit.model.free_RVs}
    t = terms(values)
    R = np.exp(t - np.logaddexp.reduce(t, axis=1, keepdims=True))
    np.testing.assert_allclose(R, fit.responsibilities, atol=1e-10)


def test_a_design_on_the_count_layer_recovers_the_batch_log_rate(count_design_fit):
    point = count_design_fit.idata.map_estimate
    count_coef = point["design_count_coef"].values[0]
    coef = point["design_coef"].values[0]
    table = count_design_fit.effects()
    delta = table["effect"].to_numpy()
    print(f"design_count_coef {np.round(count_coef, 3)} (truth {COUNT_BATCH}); design_coef {np.round(coef, 3)}; "
          f"delta {np.round(delta, 3)} (truth {COUNT_DELTA})")
    assert point["design_count_coef"].dims == ("covariate", "gene")
    # log-rate differences of two batches of ~100 cells at ~20 counts and phi = 0.1: SE ~0.055
    assert np.max(np.abs(count_coef - COUNT_BATCH)) <= 0.2
    assert np.max(np.abs(coef - BATCH_OFFSET)) <= 0.42
    assert np.max(np.abs(delta - COUNT_DELTA)) <= 0.25
    assert np.all(np.isnan(table["effect_se"]))  # no EM of this graph gives a standard error


def test_em_and_gibbs_refuse_the_new_graphs_naming_map_and_nuts(plain_cells):
    X, fixed, _, batch = plain_cells
    cases = [(ScOTGM(mean_parametrization="shift"), {}), (ScOTGM(), {"design": batch.astype(float)})]
    for model, extra in cases:
        for method in ("em", "mcmc"):
            with pytest.raises(ValueError) as err:
                model.fit(X, fixed_state=fixed, method=method, **extra)
            message = str(err.value)
            assert "\n" not in message and "method='map'" in message and "method='nuts'" in message, message
            assert f"method={method!r}" in message
    with pytest.raises(ValueError, match="constant"):
        ScOTGM().build_model(X, fixed_state=fixed, design=np.c_[np.ones(len(X)), batch])
    with pytest.raises(ValueError, match="collinear"):
        ScOTGM().build_model(X, fixed_state=fixed, design=np.c_[batch, 1 - batch])
    with pytest.raises(TypeError, match="only when data is an AnnData"):
        ScOTGM().build_model(X, fixed_state=fixed, design="batch")
    with pytest.raises(ValueError, match="mean_parametrization must be one of"):
        ScOTGM(mean_parametrization="offset")
    with pytest.raises(ValueError, match="shift_sd must be None"):
        ScOTGM(shift_sd=-1.0)


def test_nuts_samples_the_shift_graph_with_a_design(batch_adata, batch_cells):
    with warnings.catch_warnings(), pytensor.config.change_flags(mode="FAST_RUN"):
        warnings.simplefilter("ignore", ConvergenceWarning)
        fit = ScOTGM(mean_parametrization="shift", random_state=0, draws=150, tune=150, chains=2).fit(
            batch_adata, fixed_state="state0", method="nuts", design="batch")
        R = fit.responsibilities
    post = fit.idata.posterior
    shift = post["shift_1"].values.reshape(-1, 3)
    coef = post["design_coef"].values.reshape(-1, 3)
    print(f"NUTS shift_1 {np.round(shift.mean(0), 3)} +- {np.round(shift.std(0), 3)}; design_coef "
          f"{np.round(coef.mean(0), 3)} +- {np.round(coef.std(0), 3)}")
    assert np.all(np.abs(shift.mean(0) - SHIFT) <= 3 * shift.std(0) + 0.05)
    assert np.all(np.abs(coef.mean(0) - BATCH_OFFSET) <= 3 * coef.std(0) + 0.05)
    assert fit.idata.log_likelihood["X"].dims == ("chain", "draw", "cell")
    perturbed = batch_cells[2]
    assert float(np.mean((R[:, 1] > 0.5) == perturbed)) >= 0.9


def test_save_load_keeps_the_new_config_and_the_design(tmp_path, shift_fit, design_fit, count_design_fit):
    for name, fit in (("shift", shift_fit), ("design", design_fit), ("counts", count_design_fit)):
        back = ScOTGM.load(fit.save(tmp_path / f"{name}.nc"))
        assert back.model_config == fit.model_config
        assert [v.name for v in back.model.free_RVs] == [v.name for v in fit.model.free_RVs]
        for key in ("design", "design_prior_sd", "shift_prior_sd"):
            assert (key in back.idata.constant_data) == (key in fit.idata.constant_data)
            if key in fit.idata.constant_data:
                np.testing.assert_array_equal(back.idata.constant_data[key].values, fit.idata.constant_data[key].values)
        np.testing.assert_allclose(back.responsibilities, fit.responsibilities, atol=1e-10)
    assert back.model_config["mean_parametrization"] == "state"
    assert ScOTGM.load(tmp_path / "shift.nc").model_config["mean_parametrization"] == "shift"
    # the rebuilt shift graph is the same model: its log density at the MAP is the fit's lp
    back = ScOTGM.load(tmp_path / "shift.nc")
    point = shift_fit.idata.map_estimate
    x0 = model_point(back.model, point["weights"].values, point["means"].values, point["precisions"].values)
    lp = back.model.compile_logp(jacobian=False)(back.model.initial_point() | x0)
    assert lp == pytest.approx(float(point["lp"].values), rel=1e-8)


def test_design_columns_are_coded_like_a_formula(batch_adata):
    from scotgm_pp.models._design import resolve_design

    obs = batch_adata.obs.copy()
    rng = np.random.default_rng(2)
    obs["age"] = rng.normal(40.0, 5.0, len(obs))
    obs["donor"] = rng.choice(["d3", "d1", "d2"], len(obs))
    obs["treated"] = rng.random(len(obs)) < 0.5
    D, names = resolve_design(["batch", "age", "donor", "treated"], len(obs), obs)
    assert names == ["batch[b2]", "age", "donor[d2]", "donor[d3]", "treated[True]"]  # first level left out
    np.testing.assert_allclose(D[:, 1], obs["age"] - obs["age"].mean(), atol=1e-12)  # numeric: centred
    np.testing.assert_array_equal(D[:, 3], (obs["donor"] == "d3").to_numpy(float))
    np.testing.assert_array_equal(D[:, 4], obs["treated"].to_numpy(float))
    # a DataFrame is aligned to the AnnData's cells by its index
    shuffled = obs[["batch"]].iloc[rng.permutation(len(obs))]
    D2, _ = resolve_design(shuffled, len(obs), obs)
    np.testing.assert_array_equal(D2, D[:, :1])
    with pytest.raises(KeyError, match="not in adata.obs"):
        resolve_design(["lane"], len(obs), obs)

"""The user-facing ScOTGM class: fit by em / map / mcmc, an xarray.DataTree result, save/load, predictions."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import arviz as az
import numpy as np
import pandas as pd
import pytest
import xarray as xr

from scotgm_pp.inference.em import fit_em
from scotgm_pp.models import PerturbationDistribution, ScOTGM

DATA = Path(__file__).parent / "data"

D = 3
SHIFT = np.array([3.0, -1.5, 0.0])


def _screen(seed=0, n_ctrl=200, n_guide=200):
    rng = np.random.default_rng(seed)
    X_ctrl = rng.normal(size=(n_ctrl, D))
    perturbed = rng.random(n_guide) < 0.6
    X_guide = rng.normal(size=(n_guide, D)) + perturbed[:, None] * SHIFT
    X = np.vstack([X_ctrl, X_guide])
    fixed = np.r_[np.zeros(n_ctrl, int), -np.ones(n_guide, int)]
    return X, fixed, perturbed


@pytest.fixture(scope="module")
def adata():
    X, fixed, perturbed = _screen()
    n_genes = 10
    loadings = np.linalg.qr(np.random.default_rng(1).normal(size=(n_genes, D)))[0]
    a = ad.AnnData(
        X=(X @ loadings.T).astype(np.float32),
        obs=pd.DataFrame({"state0": fixed, "truly_perturbed": np.r_[np.zeros(200, bool), perturbed]},
                         index=[f"c{i}" for i in range(len(X))]),
        var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)]),
    )
    a.obsm["X_pca"] = X
    a.varm["PCs"] = loadings
    a.uns["pca"] = {"variance": X.var(0), "variance_ratio": X.var(0) / X.var(0).sum()}
    return a


@pytest.fixture(scope="module")
def em_model(adata):
    return ScOTGM(random_state=0).fit(adata, fixed_state="state0", method="em")


def test_em_fit_matches_fit_em_and_labels_idata(adata, em_model):
    X = adata.obsm["X_pca"]
    fixed = adata.obs["state0"].to_numpy()
    ref = fit_em(X, fixed_state=fixed, prior=em_model._prior(X), max_iter=500, tol=1e-8,
                 random_state=np.random.default_rng(0))
    post = em_model.idata.map_estimate  # a point estimate: no chain / draw dims, not a fake posterior
    assert "posterior" not in em_model.idata.children and "chain" not in post.dims
    np.testing.assert_allclose(post["means"].values, ref.means)
    np.testing.assert_allclose(em_model.responsibilities, ref.responsibilities, atol=1e-10)
    assert list(post["state"].values) == ["basal", "perturbed"]
    assert post["perturbation_mean"].dims == ("contrast", "pc")
    assert list(post["contrast"].values) == ["perturbed - basal"]
    np.testing.assert_array_equal(em_model.idata.em["logp_trace"].values, ref.logp_trace)
    cd = em_model.idata.constant_data
    assert cd["pca_loadings"].dims == ("gene", "pc")
    assert list(cd["allowed_states"]["cell"].values[:2]) == ["c0", "c1"]
    np.testing.assert_array_equal(cd["allowed_states"].values[:, 1], (fixed < 0).astype(np.int8))
    assert json.loads(em_model.idata.attrs["model_config"])["n_states"] == 2
    # biology: the perturbation and the escaped cells
    pert = em_model.perturbation()
    assert isinstance(pert, PerturbationDistribution)
    assert np.linalg.norm(pert.mean - SHIFT) < 0.3
    np.testing.assert_allclose(pert.covariance, ref.covariances.sum(0))
    p = em_model.responsibilities[200:, 1]
    truth = adata.obs["truly_perturbed"].to_numpy()[200:]
    assert np.mean((p > 0.5) == truth) > 0.85


def test_save_load_round_trip(tmp_path, em_model, adata):
    path = em_model.save(tmp_path / "model.nc")
    loaded = ScOTGM.load(path)
    assert loaded.settings == em_model.settings
    assert loaded.method == "em"
    for group in em_model.idata.children:
        a, b = getattr(em_model.idata, group), getattr(loaded.idata, group)
        assert set(a.data_vars) == set(b.data_vars), group
        for name in a.data_vars:
            np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=f"{group}/{name}")
            assert a[name].dims == b[name].dims
        for name in a.coords:
            np.testing.assert_array_equal(a[name].values, b[name].values)
    X_new = np.random.default_rng(3).normal(size=(50, D)) + SHIFT
    np.testing.assert_array_equal(em_model.predict_proba(X_new), loaded.predict_proba(X_new))
    np.testing.assert_array_equal(
        em_model.sample_posterior_predictive(20, state=1, random_state=4).posterior_predictive["X"].values,
        loaded.sample_posterior_predictive(20, state=1, random_state=4).posterior_predictive["X"].values,
    )


def test_mcmc_two_chains_converge_near_em(adata, em_model, tmp_path):
    model = ScOTGM(random_state=1, draws=500, tune=200, chains=2).fit(adata, fixed_state="state0", method="mcmc")
    post = model.idata.posterior
    assert dict(post.sizes)["chain"] == 2 and dict(post.sizes)["draw"] == 500
    summary = az.summary(model.idata, var_names=["weights", "perturbation_mean"])
    print(summary[["mean", "sd", "ess_bulk", "r_hat"]])
    assert summary["r_hat"].max() < 1.05
    assert summary["ess_bulk"].min() > 100
    em_pert = em_model.perturbation().mean
    mc = model.perturbation()
    sd = mc.mean_draws.std(0)
    assert np.all(np.abs(mc.mean - em_pert) < 3 * sd + 0.05)
    assert model.idata.sample_stats["lp"].shape == (2, 500)
    # posterior predictive draws of the perturbed state have the posterior moments
    cells = model.sample_posterior_predictive(40, state="perturbed", random_state=0).posterior_predictive["X"]
    assert cells.shape == (2, 500, 40, D)
    np.testing.assert_allclose(cells.values.mean((0, 1, 2)), post["means"].values[:, :, 1].mean((0, 1)), atol=0.1)
    loaded = ScOTGM.load(model.save(tmp_path / "mcmc.nc"))
    assert loaded.method == "mcmc" and loaded.settings == model.settings
    for name in post.data_vars:
        np.testing.assert_array_equal(post[name].values, loaded.idata.posterior[name].values)
    np.testing.assert_array_equal(model.predict_proba(adata), loaded.predict_proba(adata))


def test_map_from_em_gains_nothing(adata, em_model):
    model = ScOTGM(random_state=0).fit(adata, fixed_state="state0", method="map")
    lp = float(model.idata.map_estimate["lp"].values)
    gain = float(model.idata.map_estimate["lp_gain_over_em"].values)
    print(f"find_MAP from the EM solution: logp {lp:.6f}, gain over EM {gain:.3e} ({gain / abs(lp):.1e} relative)")
    assert gain <= 1e-6 * abs(lp)
    np.testing.assert_allclose(
        model.idata.map_estimate["means"].values, em_model.idata.map_estimate["means"].values, atol=1e-2
    )  # the density is flat along the overlap of the two states: tiny gain, small moves


def test_four_states_cell_type_by_condition():
    rng = np.random.default_rng(7)
    centres = np.array([[0.0, 0, 0], [2.0, 0, 0], [0.0, 5, 0], [2.0, 5, 0]])
    z = np.repeat(np.arange(4), 150)
    X = centres[z] + rng.normal(scale=0.5, size=(600, D))
    # controls of both cell types pinned to their basal state; guide cells free
    fixed = np.where(np.isin(z, [0, 2]) & (np.arange(600) % 2 == 0), z, -1)
    names = ["A_basal", "A_pert", "B_basal", "B_pert"]
    model = ScOTGM(n_states=4, state_names=names, random_state=0).fit(X, fixed_state=fixed)
    means = model.idata.map_estimate["means"].values
    # pinned states keep their meaning; the two unpinned (perturbed) states are exchangeable
    np.testing.assert_allclose(means[[0, 2]], centres[[0, 2]], atol=0.15)
    open_means = means[[1, 3]][np.argsort(means[[1, 3], 1])]
    np.testing.assert_allclose(open_means, centres[[1, 3]], atol=0.15)
    pert_a = model.perturbation(int(np.argmin(np.linalg.norm(means - centres[1], axis=1))), "A_basal")
    np.testing.assert_allclose(pert_a.mean, [2, 0, 0], atol=0.15)
    assert list(model.idata.map_estimate["contrast"].values) == ["A_pert - A_basal", "B_basal - A_basal", "B_pert - A_basal"]
    # labels can be fixed by the user through the starting responsibilities
    R0 = np.eye(4)[z]
    labelled = ScOTGM(n_states=4, state_names=names).fit(X, fixed_state=fixed, init_responsibilities=R0)
    np.testing.assert_allclose(labelled.perturbation("B_pert", "B_basal").mean, [2, 0, 0], atol=0.15)


def test_predictions_and_sampling_are_reproducible(em_model):
    X_new = np.vstack([np.zeros((5, D)), np.tile(SHIFT * 1.5, (5, 1))])
    P = em_model.predict_proba(X_new)
    np.testing.assert_allclose(P.sum(1), 1.0)
    assert np.all(P[:5, 0] > 0.5) and np.all(P[5:, 1] > 0.9)
    a = em_model.sample_posterior_predictive(100, random_state=3).posterior_predictive
    b = em_model.sample_posterior_predictive(100, random_state=3).posterior_predictive
    np.testing.assert_array_equal(a["X"].values, b["X"].values)
    assert set(np.unique(a["state"].values)) == {0, 1}
    # replicating the training cells: controls stay basal
    rep = em_model.sample_posterior_predictive(random_state=3).posterior_predictive
    assert rep["X"].shape == (1, 1, 400, D)
    np.testing.assert_array_equal(rep["state"].values[0, 0, :200], 0)


def test_errors_name_the_fix(adata):
    with pytest.raises(ValueError, match="'em', 'map', 'mcmc', 'nuts'"):
        ScOTGM().fit(adata, fixed_state="state0", method="hmc")
    with pytest.raises(KeyError, match="obsm"):
        ScOTGM().fit(adata, obsm_key="X_umap")
    with pytest.raises(KeyError, match="columns are"):
        ScOTGM().fit(adata, fixed_state="guide")
    with pytest.raises(RuntimeError, match="not fitted"):
        ScOTGM().perturbation()
    with pytest.raises(ValueError, match="extra_dof"):
        ScOTGM(extra_dof=1.5)
    with pytest.raises(TypeError, match="random_state"):
        ScOTGM(random_state=np.random.default_rng(0))
    with pytest.raises(ValueError, match="fixed_state"):
        ScOTGM().fit(adata.obsm["X_pca"], fixed_state=np.ones(3, int))
    X = adata.obsm["X_pca"]
    labels = np.where(adata.obs["state0"].to_numpy() == 0, "NT", "g1")
    with pytest.raises(ValueError, match="control="):
        ScOTGM().fit(X, labels=labels)
    with pytest.raises(ValueError, match="'nt' is not among the labels"):
        ScOTGM().fit(X, labels=labels, control="nt")
    with pytest.raises(ValueError, match="not both|not several"):
        ScOTGM().fit(X, labels=labels, control="NT", fixed_state=adata.obs["state0"].to_numpy())
    with pytest.raises(ValueError, match=r"shape \(400, 2\)"):
        ScOTGM().fit(X, allowed_states=np.ones((400, 3), bool))
    with pytest.raises(ValueError, match="allows no state"):
        ScOTGM().fit(X, allowed_states=np.zeros((400, 2), bool))
    with pytest.raises(RuntimeError, match="no data yet"):
        ScOTGM().model
    with pytest.raises(ValueError, match="unknown keys"):
        ScOTGM(model_config={"covariances": "tied"})
    before = adata.copy()
    ScOTGM().fit(adata, labels="state0", control="0")  # labels from an obs column; the AnnData is left as it was
    assert adata.obs.equals(before.obs) and np.array_equal(adata.obsm["X_pca"], before.obsm["X_pca"])


def test_altered_or_foreign_files_are_refused_on_load(tmp_path, em_model):
    import h5py

    path = em_model.save(tmp_path / "model.nc")
    swapped = tmp_path / "swapped.nc"
    swapped.write_bytes(path.read_bytes())
    with h5py.File(swapped, "r+") as f:  # swap the state names in the stored model_config
        config = json.loads(f.attrs["model_config"])
        config["state_names"] = config["state_names"][::-1]
        f.attrs["model_config"] = json.dumps(config, sort_keys=True)
    with pytest.raises(ValueError, match="altered after it was saved"):
        ScOTGM.load(swapped)
    junk = tmp_path / "junk.nc"
    junk.write_bytes(b"not a netcdf file" * 20)
    with pytest.raises(ValueError, match="not a readable netCDF file"):
        ScOTGM.load(junk)
    with pytest.raises(ValueError, match="is a folder"):
        ScOTGM.load(tmp_path)
    assert ScOTGM.load(path).settings == em_model.settings


def test_results_are_datatrees_whose_groups_shadow_no_attribute(em_model):
    import arviz as az

    assert isinstance(em_model.idata, xr.DataTree)
    for method in ("em", "mcmc"):
        fit = em_model if method == "em" else None
        if fit is None:
            X, fixed, _ = _screen(seed=2, n_ctrl=60, n_guide=60)
            with pytest.warns(Warning):
                fit = ScOTGM(random_state=0, draws=60, tune=30, chains=2).fit(X, fixed_state=fixed, method=method)
        fit.sample_prior_predictive(20)
        fit.sample_posterior_predictive(5, extend_inferencedata=True)
        names = set(fit.idata.children)
        assert names & (set(dir(xr.DataTree)) | set(dir(xr.Dataset))) == set(), names
        assert {"observed_data", "constant_data", "em", "prior", "prior_predictive", "posterior_predictive"} <= names
    assert "posterior" in names and isinstance(az.summary(fit.idata, var_names=["weights"]), pd.DataFrame)


@pytest.mark.parametrize("name", ["scotgm_v0.1_em.nc", "scotgm_v0.1_mcmc.nc"])
def test_a_model_saved_by_version_0_1_loads(name, tmp_path):
    """Files written by scotgm_pp 0.1 (ArviZ 0.x InferenceData, point estimates in a group 'map')."""
    old = ScOTGM.load(DATA / name)
    assert isinstance(old.idata, xr.DataTree) and "map" not in old.idata.children
    X = old.idata.observed_data["X"].values
    allowed = old.idata.constant_data["allowed_states"].values.astype(bool)
    refit = ScOTGM(model_config=old.model_config, **old.settings).fit(X, allowed_states=allowed)
    if old.method == "em":
        np.testing.assert_allclose(old.idata.map_estimate["means"].values, refit.idata.map_estimate["means"].values,
                                   atol=1e-8)
    else:
        assert old.idata.posterior["means"].shape[:2] == (2, 40)
        post = old.idata.posterior["means"].mean(("chain", "draw")).values
        np.testing.assert_allclose(post, refit.idata.map_estimate["means"].values, atol=0.5)
    np.testing.assert_allclose(old.predict_proba(X).sum(1), 1.0)
    again = ScOTGM.load(old.save(tmp_path / "resaved.nc"))
    assert again.idata.attrs["format_version"] == "3" and again.method == old.method

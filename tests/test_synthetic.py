"""Synthetic cells: layout, the projection of real cells, counterfactual law, and a classifier check."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from scotgm_pp._validation import InputError
from scotgm_pp.pp import PreprocessParams, prepare_pair
from scotgm_pp.tl._predict import get_record
from scotgm_pp.tl._synthetic import _gene_counts, project_cells, residual_variance, sample_cells

AUC_LIMIT = 0.7


def _lognorm(adata, cells, genes):
    c = _gene_counts(adata, cells, genes)
    return np.log1p(c / c.sum(axis=1, keepdims=True) * 1e4)


def _cv_auc(A: np.ndarray, B: np.ndarray) -> float:
    X = np.vstack([A, B])
    y = np.r_[np.zeros(len(A)), np.ones(len(B))]
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    cv = StratifiedKFold(5, shuffle=True, random_state=0)
    return float(cross_val_score(clf, X, y, cv=cv, scoring="roc_auc").mean())


@pytest.fixture(scope="module")
def pert(sim_fitted):
    return sorted(sim_fitted.uns["scotgm"]["summary"].index)[0]


@pytest.fixture(scope="module")
def real_perturbed(sim_fitted, pert):
    """Log-normalised expression of the guide cells that truly were perturbed (not escaped)."""
    genes = get_record(sim_fitted, pert)["genes"]
    obs = sim_fitted.obs
    cells = np.flatnonzero((obs["perturbation"].astype(str) == pert).to_numpy() & ~obs["escaped"].to_numpy())
    return _lognorm(sim_fitted, cells, genes)


@pytest.mark.parametrize("state", ["perturbed", "basal", "counterfactual"])
def test_layout(sim_fitted, pert, state):
    rec = get_record(sim_fitted, pert)
    out = sample_cells(sim_fitted, pert, n=50, state=state, random_state=1)
    assert out.shape == (50, len(rec["genes"]))
    assert list(out.var_names) == list(rec["genes"])
    assert (out.X >= 0).all() and np.isfinite(out.X).all()
    assert set(out.obs["state"]) == {state} and set(out.obs["perturbation"]) == {pert}
    assert {"source", "parameter_draw", "control_cell"} <= set(out.obs.columns)
    assert out.obsm["X_pca"].shape == (50, rec["n_pcs"])
    if state == "counterfactual":
        assert out.obs["control_cell"].isin(sim_fitted.obs_names[sim_fitted.obs["perturbation"] == "control"]).all()
    again = sample_cells(sim_fitted, pert, n=50, state=state, random_state=1)
    np.testing.assert_array_equal(out.X, again.X)


def test_projection_reproduces_the_fit_scores(sim_fitted, pert):
    """Projecting raw control counts onto the loadings gives the scores the model was fitted on."""
    rec = get_record(sim_fitted, pert)
    labels = sim_fitted.obs["perturbation"].astype(str).to_numpy()
    idx = np.flatnonzero((labels == "control") | (labels == pert))
    pair = prepare_pair(sim_fitted[idx].copy(), labels[idx] == "control", PreprocessParams())
    np.testing.assert_allclose(pair.pca.loadings, rec["loadings"], rtol=1e-4, atol=1e-5)
    ctrl = pair.is_control
    counts = _gene_counts(sim_fitted, idx[ctrl], rec["genes"])
    _, scores = project_cells(counts, rec)
    err = np.abs(scores - pair.pca.scores[ctrl]).max() / np.abs(pair.pca.scores).max()
    assert err < 1e-3


def test_counterfactuals_follow_the_perturbed_state(sim_fitted, pert):
    """Conditional draws under the coupling: control cells + z have the perturbed state's law."""
    rec = get_record(sim_fitted, pert)
    out = sample_cells(sim_fitted, pert, n=2000, state="counterfactual", parameter_uncertainty=False)
    Y = out.obsm["X_pca"]
    sd = np.sqrt(np.diag(rec["covariances"][1]))
    # Control cells are resampled (400 of them), so allow for their own sampling error.
    assert np.abs((Y.mean(axis=0) - rec["means"][1]) / sd).max() < 0.25
    ratio = np.diag(np.cov(Y.T)) / sd**2
    assert 0.7 < np.median(ratio) < 1.3
    target = list(rec["genes"]).index(pert)
    basal = sample_cells(sim_fitted, pert, n=400, state="basal")
    assert out.X[:, target].mean() < 0.7 * basal.X[:, target].mean()


def test_synthetic_perturbed_cells_are_hard_to_tell_from_real(sim_fitted, pert, real_perturbed):
    """Cross-validated AUC of a logistic regression, synthetic perturbed vs real perturbed cells.

    Measured on the default screen: 0.60 (perturbed state draws with control-cell residuals),
    0.54 (counterfactuals); the same classifier separates synthetic *basal* cells from real
    perturbed ones at AUC 0.92, so the check has power.
    """
    n = len(real_perturbed)
    synth = sample_cells(sim_fitted, pert, n=n, state="perturbed", random_state=0).X
    auc = _cv_auc(real_perturbed, synth)
    assert auc <= AUC_LIMIT, auc
    cf = sample_cells(sim_fitted, pert, n=n, state="counterfactual", random_state=0).X
    assert _cv_auc(real_perturbed, cf) <= AUC_LIMIT
    basal = sample_cells(sim_fitted, pert, n=n, state="basal", random_state=0).X
    assert _cv_auc(real_perturbed, basal) >= 0.8


def test_counts(sim_fitted, pert):
    out = sample_cells(sim_fitted, pert, n=80, state="perturbed", counts=True, random_state=2)
    C = out.layers["counts"]
    assert sp.issparse(C) and np.issubdtype(C.dtype, np.integer)
    dense = C.toarray().astype(float)
    np.testing.assert_allclose(out.X, np.log1p(dense / dense.sum(axis=1, keepdims=True) * 1e4), rtol=1e-5)
    # Library sizes come from the real cells of the experiment.
    real_lib = _gene_counts(sim_fitted, np.arange(sim_fitted.n_obs), out.var_names.to_numpy()).sum(axis=1)
    assert 0.5 < np.median(dense.sum(axis=1)) / np.median(real_lib) < 1.5


def test_gaussian_residual(sim_fitted, pert, real_perturbed):
    out = sample_cells(sim_fitted, pert, n=len(real_perturbed), state="perturbed", residual="gaussian")
    assert set(out.obs["source"]) == {"fitted state"} and (out.obs["control_cell"] == "").all()
    # Per-gene spread of the synthetic cells is that of the real perturbed cells (within 35%).
    ratio = out.X.std(axis=0) / np.maximum(real_perturbed.std(axis=0), 1e-6)
    assert 0.65 < np.median(ratio) < 1.35


def test_residual_variance_is_a_variance(sim_fitted, pert):
    r = residual_variance(get_record(sim_fitted, pert))
    assert (r >= 0).all() and (r <= 1).all() and r.mean() > 0.3


def test_bad_inputs(sim_fitted, pert):
    with pytest.raises(InputError, match="choose one of"):
        sample_cells(sim_fitted, pert, n=5, state="escaped")
    with pytest.raises(InputError, match="positive"):
        sample_cells(sim_fitted, pert, n=0)
    with pytest.raises(InputError, match="residual"):
        sample_cells(sim_fitted, pert, n=5, residual="bootstrap")

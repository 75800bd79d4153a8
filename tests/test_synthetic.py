"""Synthetic cells: layout, the count layer's law, counterfactuals, and classifiers that try to tell them apart."""

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
from scotgm_pp.tl._synthetic import gene_counts, project_cells, residual_variance, sample_cells

AUC_LIMIT = 0.7


def _lognorm(c: np.ndarray) -> np.ndarray:
    return np.log1p(c / np.maximum(c.sum(axis=1, keepdims=True), 1.0) * 1e4)


def _cv_auc(A: np.ndarray, B: np.ndarray) -> float:
    X = np.vstack([A, B])
    y = np.r_[np.zeros(len(A)), np.ones(len(B))]
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000, solver="liblinear"))
    cv = StratifiedKFold(5, shuffle=True, random_state=0)
    return float(cross_val_score(clf, X, y, cv=cv, scoring="roc_auc").mean())


def _second_moment_auc(A: np.ndarray, B: np.ndarray, reference: np.ndarray, k: int = 10) -> tuple[float, float]:
    """AUC on squared, group-centred scores along the PCs of reference cells (no mean differences),
    and the median variance ratio B / A along them (see benchmarks/downstream_synthetic_auc.py)."""
    Z = _lognorm(reference)
    mu, sd = Z.mean(0), Z.std(0) + 1e-9
    U = np.linalg.svd((Z - mu) / sd, full_matrices=False)[2][:k].T
    fa, fb = ((_lognorm(A) - mu) / sd) @ U, ((_lognorm(B) - mu) / sd) @ U
    return _cv_auc((fa - fa.mean(0)) ** 2, (fb - fb.mean(0)) ** 2), float(np.median(fb.var(0) / fa.var(0)))


@pytest.fixture(scope="module")
def perts(sim_fitted):
    return sorted(sim_fitted.uns["scotgm"]["summary"].index)


@pytest.fixture(scope="module")
def pert(perts):
    return perts[0]


def _real_perturbed(adata, pert):
    """Counts of the guide cells that truly were perturbed (not escaped), over the record's genes."""
    genes = np.asarray(get_record(adata, pert)["genes"]).astype(str)
    obs = adata.obs
    cells = np.flatnonzero((obs["perturbation"].astype(str) == pert).to_numpy() & ~obs["escaped"].to_numpy())
    return gene_counts(adata, cells, genes)


@pytest.mark.parametrize("state", ["perturbed", "basal", "counterfactual"])
def test_layout(sim_fitted, pert, state):
    rec = get_record(sim_fitted, pert)
    out = sample_cells(sim_fitted, pert, 50, state=state, random_state=1)
    assert out.shape == (50, len(rec["genes"]))
    assert list(out.var_names) == list(rec["genes"])
    counts = out.layers["counts"]
    assert sp.issparse(counts) and np.issubdtype(counts.dtype, np.integer) and counts.min() >= 0
    dense = counts.toarray().astype(float)
    np.testing.assert_allclose(out.X, np.log1p(dense / out.obs["library_size"].to_numpy()[:, None] * 1e4), rtol=1e-5)
    assert set(out.obs["state"]) == {state} and set(out.obs["perturbation"]) == {pert}
    assert {"source", "parameter_draw", "control_cell", "library_size", "batch"} <= set(out.obs.columns)
    assert out.obsm["X_pca"].shape == out.obsm["X_state"].shape == (50, rec["n_pcs"])
    if state == "counterfactual":
        assert out.obs["control_cell"].isin(sim_fitted.obs_names[sim_fitted.obs["perturbation"] == "control"]).all()
    again = sample_cells(sim_fitted, pert, 50, state=state, random_state=1)
    np.testing.assert_array_equal(out.X, again.X)


def test_counts_follow_the_count_layer(sim_fitted, pert):
    """Synthetic counts have the count layer's NB means per gene and the experiment's library sizes."""
    rec = get_record(sim_fitted, pert)
    out = sample_cells(sim_fitted, pert, 4000, state="perturbed", n_draws=None, random_state=2)
    y = out.layers["counts"].toarray().astype(float)
    s = out.obs["library_size"].to_numpy()
    expected = s.mean() * np.exp(rec["count_beta"] + rec["count_effect"])
    phi = rec["count_dispersion"]
    sd = np.sqrt((expected + phi * expected**2) / len(y)) * 1.5  # library sizes add spread
    assert np.mean(np.abs(y.mean(0) - expected) < 4 * sd) > 0.97
    q = rec["library_quantiles"][1]
    assert q[5] < np.median(s) < q[45]


def test_counterfactuals_move_the_target_and_keep_the_control_cell(sim_fitted, pert):
    rec = get_record(sim_fitted, pert)
    out = sample_cells(sim_fitted, pert, 400, state="counterfactual", random_state=3)
    genes = list(rec["genes"])
    start = gene_counts(sim_fitted, sim_fitted.obs_names.get_indexer(out.obs["control_cell"]), np.asarray(genes))
    y = out.layers["counts"].toarray().astype(float)
    t = genes.index(pert)
    # the knock-down lowers the target's counts; untouched genes keep the cell's own counts closely
    assert y[:, t].mean() < 0.5 * start[:, t].mean()
    flat = np.flatnonzero(np.abs(rec["count_effect"]) < 0.05)
    corr = [np.corrcoef(start[:, g], y[:, g])[0, 1] for g in flat if start[:, g].std() > 0]
    assert np.median(corr) > 0.6
    np.testing.assert_allclose(out.obs["library_size"],
                               np.asarray(sim_fitted.X[sim_fitted.obs_names.get_indexer(out.obs["control_cell"])]
                                          .sum(axis=1)).ravel())


def test_synthetic_cells_are_hard_to_tell_from_real(sim_fitted, perts):
    """Cross-validated AUC, synthetic vs real perturbed cells, on counts and on log-normalised values.

    Measured over simulated seeds 0-9, all 80 perturbations (benchmarks/downstream_synthetic_auc.py),
    mean / worst perturbation: perturbed-state cells 0.39 / 0.56 (counts), 0.53 / 0.67 (log-normalised);
    counterfactuals 0.37 / 0.55 and 0.41 / 0.58; synthetic basal cells (the positive control)
    0.90 / 0.91. Here the first three perturbations of seed 0.
    """
    for pert in perts[:3]:
        real = _real_perturbed(sim_fitted, pert)
        for state in ("perturbed", "counterfactual"):
            synth = sample_cells(sim_fitted, pert, len(real), state=state, random_state=0).layers["counts"].toarray()
            assert _cv_auc(real, synth) <= AUC_LIMIT, (pert, state, "counts")
            assert _cv_auc(_lognorm(real), _lognorm(synth)) <= AUC_LIMIT, (pert, state, "lognorm")
        basal = sample_cells(sim_fitted, pert, len(real), state="basal", random_state=0).layers["counts"].toarray()
        assert _cv_auc(_lognorm(real), _lognorm(basal)) >= 0.8


def test_genes_co_vary_as_in_real_cells(sim_fitted, pert):
    """Independent genes miss the spread of the shared expression programs; the copula restores it.

    Seeds 0-9, 80 perturbations: second-moment AUC 0.96 (independent) against 0.57 (copula), variance
    along the reference PCs 0.52 and 0.90 of the real cells'.
    """
    real = _real_perturbed(sim_fitted, pert)
    obs = sim_fitted.obs
    frame = np.flatnonzero((obs["perturbation"].astype(str) != pert).to_numpy() & obs["escaped"].to_numpy())
    ref = gene_counts(sim_fitted, frame, np.asarray(get_record(sim_fitted, pert)["genes"]).astype(str))
    tied = sample_cells(sim_fitted, pert, len(real), random_state=0).layers["counts"].toarray()
    indep = sample_cells(sim_fitted, pert, len(real), dependence="independent", random_state=0).layers["counts"].toarray()
    auc_tied, ratio_tied = _second_moment_auc(real, tied, ref)
    auc_indep, ratio_indep = _second_moment_auc(real, indep, ref)
    assert auc_indep > 0.85 and ratio_indep < 0.7
    assert auc_tied < 0.75 and 0.7 < ratio_tied < 1.5


def test_projection_reproduces_the_fit_scores(sim_fitted, pert):
    """Projecting raw control counts onto the loadings gives the scores the model was fitted on."""
    rec = get_record(sim_fitted, pert)
    labels = sim_fitted.obs["perturbation"].astype(str).to_numpy()
    idx = np.flatnonzero((labels == "control") | (labels == pert))
    pair = prepare_pair(sim_fitted[idx].copy(), labels[idx] == "control", PreprocessParams())
    np.testing.assert_allclose(pair.pca.loadings, rec["loadings"], rtol=1e-4, atol=1e-5)
    ctrl = pair.is_control
    counts = gene_counts(sim_fitted, idx[ctrl], rec["genes"])
    _, scores = project_cells(counts, rec)
    err = np.abs(scores - pair.pca.scores[ctrl]).max() / np.abs(pair.pca.scores).max()
    assert err < 1e-3


def test_residual_variance_is_a_variance(sim_fitted, pert):
    r = residual_variance(get_record(sim_fitted, pert))
    assert (r >= 0).all() and (r <= 1).all() and r.mean() > 0.3


def test_bad_inputs(sim_fitted, pert):
    with pytest.raises(InputError, match="choose one of"):
        sample_cells(sim_fitted, pert, 5, state="escaped")
    with pytest.raises(InputError, match="positive"):
        sample_cells(sim_fitted, pert, 0)
    with pytest.raises(InputError, match="dependence"):
        sample_cells(sim_fitted, pert, 5, dependence="bootstrap")

import numpy as np
import pytest
import scipy.sparse as sp

import scotgm_pp as sg
from scotgm_pp.pp import PreprocessParams, ks_check, pca_projection, prepare_pair, resolve_min_genes


def test_min_genes_follows_the_paper_on_whole_transcriptomes_and_adapts_to_panels():
    assert resolve_min_genes(PreprocessParams(), 20000) == 200
    assert resolve_min_genes(PreprocessParams(), 299) == 15
    assert resolve_min_genes(PreprocessParams(min_genes=7), 299) == 7


def test_pca_loadings_reconstruct_the_scaled_data_and_match_svd():
    rng = np.random.default_rng(0)
    n, g, r = 300, 40, 3
    X = rng.normal(size=(n, r)) @ rng.normal(size=(r, g)) + 0.1 * rng.normal(size=(n, g)) + 5
    res = pca_projection(sp.csr_matrix(X), n_pcs=g, max_pcs=g, max_value=None)
    Z = (X - X.mean(0)) / X.std(0, ddof=1)
    assert np.allclose(res.scores @ res.loadings.T, Z, atol=1e-8)
    # Leading singular values agree with an SVD of the scaled matrix.
    s = np.linalg.svd(Z, compute_uv=False)
    assert np.allclose(np.sqrt((res.scores**2).sum(0))[:5], s[:5], rtol=1e-8)
    # Variance threshold: fewest PCs reaching it.
    res3 = pca_projection(X, variance_threshold=0.9, max_pcs=g, max_value=None)
    cum = np.cumsum(s**2) / np.sum(s**2)
    assert res3.n_pcs == int(np.searchsorted(cum, 0.9) + 1)


def test_genes_outside_the_pca_are_projected_consistently():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(200, 3)) @ rng.normal(size=(3, 30)) + rng.normal(size=(200, 30)) * 0.05
    mask = np.zeros(30, bool)
    mask[:20] = True
    full = pca_projection(X, pca_genes=mask, n_pcs=3, max_value=None)
    only = pca_projection(X[:, :20], n_pcs=3, max_value=None)
    assert np.allclose(full.loadings[:20], only.loadings, atol=1e-8)
    # Genes 20..29 are explained by the same 3 programs: their projection reconstructs them well.
    Z = (X - X.mean(0)) / X.std(0, ddof=1)
    resid = Z[:, 20:] - full.scores @ full.loadings[20:].T
    assert np.mean(resid**2) < 0.05


def test_ks_check_flags_the_shifted_component():
    rng = np.random.default_rng(2)
    scores = rng.normal(size=(400, 3))
    is_control = np.arange(400) < 250
    scores[~is_control, 1] += 1.5
    ks = ks_check(scores, is_control)
    assert list(ks["ks_shift_padj"] < 0.01) == [False, True, False]
    assert (ks["ks_gaussian_padj"] > 0.01).all()


def test_ks_check_equals_one_scipy_test_per_component():
    from scipy import stats

    rng = np.random.default_rng(5)
    scores = rng.standard_t(4, size=(180, 6))
    is_control = rng.random(180) < 0.7
    scores[~is_control, 2] += 0.8
    ks = ks_check(scores, is_control)
    a, b = scores[is_control], scores[~is_control]
    for k in range(6):
        shift = stats.ks_2samp(b[:, k], a[:, k])
        z = (a[:, k] - a[:, k].mean()) / a[:, k].std(ddof=1)
        gauss = stats.kstest(z, "norm")
        assert ks.loc[k, "ks_shift_statistic"] == shift.statistic
        assert ks.loc[k, "ks_shift_pvalue"] == shift.pvalue
        assert ks.loc[k, "ks_gaussian_statistic"] == gauss.statistic
        assert ks.loc[k, "ks_gaussian_pvalue"] == gauss.pvalue


def test_prepare_pair_works_on_a_copy_and_records_its_steps(small_sim):
    before = small_sim.X.copy()
    labels = small_sim.obs["perturbation"].astype(str).to_numpy()
    idx = np.flatnonzero(np.isin(labels, ["control", labels[-1]]))
    pair = prepare_pair(small_sim[idx], labels[idx] == "control", PreprocessParams())
    assert (small_sim.X != before).nnz == 0
    assert pair.record["n_control"] == 120 and pair.record["n_guide"] == 60
    assert pair.pca.loadings.shape == (pair.record["n_genes_kept"], pair.pca.n_pcs)
    assert pair.pca.n_pcs <= 60 // 3
    assert len(pair.ks) == pair.pca.n_pcs


def test_preprocess_returns_a_new_object_with_named_slots(small_sim):
    out = sg.pp.preprocess(small_sim)
    assert out is not small_sim
    assert {"counts"} <= set(out.layers)
    assert out.obsm["X_pca"].shape[0] == out.n_obs
    assert out.varm["PCs"].shape == (out.n_vars, out.obsm["X_pca"].shape[1])
    assert np.allclose(np.expm1(out.X.toarray()).sum(1), 1e4, rtol=1e-3)
    with pytest.raises(ValueError, match="raw UMI counts"):
        sg.pp.preprocess(out)  # log-normalised input is refused


def test_randomized_pcs_match_the_exact_decomposition():
    """Above EXACT_PCA_MAX the PCs come from the randomized range finder (Cholesky QR between
    power iterations, the small SVD from a Gram matrix): leading variances and directions against
    numpy's eigen-decomposition of the same matrix, and orthonormal directions."""
    from scotgm_pp.pp import EXACT_PCA_MAX, _leading_pcs, _orthonormal_columns

    rng = np.random.default_rng(3)
    n, g, k = EXACT_PCA_MAX + 100, EXACT_PCA_MAX + 300, 12
    scales = np.array([40.0, 30.0, 22.0, 16.0, 12.0, 9.0])
    Z = rng.normal(size=(n, g)) + (rng.normal(size=(n, 6)) * scales) @ rng.normal(size=(6, g)) / np.sqrt(g) * 8
    Z -= Z.mean(axis=0)
    V, var = _leading_pcs(Z, k, np.random.default_rng(0))
    vals, U = np.linalg.eigh(Z @ Z.T)
    order = np.argsort(vals)[::-1][:6]
    exact_V = Z.T @ U[:, order] / np.sqrt(vals[order])
    assert np.max(np.abs(var[:6] / vals[order] - 1)) < 1e-5
    assert np.min(np.abs(np.sum(V[:, :6] * exact_V, axis=0))) > 1 - 1e-8
    assert np.max(np.abs(V.T @ V - np.eye(k))) < 1e-10
    # the Cholesky QR: orthonormal columns spanning the input's columns
    Y = rng.normal(size=(g, 20)).astype(np.float32) * np.geomspace(1, 100, 20).astype(np.float32)
    Q = _orthonormal_columns(Y)
    assert Q.dtype == np.float32
    assert np.max(np.abs(Q.T.astype(float) @ Q - np.eye(20))) < 1e-5
    residual = Y - Q @ (Q.T @ Y)
    assert np.linalg.norm(residual) / np.linalg.norm(Y) < 1e-5

"""The pinned cells' sums from non-zero counts and library-size series, against the per-entry terms."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from scipy import stats

from scotgm_pp.inference import _pinned_sums as ps
from scotgm_pp.inference import count_fit as cf
from scotgm_pp.inference import count_layer as cl


def _sparse_counts(rng, n=400, G=600, depth=800.0):
    """Library sizes over a 30-fold range, log rates from e^-13 to about e^-1 of a cell's count,
    dispersions from the floor (Poisson) to 20: most counts 0."""
    s = depth * np.exp(rng.uniform(-1.7, 1.7, n))
    lam = rng.uniform(-13.0, -5.5, G)
    lam[:5] = [-2.0, -1.5, -3.0, -4.0, -1.0]  # a few highly expressed genes (q near 1)
    phi = np.exp(rng.uniform(np.log(cl.PHI_MIN), np.log(20.0), G))
    phi[5:10] = cl.PHI_MIN
    alpha = 1.0 / phi
    mu = s[:, None] * np.exp(lam)[None, :]
    y = rng.negative_binomial(alpha, alpha / (alpha + mu)).astype(float)
    return y, s, lam, alpha


def _direct(y, s, lam, alpha):
    mu = s[:, None] * np.exp(lam)[None, :]
    t = mu + alpha
    e = (y + alpha) * np.log(t)
    dv = (y - mu) / t
    h = mu * (y + alpha) / t**2
    return dv, h, e


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_series_sums_equal_the_per_entry_sums(seed):
    rng = np.random.default_rng(seed)
    y, s, lam, alpha = _sparse_counts(rng)
    assert (y > 0).mean() < ps.SPARSE_MAX_DENSITY
    rows = ps.sparse_rows(sp.csr_matrix(y), s, alpha)
    # a 30-fold range of library sizes in bins of ratio 1.5: at least 8, each within its width
    assert rows.s0.size >= 8
    assert np.abs(s / rows.s0[rows.bin_of] - 1.0).max() <= ps.SERIES_WIDTH + 1e-12
    dv, h, e, e_row, ylam = ps.series_sums(rows, lam)
    DV, H, E = _direct(y, s, lam, alpha)
    # dv sums terms of both signs: its error is measured against the sum of their sizes
    np.testing.assert_array_less(np.abs(dv - DV.sum(axis=0)), 1e-13 * np.abs(DV).sum(axis=0) + 1e-300)
    np.testing.assert_allclose(h, H.sum(axis=0), rtol=1e-12)
    np.testing.assert_allclose(e, E.sum(axis=0), rtol=1e-12)
    np.testing.assert_allclose(e_row, E.sum(axis=1), rtol=1e-12)
    np.testing.assert_allclose(ylam, y @ lam, rtol=1e-12)
    np.testing.assert_allclose(ps.series_square_sums(rows, lam), (DV**2).sum(axis=0), rtol=1e-11)
    cols = np.sort(rng.choice(y.shape[1], 57, replace=False))
    dv_c, h_c, e_c, none_row, none_y = ps.series_sums(rows, lam[cols], cols, want_rows=False)
    assert none_row is None and none_y is None
    np.testing.assert_array_less(np.abs(dv_c - DV.sum(axis=0)[cols]), 1e-13 * np.abs(DV).sum(axis=0)[cols] + 1e-300)
    np.testing.assert_allclose(h_c, H.sum(axis=0)[cols], rtol=1e-12)
    np.testing.assert_allclose(e_c, E.sum(axis=0)[cols], rtol=1e-12)


def _layer(rng, n0=300, n1=80, G=400, batch=True):
    y, s, lam, alpha = _sparse_counts(rng, n=n0 + n1, G=G)
    fixed = np.r_[np.zeros(n0, int), -np.ones(n1, int)]
    b = np.where(rng.random(n0 + n1) < 0.6, "r1", "r2") if batch else None
    return y, s, fixed, b


def _params(rng, data, y, s):
    G = y.shape[1]
    beta = np.log((y.sum(axis=0) + 0.5) / s.sum())
    return cl.CountParams(beta=beta, delta=np.vstack([np.zeros(G), rng.normal(0, 0.7, G)]),
                          gamma=np.vstack([np.zeros(G), rng.normal(0, 0.3, G)]))


def _dense_data(y, s, phi, fixed, n_states, b, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(ps, "SPARSE_MAX_DENSITY", -1.0)  # every block takes the per-entry path
        data = cl.CountData(sp.csr_matrix(y), s, phi, fixed, n_states, b)
        for k in range(n_states):
            for bb, seg in data.pinned[k]:
                assert cf._sparse_block(data, seg, bb) is None
    return data


@pytest.mark.parametrize("batch", [False, True])
def test_a_pass_over_sparse_counts_equals_the_per_entry_pass(batch, monkeypatch):
    rng = np.random.default_rng(7)
    y, s, fixed, b = _layer(rng, batch=batch)
    phi = cl.control_dispersion(y, s, fixed == 0, b)
    sparse = cl.CountData(sp.csr_matrix(y), s, phi, fixed, 2, b)
    dense = _dense_data(y, s, phi, fixed, 2, b, monkeypatch)
    assert all(cf._sparse_block(sparse, seg, bb) is not None for bb, seg in sparse.pinned[0])
    params = _params(rng, sparse, y, s)
    a, d = cf.evaluate(sparse, params), cf.evaluate(dense, params)
    np.testing.assert_allclose(a.pinned_e, d.pinned_e, rtol=1e-12)
    # the per-entry path forms h as v (1 - alpha / t), which loses digits where mu << alpha
    # (h below 1e-6 here); the series does not: absolute agreement there
    np.testing.assert_allclose(a.pinned_h, d.pinned_h, rtol=1e-12, atol=1e-13)
    scale = np.abs(a.pinned_dv).max() + 1.0
    np.testing.assert_allclose(a.pinned_dv, d.pinned_dv, rtol=0, atol=1e-11 * scale)
    # a cell's log-likelihood is a difference of sums of alpha log alpha (alpha up to 1e6 here,
    # about 1e9 in all): both paths round to about 1e-7 in absolute terms
    np.testing.assert_allclose(a.row_loglik, d.row_loglik, rtol=0, atol=1e-6)
    # against an independent formula: scipy's negative binomial
    codes, _ = cl.batch_codes(b, len(s))
    alpha = 1.0 / np.maximum(phi, cl.PHI_MIN)
    mu = s[:, None] * np.exp(params.beta + params.delta[0] + params.gamma[codes])
    want = stats.nbinom.logpmf(y, alpha, alpha / (alpha + mu)).sum(axis=1)
    np.testing.assert_allclose(a.row_loglik[fixed == 0, 0], want[fixed == 0], rtol=0, atol=1e-6)
    genes = np.sort(rng.choice(y.shape[1], 33, replace=False))
    trial = _params(rng, sparse, y, s)
    pa, pd_ = cf.evaluate(sparse, trial, genes, a), cf.evaluate(dense, trial, genes, d)
    np.testing.assert_allclose(pa.pinned_e, pd_.pinned_e, rtol=1e-12)
    np.testing.assert_allclose(pa.pinned_h, pd_.pinned_h, rtol=1e-12, atol=1e-13)
    R = np.c_[fixed == 0, fixed != 0].astype(float)
    R[fixed != 0] = [0.3, 0.7]
    np.testing.assert_allclose(cf.sandwich_meat(sparse, a, R), cf.sandwich_meat(dense, d, R), rtol=1e-10, atol=1e-12)


def test_the_count_layer_fits_the_same_either_way(monkeypatch):
    rng = np.random.default_rng(3)
    y, s, fixed, b = _layer(rng, G=300, batch=False)
    phi = cl.control_dispersion(y, s, fixed == 0)
    R = np.c_[fixed == 0, fixed != 0].astype(float)
    R[fixed != 0] = np.c_[np.full((fixed != 0).sum(), 0.25), np.full((fixed != 0).sum(), 0.75)]
    prior = cl.default_count_prior(y, s)
    fits = []
    for data in (cl.CountData(sp.csr_matrix(y), s, phi, fixed, 2), _dense_data(y, s, phi, fixed, 2, None, monkeypatch)):
        cp, Q, _, ok = cf.fit_marginal(data, R, prior, tol=1e-8)
        assert ok
        se = cf.effect_standard_errors(data, cp, R, prior, correction="louis", Q=Q)
        fits.append((cp.params.delta[1], se[1]))
    np.testing.assert_allclose(fits[0][0], fits[1][0], rtol=0, atol=1e-8)
    np.testing.assert_allclose(fits[0][1], fits[1][1], rtol=1e-8)


def test_dense_counts_take_the_per_entry_path():
    rng = np.random.default_rng(4)
    y = rng.poisson(3.0, size=(50, 20)).astype(float)
    s = y.sum(axis=1)
    data = cl.CountData(y, s, np.full(20, 0.1), np.zeros(50, int), 1)
    (b, seg), = data.pinned[0]
    assert cf._sparse_block(data, seg, b) is None

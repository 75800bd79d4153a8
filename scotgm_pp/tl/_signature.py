"""The perturbation signature: a cell score that sees the perturbation at any number of genes.

A per-experiment PCA over thousands of genes leaves the few genes a perturbation moves below its
leading PCs, so a state model fitted on them finds nothing (the paper's KS check then sees no
separating PC). The state model is instead fitted on one score per cell, the cell's position
along the perturbation's own discriminant direction, built so that it cannot overfit the cells
it scores:

1. **Basal units.** Every count becomes a Pearson residual against the controls' expectation,
   ``r_ig = (y_ig - mu_ig) / sqrt(mu_ig + phi_g mu_ig^2)`` with ``mu_ig = s_i rate_g`` (``s_i`` the
   cell's total count, ``rate_g`` the controls' pooled rate within the cell's batch, ``phi_g``
   the NB dispersion), clipped at ``+-clip`` (a winsorised residual: one extreme count cannot
   dominate) and scaled by the controls' standard deviation.
2. **Basal covariance.** A factor model of the controls' residuals, ``Sigma = L L^T + diag(psi)``
   (``rank`` leading PCs; no genes x genes matrix), so shared programs (cell cycle, stress) are
   discounted: the discriminant is ``w = Sigma^{-1} delta`` (Woodbury identity).
3. **Cross-fitting.** Cells are split into ``n_folds`` folds (controls and guide cells
   separately). For each fold, the shift ``delta`` is estimated from the *other* folds only: the
   guide cells' mean residual minus the controls', shrunk gene by gene by an empirical-Bayes
   prior learned across genes (:func:`~scotgm_pp.inference.normal_means.normal_means`: sparse
   when few genes move, broad when many do); the held-out cells are scored
   ``(r_i - mean_controls) . w / sqrt(w' Sigma w)``, so controls score about ``N(0, 1)``.
4. **Rounds.** The guide cells enter the contrast weighted by their posterior probability of the
   perturbed state under the previous round's state model (all 1 in the first round): escaped
   cells stop diluting the shift. The state model is the declared two-state graph
   (:func:`scotgm_pp.models.build_model`, tied covariance, controls pinned basal) on the score;
   its EM runs to convergence every round.

Whether the guide cells hold a perturbed state at all is a separate, exact test
(:func:`split_half_test`): the cross-fitted scores have the right law one at a time but are
dependent (each guide cell's score uses the other guide cells), so they are not tested directly;
a direction estimated on one half of the cells scores the other half instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import stats

from ..inference.count_layer import control_dispersion
from ..inference.em import EMResult, fit_em, scaled_prior
from ..inference.normal_means import normal_means
from ..pp import _leading_pcs, _row_blocks

__all__ = [
    "SignatureFit",
    "pearson_residuals",
    "basal_factors",
    "fit_signature_states",
    "split_half_test",
    "SIGNATURE_FOLDS",
    "SIGNATURE_ROUNDS",
    "BASAL_RANK",
    "RESIDUAL_CLIP",
]

SIGNATURE_FOLDS = 10
"""Folds of the cross-fitting (at most the smaller group's cells)."""

SIGNATURE_ROUNDS = 1
"""Alternations of the signature and the state model."""

BASAL_RANK = 10
"""Leading PCs of the controls' residuals in the basal factor model."""

RESIDUAL_CLIP = 2.0
"""Pearson residuals are clipped at this absolute value."""

MIN_DETECTED = 5
"""A gene enters the signature when it is detected in at least this many of the experiment's controls."""

PRIOR_ITERATIONS = 300
"""EM iterations of the empirical-Bayes prior fitted on all cells (its optimum is flat: the
posterior means settle long before the weights do)."""

FOLD_PRIOR_ITERATIONS = 30
"""EM iterations of each fold's prior, started from the prior fitted on all cells (the flat
optimum moves little between folds; the posterior means, not the weights, are used)."""

N_SIGNATURE_GENES = 50
"""Genes of the final direction kept in the record (largest weights)."""


@dataclass
class SignatureFit:
    """The signature scores of one experiment and the state model fitted on them.

    Attributes
    ----------
    scores
        ``(n, 1)``: each cell's held-out signature score (controls about ``N(0, 1)``).
    em
        The two-state model (tied covariance, controls pinned) on ``scores`` after the last
        round.
    shift_auc, shift_pvalue
        The split-half test that the guide cells' signature is shifted from the controls'
        (:func:`split_half_test`): held-out AUC and p-value.
    info
        Record entries: folds, rounds, basal rank, genes used, the genes of largest weight in
        the final direction (mean over folds) and their weights, the number of genes whose
        shift has a local false sign rate below 0.05 (mean over the folds of the last round).
    """

    scores: np.ndarray
    em: EMResult
    shift_auc: float
    shift_pvalue: float
    info: dict = field(default_factory=dict)


def pearson_residuals(
    counts,
    library_size: np.ndarray,
    is_control: np.ndarray,
    *,
    dispersion: np.ndarray | None = None,
    batch: np.ndarray | None = None,
    clip: float = RESIDUAL_CLIP,
    min_detected: int = MIN_DETECTED,
) -> tuple[np.ndarray, np.ndarray]:
    """Clipped Pearson residuals against the controls, scaled to unit control variance.

    Parameters
    ----------
    counts
        Cells x genes raw counts of one experiment (dense or CSR).
    library_size
        Each cell's total count.
    is_control
        Which cells are controls.
    dispersion
        NB dispersion per gene (``Var = mu + phi mu^2``); ``None``: a moment estimate from the
        controls (:func:`~scotgm_pp.inference.count_layer.control_dispersion`).
    batch
        Optional batch label per cell: the controls' rates are taken within batches.
    clip
        Absolute clip of the raw residuals.
    min_detected
        Genes detected in fewer control cells are left out.

    Returns
    -------
    Z : numpy.ndarray
        ``(n, G_used)`` float32, controls centred and scaled per gene.
    used : numpy.ndarray
        Indices of the genes used (columns of ``counts``).
    """
    ctrl = np.asarray(is_control, bool)
    lib = np.asarray(library_size, float)
    Y = counts.tocsr() if sp.issparse(counts) else np.asarray(counts)
    # genes seen in too few controls have no basal variance to scale by: a single count would
    # then give its cell an extreme score
    detected = np.asarray((Y[np.flatnonzero(ctrl)] > 0).sum(axis=0)).ravel()
    used = np.flatnonzero(detected >= min_detected)
    Y = Y[:, used]
    if dispersion is None:
        phi = control_dispersion(Y, lib, ctrl, batch=batch)
    else:
        phi = np.asarray(dispersion, float)[used]
    phi = np.maximum(np.nan_to_num(phi, nan=0.0), 0.0).astype(np.float32)
    # the counts in single precision (exact: integers far below 2^24), then in place
    Ys = Y.astype(np.float32) if sp.issparse(Y) else None
    Z = Ys.toarray() if Ys is not None else np.array(Y, dtype=np.float32)
    codes = np.zeros(len(lib), int) if batch is None else pd.factorize(np.asarray(batch))[0]

    def control_sums(rows):  # of the single-precision counts, from the sparse ones where given
        return np.asarray((Z if Ys is None else Ys)[rows].sum(axis=0, dtype=np.float64)).ravel()

    overall = control_sums(np.flatnonzero(ctrl)) / max(lib[ctrl].sum(), 1e-300)
    for b in np.unique(codes):
        rows = np.flatnonzero(codes == b)
        cb = ctrl[rows]
        total = lib[rows][cb].sum()
        if rows.size == len(lib):  # one batch: its rate is the overall one (the same sums)
            rate = overall
        else:
            rate = control_sums(rows[cb]) / total if cb.any() and total > 0 else overall
        rate = np.where(rate > 0, rate, overall).astype(np.float32)
        for block_rows, block in _row_blocks(Z, rows):
            mu = lib[block_rows, None].astype(np.float32) * rate[None, :]
            block -= mu
            mu *= 1.0 + phi[None, :] * mu  # the NB variance, in place
            mu += 1e-12
            np.sqrt(mu, out=mu)
            block /= mu
            np.clip(block, -clip, clip, out=block)
            if not np.shares_memory(block, Z):
                Z[block_rows] = block
    # A clipped residual's mean still depends on the cell's library size (the clip is not linear),
    # so a difference in library sizes between guide cells and controls would shift thousands of
    # genes at once: remove each gene's linear trend in log library size, fitted on the controls.
    x = np.log(np.maximum(lib, 1.0))
    x = (x - x[ctrl].mean()).astype(np.float32)
    xx = float(x[ctrl] @ x[ctrl])
    if ctrl.sum() > 2 and xx > 0:
        slope = (x[ctrl] @ Z[ctrl]) / xx  # x is centred over the controls
        for block_rows, block in _row_blocks(Z):
            block -= x[block_rows, None] * slope[None, :]
    m, sd = _column_mean_sd(Z, np.flatnonzero(ctrl))
    sd = np.where(sd > 1e-6, sd, 1.0)
    m, sd = m.astype(np.float32), sd.astype(np.float32)
    for _, block in _row_blocks(Z):
        block -= m
        block /= sd
    return Z, used


def _column_mean_sd(Z: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation (``ddof=1``; ones below two rows) of each column of ``Z[rows]``
    in double precision, two passes over blocks of rows (no double-precision copy of ``Z``)."""
    g = Z.shape[1]
    total = np.zeros(g)
    for _, block in _row_blocks(Z, rows):
        total += block.sum(axis=0, dtype=np.float64)
    m = total / max(rows.size, 1)
    if rows.size < 2:
        return m, np.ones(g)
    ss = np.zeros(g)
    for _, block in _row_blocks(Z, rows):
        dev = block.astype(np.float64)
        dev -= m
        ss += np.einsum("ij,ij->j", dev, dev)
    return m, np.sqrt(ss / (rows.size - 1))


def basal_factors(Zc: np.ndarray, rank: int = BASAL_RANK, random_state=0) -> tuple[np.ndarray, np.ndarray]:
    """Factor model ``Sigma = L L^T + diag(psi)`` of the controls' residuals ``Zc`` (centred).

    ``L`` (genes x rank) from the ``rank`` leading PCs (truncated, as the PCA of
    :func:`scotgm_pp.pp.pca_projection`), ``psi`` the residual variance per gene (floored at 1e-3).
    """
    n, g = Zc.shape
    r = int(max(0, min(rank, n - 2, g - 1)))
    if r == 0:
        return np.zeros((g, 0)), np.maximum(Zc.var(axis=0, ddof=1), 1e-3)
    # one power iteration: the factor model only discounts the controls' main axes of variation
    V, s2 = _leading_pcs(Zc, r, np.random.default_rng(random_state), exact_max=4 * r, power_iterations=1)
    L = V * np.sqrt(s2 / (n - 1))[None, :]
    total = np.einsum("ij,ij->j", Zc, Zc, dtype=np.float64) / (n - 1)
    psi = np.maximum(total - (L * L).sum(axis=1), 1e-3)
    return L, psi


def _whiten(delta: np.ndarray, L: np.ndarray, psi: np.ndarray) -> tuple[np.ndarray, float]:
    """``w = Sigma^{-1} delta`` and ``w' Sigma w`` for ``Sigma = L L^T + diag(psi)``."""
    a = delta / psi
    if L.shape[1]:
        M = np.eye(L.shape[1]) + (L.T / psi) @ L
        w = a - (L / psi[:, None]) @ np.linalg.solve(M, L.T @ a)
    else:
        w = a
    q = float(np.sum(w * w * psi) + np.sum((L.T @ w) ** 2))
    return w, q


def _folds(is_control: np.ndarray, n_folds: int, rng: np.random.Generator) -> np.ndarray:
    fold = np.empty(is_control.size, int)
    for group in (is_control, ~is_control):
        idx = np.flatnonzero(group)
        fold[idx] = rng.permutation(np.arange(idx.size) % n_folds)
    return fold


def _contrast(c_sum, c_sq, nc, g_sum, g_sq, ng):
    """Weighted guide mean minus control mean per gene, its standard error, and the control mean;
    ``None`` when a group is (nearly) empty.

    The standard error uses the pooled variance of the two groups (their common variance under
    no effect): with a per-group variance, a rare gene that no guide cell of the fold happens to
    express would get a near-zero guide variance and a spuriously large contrast."""
    if nc < 2 or ng <= 1e-9:
        return None
    mc, mg = c_sum / nc, g_sum / ng
    ss = np.maximum(c_sq - nc * mc**2, 0.0) + np.maximum(g_sq - ng * mg**2, 0.0)
    pooled = ss / max(nc + ng - 2, 1)
    return mg - mc, np.sqrt(pooled * (1.0 / nc + 1.0 / ng)) + 1e-6, mc


def _direction(Z: np.ndarray, ctrl: np.ndarray, rank: int, random_state) -> tuple[np.ndarray, np.ndarray] | None:
    """Unit-scaled discriminant ``w`` and the control mean, from these cells only (one fit)."""
    c, g = Z[ctrl], Z[~ctrl]
    contrast = _contrast(c.sum(axis=0, dtype=np.float64), np.square(c).sum(axis=0, dtype=np.float64), len(c),
                         g.sum(axis=0, dtype=np.float64), np.square(g).sum(axis=0, dtype=np.float64), len(g))
    if contrast is None:
        return None
    d, se, mc = contrast
    L, psi = basal_factors(c - c.mean(axis=0), rank, random_state=random_state)
    w, q = _whiten(normal_means(d, se, grid_multiplier=2.0, max_iter=PRIOR_ITERATIONS).mean, L, psi)
    return (w / np.sqrt(q), mc) if q > 1e-12 else None


def split_half_test(Z: np.ndarray, is_control: np.ndarray, *, rank: int = BASAL_RANK,
                    random_state=None) -> tuple[float, float]:
    """Does the guide cells' signature differ from the controls'? A valid two-sample test.

    The cross-fitted scores of the state model are each independent of their own cell, but not of
    each other (a guide cell's score uses the other folds' guide cells, whose scores use it), so
    a two-sample test on them rejects too often under no effect. Here the cells are split in two
    halves (controls and guide cells separately); the direction (shift, shrinkage and basal
    factor model) is estimated on one half only and the other half's cells are scored with it:
    those scores are independent given the direction, so their one-sided Mann-Whitney test
    (guide cells score higher: the direction points from the controls towards the guide cells)
    is exact. Both halves are scored this way and the two p-values combined by Bonferroni,
    ``min(1, 2 min(p_1, p_2))``, valid whatever their dependence.

    Returns
    -------
    (auc, p)
        The larger of the two halves' held-out AUCs of guide cells against controls
        (``U / (n_guide n_control)``; 0.5 under no effect), and the combined p-value.
    """
    ctrl = np.asarray(is_control, bool)
    rng = np.random.default_rng(random_state)
    half = _folds(ctrl, 2, rng)
    stats_, pvals = [], []
    for h in (0, 1):
        train, test = half != h, half == h
        fit = _direction(Z[train], ctrl[train], rank, int(rng.integers(2**32)))
        a, b = test & ~ctrl, test & ctrl
        if fit is None or not a.any() or not b.any():
            stats_.append(0.0)
            pvals.append(1.0)
            continue
        w, mc = fit
        score = Z[test] @ w - mc @ w
        guide, control = score[~ctrl[test]], score[ctrl[test]]
        res = stats.mannwhitneyu(guide, control, alternative="greater")
        stats_.append(float(res.statistic) / (guide.size * control.size))
        pvals.append(float(res.pvalue))
    return max(stats_), float(min(1.0, 2.0 * min(pvals)))


def signature_prior(X: np.ndarray):
    """The state model's prior on the signature score: weakly informative on the score's own scale
    (:func:`~scotgm_pp.inference.em.scaled_prior`; its prior predictive stays within the data's
    range). ``regularization`` (the paper's ridge, which acts on PCA covariances) plays no part in
    one dimension with hundreds of cells."""
    return scaled_prior(X, 2)


def _state_model(s: np.ndarray, is_control: np.ndarray, regularization: float, em_regularization: str,
                 max_iter: int, tol: float) -> EMResult:
    X = s[:, None]
    return fit_em(X, fixed_state=np.where(is_control, 0, -1).astype(int), n_states=2,
                  prior=signature_prior(X), covariance="tied",
                  regularization=em_regularization, max_iter=max_iter, tol=tol)


def fit_signature_states(
    Z: np.ndarray,
    is_control: np.ndarray,
    *,
    genes=None,
    n_folds: int = SIGNATURE_FOLDS,
    n_rounds: int = SIGNATURE_ROUNDS,
    rank: int = BASAL_RANK,
    regularization: float = 0.01,
    em_regularization: str = "map",
    max_iter: int = 500,
    tol: float = 1e-10,
    random_state=None,
    shift_test: bool = True,
) -> SignatureFit:
    """Cross-fitted signature scores and the two-state model on them (see the module docstring).

    Parameters
    ----------
    Z
        ``(n, G)`` residuals of :func:`pearson_residuals`.
    is_control
        Which cells are controls (pinned to the basal state).
    genes
        Names of ``Z``'s columns, for the record.
    n_folds, n_rounds, rank
        Cross-fitting folds, rounds and the basal factor model's rank.
    regularization, em_regularization, max_iter, tol
        The state model's prior ridge and EM settings (as :func:`~scotgm_pp.tl.fit_states`).
    random_state
        Seed or Generator of the fold assignment and the truncated SVD.
    shift_test
        Run :func:`split_half_test` (otherwise its AUC and p-value are NaN: a caller that has
        already established an effect need not pay for it).

    Returns
    -------
    SignatureFit
    """
    ctrl = np.asarray(is_control, bool)
    rng = np.random.default_rng(random_state)
    n, G = Z.shape
    k = int(max(2, min(n_folds, ctrl.sum(), (~ctrl).sum())))
    fold = _folds(ctrl, k, rng)
    Z = np.asarray(Z, np.float32)
    Zc, Zg = Z[ctrl], Z[~ctrl]
    L, psi = basal_factors(Zc - Zc.mean(axis=0), rank, random_state=int(rng.integers(2**32)))
    one_hot = np.zeros((k, n), np.float32)
    one_hot[fold, np.arange(n)] = 1.0
    c_sum = (one_hot[:, ctrl] @ Zc).astype(np.float64)
    c_sq = (one_hot[:, ctrl] @ np.square(Zc)).astype(np.float64)
    c_n = one_hot[:, ctrl].sum(axis=1, dtype=np.float64)
    g_sq_all = np.square(Zg)
    weights = np.where(ctrl, 0.0, 1.0)
    s = np.zeros(n)
    test_rng = rng.spawn(1)[0]  # the folds do not depend on whether the test runs
    shift_auc, shift_p = split_half_test(Z, ctrl, rank=rank, random_state=test_rng) if shift_test else (np.nan, np.nan)
    em = None
    direction = np.zeros(G)
    n_sure = []
    for rnd in range(n_rounds):
        W = one_hot[:, ~ctrl] * weights[None, ~ctrl].astype(np.float32)
        g_sum = (W @ Zg).astype(np.float64)
        g_sq = (W @ g_sq_all).astype(np.float64)
        g_n = W.sum(axis=1, dtype=np.float64)
        direction[:] = 0.0
        n_sure = []
        # the round's prior fitted once on every cell, a warm start for each fold's own fit
        full = _contrast(c_sum.sum(axis=0), c_sq.sum(axis=0), c_n.sum(), g_sum.sum(axis=0), g_sq.sum(axis=0),
                         g_n.sum())
        start = normal_means(full[0], full[1], grid_multiplier=2.0, max_iter=PRIOR_ITERATIONS) if full is not None else None
        for f in range(k):
            held = fold == f
            contrast = _contrast(c_sum.sum(axis=0) - c_sum[f], c_sq.sum(axis=0) - c_sq[f], c_n.sum() - c_n[f],
                                 g_sum.sum(axis=0) - g_sum[f], g_sq.sum(axis=0) - g_sq[f], g_n.sum() - g_n[f])
            if contrast is None or start is None:
                s[held] = 0.0
                continue
            d, se, mc = contrast
            post = normal_means(d, se, grid=start.grid, init=start.weights, max_iter=FOLD_PRIOR_ITERATIONS)
            n_sure.append(int((post.lfsr < 0.05).sum()))
            w, q = _whiten(post.mean, L, psi)
            if q <= 1e-12:
                s[held] = 0.0
                continue
            w = w / np.sqrt(q)
            direction += w / k
            s[held] = Z[held] @ w - mc @ w
        em = _state_model(s, ctrl, regularization, em_regularization, max_iter, tol)
        weights = np.where(ctrl, 0.0, em.responsibilities[:, 1])
        if weights[~ctrl].sum() < 1.0:  # nothing left to contrast: keep this round
            break
    top = np.argsort(-np.abs(direction))[:N_SIGNATURE_GENES]
    names = np.arange(G).astype(str) if genes is None else np.asarray(genes).astype(str)
    info = {
        "signature_folds": int(k),
        "signature_rounds": int(n_rounds),
        "signature_basal_rank": int(L.shape[1]),
        "signature_n_genes_used": int(G),
        "signature_n_genes_lfsr05": float(np.mean(n_sure)) if n_sure else 0.0,
        "signature_genes": names[top],
        "signature_weights": direction[top].astype(np.float32),
        "signature_shift_auc": shift_auc,
        "signature_shift_pvalue": shift_p,
    }
    return SignatureFit(scores=s[:, None], em=em, shift_auc=shift_auc, shift_pvalue=shift_p, info=info)

"""Calibrated calls: resampling p-values for every gene and for "any effect" of a perturbation.

The test of gene ``g`` asks whether the guide cells' counts differ from the controls' beyond what
exchanging the labels produces. Its statistic is a permutation t-statistic of log-normalised
expression: per batch stratum, each cell's ``log(1 + y / lib * L)`` (``lib`` its total count,
``L`` the experiment's median total count) summed over the guide cells, centred and divided by
its exact standard deviation under reassignment of the labels (:func:`_score_z`). On the Papalexi
60-vs-300 protocol and on simulated screens it found the knocked-out target more often than the
negative-binomial score statistic (``statistic="score"``) and the Wald z used before issue 25
(``"wald"``): the counts' cell-to-cell spread is heavier-tailed than a negative binomial, and the
log damps it. Its null distribution comes from ``B`` random
reassignments of the guide label among the experiment's cells, within each batch stratum
(conditional resampling, as in sceptre; Barry et al. 2021): under the null hypothesis that the
perturbation leaves gene ``g`` alone, the labels are exchangeable, so the resampled statistics
and the observed one share a distribution whatever the counts' distribution, and the p-value is
valid without trusting the negative-binomial model.

* Moderate p-values are the empirical two-sided ``(1 + #{|z_b| >= |z|}) / (B + 1)``.
* Beyond the resamples (fewer than :data:`MIN_EXCEEDANCES` of them as extreme), a skew-normal
  distribution fitted to the ``B`` resampled statistics by its moments gives the tail (never
  above the empirical bound), so that p-values small enough for thousands of genes can be
  reached with a few hundred resamples. The fit is checked against the resamples' own tail on
  the observed side (:func:`_tail_fit_ok`); a gene whose fit fails gets
  :data:`EXTRA_RESAMPLES` more resamples and the check again, and keeps the empirical p-value if
  it still fails. (sceptre fits its skew-normal by maximum likelihood on thousands of resamples;
  this is a moment fit on 500, with that check.)
* A sparse gene (at most :data:`SPARSE_NONZERO` cells with a count) beyond its resamples gets an
  exact test instead of the fitted tail (its resampled statistics are too lumpy for a smooth
  fit): the number of guide cells among its non-zero cells against its hypergeometric law
  (mid-p). Within the resamples its p-value stays the empirical one.

"Any effect" uses the same resamples: its statistic is the largest ``|z|`` over the genes with more
than :data:`SPARSE_NONZERO` non-zero cells (a label-free choice: the lumpy statistics of sparse
genes would dominate the resampled maxima; on Papalexi, with the NB score statistic, counting them
cost 2 of 17 detected perturbations), its null the resampled maxima, with a Gumbel tail fitted by moments beyond them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import stats

__all__ = ["ResamplingTest", "resampling_test", "bh_qvalues", "N_RESAMPLES", "MIN_EXCEEDANCES"]

N_RESAMPLES = 500
"""Label reassignments per experiment (the empirical p-values then resolve down to 1/501). On the
Papalexi 60-vs-300 protocol 500 gave the power of 1,000 within the Monte-Carlo noise of borderline
experiments, at about half the cost (``benchmarks/README.md``)."""

MIN_EXCEEDANCES = 5
"""Below this many resampled statistics as extreme as the observed one, the fitted tail is used."""

TAIL_CHECK_COUNT = 10
TAIL_CHECK_FACTOR = 2.0
"""The fitted tail is trusted for a gene when, at its 10th most extreme resample on the observed
side, it is within a factor 2 of the resamples' own tail probability (:func:`_tail_fit_ok`)."""

EXTRA_RESAMPLES = 4500
"""Genes in the fitted tail whose fit fails the check get this many more resamples (their own
genes only), and the check is made again on all of them; a gene that still fails keeps the
empirical p-value ``(1 + exceedances) / (B + 1)``, which is valid."""

SPARSE_NONZERO = 20
"""A gene with at most this many cells holding a count in the experiment, and fewer than
:data:`MIN_EXCEEDANCES` resamples as extreme as observed, is tested exactly: the number of guide
cells among its non-zero cells against its hypergeometric law under random labels (stratified by
batch; :func:`_detection_pvalues`)."""

PSEUDOCOUNT = 0.5


@dataclass
class ResamplingTest:
    """Result of :func:`resampling_test` for one experiment.

    Attributes
    ----------
    z
        Observed statistic per gene.
    lfc, lfc_se
        The observed natural-log fold change of the guide cells against the controls and its
        standard error (``z = lfc / lfc_se``).
    pval
        Two-sided resampling p-value per gene.
    exceedances
        Resampled ``|z_b| >= |z|`` per gene (how many resamples backed the empirical p-value).
    any_statistic, pval_any
        Largest ``|z|`` over genes and its resampling p-value.
    n_resamples
        ``B``.
    pval_source
        How each gene's p-value was made: 0 the resamples' share, 1 the checked skew-normal tail,
        2 after :data:`EXTRA_RESAMPLES` more resamples, 3 the exact test of a sparse gene.
    """

    z: np.ndarray
    lfc: np.ndarray
    lfc_se: np.ndarray
    pval: np.ndarray
    exceedances: np.ndarray
    any_statistic: float
    pval_any: float
    n_resamples: int
    pval_source: np.ndarray | None = None


GENE_BLOCK = 2048
"""Genes per block of the resampled statistics (bounds the memory to a few (B + 1) x 2048 arrays)."""


def _strata_z(Y, guide_sets: np.ndarray, lib: np.ndarray, phi: np.ndarray, strata: np.ndarray):
    """NB Wald z of guide against control cells for every row of ``guide_sets`` (``(R, n)`` 0/1):
    ``(R, G)``; and the log fold change and its standard error of the first row, ``(G,)`` each.

    Per stratum, with ``A = S1 + c`` and ``C = T - S1 + c`` the guide and control sums of a gene
    (plus the pseudocount ``c``), ``L1, L0`` the summed library sizes and ``Q1, Q0`` their sums
    of squares: ``lfc = log(A / C) + log(L0 / L1)`` and
    ``var = 1 / A + 1 / C + phi (Q1 / L1^2 + Q0 / L0^2)`` (the NB variance of the two log rates
    with ``mu_i = lib_i * rate``); strata combine by inverse variance (:func:`count_shift`'s
    statistic).
    """
    R, G = guide_sets.shape[0], Y.shape[1]
    out = np.zeros((R, G))
    lfc0 = np.zeros(G)
    se0 = np.full(G, np.inf)
    levels = np.unique(strata)
    for g0 in range(0, G, GENE_BLOCK):
        g1 = min(G, g0 + GENE_BLOCK)
        block = Y[:, g0:g1]
        block = np.asarray(block.toarray() if sp.issparse(block) else block, dtype=np.float32)
        ph = phi[g0:g1][None, :]
        num = np.zeros((R, g1 - g0))
        prec = np.zeros((R, g1 - g0))
        for s in levels:
            m = strata == s
            W = guide_sets[:, m].astype(np.float32)
            ls = lib[m]
            L1, Q1 = W.astype(np.float64) @ ls, W.astype(np.float64) @ (ls**2)
            L0, Q0 = ls.sum() - L1, (ls**2).sum() - Q1
            ok = (L1 > 0) & (L0 > 0)
            L1s, L0s = np.where(ok, L1, 1.0), np.where(ok, L0, 1.0)
            S1 = (W @ block[m]).astype(np.float64)  # exact: integer sums far below 2^24
            A = S1 + PSEUDOCOUNT
            C = block[m].sum(axis=0, dtype=np.float64)[None, :] - S1 + PSEUDOCOUNT
            v = 1.0 / A
            v += 1.0 / C
            v += ph * (Q1 / L1s**2 + Q0 / L0s**2)[:, None]
            lfc = np.log(A / C)
            lfc += np.log(L0s / L1s)[:, None]
            keep = ok[:, None]
            num += np.where(keep, lfc / v, 0.0)
            prec += np.where(keep, 1.0 / v, 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[:, g0:g1] = np.where(prec > 0, num / np.sqrt(prec), 0.0)
            lfc0[g0:g1] = np.where(prec[0] > 0, num[0] / np.where(prec[0] > 0, prec[0], 1.0), 0.0)
            se0[g0:g1] = np.where(prec[0] > 0, 1.0 / np.sqrt(prec[0]), np.inf)
    return out, lfc0, se0


def _score_z(Y, guide_sets: np.ndarray, lib: np.ndarray, phi: np.ndarray, strata: np.ndarray,
             kind: str = "score") -> np.ndarray:
    """A standardised sum of per-cell values over the guide cells, for every row of ``guide_sets``, ``(R, G)``.

    ``kind="score"``: the negative-binomial score statistic of the guide label. Per stratum,
    ``mu_i = lib_i * rate`` (the stratum's pooled rate: the null) and the score residual
    ``r_i = (y_i - mu_i) / (1 + phi mu_i)`` (the derivative of the NB log-likelihood in the log
    rate). ``kind="lognorm"``: ``r_i = log(1 + y_i / lib_i * L)``, the cell's log-normalised
    value with ``L`` the median library size of all the experiment's cells (a permutation
    t-statistic of the log-normalised expression). The statistic is the guide cells' summed
    ``r``, centred and scaled by its exact variance under reassignment of the labels within the
    stratum (``k (n - k) / (n (n - 1)) sum (r - rbar)^2`` for ``k`` guide cells among ``n``);
    strata add up.
    """
    scale = float(np.median(lib)) if lib.size else 1.0
    if kind == "lognorm" and sp.issparse(Y):
        return _lognorm_z_sparse(Y, guide_sets, lib, strata, scale)
    R, G = guide_sets.shape[0], Y.shape[1]
    out = np.zeros((R, G))
    levels = np.unique(strata)
    for g0 in range(0, G, GENE_BLOCK):
        g1 = min(G, g0 + GENE_BLOCK)
        block = Y[:, g0:g1]
        block = np.asarray(block.toarray() if sp.issparse(block) else block, dtype=np.float64)
        ph = phi[g0:g1][None, :]
        num = np.zeros((R, g1 - g0))
        var = np.zeros(g1 - g0)
        for s in levels:
            m = strata == s
            n_s = int(m.sum())
            k = float(guide_sets[0, m].sum())
            if n_s < 2 or k == 0 or k == n_s:
                continue
            ls = lib[m]
            ys = block[m]
            mu = ls[:, None] * (ys.sum(axis=0) / max(ls.sum(), 1e-300))[None, :]
            if kind == "lognorm":
                r = np.log1p(ys * (scale / np.maximum(ls, 1e-300))[:, None])
            else:
                r = (ys - mu) / (1.0 + ph * mu)
            rbar = r.mean(axis=0)
            num += guide_sets[:, m].astype(np.float64) @ r - k * rbar[None, :]
            var += k * (n_s - k) / (n_s * (n_s - 1.0)) * ((r - rbar) ** 2).sum(axis=0)
        out[:, g0:g1] = _standardised(num, var)
    return out


def _standardised(num: np.ndarray, var: np.ndarray) -> np.ndarray:
    """The centred guide sums ``num`` ``(R, G)`` over the square root of their variance under
    reassignment ``var`` ``(G,)``; 0 for a gene without variance. ``num`` is overwritten."""
    ok = var > 0
    num /= np.sqrt(np.where(ok, var, 1.0))
    if not ok.all():
        num[:, ~ok] = 0.0
    return num


def _lognorm_z_sparse(Y, guide_sets: np.ndarray, lib: np.ndarray, strata: np.ndarray, scale: float) -> np.ndarray:
    """:func:`_score_z`'s ``"lognorm"`` statistic for sparse counts: ``log(1 + y L / lib)`` is 0
    wherever ``y`` is, so the guide sums are a dense-by-sparse product over the non-zero entries
    only (the same numbers, in about a third of the dense product's time at 14% non-zeros)."""
    R, G = guide_sets.shape[0], Y.shape[1]
    num = None
    var = np.zeros(G)
    Y = sp.csr_matrix(Y)
    for s in np.unique(strata):
        m = strata == s
        n_s = int(m.sum())
        k = float(guide_sets[0, m].sum())
        if n_s < 2 or k == 0 or k == n_s:
            continue
        ys = Y[np.flatnonzero(m)]
        r = ys.astype(np.float64)
        r.data = np.log1p(r.data * np.repeat(scale / np.maximum(lib[m], 1e-300), np.diff(r.indptr)))
        total = np.asarray(r.sum(axis=0)).ravel()
        rbar = total / n_s
        # guide sums of every row of guide_sets: (r^T W^T)^T with r in CSC, over its non-zeros
        sums = np.asarray(r.T.tocsr() @ guide_sets[:, m].T.astype(np.float64)).T
        sums -= k * rbar[None, :]
        if num is None:
            num = sums
        else:
            num += sums
        square = np.asarray(r.multiply(r).sum(axis=0)).ravel()
        ss = np.maximum(square - n_s * rbar**2, 0.0)  # sum (r - rbar)^2
        var += k * (n_s - k) / (n_s * (n_s - 1.0)) * ss
    return np.zeros((R, G)) if num is None else _standardised(num, var)


def _permuted_sets(is_guide: np.ndarray, strata: np.ndarray, B: int, rng: np.random.Generator) -> np.ndarray:
    """``(B + 1, n)`` guide indicators: the observed one first, then ``B`` reassignments of the
    guide label among the cells of each stratum (as many guide cells per stratum as observed)."""
    n = is_guide.size
    out = np.zeros((B + 1, n), dtype=bool)
    out[0] = is_guide
    for s in np.unique(strata):
        idx = np.flatnonzero(strata == s)
        k = int(is_guide[idx].sum())
        if k == 0:
            continue
        keys = rng.random((B, idx.size))
        chosen = np.argpartition(keys, k - 1, axis=1)[:, :k] if k < idx.size else np.tile(np.arange(idx.size), (B, 1))
        rows = np.repeat(np.arange(1, B + 1), chosen.shape[1])
        out[rows, idx[chosen.ravel()]] = True
    return out


def _skewnorm_fit(null: np.ndarray):
    """Skew-normal ``(alpha, xi, omega)`` fitted to each column of ``null`` by the method of moments."""
    mean = null.mean(axis=0)
    sd = null.std(axis=0, ddof=1)
    sd = np.where(sd > 0, sd, 1.0)
    skew = np.clip(stats.skew(null, axis=0, bias=False), -0.99, 0.99)
    skew = np.nan_to_num(skew)
    # moments -> (xi, omega, alpha): |delta| from the skewness, then scale and location
    g = np.abs(skew) ** (2.0 / 3.0)
    c = ((4.0 - np.pi) / 2.0) ** (2.0 / 3.0)
    delta = np.sign(skew) * np.sqrt(np.pi / 2.0 * g / (g + c))
    delta = np.clip(delta, -0.995, 0.995)
    alpha = delta / np.sqrt(1.0 - delta**2)
    omega = sd / np.sqrt(1.0 - 2.0 * delta**2 / np.pi)
    xi = mean - omega * delta * np.sqrt(2.0 / np.pi)
    return alpha, xi, omega


def _skewnorm_two_sided(null: np.ndarray, observed: np.ndarray) -> np.ndarray:
    """Two-sided tail probability of ``observed`` under a skew-normal fitted to each column of
    ``null`` by the method of moments."""
    alpha, xi, omega = _skewnorm_fit(null)
    lower = stats.skewnorm.cdf(observed, alpha, loc=xi, scale=omega)
    upper = stats.skewnorm.sf(observed, alpha, loc=xi, scale=omega)
    return np.clip(2.0 * np.minimum(lower, upper), 0.0, 1.0)


def _tail_fit_ok(null: np.ndarray, observed: np.ndarray) -> np.ndarray:
    """Does the fitted skew-normal agree with the resamples' own tail on the observed side? At the
    :data:`TAIL_CHECK_COUNT`-th most extreme resample on that side, its tail probability must lie
    within a factor :data:`TAIL_CHECK_FACTOR` of the empirical ``TAIL_CHECK_COUNT / B``."""
    B = null.shape[0]
    alpha, xi, omega = _skewnorm_fit(null)
    upper_side = observed >= np.median(null, axis=0)
    srt = np.sort(null, axis=0)
    k = min(TAIL_CHECK_COUNT, B)
    at = np.where(upper_side, srt[B - k], srt[k - 1])
    fitted = np.where(upper_side, stats.skewnorm.sf(at, alpha, loc=xi, scale=omega),
                      stats.skewnorm.cdf(at, alpha, loc=xi, scale=omega))
    # the k-th most extreme of B resamples has tail probability about (k - 0.5) / B
    empirical = (k - 0.5) / B
    return (fitted <= TAIL_CHECK_FACTOR * empirical) & (fitted >= empirical / TAIL_CHECK_FACTOR)


def _gumbel_upper(null: np.ndarray, observed: float) -> float:
    """Upper tail of ``observed`` under a Gumbel (maximum) law fitted to ``null`` by moments."""
    sd = float(np.std(null, ddof=1))
    if not np.isfinite(sd) or sd <= 0:
        return 0.0 if observed > float(np.max(null)) else 1.0
    beta = sd * np.sqrt(6.0) / np.pi
    mu = float(np.mean(null)) - 0.5772156649 * beta
    return float(stats.gumbel_r.sf(observed, loc=mu, scale=beta))


def _detection_pvalues(nonzero: np.ndarray, is_guide: np.ndarray, strata: np.ndarray) -> np.ndarray:
    """Exact two-sided p-values of the count of guide cells among each gene's non-zero cells.

    ``nonzero`` is ``(n, g)`` boolean. Under random reassignment of the labels within strata,
    the number of guide cells among a stratum's ``m`` non-zero cells is hypergeometric (``n_s``
    cells, ``k_s`` guide cells, ``m`` draws); strata add up by convolution. The p-value doubles
    the smaller one-sided mid-p tail (the outcomes beyond the observed one, plus half of the
    observed one's probability; at most 1): a discrete law's plain tail would put far fewer
    than 5% of null p-values below 0.05.
    """
    G = nonzero.shape[1]
    law = np.ones((G, 1))
    observed = np.zeros(G, dtype=np.int64)
    for s in np.unique(strata):
        m = strata == s
        nz = nonzero[m]
        draws = nz.sum(axis=0)
        n_s, k_s = int(m.sum()), int(is_guide[m].sum())
        top = int(draws.max(initial=0))
        support = np.arange(top + 1)
        pmf = stats.hypergeom.pmf(support[None, :], n_s, k_s, draws[:, None])
        pmf = np.where(support[None, :] <= draws[:, None], np.nan_to_num(pmf), 0.0)
        conv = np.zeros((G, law.shape[1] + top))
        for j in range(top + 1):  # row-wise convolution of the laws so far with this stratum's
            conv[:, j:j + law.shape[1]] += law * pmf[:, [j]]
        law = conv
        observed += (nz & is_guide[m][:, None]).sum(axis=0)
    idx = np.arange(law.shape[1])[None, :]
    at = np.where(idx == observed[:, None], law, 0.0).sum(axis=1)
    lower = np.where(idx < observed[:, None], law, 0.0).sum(axis=1) + 0.5 * at
    upper = np.where(idx > observed[:, None], law, 0.0).sum(axis=1) + 0.5 * at
    return np.minimum(1.0, 2.0 * np.minimum(lower, upper))


def resampling_test(
    counts,
    is_control: np.ndarray,
    *,
    library_size: np.ndarray | None = None,
    dispersion: np.ndarray | float = 0.0,
    batch: np.ndarray | None = None,
    n_resamples: int = N_RESAMPLES,
    random_state: int | np.random.Generator | None = 0,
    statistic: str = "lognorm",
    extra_resamples: int = EXTRA_RESAMPLES,
    sparse_nonzero: int = SPARSE_NONZERO,
) -> ResamplingTest:
    """Resampling p-values of one experiment (see the module's description).

    Parameters
    ----------
    counts
        Raw counts, cells x genes (sparse or dense), of the experiment's control and guide cells.
    is_control
        Control cells.
    library_size
        Each cell's total count (the offset); default the row sums of ``counts``.
    dispersion
        NB dispersion per gene used by the statistic (any fixed value keeps the test valid; a
        good one makes it powerful).
    batch
        Stratum of each cell: labels are reassigned within strata, and each stratum has its own
        baseline.
    n_resamples
        ``B``.
    random_state
        Seed or Generator of the reassignments.
    statistic
        ``"lognorm"`` (default): the permutation t-statistic of log-normalised expression;
        ``"score"``: the NB score statistic (both :func:`_score_z`); ``"wald"``: the NB Wald z of
        :func:`count_shift` (the statistic before issue 25).
    extra_resamples
        More resamples for the genes whose fitted tail fails its check (0: none).
    sparse_nonzero
        Genes with at most this many non-zero cells get the exact detection test (0: none).
    """
    ctrl = np.asarray(is_control, bool)
    Y = sp.csr_matrix(counts, dtype=np.float32) if sp.issparse(counts) else np.asarray(counts, np.float32)
    n, G = Y.shape
    if ctrl.shape != (n,):
        raise ValueError(f"is_control has {ctrl.size} entries for {n} cells.")
    if int(n_resamples) < 20:
        raise ValueError(f"n_resamples must be at least 20, got {n_resamples}.")
    lib = np.asarray(Y.sum(axis=1)).ravel() if library_size is None else np.asarray(library_size, float)
    phi = np.broadcast_to(np.asarray(dispersion, float), (G,))
    strata = np.zeros(n, dtype=np.int64) if batch is None else pd.factorize(np.asarray(batch))[0]
    rng = np.random.default_rng(random_state)
    B = int(n_resamples)
    sets = _permuted_sets(~ctrl, strata, B, rng)
    if statistic in ("lognorm", "score"):
        Z = _score_z(Y, sets, lib, phi, strata, kind=statistic)
        _, lfc, lfc_se = _strata_z(Y, sets[:1], lib, phi, strata)
    elif statistic == "wald":
        Z, lfc, lfc_se = _strata_z(Y, sets, lib, phi, strata)
    else:
        raise ValueError(f"statistic must be 'lognorm', 'score' or 'wald', got {statistic!r}.")
    z, null = Z[0], Z[1:]
    exceed = (np.abs(null) >= np.abs(z)[None, :] - 1e-12).sum(axis=0)
    p_emp = (1.0 + exceed) / (B + 1.0)
    p = p_emp.copy()
    source = np.zeros(G, dtype=np.int8)  # 0 empirical, 1 fitted tail, 2 extended resamples, 3 exact
    nonzero = (Y > 0) if sp.issparse(Y) else sp.csr_matrix(Y > 0)
    n_nonzero = np.asarray(nonzero.sum(axis=0)).ravel()
    beyond = exceed < MIN_EXCEEDANCES
    # a sparse gene beyond its resamples: the exact test instead of a tail fitted to a lumpy null
    sparse = (n_nonzero > 0) & (n_nonzero <= int(sparse_nonzero))
    tail = np.flatnonzero(beyond & ~sparse)
    if tail.size:
        ok = _tail_fit_ok(null[:, tail], z[tail])
        good, bad = tail[ok], tail[~ok]
        p[good] = np.minimum(_skewnorm_two_sided(null[:, good], z[good]), p_emp[good])
        source[good] = 1
        if bad.size and extra_resamples > 0:
            more = _permuted_sets(~ctrl, strata, int(extra_resamples), rng)[1:]
            Yb = Y[:, bad]
            extra = (_score_z(Yb, more, lib, phi[bad], strata, kind=statistic) if statistic != "wald"
                     else _strata_z(Yb, more, lib, phi[bad], strata)[0])
            both = np.vstack([null[:, bad], extra])
            exc = (np.abs(both) >= np.abs(z[bad])[None, :] - 1e-12).sum(axis=0)
            pe = (1.0 + exc) / (both.shape[0] + 1.0)
            fit_ok = (exc < MIN_EXCEEDANCES) & _tail_fit_ok(both, z[bad])
            fitted = _skewnorm_two_sided(both, z[bad])
            p[bad] = np.where(fit_ok, np.minimum(fitted, pe), pe)
            source[bad] = 2
    sparse_genes = np.flatnonzero(beyond & sparse)
    if sparse_genes.size:
        nz = nonzero[:, sparse_genes]
        p[sparse_genes] = _detection_pvalues(np.asarray(nz.toarray(), bool), ~ctrl, strata)
        source[sparse_genes] = 3
    dense_genes = n_nonzero > int(sparse_nonzero)
    if not dense_genes.any():
        dense_genes = np.ones(G, bool)
    max_obs = float(np.max(np.abs(z[dense_genes]))) if G else 0.0
    max_null = np.abs(null[:, dense_genes]).max(axis=1) if G else np.zeros(B)
    exceed_any = int((max_null >= max_obs - 1e-12).sum())
    p_any = (1.0 + exceed_any) / (B + 1.0)
    if exceed_any < MIN_EXCEEDANCES:
        p_any = min(_gumbel_upper(max_null, max_obs), p_any)
    return ResamplingTest(z=z, lfc=lfc, lfc_se=lfc_se, pval=p, exceedances=exceed, any_statistic=max_obs, pval_any=float(p_any),
                          n_resamples=B, pval_source=source)


def bh_qvalues(pvals: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values of every finite entry (NaN stays NaN), any shape."""
    p = np.asarray(pvals, float)
    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        out[ok] = stats.false_discovery_control(np.clip(p[ok], 0.0, 1.0))
    return out

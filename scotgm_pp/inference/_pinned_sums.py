"""Sums of the count layer's terms over pinned cells, in time proportional to their non-zero counts.

A pass of the count layer (:func:`scotgm_pp.inference.count_fit.evaluate`) needs, for the cells
pinned to one state and batch and for every gene, ``sum_i dv_i``, ``sum_i h_i`` and
``sum_i e_i`` (and per cell ``sum_g e_ig``), where with ``x_i = phi mu_i = s_i c`` (``c =
exp(lambda) / alpha``, ``alpha = 1 / phi``) and ``t_i = alpha (1 + x_i)``::

    e_i  = (y_i + alpha) log t_i = alpha log alpha + alpha log(1 + x_i) + y_i log t_i
    dv_i = (y_i - mu_i) / t_i    = -x_i / (1 + x_i) + y_i / t_i
    h_i  = mu_i (y_i + alpha) / t_i^2 = x_i / (1 + x_i)^2 + y_i x_i / (alpha (1 + x_i)^2)

The parts with ``y_i`` vanish where ``y_i = 0``: they are summed over the non-zero counts only.
The rest depends on the cell only through its library size ``s_i``. The cells are grouped in
bins of library size (``|s_i / s_0 - 1| <= w`` about the bin's centre ``s_0``, ``w =``
:data:`SERIES_WIDTH`); with ``X_0 = s_0 c``, ``q = X_0 / (1 + X_0)`` and ``eps_i = s_i / s_0 - 1``,
``x_i = X_0 (1 + eps_i)`` and ``1 + x_i = (1 + X_0)(1 + q eps_i)`` with ``|q eps_i| < w``, so::

    log(1 + x_i)       = log(1 + X_0) - sum_{m>=1} (-q)^m eps_i^m / m
    x_i / (1 + x_i)    = q (1 + eps_i) sum_{m>=0} (-q)^m eps_i^m
    x_i / (1 + x_i)^2  = q (1 - q) (1 + eps_i) sum_{m>=0} (m + 1) (-q)^m eps_i^m
    (x_i / (1 + x_i))^2 = q^2 (1 + eps_i)^2 sum_{m>=0} (m + 1) (-q)^m eps_i^m

converge for every gene whatever its rate (``q < 1``), and their sums over a bin's cells need only
the bin's power sums ``E_m = sum_i eps_i^m``: ``(bins x genes x terms)`` work instead of
``(cells x genes)``. With :data:`SERIES_TERMS` terms the truncation is below ``(M + 2) w^(M + 1)``
(about 1e-16) of the leading term. Used where the counts are sparse (at most
:data:`SPARSE_MAX_DENSITY` non-zero); denser counts take the direct per-entry path.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["SERIES_WIDTH", "SERIES_TERMS", "SPARSE_MAX_DENSITY", "SparseRows", "sparse_rows", "series_sums",
           "series_square_sums"]

SERIES_WIDTH = 0.2
"""Half-width of a library-size bin, relative to its centre."""

SERIES_TERMS = 24
"""Terms ``M`` of the series (the first omitted is below ``(M + 2) * 0.2^(M + 1)``, about 1e-16, of the leading one)."""

SPARSE_MAX_DENSITY = 0.25
"""Pinned rows whose share of non-zero counts is at most this take the series path."""

_GENE_BLOCK = 2048


@dataclass(frozen=True)
class SparseRows:
    """One block of pinned rows (all of one batch), prepared for :func:`series_sums`.

    Attributes
    ----------
    n
        Rows.
    bin_of
        ``(n,)`` bin of each row.
    E
        ``(bins, M + 3)``: ``sum_i eps_i^m`` over each bin's rows, ``m = 0 .. M + 2``.
    eps_pow
        ``(n, M + 1)``: ``eps_i^m / m`` for ``m = 1 .. M`` (column 0 unused, 0).
    s0
        ``(bins,)`` bin centres.
    alpha
        ``(G,)`` the genes' ``1 / phi`` in the rows' batch.
    nz_row, nz_col, nz_y, nz_s, nz_y_alpha, nz_log_alpha
        Per non-zero count, sorted by gene: its row (within the block), gene, count, the row's
        library size, ``y / alpha`` and ``log alpha`` of its gene.
    """

    n: int
    bin_of: np.ndarray
    E: np.ndarray
    eps_pow: np.ndarray
    s0: np.ndarray
    alpha: np.ndarray
    nz_row: np.ndarray
    nz_col: np.ndarray
    nz_y: np.ndarray
    nz_s: np.ndarray
    nz_y_alpha: np.ndarray
    nz_log_alpha: np.ndarray


def sparse_rows(y_csr, s: np.ndarray, alpha: np.ndarray, *, width: float = SERIES_WIDTH,
                terms: int = SERIES_TERMS) -> SparseRows:
    """Bin the rows by library size ``s`` and gather the non-zero counts of ``y_csr`` (rows x
    genes, sparse) by gene; ``alpha`` is ``1 / phi`` of every gene in the rows' batch."""
    s = np.asarray(s, float)
    alpha = np.asarray(alpha, float)
    n = s.size
    order = np.argsort(s, kind="stable")
    ss = s[order]
    ratio = (1.0 + width) / (1.0 - width)
    bin_sorted = np.empty(n, int)
    centres = []
    i = 0
    while i < n:
        j = max(int(np.searchsorted(ss, ss[i] * ratio, side="right")), i + 1)
        bin_sorted[i:j] = len(centres)
        centres.append(0.5 * (ss[i] + ss[j - 1]))
        i = j
    bin_of = np.empty(n, int)
    bin_of[order] = bin_sorted
    s0 = np.asarray(centres, float)
    eps = s / s0[bin_of] - 1.0
    M = int(terms)
    powers = np.ones((n, M + 3))
    powers[:, 1:] = eps[:, None]
    np.cumprod(powers[:, 1:], axis=1, out=powers[:, 1:])  # eps^m, m = 0 .. M + 2
    E = np.stack([powers[bin_of == j].sum(axis=0) for j in range(s0.size)])
    eps_pow = np.zeros((n, M + 1))
    eps_pow[:, 1:] = powers[:, 1:M + 1] / np.arange(1, M + 1)
    csc = y_csr.tocsc()  # the non-zeros grouped by gene
    csc.eliminate_zeros()
    nz_row = csc.indices.astype(np.intp)
    nz_col = np.repeat(np.arange(csc.shape[1], dtype=np.intp), np.diff(csc.indptr))
    nz_y = np.asarray(csc.data, float)
    return SparseRows(n=n, bin_of=bin_of, E=E, eps_pow=eps_pow, s0=s0, alpha=alpha, nz_row=nz_row, nz_col=nz_col,
                      nz_y=nz_y, nz_s=s[nz_row], nz_y_alpha=nz_y / alpha[nz_col], nz_log_alpha=np.log(alpha[nz_col]))


def _bin_series(rows: SparseRows, c: np.ndarray, alpha: np.ndarray, *, want_rows: bool, squares: bool):
    """Over every bin and gene block: per gene ``sum_i log(1 + x_i)``, ``sum x/(1+x)`` and
    ``sum x/(1+x)^2`` (with ``squares`` instead only ``sum (x/(1+x))^2``), and per row
    ``sum_g alpha_g log(1 + x_ig)`` (``want_rows``)."""
    M = rows.eps_pow.shape[1] - 1
    E = rows.E
    nb, G = rows.s0.size, c.size
    m1 = np.arange(1, M + 2, dtype=float)  # m + 1 for m = 0 .. M
    inv_m = np.zeros(M + 1)
    inv_m[1:] = 1.0 / np.arange(1, M + 1)
    d_coef = E[:, :M + 1] + E[:, 1:M + 2]  # E_m + E_{m+1}
    if squares:
        coef = ((E[:, :M + 1] + 2.0 * E[:, 1:M + 2] + E[:, 2:M + 3]) * m1)[:, :, None]
    else:
        coef = np.stack([E[:, :M + 1] * inv_m, d_coef, d_coef * m1], axis=2)  # (nb, M + 1, 3)
    L, D, H, S = (np.zeros(G) for _ in range(4))
    T = np.zeros((nb, M + 1)) if want_rows else None
    A0 = np.zeros(nb) if want_rows else None
    for g0 in range(0, G, _GENE_BLOCK):
        g1 = min(G, g0 + _GENE_BLOCK)
        X0 = rows.s0[:, None] * c[None, g0:g1]  # (nb, J)
        q = X0 / (1.0 + X0)
        P = np.empty((nb, g1 - g0, M + 1))
        P[:, :, 0] = 1.0
        P[:, :, 1:] = -q[:, :, None]
        np.cumprod(P[:, :, 1:], axis=2, out=P[:, :, 1:])  # (-q)^m
        PC = np.matmul(P, coef)  # (nb, J, 1 or 3)
        if squares:
            S[g0:g1] = np.sum(q * q * PC[:, :, 0], axis=0)
        else:
            lp = np.log1p(X0)
            L[g0:g1] = E[:, 0] @ lp - PC[:, :, 0].sum(axis=0)
            D[g0:g1] = np.sum(q * PC[:, :, 1], axis=0)
            H[g0:g1] = np.sum(q / (1.0 + X0) * PC[:, :, 2], axis=0)
            if want_rows:
                a = alpha[g0:g1]
                A0 += lp @ a
                T += np.matmul(a, P)  # (nb, M + 1)
    row_log = None
    if want_rows:
        # sum_g alpha_g log(1 + x_ig) = A0_bin - sum_m eps_i^m / m * T_bin,m
        row_log = A0[rows.bin_of] - np.einsum("im,im->i", rows.eps_pow, T[rows.bin_of])
    return L, D, H, S, row_log


_ENTRY_BLOCK = 1 << 16


def _entries(rows: SparseRows, cols: np.ndarray | None):
    """Blocks of about :data:`_ENTRY_BLOCK` non-zero entries of the genes ``cols`` (sorted;
    renumbered ``0 .. len(cols) - 1``; all genes when ``None``), cut at gene boundaries. Each is
    ``(sel, col, genes, starts)``: the entries (a slice or indices into the entry arrays), their
    genes, the genes present and where each one's entries start within the block."""
    if cols is None:
        sel_all, new = None, rows.nz_col
    else:
        pos = np.full(rows.alpha.size, -1, np.intp)
        pos[cols] = np.arange(cols.size)
        mapped = pos[rows.nz_col]
        sel_all = np.flatnonzero(mapped >= 0)  # still sorted by gene: cols is increasing
        new = mapped[sel_all]
    N = new.size
    if N == 0:
        return
    first = np.flatnonzero(np.r_[True, new[1:] != new[:-1]])  # where each gene's entries start
    cuts = [0]
    while cuts[-1] < N:
        k = int(np.searchsorted(first, cuts[-1] + _ENTRY_BLOCK, side="left"))
        nxt = int(first[k]) if k < first.size else N
        cuts.append(nxt if nxt > cuts[-1] else N)
    for a, b in zip(cuts[:-1], cuts[1:]):
        sel = slice(a, b) if sel_all is None else sel_all[a:b]
        col = new[a:b]
        starts = first[(first >= a) & (first < b)] - a
        yield sel, col, col[starts], starts


def series_sums(rows: SparseRows, lam: np.ndarray, cols: np.ndarray | None = None, *, want_rows: bool = True):
    """Per gene ``sum_i dv_i``, ``sum_i h_i`` and ``sum_i e_i`` over the rows, and (``want_rows``)
    per row ``sum_g e_ig`` and ``sum_g y_ig lambda_g``; ``lam`` holds the log rates of the genes
    ``cols`` (all genes when ``None``)."""
    lam = np.asarray(lam, float)
    G = lam.size
    alpha = rows.alpha if cols is None else rows.alpha[cols]
    c = np.exp(lam) / alpha
    L, D, H, _, row_log = _bin_series(rows, c, alpha, want_rows=want_rows, squares=False)
    e_col, dv_col, h_col = np.zeros(G), np.zeros(G), np.zeros(G)
    n = rows.n
    e_row = np.zeros(n) if want_rows else None
    ylam = np.zeros(n) if want_rows else None
    for sel, col, genes, starts in _entries(rows, cols):
        y = rows.nz_y[sel]
        x = rows.nz_s[sel] * c[col]
        op = x + 1.0
        e = np.log1p(x)
        e += rows.nz_log_alpha[sel]
        e *= y  # y log t
        dv = rows.nz_y_alpha[sel] / op  # y / t
        x /= op
        x *= dv  # y mu / t^2
        e_col[genes] = np.add.reduceat(e, starts)
        dv_col[genes] = np.add.reduceat(dv, starts)
        h_col[genes] = np.add.reduceat(x, starts)
        if want_rows:
            r = rows.nz_row[sel]
            e_row += np.bincount(r, weights=e, minlength=n)
            ylam += np.bincount(r, weights=y * lam[col], minlength=n)
    alpha_log_alpha = alpha * np.log(alpha)
    e_sum = n * alpha_log_alpha + alpha * L + e_col
    dv_sum = dv_col - D
    h_sum = H + h_col
    if not want_rows:
        return dv_sum, h_sum, e_sum, None, None
    return dv_sum, h_sum, e_sum, alpha_log_alpha.sum() + row_log + e_row, ylam


def series_square_sums(rows: SparseRows, lam: np.ndarray) -> np.ndarray:
    """Per gene ``sum_i dv_i^2`` over the rows (all genes)."""
    lam = np.asarray(lam, float)
    G = lam.size
    c = np.exp(lam) / rows.alpha
    *_, S, _ = _bin_series(rows, c, rows.alpha, want_rows=False, squares=True)
    out = np.zeros(G)
    for sel, col, genes, starts in _entries(rows, None):
        x = rows.nz_s[sel] * c[col]
        op = x + 1.0
        yt = rows.nz_y_alpha[sel] / op  # y / t
        # dv^2 = (x / (1 + x))^2 - 2 (y / t) x / (1 + x) + (y / t)^2
        out[genes] = np.add.reduceat(yt * (yt - 2.0 * x / op), starts)
    return S + out

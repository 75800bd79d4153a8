"""Which guides each cell carries, from its guide-capture counts: the numeric part.

Pure functions over a cells x guides count matrix (CSC, so that each guide is one column). Three
ways to call a guide in a cell:

``"mixture"`` (the default)
    Per guide, a two-component Gaussian mixture (background vs signal) on the guide's log-odds
    share of the cell's guide UMIs, ``y = log((x + 0.5) / (T - x + 0.5))`` (``x`` the guide's
    UMIs, ``T`` the cell's UMIs over all guides), over the cells where the guide has UMIs. Ambient
    guide RNA grows with a cell's capture, so counts alone do not separate background from signal
    across cells of very different depths (the same mixture on log counts called several guides
    in 7,602 of Papalexi's 20,729 cells, this one in 674: ``benchmarks/papalexi_guides.py``); the
    share does. The half-counts keep ``y`` finite and pull cells with few UMIs towards the middle.
    EM starts from "the guide holds most of the cell's guide UMIs" (``y > 0``), so the fit is
    deterministic. A guide is called where its signal posterior exceeds 0.5. Guides with fewer
    than :data:`MIN_MIXTURE_CELLS` cells carrying them are called by that majority rule instead,
    and a guide that holds the majority of no cell's guide UMIs is never called.
``"umi"``
    Every guide with at least ``threshold`` UMIs.
``"max"``
    The guide with the most UMIs, when it has at least ``threshold``; a tie calls every tied
    guide. It cannot see a second guide, so it never reports several guides otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

__all__ = ["GUIDE_METHODS", "MIN_MIXTURE_CELLS", "GuideCalls", "call_guides", "guide_log_odds", "share_mixture"]

GUIDE_METHODS = ("mixture", "umi", "max")
MIN_MIXTURE_CELLS = 10
"""A guide's mixture is fitted only on at least this many cells with its UMIs."""
MIN_SD = 0.05
"""Floor of each component's standard deviation (log-odds units): no component collapses onto
a handful of identical values."""
_LOG_SQRT_2PI = 0.5 * np.log(2.0 * np.pi)


def guide_log_odds(x: np.ndarray, total: np.ndarray) -> np.ndarray:
    """``log((x + 0.5) / (total - x + 0.5))``: a guide's log-odds share of the cell's guide UMIs."""
    x = np.asarray(x, float)
    return np.log(x + 0.5) - np.log(np.asarray(total, float) - x + 0.5)


def _normal_logpdf(y: np.ndarray, mean: float, sd: float) -> np.ndarray:
    return -0.5 * ((y - mean) / sd) ** 2 - np.log(sd) - _LOG_SQRT_2PI


def share_mixture(y: np.ndarray, *, max_iter: int = 1000, tol: float = 1e-10) -> tuple[np.ndarray, dict]:
    """Two-component Gaussian mixture of log-odds shares by EM: background (low) vs signal (high).

    Parameters
    ----------
    y
        Log-odds shares (:func:`guide_log_odds`) of the cells where one guide has UMIs.
    max_iter, tol
        EM stops when the log-likelihood's relative gain falls below ``tol``, or after
        ``max_iter`` iterations.

    Returns
    -------
    posterior
        Each cell's probability of the signal component.
    fit
        ``background_mean``, ``background_sd``, ``signal_mean``, ``signal_sd``, ``signal_weight``
        (the share of these cells in the signal component), ``separation`` (Ashman's D, the
        distance of the means over the pooled sd), ``loglik``, ``n_iter``, ``converged``.
    """
    y = np.asarray(y, float)
    r = np.where(y > 0, 0.9, 0.1)
    previous = -np.inf
    converged = False
    for it in range(1, max_iter + 1):
        n1 = r.sum()
        n0 = y.size - n1
        w = n1 / y.size
        m1 = float(r @ y / n1)
        m0 = float((1.0 - r) @ y / n0)
        s1 = max(float(np.sqrt(r @ (y - m1) ** 2 / n1)), MIN_SD)
        s0 = max(float(np.sqrt((1.0 - r) @ (y - m0) ** 2 / n0)), MIN_SD)
        l1 = np.log(w) + _normal_logpdf(y, m1, s1)
        l0 = np.log1p(-w) + _normal_logpdf(y, m0, s0)
        total = np.logaddexp(l0, l1)
        r = np.exp(l1 - total)
        loglik = float(total.sum())
        if loglik - previous <= tol * abs(loglik):
            converged = True
            break
        previous = loglik
        if not 0.0 < r.sum() < y.size:  # one component emptied: nothing left to separate
            break
    if m1 < m0:  # label the higher-share component "signal"
        r, (m0, s0, m1, s1), w = 1.0 - r, (m1, s1, m0, s0), 1.0 - w
    fit = {"background_mean": m0, "background_sd": s0, "signal_mean": m1, "signal_sd": s1, "signal_weight": float(w),
           "separation": abs(m1 - m0) / np.sqrt(0.5 * (s0**2 + s1**2)), "loglik": loglik, "n_iter": it,
           "converged": converged}
    return r, fit


NO_FIT = {"background_mean": np.nan, "background_sd": np.nan, "signal_mean": np.nan, "signal_sd": np.nan,
          "signal_weight": np.nan, "separation": np.nan, "loglik": np.nan, "n_iter": 0, "converged": False}
"""The per-guide table's row of a guide without a mixture."""


@dataclass
class GuideCalls:
    """Calls of every guide in every cell.

    Attributes
    ----------
    called
        Cells x guides, CSR booleans: the guide is called in the cell.
    posterior
        Cells x guides, CSR: each guide's signal posterior where it has UMIs (``"mixture"``);
        ``None`` for the rules without a model.
    per_guide
        One row per guide: cells with its UMIs, cells where it is called, and with
        ``"mixture"`` the fit (:func:`share_mixture`) and how it was called (``call_rule``).
    """

    called: sp.csr_matrix
    posterior: sp.csr_matrix | None
    per_guide: pd.DataFrame

    @property
    def n_guides(self) -> np.ndarray:
        return np.diff(self.called.indptr)

    def single_guide(self) -> np.ndarray:
        """Column of the one guide called in each cell; -1 where none or several are."""
        out = np.full(self.called.shape[0], -1, dtype=np.int64)
        one = self.n_guides == 1
        out[one] = self.called.indices[self.called.indptr[:-1][one]]
        return out

    def call_probability(self) -> np.ndarray:
        """Posterior probability of each cell's call (exactly its called guides, no other), the
        guides' mixtures taken as independent; NaN for the rules without a model."""
        n = self.called.shape[0]
        if self.posterior is None:
            return np.full(n, np.nan)
        P = self.posterior.tocsr()
        # log p for called guides (p > 0.5), log (1 - p) for the others with UMIs; guides
        # without UMIs add 0
        p = np.clip(P.data, 0.0, 1.0)
        terms = np.where(p > 0.5, np.log(np.maximum(p, 1e-300)), np.log1p(-np.minimum(p, 1.0 - 1e-16)))
        rows = np.repeat(np.arange(n), np.diff(P.indptr))
        return np.exp(np.bincount(rows, weights=terms, minlength=n))


def _by_rule(counts: sp.csc_matrix, method: str, threshold: float) -> sp.csr_matrix:
    X = counts.tocsr()
    if method == "umi":
        called = X >= threshold
    else:  # "max"
        top = np.asarray(X.max(axis=1).todense()).ravel()
        rows = np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))
        keep = (X.data == top[rows]) & (X.data >= threshold) & (X.data > 0)
        called = sp.csr_matrix((keep, X.indices, X.indptr), shape=X.shape)
    called = sp.csr_matrix(called, dtype=bool)
    called.eliminate_zeros()
    return called


def call_guides(counts, method: str = "mixture", *, threshold: float = 5) -> GuideCalls:
    """Call the guides of every cell.

    Parameters
    ----------
    counts
        Cells x guides UMI counts (sparse or dense), non-negative integers.
    method
        ``"mixture"``, ``"umi"`` or ``"max"`` (module docstring).
    threshold
        Minimum UMIs of a called guide for ``"umi"`` and ``"max"`` (not used by ``"mixture"``).

    Returns
    -------
    GuideCalls
    """
    if method not in GUIDE_METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(GUIDE_METHODS)}.")
    C = sp.csc_matrix(counts, dtype=np.float64)
    C.eliminate_zeros()
    n_cells, n_guides = C.shape
    carrying = np.diff(C.indptr)
    if method != "mixture":
        called = _by_rule(C, method, threshold)
        per_guide = pd.DataFrame({"n_cells_with_umis": carrying,
                                  "n_cells_called": np.bincount(called.indices, minlength=n_guides)})
        return GuideCalls(called=called, posterior=None, per_guide=per_guide)
    total = np.asarray(C.sum(axis=1)).ravel()
    post = np.zeros(C.nnz)
    rows = []
    for j in range(n_guides):
        lo, hi = C.indptr[j], C.indptr[j + 1]
        y = guide_log_odds(C.data[lo:hi], total[C.indices[lo:hi]])
        fit = dict(NO_FIT)
        if not np.any(y > 0):
            fit["call_rule"] = "not called: the guide holds the majority of no cell's guide UMIs"
        elif hi - lo >= MIN_MIXTURE_CELLS:
            post[lo:hi], mixture = share_mixture(y)
            fit.update(mixture, call_rule="mixture")
        else:
            post[lo:hi] = (y > 0).astype(float)
            fit["call_rule"] = "majority of the cell's guide UMIs (too few cells for a mixture)"
        rows.append(fit)
    P = sp.csc_matrix((post, C.indices, C.indptr), shape=C.shape).tocsr()
    called = sp.csr_matrix(P > 0.5, dtype=bool)
    called.eliminate_zeros()
    per_guide = pd.DataFrame(rows)
    per_guide.insert(0, "n_cells_with_umis", carrying)
    per_guide.insert(1, "n_cells_called", np.bincount(called.indices, minlength=n_guides))
    return GuideCalls(called=called, posterior=P, per_guide=per_guide)

"""Negative-binomial dispersions shrunk toward a mean-dispersion trend (empirical Bayes).

A per-gene moment estimate of the dispersion ``phi_g`` is noisy where counts are low: at a mean
of 0.1 counts per cell, hundreds of control cells barely tell ``phi = 0`` from ``phi = 1``, and a
moment estimate at or below 0 (Poisson) is common. Genes of similar expression have similar
dispersions, so each gene's estimate borrows strength from all of them (the idea of DESeq2,
edgeR and glmGamPoi; the estimator below is this package's own):

1. **Trend.** ``t(m) = a0 + a1 / m`` over the genes' mean count per cell ``m`` (DESeq2's
   parametric form), fitted by iteratively reweighted least squares with weights ``1 / t^2``
   (a gamma GLM with identity link), leaving out genes whose estimate is at or below 0 and, after
   each pass, genes more than 15x above or 1e4x below the current trend.
2. **Sampling variance** of a moment estimate from ``n`` cells when the truth sits on the trend:
   ``v_g = (kappa4 / n + 2 kappa2^2 / (n - 1)) / m_g^4``, with ``kappa2 = m + t m^2`` and
   ``kappa4 = m + 7 t m^2 + 12 t^2 m^3 + 6 t^3 m^4`` the NB's second and fourth cumulants (the
   variance of a sample variance).
3. **Prior.** ``phi_g ~ N(t_g, c^2 t_g^2)``: a common coefficient of variation ``c`` around the
   trend, estimated by the Paule-Mandel equation on the informative genes (``v_g < t_g^2``, a
   sampling CV below 1): the mean of ``(phi_hat_g - t_g)^2 / (c^2 t_g^2 + v_g)`` is 1 (bounded to
   ``[0.05, 10]``).
4. **Posterior mean** ``phi_g = t_g + w_g (phi_hat_g - t_g)``, ``w_g = c^2 t_g^2 / (c^2 t_g^2 + v_g)``:
   low-count genes move to the trend, well-measured genes keep their own estimate. A gene more
   than two prior-plus-sampling standard deviations *above* its trend keeps its own estimate (a
   real high-dispersion gene, as DESeq2 does for dispersion outliers). The result is floored at
   ``floor``.

The shrunk dispersion is data of the count layer (a plug-in, like the raw estimate before it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["DispersionFit", "shrink_dispersion", "DISPERSION_SHRINKAGE"]

DISPERSION_SHRINKAGE = "trend-eb"
"""Name of the rule in records and tables (``"none"`` when the raw moment estimate is used)."""

_OUTLIER_HIGH, _OUTLIER_LOW = 15.0, 1e-4
_CV_BOUNDS = (0.05, 10.0)


@dataclass
class DispersionFit:
    """The shrunk dispersions and how they were made.

    Attributes
    ----------
    dispersion
        ``(G,)`` posterior-mean dispersions (floored).
    raw
        ``(G,)`` the moment estimates given (not floored).
    trend
        ``(G,)`` the fitted trend at each gene's mean.
    weight
        ``(G,)`` the weight ``w_g`` of the gene's own estimate (1 for kept outliers).
    coefficients
        ``(a0, a1)`` of the trend.
    prior_cv
        ``c``, the prior's coefficient of variation around the trend.
    n_trend_genes
        Genes the trend was fitted on.
    """

    dispersion: np.ndarray
    raw: np.ndarray
    trend: np.ndarray
    weight: np.ndarray
    coefficients: tuple[float, float]
    prior_cv: float
    n_trend_genes: int


def _fit_trend(raw: np.ndarray, mean: np.ndarray, max_iter: int = 20) -> tuple[float, float, int]:
    use = (raw > 1e-8) & (mean > 0) & np.isfinite(raw)
    if use.sum() < 3:
        med = float(np.median(raw[use])) if use.any() else 0.0
        return med, 0.0, int(use.sum())
    a = np.array([float(np.median(raw[use])), 0.0])
    for _ in range(max_iter):
        x = 1.0 / mean[use]
        design = np.column_stack([np.ones(x.size), x])
        fit = np.maximum(design @ a, 1e-8)
        w = 1.0 / fit**2
        coef, *_ = np.linalg.lstsq(design * np.sqrt(w)[:, None], raw[use] * np.sqrt(w), rcond=None)
        coef = np.maximum(coef, 0.0)
        if coef.sum() <= 0:
            coef = np.array([float(np.median(raw[use])), 0.0])
        t_all = np.maximum(coef[0] + coef[1] / np.maximum(mean, 1e-12), 1e-8)
        ratio = raw / t_all
        new_use = (raw > 1e-8) & (mean > 0) & np.isfinite(raw) & (ratio < _OUTLIER_HIGH) & (ratio > _OUTLIER_LOW)
        converged = np.allclose(coef, a, rtol=1e-6, atol=1e-10) and np.array_equal(new_use, use)
        a = coef
        if new_use.sum() >= 3:
            use = new_use
        if converged:
            break
    return float(a[0]), float(a[1]), int(use.sum())


def _sampling_variance(mean: np.ndarray, phi: np.ndarray, n: float) -> np.ndarray:
    m = np.maximum(mean, 1e-12)
    k2 = m + phi * m**2
    k4 = m + 7.0 * phi * m**2 + 12.0 * phi**2 * m**3 + 6.0 * phi**3 * m**4
    return (k4 / n + 2.0 * k2**2 / max(n - 1.0, 1.0)) / m**4


def _prior_cv(raw: np.ndarray, trend: np.ndarray, v: np.ndarray) -> float:
    """Paule-Mandel over the informative genes (``v < t^2``: a sampling CV below 1): the ``c`` at which
    the mean of ``(phi_hat - t)^2 / (c^2 t^2 + v)`` is 1."""
    info = v < trend**2
    if info.sum() < 20:
        return _CV_BOUNDS[0]
    r2 = (raw[info] - trend[info]) ** 2
    t2 = trend[info] ** 2
    vi = v[info]
    target = 1.0

    def q(c):
        return float(np.mean(r2 / (c**2 * t2 + vi)))

    lo, hi = _CV_BOUNDS
    if q(lo) <= target:
        return lo
    if q(hi) >= target:
        return hi
    for _ in range(60):
        mid = np.sqrt(lo * hi)
        if q(mid) > target:
            lo = mid
        else:
            hi = mid
    return float(np.sqrt(lo * hi))


def shrink_dispersion(raw, mean, n_cells: float, *, floor: float = 1e-6) -> DispersionFit:
    """Shrink per-gene moment estimates of the NB dispersion toward their mean-dispersion trend.

    Parameters
    ----------
    raw
        ``(G,)`` moment estimates (not floored: values at or below 0 are allowed).
    mean
        ``(G,)`` each gene's mean count per cell among the cells the estimates came from.
    n_cells
        How many cells the estimates came from (less one per batch stratum with its own rate).
    floor
        Smallest dispersion returned.

    Returns
    -------
    DispersionFit
    """
    raw = np.asarray(raw, float)
    mean = np.asarray(mean, float)
    if raw.shape != mean.shape or raw.ndim != 1:
        raise ValueError(f"raw and mean must be two (G,) arrays, got shapes {raw.shape} and {mean.shape}.")
    ok = np.isfinite(raw) & np.isfinite(mean) & (mean > 0)
    raw_ok = np.where(ok, raw, 0.0)
    a0, a1, n_trend = _fit_trend(raw_ok, np.where(ok, mean, 0.0))
    trend = np.maximum(a0 + a1 / np.maximum(mean, 1e-12), floor)
    trend = np.where(ok, trend, floor)
    n = max(float(n_cells), 2.0)
    v = _sampling_variance(np.where(ok, mean, 1.0), trend, n)
    if n_trend >= 3 and ok.sum() >= 3:
        cv = _prior_cv(raw_ok[ok], trend[ok], v[ok])
    else:
        cv = _CV_BOUNDS[0]
    prior_var = (cv * trend) ** 2
    w = prior_var / (prior_var + v)
    post = trend + w * (raw_ok - trend)
    outlier = ok & (raw_ok - trend > 2.0 * np.sqrt(prior_var + v))
    post = np.where(outlier, raw_ok, post)
    w = np.where(outlier, 1.0, w)
    post = np.where(ok, post, np.maximum(raw_ok, 0.0))
    return DispersionFit(dispersion=np.maximum(post, floor), raw=raw, trend=trend, weight=w, coefficients=(a0, a1),
                         prior_cv=float(cv), n_trend_genes=int(n_trend))

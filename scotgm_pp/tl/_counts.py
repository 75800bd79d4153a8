"""A model-free count test: per-gene log fold changes of guide cells against controls.

This is a baseline, not the model. The model's count layer is part of the declared graph
(:mod:`scotgm_pp.models.count_graph`, fitted by :mod:`scotgm_pp.inference.count_fit`) and
gives the ``effect`` columns; this module gives the ``lfc_all_guides`` columns and the benchmark
row ``nb-all-guides``. It fits no state, no PCA and no coupling: every guide cell (or a given
weight per cell) against the controls, gene by gene,

    y_ig ~ NB(mean = l_i * exp(b_{g, s(i)} + d_g * t_i), var = mean + phi_g * mean^2),

with ``l_i`` the cell's total count, ``s(i)`` an optional batch (replicate) stratum with its own
baseline, ``t_i`` the weight of the cell in the treated group (1 for every guide cell) and
``d_g`` the natural-log fold change, estimated as the ratio of pooled rates per stratum (a
Poisson working model with NB standard errors from a moment dispersion), strata combined by
inverse variance. ``bound = sign(d) * max(|d| - lambda * se, 0)`` with the universal threshold
``lambda = sqrt(2 ln G)`` (the largest |z| expected among ``G`` null genes). Before issue 11 this
was the package's default ranking.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

__all__ = ["count_shift", "universal_threshold", "nb_dispersion", "bound_order_score"]

PSEUDOCOUNT = 0.5
"""Added to each group's summed counts so a gene absent from one group has a finite fold change."""


def universal_threshold(n_genes: int) -> float:
    """``sqrt(2 ln G)``: the order of the largest |z| among ``G`` independent null genes."""
    return float(np.sqrt(2.0 * np.log(max(int(n_genes), 2))))


def _dense(X) -> np.ndarray:
    return np.asarray(X.toarray() if sp.issparse(X) else X, float)


def nb_dispersion(y: np.ndarray, lib: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Method-of-moments NB dispersion per gene, pooled over cell groups with their own rates.

    Within every group the expected count of a cell is ``lib_i * rate`` (``rate`` the group's
    summed counts over summed library); ``phi = sum((y - mu)^2 - mu) / sum(mu^2)``, floored at 0
    (Poisson).
    """
    num = np.zeros(y.shape[1])
    den = np.zeros(y.shape[1])
    for g in np.unique(groups):
        m = groups == g
        rate = y[m].sum(axis=0) / max(lib[m].sum(), 1e-12)
        mu = lib[m, None] * rate[None, :]
        num += ((y[m] - mu) ** 2 - mu).sum(axis=0)
        den += (mu**2).sum(axis=0)
    return np.maximum(num / np.maximum(den, 1e-300), 0.0)


def _log_rate(y, lib, w, phi, pseudocount):
    """Weighted log rate of one group and its variance (NB sandwich form)."""
    total = w @ lib
    rate = (w @ y + pseudocount) / total
    mu = lib[:, None] * rate[None, :]
    var = ((w**2) @ (mu * (1.0 + phi[None, :] * mu))) / (w @ mu) ** 2
    return np.log(rate), var


def count_shift(
    counts,
    is_control: np.ndarray,
    *,
    weights: np.ndarray | None = None,
    batch: np.ndarray | None = None,
    threshold: float | None = None,
    pseudocount: float = PSEUDOCOUNT,
    min_cells: int = 2,
    dispersion=None,
) -> pd.DataFrame:
    """Model-free per-gene NB log fold change of guide cells against controls (a baseline, see the module docstring).

    Parameters
    ----------
    counts
        Raw counts, cells x genes (dense or sparse), of the control and guide cells of one
        experiment.
    is_control
        Boolean mask of control cells.
    weights
        Weight of each guide cell in the treated group (e.g. ``p_perturbed``); ``None``: 1 for
        every guide cell. Controls always have weight 0 in the treated group.
    batch
        Optional stratum label per cell (e.g. biological replicate). Each stratum has its own
        baseline; the per-stratum fold changes are combined by inverse variance, so a shift
        between replicates that are unevenly represented does not read as a response.
    threshold
        ``lambda`` of the bound; ``None``: :func:`universal_threshold` of the number of genes.
    pseudocount
        Added to each group's summed counts per stratum.
    min_cells
        A stratum enters only with at least this many control cells and this much guide weight.
    dispersion
        NB dispersion ``phi`` per gene (or one value; 0 is Poisson); ``None``: the moment
        estimate of :func:`nb_dispersion` within batch x group cells.

    Returns
    -------
    DataFrame with one row per gene: ``lfc`` (natural log), ``lfc_se``, ``lfc_z``,
    ``lfc_bound`` and ``dispersion``.
    """
    y = _dense(counts)
    ctrl = np.asarray(is_control, bool)
    n, g = y.shape
    if ctrl.shape != (n,):
        raise ValueError(f"is_control has {ctrl.size} entries for {n} cells.")
    if not np.all(np.isfinite(y)) or (y < 0).any():
        raise ValueError("counts must be finite and non-negative.")
    w1 = np.ones(n) if weights is None else np.asarray(weights, float)
    if w1.shape != (n,) or not np.all(np.isfinite(w1)) or (w1 < 0).any() or (w1 > 1).any():
        raise ValueError("weights must be one finite value in [0, 1] per cell.")
    w1 = np.where(ctrl, 0.0, w1)
    strata = np.zeros(n, dtype=int) if batch is None else pd.factorize(np.asarray(batch))[0]
    lib = y.sum(axis=1)
    if (lib[ctrl | (w1 > 0)] <= 0).any():
        raise ValueError("cells with no counts cannot be compared; filter them first.")
    if dispersion is None:
        phi = nb_dispersion(y, lib, strata * 2 + (~ctrl).astype(int))
    else:
        phi = np.broadcast_to(np.asarray(dispersion, float), (g,)).copy()
        if not np.all(np.isfinite(phi)) or (phi < 0).any():
            raise ValueError("dispersion must be finite and non-negative.")
    precision = np.zeros(g)
    weighted = np.zeros(g)
    used = 0
    for s in np.unique(strata):
        m = strata == s
        wc = (m & ctrl).astype(float)
        wt = np.where(m, w1, 0.0)
        if wc.sum() < min_cells or wt.sum() < min_cells:
            continue
        b0, v0 = _log_rate(y, lib, wc, phi, pseudocount)
        b1, v1 = _log_rate(y, lib, wt, phi, pseudocount)
        weighted += (b1 - b0) / (v0 + v1)
        precision += 1.0 / (v0 + v1)
        used += 1
    if used == 0:
        raise ValueError(f"no stratum has {min_cells} control cells and {min_cells} units of guide weight.")
    lfc = weighted / precision
    se = 1.0 / np.sqrt(precision)
    lam = universal_threshold(g) if threshold is None else float(threshold)
    bound = np.sign(lfc) * np.maximum(np.abs(lfc) - lam * se, 0.0)
    return pd.DataFrame({"lfc": lfc, "lfc_se": se, "lfc_z": lfc / se, "lfc_bound": bound, "dispersion": phi})


def bound_order_score(bound: np.ndarray, z: np.ndarray) -> np.ndarray:
    """One number per gene that sorts like ``(bound, z)``: genes whose bound is 0 follow by ``z``.

    ``z`` enters scaled far below the smallest non-zero ``|bound|``, so it only breaks ties.
    """
    bound = np.asarray(bound, float)
    z = np.asarray(z, float)
    nz = np.abs(bound[bound != 0])
    scale = (nz.min() if nz.size else 1.0) * 1e-3 / max(float(np.max(np.abs(z), initial=0.0)), 1.0)
    return bound + scale * z

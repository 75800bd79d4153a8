"""One experiment (a perturbation's guide cells and its controls): preprocess, fit, rank.

The AnnData-aware driver :func:`scotgm_pp.tl.perturbation_response` maps this over the
perturbations of a screen; the benchmark calls it on sampled pairs.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from anndata import AnnData

from ..pp import PreprocessParams, prepare_pair
from ._core import fit_perturbation, gene_statistics, state_shift, unpinned_posterior
from ._counts import count_shift

__all__ = ["analyse_pair"]


def analyse_pair(
    counts: AnnData,
    is_control: np.ndarray,
    *,
    params: PreprocessParams,
    coupling: str,
    escape_model: bool,
    regularization: float,
    em_regularization: str = "map",
    random_state=None,
    coupling_kwargs: dict | None = None,
    rank_by: str = "lfc_bound",
    batch: np.ndarray | None = None,
) -> tuple[dict, pd.DataFrame, pd.Series]:
    """Preprocess, fit and rank one experiment (raw counts of its control and guide cells).

    ``batch``: optional stratum label per cell of ``counts`` for the count layer
    (:func:`~scotgm_pp.tl.count_shift`). Returns the per-experiment record (everything needed to
    reuse the fit), the gene table and ``p_perturbed`` indexed by the cells kept.
    """
    pair = prepare_pair(counts, is_control, params)
    fit = fit_perturbation(
        pair.pca.scores,
        pair.is_control,
        coupling=coupling,
        escape_model=escape_model,
        regularization=regularization,
        em_regularization=em_regularization,
        random_state=random_state,
        coupling_kwargs=coupling_kwargs,
    )
    shift = state_shift(pair.lognorm, fit.p_perturbed)
    table = _count_table(counts, pair, fit.p_perturbed, batch)
    genes = gene_statistics(pair.pca.loadings, fit.mean, fit.cov, genes=pair.var_names.to_numpy(), shift=shift,
                            counts=table, rank_by=rank_by)
    em = fit.em
    assigned = em.responsibilities.argmax(axis=1)
    hidden = unpinned_posterior(pair.pca.scores, em) >= 0.5
    ctrl = pair.is_control
    guide_state = assigned[~ctrl]
    confusion = np.array(
        [
            [int((~hidden[ctrl]).sum()), int(hidden[ctrl].sum())],
            [int((guide_state == 0).sum()), int((guide_state == 1).sum())],
        ]
    )
    record = {
        **pair.record,
        "coupling": coupling,
        "em_n_iter": int(em.n_iter),
        "em_converged": bool(em.converged),
        "em_logp": float(em.logp_trace[-1]),
        "em_logp_trace": np.asarray(em.logp_trace),
        "weights": np.asarray(em.weights),
        "means": np.asarray(em.means),
        "covariances": np.asarray(em.covariances),
        "cross_covariance": np.asarray(fit.cross_covariance),
        "perturbation_mean": np.asarray(fit.mean),
        "perturbation_cov": np.asarray(fit.cov),
        "fraction_perturbed": float(fit.p_perturbed[~ctrl].mean()),
        "confusion": confusion,
        "confusion_labels": np.array(["control", "guide"]),
        "confusion_states": np.array(["basal", "perturbed"]),
        "loadings": pair.pca.loadings.astype(np.float32),
        "genes": pair.var_names.to_numpy().astype(str),
        "gene_mean": pair.pca.gene_mean,
        "gene_std": pair.pca.gene_std,
        "explained_variance_ratio": pair.pca.explained_variance_ratio[: pair.pca.n_pcs],
        "ks": pair.ks,
        **{f"coupling_{k}": v for k, v in fit.coupling_info.items()},
        **fit.state_info,
    }
    p = pd.Series(fit.p_perturbed, index=pair.obs_names)
    return record, genes, p


def _count_table(counts: AnnData, pair, p_perturbed: np.ndarray, batch) -> pd.DataFrame:
    """The count layer on the cells and genes the preprocessing kept: the guide's average effect
    (every guide cell) and the effect in the perturbed state (guide cells weighted by
    ``p_perturbed``)."""
    rows = counts.obs_names.get_indexer(pair.obs_names)
    cols = counts.var_names.get_indexer(pair.var_names)
    y = counts.X[rows][:, cols]
    b = None if batch is None else np.asarray(batch)[rows]
    table = count_shift(y, pair.is_control, batch=b)
    try:  # same cells and strata, so the same dispersion: reuse it
        state = count_shift(y, pair.is_control, batch=b, weights=p_perturbed, dispersion=table["dispersion"])
        table["lfc_perturbed"] = state["lfc"].to_numpy()
        table["lfc_perturbed_se"] = state["lfc_se"].to_numpy()
    except ValueError:  # too little perturbed weight in every stratum
        table["lfc_perturbed"] = np.nan
        table["lfc_perturbed_se"] = np.nan
    return table

"""Synthetic cells of a fitted perturbation, drawn from the model's posterior predictive.

Every synthetic cell takes one posterior draw of the parameters
(:func:`~scotgm_pp.tl._posterior.draw_posterior`), a library size drawn from those of the
experiment's cells in its state (the record's quantiles), a batch, and then its PCA scores and
its counts from the declared graph (:mod:`scotgm_pp.models.predictive`): counts are negative
binomial with mean ``s exp(beta + delta_z)`` and the count layer's dispersion, every gene's
marginal exactly the graph's. ``dependence="state"`` (default) ties the genes of a cell
together through its PCA draw (a Gaussian copula), ``"independent"`` leaves them independent
given the state as the graph does.

``"basal"`` / ``"perturbed"``
    Draws from the fitted state.
``"counterfactual"``
    Real control cells moved to the perturbed state: each gene's count is carried through the
    latent scale of the copula, the cell's PCA part moved by the fitted transport coupling (so
    the coupling's plan, and its Hit-and-Run draws, matter here), and mapped back to counts under
    the perturbed state's marginal (:func:`scotgm_pp.models.predictive.counterfactual_counts`).
    What does not change is the cell's own: its library size, batch and the part of its
    expression outside the PCs.

``.X`` is the log-normalisation of the synthetic counts (``log1p`` of counts per
``target_sum`` of the cell's library size, as the pipeline normalises real cells) and
``.obsm["X_pca"]`` its projection on the experiment's loadings (as for real cells).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .._validation import InputError
from ..models.predictive import DEPENDENCE, counterfactual_counts, draw_cells, latent_scale
from ._posterior import BASAL, PERTURBED, PosteriorDraws, cell_alpha, check_record, draw_posterior, point_draws
from ._response import get_record, get_responses

__all__ = ["sample_cells", "project_cells", "residual_variance", "gene_counts", "STATES", "library_draws",
           "lognormalise", "experiment_settings"]

STATES = ("perturbed", "basal", "counterfactual")


def experiment_settings(adata: AnnData, key: str) -> dict:
    """``target_sum``, ``max_value``, the perturbation key, control label and batch key of a run."""
    if key not in adata.uns or "params" not in adata.uns[key]:
        raise KeyError(f"no scotgm results under adata.uns[{key!r}]; run scotgm_pp.tl.perturbation_response first.")
    params = adata.uns[key]["params"]
    pre = params.get("preprocess", {})
    return {"target_sum": float(pre.get("target_sum", 1e4)), "max_value": pre.get("max_value", 10.0),
            "perturbation_key": params.get("perturbation_key"), "control": params.get("control"),
            "batch_key": params.get("batch_key")}


def gene_counts(adata: AnnData, cells: np.ndarray, genes: np.ndarray, layer: str | None = None) -> np.ndarray:
    """Raw counts of the given cells over the record's genes (dense, float)."""
    missing = [g for g in genes if g not in adata.var_names][:5]
    if missing:
        raise InputError(f"genes {missing} of the fitted record are not in adata.var_names; pass the screen "
                         "that was analysed.")
    col = adata.var_names.get_indexer(genes)
    X = adata.layers[layer] if layer else adata.X
    X = X[cells][:, col]
    return np.asarray(X.toarray() if sp.issparse(X) else X, dtype=float)


def library_sizes_of(adata: AnnData, cells: np.ndarray, layer: str | None = None) -> np.ndarray:
    """Each cell's total count over every gene of the screen (the count layer's size factor)."""
    X = adata.layers[layer] if layer else adata.X
    return np.asarray(X[cells].sum(axis=1), dtype=float).ravel()


def lognormalise(counts: np.ndarray, library_size: np.ndarray, target_sum: float = 1e4) -> np.ndarray:
    """``log1p(target_sum * counts / library_size)`` row by row."""
    lib = np.asarray(library_size, float)
    return np.log1p(np.asarray(counts, float) / np.where(lib > 0, lib, 1.0)[:, None] * target_sum)


def project_cells(counts: np.ndarray, record: dict, *, target_sum: float = 1e4, max_value: float | None = 10.0,
                  library_size: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Scaled expression and PCA scores of cells given their raw counts over the record's genes.

    Repeats the experiment's preprocessing (normalise to ``target_sum`` by ``library_size``,
    default the counts' row sums, ``log1p``, scale with the record's ``gene_mean``/``gene_std``,
    clip at ``max_value``) and projects on the loadings by least squares
    (``scores = scaled V (V^T V)^-1``).
    """
    counts = np.asarray(counts, float)
    lib = counts.sum(axis=1) if library_size is None else np.asarray(library_size, float)
    lognorm = lognormalise(counts, lib, target_sum)
    scaled = (lognorm - np.asarray(record["gene_mean"], float)) / np.asarray(record["gene_std"], float)
    if max_value is not None:
        np.clip(scaled, -max_value, max_value, out=scaled)
    V = np.asarray(record["loadings"], float)
    scores = np.linalg.solve(V.T @ V, V.T @ scaled.T).T
    return scaled, scores


def residual_variance(record: dict) -> np.ndarray:
    """Per-gene variance of the scaled expression outside the kept PCs (``1 - sum_k V_jk^2 var_k``).

    The PC variances are ``explained_variance_ratio * n_genes`` (scaled genes have unit variance).
    """
    V = np.asarray(record["loadings"], float)
    m = V.shape[1]
    evr = np.asarray(record["explained_variance_ratio"], float)[:m]
    pc_var = evr * V.shape[0]
    return np.clip(1.0 - (V**2) @ pc_var, 0.0, None)


def library_draws(record: dict, state: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """Library sizes of ``n`` cells of a state: inverse-CDF draws from the record's quantiles."""
    q = np.asarray(record["library_quantiles"], float)[state]
    grid = np.linspace(0.0, 1.0, q.size)
    return np.interp(rng.random(n), grid, q)


def _chol(S: np.ndarray) -> np.ndarray:
    S = 0.5 * (S + np.swapaxes(S, -1, -2))
    w, U = np.linalg.eigh(S)
    return U * np.sqrt(np.clip(w, 0.0, None))[..., None, :]  # L L^T = S (not triangular)


def _coupling_maps(draws: PosteriorDraws) -> tuple[np.ndarray, np.ndarray]:
    """Per draw ``T = C^T S0^-1`` and ``L`` with ``L L^T = S1 - C^T S0^-1 C``."""
    S0, S1 = draws.covariances[:, BASAL], draws.covariances[:, PERTURBED]
    C = draws.cross_covariance
    T = np.swapaxes(np.linalg.solve(S0, C), -1, -2)
    return T, _chol(S1 - T @ C)


def _batches(record: dict, state: int, n: int, rng) -> np.ndarray:
    w = np.asarray(record["batch_weights"], float)[state]
    return rng.choice(w.size, size=n, p=w / w.sum()) if w.size > 1 else np.zeros(n, int)


def _control_batches(adata, rows, record, settings) -> np.ndarray:
    """The record's batch code of each cell; ``-1`` for a batch the experiment did not hold."""
    labels = np.asarray(record.get("count_batches", []), dtype=str)
    if labels.size <= 1 or not settings.get("batch_key"):
        return np.zeros(len(rows), int)
    obs = adata.obs[settings["batch_key"]].astype(str).to_numpy()[rows]
    code = {b: j for j, b in enumerate(labels)}
    return np.array([code.get(b, -1) for b in obs], dtype=int)


def control_alpha(adata, rows, record, settings, key: str, batch: np.ndarray) -> np.ndarray:
    """NB shapes of the given cells (:func:`~scotgm_pp.tl._posterior.cell_alpha`); a cell of a
    batch the experiment did not hold (code ``-1``) reads the screen's own estimate for its batch
    (``responses.varm["dispersion_screen_batch"]``) where the screen has one."""
    alpha = cell_alpha(record, batch)
    unseen = np.asarray(batch) < 0
    if np.ndim(alpha) < 2 or not unseen.any():
        return alpha
    table = get_responses(adata, key).varm.get("dispersion_screen_batch")
    if table is None:
        return alpha
    table = pd.DataFrame(table).reindex(np.asarray(record["genes"]).astype(str))
    labels = adata.obs[settings["batch_key"]].astype(str).to_numpy()[rows]
    for label in np.unique(labels[unseen]):
        if label in table.columns and table[label].notna().all():
            alpha[unseen & (labels == label)] = 1.0 / np.maximum(table[label].to_numpy(float), 1e-12)
    return alpha


def sample_cells(
    adata: AnnData,
    perturbation: str,
    n: int,
    *,
    state: str = "perturbed",
    key: str = "scotgm",
    dependence: str = "state",
    n_draws: int | None = 50,
    layer: str | None = None,
    random_state: int | np.random.Generator | None = 0,
) -> AnnData:
    """Synthetic cells of one fitted perturbation, with counts, from the posterior predictive.

    Parameters
    ----------
    adata
        Screen analysed by :func:`~scotgm_pp.tl.perturbation_response` (raw counts in ``.X`` or
        ``layer``; needed for ``"counterfactual"``).
    perturbation
        Which fitted perturbation.
    n
        Number of cells.
    state
        ``"perturbed"`` or ``"basal"`` (draws from the fitted state), or ``"counterfactual"``
        (real control cells moved to the perturbed state; see the module docstring).
    key
        ``adata.uns`` key of the results.
    dependence
        ``"state"`` (genes co-vary through the cell's PCA draw) or ``"independent"`` (the
        declared graph as is: genes independent given the state). Ignored for counterfactuals,
        which keep the real cell's own dependence.
    n_draws
        Posterior draws of the parameters (:func:`~scotgm_pp.tl._posterior.draw_posterior`);
        cells are spread evenly over them. ``None`` or 0: every cell from the fitted point.
    layer
        Layer with the raw counts (default ``.X``).
    random_state
        Seed or Generator.

    Returns
    -------
    anndata.AnnData
        ``n`` cells x the record's genes. ``.X`` log-normalised expression (float32),
        ``.layers["counts"]`` the synthetic counts (CSR, int64), ``.obsm["X_pca"]`` the projection
        of ``.X`` on the loadings, ``.obsm["X_state"]`` the PCA-space draw of the state model.
        ``.obs``: ``state``, ``source``, ``perturbation``, ``parameter_draw`` (-1: the fitted
        point), ``library_size``, ``batch``, ``control_cell`` (the real control cell a
        counterfactual started from, else ""). ``.uns["scotgm_synthetic"]`` the settings.
    """
    if state not in STATES:
        raise InputError(f"unknown state {state!r}; choose one of {', '.join(STATES)}.")
    if dependence not in DEPENDENCE:
        raise InputError(f"unknown dependence {dependence!r}; choose one of {', '.join(DEPENDENCE)}.")
    if isinstance(n, bool) or int(n) != n or int(n) < 1:
        raise InputError(f"n must be a positive number of cells, got {n!r}.")
    n = int(n)
    record = get_record(adata, perturbation, key)
    check_record(record)
    settings = experiment_settings(adata, key)
    target_sum, max_value = settings["target_sum"], settings["max_value"]
    rng = np.random.default_rng(random_state)
    if n_draws:
        draws = draw_posterior(record, int(n_draws), rng)
        which = np.arange(n) % draws.n_draws
        rng.shuffle(which)
    else:
        draws = point_draws(record)
        which = np.zeros(n, int)
    genes = np.asarray(record["genes"]).astype(str)
    V = np.asarray(record["loadings"], float)
    r = residual_variance(record)
    obs = pd.DataFrame(index=[f"synthetic_{state}_{i}" for i in range(n)])
    obs["state"] = state
    obs["perturbation"] = str(perturbation)
    obs["parameter_draw"] = which if n_draws else -1

    if state in ("basal", "perturbed"):
        k = BASAL if state == "basal" else PERTURBED
        lib = library_draws(record, k, n, rng)
        batch = _batches(record, k, n, rng)
        alpha = cell_alpha(record, batch)
        log_mu = np.log(lib)[:, None] + draws.log_rates(which, np.full(n, k)) + draws.batch_offset[batch]
        covs = draws.covariances[:, k]
        scale = latent_scale(V, covs, r)[which] if dependence == "state" else None
        x, y = draw_cells(rng, means=draws.means[which, k], chols=np.linalg.cholesky(covs)[which], log_mu=log_mu,
                          alpha=alpha, dependence=dependence, loadings=V, residual_variance=r, scale=scale)
        obs["source"] = "fitted state"
        obs["control_cell"] = ""
    else:
        rows = _control_rows(adata, settings)
        pick = rng.choice(rows, size=n, replace=n > rows.size)
        y0 = gene_counts(adata, pick, genes, layer)
        lib = library_sizes_of(adata, pick, layer)
        batch = _control_batches(adata, pick, record, settings)
        alpha = control_alpha(adata, pick, record, settings, key, batch)
        # a batch the experiment did not hold: no offset of its own (the reference's, 0)
        base = np.log(np.maximum(lib, 1.0))[:, None] + draws.log_rate_basal[which] + draws.batch_offset[np.maximum(batch, 0)]
        T, L = _coupling_maps(draws)
        y, _, a_new = counterfactual_counts(
            rng, y0, log_mu_from=base, log_mu_to=base + draws.effect[which], alpha=alpha, loadings=V,
            scale_from=latent_scale(V, draws.covariances[:, BASAL], r)[which],
            scale_to=latent_scale(V, draws.covariances[:, PERTURBED], r)[which], transport=T[which],
            noise_chol=L[which])
        x = draws.means[which, PERTURBED] + a_new
        obs["source"] = "control cell moved to the perturbed state"
        obs["control_cell"] = adata.obs_names[pick].to_numpy()

    obs["library_size"] = lib
    batch_labels = np.asarray(record.get("count_batches", ["all"]), dtype=str)
    obs["batch"] = batch_labels[batch] if batch_labels.size else "all"
    lognorm = lognormalise(y, lib, target_sum)
    _, scores = project_cells(y, record, target_sum=target_sum, max_value=max_value, library_size=lib)
    for col in ("state", "source", "perturbation", "batch"):
        obs[col] = pd.Categorical(obs[col])
    out = AnnData(X=lognorm.astype(np.float32), obs=obs, var=pd.DataFrame(index=genes),
                  layers={"counts": sp.csr_matrix(y.astype(np.int64))})
    out.obsm["X_pca"] = scores
    out.obsm["X_state"] = x
    out.uns["scotgm_synthetic"] = {
        "perturbation": str(perturbation),
        "state": state,
        "key": key,
        "dependence": dependence if state != "counterfactual" else "the control cell's own",
        "n_draws": int(n_draws or 0),
        "target_sum": target_sum,
        "coupling": str(record.get("coupling", "ot")),
        "units": "log1p of counts per target_sum of the cell's library size",
    }
    return out


def _control_rows(adata: AnnData, settings: dict) -> np.ndarray:
    key, control = settings.get("perturbation_key"), settings.get("control")
    if key is None or key not in adata.obs:
        raise InputError("the run's perturbation key is not in adata.obs; counterfactual cells start from real "
                         "control cells of the analysed screen: pass that AnnData.")
    rows = np.flatnonzero(adata.obs[key].astype(str).to_numpy() == str(control))
    if rows.size == 0:
        raise InputError(f"no control cells ({key} == {control!r}) in adata; counterfactual cells start from real "
                         "control cells.")
    return rows

"""Synthetic cells from a fitted perturbation: the fitted states and counterfactual controls.

Three kinds of cells, all made in the experiment's PCA space and mapped back to genes
(``scaled = scores @ V_m^T``; ``lognorm = scaled * gene_std + gene_mean``, clipped at 0):

``"basal"`` / ``"perturbed"``
    Draws from the fitted state ``N(mu_k, Sigma_k)`` with parameter uncertainty: parameters are
    first redrawn (:func:`~scotgm_pp.tl._predict.draw_parameters`), then cells. The expression the
    m PCs do not capture is added back (``residual``): by default the residual of a randomly
    chosen real control cell (its scaled expression minus its PCA reconstruction), or
    independent per-gene Gaussian noise with the unexplained variance.
``"counterfactual"``
    Real control cells pushed through the perturbation: each control cell's scores ``x`` are
    recomputed by projecting its scaled expression onto the loadings, and ``y = x + z`` with
    ``z`` drawn from the perturbation distribution. By default ``z`` is drawn *given* ``x``
    under the fitted coupling (``z | x ~ N(mu_p + (C^T S0^-1 - I)(x - mu_0), S1 - C^T S0^-1 C)``),
    so the counterfactual population has exactly the perturbed state's law; with
    ``perturbation_draw="independent"`` ``z ~ N(mu_p, Sigma_p)`` independently of the cell
    (the convolution of the paper's equation 1). Only the PCA part of the cell changes: its
    expression outside the m PCs (its own residual) is kept.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .._validation import InputError
from ._predict import BASAL, PERTURBED, draw_parameters, get_record

__all__ = ["sample_cells", "project_cells", "STATES"]

STATES = ("perturbed", "basal", "counterfactual")


def _params(adata: AnnData, key: str) -> dict:
    return adata.uns[key].get("params", {})


def _gene_counts(adata: AnnData, cells: np.ndarray, genes: np.ndarray, layer: str | None = None) -> np.ndarray:
    """Raw counts of the given cells over the record's genes (dense, float)."""
    missing = [g for g in genes[:5] if g not in adata.var_names]
    if missing:
        raise InputError(f"genes {missing} of the fitted record are not in adata.var_names; pass the screen "
                         "that was analysed.")
    col = adata.var_names.get_indexer(genes)
    X = adata.layers[layer] if layer else adata.X
    X = X[cells][:, col]
    return np.asarray(X.toarray() if sp.issparse(X) else X, dtype=float)


def project_cells(counts: np.ndarray, record: dict, *, target_sum: float = 1e4,
                  max_value: float | None = 10.0) -> tuple[np.ndarray, np.ndarray]:
    """Scaled expression and PCA scores of cells given their raw counts over the record's genes.

    Repeats the experiment's preprocessing (normalise to ``target_sum`` over the kept genes,
    ``log1p``, scale with the record's ``gene_mean``/``gene_std``, clip at ``max_value``) and
    projects on the loadings by least squares (``scores = scaled V (V^T V)^-1``).
    """
    counts = np.asarray(counts, float)
    lib = counts.sum(axis=1, keepdims=True)
    lib[lib == 0] = 1.0
    lognorm = np.log1p(counts / lib * target_sum)
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


def _to_lognorm(scaled: np.ndarray, record: dict) -> np.ndarray:
    out = scaled * np.asarray(record["gene_std"], float) + np.asarray(record["gene_mean"], float)
    return np.clip(out, 0.0, None)


def sample_cells(
    adata: AnnData,
    perturbation: str,
    *,
    n: int,
    state: str = "perturbed",
    key: str = "scotgm",
    counts: bool = False,
    parameter_uncertainty: bool = True,
    n_parameter_draws: int = 20,
    residual: str = "cells",
    perturbation_draw: str = "conditional",
    layer: str | None = None,
    random_state: int | np.random.Generator | None = 0,
) -> AnnData:
    """Synthetic cells of one fitted perturbation, in gene space.

    Parameters
    ----------
    adata
        Screen analysed by :func:`~scotgm_pp.tl.perturbation_response` (raw counts in ``.X`` or
        ``layer``; needed for ``"counterfactual"`` and for library sizes when ``counts=True``).
    perturbation
        Which fitted perturbation.
    n
        Number of cells.
    state
        ``"perturbed"`` or ``"basal"`` (draws from the fitted state), or ``"counterfactual"``
        (control cells plus perturbation draws; see the module docstring).
    key
        ``adata.uns`` key of the results.
    counts
        Also draw UMI counts: Poisson with rate ``expm1(lognorm) * library / target_sum``, the
        library sizes resampled from the experiment's real cells. Then ``.layers["counts"]`` holds
        them and ``.X`` is their log-normalisation (as for real cells).
    parameter_uncertainty
        Redraw the state parameters (``n_parameter_draws`` sets, cells spread evenly over them)
        before drawing cells; otherwise use the fitted point.
    residual
        For ``"basal"``/``"perturbed"``, what to add outside the PCs: ``"cells"`` (the residual of
        a resampled real control cell), ``"gaussian"`` (independent per-gene noise with the
        variance the PCs do not explain, :func:`residual_variance`) or ``"none"``.
        Counterfactual cells keep their own residual. Ignored when ``counts=True`` (the Poisson
        draw supplies the noise).
    perturbation_draw
        ``"conditional"`` (``z`` given the control cell under the fitted coupling) or
        ``"independent"`` (``z ~ N(mu_p, Sigma_p)``).
    layer
        Layer with the raw counts (default ``.X``).
    random_state
        Seed or Generator.

    Returns
    -------
    anndata.AnnData
        ``n`` cells x the record's genes. ``.X`` log-normalised expression (``log1p`` of counts per
        ``target_sum``). ``.obsm["X_pca"]`` the cells' PCA scores. ``.obs``: ``state``, ``source``
        (``"fitted state"``, ``"fitted state + control cell residual"`` or ``"control cell +
        perturbation draw"``), ``perturbation``, ``parameter_draw`` (-1: the fitted point),
        ``control_cell`` (the real control cell whose residual or profile was used, else "").
        ``.layers["counts"]`` when ``counts=True``. ``.uns["scotgm_synthetic"]``
        records the settings.
    """
    if state not in STATES:
        raise InputError(f"unknown state {state!r}; choose one of {', '.join(STATES)}.")
    if residual not in ("cells", "gaussian", "none"):
        raise InputError(f"unknown residual {residual!r}; choose 'cells', 'gaussian' or 'none'.")
    if perturbation_draw not in ("conditional", "independent"):
        raise InputError(f"unknown perturbation_draw {perturbation_draw!r}; choose 'conditional' or 'independent'.")
    n = int(n)
    if n < 1:
        raise InputError(f"n must be a positive number of cells, got {n}.")
    record = get_record(adata, perturbation, key)
    params = _params(adata, key)
    pre = params.get("preprocess", {})
    target_sum = float(pre.get("target_sum", 1e4))
    max_value = pre.get("max_value", 10.0)
    genes = np.asarray(record["genes"]).astype(str)
    V = np.asarray(record["loadings"], float)
    m = V.shape[1]
    rng = np.random.default_rng(random_state)

    if parameter_uncertainty:
        n_sets = max(1, min(int(n_parameter_draws), n))
        draws = draw_parameters(record, n_sets, rng)
        which = np.arange(n) % n_sets
        rng.shuffle(which)
    else:
        draws = draw_parameters(record, 1, rng, include_point=True)
        which = np.zeros(n, int)

    obs = pd.DataFrame(index=[f"synthetic_{state}_{i}" for i in range(n)])
    obs["state"] = state
    obs["perturbation"] = str(perturbation)
    obs["parameter_draw"] = which if parameter_uncertainty else -1
    labels = adata.obs[params["perturbation_key"]].astype(str).to_numpy() if "perturbation_key" in params else None
    ctrl_cells = np.flatnonzero(labels == params["control"]) if labels is not None else np.array([], int)

    scores = np.empty((n, m))
    if state in ("basal", "perturbed"):
        k = BASAL if state == "basal" else PERTURBED
        for d in np.unique(which):
            rows = np.flatnonzero(which == d)
            scores[rows] = rng.multivariate_normal(draws.means[d, k], draws.covariances[d, k], size=len(rows),
                                                   method="eigh")
        scaled = scores @ V.T
        obs["source"] = "fitted state"
        obs["control_cell"] = ""
        if not counts and residual == "gaussian":
            scaled = scaled + rng.normal(size=scaled.shape) * np.sqrt(residual_variance(record))
        elif not counts and residual == "cells":
            if ctrl_cells.size == 0:
                raise InputError("residual='cells' resamples real control cells, but none were found in adata; "
                                 "use residual='gaussian'.")
            pick = rng.choice(ctrl_cells, size=n, replace=True)
            scaled0, x = project_cells(_gene_counts(adata, pick, genes, layer), record, target_sum=target_sum,
                                       max_value=max_value)
            scaled = scaled + (scaled0 - x @ V.T)
            obs["source"] = "fitted state + control cell residual"
            obs["control_cell"] = adata.obs_names[pick].to_numpy()
    else:
        if ctrl_cells.size == 0:
            raise InputError("no control cells found in adata (label and key from the fit's params); "
                             "counterfactual cells start from real control cells.")
        pick = rng.choice(ctrl_cells, size=n, replace=n > ctrl_cells.size)
        scaled0, x = project_cells(_gene_counts(adata, pick, genes, layer), record, target_sum=target_sum,
                                   max_value=max_value)
        for d in np.unique(which):
            rows = np.flatnonzero(which == d)
            mu0, mu1 = draws.means[d, BASAL], draws.means[d, PERTURBED]
            S0, S1, C = draws.covariances[d, BASAL], draws.covariances[d, PERTURBED], draws.cross_covariance[d]
            if perturbation_draw == "conditional":
                # y | x under the Gaussian coupling [[S0, C], [C^T, S1]].
                A = np.linalg.solve(0.5 * (S0 + S0.T), C).T  # C^T S0^-1
                cond = S1 - A @ C
                cond = 0.5 * (cond + cond.T)
                w, U = np.linalg.eigh(cond)
                noise = rng.normal(size=(len(rows), m)) * np.sqrt(np.clip(w, 0, None))
                y = mu1 + (x[rows] - mu0) @ A.T + noise @ U.T
            else:
                z = rng.multivariate_normal(draws.perturbation_mean[d], draws.perturbation_cov[d],
                                            size=len(rows), method="eigh")
                y = x[rows] + z
            scores[rows] = y
        scaled = scaled0 + (scores - x) @ V.T
        obs["source"] = "control cell + perturbation draw"
        obs["control_cell"] = adata.obs_names[pick].to_numpy()

    lognorm = _to_lognorm(scaled, record)
    layers = {}
    if counts:
        if labels is not None:
            pool = np.flatnonzero((labels == params["control"]) | (labels == str(perturbation)))
            lib = _gene_counts(adata, pool, genes, layer).sum(axis=1)
            lib = lib[lib > 0]
        else:
            lib = np.array([target_sum])
        size = rng.choice(lib, size=n)
        rate = np.expm1(lognorm) * (size / target_sum)[:, None]
        umi = rng.poisson(rate)
        tot = umi.sum(axis=1, keepdims=True).astype(float)
        tot[tot == 0] = 1.0
        lognorm = np.log1p(umi / tot * target_sum)
        layers["counts"] = sp.csr_matrix(umi.astype(np.int64))
    for col in ("state", "source", "perturbation"):
        obs[col] = pd.Categorical(obs[col])
    out = AnnData(X=lognorm.astype(np.float32), obs=obs, var=pd.DataFrame(index=genes), layers=layers or None)
    out.obsm["X_pca"] = scores
    out.uns["scotgm_synthetic"] = {
        "perturbation": str(perturbation),
        "state": state,
        "key": key,
        "counts": bool(counts),
        "parameter_uncertainty": bool(parameter_uncertainty),
        "n_parameter_draws": int(n_parameter_draws),
        "residual": residual if state != "counterfactual" else "own (control cell)",
        "perturbation_draw": perturbation_draw,
        "target_sum": target_sum,
        "units": "log-normalised expression (log1p of counts per target_sum)",
    }
    return out

"""Posterior draws and posterior predictive checks of one fitted perturbation, as ``xarray.DataTree``
(the ArviZ 1 container).

* :func:`posterior_draws`: the ``posterior`` group (:func:`~scotgm_pp.tl._posterior.draw_posterior`;
  ``az.summary`` works on it).
* :func:`posterior_predictive`: replicates of the experiment's cells from the declared graph
  (every cell keeps its library size and batch; guide cells draw their state from the weights,
  controls are basal, as ``pm.sample_posterior_predictive`` does on
  :func:`scotgm_pp.models.build_model`), next to the observed counts, plus the predicted
  response of every gene per draw; ``posterior_predictive`` and ``observed_data`` groups.
* :func:`ppc_statistics`: observed against replicated per-gene means and zero fractions.

The draws are independent, split into ``chains`` streams so that ArviZ's diagnostics apply.
Compute only.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import xarray as xr
from anndata import AnnData

from .._tree import group, has_group, make_tree
from .._validation import InputError
from ..models.predictive import DEPENDENCE, draw_cells, draw_states, latent_scale
from ._posterior import BASAL, PosteriorDraws, check_record, draw_posterior, gene_dispersion
from ._predict import DEFAULT_METHOD, METHODS, _gene_index, _predict, lognorm_change, response_draws
from ._response import get_record
from ._synthetic import (
    _control_batches,
    control_alpha,
    experiment_settings,
    gene_counts,
    library_sizes_of,
    residual_variance,
)

__all__ = ["posterior_draws", "posterior_predictive", "ppc_statistics", "POSTERIOR_DESCRIPTION"]

POSTERIOR_DESCRIPTION = (
    "states: conjugate Normal-Wishart posterior given the state responsibilities; coupling recomputed or "
    "carried per draw; count layer: Gaussian approximation (effect, effect_se); see scotgm_pp.tl._posterior"
)


def _check_draws(draws: int, chains: int) -> tuple[int, int]:
    for name, v in (("draws", draws), ("chains", chains)):
        if isinstance(v, bool) or int(v) != v or int(v) < 1:
            raise InputError(f"{name} must be a positive integer, got {v!r}.")
    return int(draws), int(chains)


def _posterior_dataset(draws: PosteriorDraws, record: dict, chains: int, n: int) -> xr.Dataset:
    K, d = draws.means.shape[1:]
    genes = np.asarray(record["genes"]).astype(str)
    pcs = [f"PC{j + 1}" for j in range(d)]
    states = ["basal", "perturbed"] if K == 2 else [f"state_{k}" for k in range(K)]

    def cd(a):
        return a.reshape(chains, n, *a.shape[1:])

    data = {
        "weights": (("chain", "draw", "state"), cd(draws.weights)),
        "means": (("chain", "draw", "state", "pc"), cd(draws.means)),
        "covariances": (("chain", "draw", "state", "pc", "pc_bis"), cd(draws.covariances)),
        "cross_covariance": (("chain", "draw", "pc", "pc_bis"), cd(draws.cross_covariance)),
        "perturbation_mean": (("chain", "draw", "pc"), cd(draws.perturbation_mean)),
        "perturbation_cov": (("chain", "draw", "pc", "pc_bis"), cd(draws.perturbation_cov)),
        "log_rate_basal": (("chain", "draw", "gene"), cd(draws.log_rate_basal)),
        "effect": (("chain", "draw", "gene"), cd(draws.effect)),
    }
    coords = {"chain": np.arange(chains), "draw": np.arange(n), "state": states, "pc": pcs, "pc_bis": pcs,
              "gene": genes}
    return xr.Dataset(data, coords=coords)


def _attrs(record: dict, perturbation: str, **extra) -> dict:
    return {"perturbation": str(perturbation), "coupling": str(record.get("coupling", "ot")),
            "posterior": POSTERIOR_DESCRIPTION, "inference_library": "scotgm_pp", **extra}


def posterior_draws(
    adata: AnnData,
    perturbation: str,
    *,
    draws: int = 100,
    chains: int = 2,
    key: str = "scotgm",
    random_state: int | np.random.Generator | None = 0,
) -> xr.DataTree:
    """Posterior draws of one fitted perturbation's parameters as an ArviZ ``posterior`` group.

    What they are, and what they approximate, is in :mod:`scotgm_pp.tl._posterior`.

    Parameters
    ----------
    adata
        Screen analysed by :func:`~scotgm_pp.tl.perturbation_response`.
    perturbation
        Which fitted perturbation.
    draws, chains
        Independent draws per chain, and chains (independent streams).
    key
        ``adata.uns`` key of the results.
    random_state
        Seed or Generator.

    Returns
    -------
    xarray.DataTree
        ``posterior``: ``weights`` (state), ``means`` (state, pc), ``covariances`` (state, pc,
        pc_bis), ``cross_covariance`` and ``perturbation_cov`` (pc, pc_bis),
        ``perturbation_mean`` (pc), ``log_rate_basal`` and ``effect`` (gene); ``constant_data``:
        ``loadings`` (gene, pc), ``gene_std`` and ``dispersion`` (gene; with a dispersion per batch
        its average over the basal cells' batches, and ``dispersion_batch`` (count_batch, gene)).
    """
    draws, chains = _check_draws(draws, chains)
    record = get_record(adata, perturbation, key)
    check_record(record)
    d = draw_posterior(record, draws * chains, np.random.default_rng(random_state))
    post = _posterior_dataset(d, record, chains, draws)
    return make_tree({"posterior": post, "constant_data": _constant(record, post)}, _attrs(record, perturbation))


def _constant(record: dict, post: xr.Dataset, **extra) -> xr.Dataset:
    data = {
        "loadings": (("gene", "pc"), np.asarray(record["loadings"], float)),
        "gene_std": (("gene",), np.asarray(record["gene_std"], float)),
        "dispersion": (("gene",), gene_dispersion(record)),
        **extra,
    }
    coords = {"gene": post["gene"].values, "pc": post["pc"].values}
    phi = np.asarray(record["count_dispersion"], float)
    if phi.ndim == 2:  # one per batch: the rows the cells were drawn with, beside their average
        data["dispersion_batch"] = (("count_batch", "gene"), phi)
        coords["count_batch"] = np.asarray(record["count_batches"]).astype(str)
    for dims, _ in extra.values():
        for dim in dims:
            if dim not in coords and dim in post.coords:
                coords[dim] = post[dim].values
    return xr.Dataset(data, coords={k: v for k, v in coords.items()})


def posterior_predictive(
    adata: AnnData,
    perturbation: str,
    *,
    cells: str = "guide",
    draws: int = 10,
    chains: int = 2,
    method: str = DEFAULT_METHOD,
    dependence: str = "independent",
    key: str = "scotgm",
    layer: str | None = None,
    random_state: int | np.random.Generator | None = 0,
) -> xr.DataTree:
    """Replicate one experiment's cells from the posterior predictive, for checks against the data.

    Every replicate draws the parameters (:func:`~scotgm_pp.tl._posterior.draw_posterior`), then
    each observed cell's state (guide cells: from the drawn weights; controls: basal) and counts
    with that cell's own library size and batch (:func:`scotgm_pp.models.predictive.draw_cells`).

    Parameters
    ----------
    adata
        Screen analysed by :func:`~scotgm_pp.tl.perturbation_response`, with its raw counts.
    perturbation
        Which fitted perturbation.
    cells
        ``"guide"`` (the perturbation's analysed guide cells) or ``"control"`` (the control cells).
    draws, chains
        Replicates per chain, and chains.
    method
        Response predictor whose per-draw response is stored (``posterior_predictive.response``,
        see :func:`~scotgm_pp.tl.predict_response`).
    dependence
        ``"independent"`` (the declared graph; default) or ``"state"`` (see
        :func:`~scotgm_pp.tl.sample_cells`). Per-gene statistics are the same under both.
    key, layer
        Results key, and the layer of the raw counts (default ``.X``).
    random_state
        Seed or Generator.

    Returns
    -------
    xarray.DataTree
        ``posterior`` (as :func:`posterior_draws`), ``posterior_predictive``: ``counts`` (chain,
        draw, cell, gene; int32), ``state`` (chain, draw, cell) and ``response`` (chain, draw,
        gene; scaled units); ``observed_data``: ``counts`` (cell, gene); ``constant_data``:
        ``library_size`` (cell), ``p_perturbed`` (cell) and the loadings.
    """
    draws, chains = _check_draws(draws, chains)
    if cells not in ("guide", "control"):
        raise InputError(f"cells must be 'guide' or 'control', got {cells!r}.")
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}.")
    if dependence not in DEPENDENCE:
        raise InputError(f"unknown dependence {dependence!r}; choose one of {', '.join(DEPENDENCE)}.")
    record = get_record(adata, perturbation, key)
    check_record(record)
    settings = experiment_settings(adata, key)
    rows, p_pert = _cells(adata, perturbation, cells, settings, key)
    genes = np.asarray(record["genes"]).astype(str)
    y_obs = gene_counts(adata, rows, genes, layer)
    lib = library_sizes_of(adata, rows, layer)
    batch = _control_batches(adata, rows, record, settings)
    rng = np.random.default_rng(random_state)
    S = draws * chains
    d = draw_posterior(record, S, rng)
    V = np.asarray(record["loadings"], float)
    r = residual_variance(record)
    alpha = control_alpha(adata, rows, record, settings, key, batch)
    n = rows.size
    reps = np.empty((S, n, genes.size), dtype=np.int32)
    states = np.empty((S, n), dtype=np.int8)
    chol = np.linalg.cholesky(d.covariances)
    for s in range(S):
        z = draw_states(rng, np.tile(d.weights[s], (n, 1))) if cells == "guide" else np.full(n, BASAL)
        log_mu = np.log(np.maximum(lib, 1.0))[:, None] + d.log_rates(np.full(n, s), z) + d.batch_offset[np.maximum(batch, 0)]
        scale = latent_scale(V, d.covariances[s], r)[z] if dependence == "state" else None
        _, y = draw_cells(rng, means=d.means[s, z], chols=chol[s, z], log_mu=log_mu, alpha=alpha,
                          dependence=dependence, loadings=V, residual_variance=r, scale=scale)
        reps[s], states[s] = y, z
    i = _target_index(record, perturbation)
    factor = lognorm_change(record) if method == "effect" else None
    response = _predict(record, method, i, response_draws(record, method, i, d, factor), None,
                        d.perturbation_mean @ V[i]) if i is not None else np.full((S, genes.size), np.nan)
    post = _posterior_dataset(d, record, chains, draws)
    cell_names = adata.obs_names[rows].astype(str).to_numpy()
    coords = {"chain": np.arange(chains), "draw": np.arange(draws), "cell": cell_names, "gene": genes}
    pp = xr.Dataset({
        "counts": (("chain", "draw", "cell", "gene"), reps.reshape(chains, draws, n, genes.size)),
        "state": (("chain", "draw", "cell"), states.reshape(chains, draws, n)),
        "response": (("chain", "draw", "gene"), response.reshape(chains, draws, genes.size)),
    }, coords=coords)
    observed = xr.Dataset({"counts": (("cell", "gene"), y_obs.astype(np.int32))},
                          coords={"cell": cell_names, "gene": genes})
    const = _constant(record, post, library_size=(("cell",), lib), p_perturbed=(("cell",), p_pert))
    const = const.assign_coords(cell=cell_names)
    groups = {"posterior": post, "posterior_predictive": pp, "observed_data": observed, "constant_data": const}
    return make_tree(groups, _attrs(record, perturbation, cells=cells, dependence=dependence, response_method=method,
                                    response_gene="" if i is None else str(genes[i])))


def _target_index(record: dict, perturbation: str) -> int | None:
    try:
        return _gene_index(record, perturbation, None)[0]
    except InputError:
        return None


def _cells(adata: AnnData, perturbation: str, cells: str, settings: dict, key: str):
    pkey = settings.get("perturbation_key")
    if pkey is None or pkey not in adata.obs:
        raise InputError("the run's perturbation key is not in adata.obs; pass the analysed screen.")
    labels = adata.obs[pkey].astype(str).to_numpy()
    col = f"{key}_p_perturbed"
    p = adata.obs[col].to_numpy(float) if col in adata.obs else np.full(adata.n_obs, np.nan)
    if cells == "guide":
        rows = np.flatnonzero((labels == str(perturbation)) & np.isfinite(p))
        if rows.size == 0:
            rows = np.flatnonzero(labels == str(perturbation))
    else:
        rows = np.flatnonzero(labels == str(settings["control"]))
    if rows.size == 0:
        raise InputError(f"no {cells} cells of {perturbation!r} in adata; pass the analysed screen.")
    return rows, np.where(np.isfinite(p[rows]), p[rows], 0.0)


def ppc_statistics(idata: xr.DataTree, *, var_name: str = "counts", ci: float = 0.9) -> pd.DataFrame:
    """Observed against replicated per-gene statistics of a posterior predictive check.

    Parameters
    ----------
    idata
        From :func:`posterior_predictive` (or any DataTree with ``observed_data`` and
        ``posterior_predictive`` holding ``var_name`` with dims ``(cell, gene)``).
    var_name
        The observed variable.
    ci
        Central probability of the replicated interval.

    Returns
    -------
    pandas.DataFrame
        One row per gene: ``observed_mean``, ``replicated_mean`` (mean over replicates),
        ``mean_lower``, ``mean_upper``, ``observed_zero_fraction``, ``replicated_zero_fraction``,
        ``zero_lower``, ``zero_upper``, and ``mean_inside`` / ``zero_inside`` (the observed value
        lies in the interval).
    """
    if not isinstance(idata, xr.DataTree) or not (has_group(idata, "observed_data")
                                                  and has_group(idata, "posterior_predictive")):
        raise InputError("idata must be a DataTree with observed_data and posterior_predictive groups "
                         "(scotgm_pp.tl.posterior_predictive).")
    obs = group(idata, "observed_data")[var_name]
    rep = group(idata, "posterior_predictive")[var_name]
    a = (1 - ci) / 2
    R = rep.values.reshape(-1, *rep.shape[2:]).astype(float)  # (S, cell, gene)
    Y = obs.values.astype(float)
    means = R.mean(axis=1)
    zeros = (R == 0).mean(axis=1)
    out = pd.DataFrame({
        "gene": obs["gene"].values,
        "observed_mean": Y.mean(axis=0),
        "replicated_mean": means.mean(axis=0),
        "mean_lower": np.quantile(means, a, axis=0),
        "mean_upper": np.quantile(means, 1 - a, axis=0),
        "observed_zero_fraction": (Y == 0).mean(axis=0),
        "replicated_zero_fraction": zeros.mean(axis=0),
        "zero_lower": np.quantile(zeros, a, axis=0),
        "zero_upper": np.quantile(zeros, 1 - a, axis=0),
    })
    out["mean_inside"] = (out["observed_mean"] >= out["mean_lower"]) & (out["observed_mean"] <= out["mean_upper"])
    out["zero_inside"] = ((out["observed_zero_fraction"] >= out["zero_lower"])
                          & (out["observed_zero_fraction"] <= out["zero_upper"]))
    out.attrs.update({"ci": float(ci), "n_replicates": int(R.shape[0]), "n_cells": int(Y.shape[0])})
    return out

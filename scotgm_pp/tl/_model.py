"""The fitted model of one perturbation of a screen, as a :class:`~scotgm_pp.models.ScOTGM`."""

from __future__ import annotations

import numpy as np
import pandas as pd
from anndata import AnnData

from ..inference.count_layer import batch_codes
from ._response import get_record

__all__ = ["get_model"]

STATE_MAX_ITER = 500
STATE_TOL = 1e-10
"""The EM stopping rule of :func:`~scotgm_pp.tl.fit_states` (the screen's state model)."""


def get_model(adata: AnnData, perturbation: str, method: str = "em", *, key: str = "scotgm",
              store=None, random_state: int | None = 0, sampler_config: dict | None = None, counts: bool = False,
              genes=None, n_genes: int = 20, layer: str | None = None, count_evidence: str = "cut",
              model_config: dict | None = None, **kwargs):
    """The state model of one perturbation of a screen, fitted again as a :class:`ScOTGM`.

    The screen's record of the perturbation holds the state model's features of its cells
    (guide cells and the sampled controls): the perturbation signature score by default, the PCA
    scores with ``state_space="pca"``; which cells were pinned, the covariance type and the
    prior's settings. This rebuilds that graph and fits it. The PCA state model's graph also
    carries the loadings (``perturbation_gene_mean``, the screen's ``mu`` layer); the signature's
    graph is one score per cell, and the screen's PCA-space states are the M-step given its
    posteriors (:func:`~scotgm_pp.tl._core.states_from_signature`). With ``method="em"`` (the default) the fit
    is the screen's own: its means and weights equal the record's (``tests/test_model_api.py``).
    Any other method (``"map"``, ``"mcmc"``, ``"nuts"``) refits the same graph.

    Parameters
    ----------
    adata
        The AnnData :func:`~scotgm_pp.tl.perturbation_response` annotated.
    perturbation
        A perturbation label of the screen.
    method
        ``"em"``, ``"map"``, ``"mcmc"`` or ``"nuts"`` (see :meth:`ScOTGM.fit`).
    key
        ``key_added`` of the run.
    store
        The run's record folder, if it moved (see :func:`~scotgm_pp.tl.get_record`).
    random_state
        Seed of the refit.
    sampler_config
        ``pm.sample`` settings for ``"nuts"`` (e.g. ``{"draws": 300, "tune": 300}``).
    counts
        Also the count observation layer (:mod:`scotgm_pp.models.count_graph`) for ``genes``:
        the graph of the states and every chosen gene's negative-binomial counts, with the
        screen's library sizes (each cell's total count), dispersions (as data), batches and
        count priors. With ``method="em"`` and ``count_evidence="cut"`` (the screen's rule: the
        states from the state model's score, the counts given them, with the screen's
        ``count_likelihood``) its effects are the screen's
        ``effect`` of those genes, and NUTS and MAP sample and maximise that same cut graph
        (``"joint"``: the joint density, the counts informing the states). ``adata`` must hold the
        screen's raw counts (in ``.X`` or ``layer``).
    genes, n_genes
        The genes of the count layer: a list, or by default the perturbation's target (when its
        label names a measured gene) and the genes the screen ranked highest by ``|effect_bound|``
        (then ``|effect_z|``), ``n_genes`` in all.
    layer
        The layer holding the raw counts (default ``.X``).
    count_evidence
        ``"cut"`` or ``"joint"`` (see :data:`~scotgm_pp.models.DEFAULT_MODEL_CONFIG`).
    model_config
        Changes to the rebuilt graph's ``model_config`` (the screen's prior settings are the
        base), e.g. ``{"mean_parametrization": "shift", "shift_sd": 1.0}`` for a prior on the
        shift itself; a graph other than the default is fitted by ``"map"`` or ``"nuts"``, and
        ``design=`` (an array, one row per cell of the record) passes on to :meth:`ScOTGM.fit`.
    **kwargs
        Passed to :meth:`ScOTGM.fit` (e.g. ``draws=``, ``tune=``, ``chains=`` for ``"nuts"``).

    Returns
    -------
    ScOTGM
        Fitted; ``.model`` is its ``pm.Model`` (dims ``state``, ``pc``, ``cell``), ``.idata``
        its ``xarray.DataTree``, with the perturbation's loadings (``constant_data["pca_loadings"]``,
        dims ``gene, pc``).
    """
    import anndata as ad

    from ..models import ScOTGM

    record = get_record(adata, perturbation, key, store=store)
    if "state_scores" not in record:
        raise KeyError(f"the record of {perturbation!r} holds no state-model data (it was written by an older "
                       "scotgm_pp); rerun perturbation_response.")
    scores = np.asarray(record["state_scores"], float)
    fixed = np.asarray(record["state_fixed_state"], int)
    covariance = str(record["state_covariance"])
    d = scores.shape[1]
    config = _state_prior_config(record, covariance)
    if counts:
        # the screen's count likelihood (records written before it was recorded: the weighted one)
        config.update(count_evidence=count_evidence, count_likelihood=str(record.get("count_likelihood", "weighted")),
                      delta_sd=float(record["delta_prior_sd"]),
                      beta_sd=float(record["beta_prior_sd"]), gamma_sd=float(record["gamma_prior_sd"]))
    if model_config:
        if not isinstance(model_config, dict):
            raise TypeError(f"model_config must be a dict of changes, got {type(model_config).__name__}.")
        config.update(model_config)
    model = ScOTGM(
        model_config=config,
        sampler_config=sampler_config,
        m_step=str(record["state_em_regularization"]),
        max_iter=STATE_MAX_ITER,
        tol=STATE_TOL,
        random_state=random_state,
    )
    cells = pd.Index(np.asarray(record["state_cell_names"]).astype(str), dtype=object)
    if counts:
        view = ad.AnnData(X=np.zeros((scores.shape[0], 0), np.float32), obs=pd.DataFrame(index=cells))
        view.obsm["X_pca"] = scores
        layer_kw = _count_layer(adata, perturbation, record, cells, key, genes, n_genes, layer)
        return model.fit(view, fixed_state=fixed, method=method, **layer_kw, **kwargs)
    if str(record.get("state_space", "pca")) == "pca":
        # the PCA state model: the graph carries the loadings (perturbation_gene_mean is the mu layer)
        genes = np.asarray(record["genes"]).astype(str)
        view = ad.AnnData(X=np.zeros((scores.shape[0], genes.size), np.float32), obs=pd.DataFrame(index=cells),
                          var=pd.DataFrame(index=pd.Index(genes, dtype=object)))
        view.varm["PCs"] = np.asarray(record["loadings"], float)[:, :d]
    else:
        view = ad.AnnData(X=np.zeros((scores.shape[0], 0), np.float32), obs=pd.DataFrame(index=cells))
    view.obsm["X_pca"] = scores
    return model.fit(view, fixed_state=fixed, method=method, **kwargs)


def _count_layer(adata: AnnData, perturbation: str, record: dict, cells, key: str, genes, n_genes: int,
                 layer: str | None) -> dict:
    """The count layer's inputs for :func:`get_model`: counts of the chosen genes (capped as the
    screen capped them), the screen's library sizes, dispersions and batches for the experiment's
    cells."""
    import scipy.sparse as sp

    from .._screen import cap_counts
    from .._validation import InputError
    from ._response import get_responses

    kept = np.asarray(record["genes"]).astype(str)
    responses = get_responses(adata, key)
    if genes is None:
        if isinstance(n_genes, bool) or not isinstance(n_genes, (int, np.integer)) or n_genes < 1:
            raise InputError(f"n_genes must be a positive integer, got {n_genes!r}.")
        row = responses[str(perturbation)]
        stats = pd.DataFrame({"bound": row.to_df(layer="effect_bound").iloc[0],
                              "z": row.to_df(layer="effect_z").iloc[0]}).loc[kept]
        order = stats.assign(b=stats["bound"].abs(), z=stats["z"].abs()).sort_values(["b", "z"], ascending=False)
        chosen = [str(perturbation)] if str(perturbation) in set(kept) else []
        chosen += [g for g in order.index if g not in chosen][: int(n_genes) - len(chosen)]
    else:
        chosen = [str(g) for g in ([genes] if isinstance(genes, str) else genes)]
        missing = [g for g in chosen if g not in set(kept)]
        if missing or not chosen:
            raise InputError(f"genes {missing[:5] or chosen} are not genes the screen kept for {perturbation!r} "
                             f"(e.g. {list(kept[:5])}).")
    missing = [c for c in cells if c not in adata.obs_names]
    if missing:
        raise InputError(f"counts=True needs the screen's cells: {len(missing)} of the experiment's cells (e.g. "
                         f"{missing[0]!r}) are not in adata; pass the AnnData the screen was run on.")
    if layer is not None and layer not in adata.layers:
        raise InputError(f"layer {layer!r} not in adata.layers; layers are: {list(adata.layers)}.")
    sub = adata[cells]
    X = sub.X if layer is None else sub.layers[layer]
    if X is None:
        raise InputError("adata holds no counts (read_results gives the annotations only): pass the AnnData of the "
                         "screen's raw counts.")
    X = sp.csr_matrix(X, dtype=np.float64)
    responses_var = responses.var
    if "count_cap" in responses_var:  # the screen's caps (scotgm_pp._screen.scan_counts), on its genes
        cap = responses_var["count_cap"].reindex(adata.var_names).to_numpy(float)
        X = cap_counts(X, np.where(np.isfinite(cap), cap, np.inf))
    size_factors = np.asarray(X.sum(axis=1), float).ravel()
    cols = adata.var_names.get_indexer(chosen)
    Y = X[:, cols].toarray()
    position = {g: i for i, g in enumerate(kept)}
    dispersion = np.asarray(record["count_dispersion"], float)[..., [position[g] for g in chosen]]
    params = adata.uns[key]["params"]
    batch = None
    if params.get("batch_key"):
        batch = sub.obs[params["batch_key"]].astype(str).to_numpy()
    if dispersion.ndim == 2:  # one per batch, rows in the record's batch order: match the graph's by label
        held = [str(b) for b in np.asarray(record["count_batches"]).astype(str)]
        dispersion = dispersion[[held.index(b) for b in batch_codes(batch, len(cells))[1]]]
    return {"counts": Y, "size_factors": size_factors, "dispersion": dispersion, "batch": batch, "genes": chosen}


def _state_prior_config(record: dict, covariance: str) -> dict:
    """The screen's state-model prior as a ``model_config``: the signature's weakly informative
    prior on the score's scale, or the PCA state model's ridge prior."""
    base = {"n_states": 2, "covariance": covariance, "extra_dof": 2, "dirichlet": 1.0}
    if str(record.get("state_prior", "ridge")) == "scaled":
        return {**base, "prior": "scaled", "kappa": 0.1}
    return {**base, "prior": "ridge", "regularization": float(record["state_prior_regularization"]), "kappa": 0.01}

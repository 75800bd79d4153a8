"""The fitted model of one perturbation of a screen, as a :class:`~scotgm_pp.models.ScOTGM`."""

from __future__ import annotations

import numpy as np
from anndata import AnnData

from ._response import get_record

__all__ = ["get_model"]

STATE_MAX_ITER = 500
STATE_TOL = 1e-10
"""The EM stopping rule of :func:`~scotgm_pp.tl.fit_states` (the screen's state model)."""


def get_model(adata: AnnData, perturbation: str, method: str = "em", *, key: str = "scotgm",
              store=None, random_state: int | None = 0, sampler_config: dict | None = None, **kwargs):
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
    import pandas as pd

    from ..models import ScOTGM

    record = get_record(adata, perturbation, key, store=store)
    if "state_scores" not in record:
        raise KeyError(f"the record of {perturbation!r} holds no state-model data (it was written by an older "
                       "scotgm_pp); rerun perturbation_response.")
    scores = np.asarray(record["state_scores"], float)
    fixed = np.asarray(record["state_fixed_state"], int)
    covariance = str(record["state_covariance"])
    d = scores.shape[1]
    model = ScOTGM(
        model_config={"n_states": 2, "covariance": covariance, "prior": "ridge",
                      "regularization": float(record["state_prior_regularization"]), "kappa": 0.01, "extra_dof": 2,
                      "dirichlet": 1.0},
        sampler_config=sampler_config,
        m_step=str(record["state_em_regularization"]),
        max_iter=STATE_MAX_ITER,
        tol=STATE_TOL,
        random_state=random_state,
    )
    cells = pd.Index(np.asarray(record["state_cell_names"]).astype(str), dtype=object)
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

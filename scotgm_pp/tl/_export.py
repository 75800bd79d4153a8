"""scotgm's answers in the shapes scverse users already read: scanpy's ``rank_genes_groups`` and
pertpy Mixscape's per-cell classes."""

from __future__ import annotations

import numpy as np
import pandas as pd
from anndata import AnnData

from .._validation import InputError
from ._response import _uns, get_responses

__all__ = ["to_rank_genes_groups", "to_mixscape_classes", "ORDERS"]

ORDERS = ("abs_rank", "rank")
LN2 = float(np.log(2.0))


def _check_key_added(key_added) -> None:
    if not isinstance(key_added, str) or not key_added:
        raise InputError(f"key_added must be a non-empty string, got {key_added!r}.")


def _fields(groups: list[str], columns: list[np.ndarray], dtype) -> np.recarray:
    return np.rec.fromarrays(columns, dtype=[(g, dtype) for g in groups])


def to_rank_genes_groups(
    adata: AnnData,
    key: str = "scotgm",
    *,
    key_added: str = "rank_genes_groups",
    order: str = "abs_rank",
    pvals_adj: str = "qval_screen",
    copy: bool = False,
) -> AnnData | None:
    """Write the screen's gene results in scanpy's ``rank_genes_groups`` structure.

    One group per analysed perturbation, every gene of the screen in it, so that
    :func:`scanpy.get.rank_genes_groups_df` and the ``sc.pl.rank_genes_groups*`` plots read
    scotgm's answers (the plots that show expression need the expression AnnData: copy
    ``.uns[key_added]`` to it).

    Parameters
    ----------
    adata
        The analysed screen (:func:`~scotgm_pp.tl.perturbation_response`, or
        :func:`scotgm_pp.read_results`).
    key
        ``key_added`` of the run.
    key_added
        ``.uns`` key written (scanpy's default ``rank_genes_groups``).
    order
        Order of each group's genes: ``"abs_rank"`` (default; strongest response first, up or
        down) or ``"rank"`` (the run's ranking: strongest knock-down first). Genes a perturbation
        did not keep come last.
    pvals_adj
        The responses' layer given as ``pvals_adj``: ``"qval_screen"`` (default; screen-wide
        Benjamini-Hochberg, as :func:`~scotgm_pp.tl.call_hits`) or ``"qval"`` (within the
        perturbation, as scanpy's).
    copy
        Return a copy instead of writing into ``adata``.

    Returns
    -------
    None, or the copy. Writes ``.uns[key_added]`` with ``names``; ``scores`` (the model's
    ``effect_z``: the perturbed state's effect over its standard error); ``logfoldchanges``
    (the model's ``effect`` in log2: ``effect / ln 2``); ``pvals`` (the calls' resampling test,
    ``pval``); ``pvals_adj``; and ``params`` (``groupby`` the run's perturbation key,
    ``reference`` its control label, ``method`` ``"scotgm"``, and which layer each field is).
    """
    _check_key_added(key_added)
    if order not in ORDERS:
        raise InputError(f"order must be one of {', '.join(ORDERS)}, got {order!r}.")
    if pvals_adj not in ("qval_screen", "qval"):
        raise InputError(f"pvals_adj must be 'qval_screen' or 'qval', got {pvals_adj!r}.")
    resp = get_responses(adata, key)
    params = _uns(adata, key)["params"]
    for layer in ("effect", "effect_z", "pval", pvals_adj, order):
        if layer not in resp.layers:
            raise InputError(f"the responses under {key!r} lack the layer {layer!r}; rerun perturbation_response.")
    genes = resp.var_names.to_numpy().astype(str)
    groups = [str(p) for p in resp.obs_names]
    rank = np.asarray(resp.layers[order], float)
    sort = [np.lexsort((genes, np.where(np.isfinite(r), r, np.inf))) for r in rank]
    take = {name: [np.asarray(resp.layers[name], float)[i, s] for i, s in enumerate(sort)]
            for name in ("effect_z", "effect", "pval", pvals_adj)}
    width = max((len(g) for g in genes), default=1)
    result = {
        "params": {"groupby": str(params["perturbation_key"]), "reference": str(params["control"]),
                   "method": "scotgm", "use_raw": False, "layer": None, "corr_method": "benjamini-hochberg",
                   "scotgm_key": key, "order": order, "scores": "effect_z", "logfoldchanges": "effect / ln 2",
                   "pvals": "pval", "pvals_adj": pvals_adj},
        "names": _fields(groups, [genes[s] for s in sort], f"U{width}"),
        "scores": _fields(groups, take["effect_z"], "float32"),
        "logfoldchanges": _fields(groups, [e / LN2 for e in take["effect"]], "float32"),
        "pvals": _fields(groups, take["pval"], "float64"),
        "pvals_adj": _fields(groups, take[pvals_adj], "float64"),
    }
    target = adata.copy() if copy else adata
    target.uns[key_added] = result
    return target if copy else None


MIXSCAPE_GLOBAL = {"escaped": "NP", "no effect": "NP"}
"""scotgm's cell classes as Mixscape's global classes; perturbed cells take ``perturbation_type``
and controls the control label. The guide cells of a perturbation without a detected effect are
non-perturbed, as Mixscape classes the cells of a perturbation without a response."""


def to_mixscape_classes(
    adata: AnnData,
    key: str = "scotgm",
    *,
    key_added: str = "scotgm_mixscape_class",
    perturbation_type: str = "KO",
    copy: bool = False,
) -> AnnData | None:
    """Per-cell classes named as pertpy's Mixscape names them, to compare the two.

    Parameters
    ----------
    adata
        The analysed screen.
    key
        ``key_added`` of the run.
    key_added
        Name of the class column (Mixscape's own default is ``mixscape_class``; this one sits
        beside it).
    perturbation_type
        The label of perturbed cells (Mixscape's ``perturbation_type``, ``"KO"``).
    copy
        Return a copy instead of writing into ``adata``.

    Returns
    -------
    None, or the copy. Writes to ``.obs``:

    ``key_added``
        ``"<perturbation> KO"`` for perturbed cells, ``"<perturbation> NP"`` for escaped cells
        and the guide cells of a perturbation without a detected effect, the control label for
        controls; missing for cells not analysed or without a label.
    ``f"{key_added}_global"``
        ``"KO"``, ``"NP"`` or the control label.
    ``f"{key_added}_p_{perturbation_type.lower()}"``
        Each cell's posterior probability of the perturbed state (``p_perturbed``).
    """
    _check_key_added(key_added)
    params = _uns(adata, key)["params"]
    pkey, control = str(params["perturbation_key"]), str(params["control"])
    needed = [pkey, f"{key}_class", f"{key}_p_perturbed"]
    missing = [c for c in needed if c not in adata.obs.columns]
    if missing:
        raise InputError(f"adata.obs lacks {missing}; pass the AnnData the run annotated (or sg.read_results(DIR)).")
    cls = adata.obs[f"{key}_class"].astype(str)
    glob = cls.map({**MIXSCAPE_GLOBAL, "perturbed": perturbation_type, "control": control})
    per_cell = (adata.obs[pkey].astype(str) + " " + glob).where(cls != "control", control).where(glob.notna())
    target = adata.copy() if copy else adata
    target.obs[key_added] = pd.Categorical(per_cell.to_numpy(dtype=object))
    target.obs[f"{key_added}_global"] = pd.Categorical(glob.to_numpy(dtype=object))
    target.obs[f"{key_added}_p_{perturbation_type.lower()}"] = adata.obs[f"{key}_p_perturbed"].to_numpy(float)
    return target if copy else None

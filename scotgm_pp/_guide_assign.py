"""Guide assignment on AnnData and MuData: :func:`assign_guides` (exported as ``sg.pp.assign_guides``).

Guide-capture counts arrive in one of three shapes: their own AnnData (cells x guides, e.g. the
``gdo`` modality of a MuData or the ``CRISPR Guide Capture`` features of a 10x file), a MuData
holding them as a modality, or a cells x guides matrix in ``.obsm`` of the expression AnnData
with the guide names beside it. The calls themselves are :mod:`scotgm_pp._guide_calls`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from ._guide_calls import GUIDE_METHODS, GuideCalls, call_guides
from ._validation import InputError, check_counts

__all__ = ["assign_guides", "read_guide_library", "GUIDE_COLUMNS"]

GUIDE_COLUMNS = ("guide", "n_guides", "target", "guide_probability")
"""The ``.obs`` columns :func:`assign_guides` writes."""


def read_guide_library(library) -> pd.Series:
    """The guide -> target map of a library.

    Parameters
    ----------
    library
        A CSV file (path) or DataFrame with columns ``guide`` and ``target``, or a mapping
        guide -> target. Control guides carry the control label as their target (e.g.
        ``non-targeting``).

    Returns
    -------
    pandas.Series
        Target of each guide, indexed by guide name (strings).
    """
    if isinstance(library, (str, os.PathLike)):
        path = Path(library)
        if not path.is_file():
            raise InputError(f"guide library {path} does not exist; give a CSV file with columns guide,target.")
        try:
            library = pd.read_csv(path, dtype=str, keep_default_na=False)
        except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
            raise InputError(f"cannot read the guide library {path} as CSV ({err}); it needs columns "
                             "guide,target.") from err
        what = f"guide library {path.name}"
    else:
        what = "guide library"
    if isinstance(library, Mapping):
        library = pd.DataFrame({"guide": list(library.keys()), "target": list(library.values())})
    if not isinstance(library, pd.DataFrame):
        raise InputError(f"library must be a CSV path, a DataFrame with columns guide,target or a dict guide -> "
                         f"target, got {type(library).__name__}.")
    missing = [c for c in ("guide", "target") if c not in library.columns]
    if missing:
        raise InputError(f"the {what} lacks column(s) {missing}; its columns are {list(library.columns)}. "
                         "It needs one row per guide with columns guide,target.")
    guide = library["guide"].astype(str).str.strip()
    target = library["target"].astype(str).str.strip()
    empty = guide.eq("") | target.eq("") | library["guide"].isna().to_numpy() | library["target"].isna().to_numpy()
    if empty.any():
        raise InputError(f"the {what} has {int(empty.sum())} row(s) with an empty guide or target (e.g. row "
                         f"{int(np.flatnonzero(empty)[0])}); give every guide its target (the control label for "
                         "non-targeting guides).")
    table = pd.DataFrame({"guide": guide.to_numpy(), "target": target.to_numpy()}).drop_duplicates()
    clash = table["guide"][table["guide"].duplicated()].unique()
    if clash.size:
        raise InputError(f"the {what} gives guide(s) {list(clash[:5])} more than one target; each guide targets "
                         "one gene.")
    return pd.Series(table["target"].to_numpy(), index=pd.Index(table["guide"].to_numpy(), dtype=object), name="target")


def _is_mudata(obj) -> bool:
    return type(obj).__name__ == "MuData" and hasattr(obj, "mod")


def _names_for_obsm(adata: AnnData, key: str, guide_names) -> np.ndarray:
    value = adata.obsm[key]
    if guide_names is not None:
        if isinstance(guide_names, str):
            if guide_names not in adata.uns:
                raise InputError(f"guide_names {guide_names!r} is not a key of adata.uns; keys: "
                                 f"{list(adata.uns)[:20]}.")
            guide_names = adata.uns[guide_names]
        return np.asarray(guide_names).astype(str)
    if isinstance(value, pd.DataFrame):
        return value.columns.to_numpy().astype(str)
    candidates = [f"{key.removesuffix('_counts')}_names", f"{key}_names", "guide_names"]
    for name in candidates:
        if name in adata.uns:
            return np.asarray(adata.uns[name]).astype(str)
    raise InputError(f"no guide names for adata.obsm[{key!r}]: looked in adata.uns{candidates}. Pass "
                     "guide_names= (a list of the columns' guide names, or the adata.uns key holding them).")


def _aligned(target: AnnData, guides: AnnData, what: str) -> tuple[sp.csr_matrix, int]:
    """The guide counts of ``target``'s cells (zero rows for cells absent from ``guides``)."""
    if not guides.obs_names.is_unique:
        raise InputError(f"the cell names of {what} are not unique; call obs_names_make_unique() on it first.")
    X = guides.X
    if X is None:
        raise InputError(f"{what} has no counts in .X; put the guide UMI counts there.")
    pos = guides.obs_names.get_indexer(target.obs_names)
    found = pos >= 0
    if not found.any():
        raise InputError(f"no cell of {what} is a cell of the expression data (first names: "
                         f"{list(guides.obs_names[:3])} vs {list(target.obs_names[:3])}); the two must share "
                         "obs_names.")
    X = sp.csr_matrix(X)
    if np.array_equal(pos, np.arange(guides.n_obs)):
        return X, 0
    rows = np.flatnonzero(found)  # a selection matrix: row i of the result is row pos[i] of X, or zeros
    select = sp.csr_matrix((np.ones(rows.size), (rows, pos[rows])), shape=(target.n_obs, guides.n_obs))
    return sp.csr_matrix(select @ X), int((~found).sum())


def _resolve(adata, guides, guide_names, rna: str):
    """``(AnnData to annotate, counts aligned to its cells, guide names, cells without guide data,
    description of the source)``."""
    if _is_mudata(adata):
        if rna not in adata.mod:
            raise InputError(f"rna={rna!r} is not a modality of the MuData; modalities: {list(adata.mod)}. Pass the "
                             "gene-expression modality's name as rna=.")
        target = adata.mod[rna]
        if isinstance(guides, str):
            if guides not in adata.mod:
                raise InputError(f"guides={guides!r} is not a modality of the MuData; modalities: {list(adata.mod)}. "
                                 "Pass the guide-capture modality's name (often 'gdo' or 'guides').")
            source, what = adata.mod[guides], f"mdata[{guides!r}]"
        elif isinstance(guides, AnnData):
            source, what = guides, "guides"
        else:
            raise InputError(f"with a MuData, guides must name its guide modality, got {type(guides).__name__}.")
    elif isinstance(adata, AnnData):
        target = adata
        if isinstance(guides, AnnData):
            source, what = guides, "guides"
        elif isinstance(guides, str):
            if guides not in adata.obsm:
                raise InputError(f"guides={guides!r} is not a key of adata.obsm (keys: {list(adata.obsm)}); pass the "
                                 "obsm key of the guide counts, the guide counts as an AnnData, or a MuData and the "
                                 "name of its guide modality.")
            names = _names_for_obsm(adata, guides, guide_names)
            X = adata.obsm[guides]
            X = X.to_numpy() if isinstance(X, pd.DataFrame) else X
            if X.shape[1] != names.size:
                raise InputError(f"adata.obsm[{guides!r}] has {X.shape[1]} columns but {names.size} guide names were "
                                 "found; give one name per column with guide_names=.")
            check_counts(X, f"adata.obsm[{guides!r}]")
            return target, sp.csr_matrix(X), names, 0, f"adata.obsm[{guides!r}]"
        else:
            raise InputError(f"guides must be an AnnData, an adata.obsm key or a MuData modality name, got "
                             f"{type(guides).__name__}.")
    else:
        raise InputError(f"expected an AnnData or a MuData, got {type(adata).__name__}.")
    check_counts(source.X, what)
    counts, missing = _aligned(target, source, what)
    return target, counts, source.var_names.to_numpy().astype(str), missing, what


def _check_library(library: pd.Series, names: np.ndarray, what: str) -> None:
    unknown = [str(g) for g in names if g not in library.index]
    if unknown:
        raise InputError(f"{len(unknown)} guide(s) of {what} are not in the guide library, e.g. {unknown[:8]}; "
                         f"the library names e.g. {list(library.index[:5])}. Add them (guide,target rows) or fix the "
                         "names so both use the same guide names.")
    dup = pd.Index(names)[pd.Index(names).duplicated()].unique()
    if dup.size:
        raise InputError(f"guide names repeat in {what}: {[str(g) for g in dup[:5]]}; each column must be one guide.")


def _cell_table(calls: GuideCalls, names: np.ndarray, library: pd.Series, obs_names) -> pd.DataFrame:
    one = calls.single_guide()
    guide = np.where(one >= 0, names[np.maximum(one, 0)], None)
    target = np.where(one >= 0, library.reindex(names).to_numpy()[np.maximum(one, 0)], None)
    return pd.DataFrame({
        "guide": pd.Categorical(guide, categories=sorted(set(names[np.unique(one[one >= 0])]))),
        "n_guides": calls.n_guides.astype(np.int64),
        "target": pd.Categorical(target),
        "guide_probability": calls.call_probability(),
    }, index=obs_names)


def assign_guides(
    adata,
    guides="gdo",
    library=None,
    method: str = "mixture",
    *,
    threshold: float = 5,
    guide_names: Sequence[str] | str | None = None,
    rna: str = "rna",
    key_added: str = "guide_assignment",
    copy: bool = False,
):
    """Assign each cell its guide(s) and target from guide-capture UMI counts.

    Parameters
    ----------
    adata
        The screen: an AnnData of gene expression, or a MuData with an expression modality
        (``rna``) and a guide modality.
    guides
        Where the guide counts are: a MuData modality name (default ``"gdo"``), an AnnData of
        guide counts (cells x guides, matched to ``adata`` by cell name), or a key of
        ``adata.obsm`` (a cells x guides matrix; its guide names from ``guide_names``, the
        columns of a DataFrame, or ``adata.uns["<key without _counts>_names"]``, as Papalexi's
        ``obsm["grna_counts"]`` / ``uns["grna_names"]``).
    library
        Guide -> target: a CSV path or DataFrame with columns ``guide,target``, or a dict.
        Every guide of the counts must be in it; control guides carry the control label
        (e.g. ``non-targeting``), which is then the ``control`` of
        :func:`~scotgm_pp.tl.perturbation_response`.
    method
        ``"mixture"`` (default): per guide, a two-component mixture (background vs signal) of the
        guide's log-odds share of the cell's guide UMIs, a guide called where its signal
        posterior exceeds 0.5 (:mod:`scotgm_pp._guide_calls`); ``"umi"``: every guide with at
        least ``threshold`` UMIs; ``"max"``: the guide with the most UMIs, if at least
        ``threshold``.
    threshold
        UMIs for ``"umi"`` and ``"max"``.
    guide_names
        Names of the columns of an ``.obsm`` matrix (a list, or an ``adata.uns`` key).
    rna
        The expression modality of a MuData.
    key_added
        ``.uns`` key of the assignment's record.
    copy
        Return an annotated copy instead of writing into ``adata``.

    Returns
    -------
    None, or the annotated copy (AnnData or MuData) with ``copy=True``. Writes to the expression
    AnnData (``adata``, or ``mdata[rna]``):

    ``.obs["guide"]``
        The one guide called in the cell; missing when none or several were.
    ``.obs["n_guides"]``
        How many guides were called in the cell (0, 1, 2, ...).
    ``.obs["target"]``
        The library's target of that guide; missing unless exactly one guide was called. Cells
        with several guides are kept and counted but have no target, so a (low-MOI)
        :func:`~scotgm_pp.tl.perturbation_response` on ``"target"`` leaves them out (class
        ``unassigned``), as it leaves out cells without a guide.
    ``.obs["guide_probability"]``
        ``"mixture"``: the posterior probability of the cell's call (exactly the called guides,
        the guides' mixtures taken as independent); NaN for the rules without a model.
    ``.uns[key_added]``
        ``params``; ``counts`` (``cells``, ``no_guide``, ``one_guide``, ``several_guides``,
        ``without_guide_data``: cells absent from the guide counts); ``guides``, one row per
        guide: its target, cells with its UMIs, cells where it is called, cells assigned to it
        alone, and the mixture's fit (means, sds and weight of both components, separation,
        convergence).

    Columns of those names already in ``.obs`` are replaced, with a warning.
    """
    if method not in GUIDE_METHODS:
        raise InputError(f"method must be one of {', '.join(GUIDE_METHODS)}, got {method!r}.")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.number)) or not threshold > 0:
        raise InputError(f"threshold must be a positive number of UMIs, got {threshold!r}.")
    if library is None:
        raise InputError("library is required: a CSV (columns guide,target), a DataFrame or a dict guide -> target.")
    lib = read_guide_library(library)
    target, counts, names, missing, what = _resolve(adata, guides, guide_names, rna)
    _check_library(lib, names, what)
    calls = call_guides(counts, method, threshold=threshold)
    cells = _cell_table(calls, names, lib, target.obs_names)
    n = calls.n_guides
    per_guide = calls.per_guide.set_index(pd.Index(names, dtype=object, name="guide"))
    per_guide.insert(0, "target", lib.reindex(names).to_numpy())
    per_guide.insert(3, "n_cells_assigned", cells["guide"].value_counts().reindex(names, fill_value=0).to_numpy())
    record = {
        "params": {"method": method, "threshold": float(threshold), "source": what, "n_guides_in_library": len(lib)},
        "counts": {"cells": int(n.size), "no_guide": int((n == 0).sum()), "one_guide": int((n == 1).sum()),
                   "several_guides": int((n > 1).sum()), "without_guide_data": int(missing)},
        "guides": per_guide,
    }
    out = adata.copy() if copy else adata
    annotated = out.mod[rna] if _is_mudata(out) else out
    replaced = [c for c in GUIDE_COLUMNS if c in annotated.obs.columns]
    if replaced:
        warnings.warn(f"assign_guides replaces the existing .obs column(s) {replaced}.", UserWarning, stacklevel=2)
    for col in GUIDE_COLUMNS:
        annotated.obs[col] = cells[col].to_numpy() if col in ("n_guides", "guide_probability") else cells[col].values
    annotated.uns[key_added] = record
    return out if copy else None

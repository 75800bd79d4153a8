"""The per-cell design matrix of :class:`~scotgm_pp.models.ScOTGM`: from an array, a DataFrame or
the names of AnnData ``.obs`` columns, to the ``(cells, covariates)`` floats of
:func:`scotgm_pp.models.build_model`'s ``design`` and the covariates' names.

Columns of a DataFrame (or ``.obs``) are coded as a regression formula would code them:

* a categorical, string or boolean column becomes one-hot columns of its levels but the first
  (the reference level: the first category of a pandas ``Categorical``, else the smallest value,
  ``False`` for booleans), named ``"column[level]"``; a level no cell has is dropped;
* a numeric column is centred on its mean (named as the column), so that the state means are
  those of a cell at the average covariate.

An array is used as it is (its columns named ``covariate_0, ...``): centre numeric columns and
leave the reference level out of one-hot ones yourself.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .graph import check_design

__all__ = ["resolve_design", "design_from_frame"]


def design_from_frame(frame: pd.DataFrame) -> tuple[np.ndarray, list[str]]:
    """Code a DataFrame's columns (see the module docstring); returns ``(design, names)``."""
    if frame.shape[1] == 0:
        raise ValueError("design names no column.")
    columns, names = [], []
    for col in frame.columns:
        x = frame[col]
        if pd.api.types.is_bool_dtype(x) or not pd.api.types.is_numeric_dtype(x):
            if x.isna().any():
                raise ValueError(f"design column {col!r} has missing values; fill or drop those cells first.")
            cat = x.astype("category") if not isinstance(x.dtype, pd.CategoricalDtype) else x
            cat = cat.cat.remove_unused_categories()
            levels = list(cat.cat.categories)
            if len(levels) < 2:
                raise ValueError(f"design column {col!r} has a single level ({levels}): it cannot move any mean; drop "
                                 "it.")
            for level in levels[1:]:
                columns.append((cat == level).to_numpy(dtype=float))
                names.append(f"{col}[{level}]")
        else:
            v = x.to_numpy(dtype=float)
            if not np.all(np.isfinite(v)):
                raise ValueError(f"design column {col!r} has missing or non-finite values; fill or drop those cells "
                                 "first.")
            columns.append(v - v.mean())
            names.append(str(col))
    return np.column_stack(columns), names


def resolve_design(design, n: int, obs: pd.DataFrame | None = None) -> tuple[np.ndarray, list[str]] | None:
    """The design matrix and its covariates' names, checked (:func:`~scotgm_pp.models.graph.check_design`).

    Parameters
    ----------
    design
        ``None``; the name of an ``.obs`` column or a list of them (with an AnnData, ``obs``);
        a DataFrame (with an AnnData, indexed by its cells, in any order); or a ``(n, q)`` array.
    n
        Number of cells.
    obs
        ``adata.obs`` of the data, or ``None`` for an array.
    """
    if design is None:
        return None
    if isinstance(design, str):
        design = [design]
    if isinstance(design, (list, tuple)) and len(design) > 0 and all(isinstance(c, str) for c in design):
        if obs is None:
            raise TypeError("design may name .obs columns only when data is an AnnData; pass an array or a DataFrame.")
        missing = [c for c in design if c not in obs.columns]
        if missing:
            raise KeyError(f"design columns {missing} not in adata.obs; columns are: {list(obs.columns)}.")
        D, names = design_from_frame(obs[list(design)])
    elif isinstance(design, pd.DataFrame):
        frame = design
        if obs is not None:
            index = frame.index.astype(str)
            cells = obs.index.astype(str)
            if not set(cells) <= set(index):
                raise ValueError("a design DataFrame must be indexed by the AnnData's cells (adata.obs_names); "
                                 f"{len(set(cells) - set(index))} cells are missing from its index.")
            frame = frame.set_axis(index).loc[cells]
        D, names = design_from_frame(frame)
    else:
        D = np.asarray(design, dtype=float)
        D = D[:, None] if D.ndim == 1 else D
        names = [f"covariate_{j}" for j in range(D.shape[1])] if D.ndim == 2 else []
    return check_design(D, n), names

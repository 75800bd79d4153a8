"""Input checks shared by the AnnData-facing layer. Each error names the problem and the fix."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from anndata import AnnData

__all__ = [
    "InputError",
    "check_obs_key",
    "check_control",
    "check_counts",
    "check_count_dtype",
    "check_csr_structure",
    "MAX_COUNT",
    "check_library_sizes",
    "check_unique_obs_names",
    "check_not_all_zero",
    "validate_screen",
]


class InputError(ValueError):
    """Raised when user input cannot be analysed as given; the message says how to fix it."""


def check_obs_key(adata: AnnData, key: str) -> None:
    if key not in adata.obs.columns:
        cols = ", ".join(map(repr, adata.obs.columns[:30])) or "(none)"
        raise InputError(
            f"perturbation_key {key!r} not in adata.obs; columns are: {cols}. "
            "Pass the column that holds each cell's perturbation (guide target) label."
        )


def check_control(adata: AnnData, key: str, control: str) -> None:
    labels = adata.obs[key].astype(str)
    if control not in set(labels):
        counts = labels.value_counts()
        shown = ", ".join(f"{lab!r} ({n})" for lab, n in counts.head(15).items())
        raise InputError(
            f"control label {control!r} not found in adata.obs[{key!r}]; the most frequent labels are: "
            f"{shown}. Pass the label of the non-targeting control cells as `control`."
        )


def _values(X) -> np.ndarray:
    return X.data if sp.issparse(X) else np.asarray(X).ravel()


MAX_COUNT = 2**31 - 1
"""The largest count accepted in one cell and gene. Real UMI (or read) counts stay far below it;
a larger value is a corrupt entry (e.g. a uint64 overflow), which float64 arithmetic would also
misread above 2**53."""

_REWRITE = "e.g. adata.X = adata.X.astype(np.int32); adata.write_h5ad(path)"


def check_count_dtype(dtype, what: str = "adata.X") -> None:
    """Refuse storage types that cannot hold raw counts: float16 (exact integers only up to
    2048, and unsupported by scipy.sparse), booleans, complex numbers, strings and objects."""
    dtype = np.dtype(dtype)
    if dtype == np.float16:
        raise InputError(f"{what} is stored as float16, which holds integers exactly only up to 2048 and which "
                         f"scipy.sparse cannot hold; store the raw counts as integers ({_REWRITE}).")
    if np.issubdtype(dtype, np.bool_):
        raise InputError(f"{what} is boolean; raw UMI counts (integers) are needed.")
    if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        raise InputError(f"{what} is not a real numeric matrix (dtype {dtype}); raw UMI counts are needed.")


def check_csr_structure(indptr: np.ndarray, indices: np.ndarray | None, n_cols: int, what: str = "adata.X",
                        *, n_stored: int | None = None, offset: int = 0, columns: str = "genes") -> None:
    """Refuse a corrupt sparse (CSR) structure: ``indptr`` must start at 0 (for a whole matrix,
    ``offset == 0``), never decrease and end at the number of stored values, and every column
    index must lie in ``[0, n_cols)``. ``offset`` is the first row of the block checked;
    ``columns`` names what the columns are (``"cells"`` for a CSC matrix's rows)."""
    fix = ("the sparse matrix is corrupt; rewrite it from its source (anndata's write_h5ad writes a valid "
           "one), or rebuild it with scipy.sparse.csr_matrix(dense_counts).")
    indptr = np.asarray(indptr)
    if indptr.ndim != 1 or indptr.size == 0:
        raise InputError(f"{what}: indptr is not a one-dimensional array of row offsets; {fix}")
    step = np.diff(indptr)
    if (offset == 0 and indptr[0] != 0) or (step < 0).any():
        row = offset + (int(np.argmax(step < 0)) if (step < 0).any() else 0)
        raise InputError(f"{what}: indptr decreases at row {row} (row offsets must never decrease); {fix}")
    if n_stored is not None and int(indptr[-1]) != int(n_stored):
        raise InputError(f"{what}: indptr ends at {int(indptr[-1])} but {int(n_stored)} values are stored; {fix}")
    if indices is not None and indices.size:
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= n_cols:
            bad = lo if lo < 0 else hi
            raise InputError(f"{what}: an index ({bad}) lies outside the {n_cols} {columns} (from {offset}); {fix}")


def check_counts(X, what: str = "adata.X", *, offset: int = 0) -> None:
    """Raw UMI counts: finite, non-negative integers (every stored value is checked).

    ``offset`` is the index of the first row of ``X`` in the whole matrix (when the matrix is
    checked block by block), so the message can name the offending cell.
    """
    v = _values(X)
    check_count_dtype(v.dtype, what)
    if v.size == 0:
        return
    if np.issubdtype(v.dtype, np.integer):
        if np.any(v < 0):
            raise InputError(
                f"{what} contains negative values (min {v.min():g}); it looks scaled or corrected. "
                "scotgm_pp needs raw UMI counts: pass the counts layer, e.g. adata.X = adata.layers['counts']."
            )
        _check_max(v, what, offset)
        return
    finite = np.isfinite(v)
    if not finite.all():
        raise InputError(
            f"{what} contains {int((~finite).sum())} non-finite values (NaN or inf) in rows from {offset}; raw "
            "counts are needed. Remove or repair those entries before running."
        )
    if np.any(v < 0):
        raise InputError(
            f"{what} contains negative values (min {v.min():g}); it looks scaled or corrected. "
            "scotgm_pp needs raw UMI counts: pass the counts layer, e.g. adata.X = adata.layers['counts']."
        )
    frac = np.abs(v - np.round(v)) > 1e-6
    if frac.any():
        raise InputError(
            f"{what} holds non-integer values (e.g. {v[frac][0]:g}, in rows from {offset}); it looks normalised or "
            "log-transformed. scotgm_pp normalises itself and needs raw UMI counts: pass the counts layer, e.g. "
            "adata.X = adata.layers['counts'] or adata.raw.to_adata()."
        )
    _check_max(v, what, offset)


def _check_max(v: np.ndarray, what: str, offset: int) -> None:
    top = v.max()
    if top > MAX_COUNT:
        raise InputError(f"{what} holds a count of {top:.6g} (in rows from {offset}), far above any real UMI count "
                         f"(at most {MAX_COUNT:,} accepted): the matrix is corrupt (e.g. an integer overflow) or not "
                         "counts. Repair those entries, or pass the raw counts layer.")


MIN_LIBRARY_SPREAD = 0.01
"""Relative spread (1st to 99th percentile over the median) of the cells' total counts below which
a matrix is taken for normalised-then-rounded data: raw UMI totals vary several-fold between
cells, totals rescaled to a common target (then rounded) differ by rounding noise only."""


def check_library_sizes(library_size: np.ndarray, what: str = "adata.X") -> None:
    """Refuse integer matrices whose cells all carry the same total (normalised, then rounded)."""
    lib = np.asarray(library_size, float)
    lib = lib[lib > 0]
    if lib.size < 50:
        return
    lo, med, hi = np.percentile(lib, [1, 50, 99])
    if (hi - lo) / med < MIN_LIBRARY_SPREAD:
        raise InputError(
            f"every cell of {what} sums to about {med:,.0f} (1st-99th percentile {lo:,.0f}-{hi:,.0f}): the matrix "
            "looks normalised to a common total and rounded, not raw UMI counts. Pass the raw counts layer, e.g. "
            "adata.X = adata.layers['counts']."
        )


def check_unique_obs_names(adata: AnnData) -> None:
    if not adata.obs_names.is_unique:
        dup = adata.obs_names[adata.obs_names.duplicated()][:5].tolist()
        raise InputError(
            f"adata.obs_names are not unique (e.g. {dup}); cells could be confused. "
            "Call adata.obs_names_make_unique() first."
        )
    if not adata.var_names.is_unique:
        dup = adata.var_names[adata.var_names.duplicated()][:5].tolist()
        raise InputError(
            f"adata.var_names are not unique (e.g. {dup}); gene rankings would be ambiguous. "
            "Call adata.var_names_make_unique() first."
        )


def check_not_all_zero(X, what: str = "adata.X") -> None:
    nnz = X.nnz if sp.issparse(X) else int(np.count_nonzero(X))
    if nnz == 0 or (sp.issparse(X) and not np.any(X.data)):
        raise InputError(f"{what} is all zeros: every gene has zero counts in every cell; nothing to analyse.")


def validate_screen(adata: AnnData, perturbation_key: str, control: str) -> None:
    """All checks a screen must pass before any perturbation is analysed."""
    if not isinstance(adata, AnnData):
        raise InputError(f"expected an AnnData, got {type(adata).__name__}.")
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise InputError(f"adata is empty ({adata.n_obs} cells x {adata.n_vars} genes).")
    check_obs_key(adata, perturbation_key)
    check_control(adata, perturbation_key, control)
    check_unique_obs_names(adata)
    check_counts(adata.X)
    check_not_all_zero(adata.X)


def batch_labels(adata: AnnData, batch_key: str | None) -> np.ndarray | None:
    """The batch label of every cell as strings (``None`` without a batch key); refuses a missing
    column or missing labels."""
    if batch_key is None:
        return None
    if batch_key not in adata.obs.columns:
        raise InputError(f"batch_key {batch_key!r} is not a column of adata.obs; columns: "
                         f"{list(adata.obs.columns)[:20]}. Pass batch_key=None to fit without batches.")
    column = adata.obs[batch_key]
    if column.isna().any():
        raise InputError(f"adata.obs[{batch_key!r}] has missing values; label every cell's batch.")
    return column.astype(str).to_numpy()

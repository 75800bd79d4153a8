"""Where a screen's counts come from, read one row block at a time.

:class:`MemoryRows` wraps a matrix in memory; :class:`H5adRows` reads rows of the counts of an
``.h5ad`` file on demand (CSR or dense), so that a screen larger than memory can be analysed.
:func:`scan_counts` makes the one pass over every cell that the driver needs before it fits
anything: the whole-matrix raw-count check, each cell's library size and detected genes, and the
controls' sufficient statistics for the count layer's dispersion.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._fingerprint import ContentDigest
from .inference.count_layer import MIN_BATCH_CONTROLS, PHI_MIN, BatchDispersion
from .inference.dispersion import shrink_dispersion
from ._validation import InputError, check_count_dtype, check_counts, check_csr_structure

__all__ = ["MemoryRows", "H5adRows", "CountScan", "scan_counts", "cap_counts", "rows_of", "Screen", "screen_from_anndata",
           "screen_from_h5ad"]

BLOCK_ROWS = 20_000
READ_GAP = 8
"""Rows of a file at most this many rows apart are read in one slice."""
"""Rows per block of the screen pass (bounded memory whatever the screen's size)."""


def _as_index(rows) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.int64)
    if rows.ndim != 1:
        raise ValueError("rows must be a one-dimensional array of row indices.")
    return rows


class MemoryRows:
    """Rows of a count matrix held in memory (CSR, CSC or dense); its type and, when sparse, its
    structure are checked first (``what`` names it in the error)."""

    def __init__(self, X, what: str = "adata.X"):
        check_count_dtype(X.dtype, what)
        if sp.issparse(X) and X.format in ("csr", "csc"):  # checked without touching the user's matrix
            n_major, n_minor = X.shape if X.format == "csr" else X.shape[::-1]
            if X.indptr.size != n_major + 1 or X.indices.size < X.indptr[-1] or X.data.size < X.indptr[-1]:
                raise InputError(f"{what}: the sparse matrix's indptr, indices and data do not fit together; it is "
                                 "corrupt. Rebuild it, e.g. scipy.sparse.csr_matrix(dense_counts).")
            check_csr_structure(X.indptr, X.indices[: X.indptr[-1]], n_minor, what,
                                columns="genes" if X.format == "csr" else "cells")
        if sp.issparse(X) and X.format != "csr":
            X = sp.csr_matrix(X)  # one conversion; row slicing of CSC would be slow
        self.X = X
        self.shape = tuple(int(v) for v in X.shape)

    def read(self, rows) -> sp.csr_matrix:
        """The given rows (in the given order) as a CSR matrix."""
        rows = _as_index(rows)
        block = self.X[rows]
        return block if sp.issparse(block) else sp.csr_matrix(np.asarray(block))

    def blocks(self, size: int = BLOCK_ROWS):
        for start in range(0, self.shape[0], size):
            yield start, self.read(np.arange(start, min(start + size, self.shape[0])))


class H5adRows:
    """Rows of ``.X`` (or ``.layers[layer]``) of an ``.h5ad`` file, read on demand (or of one
    modality of an ``.h5mu`` file: ``root="mod/rna/"``).

    Only CSR and dense matrices can be read by rows; a CSC matrix is refused with the fix. The
    object holds a path, not an open file, so it can be sent to other processes; each process
    opens the file read-only when it first reads.
    """

    def __init__(self, path: str | Path, layer: str | None = None, root: str = ""):
        import h5py

        self.path = str(path)
        self.elem = f"{root}X" if layer is None else f"{root}layers/{layer}"
        self.what = f"{Path(self.path).name}:{self.elem}"
        with h5py.File(self.path, "r") as f:
            if self.elem not in f:
                layers = list(f.get(f"{root}layers", {}))
                raise InputError(f"{self.path} has no {self.elem!r}; layers are: {layers}.")
            node = f[self.elem]
            if isinstance(node, h5py.Dataset):
                self.format = "dense"
                self.shape = tuple(int(v) for v in node.shape)
                self.dtype = node.dtype
                if len(self.shape) != 2:
                    raise InputError(f"{self.what} has shape {self.shape}, not cells x genes; rewrite it with anndata.")
            else:
                enc = node.attrs.get("encoding-type", "")
                enc = enc.decode() if isinstance(enc, bytes) else str(enc)
                if enc != "csr_matrix":
                    raise InputError(
                        f"{self.path}: {self.elem} is stored as {enc or 'an unknown type'}; rows can be read "
                        "lazily only from CSR or dense matrices. Rewrite it once as CSR, e.g. "
                        "adata.X = scipy.sparse.csr_matrix(adata.X); adata.write_h5ad(path)."
                    )
                self.format = "csr"
                if not {"data", "indices", "indptr"} <= set(node) or "shape" not in node.attrs:
                    raise InputError(f"{self.what} lacks data, indices, indptr or its shape; the file is corrupt. "
                                     "Rewrite it with anndata.")
                self.shape = tuple(int(v) for v in node.attrs["shape"])
                self.dtype = node["data"].dtype
                indptr = node["indptr"][...]
                if indptr.size != self.shape[0] + 1 or node["indices"].shape != node["data"].shape:
                    raise InputError(f"{self.what}: indptr holds {indptr.size} offsets for {self.shape[0]} rows, or "
                                     "indices and data differ in length; the file is corrupt. Rewrite it with anndata.")
                check_csr_structure(indptr, None, self.shape[1], self.what, n_stored=node["data"].shape[0])
        check_count_dtype(self.dtype, self.what)
        self._file = None
        self._indptr = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_file"] = None
        state["_indptr"] = None
        return state

    def _node(self):
        if self._file is None:
            import h5py

            self._file = h5py.File(self.path, "r")
            if self.format == "csr":
                self._indptr = self._file[self.elem]["indptr"][...].astype(np.int64)
        return self._file[self.elem]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            self._indptr = None

    def read(self, rows) -> sp.csr_matrix:
        """The given rows (in the given order) as a CSR matrix. Rows closer than
        :data:`READ_GAP` apart are read with one slice (and the rows between dropped), so a
        scattered sample costs one read per cluster of rows, not one per row."""
        rows = _as_index(rows)
        node = self._node()
        if rows.size == 0:
            return sp.csr_matrix((0, self.shape[1]), dtype=self.dtype)
        sorted_rows = np.unique(rows)
        breaks = np.flatnonzero(np.diff(sorted_rows) > READ_GAP) + 1
        starts = sorted_rows[np.concatenate([[0], breaks])]
        stops = sorted_rows[np.concatenate([breaks - 1, [sorted_rows.size - 1]])] + 1
        # position of each screen row inside the concatenated spans
        offsets = np.concatenate([[0], np.cumsum(stops - starts)[:-1]])
        span_of = np.searchsorted(starts, rows, side="right") - 1
        positions = offsets[span_of] + rows - starts[span_of]
        if self.format == "dense":
            block = np.vstack([np.asarray(node[int(a):int(b)]) for a, b in zip(starts, stops)])
            return sp.csr_matrix(block[positions])
        ip, data_ds, indices_ds = self._indptr, node["data"], node["indices"]
        data, indices, lengths = [], [], []
        for a, b in zip(starts, stops):
            lo, hi = int(ip[a]), int(ip[b])
            data.append(data_ds[lo:hi])
            indices.append(indices_ds[lo:hi])
            lengths.append(np.diff(ip[a : b + 1]))
        indptr = np.concatenate([[0], np.cumsum(np.concatenate(lengths))])
        indices = np.concatenate(indices)
        check_csr_structure(indptr, indices, self.shape[1], self.what, offset=int(starts[0]))
        spans = sp.csr_matrix((np.concatenate(data), indices, indptr), shape=(int(indptr.size - 1), self.shape[1]))
        return spans[positions]

    def blocks(self, size: int = BLOCK_ROWS):
        for start in range(0, self.shape[0], size):
            yield start, self.read(np.arange(start, min(start + size, self.shape[0])))


def rows_of(source) -> MemoryRows | H5adRows:
    """A row reader for a matrix in memory or an ``H5adRows`` (returned as is)."""
    return source if isinstance(source, (MemoryRows, H5adRows)) else MemoryRows(source)


CAP_RANK = 3
CAP_FACTOR = 4.0
CAP_MIN = 10.0
"""A count above ``max(CAP_FACTOR * y3, y3 + CAP_MIN)``, with ``y3`` the gene's third-largest count in
the whole screen, is capped there (see :func:`scan_counts`)."""


@dataclass
class CountScan:
    """What one pass over every cell tells the driver.

    Attributes
    ----------
    library_size
        Total counts of each cell over every gene, after capping (the count layer's offset and
        the normalisation's divisor).
    n_detected
        Genes with a non-zero count in each cell (for the ``min_genes`` filter).
    dispersion
        Negative-binomial dispersion of each gene among the control cells, each batch with its
        own rate: the moment estimates shrunk toward their mean-dispersion trend
        (:func:`scotgm_pp.inference.dispersion.shrink_dispersion`; None when no control mask was
        given).
    dispersion_fit
        The shrinkage's record (raw moment estimates, trend, weights), or None.
    dispersion_by_batch
        With a batch label per cell, each batch's own dispersion
        (:class:`~scotgm_pp.inference.count_layer.BatchDispersion`: the same estimate from that
        batch's controls alone, shrunk toward its own trend, for every batch with at least
        :data:`~scotgm_pp.inference.count_layer.MIN_BATCH_CONTROLS` controls; the pooled one
        otherwise); None without batches.
    count_cap
        ``(G,)`` the largest count of each gene every later step reads (:func:`cap_counts`).
    capped
        ``(row, gene, count)`` of every count above its gene's cap (at most two per gene).
    """

    library_size: np.ndarray
    n_detected: np.ndarray
    dispersion: np.ndarray | None
    dispersion_fit: object = None
    count_cap: np.ndarray | None = None
    dispersion_by_batch: BatchDispersion | None = None

    def task_dispersion(self, per_batch: bool) -> np.ndarray | BatchDispersion | None:
        """What the tasks' count layers read: each batch's dispersion with ``per_batch`` (when the
        scan had batches), else the pooled one."""
        return self.dispersion_by_batch if per_batch and self.dispersion_by_batch is not None else self.dispersion
    capped: tuple = ((), (), ())


def cap_counts(X: sp.csr_matrix, count_cap: np.ndarray | None) -> sp.csr_matrix:
    """``X`` with every count above its gene's cap set to the cap (a copy when anything changes)."""
    if count_cap is None or X.nnz == 0:
        return X
    cap = np.asarray(count_cap)[X.indices]
    over = X.data > cap
    if not over.any():
        return X
    X = X.copy()
    X.data = np.where(over, cap, X.data).astype(X.data.dtype)
    return X


class _TopCounts:
    """The ``k`` largest counts of every gene seen so far, with their rows (a running merge)."""

    def __init__(self, n_genes: int, k: int = CAP_RANK):
        self.k = k
        self.value = np.zeros((k, n_genes))
        self.row = np.full((k, n_genes), -1, dtype=np.int64)

    def update(self, X: sp.csr_matrix, start: int) -> None:
        cols = X.indices
        keep = X.data > self.value[-1][cols]
        if not keep.any():
            return
        rows = np.repeat(np.arange(X.shape[0], dtype=np.int64), np.diff(X.indptr))[keep] + start
        cols, vals = cols[keep], X.data[keep]
        genes = np.unique(cols)
        old_cols = np.repeat(genes[None, :], self.k, axis=0).ravel()
        cols = np.concatenate([cols, old_cols])
        vals = np.concatenate([vals, self.value[:, genes].ravel()])
        rows = np.concatenate([rows, self.row[:, genes].ravel()])
        order = np.lexsort((rows, -vals, cols))
        cols, vals, rows = cols[order], vals[order], rows[order]
        first = np.searchsorted(cols, genes)
        rank = np.arange(cols.size) - np.repeat(first, np.diff(np.append(first, cols.size)))
        top = rank < self.k
        self.value[rank[top], cols[top]] = vals[top]
        self.row[rank[top], cols[top]] = rows[top]

    def caps(self) -> np.ndarray:
        y3 = self.value[-1]
        return np.maximum(CAP_FACTOR * y3, y3 + CAP_MIN)


def _moment_sums(Y: sp.csr_matrix, li: np.ndarray) -> tuple:
    """A set of control cells' contributions to the dispersion's sufficient statistics."""
    return (np.asarray(Y.sum(axis=0)).ravel(), np.asarray(Y.multiply(Y).sum(axis=0)).ravel(),
            np.asarray(Y.T @ li).ravel(), li.sum(), (li**2).sum())


def scan_counts(rows, control_mask: np.ndarray | None = None, batch: np.ndarray | None = None,
                *, what: str = "adata.X", block: int = BLOCK_ROWS, digest: ContentDigest | None = None,
                cap: bool = True) -> CountScan:
    """One pass over the screen, block by block: check every stored value is a raw count, and
    collect per-cell totals, each gene's largest counts and the controls' per-gene moments (and,
    given a ``digest``, feed it every block: the fingerprint of the counts, at the cost of hashing
    what is read anyway).

    **Caps.** With ``cap`` (default) a count above ``max(4 y3, y3 + 10)``, ``y3`` the gene's
    third-largest count over every cell of the screen, is read as that value by every later
    step (library sizes, dispersions, the tasks' counts: :func:`cap_counts`). One absurd count
    (a corrupt entry, a doublet's burst) then cannot inflate a cell's library size or dominate
    a gene's resamples; a gene that responds in three or more cells keeps its counts. The cells
    holding capped counts are read a second time to correct the totals and moments.

    The moment estimate of the dispersion is ``phi_g = sum_b [sum (y - mu)^2 - mu] / sum_b sum mu^2``
    over control cells, with ``mu_i = lib_i * rate_bg`` and ``rate_bg`` the batch's summed counts
    over its summed library sizes (:func:`scotgm_pp.tl.nb_dispersion` on the controls, from
    sufficient statistics, so every control cell counts at no per-perturbation cost); it is then
    shrunk toward the genes' mean-dispersion trend (:mod:`scotgm_pp.inference.dispersion`).
    """
    src = rows_of(rows)
    n, g = src.shape
    lib = np.zeros(n)
    det = np.zeros(n, dtype=np.int64)
    top = _TopCounts(g) if cap else None
    strata = None
    if control_mask is not None:
        levels, labels = (np.array(["all"]), np.zeros(n, dtype=np.int64)) if batch is None else \
            np.unique(np.asarray(batch).astype(str), return_inverse=True)
        strata = np.where(np.asarray(control_mask, bool), labels, -1)
        n_strata = int(labels.max()) + 1 if n else 1
        sums = [np.zeros((n_strata, g)), np.zeros((n_strata, g)), np.zeros((n_strata, g)), np.zeros(n_strata),
                np.zeros(n_strata)]
    for start, X in src.blocks(block):
        check_counts(X, what, offset=start)
        stop = start + X.shape[0]
        X = X.astype(np.float64)
        X.eliminate_zeros()
        if digest is not None:
            digest.update(X)
        lib[start:stop] = np.asarray(X.sum(axis=1)).ravel()
        det[start:stop] = np.diff(X.indptr)
        if top is not None:
            top.update(X, start)
        if strata is None:
            continue
        st = strata[start:stop]
        for s in np.unique(st[st >= 0]):
            m = st == s
            for acc, part in zip(sums, _moment_sums(X[m], lib[start:stop][m])):
                acc[s] += part
    count_cap = None
    capped = ((), (), ())
    if top is not None:
        count_cap = top.caps()
        over = (top.value > count_cap[None, :]) & (top.row >= 0)
        c_rows, c_genes = top.row[over], np.nonzero(over)[1]
        capped = (c_rows, c_genes, top.value[over])
        if c_rows.size:
            fix_rows = np.unique(c_rows)
            old_lib = lib[fix_rows].copy()
            np.subtract.at(lib, c_rows, top.value[over] - count_cap[c_genes])
            if strata is not None and (strata[fix_rows] >= 0).any():
                ctrl_rows = fix_rows[strata[fix_rows] >= 0]
                Y = src.read(ctrl_rows).astype(np.float64)
                Y.eliminate_zeros()
                Yc = cap_counts(Y, count_cap)
                old = old_lib[np.isin(fix_rows, ctrl_rows)]
                for s in np.unique(strata[ctrl_rows]):
                    m = strata[ctrl_rows] == s
                    for acc, before, after in zip(sums, _moment_sums(Y[m], old[m]), _moment_sums(Yc[m], lib[ctrl_rows][m])):
                        acc[s] += after - before
    dispersion = fit = by_batch = None
    if strata is not None:
        s_y, s_y2, s_ly, s_l, s_l2 = sums
        rate = s_y / np.maximum(s_l, 1e-12)[:, None]
        # each stratum's moment sums sum (y - mu)^2 - mu and sum mu^2, (strata, G)
        num = s_y2 - 2.0 * rate * s_ly + rate**2 * s_l2[:, None] - rate * s_l[:, None]
        den = rate**2 * s_l2[:, None]
        n_ctrl = int((strata >= 0).sum())
        n_levels = int((s_l > 0).sum())
        fit = shrink_dispersion(num.sum(axis=0) / np.maximum(den.sum(axis=0), 1e-300), s_y.sum(axis=0) / max(n_ctrl, 1),
                                max(n_ctrl - n_levels, 2), floor=PHI_MIN)
        dispersion = fit.dispersion
        if batch is not None:
            by_batch = _dispersion_by_batch(strata, levels, num, den, s_y, dispersion)
    return CountScan(library_size=lib, n_detected=det, dispersion=dispersion, dispersion_fit=fit,
                     count_cap=count_cap, capped=capped, dispersion_by_batch=by_batch)


def _dispersion_by_batch(strata, levels, num, den, s_y, pooled) -> BatchDispersion:
    """Each batch's moment estimate ``num / den`` from its own controls' sums (``(strata, G)``),
    shrunk toward its own trend."""
    n_ctrl = np.bincount(strata[strata >= 0], minlength=len(levels))
    values = np.tile(pooled, (len(levels), 1))
    own = n_ctrl >= MIN_BATCH_CONTROLS
    for b in np.flatnonzero(own):
        values[b] = shrink_dispersion(num[b] / np.maximum(den[b], 1e-300), s_y[b] / n_ctrl[b], n_ctrl[b] - 1,
                                      floor=PHI_MIN).dispersion
    order = np.argsort(-n_ctrl, kind="stable")
    return BatchDispersion(labels=tuple(str(levels[b]) for b in order), values=values[order], pooled=pooled,
                           n_controls=n_ctrl[order], own=own[order])


@dataclass
class Screen:
    """A screen as the driver sees it: cell annotations, genes, and a row reader for the counts.

    Build it with :func:`screen_from_anndata` (in memory, or a backed AnnData) or
    :func:`screen_from_h5ad` (a file, read lazily).
    """

    obs: pd.DataFrame
    var_names: pd.Index
    rows: MemoryRows | H5adRows
    what: str = "adata.X"
    source: str | None = None
    layer: str | None = None

    @property
    def n_obs(self) -> int:
        return len(self.obs)

    @property
    def obs_names(self):
        return self.obs.index


def _check_names(obs_names, var_names) -> None:
    if not obs_names.is_unique:
        dup = obs_names[obs_names.duplicated()][:5].tolist()
        raise InputError(
            f"adata.obs_names are not unique (e.g. {dup}); cells could be confused. "
            "Call adata.obs_names_make_unique() first."
        )
    if not var_names.is_unique:
        dup = var_names[var_names.duplicated()][:5].tolist()
        raise InputError(
            f"adata.var_names are not unique (e.g. {dup}); gene rankings would be ambiguous. "
            "Call adata.var_names_make_unique() first."
        )


def screen_from_anndata(adata, layer: str | None = None) -> Screen:
    """The screen of an AnnData (in memory, or opened with ``backed="r"``: rows are then read
    from its file on demand)."""
    from anndata import AnnData

    if not isinstance(adata, AnnData):
        raise InputError(f"expected an AnnData, got {type(adata).__name__}.")
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise InputError(f"adata is empty ({adata.n_obs} cells x {adata.n_vars} genes).")
    _check_names(adata.obs_names, adata.var_names)
    what = "adata.X" if layer is None else f"adata.layers[{layer!r}]"
    if layer is not None and layer not in adata.layers:
        raise InputError(f"layer {layer!r} not in adata.layers; layers are: {list(adata.layers)}.")
    if adata.isbacked:
        rows = H5adRows(adata.filename, layer)
        source = str(adata.filename)
    else:
        X = adata.X if layer is None else adata.layers[layer]
        if X is None:
            raise InputError("adata.X is empty (None); put the raw counts in .X or name their layer with layer=.")
        rows = MemoryRows(X, what)
        source = None
    obs = adata.obs.copy()
    obs.index = pd.Index(adata.obs_names.astype(str), dtype=object)
    return Screen(obs=obs, var_names=pd.Index(adata.var_names.astype(str), dtype=object), rows=rows, what=what,
                  source=source, layer=layer)


def screen_from_h5ad(path, layer: str | None = None, modality: str = "rna") -> Screen:
    """The screen stored in an ``.h5ad`` file, or in the ``modality`` of an ``.h5mu`` file:
    annotations read now, counts read by rows later."""
    import h5py
    from anndata.io import read_elem

    path = Path(path)
    if not path.exists():
        raise InputError(f"no such file: {path}")
    if path.is_dir():
        raise InputError(f"{path} is a folder, not an .h5ad file.")
    if path.suffix not in (".h5ad", ".h5mu"):
        raise InputError(f"{path} is not an .h5ad or .h5mu file; convert it with anndata (e.g. sc.read_10x_h5 then "
                         "write_h5ad), or read it with sg.read_screen.")
    root = f"mod/{modality}/" if path.suffix == ".h5mu" else ""
    kind = "a MuData file" if root else "an AnnData file"
    try:
        with h5py.File(path, "r") as f:
            if root and root.rstrip("/") not in f:
                raise InputError(f"{path} has no modality {modality!r}; modalities: {list(f.get('mod', {}))}. Name "
                                 "the gene-expression modality.")
            if f"{root}obs" not in f or f"{root}var" not in f or f"{root}X" not in f and layer is None:
                raise InputError(f"{path} is not {kind} (it lacks {root}obs, {root}var or {root}X); write it with "
                                 f"{'mudata' if root else 'anndata'}.")
            obs = read_elem(f[f"{root}obs"])
            var = read_elem(f[f"{root}var"])
    except OSError as err:
        raise InputError(f"cannot read {path}: it is not a readable HDF5 file ({err}). "
                         "Check that the file is complete (not truncated).") from err
    _check_names(obs.index, var.index)
    if len(obs) == 0 or len(var) == 0:
        raise InputError(f"{path} holds an empty screen ({len(obs)} cells x {len(var)} genes).")
    rows = H5adRows(path, layer, root)
    if rows.shape != (len(obs), len(var)):
        raise InputError(f"{path}: the counts are {rows.shape} but obs/var describe {(len(obs), len(var))}; "
                         "the file is inconsistent.")
    obs.index = pd.Index(obs.index.astype(str), dtype=object)
    what = f"{path.name}:{root}{'X' if layer is None else 'layers/' + layer}"
    return Screen(obs=obs, var_names=pd.Index(var.index.astype(str), dtype=object), rows=rows, what=what,
                  source=str(path), layer=layer)

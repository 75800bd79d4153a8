"""Preprocessing (paper appendix A.4), PCA projection (A.5) and the per-PC KS check (Algorithm 2).

The pipeline works on a *copy* of the cells of one experiment (a perturbation and the controls):

1. drop cells with fewer than ``min_genes`` detected genes and genes detected in fewer than
   ``min_cells`` cells;
2. normalise every cell to ``target_sum`` counts and take ``log1p``;
3. flag highly variable genes (scanpy's ``seurat`` flavour with the paper's thresholds);
4. scale every gene to zero mean and unit variance, clipped at ``max_value``;
5. PCA on the scaled genes (all, or the highly variable ones), keeping the leading PCs that
   explain ``variance_threshold`` of the variance (or ``n_pcs`` of them);
6. every gene, whether or not it entered the PCA, gets loadings by projecting its scaled
   expression onto the PC scores (for genes in the PCA these are exactly the PCA loadings), so
   results can be mapped back to every measured gene.

Sparse input stays sparse until the (pair x PCA genes) block is densified for the SVD.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import stats

from ._guide_assign import assign_guides, read_guide_library
from ._validation import InputError, check_counts

__all__ = [
    "assign_guides",
    "read_guide_library",
    "PreprocessParams",
    "PCAResult",
    "PreparedPair",
    "resolve_min_genes",
    "normalize_log",
    "pca_projection",
    "ks_check",
    "prepare_pair",
    "preprocess",
]


@dataclass(frozen=True)
class PreprocessParams:
    """Thresholds of the preprocessing; defaults are the paper's (appendix A.4).

    Attributes
    ----------
    min_genes
        Minimum detected genes per cell. ``None`` (default): the paper's 200 on
        whole-transcriptome data (>= 2,000 genes); on a targeted panel, 5% of the panel's
        genes, since 200 would remove every cell of a 300-gene panel.
    min_cells
        Minimum cells in which a gene is detected.
    target_sum
        Counts per cell after normalisation.
    hvg_min_mean, hvg_max_mean, hvg_min_disp
        scanpy ``highly_variable_genes`` thresholds (``seurat`` flavour).
    use_highly_variable
        Fit the PCA on highly variable genes only (every gene is still projected and ranked).
    max_value
        Clip scaled values at this absolute value.
    n_pcs
        Fixed number of PCs; overrides ``variance_threshold`` when given.
    variance_threshold
        Keep the fewest leading PCs whose explained variance ratio reaches this.
    max_pcs
        Upper bound on the number of PCs, and at most a third of the smaller group's cells
        (fewer than that leaves the state covariances to the prior).
    """

    min_genes: int | None = None
    min_cells: int = 3
    target_sum: float = 1e4
    hvg_min_mean: float = 0.0125
    hvg_max_mean: float = 3.5
    hvg_min_disp: float = 0.5
    use_highly_variable: bool = False
    max_value: float | None = 10.0
    n_pcs: int | None = None
    variance_threshold: float = 0.4
    max_pcs: int = 100

    def __post_init__(self):
        _check_int(self.min_genes, "min_genes", 0, allow_none=True)
        _check_int(self.min_cells, "min_cells", 0)
        _check_int(self.n_pcs, "n_pcs", 1, allow_none=True, maximum=MAX_PCS)
        _check_int(self.max_pcs, "max_pcs", 1, maximum=MAX_PCS)
        _check_float(self.target_sum, "target_sum", lower=0.0, strict=True)
        for name in ("hvg_min_mean", "hvg_max_mean", "hvg_min_disp"):
            _check_float(getattr(self, name), name)
        if self.max_value is not None:
            _check_float(self.max_value, "max_value", lower=0.0, strict=True)
        _check_float(self.variance_threshold, "variance_threshold", lower=0.0, upper=1.0, strict=True)
        if not isinstance(self.use_highly_variable, (bool, np.bool_)):
            raise InputError(f"use_highly_variable must be True or False, got {self.use_highly_variable!r}.")

    def to_dict(self) -> dict:
        return asdict(self)


MAX_PCS = 10_000
"""Upper bound of ``n_pcs`` and ``max_pcs`` (an experiment keeps at most a third of its smaller
group's cells anyway)."""


def _check_int(value, name: str, minimum: int, *, allow_none: bool = False, maximum: int = 2**31 - 1) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or not (
        minimum <= value <= maximum
    ):
        raise InputError(f"{name} must be an integer from {minimum} to {maximum:,}{' or None' if allow_none else ''}, "
                         f"got {value!r}.")


def _check_float(value, name: str, *, lower: float | None = None, upper: float | None = None,
                 strict: bool = False) -> None:
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    ok = ok and bool(np.isfinite(value))
    if ok and lower is not None:
        ok = value > lower if strict else value >= lower
    if ok and upper is not None:
        ok = value <= upper
    if not ok:
        span = ""
        if lower is not None and upper is not None:
            span = f" in ({lower:g}, {upper:g}]" if strict else f" in [{lower:g}, {upper:g}]"
        elif lower is not None:
            span = f" {'>' if strict else '>='} {lower:g}"
        raise InputError(f"{name} must be a finite number{span}, got {value!r}.")


def resolve_min_genes(params: PreprocessParams, n_genes: int) -> int:
    if params.min_genes is not None:
        return int(params.min_genes)
    return 200 if n_genes >= 2000 else max(1, int(round(0.05 * n_genes)))


@dataclass
class PCAResult:
    """PCA of one experiment.

    Attributes
    ----------
    scores
        Cells x PCs.
    loadings
        Genes x PCs for *every* kept gene (``V_m``): scaled expression ~ ``scores @ loadings.T``.
    explained_variance_ratio
        Of every computed PC (not only the kept ones).
    gene_mean, gene_std
        Scaling of the log-normalised expression, per gene.
    pca_genes
        Boolean mask of the genes the PCA was fitted on.
    """

    scores: np.ndarray
    loadings: np.ndarray
    explained_variance_ratio: np.ndarray
    gene_mean: np.ndarray
    gene_std: np.ndarray
    pca_genes: np.ndarray

    @property
    def n_pcs(self) -> int:
        return self.scores.shape[1]


@dataclass
class PreparedPair:
    """One experiment after preprocessing: what the model is fitted on, and how to map back."""

    obs_names: pd.Index
    var_names: pd.Index
    is_control: np.ndarray
    lognorm: sp.csr_matrix
    highly_variable: np.ndarray
    pca: PCAResult
    ks: pd.DataFrame
    record: dict


def normalize_log(
    adata: ad.AnnData,
    params: PreprocessParams,
    *,
    library_size: np.ndarray | None = None,
    highly_variable: bool = True,
) -> tuple[ad.AnnData, dict]:
    """Steps 1-3 on a copy: filter, normalise, log1p (and flag highly variable genes).

    Parameters
    ----------
    adata
        Raw counts; not modified.
    params
        Thresholds (:class:`PreprocessParams`).
    library_size
        Each cell's total count over every gene of the screen, when known (the screen driver
        computes it once); by default the row sums of ``adata.X``. Cells are normalised to
        ``target_sum`` by it.
    highly_variable
        Flag highly variable genes (scanpy's ``seurat`` flavour) in ``.var["highly_variable"]``.
    """
    X = adata.X
    X = sp.csr_matrix(X, dtype=np.float32, copy=True) if not sp.issparse(X) or X.format != "csr" else X.astype(np.float32)
    X.eliminate_zeros()
    n_cells0, n_genes0 = X.shape
    lib = np.asarray(X.sum(axis=1)).ravel().astype(float) if library_size is None else np.asarray(library_size, float)
    if lib.shape != (n_cells0,):
        raise ValueError(f"library_size has {lib.size} entries for {n_cells0} cells.")
    min_genes = resolve_min_genes(params, n_genes0)
    cells = (np.diff(X.indptr) >= min_genes) & (lib > 0)
    if not cells.any():
        raise InputError(
            f"no cell has at least {min_genes} detected genes; lower min_genes (PreprocessParams(min_genes=...))."
        )
    X = X[cells]
    lib = lib[cells]
    genes = np.bincount(X.indices, minlength=n_genes0) >= params.min_cells
    if genes.sum() < 2:
        raise InputError(
            f"fewer than 2 genes are detected in at least {params.min_cells} of the {int(cells.sum())} cells analysed "
            "together; the experiment needs at least 2 measured genes with counts (lower PreprocessParams(min_cells=...) "
            "or check that the matrix holds the genes)."
        )
    X = X[:, genes]
    X = sp.csr_matrix(sp.diags((params.target_sum / lib).astype(np.float32)) @ X)
    np.log1p(X.data, out=X.data)
    work = ad.AnnData(X=X, obs=adata.obs.iloc[np.flatnonzero(cells)].copy(), var=adata.var.iloc[np.flatnonzero(genes)].copy())
    record = {
        "n_cells_in": int(n_cells0),
        "n_genes_in": int(n_genes0),
        "min_genes": int(min_genes),
        "n_cells_kept": int(work.n_obs),
        "n_genes_kept": int(work.n_vars),
    }
    if highly_variable:
        import scanpy as sc  # only here: a screen run without gene selection never loads scanpy

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sc.pp.highly_variable_genes(
                work,
                flavor="seurat",
                min_mean=params.hvg_min_mean,
                max_mean=params.hvg_max_mean,
                min_disp=params.hvg_min_disp,
            )
        record["n_highly_variable"] = int(work.var["highly_variable"].sum())
    return work, record


def _gene_mean_std(X) -> tuple[np.ndarray, np.ndarray]:
    n = X.shape[0]
    if sp.issparse(X):
        mean = np.asarray(X.mean(axis=0)).ravel()
        sq = np.asarray(X.multiply(X).mean(axis=0)).ravel()
    else:
        mean = X.mean(axis=0)
        sq = (X * X).mean(axis=0)
    var = np.clip(sq - mean**2, 0.0, None) * n / max(n - 1, 1)
    std = np.sqrt(var)
    std[std == 0] = 1.0
    return mean.astype(float), std.astype(float)


ROW_BLOCK_BYTES = 1 << 20
"""Bytes of a cells x genes matrix that an elementwise pass works on at a time (a block of rows
that stays in cache while every step of the pass runs over it)."""


def _row_blocks(Z: np.ndarray, rows: np.ndarray | None = None):
    """``(rows of the block, block)`` over ``rows`` of ``Z`` (default: all, in order), about
    :data:`ROW_BLOCK_BYTES` at a time: the block is a view of ``Z`` where its rows are
    consecutive, a copy otherwise (write it back to change ``Z``)."""
    rows = np.arange(Z.shape[0]) if rows is None else np.asarray(rows)
    step = max(1, ROW_BLOCK_BYTES // max(Z.shape[1] * Z.itemsize, 1))
    for i in range(0, rows.size, step):
        r = rows[i:i + step]
        contiguous = r[-1] - r[0] == r.size - 1
        yield r, (Z[r[0]:r[-1] + 1] if contiguous else Z[r])


EXACT_PCA_MAX = 600
"""Up to this many cells or genes (the smaller side) the PCA is exact (eigen-decomposition of
the smaller Gram matrix); above it, a seeded randomized truncated SVD computes only the PCs
that can be kept."""


def _leading_pcs(Z: np.ndarray, k: int, rng: np.random.Generator,
                 exact_max: int = EXACT_PCA_MAX, power_iterations: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` leading right singular vectors of ``Z`` (genes x k) and their squared singular values.

    Exact when the smaller side of ``Z`` is at most ``exact_max``; otherwise a randomized
    range finder in single precision with oversampling and three power iterations (Halko,
    Martinsson & Tropp 2011), whose cost is ``n x g x k``: no genes x genes matrix is formed. The
    basis is re-orthonormalised after every product, on the genes' side by a Cholesky QR
    (:func:`_orthonormal_columns`) and on the cells' side by a Householder QR, and the final
    small SVD comes from the eigen-decomposition of the sketch's width x width Gram matrix. The
    leading PCs come out to about 1e-5 relative; the trailing ones of a flat (noise) spectrum
    less precisely (about 10% on their variances), which only moves where a variance threshold
    falls among PCs of nearly equal variance.
    """
    n, g = Z.shape
    if min(n, g) <= exact_max:
        if g <= n:
            vals, vecs = np.linalg.eigh(Z.T @ Z)
            order = np.argsort(vals)[::-1][:k]
            return vecs[:, order], np.clip(vals[order], 0.0, None)
        return _right_vectors_from_rows(Z, k)
    width = min(min(n, g), k + max(10, k // 2))
    Zs = np.asarray(Z, dtype=np.float32)  # single precision: twice the speed, and the leading PCs to ~1e-5
    Y = Zs @ rng.standard_normal((g, width)).astype(np.float32)
    Q, _ = np.linalg.qr(Y)
    for _ in range(power_iterations):  # re-orthonormalised each time
        Q = _orthonormal_columns(Zs.T @ Q)
        Q, _ = np.linalg.qr(Zs @ Q)
    # the sketch's SVD from its small Gram matrix: B = Q^T Z is width x g, so B B^T is width x width
    return _right_vectors_from_rows(Q.T @ Zs, k)


def _right_vectors_from_rows(M: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` leading right singular vectors of a wide ``M`` (rows <= columns) and their squared
    singular values, in double precision, from the eigen-decomposition of its rows' Gram matrix
    ``M M^T``: ``v = M^T u / s``."""
    M = np.asarray(M, dtype=np.float64)
    vals, U = np.linalg.eigh(M @ M.T)
    order = np.argsort(vals)[::-1][:k]
    vals = np.clip(vals[order], 0.0, None)
    s = np.sqrt(vals)
    return (M.T @ U[:, order]) / np.where(s > 0, s, 1.0), vals


def _orthonormal_columns(Y: np.ndarray) -> np.ndarray:
    """An orthonormal basis of ``Y``'s columns (tall, single precision) by a Cholesky QR in double
    precision: ``Y^T Y = R^T R``, ``Q = Y R^{-1}`` (two small products instead of a Householder
    QR of the tall matrix). Its loss of orthogonality, about ``1e-16 cond(Y)^2``, only matters
    between power iterations, each of which ends with a Householder QR; a Householder QR where the
    Cholesky fails (a numerically rank-deficient ``Y``)."""
    Yd = Y.astype(np.float64)
    try:
        R = np.linalg.cholesky(Yd.T @ Yd).T
    except np.linalg.LinAlgError:
        return np.linalg.qr(Y)[0]
    return (Yd @ np.linalg.inv(R)).astype(np.float32)


def pca_projection(
    X,
    *,
    pca_genes: np.ndarray | None = None,
    n_pcs: int | None = None,
    variance_threshold: float = 0.4,
    max_pcs: int = 100,
    max_value: float | None = 10.0,
    random_state: int | np.random.Generator | None = 0,
) -> PCAResult:
    """Scale, fit a PCA and project every gene onto the kept PCs.

    Only the PCs that can be kept are computed (at most ``max_pcs``), exactly for small
    experiments and by a seeded randomized truncated SVD for large ones (see
    :func:`_leading_pcs`); the explained variance ratios are exact fractions of the total
    variance of the scaled genes.

    Parameters
    ----------
    X
        Cells x genes log-normalised expression (sparse or dense).
    pca_genes
        Mask of the genes to fit the PCA on; all when ``None``.
    n_pcs, variance_threshold, max_pcs
        How many PCs to keep (see :class:`PreprocessParams`).
    max_value
        Clip of the scaled values.
    random_state
        Seed of the randomized SVD (used only above :data:`EXACT_PCA_MAX` cells and genes).
    """
    n, g = X.shape
    mean, std = _gene_mean_std(X)
    mask = np.ones(g, bool) if pca_genes is None else np.asarray(pca_genes, bool)
    if mask.sum() < 2:
        mask = np.ones(g, bool)
    Xp = X if mask.all() else X[:, mask]
    # a fresh float64 array, scaled in place a cache-sized block of rows at a time (no further
    # n x g temporaries)
    Z = Xp.astype(float).toarray() if sp.issparse(Xp) else np.array(Xp, dtype=float)
    centre, scale = mean[mask], std[mask]
    col_sum = np.zeros(Z.shape[1])
    for _, block in _row_blocks(Z):
        block -= centre
        block /= scale
        if max_value is not None:
            np.clip(block, -max_value, max_value, out=block)
        col_sum += block.sum(axis=0)
    col_mean = col_sum / n
    total = 0.0
    for _, block in _row_blocks(Z):
        block -= col_mean
        total += float(np.einsum("ij,ij->", block, block))
    k = int(max(1, min(max_pcs, n - 1, Z.shape[1])))
    if n_pcs is not None:
        k = int(max(1, min(k, n_pcs)))
    vecs, var = _leading_pcs(Z, k, np.random.default_rng(random_state))
    # One sign per PC (largest loading positive), whichever solver found it.
    flip = np.sign(vecs[np.abs(vecs).argmax(axis=0), np.arange(vecs.shape[1])])
    vecs = vecs * np.where(flip == 0, 1.0, flip)
    evr = var / total if total > 0 else np.zeros_like(var)
    n_informative = int(np.sum(var > 1e-10 * max(var[0], 1e-300)))
    limit = max(1, min(k, n_informative))
    if n_pcs is not None:
        m = int(min(n_pcs, limit))
    else:
        m = int(min(np.searchsorted(np.cumsum(evr), variance_threshold - 1e-12) + 1, limit))
    scores = Z @ vecs[:, :m]
    # Loadings of every gene: least-squares projection of its scaled expression on the scores,
    # V_j = z_j^T scores / s^2 (exactly the PCA loadings for the genes in the fit, up to clipping).
    XtS = X.T @ scores if sp.issparse(X) else X.T @ scores
    XtS = np.asarray(XtS) - np.outer(mean, scores.sum(axis=0))
    loadings = XtS / std[:, None] / var[:m][None, :]
    return PCAResult(
        scores=scores,
        loadings=loadings,
        explained_variance_ratio=evr,
        gene_mean=mean,
        gene_std=std,
        pca_genes=mask,
    )


def ks_check(scores: np.ndarray, is_control: np.ndarray) -> pd.DataFrame:
    """Kolmogorov-Smirnov checks per principal component (Algorithm 2).

    For each PC: a two-sample KS test of the guide cells' scores against the control cells'
    (does this PC carry the perturbation?) and a one-sample KS test of the standardised scores
    of the control cells against N(0, 1) (is the Gaussian state model adequate?).
    Benjamini-Hochberg adjusted p-values are included.
    """
    is_control = np.asarray(is_control, bool)
    scores = np.asarray(scores, float)
    a, b = scores[is_control], scores[~is_control]
    n_pc = scores.shape[1]
    nan = np.full(n_pc, np.nan)
    # every PC at once (the same tests as one call per PC, without the per-call overhead)
    shift = stats.ks_2samp(b, a, axis=0) if len(a) and len(b) and n_pc else None
    gauss = None
    if len(a) > 1 and n_pc:
        sd = a.std(axis=0, ddof=1)
        z = (a - a.mean(axis=0)) / np.where(a.std(axis=0) > 0, sd, 1.0)
        gauss = stats.kstest(z, "norm", axis=0)
    df = pd.DataFrame({
        "pc": np.arange(n_pc),
        "ks_shift_statistic": nan if shift is None else shift.statistic,
        "ks_shift_pvalue": nan if shift is None else shift.pvalue,
        "ks_gaussian_statistic": nan if gauss is None else gauss.statistic,
        "ks_gaussian_pvalue": nan if gauss is None else gauss.pvalue,
    })
    for col in ("ks_shift_pvalue", "ks_gaussian_pvalue"):
        p = df[col].to_numpy()
        ok = np.isfinite(p)
        adj = np.full_like(p, np.nan)
        if ok.any():
            adj[ok] = stats.false_discovery_control(p[ok])
        df[col.replace("pvalue", "padj")] = adj
    return df


def prepare_pair(
    adata: ad.AnnData,
    is_control: np.ndarray,
    params: PreprocessParams,
    *,
    library_size: np.ndarray | None = None,
    random_state: int | np.random.Generator | None = 0,
) -> PreparedPair:
    """Preprocess the cells of one experiment (controls + one perturbation) and project them.

    ``adata`` holds raw counts of exactly those cells; it is not modified. ``library_size``:
    each cell's total count over every gene of the screen (default: the row sums of
    ``adata.X``). ``random_state`` seeds the randomized PCA of large experiments.
    """
    is_control = np.asarray(is_control, bool)
    work, record = normalize_log(adata, params, library_size=library_size,
                                 highly_variable=params.use_highly_variable)
    kept = adata.obs_names.get_indexer(work.obs_names)
    ctrl = is_control[kept]
    n_ctrl, n_guide = int(ctrl.sum()), int((~ctrl).sum())
    if n_ctrl == 0 or n_guide == 0:
        raise InputError(f"after filtering, {n_ctrl} control and {n_guide} guide cells remain; need both.")
    hv = work.var["highly_variable"].to_numpy(bool) if params.use_highly_variable else np.ones(work.n_vars, bool)
    limit = max(1, min(params.max_pcs, min(n_ctrl, n_guide) // 3))
    pca = pca_projection(
        work.X,
        pca_genes=hv if params.use_highly_variable else None,
        n_pcs=params.n_pcs,
        variance_threshold=params.variance_threshold,
        max_pcs=limit,
        max_value=params.max_value,
        random_state=random_state,
    )
    ks = ks_check(pca.scores, ctrl)
    record.update(
        {
            "n_control": n_ctrl,
            "n_guide": n_guide,
            "n_pcs": pca.n_pcs,
            "pc_limit": int(limit),
            "variance_explained": float(pca.explained_variance_ratio[: pca.n_pcs].sum()),
            "ks_shift_significant_pcs": int((ks["ks_shift_padj"] < 0.05).sum()),
            "ks_gaussian_rejected_pcs": int((ks["ks_gaussian_padj"] < 0.05).sum()),
        }
    )
    return PreparedPair(
        obs_names=work.obs_names.copy(),
        var_names=work.var_names.copy(),
        is_control=ctrl,
        lognorm=sp.csr_matrix(work.X),
        highly_variable=hv,
        pca=pca,
        ks=ks,
        record=record,
    )


def preprocess(
    adata: ad.AnnData,
    *,
    params: PreprocessParams | None = None,
    copy: bool = True,
) -> ad.AnnData | None:
    """Scanpy-style preprocessing of a whole count matrix (for exploration and figures).

    Returns a new AnnData with log-normalised ``.X``, the raw counts in ``.layers["counts"]``,
    ``.var["highly_variable"]``, the PCA scores in ``.obsm["X_pca"]``, every gene's loadings in
    ``.varm["PCs"]``, and ``.uns["pca"]`` (``variance_ratio``, ``params``). With ``copy=False``
    the input is replaced in place only after every step succeeded, and None is returned.
    """
    params = params or PreprocessParams()
    check_counts(adata.X)
    work, record = normalize_log(adata, params)
    work.layers["counts"] = adata[work.obs_names, work.var_names].X.copy()
    pca = pca_projection(
        work.X,
        pca_genes=work.var["highly_variable"].to_numpy(bool) if params.use_highly_variable else None,
        n_pcs=params.n_pcs,
        variance_threshold=params.variance_threshold,
        max_pcs=params.max_pcs,
        max_value=params.max_value,
    )
    work.obsm["X_pca"] = pca.scores
    work.varm["PCs"] = pca.loadings
    work.var["scale_mean"] = pca.gene_mean
    work.var["scale_std"] = pca.gene_std
    work.uns["pca"] = {
        "variance_ratio": pca.explained_variance_ratio[: pca.n_pcs],
        "params": {k: v for k, v in params.to_dict().items() if v is not None},
        "record": record,
    }
    if copy:
        return work
    adata._init_as_actual(work)  # noqa: SLF001 - replace in place only once everything succeeded
    return None

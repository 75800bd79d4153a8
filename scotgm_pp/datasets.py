"""Data: the embedded simulated screen and a validating reader for real screens."""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._validation import InputError, validate_screen

__all__ = ["simulate", "read", "papalexi_path"]


def simulate(
    n_genes: int = 200,
    n_perturbations: int = 8,
    n_control: int = 400,
    n_cells_per_perturbation: int = 150,
    n_de_genes: int = 12,
    escape_fraction: float = 0.3,
    knockdown: float = 0.1,
    de_log_fold_change: tuple[float, float] = (0.4, 1.0),
    n_programs: int = 5,
    library_size: float = 1000.0,
    dispersion: float = 10.0,
    dropout: float = 0.05,
    control_label: str = "control",
    random_state: int | np.random.Generator | None = 0,
) -> ad.AnnData:
    """Simulate a pooled CRISPR knock-down screen read out by single-cell RNA-seq.

    Expression follows a low-rank log-linear model: each cell ``i`` has a library size
    ``s_i`` (log-normal around ``library_size``) and latent program activities ``f_i ~ N(0, I)``;
    gene ``j`` has a baseline ``b_j`` (log-normal across genes) and program loadings ``W_j``, so
    ``log lambda_ij = log s_i + b_j + W_j f_i``. A perturbation multiplies its target gene by
    ``knockdown`` and shifts ``n_de_genes`` downstream genes by ``exp(+-lfc)``,
    ``lfc ~ U(de_log_fold_change)``. A fraction ``escape_fraction`` of guide cells escapes and
    keeps the control profile. Counts are negative binomial (``dispersion`` = NB size), and a
    technical dropout then zeroes each count independently with probability ``dropout``.

    Parameters
    ----------
    n_genes, n_perturbations, n_control, n_cells_per_perturbation
        Sizes. Target genes are drawn among the top quarter of genes by expression, so every
        knock-down is measurable.
    n_de_genes
        Downstream genes shifted by each perturbation (besides its target).
    escape_fraction
        Probability that a guide cell is not perturbed.
    knockdown
        Remaining fraction of target expression in perturbed cells.
    random_state
        Seed or Generator; the same seed gives the same data.

    Returns
    -------
    anndata.AnnData
        ``.X`` raw counts (CSR, int64); ``.obs["perturbation"]`` (``control_label`` for controls,
        else the target gene's name); ``.obs["escaped"]`` (bool, True for guide cells that escaped);
        ``.uns["simulation"]`` with ``"target_gene"`` (perturbation -> gene), ``"de_genes"``
        (perturbation -> {gene: +1 or -1}, the target included as -1), ``"control"`` and the
        settings.
    """
    if n_perturbations < 1 or n_genes < n_perturbations + n_de_genes + 1:
        raise ValueError(
            f"n_genes ({n_genes}) must exceed n_perturbations + n_de_genes ({n_perturbations + n_de_genes})."
        )
    if not 0 <= escape_fraction < 1:
        raise ValueError(f"escape_fraction must be in [0, 1), got {escape_fraction}.")
    rng = np.random.default_rng(random_state)
    genes = np.array([f"G{j:04d}" for j in range(n_genes)])

    base = rng.normal(0.0, 1.5, size=n_genes)
    base = base - np.log(np.exp(base).sum())  # baseline expression shares summing to 1
    W = rng.normal(0.0, 0.25, size=(n_genes, n_programs))

    order = np.argsort(base)[::-1]
    candidates = order[: max(n_genes // 4, n_perturbations)]
    targets = rng.choice(candidates, size=n_perturbations, replace=False)
    effects = np.zeros((n_perturbations, n_genes))
    de_genes: dict[str, dict[str, int]] = {}
    target_gene: dict[str, str] = {}
    for p, t in enumerate(targets):
        name = str(genes[t])
        others = np.setdiff1d(np.arange(n_genes), [t])
        de = rng.choice(others, size=n_de_genes, replace=False)
        sign = rng.choice([-1.0, 1.0], size=n_de_genes)
        lfc = rng.uniform(*de_log_fold_change, size=n_de_genes)
        effects[p, de] = sign * lfc
        effects[p, t] = np.log(knockdown)
        target_gene[name] = name
        de_genes[name] = {str(genes[g]): int(s) for g, s in zip(de, sign)}
        de_genes[name][name] = -1

    labels = [control_label] * n_control
    pert_index = [-1] * n_control
    for p, t in enumerate(targets):
        labels += [str(genes[t])] * n_cells_per_perturbation
        pert_index += [p] * n_cells_per_perturbation
    pert_index = np.array(pert_index)
    n = len(labels)
    escaped = (pert_index >= 0) & (rng.random(n) < escape_fraction)

    log_s = np.log(library_size) + rng.normal(0.0, 0.35, size=n)
    F = rng.normal(size=(n, n_programs))
    log_lam = log_s[:, None] + base[None, :] + F @ W.T
    hit = (pert_index >= 0) & ~escaped
    log_lam[hit] += effects[pert_index[hit]]
    lam = np.exp(log_lam)
    p_nb = dispersion / (dispersion + lam)
    counts = rng.negative_binomial(dispersion, p_nb)
    drop = rng.random(counts.shape) < dropout
    counts[drop] = 0

    obs = pd.DataFrame(
        {
            "perturbation": pd.Categorical(labels),
            "escaped": escaped,
            "library_size": log_s,
        },
        index=[f"cell{i:05d}" for i in range(n)],
    )
    obs["library_size"] = np.exp(obs["library_size"])
    adata = ad.AnnData(X=sp.csr_matrix(counts.astype(np.int64)), obs=obs, var=pd.DataFrame(index=genes))
    adata.uns["simulation"] = {
        "target_gene": target_gene,
        "de_genes": de_genes,
        "control": control_label,
        "perturbation_key": "perturbation",
        "settings": {
            "n_genes": n_genes,
            "n_perturbations": n_perturbations,
            "n_control": n_control,
            "n_cells_per_perturbation": n_cells_per_perturbation,
            "n_de_genes": n_de_genes,
            "escape_fraction": escape_fraction,
            "knockdown": knockdown,
            "dispersion": dispersion,
            "dropout": dropout,
            "library_size": library_size,
        },
    }
    return adata


def read(
    path: str | os.PathLike,
    perturbation_key: str = "perturbation",
    control: str | None = None,
    *,
    layer: str | None = None,
) -> ad.AnnData:
    """Read a screen from an ``.h5ad`` file and validate it.

    Works with any AnnData holding raw counts and a per-cell perturbation label, including the
    scPerturb layout (``.obs["perturbation"]`` with ``"control"`` for control cells).

    Parameters
    ----------
    path
        The ``.h5ad`` file.
    perturbation_key
        ``.obs`` column with each cell's perturbation (guide target) label.
    control
        Label of the control cells; default ``"control"`` (the scPerturb convention).
    layer
        Take counts from ``.layers[layer]`` instead of ``.X`` (the file is not modified; the
        returned object carries the counts in ``.X``).

    Returns
    -------
    anndata.AnnData
        The validated screen, in memory.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    if path.suffix != ".h5ad":
        raise InputError(f"{path} is not an .h5ad file; convert it with anndata (e.g. sc.read_10x_h5 then write_h5ad).")
    adata = ad.read_h5ad(path)
    if layer is not None:
        if layer not in adata.layers:
            raise InputError(f"layer {layer!r} not in the file; layers are: {list(adata.layers)}.")
        adata.X = adata.layers[layer]
    control = "control" if control is None else control
    validate_screen(adata, perturbation_key, control)
    return adata


def papalexi_path() -> Path:
    """Where the real Papalexi et al. 2021 ECCITE-seq subset lives.

    ``$SCOTGM_DATA_DIR`` if set; else ``shared/data`` beside the source checkout (the layout
    ``<dir>/main`` + ``<dir>/shared``), else ``../shared/data`` from the working directory.
    """
    name = "papalexi2021_eccite_subset.h5ad"
    env = os.environ.get("SCOTGM_DATA_DIR")
    if env:
        return Path(env) / name
    for base in (Path(__file__).resolve().parents[2], Path.cwd().resolve().parent):
        candidate = base / "shared" / "data" / name
        if candidate.exists():
            return candidate
    return Path(__file__).resolve().parents[2] / "shared" / "data" / name

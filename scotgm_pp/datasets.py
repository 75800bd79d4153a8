"""Data: the embedded simulated screen and a validating reader for real screens."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._simulate_guides import draw_guides, guide_counts
from ._validation import InputError, validate_screen

__all__ = ["simulate", "write_simulated", "read", "papalexi_path"]


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
    n_batches: int = 1,
    batch_effect: float = 0.3,
    program_shift: float = 0.0,
    library_size_sd: float = 0.35,
    guides_per_target: int = 0,
    guide_escape_spread: float = 0.25,
    guide_multiplet_rate: float = 0.03,
    batch_dispersion: Sequence[float] | None = None,
) -> ad.AnnData:
    """Simulate a pooled CRISPR knock-down screen read out by single-cell RNA-seq.

    Expression follows a low-rank log-linear model: each cell ``i`` has a library size
    ``s_i`` (log-normal around ``library_size``, log-scale sd ``library_size_sd``) and latent
    program activities ``f_i ~ N(0, I)``; gene ``j`` has a baseline ``b_j`` (log-normal across
    genes) and program loadings ``W_j``, so ``log lambda_ij = log s_i + b_j + W_j f_i``. A
    perturbation multiplies its target gene by ``knockdown``, shifts its own set of downstream
    genes by ``exp(+-lfc)``, ``lfc ~ U(de_log_fold_change)``, and, with ``program_shift``, moves
    the programs' activities by a random vector of that length (every gene loaded on the
    programs follows, as when a perturbation switches a pathway on). A fraction
    ``escape_fraction`` of guide cells escapes and keeps the control profile. Counts are negative
    binomial (``dispersion`` = NB size), and a technical dropout then zeroes each count
    independently with probability ``dropout``.

    Parameters
    ----------
    n_genes, n_perturbations, n_control, n_cells_per_perturbation
        Sizes. Target genes are drawn among the top quarter of genes by expression, so every
        knock-down is measurable.
    n_de_genes
        Downstream genes shifted by each perturbation (besides its target): a number, or a range
        ``(low, high)`` from which each perturbation draws its own, log-uniformly (from a
        handful to hundreds of genes, as in real screens; at most all other genes).
    escape_fraction
        Probability that a guide cell is not perturbed.
    knockdown
        Remaining fraction of target expression in perturbed cells.
    random_state
        Seed or Generator; the same seed gives the same data.
    dispersion
        Negative-binomial size shared by every gene and cell (variance ``mu + mu^2 / dispersion``,
        so the overdispersion ``phi = 1 / dispersion``; the default 10 is ``phi = 0.1``).
    n_batches, batch_effect
        With ``n_batches > 1``, every cell falls in a random batch and every gene's log rate is
        shifted by ``N(0, batch_effect^2)`` in each batch but the first (``.obs["batch"]``).
    batch_dispersion
        ``None`` (default): every batch draws its counts with ``dispersion``, and the screen is
        exactly the one drawn without this argument. Otherwise one negative-binomial size per
        batch, in batch order (``b0``, ``b1``, ...), each positive, e.g. ``(20, 2)``: the cells of
        batch ``b`` draw their counts with size ``batch_dispersion[b]`` (``phi = 1 / size``) and
        ``dispersion`` is not used. Needs ``n_batches > 1`` and exactly ``n_batches`` sizes.
    program_shift
        Length of each perturbation's shift of the program activities (0: none).
    library_size_sd
        Log-scale standard deviation of the library sizes.
    guides_per_target
        With a positive number, guide capture is simulated too: that many guides per
        perturbation and for the controls, each cell carrying one of its label's guides at
        random; each targeting guide has its own escape probability, uniform on
        ``escape_fraction +- guide_escape_spread`` (within [0, 0.95]), in place of
        ``escape_fraction``; a share ``guide_multiplet_rate`` of the cells also carries a random
        second guide (its expression is its first guide's). Guide UMIs: each carried guide
        ``1 + NB(mean 60, size 1.5)``, plus ambient UMIs over every guide (Poisson, 2 plus 4% of
        the cell's own guide UMIs). ``0`` (default) leaves the screen exactly as without guides.

    Returns
    -------
    anndata.AnnData
        ``.X`` raw counts (CSR, int64); ``.obs["perturbation"]`` (``control_label`` for controls,
        else the target gene's name); ``.obs["escaped"]`` (bool, True for guide cells that escaped);
        ``.obs["batch"]`` with ``n_batches > 1``;
        ``.uns["simulation"]`` with ``"target_gene"`` (perturbation -> gene), ``"de_genes"``
        (perturbation -> {gene: +1 or -1}: the target as -1, its downstream genes, and genes the
        program shift moves by at least :data:`DE_PROGRAM_LFC` on the log scale),
        ``"n_moved"`` (perturbation -> number of genes in ``de_genes``), the true effects
        ``"log_fold_change"`` (``perturbations`` x genes, natural log) with ``"perturbations"``
        naming its rows, each gene's basal log share of the library ``"base_log_share"``,
        ``"control"`` and the settings; with ``batch_dispersion``, ``"batch_dispersion"`` (batch
        label -> its NB size, e.g. ``{"b0": 20.0, "b1": 2.0}``, also listed in the settings). With
        ``guides_per_target``: ``.obsm["guide_counts"]`` (cells x guides, CSR int32) with the
        names in ``.uns["guide_names"]``;
        ``.obs["true_guide"]`` and ``.obs["true_n_guides"]``;
        ``.uns["simulation"]["guide_library"]`` (guide -> target, a dict for
        :func:`scotgm_pp.pp.assign_guides`) and ``["guide_escape"]`` (guide -> its escape
        probability).
    """
    de_max = min(n_de_genes) if isinstance(n_de_genes, (tuple, list)) else n_de_genes
    if n_perturbations < 1 or n_genes < n_perturbations + de_max + 1:
        raise ValueError(
            f"n_genes ({n_genes}) must exceed n_perturbations + n_de_genes ({n_perturbations + de_max})."
        )
    if int(n_batches) != n_batches or n_batches < 1:
        raise ValueError(f"n_batches must be a positive integer, got {n_batches}.")
    if not 0 <= escape_fraction < 1:
        raise ValueError(f"escape_fraction must be in [0, 1), got {escape_fraction}.")
    if not (np.isfinite(program_shift) and program_shift >= 0) or not (np.isfinite(library_size_sd)
                                                                        and library_size_sd >= 0):
        raise ValueError(f"program_shift and library_size_sd must be finite and >= 0, got {program_shift}, "
                         f"{library_size_sd}.")
    if batch_dispersion is not None:
        batch_dispersion = _check_batch_dispersion(batch_dispersion, n_batches)
    rng = np.random.default_rng(random_state)
    design = _design(rng, n_genes, n_perturbations, n_de_genes, knockdown, de_log_fold_change, n_programs,
                     program_shift=program_shift)
    genes, targets = design.genes, design.targets
    de_genes, target_gene = design.de_genes, design.target_gene

    labels = [control_label] * n_control
    pert_index = [-1] * n_control
    for p, t in enumerate(targets):
        labels += [str(genes[t])] * n_cells_per_perturbation
        pert_index += [p] * n_cells_per_perturbation
    pert_index = np.array(pert_index)
    n = len(labels)
    draw = rng.random(n)
    guides = None
    if guides_per_target:
        if int(guides_per_target) != guides_per_target or guides_per_target < 1:
            raise ValueError(f"guides_per_target must be a non-negative integer, got {guides_per_target}.")
        # the guides' own generator: the expression draws stay those of the screen without guides
        guide_rng = rng.spawn(1)[0]
        guides = draw_guides(guide_rng, np.asarray(labels), control_label, int(guides_per_target), escape_fraction,
                             guide_escape_spread, guide_multiplet_rate)
    escaped = (pert_index >= 0) & (draw < (escape_fraction if guides is None else guides.escape_of_cells()))

    counts, log_s, batch = _draw_cells(rng, design, pert_index, pert_index >= 0, escaped, library_size=library_size,
                                       dispersion=dispersion, dropout=dropout, n_batches=n_batches,
                                       batch_effect=batch_effect, library_size_sd=library_size_sd,
                                       batch_dispersion=batch_dispersion)

    obs = pd.DataFrame(
        {
            "perturbation": pd.Categorical(labels),
            "escaped": escaped,
            "library_size": log_s,
        },
        index=[f"cell{i:05d}" for i in range(n)],
    )
    obs["library_size"] = np.exp(obs["library_size"])
    if batch is not None:
        obs["batch"] = pd.Categorical([f"b{b}" for b in batch])
    adata = ad.AnnData(X=sp.csr_matrix(counts.astype(np.int64)), obs=obs, var=pd.DataFrame(index=genes))
    if guides is not None:
        adata.obsm["guide_counts"] = guide_counts(guide_rng, guides)
        adata.uns["guide_names"] = guides.names
        adata.obs["true_guide"] = pd.Categorical(guides.names[guides.guide])
        adata.obs["true_n_guides"] = 1 + (guides.second >= 0).astype(np.int64)
    adata.uns["simulation"] = {
        "target_gene": target_gene,
        "de_genes": de_genes,
        "n_moved": {p: len(g) for p, g in de_genes.items()},
        "log_fold_change": design.effects.astype(np.float32),  # perturbation (in targets' order) x gene
        "perturbations": np.array([str(genes[t]) for t in targets]),
        "base_log_share": design.base.astype(np.float32),
        "control": control_label,
        "perturbation_key": "perturbation",
        "settings": {
            "n_genes": n_genes,
            "n_perturbations": n_perturbations,
            "n_control": n_control,
            "n_cells_per_perturbation": n_cells_per_perturbation,
            "n_de_genes": list(n_de_genes) if isinstance(n_de_genes, (tuple, list)) else n_de_genes,
            "program_shift": program_shift,
            "library_size_sd": library_size_sd,
            "escape_fraction": escape_fraction,
            "knockdown": knockdown,
            "dispersion": dispersion,
            "dropout": dropout,
            "library_size": library_size,
            "guides_per_target": int(guides_per_target),
        },
    }
    if batch_dispersion is not None:
        adata.uns["simulation"]["batch_dispersion"] = {f"b{b}": float(k) for b, k in enumerate(batch_dispersion)}
        adata.uns["simulation"]["settings"]["batch_dispersion"] = [float(k) for k in batch_dispersion]
    if guides is not None:
        adata.uns["simulation"]["guide_library"] = guides.library
        adata.uns["simulation"]["guide_escape"] = guides.escape
    return adata


def write_simulated(
    path: str | os.PathLike,
    *,
    n_genes: int = 8000,
    n_perturbations: int = 2000,
    n_control: int = 100_000,
    n_cells_per_perturbation: int = 100,
    n_de_genes: int = 12,
    escape_fraction: float = 0.3,
    knockdown: float = 0.1,
    de_log_fold_change: tuple[float, float] = (0.4, 1.0),
    n_programs: int = 5,
    library_size: float = 1000.0,
    dispersion: float = 10.0,
    dropout: float = 0.05,
    control_label: str = "control",
    chunk_cells: int = 5000,
    random_state: int = 0,
) -> Path:
    """Simulate a screen of any size straight into an ``.h5ad`` file, a block of cells at a time.

    The generative model is :func:`simulate`'s (same parameters); cells are written in shuffled
    order (as in a real screen, a perturbation's cells are scattered through the file) in
    blocks of ``chunk_cells``, each drawn from its own generator seeded by ``(random_state,
    block)``, so memory stays bounded by one block whatever the number of cells. The counts are
    CSR int32 in ``.X``; ``.obs`` holds ``perturbation`` and ``escaped``, ``.uns["simulation"]``
    the truth as in :func:`simulate`.

    Returns
    -------
    pathlib.Path
        The file written.
    """
    import h5py
    from anndata.io import sparse_dataset, write_elem

    if n_perturbations < 1 or n_genes < n_de_genes + 2:
        raise ValueError(f"need n_perturbations >= 1 and n_genes > n_de_genes + 1, got {n_perturbations} and {n_genes}.")
    rng = np.random.default_rng(random_state)
    # Targets may repeat across perturbations when there are more perturbations than candidate
    # genes; each perturbation keeps its own label.
    n_targets = min(n_perturbations, max(n_genes // 4, 1))
    design = _design(rng, n_genes, n_targets, n_de_genes, knockdown, de_log_fold_change, n_programs)
    names = [f"P{p:05d}_{design.genes[design.targets[p % n_targets]]}" for p in range(n_perturbations)]
    pert_index = np.concatenate([np.full(n_control, -1), np.repeat(np.arange(n_perturbations), n_cells_per_perturbation)])
    pert_index = pert_index[rng.permutation(pert_index.size)]
    n = pert_index.size
    escaped = (pert_index >= 0) & (rng.random(n) < escape_fraction)
    labels = np.where(pert_index >= 0, np.asarray(names, dtype=object)[np.maximum(pert_index, 0)], control_label)
    obs = pd.DataFrame({"perturbation": pd.Categorical(labels), "escaped": escaped},
                       index=pd.Index([f"cell{i:07d}" for i in range(n)], dtype=object))
    var = pd.DataFrame(index=pd.Index(design.genes, dtype=object))
    uns = {"simulation": {
        "target_gene": {nm: str(design.genes[design.targets[p % n_targets]]) for p, nm in enumerate(names)},
        "control": control_label, "perturbation_key": "perturbation",
        "settings": {"n_genes": n_genes, "n_perturbations": n_perturbations, "n_control": n_control,
                     "n_cells_per_perturbation": n_cells_per_perturbation, "n_de_genes": n_de_genes,
                     "escape_fraction": escape_fraction, "knockdown": knockdown, "dispersion": dispersion,
                     "dropout": dropout, "library_size": library_size, "random_state": int(random_state)},
    }}
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with h5py.File(tmp, "w") as f:
        f.attrs["encoding-type"] = "anndata"
        f.attrs["encoding-version"] = "0.1.0"
        write_elem(f, "obs", obs)
        write_elem(f, "var", var)
        write_elem(f, "uns", uns)
        for empty in ("layers", "obsm", "varm", "obsp", "varp"):
            write_elem(f, empty, {})
        X = None
        for b, start in enumerate(range(0, n, chunk_cells)):
            stop = min(start + chunk_cells, n)
            counts, _, _ = _draw_cells(np.random.default_rng([int(random_state), b]), design,
                                       pert_index[start:stop] % max(n_targets, 1), pert_index[start:stop] >= 0,
                                       escaped[start:stop], library_size=library_size, dispersion=dispersion,
                                       dropout=dropout)
            block = sp.csr_matrix(counts.astype(np.int32))
            if X is None:
                write_elem(f, "X", block)  # anndata writes sparse data with maxshape=(None,): appendable
                X = sparse_dataset(f["X"])
            else:
                X.append(block)
    os.replace(tmp, path)
    return path


def _check_batch_dispersion(batch_dispersion, n_batches) -> np.ndarray:
    """:func:`simulate`'s ``batch_dispersion``, checked: one positive finite NB size per batch."""
    if n_batches <= 1:
        raise ValueError(f"batch_dispersion needs n_batches > 1, got n_batches={n_batches}; pass n_batches="
                         f"len(batch_dispersion), or use dispersion= for one NB size for every cell.")
    if isinstance(batch_dispersion, (str, bytes)) or np.ndim(batch_dispersion) != 1:
        raise ValueError(f"batch_dispersion must be a sequence of NB sizes, one per batch (e.g. (20, 2)), got "
                         f"{batch_dispersion!r}; for one size for every batch use dispersion=.")
    try:
        sizes = np.asarray(batch_dispersion, dtype=float)
    except (TypeError, ValueError) as err:
        raise ValueError(f"batch_dispersion must hold numbers (NB sizes), got {batch_dispersion!r}.") from err
    if sizes.size != n_batches:
        raise ValueError(f"batch_dispersion has {sizes.size} sizes but n_batches={n_batches}; give exactly one NB "
                         f"size per batch.")
    if not (np.isfinite(sizes).all() and (sizes > 0).all()):
        raise ValueError(f"batch_dispersion sizes must be finite and > 0 (phi = 1 / size), got {sizes.tolist()}.")
    return sizes


def _draw_cells(rng, design, target_index, guided, escaped, *, library_size, dispersion, dropout, n_batches=1,
                batch_effect=0.0, library_size_sd=0.35, batch_dispersion=None):
    """Counts of cells under :func:`simulate`'s model: ``(counts, log library sizes, batches)``.

    ``target_index`` is the row of ``design.effects`` of each guided cell; escaped cells keep the
    control profile. With ``n_batches > 1`` every cell falls in a random batch whose genes are
    shifted by ``N(0, batch_effect^2)`` on the log scale (batch 0 the reference). With
    ``batch_dispersion`` (one NB size per batch, checked) a cell's counts are drawn with its
    batch's size in place of ``dispersion``.
    """
    m = target_index.size
    log_s = np.log(library_size) + rng.normal(0.0, library_size_sd, size=m)
    F = rng.normal(size=(m, design.W.shape[1]))
    log_lam = log_s[:, None] + design.base[None, :] + F @ design.W.T
    hit = guided & ~escaped
    log_lam[hit] += design.effects[target_index[hit]]
    batch = None
    if n_batches > 1:
        batch = rng.integers(n_batches, size=m)
        offsets = rng.normal(0.0, batch_effect, size=(n_batches, design.base.size))
        offsets[0] = 0.0
        log_lam += offsets[batch]
    lam = np.exp(log_lam)
    if batch_dispersion is not None:
        dispersion = np.asarray(batch_dispersion, dtype=float)[batch][:, None]  # each cell its batch's size
    counts = rng.negative_binomial(dispersion, dispersion / (dispersion + lam))
    counts[rng.random(counts.shape) < dropout] = 0
    return counts, log_s, batch


@dataclass
class _Design:
    """Gene-level parameters of a simulated screen (everything that does not depend on cells)."""

    genes: np.ndarray
    base: np.ndarray
    W: np.ndarray
    targets: np.ndarray
    effects: np.ndarray
    de_genes: dict
    target_gene: dict


DE_PROGRAM_LFC = 0.25
"""A gene moved by a perturbation's program shift counts as differentially expressed (in the
truth of :func:`simulate`) when its log rate moves by at least this much."""


def _design(rng, n_genes, n_perturbations, n_de_genes, knockdown, de_log_fold_change, n_programs,
            program_shift=0.0) -> _Design:
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
    ranged = isinstance(n_de_genes, (tuple, list))
    for p, t in enumerate(targets):
        name = str(genes[t])
        others = np.setdiff1d(np.arange(n_genes), [t])
        n_de = int(n_de_genes) if not ranged else int(round(np.exp(rng.uniform(*np.log(n_de_genes)))))
        n_de = min(n_de, others.size)
        de = rng.choice(others, size=n_de, replace=False)
        sign = rng.choice([-1.0, 1.0], size=n_de)
        lfc = rng.uniform(*de_log_fold_change, size=n_de)
        effects[p, de] = sign * lfc
        if program_shift > 0:
            u = rng.normal(size=n_programs)
            effects[p] += W @ (program_shift * u / np.linalg.norm(u))
        effects[p, t] = np.log(knockdown)
        target_gene[name] = name
        moved = np.flatnonzero((np.abs(effects[p]) >= DE_PROGRAM_LFC) | np.isin(np.arange(n_genes), de))
        de_genes[name] = {str(genes[g]): int(np.sign(effects[p, g])) for g in moved if g != t}
        de_genes[name][name] = -1
    return _Design(genes, base, W, targets, effects, de_genes, target_gene)


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
    if path.is_dir():
        raise InputError(f"{path} is a folder, not an .h5ad file.")
    if path.suffix != ".h5ad":
        raise InputError(f"{path} is not an .h5ad file; convert it with anndata (e.g. sc.read_10x_h5 then write_h5ad).")
    try:
        adata = ad.read_h5ad(path)
    except (OSError, KeyError) as err:
        raise InputError(f"cannot read {path}: it is not a complete .h5ad file written by anndata ({err}).") from err
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

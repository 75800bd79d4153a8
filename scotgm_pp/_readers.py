"""Reading a screen as it comes from the sequencer or from scverse tools: ``.h5ad``, ``.h5mu``,
10x ``.h5`` (gene expression plus CRISPR guide capture).

:func:`read_screen` is exported as ``sg.io.read_screen``.
"""

from __future__ import annotations

import os
from pathlib import Path

from ._validation import InputError

__all__ = ["read_screen", "SUFFIXES", "TENX_MODALITIES", "split_feature_types"]

SUFFIXES = (".h5ad", ".h5mu", ".h5")
TENX_MODALITIES = {"Gene Expression": "rna", "CRISPR Guide Capture": "gdo", "Antibody Capture": "prot"}
"""Modality name of each 10x feature type (others become their type, lower case, ``_`` for spaces)."""


def _checked_path(path) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    if path.is_dir():
        raise InputError(f"{path} is a folder, not a screen file ({', '.join(SUFFIXES)}).")
    if path.suffix not in SUFFIXES:
        raise InputError(f"{path} is not a screen file scotgm_pp reads; give an .h5ad (AnnData), an .h5mu (MuData, "
                         "e.g. rna + gdo modalities) or a 10x Cell Ranger .h5 (filtered_feature_bc_matrix.h5).")
    return path


def split_feature_types(adata):
    """A MuData with one modality per 10x feature type of ``adata`` (``var["feature_types"]``):
    ``rna``, ``gdo`` (CRISPR guide capture), ``prot``, ... (:data:`TENX_MODALITIES`)."""
    import mudata as md

    if "feature_types" not in adata.var.columns:
        raise InputError("the 10x matrix has no feature_types; it cannot be split into expression and guides.")
    types = adata.var["feature_types"].astype(str)
    mods = {}
    for kind in types.unique():
        name = TENX_MODALITIES.get(kind, kind.lower().replace(" ", "_"))
        mod = adata[:, (types == kind).to_numpy()].copy()
        mod.var_names_make_unique()
        mods[name] = mod
    if "rna" not in mods:
        raise InputError(f"the 10x file holds no Gene Expression features (feature types: {sorted(types.unique())}).")
    return md.MuData(mods)


def read_screen(path: str | os.PathLike):
    """Read a screen from ``.h5ad``, ``.h5mu`` or a 10x Cell Ranger ``.h5``.

    Parameters
    ----------
    path
        ``.h5ad``: an AnnData (counts in ``.X``, guide counts possibly in ``.obsm``);
        ``.h5mu``: a MuData (e.g. ``rna`` and ``gdo`` modalities), read with mudata;
        ``.h5``: a 10x feature-barcode matrix, read with :func:`scanpy.read_10x_h5` with every
        feature type, then split by feature type into a MuData (``rna`` for Gene Expression,
        ``gdo`` for CRISPR Guide Capture, ``prot`` for Antibody Capture).

    Returns
    -------
    anndata.AnnData or mudata.MuData
        In memory. Pass it to :func:`scotgm_pp.pp.assign_guides` (a MuData with its guide
        modality's name), then the expression AnnData (``mdata["rna"]``) to
        :func:`scotgm_pp.tl.perturbation_response`.
    """
    path = _checked_path(path)
    try:
        if path.suffix == ".h5ad":
            import anndata as ad

            return ad.read_h5ad(path)
        if path.suffix == ".h5mu":
            import mudata as md

            return md.read_h5mu(path)
        import scanpy as sc

        adata = sc.read_10x_h5(path, gex_only=False)
    except (OSError, KeyError) as err:
        raise InputError(f"cannot read {path}: it is not a complete {path.suffix} file ({err}).") from err
    return split_feature_types(adata)

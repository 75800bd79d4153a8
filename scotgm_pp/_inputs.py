"""What ``scotgm run`` analyses: the screen of an ``.h5ad``, ``.h5mu`` or 10x ``.h5`` file, with each
cell's target assigned from its guide counts when a guide modality and library are given."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from anndata import AnnData

from ._screen import Screen, screen_from_anndata, screen_from_h5ad
from ._validation import InputError

__all__ = ["GuideOptions", "load_screen", "GUIDE_TARGET_KEY"]

GUIDE_TARGET_KEY = "target"
"""The ``.obs`` column of assigned targets (:func:`scotgm_pp.pp.assign_guides`), the run's
perturbation key when guides are assigned."""


@dataclass(frozen=True)
class GuideOptions:
    """How ``scotgm run`` assigns guides (``--guide-modality``, ``--guide-library``, ...)."""

    modality: str
    library: str
    method: str = "mixture"
    threshold: float = 5


def _read_modality(path: Path, modality: str) -> AnnData:
    """One modality of an ``.h5mu`` file, in memory (the guide counts: cells x guides)."""
    import h5py
    from anndata.io import read_elem

    with h5py.File(path, "r") as f:
        if f"mod/{modality}" not in f:
            raise InputError(f"{path} has no modality {modality!r}; modalities: {list(f.get('mod', {}))}. Pass the "
                             "guide-capture modality's name as --guide-modality.")
        return read_elem(f[f"mod/{modality}"])


def load_screen(path, *, layer: str | None = None, rna: str = "rna",
                guides: GuideOptions | None = None) -> tuple[Screen, dict | None]:
    """The screen to analyse, and the guide assignment's record when ``guides`` is given.

    ``.h5ad`` and ``.h5mu`` (its ``rna`` modality) are read by rows as needed; a 10x ``.h5`` is
    read whole (scanpy's reader) and split by feature type. With ``guides``, the guide counts
    (the ``.h5mu``'s or the 10x file's guide modality) are assigned with the library, and the
    screen's ``.obs`` gains ``guide``, ``n_guides``, ``target`` and ``guide_probability``.
    """
    from ._readers import read_screen

    path = Path(path)
    if path.suffix == ".h5":
        mdata = read_screen(path)
        screen = screen_from_anndata(mdata.mod["rna"], layer)
        screen.source = str(path)
        guide_counts = None
        if guides is not None:
            if guides.modality not in mdata.mod:
                raise InputError(f"{path} holds no {guides.modality!r} features (modalities by 10x feature type: "
                                 f"{list(mdata.mod)}); guide capture is 'gdo'.")
            guide_counts = mdata.mod[guides.modality]
    else:
        if guides is not None and path.suffix != ".h5mu":
            raise InputError(f"--guide-modality needs an .h5mu (MuData) or 10x .h5 file; {path.name} is not one. Write "
                             "the expression and guide counts as a MuData (rna, gdo), or assign guides in Python with "
                             "sg.pp.assign_guides.")
        screen = screen_from_h5ad(path, layer, modality=rna)
        guide_counts = _read_modality(path, guides.modality) if guides is not None else None
    if guides is None:
        return screen, None
    from ._guide_assign import assign_guides

    cells = AnnData(obs=screen.obs.copy())
    assign_guides(cells, guide_counts, guides.library, guides.method, threshold=guides.threshold)
    screen.obs = cells.obs
    return screen, cells.uns["guide_assignment"]

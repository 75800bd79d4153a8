"""Per-perturbation results on disk: one small HDF5 file a perturbation, written atomically.

A store is a folder of ``<key>.h5`` files (``key`` from :func:`scotgm_pp._labels.label_key`),
each holding one :class:`~scotgm_pp.tl._execute.TaskResult`: the light summary, the gene-level
numbers, the guide cells' posteriors and the heavy record (loadings, covariances, traces). Each
file is written under a temporary name and renamed when complete, so a run killed at any moment
leaves only whole files; a resumed run reads them back instead of fitting again, and a user
loads one perturbation's record at a time (:func:`scotgm_pp.tl.get_record`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .._validation import InputError
from ._execute import TaskResult

__all__ = ["RecordStore"]

_SUFFIX = ".h5"
_FORMAT = "scotgm_pp.record/1"


def _plain_dict(d: dict) -> dict:
    """Drop ``None`` values (HDF5 has no null) recursively."""
    return {k: (_plain_dict(v) if isinstance(v, dict) else v) for k, v in d.items() if v is not None}


class RecordStore:
    """A folder of per-perturbation result files.

    Parameters
    ----------
    path
        The folder (created when missing).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise InputError(f"record store {self.path} exists and is not a folder; choose another location.")
        self.path.mkdir(parents=True, exist_ok=True)

    def _file(self, key: str) -> Path:
        return self.path / f"{key}{_SUFFIX}"

    def keys(self) -> list[str]:
        """Keys of the complete files (temporary files of an interrupted write are ignored)."""
        return sorted(p.name[: -len(_SUFFIX)] for p in self.path.glob(f"*{_SUFFIX}") if not p.name.startswith("."))

    def write(self, result: TaskResult) -> Path:
        """Write one result atomically (temporary name, then rename)."""
        import h5py
        from anndata.io import write_elem

        target = self._file(result.key)
        tmp = self.path / f".{result.key}.{os.getpid()}.tmp"
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = _FORMAT
            f.attrs["perturbation"] = result.perturbation
            f.attrs["key"] = result.key
            if result.skip_reason is not None:
                f.attrs["skip_reason"] = result.skip_reason
            else:
                write_elem(f, "summary", _plain_dict(result.summary))
                f["gene_index"] = np.asarray(result.gene_index, dtype=np.int64)
                write_elem(f, "gene_values", {k: np.asarray(v) for k, v in result.gene_values.items()})
                f["guide_rows"] = np.asarray(result.guide_rows, dtype=np.int64)
                f["p_perturbed"] = np.asarray(result.p_perturbed, dtype=float)
                write_elem(f, "record", _plain_dict(result.record))
        os.replace(tmp, target)
        return target

    def read(self, key: str, *, record: bool = False) -> TaskResult:
        """Read one result (its heavy record only when ``record=True``)."""
        import h5py
        from anndata.io import read_elem

        path = self._file(key)
        if not path.exists():
            raise KeyError(f"no stored result {key!r} in {self.path}.")
        try:
            with h5py.File(path, "r") as f:
                if f.attrs.get("format") != _FORMAT:
                    raise InputError(f"{path} is not a scotgm_pp record file (format {f.attrs.get('format')!r}).")
                out = TaskResult(perturbation=str(f.attrs["perturbation"]), key=str(f.attrs["key"]))
                if "skip_reason" in f.attrs:
                    out.skip_reason = str(f.attrs["skip_reason"])
                    return out
                out.summary = read_elem(f["summary"])
                out.gene_index = f["gene_index"][...]
                out.gene_values = read_elem(f["gene_values"])
                out.guide_rows = f["guide_rows"][...]
                out.p_perturbed = f["p_perturbed"][...]
                if record:
                    out.record = read_elem(f["record"])
                return out
        except OSError as err:
            raise InputError(f"cannot read the stored result {path}: {err}; delete it and resume the run.") from err

    def remove_temporary(self) -> None:
        """Delete temporary files left by an interrupted write."""
        for p in self.path.glob(".*.tmp"):
            p.unlink(missing_ok=True)

"""Per-perturbation results on disk: one small HDF5 file a perturbation, written atomically.

A store is a folder of ``<key>.h5`` files (``key`` from :func:`scotgm_pp._labels.label_key`),
each holding one :class:`~scotgm_pp.tl._execute.TaskResult`: the light summary, the gene-level
numbers, the guide cells' posteriors and the heavy record (loadings, covariances, traces). Each
file is written under a temporary name and renamed when complete, so a run killed at any moment
leaves only whole files; a resumed run reads them back instead of fitting again, and a user
loads one perturbation's record at a time (:func:`scotgm_pp.tl.get_record`).

A store belongs to one fingerprint (:mod:`scotgm_pp._fingerprint`: the settings that change a
result, the layer, the package version and a digest of the data read), kept in ``store.json``
and stamped on every record file. A run reuses a record only under the same fingerprint; a store
of another fingerprint is an error that says what changed, never a silent reuse.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np

from .._fingerprint import canonical, describe_changes, fingerprint_id
from .._validation import InputError
from ..io import atomic_write_text, write_bytes
from ._execute import TaskResult

__all__ = ["RecordStore", "MANIFEST"]

_SUFFIX = ".h5"
_FORMAT = "scotgm_pp.record/1"
MANIFEST = "store.json"
"""The file of a store that holds the fingerprint its records were made under."""


def _plain_dict(d: dict) -> dict:
    """Drop ``None`` values (HDF5 has no null) recursively."""
    return {k: (_plain_dict(v) if isinstance(v, dict) else v) for k, v in d.items() if v is not None}


class RecordStore:
    """A folder of per-perturbation result files.

    Parameters
    ----------
    path
        The folder (created when missing).
    fingerprint
        The identifier (:func:`~scotgm_pp._fingerprint.fingerprint_id`) stamped on records
        written and required of records read; ``None``: none (set by :meth:`bind`).
    """

    def __init__(self, path: str | os.PathLike, fingerprint: str | None = None):
        self.path = Path(path)
        self.fingerprint = fingerprint
        if self.path.exists() and not self.path.is_dir():
            raise InputError(f"record store {self.path} exists and is not a folder; choose another location.")
        self.path.mkdir(parents=True, exist_ok=True)

    def bind(self, fingerprint: dict, *, replace: bool = False,
             fix: str = "pass another store folder, or delete this one to fit again") -> None:
        """Make ``fingerprint`` the store's: kept when it is already, written to an empty store,
        and otherwise an :class:`InputError` naming what changed (``fix`` says what to do), or,
        with ``replace``, the old records deleted first."""
        fingerprint = canonical(fingerprint)
        manifest = self.path / MANIFEST
        try:
            previous = json.loads(manifest.read_text())
        except FileNotFoundError:
            previous = None
        except (OSError, ValueError):
            previous = {"unreadable": True}
        if previous != fingerprint:
            self.remove_temporary()
            if (previous is not None or self.keys()) and not replace:
                what = ("records without a fingerprint (an older scotgm_pp)" if previous is None else
                        f"records of other settings or data (changed: {describe_changes(previous, fingerprint)})")
                raise InputError(f"the record store {self.path} holds {what}; {fix}.")
            for key in self.keys():
                self._file(key).unlink()
            atomic_write_text(manifest, json.dumps(fingerprint, indent=1, sort_keys=True))
        self.fingerprint = fingerprint_id(fingerprint)

    def _file(self, key: str) -> Path:
        return self.path / f"{key}{_SUFFIX}"

    def keys(self) -> list[str]:
        """Keys of the complete files (temporary files of an interrupted write are ignored)."""
        return sorted(p.name[: -len(_SUFFIX)] for p in self.path.glob(f"*{_SUFFIX}") if not p.name.startswith("."))

    def write(self, result: TaskResult) -> Path:
        """Write one result atomically (temporary name, then rename). The HDF5 file is made in
        memory and written with plain file I/O: a full disk is then one clean ``OSError``, not an
        HDF5 library failing on every later flush."""
        import h5py
        from anndata.io import write_elem

        target = self._file(result.key)
        tmp = self.path / f".{result.key}.{os.getpid()}.tmp"
        image = io.BytesIO()
        with h5py.File(image, "w") as f:
            f.attrs["format"] = _FORMAT
            f.attrs["perturbation"] = result.perturbation
            f.attrs["key"] = result.key
            if self.fingerprint is not None:
                f.attrs["fingerprint"] = self.fingerprint
            if result.skip_reason is not None:
                f.attrs["skip_reason"] = result.skip_reason
            else:
                write_elem(f, "summary", _plain_dict(result.summary))
                f["gene_index"] = np.asarray(result.gene_index, dtype=np.int64)
                write_elem(f, "gene_values", {k: np.asarray(v) for k, v in result.gene_values.items()})
                f["guide_rows"] = np.asarray(result.guide_rows, dtype=np.int64)
                f["p_perturbed"] = np.asarray(result.p_perturbed, dtype=float)
                write_elem(f, "record", _plain_dict(result.record))
        write_bytes(tmp, image.getbuffer())
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
                if self.fingerprint is not None and f.attrs.get("fingerprint") != self.fingerprint:
                    raise InputError(f"{path} was made by another run (other settings or data) than the one "
                                     "reading it; delete it (or its whole store) and run again.")
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

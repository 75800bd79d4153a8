"""A run's output folder: checked before any fitting, filled atomically, marked complete last.

Layout of ``DIR`` after ``scotgm run ... --out DIR``:

``results.h5ad``
    The cells (``.obs`` with ``scotgm_p_perturbed`` and ``scotgm_class``), the genes, and the
    run's light results in ``.uns["scotgm"]`` (params, per-perturbation summary, skipped); no
    counts (the input file has them).
``responses.h5ad``
    Perturbation x gene AnnData (:func:`scotgm_pp.tl.get_responses`).
``gene_rankings.csv``
    The best-ranked genes of each perturbation (all genes on request).
``guide_fractions.csv``
    With guides assigned from guide counts: each guide's perturbed fraction
    (:func:`scotgm_pp.tl.guide_fractions`).
``records/``
    One file per perturbation with its full record (:func:`scotgm_pp.tl.get_record`).
``figures/``
    Screen-level figures, and per-perturbation figures for those asked for.
``summary.json``
    Written last: its presence marks a finished run.

While a run works, it holds ``DIR/.scotgm-lock`` (a second run into ``DIR`` is refused with
the first one's pid), and everything lives in ``DIR/.scotgm-run/``: the settings fingerprint,
one record file per finished perturbation (written atomically, under the fingerprint of the
settings and of the data read: :mod:`scotgm_pp._fingerprint`), and the outputs being written. A
killed run resumes from the perturbations it finished when the same command is run again on the
same data; other settings or data are refused with what changed, or discarded with
``--overwrite``. The outputs are moved into ``DIR`` only when all are complete, the previous
``summary.json`` is removed before any file of the previous run is replaced, and the new one
written last.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from anndata import AnnData

from ._fingerprint import canonical, describe_changes
from ._readers import read_screen
from ._validation import InputError

__all__ = ["RunFolder", "FolderLock", "OUTPUT_FILES", "run_summary", "write_rankings", "write_csv", "spreadsheet_safe",
           "write_h5ad", "write_bytes", "atomic_write_text", "read_results", "read_screen"]

WORK = ".scotgm-run"
LOCK = ".scotgm-lock"
MARKER = "summary.json"
OUTPUT_FILES = ("results.h5ad", "responses.h5ad", "gene_rankings.csv", "guide_fractions.csv", "records", "figures",
                MARKER)
TOP_GENES = 50
"""Genes per perturbation in ``gene_rankings.csv`` by default."""


def _plain(v):
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, Path):
        return str(v)
    return v


def write_bytes(path: Path, data) -> None:
    """Write ``data`` to ``path`` with plain file I/O; a partial file left by a failed write (a
    full disk) is removed before the error goes on."""
    try:
        Path(path).write_bytes(data)
    except OSError:
        Path(path).unlink(missing_ok=True)
        raise


MEMORY_IMAGE_MAX = 512 * 2**20
"""An ``.h5ad`` output whose arrays take at most this much is made in memory, then written with
plain file I/O (see :func:`write_h5ad`)."""


def _nbytes(obj) -> int:
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if hasattr(obj, "data") and hasattr(obj, "indptr"):  # scipy sparse
        return obj.data.nbytes + obj.indices.nbytes + obj.indptr.nbytes
    if isinstance(obj, (pd.DataFrame, pd.Series, pd.Index)):
        return int(np.sum(obj.memory_usage(deep=True)))
    if isinstance(obj, AnnData):
        parts = [obj.X, obj.obs, obj.var, obj.obs_names, obj.var_names, *obj.layers.values(), obj.uns]
        return sum(_nbytes(p) for p in parts if p is not None)
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 64


def write_h5ad(adata: AnnData, path: Path, compression: str | None = "gzip") -> None:
    """Write ``adata`` as ``.h5ad``, so that a full disk is one clean ``OSError`` (or an
    :class:`InputError` saying how much space is needed), never the HDF5 library failing on every
    later flush (tracebacks on stderr, then a crash at exit). Up to :data:`MEMORY_IMAGE_MAX`
    of arrays, the file is made in memory and written with plain file I/O; a larger one is
    written directly once the free space has been checked against its uncompressed size."""
    import h5py
    from anndata.io import write_elem

    path = Path(path)
    size = _nbytes(adata)
    if size <= MEMORY_IMAGE_MAX:
        image = io.BytesIO()
        with h5py.File(image, "w") as f:
            write_elem(f, "/", adata, dataset_kwargs={"compression": compression} if compression else {})
        write_bytes(path, image.getbuffer())
        return
    free = shutil.disk_usage(path.parent).free
    if free < size:
        raise InputError(f"not enough space for {path.name} in {path.parent}: {free / 2**20:,.0f} MiB free, up to "
                         f"{size / 2**20:,.0f} MiB needed; free some space (or choose another --out) and rerun the "
                         "same command to resume.")
    adata.write_h5ad(path, compression=compression)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write_bytes(tmp, text.encode())
    os.replace(tmp, path)


class FolderLock:
    """An exclusive lock on a run folder (``DIR/.scotgm-lock``, holding the owner's pid), held
    while a run works in it. The operating system releases it when the process ends, however it
    ends (``kill -9`` included), so a lock is never left behind."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self, busy: str) -> None:
        """Take the lock, or raise :class:`InputError` (``busy`` with the owner's pid) when
        another process holds it."""
        while self._fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if not _try_lock(fd):
                owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise InputError(busy.format(pid=owner))
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:  # removed by a run finishing between our open and lock
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            self._fd = fd

    def release(self) -> None:
        """Remove the lock file and let go (nothing when not held)."""
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None


def _try_lock(fd: int) -> bool:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


@dataclass
class RunFolder:
    """The output folder of one run, validated up front.

    Parameters
    ----------
    out
        The folder.
    fingerprint
        The settings that identify the run (the settings that change a result, the layer, the
        package version, the perturbations): an unfinished run with the same ones is resumed,
        another one is refused unless ``overwrite``. The data read is checked later, by the
        record store's fingerprint (:meth:`scotgm_pp.tl._store.RecordStore.bind`).
    inputs
        Files the run reads; none of them may be an output path.
    overwrite
        Replace a finished run (or an unfinished run of other settings) in ``out``; an
        unfinished run of the same settings is resumed all the same.
    command
        The command making the run (``"run"`` or ``"demo"``), recorded in the marker; a demo
        replaces an earlier demo's outputs without ``overwrite``.
    """

    out: Path
    fingerprint: dict
    inputs: tuple = ()
    overwrite: bool = False
    command: str = "run"

    def __post_init__(self):
        self.out = Path(self.out)
        self.work = self.out / WORK
        self.resumed = 0
        self.discard = False
        self.lock = FolderLock(self.out / LOCK)

    # ------------------------------------------------------------------ checks
    def check(self) -> None:
        """Check the location before any work and lock it: a usable, writable folder, no other
        run working in it, no finished run (unless ``overwrite``), no unfinished run of other
        settings (unless ``overwrite``: then it is discarded at :meth:`claim`), and no input among
        the outputs. Raises :class:`InputError`; the caller calls :meth:`release` in the end."""
        out = self.out
        for parent in [out, *out.parents]:
            if parent.exists() and not parent.is_dir():
                raise InputError(f"cannot write outputs under {out}: {parent} is a file, not a folder.")
        outputs = {(out / name).resolve() for name in OUTPUT_FILES}
        for src in self.inputs:
            src = Path(src).resolve()
            if src in outputs or any(p in outputs for p in src.parents):
                raise InputError(f"the input {src} lies where the run writes its outputs; move it or choose another --out.")
        self._created = not out.exists()
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / f".scotgm-probe-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as err:
            raise InputError(f"cannot write to {out}: {err.strerror or err}. Choose a writable --out.") from err
        self.lock.acquire(f"{out} is in use: a scotgm run into it is already running (pid {{pid}}); wait for it to "
                          "finish, or choose another --out.")
        try:
            self._check_runs()
        except BaseException:
            self.release()
            raise

    def _check_runs(self) -> None:
        out = self.out
        finished = (out / MARKER).exists()
        if finished and self.command == "demo" and self._previous_command() == "demo":
            self.overwrite = True
        if finished and not self.overwrite:
            raise InputError(f"{out} holds a finished run ({MARKER}); pass --overwrite to replace it, or choose "
                             "another --out.")
        if not (self.work / "run.json").exists():
            self.discard = self.work.exists()  # a work folder that was never claimed
            return
        try:
            previous = json.loads((self.work / "run.json").read_text())
        except (OSError, ValueError):
            previous = {"unreadable": True}
        if previous != canonical(self.fingerprint):
            if not self.overwrite:
                raise InputError(f"{out} holds an unfinished run with other settings (changed: "
                                 f"{describe_changes(previous, self.fingerprint)}); pass --overwrite to discard it, "
                                 "or choose another --out.")
            self.discard = True

    def claim(self) -> None:
        """Start (or resume) the run in the folder: the work folder and its fingerprint."""
        if self.discard and self.work.exists():
            shutil.rmtree(self.work)
        self.work.mkdir(exist_ok=True)
        atomic_write_text(self.work / "run.json", json.dumps(canonical(self.fingerprint), indent=1, sort_keys=True))

    def release(self) -> None:
        """Let other runs into the folder (and remove it when this run made it and left it empty,
        e.g. refused before any work)."""
        self.lock.release()
        if getattr(self, "_created", False):
            try:
                self.out.rmdir()
            except OSError:
                pass

    def _previous_command(self) -> str | None:
        try:
            return json.loads((self.out / MARKER).read_text()).get("command")
        except (OSError, ValueError, AttributeError):
            return None

    @property
    def records(self) -> Path:
        return self.work / "records"

    # ---------------------------------------------------------------- finishing
    def finish(self, staged: dict[str, Path], summary: dict) -> dict[str, Path]:
        """Move the staged outputs (name -> path inside the work folder) into place, then write
        the marker. The previous run's marker is removed before any of its files is replaced."""
        out = self.out
        (out / MARKER).unlink(missing_ok=True)
        final = {}
        for name, src in staged.items():
            dst = out / name
            if dst.is_dir() and not dst.is_symlink():
                shutil.rmtree(dst)
            elif dst.exists() or dst.is_symlink():
                dst.unlink()
            os.replace(src, dst)
            final[name] = dst
        for name in OUTPUT_FILES:  # outputs of an earlier run that this run does not make
            stale = out / name
            if name not in staged and name != MARKER and stale.exists():
                shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
        summary = {**summary, "command": self.command, "outputs": sorted([*final, MARKER]),
                   "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        atomic_write_text(out / MARKER, json.dumps(summary, indent=2, default=_plain))
        final[MARKER] = out / MARKER
        shutil.rmtree(self.work, ignore_errors=True)
        return final


FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
"""First characters that make a spreadsheet read a cell as a formula (OWASP, CSV injection)."""


def spreadsheet_safe(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with every text cell that a spreadsheet would run as a formula (one starting
    with ``= + - @``, a tab or a carriage return, e.g. a label ``=cmd|' /C calc'!A0``) prefixed
    with a single quote, as OWASP advises; numeric columns are left as they are, so numbers stay
    numbers. A copy when anything changes; the exact labels stay in the ``.h5ad`` outputs."""
    out = table
    for name in table.columns:
        column = table[name]
        if pd.api.types.is_numeric_dtype(column) or pd.api.types.is_bool_dtype(column):
            continue
        text = column.astype(object)
        risky = text.map(lambda v: isinstance(v, str) and v.startswith(FORMULA_START)).to_numpy(bool)
        if risky.any():
            out = out.copy() if out is table else out
            out[name] = text.where(~risky, "'" + text.astype(str))
    return out


def write_csv(table: pd.DataFrame, path: Path) -> None:
    """``table`` as CSV without its index, spreadsheet-safe (:func:`spreadsheet_safe`)."""
    spreadsheet_safe(table).to_csv(path, index=False)


def write_rankings(rankings, path: Path) -> None:
    """The ranking table as CSV (written to ``path`` directly: ``path`` is a staging location)."""
    write_csv(rankings, path)


def run_summary(adata: AnnData, key: str = "scotgm") -> dict:
    """JSON-ready summary of :func:`scotgm_pp.tl.perturbation_response` results.

    Per perturbation: its safe key, cells used, PCs kept and variance explained, the KS check,
    EM iterations and convergence, how guide cells were assigned (escape model, and why it fell
    back when it did), the coupling (and its diagnostics), the fraction of guide cells called
    perturbed and, when the perturbation's label is a measured gene, that gene's rank. Over the
    screen: how many perturbations had their escape model fitted, how many fell back to "every
    guide cell perturbed" (and their share), by reason.
    """
    uns = adata.uns[key]
    summary = uns["summary"]
    per = {str(p): {k: _plain(v) for k, v in row.items() if not (isinstance(v, float) and np.isnan(v))}
           for p, row in summary.iterrows()}
    skipped = uns["skipped"]
    status = summary["escape_model"].astype(str) if "escape_model" in summary else pd.Series(dtype=str)
    fallback = status.str.startswith("fallback")
    return {
        "params": json.loads(json.dumps(uns["params"], default=_plain)),
        "n_perturbations_analysed": len(per),
        "n_perturbations_skipped": int(len(skipped)),
        "escape_model": {
            "fitted": int((status == "on").sum()),
            "fallback": int(fallback.sum()),
            "fallback_share": float(fallback.mean()) if len(status) else float("nan"),
            "fallback_reasons": {str(r): int(n) for r, n in status[fallback].value_counts().items()},
        },
        "perturbations": per,
        "skipped": {str(p): str(r) for p, r in zip(skipped["perturbation"], skipped["reason"])},
        "cells": {str(k): int(v) for k, v in adata.obs[f"{key}_class"].value_counts().items()},
    }


def read_results(out: str | os.PathLike, key: str = "scotgm") -> AnnData:
    """Read a finished ``scotgm run`` (or ``scotgm demo``) back as the analysed screen.

    Parameters
    ----------
    out
        The run's output folder (``--out``).
    key
        ``key_added`` of the run (``scotgm`` for the command line).

    Returns
    -------
    anndata.AnnData
        ``DIR/results.h5ad`` with the responses (``DIR/responses.h5ad``) back in
        ``.uns[key]["responses"]`` and the record store pointed at ``DIR/records`` (wherever the
        folder now lives), so every getter of :mod:`scotgm_pp.tl` works on it:
        ``get_responses``, ``get_rankings``, ``get_record``, ``get_model``, ``call_hits``,
        ``guide_fractions``, ``to_rank_genes_groups``. It holds no counts (the input file has
        them).
    """
    import anndata as ad

    out = Path(out)
    if not out.is_dir():
        raise InputError(f"{out} is not a folder; give the --out folder of a finished scotgm run.")
    if not (out / MARKER).exists():
        state = "an unfinished run (rerun the same command to finish it)" if (out / WORK).exists() else "no run"
        raise InputError(f"{out} holds {state}: {MARKER}, written last by scotgm run, is missing.")
    missing = [name for name in ("results.h5ad", "responses.h5ad", "records") if not (out / name).exists()]
    if missing:
        raise InputError(f"{out} lacks {missing} of a finished run; rerun scotgm run with --overwrite.")
    results = ad.read_h5ad(out / "results.h5ad")
    if key not in results.uns or "summary" not in results.uns[key]:
        raise InputError(f"{out / 'results.h5ad'} has no results under .uns[{key!r}]; its keys: {list(results.uns)}.")
    responses = ad.read_h5ad(out / "responses.h5ad")
    store = str((out / "records").resolve())
    results.uns[key]["params"]["store"] = store
    responses.uns["params"]["store"] = store
    results.uns[key]["responses"] = responses
    return results

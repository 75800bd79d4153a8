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

While a run works, everything lives in ``DIR/.scotgm-run/``: the settings fingerprint, one
record file per finished perturbation (written atomically), and the outputs being written. A
killed run resumes from the perturbations it finished when the same command is run again. The
outputs are moved into ``DIR`` only when all are complete, the previous ``summary.json`` is
removed before any file of the previous run is replaced, and the new one written last.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from anndata import AnnData

from ._readers import read_screen
from ._validation import InputError

__all__ = ["RunFolder", "OUTPUT_FILES", "run_summary", "write_rankings", "atomic_write_text", "read_results",
           "read_screen"]

WORK = ".scotgm-run"
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


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass
class RunFolder:
    """The output folder of one run, validated up front.

    Parameters
    ----------
    out
        The folder.
    fingerprint
        What identifies the run (settings, input, perturbations): an unfinished run with the
        same fingerprint is resumed, another one is refused unless ``overwrite``.
    inputs
        Files the run reads; none of them may be an output path.
    overwrite
        Replace a finished run (or an unfinished run of other settings) in ``out``.
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

    # ------------------------------------------------------------------ checks
    def check(self) -> None:
        """Check the location before any work: a usable folder, no finished run (unless
        ``overwrite``), no unfinished run of other settings, no input among the outputs, and
        write access. Raises :class:`InputError`."""
        out = self.out
        for parent in [out, *out.parents]:
            if parent.exists() and not parent.is_dir():
                raise InputError(f"cannot write outputs under {out}: {parent} is a file, not a folder.")
        outputs = {(out / name).resolve() for name in OUTPUT_FILES}
        for src in self.inputs:
            src = Path(src).resolve()
            if src in outputs or any(p in outputs for p in src.parents):
                raise InputError(f"the input {src} lies where the run writes its outputs; move it or choose another --out.")
        finished = (out / MARKER).exists()
        unfinished = (self.work / "run.json").exists()
        if finished and self.command == "demo" and self._previous_command() == "demo":
            self.overwrite = True
        if finished and not self.overwrite:
            raise InputError(f"{out} holds a finished run ({MARKER}); pass --overwrite to replace it, or choose "
                             "another --out.")
        if unfinished and not self.overwrite:
            try:
                previous = json.loads((self.work / "run.json").read_text())
            except (OSError, ValueError):
                previous = None
            if previous != self._fingerprint_json():
                raise InputError(f"{out} holds an unfinished run with other settings or input ({WORK}/run.json); "
                                 "pass --overwrite to discard it, or choose another --out.")
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / f".scotgm-probe-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as err:
            raise InputError(f"cannot write to {out}: {err.strerror or err}. Choose a writable --out.") from err

    def claim(self) -> None:
        """Start (or resume) the run in the folder: the work folder and its fingerprint."""
        if self.overwrite and self.work.exists():
            shutil.rmtree(self.work)
        self.work.mkdir(exist_ok=True)
        atomic_write_text(self.work / "run.json", json.dumps(self._fingerprint_json(), indent=1))

    def _previous_command(self) -> str | None:
        try:
            return json.loads((self.out / MARKER).read_text()).get("command")
        except (OSError, ValueError, AttributeError):
            return None

    def _fingerprint_json(self) -> dict:
        return json.loads(json.dumps(self.fingerprint, default=_plain, sort_keys=True))

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


def input_fingerprint(path: str | os.PathLike) -> dict:
    """Name, size and modification time of an input file (a changed input is a different run)."""
    st = Path(path).stat()
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def settings_digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, default=_plain, sort_keys=True).encode()).hexdigest()[:16]


def write_rankings(rankings, path: Path) -> None:
    """The ranking table as CSV (written to ``path`` directly: ``path`` is a staging location)."""
    rankings.to_csv(path, index=False)


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

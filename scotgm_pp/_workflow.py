"""A whole run into an output folder (what ``scotgm run`` and ``scotgm demo`` do)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pandas as pd
from anndata import AnnData

from . import __version__
from ._screen import MemoryRows, Screen
from ._fingerprint import digest_strings
from ._guide_assign import GUIDE_COLUMNS
from ._validation import InputError
from .io import TOP_GENES, RunFolder, run_summary, write_csv, write_h5ad, write_rankings
from .tl._plan import RunSettings
from .tl._response import (
    annotate,
    execute_plan,
    get_rankings,
    plan_screen,
    start_workers,
)
from .tl._store import RecordStore

__all__ = ["run_to_folder"]


def run_to_folder(
    screen: Screen,
    settings: RunSettings,
    out: str | Path,
    *,
    perturbations=None,
    overwrite: bool = False,
    n_jobs: int | None = None,
    client=None,
    progress: bool = True,
    figures=(),
    figures_top: int = 0,
    top_genes: int | None = TOP_GENES,
    key: str = "scotgm",
    de_genes: dict | None = None,
    command: str = "run",
    guide_assignment: dict | None = None,
) -> tuple[AnnData, dict[str, Path]]:
    """Check and lock ``out``, fit every perturbation (resuming an interrupted run of the same
    settings and data), and write the outputs atomically (see :mod:`scotgm_pp.io`). Returns the
    results AnnData and the paths written. ``client`` as in
    :func:`~scotgm_pp.tl.perturbation_response`; a scheduler address is connected to before
    the folder is claimed (:func:`~scotgm_pp._workers.connect_scheduler`).

    ``guide_assignment`` is the record of :func:`scotgm_pp.pp.assign_guides` when the screen's
    labels were assigned from guide counts: it is kept in ``results.uns["guide_assignment"]``,
    counted in ``summary.json`` (``guides``), and each guide's perturbed fraction goes to
    ``guide_fractions.csv``."""
    inputs = (screen.source,) if screen.source else ()
    fingerprint = {
        "scotgm_pp": __version__,
        "settings": settings.to_dict(),
        "layer": screen.layer,
        "perturbations": None if perturbations is None else [str(p) for p in perturbations],
    }
    if guide_assignment is not None:  # other guide calls are other labels: never resumed across them
        calls = screen.obs[list(GUIDE_COLUMNS[:3])].astype(str).to_numpy().ravel()
        fingerprint["guides"] = {**guide_assignment["params"], "calls": digest_strings(calls)}
    folder = RunFolder(Path(out), fingerprint, inputs=inputs, overwrite=overwrite, command=command)
    folder.check()
    try:
        return _run_in_folder(folder, screen, settings, perturbations=perturbations, n_jobs=n_jobs, client=client,
                              progress=progress, figures=figures, figures_top=figures_top, top_genes=top_genes,
                              key=key, de_genes=de_genes, guide_assignment=guide_assignment)
    finally:
        folder.release()


def _check_figures(plan, figures) -> None:
    """Every perturbation named for figures is one this run can draw, before any fit."""
    planned = {t.perturbation: t.skip_reason for t in plan.tasks}
    unknown = [str(p) for p in figures if str(p) not in planned]
    if unknown:
        shown = ", ".join(map(repr, plan.perturbations[:10])) + (" ..." if len(plan.perturbations) > 10 else "")
        raise InputError(f"figures were asked for {', '.join(map(repr, unknown[:5]))}, which this run does not "
                         f"analyse; name perturbations of the run ({shown}).")
    skipped = [(str(p), planned[str(p)]) for p in figures if planned[str(p)] is not None]
    if skipped:
        raise InputError(f"figures were asked for {skipped[0][0]!r}, which cannot be analysed: {skipped[0][1]}.")


def _run_in_folder(folder: RunFolder, screen: Screen, settings: RunSettings, *, perturbations, n_jobs, client,
                   progress, figures, figures_top, top_genes, key, de_genes,
                   guide_assignment=None) -> tuple[AnnData, dict[str, Path]]:
    own_client = None
    if isinstance(client, str):
        from ._workers import connect_scheduler

        client = own_client = connect_scheduler(client)
    # local workers start in the background while the plan is made
    workers = start_workers(screen, settings, perturbations, n_jobs=n_jobs, client=client)
    try:
        plan = plan_screen(screen, settings, perturbations)
        _check_figures(plan, figures)
        folder.claim()
        store = RecordStore(folder.records)
        store.bind(plan.fingerprint(), replace=folder.overwrite,
                   fix="pass --overwrite to discard them, or choose another --out")
        done_before = len(store.keys())
        if done_before and progress:
            print(f"resuming: {done_before} perturbation(s) already finished in {folder.work}")
        run = execute_plan(plan, n_jobs=n_jobs, client=client if workers is None else workers, store=store,
                           progress=progress)
    finally:
        if workers is not None:
            workers.close()
        if own_client is not None:
            own_client.close()
    results = AnnData(obs=screen.obs.copy(), var=pd.DataFrame(index=screen.var_names))
    annotate(results, run, key)
    stage = folder.work / "out"
    stage.mkdir(exist_ok=True)
    staged = {"records": folder.records, "figures": stage / "figures"}
    if guide_assignment is not None:
        from .tl._guides import guide_fractions

        results.uns["guide_assignment"] = guide_assignment
        staged["guide_fractions.csv"] = stage / "guide_fractions.csv"
        write_csv(guide_fractions(results, "guide", key), staged["guide_fractions.csv"])
    counts_at_hand = isinstance(screen.rows, MemoryRows)  # then figures may show observed changes
    figure_data = results
    if counts_at_hand:
        figure_data = AnnData(X=screen.rows.X, obs=results.obs, var=results.var, uns=results.uns)
    from . import pl

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pl.save_run_figures(figure_data, key, staged["figures"], perturbations=list(figures), top=figures_top,
                            de_genes=de_genes, observed=counts_at_hand)
    staged["gene_rankings.csv"] = stage / "gene_rankings.csv"
    write_rankings(get_rankings(results, key, top=top_genes), staged["gene_rankings.csv"])
    final_records = str((folder.out / "records").resolve())
    results.uns[key]["params"]["store"] = final_records
    responses = results.uns[key].pop("responses")
    responses.uns["params"]["store"] = final_records
    staged["responses.h5ad"] = stage / "responses.h5ad"
    write_h5ad(responses, staged["responses.h5ad"])
    staged["results.h5ad"] = stage / "results.h5ad"
    write_h5ad(results, staged["results.h5ad"])
    results.uns[key]["responses"] = responses
    summary = run_summary(results, key)
    summary["resumed_perturbations"] = done_before
    if guide_assignment is not None:
        # cells with several guides have no target: a low-MOI run leaves them out, counted here
        summary["guides"] = {**guide_assignment["params"], **guide_assignment["counts"]}
    paths = folder.finish(staged, summary)
    return results, paths

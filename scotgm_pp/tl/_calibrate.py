"""Calibration check on a user's own data: null pseudo-perturbations made of control cells.

A null set is a group of control cells treated as if it carried a guide: random control cells
(as many as a real perturbation has), or, when guide identities are given, the cells of one
non-targeting guide. Each null set meets its own sample of the *other* control cells and goes
through the full pipeline (:func:`~scotgm_pp.tl._execute.run_task`, the function every real
perturbation goes through). Nothing should be found: the share of p-values below 0.05 should be
0.05, and Benjamini-Hochberg at level ``fdr`` should make a discovery in about ``fdr`` of the sets.
scanpy's Wilcoxon and t-test run on the same cells for comparison.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scanpy as sc
from anndata import AnnData

from .._labels import label_key
from .._screen import scan_counts, screen_from_anndata
from .._validation import InputError
from ..pp import normalize_log, resolve_min_genes
from ._calls import bh_qvalues
from ._execute import ScreenContext, TaskPayload, assemble_counts, map_tasks, run_task
from ._plan import MIN_CELLS, N_CONTROL_CELLS, Task, sample_controls, screen_labels, task_seed
from ._response import _batch_labels, _Payloads, _settings

__all__ = ["calibration_check", "CalibrationResult", "BASELINES"]

BASELINES = ("wilcoxon", "t-test")


@dataclass
class CalibrationResult:
    """Outcome of :func:`calibration_check`.

    Attributes
    ----------
    table
        One row per method: ``n_sets``, ``n_tests``, ``frac_p_below_0.05``, ``frac_p_below_0.01``,
        ``sets_with_discovery`` (BH within the set, q below ``fdr``) and ``false_discoveries``
        (BH over every test of every set).
    sets
        One row per null set: its cells, and for scotgm its "any effect" p-value.
    pvalues
        Method -> every p-value of every null set.
    settings
        The arguments.
    """

    table: pd.DataFrame
    sets: pd.DataFrame
    pvalues: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)


@dataclass
class _NullContext:
    screen: ScreenContext
    preprocess: object
    baselines: tuple


def _null_task(payload: TaskPayload, ctx: _NullContext) -> dict:
    """One null set through the pipeline, then through scanpy's tests on the same cells."""
    result = run_task(payload, ctx.screen)
    out = {"name": payload.task.perturbation, "n_cells": int(payload.task.guide_rows.size),
           "n_controls": int(payload.task.control_rows.size), "skip_reason": result.skip_reason}
    if result.skip_reason is None:
        out["scotgm"] = np.asarray(result.gene_values["pval"], float)
        out["pval_any"] = float(result.summary["pval_any"])
        if "effect_pvalue" in result.gene_values:
            out["model-wald"] = np.asarray(result.gene_values["effect_pvalue"], float)
    if ctx.baselines:
        counts = AnnData(X=assemble_counts(payload, ctx.screen), obs=pd.DataFrame(index=pd.Index(payload.obs_names, dtype=object)),
                         var=pd.DataFrame(index=pd.Index(ctx.screen.var_names, dtype=object)))
        ln, _ = normalize_log(counts, ctx.preprocess, highly_variable=False)
        kept = pd.Index(payload.obs_names).get_indexer(ln.obs_names)
        ln.obs["group"] = pd.Categorical(np.where(payload.is_control[kept], "control", "null"))
        for method in ctx.baselines:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sc.tl.rank_genes_groups(ln, "group", groups=["null"], reference="control", method=method,
                                        n_genes=ln.n_vars, use_raw=False, key_added="null")
            out[method] = sc.get.rank_genes_groups_df(ln, group="null", key="null")["pvals"].to_numpy(float)
    return out


def calibration_check(
    adata: AnnData,
    perturbation_key: str,
    control: str,
    *,
    n_null: int = 50,
    null_size: int | None = None,
    guide_key: str | None = None,
    n_control_cells: int = N_CONTROL_CELLS,
    batch_key: str | None = None,
    fdr: float = 0.1,
    baselines=BASELINES,
    random_state: int = 0,
    n_jobs: int | None = 1,
    client=None,
    progress: bool = False,
    **settings,
) -> CalibrationResult:
    """Run the pipeline on null pseudo-perturbations built from control cells and measure how
    often it finds something (see the module's description).

    Parameters
    ----------
    adata
        The screen (raw counts).
    perturbation_key, control
        The label column and the control label.
    n_null
        Null sets of random control cells (ignored with ``guide_key``).
    null_size
        Cells per null set; default the median size of the screen's real perturbations.
    guide_key
        ``.obs`` column of guide identities: each control guide's cells form a null set, against
        the other control guides' cells.
    n_control_cells
        Controls each null set is compared with (drawn from the controls outside the set).
    batch_key
        As in :func:`~scotgm_pp.tl.perturbation_response` (strata of the tests and the samples).
    fdr
        Level of the Benjamini-Hochberg discoveries counted.
    baselines
        scanpy ``rank_genes_groups`` methods run on the same cells (``()`` for none).
    random_state
        Seed of the null sets and of everything downstream.
    n_jobs, client
        Parallel map, as in :func:`~scotgm_pp.tl.perturbation_response`.
    **settings
        Any other setting of :func:`~scotgm_pp.tl.perturbation_response` (``coupling``,
        ``n_pcs``, ``params``, ``n_resamples``...).
    """
    for b in baselines:
        if b not in BASELINES:
            raise InputError(f"unknown baseline {b!r}; choose from {', '.join(BASELINES)}.")
    if isinstance(fdr, bool) or not isinstance(fdr, (int, float, np.number)) or not 0 < fdr < 1:
        raise InputError(f"fdr must be a number in (0, 1), got {fdr!r}.")
    run_settings = _settings(perturbation_key, control, params=settings.pop("params", None),
                             n_pcs=settings.pop("n_pcs", None),
                             variance_threshold=settings.pop("variance_threshold", None),
                             batch_key=batch_key, n_control_cells=n_control_cells, random_state=random_state,
                             **settings)
    screen = screen_from_anndata(adata)
    labels = screen_labels(screen.obs, perturbation_key, control)
    batch = _batch_labels(screen.obs, batch_key)
    scan = scan_counts(screen.rows, labels.control_mask, batch, what=screen.what)
    usable = (scan.n_detected >= resolve_min_genes(run_settings.preprocess, len(screen.var_names))) & (
        scan.library_size > 0)
    controls = np.flatnonzero(labels.control_mask & usable)
    rng = np.random.default_rng(random_state)
    if guide_key is not None:
        if guide_key not in screen.obs.columns:
            raise InputError(f"guide_key {guide_key!r} is not a column of adata.obs.")
        guides = screen.obs[guide_key].astype(str).to_numpy()
        groups = {f"null_{g}": controls[guides[controls] == g] for g in sorted(set(guides[controls]))}
        groups = {k: v for k, v in groups.items() if v.size >= MIN_CELLS}
        if len(groups) < 2:
            raise InputError(f"fewer than 2 control guides in adata.obs[{guide_key!r}] have {MIN_CELLS} cells.")
    else:
        if null_size is None:
            sizes = pd.Series(labels.labels[~labels.control_mask & ~labels.unassigned]).value_counts()
            null_size = int(np.median(sizes)) if len(sizes) else 60
        null_size = int(null_size)
        if null_size < MIN_CELLS or null_size + MIN_CELLS > controls.size:
            raise InputError(f"null_size must be between {MIN_CELLS} and {controls.size - MIN_CELLS} "
                             f"(the screen has {controls.size} usable control cells), got {null_size}.")
        if isinstance(n_null, bool) or not isinstance(n_null, (int, np.integer)) or n_null < 1:
            raise InputError(f"n_null must be a positive integer, got {n_null!r}.")
        groups = {f"null_{i:03d}": np.sort(rng.choice(controls, null_size, replace=False)) for i in range(n_null)}
    tasks = []
    for name, rows in groups.items():
        others = np.setdiff1d(controls, rows)
        if guide_key is not None:
            others = others[guides[others] != name[len("null_"):]]
        seed = task_seed(random_state, name)
        ctrl, reason = sample_controls(others, None if batch is None else batch[rows],
                                       None if batch is None else batch[others], n_control_cells,
                                       np.random.default_rng(seed))
        tasks.append(Task(perturbation=name, key=label_key(name), seed=seed, guide_rows=rows, control_rows=ctrl,
                          n_guide_labelled=int(rows.size), skip_reason=reason))
    todo = [t for t in tasks if t.skip_reason is None]
    if not todo:
        raise InputError(f"no null set could be built: {tasks[0].skip_reason}")
    pool = np.unique(np.concatenate([t.control_rows for t in todo]))
    payloads = _Payloads(screen, batch, pool, scan.n_detected)
    ctx = _NullContext(screen=payloads.context(ScreenContext(settings=run_settings,
                                                             var_names=screen.var_names.to_numpy(),
                                                             dispersion=scan.task_dispersion(
                                                                 run_settings.dispersion_per_batch),
                                                             count_cap=scan.count_cap)),
                       preprocess=run_settings.preprocess, baselines=tuple(baselines))
    outs: list[dict] = []
    map_tasks(todo, payloads, ctx, outs.append, fn=_null_task, n_jobs=n_jobs, client=client,
              progress=progress, desc="null sets")
    outs.sort(key=lambda o: o["name"])
    methods = ["scotgm", *(["model-wald"] if any("model-wald" in o for o in outs) else []), *baselines]
    pvalues = {m: [o[m] for o in outs if m in o] for m in methods}
    rows = []
    for m in methods:
        sets = pvalues[m]
        allp = np.concatenate(sets) if sets else np.array([])
        allp = allp[np.isfinite(allp)]
        rows.append({
            "method": m,
            "n_sets": len(sets),
            "n_tests": int(allp.size),
            "frac_p_below_0.05": float(np.mean(allp < 0.05)) if allp.size else np.nan,
            "frac_p_below_0.01": float(np.mean(allp < 0.01)) if allp.size else np.nan,
            "sets_with_discovery": int(sum(np.any(bh_qvalues(p) < fdr) for p in sets)),
            "false_discoveries": int(np.sum(bh_qvalues(allp) < fdr)) if allp.size else 0,
        })
    table = pd.DataFrame(rows)
    sets = pd.DataFrame([{k: o.get(k) for k in ("name", "n_cells", "n_controls", "pval_any", "skip_reason")}
                         for o in outs])
    flat = {m: (np.concatenate(v) if v else np.array([])) for m, v in pvalues.items()}
    return CalibrationResult(table=table, sets=sets, pvalues=flat,
                             settings={"n_null": len(groups), "null_size": null_size, "guide_key": guide_key,
                                       "n_control_cells": n_control_cells, "batch_key": batch_key, "fdr": fdr,
                                       "random_state": random_state, **run_settings.to_dict()})

"""The screen driver: plan -> map -> collect over the perturbations of a screen.

* plan (:mod:`._plan`): validate the settings and labels; one pass over every cell checks the
  raw counts and computes each cell's library size, detected genes and the controls'
  dispersion; each perturbation becomes a task naming its guide cells and a bounded, seeded
  sample of controls.
* map (:mod:`._execute`): every task reads only its own cells and is fitted by
  :func:`~scotgm_pp.tl.analyse_pair`, in this process or on Dask workers.
* collect (:mod:`._collect`): gene-level numbers into perturbation x gene arrays, posteriors
  into one column, heavy records into a store on disk or a dict.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
from anndata import AnnData

from .. import __version__
from .._fingerprint import ContentDigest, digest_strings, fingerprint_id
from .._screen import H5adRows, Screen, scan_counts, screen_from_anndata
from .._validation import InputError, check_library_sizes
from .._workers import LocalWorkers
from ..inference.count_layer import BatchDispersion
from ..pp import PreprocessParams, resolve_min_genes
from ._collect import Collector
from ._core import DEFAULT_RANK_BY, DEFAULT_STATE_SPACE
from ._execute import (
    ScreenContext,
    TaskPayload,
    TaskResult,
    map_tasks,
    read_counts,
    resolve_workers,
    screen_order,
)
from ._plan import (
    MIN_CELLS,
    N_CONTROL_CELLS,
    RunSettings,
    Task,
    make_tasks,
    resolve_perturbations,
    screen_labels,
)
from ._store import RecordStore

__all__ = [
    "perturbation_response",
    "run_screen",
    "plan_screen",
    "execute_plan",
    "start_workers",
    "ScreenPlan",
    "ScreenRun",
    "get_responses",
    "get_rankings",
    "get_record",
    "MIN_CELLS",
]


@dataclass
class ScreenRun:
    """A finished run: its settings, the collected results and the cells' labels."""

    settings: RunSettings
    perturbations: list[str]
    collector: Collector
    store: RecordStore | None
    n_control_total: int
    count_cap: np.ndarray | None = None
    dispersion: np.ndarray | None = None
    dispersion_by_batch: BatchDispersion | None = None

    def params(self) -> dict:
        out = self.settings.to_dict()
        out["perturbations"] = list(self.perturbations)
        if self.store is not None:
            out["store"] = str(self.store.path.resolve())
            out["store_fingerprint"] = self.store.fingerprint
        return out


def _batch_labels(obs: pd.DataFrame, batch_key: str | None) -> np.ndarray | None:
    if batch_key is None:
        return None
    if batch_key not in obs.columns:
        raise InputError(f"batch_key {batch_key!r} is not a column of adata.obs; columns: "
                         f"{list(obs.columns)[:20]}. Pass batch_key=None to fit without batches.")
    column = obs[batch_key]
    if column.isna().any():
        raise InputError(f"adata.obs[{batch_key!r}] has missing values; label every cell's batch.")
    return column.astype(str).to_numpy()


POOL_MAX_BYTES = 2**30
"""The control cells the tasks sample are read once into memory (and sent once to each worker)
when they take at most this much (estimated from their detected genes); otherwise each task
reads its own."""


class _Payloads:
    """Reads one task's cells. The control cells the tasks sample are read once into a pool (when
    they fit in :data:`POOL_MAX_BYTES`) that travels with the run's context, once per worker;
    each task then carries only its guide cells. Otherwise each task carries all its cells.
    With ``in_workers`` (a screen read from a file, and workers that see it) the tasks carry only
    their row numbers, and each worker reads its tasks' cells from the file (the context's
    ``rows``): this process then does no reading or sending of counts while the workers fit."""

    def __init__(self, screen: Screen, batch: np.ndarray | None, pool_rows: np.ndarray,
                 n_detected: np.ndarray | None = None, *, in_workers: bool = False):
        self.screen = screen
        self.batch = batch
        # fixed-width strings: pickled as one buffer, not one object per cell
        self.obs_names = screen.obs_names.to_numpy().astype(str)
        self.in_workers = bool(in_workers) and isinstance(screen.rows, H5adRows)
        self.pool = None
        self.pool_pos = None
        size = 12.0 * (float(n_detected[pool_rows].sum()) if n_detected is not None else 0.0)
        if pool_rows.size and size <= POOL_MAX_BYTES:
            self.pool = screen.rows.read(pool_rows)
            self.pool_pos = np.full(screen.n_obs, -1, dtype=np.int64)
            self.pool_pos[pool_rows] = np.arange(pool_rows.size)

    def context(self, context: ScreenContext) -> ScreenContext:
        """``context`` with the control pool (and, reading in the workers, the file) attached."""
        return replace(context, control_pool=self.pool, pool_pos=self.pool_pos,
                       rows=self.screen.rows if self.in_workers else None)

    def __call__(self, task: Task) -> TaskPayload:
        rows, order = screen_order(task)
        counts = guide = None
        if not self.in_workers:
            if self.pool is None:
                counts = read_counts(task, self.screen.rows)
            else:
                guide = self.screen.rows.read(task.guide_rows)
        return TaskPayload(task=task, counts=counts, guide_counts=guide, obs_names=self.obs_names[rows],
                           is_control=order >= task.guide_rows.size,
                           batch=None if self.batch is None else self.batch[rows])


@dataclass
class ScreenPlan:
    """Everything decided before any fitting: settings, labels, tasks, the controls' dispersion."""

    screen: Screen
    settings: RunSettings
    perturbations: list[str]
    labels: object
    batch: np.ndarray | None
    tasks: list[Task]
    dispersion: np.ndarray | None
    n_control_total: int
    n_detected: np.ndarray | None = None
    content: dict | None = None
    count_cap: np.ndarray | None = None
    dispersion_by_batch: BatchDispersion | None = None

    @property
    def task_dispersion(self) -> np.ndarray | BatchDispersion | None:
        """What the tasks' count layers read (:meth:`~scotgm_pp._screen.CountScan.task_dispersion`)."""
        return self.dispersion if self.dispersion_by_batch is None else self.dispersion_by_batch

    def fingerprint(self) -> dict:
        """What every record of this plan depends on: the settings, the layer, the package
        version and the content read (:mod:`scotgm_pp._fingerprint`)."""
        return {"scotgm_pp": __version__, "settings": self.settings.to_dict(), "layer": self.screen.layer,
                "input": self.content}


def plan_screen(screen: Screen, settings: RunSettings, perturbations=None) -> ScreenPlan:
    """Validate labels and batches, make the one pass over every cell (raw-count check, library
    sizes, detected genes, the controls' dispersion) and build one task per perturbation."""
    if len(screen.var_names) < 2:
        raise InputError(f"{screen.what} has {len(screen.var_names)} gene; the model needs at least 2 measured genes.")
    labels = screen_labels(screen.obs, settings.perturbation_key, settings.control)
    chosen = resolve_perturbations(labels, settings.control, settings.perturbation_key, perturbations)
    batch = _batch_labels(screen.obs, settings.batch_key)
    n_control_total = int(labels.control_mask.sum())
    if n_control_total < MIN_CELLS:
        raise InputError(f"only {n_control_total} control cells labelled {settings.control!r}; the model needs at "
                         f"least {MIN_CELLS}.")
    digest = ContentDigest()
    scan = scan_counts(screen.rows, labels.control_mask, batch, what=screen.what, digest=digest)
    content = {"shape": [screen.n_obs, len(screen.var_names)], "matrix": digest.hexdigest(),
               "obs_names": digest_strings(screen.obs_names), "var_names": digest_strings(screen.var_names),
               "labels": digest_strings(labels.labels), "batches": None if batch is None else digest_strings(batch)}
    if not np.any(scan.library_size > 0):
        raise InputError(f"{screen.what} is all zeros: every gene has zero counts in every cell; nothing to analyse.")
    check_library_sizes(scan.library_size, screen.what)
    min_genes = resolve_min_genes(settings.preprocess, len(screen.var_names))
    usable = (scan.n_detected >= min_genes) & (scan.library_size > 0)
    tasks = make_tasks(labels, chosen, settings, usable, batch)
    task_dispersion = scan.task_dispersion(settings.dispersion_per_batch)
    by_batch = task_dispersion if isinstance(task_dispersion, BatchDispersion) else None
    return ScreenPlan(screen=screen, settings=settings, perturbations=chosen, labels=labels, batch=batch,
                      tasks=tasks, dispersion=scan.dispersion, n_control_total=n_control_total,
                      n_detected=scan.n_detected, content=content, count_cap=scan.count_cap,
                      dispersion_by_batch=by_batch)


def execute_plan(plan: ScreenPlan, *, n_jobs: int | None = None, client=None, store: RecordStore | None = None,
                 progress: bool = False) -> ScreenRun:
    """Fit every planned perturbation (those already in ``store`` under the plan's fingerprint are
    read back, not refitted; a store of another fingerprint is an :class:`InputError`).
    ``client`` may be local workers started before the plan (:func:`start_workers`); they are
    used when the run needs workers and left running either way."""
    labels = plan.labels
    collector = Collector(plan.perturbations, plan.screen.var_names, plan.screen.n_obs, labels.control_mask,
                          labels.unassigned, store)
    done = set()
    if store is not None:
        store.bind(plan.fingerprint())
        store.remove_temporary()
        wanted = {t.key for t in plan.tasks}
        for key in store.keys():
            if key in wanted:
                collector.add(store.read(key), stored=True)
                done.add(key)
    todo = []
    for task in plan.tasks:
        if task.key in done:
            continue
        if task.skip_reason is not None:
            collector.add(TaskResult(task.perturbation, task.key, skip_reason=task.skip_reason))
        else:
            todo.append(task)
    if todo:
        local = isinstance(client, LocalWorkers)
        n_workers = _auto_workers(n_jobs, None if local else client, todo, len(plan.screen.var_names))
        if local and resolve_workers(n_workers) == 1:
            client = None  # too little work for the workers started in advance
        pool_rows = np.unique(np.concatenate([t.control_rows for t in todo]))
        # workers of a local run write their own result files; a remote scheduler's workers may
        # not see this filesystem, so this process writes them
        local_files = client is None or isinstance(client, LocalWorkers)
        own_files = store is not None and local_files
        payloads = _Payloads(plan.screen, plan.batch, pool_rows, plan.n_detected, in_workers=local_files)
        context = payloads.context(ScreenContext(settings=plan.settings, var_names=plan.screen.var_names.to_numpy(),
                                                 dispersion=plan.task_dispersion, count_cap=plan.count_cap,
                                                 store_path=str(store.path) if own_files else None,
                                                 store_fingerprint=store.fingerprint if own_files else None))
        map_tasks(todo, payloads, context, collector.add, n_jobs=n_workers, client=client, progress=progress)
    return ScreenRun(settings=plan.settings, perturbations=plan.perturbations, collector=collector, store=store,
                     n_control_total=plan.n_control_total, count_cap=plan.count_cap, dispersion=plan.dispersion,
                     dispersion_by_batch=plan.dispersion_by_batch)


AUTO_PARALLEL_WORK = 2e8
"""With ``n_jobs=None``, Dask workers are started only when the screen holds at least this many
cell x gene entries to fit (summed over perturbations); below it the start-up of the workers (a
few seconds) costs more than it saves, and the run stays in this process."""


def _auto_workers(n_jobs, client, todo: list[Task], n_genes: int):
    if n_jobs is not None or client is not None:
        return n_jobs
    work = sum(t.guide_rows.size + t.control_rows.size for t in todo) * n_genes
    return None if work >= AUTO_PARALLEL_WORK else 1


def _expected_work(screen: Screen, settings: RunSettings, perturbations=None) -> float:
    """An upper bound of :func:`_auto_workers`' work, from the labels alone (before the plan):
    every labelled cell of the chosen perturbations plus a full sample of controls each."""
    if settings.perturbation_key not in screen.obs.columns:
        return 0.0
    counts = screen.obs[settings.perturbation_key].astype(str).value_counts()
    n_control = int(counts.get(str(settings.control), 0))
    counts = counts.drop(str(settings.control), errors="ignore")
    if perturbations is not None and not isinstance(perturbations, (str, bytes)):
        counts = counts[counts.index.isin([str(p) for p in perturbations])]
    cells = float(counts.sum()) + counts.size * min(settings.n_control_cells, n_control)
    return cells * len(screen.var_names)


def start_workers(screen: Screen, settings: RunSettings, perturbations=None, *, n_jobs: int | None = None,
                  client=None) -> LocalWorkers | None:
    """Local Dask workers, started now in the background when the run will want them (``n_jobs``
    above 1, or ``None`` on a screen that may hold enough work), so that their start overlaps the
    planning pass. Pass the result to :func:`execute_plan` as ``client`` and close it after."""
    if client is not None:
        return None
    n = resolve_workers(n_jobs)
    if n == 1 or (n_jobs is None and _expected_work(screen, settings, perturbations) < AUTO_PARALLEL_WORK):
        return None
    return LocalWorkers(n)


def run_screen(screen: Screen, settings: RunSettings, perturbations=None, *, n_jobs: int | None = None, client=None,
               store: RecordStore | None = None, progress: bool = False) -> ScreenRun:
    """Plan and execute one screen (the engine under :func:`perturbation_response`); local
    workers, when used, start while the plan is made."""
    workers = start_workers(screen, settings, perturbations, n_jobs=n_jobs, client=client)
    try:
        return execute_plan(plan_screen(screen, settings, perturbations), n_jobs=n_jobs,
                            client=client if workers is None else workers, store=store, progress=progress)
    finally:
        if workers is not None:
            workers.close()


def annotate(target: AnnData, run: ScreenRun, key_added: str) -> None:
    """Write a finished run into ``target`` (columns of ``.obs``, ``.uns[key_added]``)."""
    col = run.collector
    if not col.summaries:
        raise InputError(f"no perturbation could be analysed: {dict(col.skipped)}")
    col.finalize(run.settings.effect_fdr)
    params = run.params()
    responses = col.responses(params)
    if run.count_cap is not None:
        responses.var["count_cap"] = np.asarray(run.count_cap, float)
    if run.dispersion is not None:
        responses.var["dispersion_screen"] = np.asarray(run.dispersion, float)
    if run.dispersion_by_batch is not None:
        d = run.dispersion_by_batch
        responses.varm["dispersion_screen_batch"] = pd.DataFrame(d.values.T, index=responses.var_names,
                                                                 columns=list(d.labels))
    target.obs[f"{key_added}_p_perturbed"] = col.p_perturbed
    target.obs[f"{key_added}_class"] = col.cell_classes()
    uns = {
        "params": params,
        "summary": col.summary_frame(),
        "skipped": col.skipped_frame(),
        "responses": responses,
    }
    if run.store is None:
        uns["records"] = col.records
    target.uns[key_added] = uns


def _settings(perturbation_key, control, *, params, n_pcs, variance_threshold, **kw) -> RunSettings:
    params = params if params is not None else PreprocessParams()
    if not isinstance(params, PreprocessParams):
        raise InputError(f"params must be a PreprocessParams, got {type(params).__name__}.")
    overrides = {}
    if n_pcs is not None:
        overrides["n_pcs"] = n_pcs
    if variance_threshold is not None:
        overrides["variance_threshold"] = variance_threshold
    if overrides:
        params = replace(params, **overrides)
    return RunSettings(perturbation_key=perturbation_key, control=control, preprocess=params, **kw)


def perturbation_response(
    adata: AnnData,
    perturbation_key: str,
    control: str,
    *,
    perturbations: list[str] | None = None,
    params: PreprocessParams | None = None,
    n_pcs: int | None = None,
    variance_threshold: float | None = None,
    coupling: str = "ot",
    escape_model: bool = True,
    state_space: str = DEFAULT_STATE_SPACE,
    regularization: float = 0.01,
    em_regularization: str = "map",
    coupling_kwargs: dict | None = None,
    rank_by: str = DEFAULT_RANK_BY,
    batch_key: str | None = None,
    dispersion_per_batch: bool = True,
    count_likelihood: str = "marginal",
    n_control_cells: int = N_CONTROL_CELLS,
    layer: str | None = None,
    key_added: str = "scotgm",
    random_state: int = 0,
    n_jobs: int | None = None,
    client=None,
    store: str | Path | None = None,
    copy: bool = False,
    progress: bool = False,
    blas_threads: int | None = 1,
) -> AnnData | None:
    """Fit sc-OTGM to every perturbation of a screen and rank genes by their response.

    For each perturbation, its guide cells and a seeded sample of at most ``n_control_cells``
    control cells (batch-matched with ``batch_key``) are preprocessed together
    (:mod:`scotgm_pp.pp`, on a copy), projected to PCA, and fitted with the two-state model:
    controls pinned to the basal state, guide cells a mixture of basal (escaped) and perturbed.
    The perturbation distribution ``Z = Y - X`` under the chosen coupling is mapped to genes.
    Perturbations are fitted in parallel on Dask when the screen is large enough
    (:func:`~scotgm_pp.tl.analyse_pair` per perturbation; see ``n_jobs``); results do not depend on ``n_jobs`` or the scheduler, because each
    perturbation's seed comes from ``random_state`` and its label.

    Parameters
    ----------
    adata
        Raw UMI counts in ``.X`` (or ``layer``); in memory or opened with ``backed="r"`` (then
        each perturbation's cells are read from the file when needed). Never modified except
        for the slots listed under Returns.
    perturbation_key
        ``.obs`` column with each cell's perturbation label. Cells whose label is missing or
        empty are not analysed (class ``"unassigned"``; a warning says how many).
    control
        Label of the control (non-targeting) cells in that column.
    perturbations
        Which perturbations to analyse (a list; each analysed once); all but the control by
        default.
    params
        Preprocessing thresholds (:class:`~scotgm_pp.pp.PreprocessParams`).
    n_pcs, variance_threshold
        Shortcuts overriding ``params.n_pcs`` / ``params.variance_threshold``.
    coupling
        ``"ot"`` (closed-form optimal transport), ``"independent"`` (Sigma_0 + Sigma_1),
        ``"hit_and_run"`` (posterior-mean coupling of the Hit-and-Run transport-plan sampler)
        or ``"paper"`` (published Algorithm 1, for comparison only).
    escape_model
        Guide cells are a mixture of escaped and perturbed cells (True) or all perturbed.
    state_space
        Where the escape model looks for the perturbed state. ``"signature"`` (default): one
        score per cell along the perturbation's own discriminant direction, estimated from the
        counts of all the experiment's genes with cross-fitting, so it sees a perturbation that
        moves a handful of genes among thousands (:mod:`scotgm_pp.tl._signature`); the PCA-space
        states (coupling, ``mu``, ``sigma``) are then the M-step given its posteriors. ``"pca"``:
        the state model on the experiment's PCA scores, as in the paper. Either way, when the
        guide cells hold no perturbed state (the signature's, or every PC's, KS test) or it
        holds under 10% of them, every guide cell is treated as perturbed; the summary's
        ``escape_model`` says which and why.
    rank_by
        ``"effect_shrunk"`` (default): the model's answer. The count layer of the state model
        gives each gene's natural-log effect ``effect`` in the perturbed state (each guide
        cell's state integrated out over its posterior, ``count_likelihood``) with its standard
        error; a prior learned
        across the experiment's genes (a point mass at 0 and zero-centred normals) shrinks them,
        and genes are ranked by the posterior mean ``effect_shrunk`` (no ties;
        :func:`~scotgm_pp.tl.effect_table`). ``"effect_bound"``: ``sign * max(|effect| -
        sqrt(2 ln G) * effect_se, 0)``, ties (bound 0) by ``effect_z`` (the default before issue
        25). ``"lfc_all_guides_bound"``: the
        same bound on a model-free negative-binomial test of every guide cell against the
        controls (:func:`~scotgm_pp.tl.count_shift`, the default before the count layer joined
        the model). ``"shift"``: the gene-space mean shift of the perturbed state in
        log-normalised units. ``"score"``: ``mu / sigma`` of the perturbation distribution in PCA
        space mapped to genes (the paper's ranking).
    batch_key
        Optional ``.obs`` column of batches (e.g. biological replicates): control samples are
        drawn batch by batch in proportion to the guide cells', and the count layer gives each
        batch its own baseline.
    dispersion_per_batch
        With ``batch_key``: each batch with at least 50 control cells gets its own
        negative-binomial dispersion per gene in the count layer (its controls' moment estimates
        shrunk toward its own mean-dispersion trend; the others the pooled one), so a noisier
        batch weighs less in the effects and their standard errors
        (:func:`~scotgm_pp.inference.count_layer.control_dispersion_by_batch`). ``False``: one
        pooled dispersion per gene. The calls' statistic and the signature use the pooled one
        either way; ``responses.varm["dispersion_screen_batch"]`` holds the batches'.
    count_likelihood
        The count layer's likelihood of each gene given the guide cells' state probabilities
        ``r_ik`` (:func:`~scotgm_pp.tl.fit_count_layer`). ``"marginal"`` (default):
        ``sum_i log sum_k r_ik NB(y_ig | k)``, each cell's state integrated out gene by gene, with
        the Louis standard error. ``"weighted"``: ``sum_i sum_k r_ik log NB(y_ig | k)``, every
        cell's log-likelihood weighted by its state probability, with the imputation standard
        error; escaped cells keep weight in the perturbed state, so a knock-down's effect is
        measured too weak. The PyMC count graph rebuilt by :func:`~scotgm_pp.tl.get_model`
        declares the same likelihood.
    n_control_cells
        Controls each perturbation is compared with (default 1,000; all when there are
        fewer). The cost of a perturbation then depends on its own cells, not on the screen.
    layer
        Take the counts from ``.layers[layer]`` instead of ``.X``.
    regularization
        Strength of the Normal-Wishart prior (the paper's Tikhonov factor, 0.01).
    em_regularization
        ``"map"`` or ``"paper"`` (see :func:`scotgm_pp.inference.fit_em`).
    key_added
        Where results go.
    random_state
        Seed (an integer from 0 to 2**63 - 1); the same seed gives the same result.
    n_jobs
        Local Dask workers (processes, one thread each); ``None``: every core when the
        screen holds at least :data:`AUTO_PARALLEL_WORK` cell x gene entries to fit, else in this
        process; 1: in this process, without Dask. In a script, start the run under ``if __name__ == "__main__":``
        (Dask's worker processes import the main module).
    client
        A ``dask.distributed.Client`` or a scheduler address such as ``"tcp://10.0.0.1:8786"``:
        run on that cluster instead (overrides ``n_jobs``). An address must answer as a Dask
        scheduler within 30 s (:func:`scotgm_pp._workers.connect_scheduler`), else an
        :class:`InputError` says why.
    store
        A folder for the heavy per-perturbation records (loadings, covariances, traces), one
        file per perturbation, loadable one at a time with :func:`get_record`; memory then stays
        flat however many perturbations the screen has. ``None``: keep them in
        ``.uns[key_added]["records"]`` (convenient for small screens). The folder belongs to
        one fingerprint (``store.json``: the settings that change a result, ``layer``, the
        package version, and a digest of the counts, names and labels read): a later call
        reuses its records only under the same fingerprint (e.g. other ``perturbations`` of
        the same screen), and raises an :class:`InputError` naming what changed otherwise.
    copy
        Return a copy with the results instead of writing into ``adata`` (for a backed
        ``adata``, a copy of its annotations without the counts).
    progress
        Show a progress bar over perturbations, with the time left.
    blas_threads
        BLAS threads for each perturbation's task, its fit and its resampling calls (``None``:
        leave the setting alone). The matrices of one experiment are small: with a worker on
        every core, one thread each is fastest.

    Returns
    -------
    None, or a copy when ``copy=True``. Writes

    ``.uns[key_added]["responses"]``
        Perturbation x gene AnnData (:func:`get_responses`): ``obs`` one row per analysed
        perturbation (cells, PCs, which state model produced the states and its convergence,
        fraction perturbed, target rank, ``pval_any``, ``qval_any``, ``effect_detected``, ...),
        ``var`` the screen's genes (with ``count_cap``, the largest count of each gene the run
        read, and ``dispersion_screen``, the controls' shrunk dispersion), one layer per gene
        statistic (NaN for genes an experiment did not keep): the model's ``effect``,
        ``effect_se``, ``effect_z``, ``effect_bound``, ``effect_pvalue``, ``effect_qvalue``
        (Wald, of ``effect_unshrunk`` where it is reported, else of ``effect``),
        ``effect_shrunk``, ``effect_shrunk_sd``, ``effect_lfsr`` (empirical Bayes across
        the genes), ``effect_unshrunk`` and ``effect_unshrunk_se`` (without the count layer's
        prior), ``effect_se_robust`` and ``effect_pvalue_robust`` (the larger of ``effect_se`` and
        the sandwich SE), ``log_rate_basal``, ``dispersion``; the model-free ``lfc_all_guides``, ``_se``, ``_z``, ``_bound``; the paper's ``mu``,
        ``sigma``, ``score``; ``shift``; ``rank``, ``abs_rank``; and the calls' resampling
        ``pval`` with Benjamini-Hochberg ``qval`` (within the perturbation) and ``qval_screen``
        (over the screen; :func:`~scotgm_pp.tl.call_hits`).
    ``.uns[key_added]["params"]``, ``["summary"]``, ``["skipped"]``
        Every setting of the run; the responses' ``obs`` table; perturbations that could not
        be fitted, with the reason.
    ``.uns[key_added]["records"]``
        Without ``store``: key -> per-perturbation record (:func:`get_record`).
    ``.obs[f"{key_added}_p_perturbed"]``
        Each guide cell's posterior probability of being perturbed (NaN for cells not
        analysed, 0 for controls).
    ``.obs[f"{key_added}_class"]``
        ``control``, ``perturbed``, ``escaped``, ``no effect``, ``not analysed`` or
        ``unassigned``.
    """
    if not isinstance(key_added, str) or not key_added or "/" in key_added:
        raise InputError(f"key_added must be a non-empty name without '/', got {key_added!r}.")
    settings = _settings(
        perturbation_key, control, params=params, n_pcs=n_pcs, variance_threshold=variance_threshold,
        coupling=coupling, escape_model=escape_model, state_space=state_space, regularization=regularization,
        em_regularization=em_regularization, coupling_kwargs=coupling_kwargs, rank_by=rank_by, batch_key=batch_key,
        dispersion_per_batch=dispersion_per_batch, count_likelihood=count_likelihood, n_control_cells=n_control_cells, random_state=random_state, blas_threads=blas_threads,
    )
    screen = screen_from_anndata(adata, layer)
    record_store = RecordStore(store) if store is not None else None
    run = run_screen(screen, settings, perturbations, n_jobs=n_jobs, client=client, store=record_store,
                     progress=progress)
    if run.collector.skipped:
        warnings.warn(f"skipped {len(run.collector.skipped)} perturbation(s): {dict(run.collector.skipped)}",
                      UserWarning, stacklevel=2)
    if copy and adata.isbacked:  # never load the counts: the copy carries the annotations only
        target = AnnData(obs=adata.obs.copy(), var=adata.var.copy(), uns=dict(adata.uns))
    else:
        target = adata.copy() if copy else adata
    annotate(target, run, key_added)
    return target if copy else None


def _uns(adata: AnnData, key: str) -> dict:
    if not isinstance(adata, AnnData) or key not in adata.uns or "responses" not in adata.uns[key]:
        raise KeyError(f"no scotgm results under adata.uns[{key!r}]; run scotgm_pp.tl.perturbation_response first.")
    return adata.uns[key]


def get_responses(adata: AnnData, key: str = "scotgm") -> AnnData:
    """The perturbation x gene results of :func:`perturbation_response` (an AnnData)."""
    return _uns(adata, key)["responses"]


def get_rankings(adata: AnnData, key: str = "scotgm", perturbation: str | None = None,
                 top: int | None = None) -> pd.DataFrame:
    """Tidy table of the gene rankings: one row per perturbation and gene, sorted by rank.

    Parameters
    ----------
    adata
        The screen analysed by :func:`perturbation_response`, or its responses AnnData.
    key
        ``key_added`` of the run.
    perturbation
        Only this perturbation.
    top
        Only the ``top`` best-ranked genes of each perturbation.

    Returns
    -------
    DataFrame with ``perturbation``, ``gene`` and one column per gene statistic.
    """
    resp = adata if "rank" in getattr(adata, "layers", {}) else get_responses(adata, key)
    if top is not None and (isinstance(top, bool) or not isinstance(top, (int, np.integer)) or top < 1):
        raise InputError(f"top must be a positive integer or None, got {top!r}.")
    names = resp.obs_names.to_numpy()
    if perturbation is not None:
        if str(perturbation) not in set(names):
            raise KeyError(f"perturbation {perturbation!r} has no results under {key!r}.")
        resp = resp[[str(perturbation)]]
        names = resp.obs_names.to_numpy()
    rank = np.asarray(resp.layers["rank"], dtype=float)
    keep = np.isfinite(rank) if top is None else np.isfinite(rank) & (rank <= top)
    r, g = np.nonzero(keep)
    cols = {"perturbation": names[r], "gene": resp.var_names.to_numpy()[g]}
    for name in resp.layers.keys():
        values = np.asarray(resp.layers[name])[r, g]
        cols[name] = values.astype(np.int64) if name in ("rank", "abs_rank") else values.astype(float)
    df = pd.DataFrame(cols)
    return df.sort_values(["perturbation", "rank"], kind="stable").reset_index(drop=True)


def get_record(adata: AnnData, perturbation: str, key: str = "scotgm", *, store: str | Path | None = None) -> dict:
    """The full record of one perturbation (states, coupling, loadings, KS check, EM trace...),
    from memory or from the run's record store (``store`` overrides the folder recorded in the
    run's params, e.g. after moving the output folder)."""
    uns = _uns(adata, key)
    summary = uns["summary"]
    if str(perturbation) not in summary.index:
        skipped = uns["skipped"]
        if str(perturbation) in set(skipped["perturbation"]):
            reason = skipped.loc[skipped["perturbation"] == str(perturbation), "reason"].iloc[0]
            raise KeyError(f"perturbation {perturbation!r} was skipped: {reason}")
        raise KeyError(f"perturbation {perturbation!r} has no results under {key!r}. Fitted perturbations: "
                       f"{list(summary.index[:20])}.")
    rkey = summary.loc[str(perturbation), "key"]
    if "records" in uns:
        return uns["records"][rkey]
    store = store if store is not None else uns["params"].get("store")
    if store is None:
        raise KeyError(f"the records of {key!r} were not kept (no store and no in-memory records).")
    return RecordStore(store, uns["params"].get("store_fingerprint")).read(rkey, record=True).record

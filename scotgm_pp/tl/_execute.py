"""The map of a screen run: fit one perturbation (anywhere), and run the tasks serially or on Dask.

:func:`run_task` is what a worker executes: it receives one perturbation's cells (its guide
cells and its sample of controls, raw counts) and the run's shared context, and returns a
:class:`TaskResult` holding only that perturbation's numbers. :func:`map_tasks` feeds tasks to
it, in this process (``n_jobs=1``), on a local Dask cluster, or on an existing
``dask.distributed`` scheduler, keeping a bounded number of tasks in flight so that memory does
not grow with the number of perturbations.
"""

from __future__ import annotations

import os
import uuid
import warnings
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from .._screen import cap_counts
from .._validation import InputError
from .._workers import LocalWorkers, local_cluster
from ..inference.count_layer import BatchDispersion
from ._core import resolve_rank_by
from ._pair import analyse_pair
from ._plan import RunSettings, Task

__all__ = ["ScreenContext", "TaskPayload", "TaskResult", "run_task", "map_tasks", "resolve_workers"]


@dataclass(frozen=True)
class ScreenContext:
    """What every task shares (sent once to each worker): the settings, the genes, the controls'
    dispersion per gene (per batch and gene, a :class:`BatchDispersion`, with batches and
    ``dispersion_per_batch``) and, when they fit in memory, the control cells the tasks sample from
    (``control_pool``, whose row ``pool_pos[r]`` is screen row ``r``). With ``store_path`` the
    worker writes its own result file there (workers that share the run's filesystem). With
    ``rows`` (the screen's file, for workers that share the run's filesystem) each worker reads
    its tasks' cells itself, and the tasks carry only their row numbers. ``store_fingerprint``
    is stamped on the result files (:class:`~scotgm_pp.tl._store.RecordStore`). ``count_cap``
    (per gene, from :func:`~scotgm_pp._screen.scan_counts`) caps every count a task reads."""

    settings: RunSettings
    var_names: np.ndarray
    dispersion: np.ndarray | BatchDispersion | None = None
    control_pool: sp.csr_matrix | None = None
    pool_pos: np.ndarray | None = None
    store_path: str | None = None
    store_fingerprint: str | None = None
    rows: object | None = None
    count_cap: np.ndarray | None = None


@dataclass
class TaskPayload:
    """One perturbation's cells (guide cells and sampled controls, in screen order), as a worker
    receives them. Without ``counts``, the worker assembles them from ``guide_counts`` (or the
    context's ``rows``) and the context's control pool (:func:`assemble_counts`)."""

    task: Task
    counts: sp.csr_matrix | None
    obs_names: np.ndarray
    is_control: np.ndarray
    batch: np.ndarray | None = None
    guide_counts: sp.csr_matrix | None = None


def screen_order(task: Task) -> tuple[np.ndarray, np.ndarray]:
    """The task's cells (guide rows, then control rows) put in screen order: ``(rows, order)``
    with ``rows`` the sorted screen rows and ``order`` the permutation that sorts them."""
    rows = np.concatenate([task.guide_rows, task.control_rows])
    order = np.argsort(rows, kind="stable")
    return rows[order], order


def read_counts(task: Task, rows, pool: sp.csr_matrix | None = None, pool_pos: np.ndarray | None = None,
                guide: sp.csr_matrix | None = None) -> sp.csr_matrix:
    """The task's counts in screen order: its guide rows (``guide``, or read from ``rows``) and
    its control rows (from the ``pool`` of controls, or read from ``rows``). The one way a task's
    cells are put together, in this process or in a worker."""
    if guide is None:
        guide = rows.read(task.guide_rows)
    ctrl = pool[pool_pos[task.control_rows]] if pool is not None else rows.read(task.control_rows)
    _, order = screen_order(task)
    return sp.vstack([guide, ctrl], format="csr")[order]


def assemble_counts(payload: TaskPayload, context: ScreenContext) -> sp.csr_matrix:
    """The task's counts in screen order: its guide rows, and its control rows from the pool, each
    count capped at its gene's ``context.count_cap``."""
    if payload.counts is not None:
        return cap_counts(payload.counts, context.count_cap)
    return cap_counts(read_counts(payload.task, context.rows, context.control_pool, context.pool_pos,
                                  payload.guide_counts), context.count_cap)


@dataclass
class TaskResult:
    """The numbers of one perturbation.

    Attributes
    ----------
    perturbation, key
        Label and its safe key.
    skip_reason
        Why it could not be fitted (None when it was).
    summary
        Light scalars (cells, PCs, convergence, fraction perturbed, target rank, ...).
    gene_index
        Positions (in the screen's genes) of the genes the experiment kept.
    gene_values
        Column of the gene table -> values for those genes.
    guide_rows, p_perturbed
        The screen rows of the guide cells and their posterior probability of being perturbed
        (NaN for cells the preprocessing dropped).
    record
        The full per-experiment record (loadings, covariances, traces, ...).
    """

    perturbation: str
    key: str
    skip_reason: str | None = None
    stored: bool = False
    summary: dict = field(default_factory=dict)
    gene_index: np.ndarray | None = None
    gene_values: dict = field(default_factory=dict)
    guide_rows: np.ndarray | None = None
    p_perturbed: np.ndarray | None = None
    record: dict = field(default_factory=dict)


SUMMARY_KEYS = (
    "n_guide_labelled", "n_guide", "n_control", "n_cells_kept", "n_genes_kept", "n_pcs", "variance_explained",
    "ks_shift_significant_pcs", "ks_gaussian_rejected_pcs", "em_n_iter", "em_converged", "em_logp",
    "fraction_perturbed", "target_rank", "seed",
)


def _summary(record: dict) -> dict:
    """Every scalar of the record (numbers, flags, short strings): the perturbation's light summary."""
    out = {}
    for k, v in record.items():
        if isinstance(v, (bool, np.bool_, int, np.integer, float, np.floating)):
            out[k] = v.item() if isinstance(v, np.generic) else v
        elif isinstance(v, str) and len(v) <= 200:
            out[k] = v
    return out


def run_task(payload: TaskPayload, context: ScreenContext) -> TaskResult:
    """Fit one perturbation: build its (guide + sampled controls) AnnData, run
    :func:`~scotgm_pp.tl.analyse_pair`, and keep its numbers aligned to the screen's genes. With
    ``context.store_path`` the result is written there and returned without its heavy record.
    The whole task runs with ``settings.blas_threads`` BLAS threads."""
    threads = context.settings.blas_threads
    with threadpool_limits(limits=threads, user_api="blas") if threads else nullcontext():
        result = _fit_task(payload, context)
        if context.store_path is not None:
            from ._store import RecordStore

            RecordStore(context.store_path, context.store_fingerprint).write(result)
            result.stored = True
            result.record = {}
    return result


def _fit_task(payload: TaskPayload, context: ScreenContext) -> TaskResult:
    payload.counts = assemble_counts(payload, context)
    task, s = payload.task, context.settings
    is_control = np.asarray(payload.is_control, bool)
    # the model-free lfc_all_guides columns come from the calls' statistic (the same NB contrast)
    # unless the ranking needs them inside analyse_pair
    needs_baseline = resolve_rank_by(s.rank_by) == "lfc_all_guides_bound"
    counts = AnnData(X=payload.counts, obs=pd.DataFrame(index=pd.Index(payload.obs_names, dtype=object)),
                     var=pd.DataFrame(index=pd.Index(context.var_names, dtype=object)))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            record, genes, p = analyse_pair(
                counts, is_control, params=s.preprocess, coupling=s.coupling, escape_model=s.escape_model,
                state_space=s.state_space, n_resamples=s.n_resamples,
                regularization=s.regularization, em_regularization=s.em_regularization, random_state=task.seed,
                coupling_kwargs=s.coupling_kwargs, rank_by=s.rank_by, batch=payload.batch,
                dispersion=context.dispersion, baseline=needs_baseline, any_effect=False,
                dispersion_per_batch=s.dispersion_per_batch, count_likelihood=s.count_likelihood,
            )
    except (InputError, np.linalg.LinAlgError, FloatingPointError) as err:
        return TaskResult(task.perturbation, task.key, skip_reason=f"{type(err).__name__}: {err}")
    names = genes["gene"].astype(str).to_numpy()
    gene_index = pd.Index(context.var_names).get_indexer(names)
    if task.perturbation in set(names):
        record["target_rank"] = int(genes.loc[names == task.perturbation, "rank"].iloc[0])
    record["n_guide_labelled"] = int(task.n_guide_labelled)
    record["seed"] = int(task.seed)
    values = {c: genes[c].to_numpy() for c in genes.columns if c != "gene" and pd.api.types.is_numeric_dtype(genes[c])}
    guide_names = payload.obs_names[~is_control]
    p_guide = p.reindex(pd.Index(guide_names, dtype=object)).to_numpy(float)
    return TaskResult(
        perturbation=task.perturbation,
        key=task.key,
        summary=_summary(record),
        gene_index=gene_index.astype(np.int64),
        gene_values=values,
        guide_rows=np.sort(task.guide_rows),
        p_perturbed=p_guide,
        record=record,
    )


def resolve_workers(n_jobs: int | None) -> int:
    """``None``: every core this process may use; otherwise a positive integer."""
    if n_jobs is None:
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # pragma: no cover - not on Linux
            return max(1, os.cpu_count() or 1)
    if isinstance(n_jobs, (bool, np.bool_)) or not isinstance(n_jobs, (int, np.integer)) or n_jobs < 1:
        raise InputError(f"n_jobs must be a positive integer or None (all cores), got {n_jobs!r}.")
    return int(n_jobs)


def map_tasks(
    tasks: list,
    payload_of: Callable,
    context,
    on_result: Callable,
    *,
    fn: Callable = run_task,
    n_jobs: int | None = 1,
    client=None,
    progress: bool = False,
    desc: str = "perturbations",
) -> None:
    """Run ``fn(payload_of(task), context)`` for every task and hand each result to ``on_result``
    as it arrives (in completion order).

    Parameters
    ----------
    tasks
        The work items (perturbations to fit, by default).
    payload_of
        Reads one task's data (called in this process, just before the task is sent).
    context
        Shared by every task (sent once to each worker).
    on_result
        Called in this process with each result.
    fn
        The function a worker runs (default :func:`run_task`).
    n_jobs
        Local workers; 1 runs in this process without Dask.
    client
        A ``dask.distributed.Client``, a scheduler address (``"tcp://host:8786"``) or a
        :class:`~scotgm_pp._workers.LocalWorkers` started earlier (left running); overrides
        ``n_jobs``.
    progress
        A progress bar with the time left.
    """
    bar = tqdm(total=len(tasks), desc=desc, disable=not progress, smoothing=0.1)
    try:
        if client is None and resolve_workers(n_jobs) == 1:
            for task in tasks:
                on_result(fn(payload_of(task), context))
                bar.update()
            return
        _map_dask(tasks, payload_of, context, on_result, fn, resolve_workers(n_jobs), client, bar)
    finally:
        bar.close()


def _map_dask(tasks, payload_of, context, on_result, fn, n_workers, client, bar) -> None:
    try:
        from dask.distributed import as_completed
    except ImportError as err:  # pragma: no cover - dask is a dependency
        raise InputError("parallel runs need dask.distributed: pip install 'dask[distributed]'.") from err
    own_cluster = own_client = None
    if client is None:
        own_cluster, client = local_cluster(n_workers, (getattr(fn, "__module__", None) or "scotgm_pp",))
        own_client = client
    elif isinstance(client, LocalWorkers):
        client = client.client
    elif isinstance(client, str):
        from .._workers import connect_scheduler

        client = own_client = connect_scheduler(client)
    try:
        workers = max(1, len(client.scheduler_info().get("workers", {})) or n_workers)
        shared = client.scatter(context, broadcast=True)
        queue = iter(tasks)
        in_flight = 2 * workers

        def submit(task):
            return client.submit(fn, payload_of(task), shared, pure=False, key=f"scotgm-{uuid.uuid4().hex}")

        futures = as_completed([submit(t) for t in _take(queue, in_flight)])
        for fut in futures:
            result = fut.result()
            fut.release()
            on_result(result)
            bar.update()
            nxt = next(queue, None)
            if nxt is not None:
                futures.add(submit(nxt))
    finally:
        if own_client is not None:
            own_client.close()
        if own_cluster is not None:
            own_cluster.close()


def _take(it: Iterable, n: int) -> list:
    out = []
    for _ in range(n):
        item = next(it, None)
        if item is None:
            break
        out.append(item)
    return out

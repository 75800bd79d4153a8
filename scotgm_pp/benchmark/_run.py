"""The benchmark driver: draw small experiments, run every method on the same cells, score."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scanpy as sc
from anndata import AnnData
from threadpoolctl import threadpool_limits

from .._validation import InputError, batch_labels, validate_screen
from ..pp import PreprocessParams, normalize_log
from ._methods import DEFAULT_SCOTGM, make_pair, resolve_methods
from ._metrics import direction_accuracy, fisher_overlap, rank_of, signed_f1, topk_table

__all__ = ["BenchmarkResult", "run_benchmark", "known_degs", "TOP_GENES"]

TOP_GENES = 100
"""Each method's selected genes for the DEG comparison: its top 100 by ``|score|``."""


@dataclass
class BenchmarkResult:
    """Tables of one benchmark run.

    Attributes
    ----------
    topk
        One row a method: ``method``, ``top1/3/5/10/50``, ``n``, ``median_rank``, ``default``.
    ranks
        ``method``, ``target``, ``seed``, ``rank`` (NaN when the target was filtered out).
    deg
        One row per (method, perturbation, seed): ``n_known`` DEGs, ``overlap`` of the top
        genes (``n_top_genes``, default 100, by ``|score|``) with them, ``fisher_p``, ``precision``, ``direction_accuracy`` (``n_direction``
        known DEGs compared) and ``f1`` (see :func:`~scotgm_pp.benchmark.signed_f1`).
    deg_summary
        ``deg`` averaged per method.
    timings
        ``method``, total ``seconds``, ``calls``.
    failures
        ``method``, ``perturbation``, ``seed``, ``error`` for runs that raised.
    settings
        The arguments of the run.
    """

    topk: pd.DataFrame
    ranks: pd.DataFrame
    deg: pd.DataFrame
    deg_summary: pd.DataFrame
    timings: pd.DataFrame
    failures: pd.DataFrame
    settings: dict = field(default_factory=dict)


def known_degs(
    adata: AnnData,
    perturbation_key: str,
    control: str,
    perturbations: list[str],
    *,
    params: PreprocessParams | None = None,
    alpha: float = 0.05,
) -> tuple[dict[str, dict[str, int]], list[str]]:
    """Known DEGs of each perturbation from the full data.

    All guide cells against all control cells, scanpy Wilcoxon on log-normalised counts;
    a DEG has Benjamini-Hochberg adjusted p < ``alpha``; its direction is the sign of scanpy's
    log fold change. Returns ``{perturbation: {gene: +1 | -1}}`` and the tested genes.
    """
    params = params or PreprocessParams()
    labels = adata.obs[perturbation_key].astype(str)
    keep = labels.isin([control, *perturbations]).to_numpy()
    ln, _ = normalize_log(adata[keep].copy(), params)
    ln.obs["bench_group"] = pd.Categorical(ln.obs[perturbation_key].astype(str))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.tl.rank_genes_groups(ln, "bench_group", groups=list(perturbations), reference=control,
                                method="wilcoxon", n_genes=ln.n_vars, use_raw=False, key_added="bench_deg",
                                corr_method="benjamini-hochberg")
    out = {}
    for pert in perturbations:
        df = sc.get.rank_genes_groups_df(ln, group=pert, key="bench_deg")
        sig = df[df["pvals_adj"] < alpha]
        out[pert] = {str(g): int(np.sign(lfc) or 1) for g, lfc in zip(sig["names"], sig["logfoldchanges"])}
    return out, list(ln.var_names.astype(str))


def _deg_row(scores: pd.Series, known: dict[str, int], universe: list[str], n_top: int = TOP_GENES) -> dict:
    s = scores.dropna()
    top = s.reindex(s.abs().sort_values(ascending=False, kind="stable").index[:n_top])
    pred = top.to_dict()
    p, overlap = fisher_overlap(pred.keys(), known.keys(), universe)
    acc, n_dir = direction_accuracy(pred, known)
    return {"n_known": len(known), "overlap": overlap, "fisher_p": p,
            "precision": overlap / max(len(pred), 1), "direction_accuracy": acc,
            "n_direction": n_dir, "f1": signed_f1(pred, known)}


def run_benchmark(
    adata: AnnData,
    perturbation_key: str,
    control: str,
    *,
    n_target: int = 60,
    n_control: int = 300,
    seeds: int = 10,
    first_seed: int = 0,
    methods=None,
    targets: list[str] | None = None,
    out_dir=None,
    progress: bool = False,
    params: PreprocessParams | None = None,
    deg: bool = True,
    n_top_genes: int = TOP_GENES,
    blas_threads: int | None = 1,
    batch_key: str | None = None,
    n_jobs: int | None = 1,
    client=None,
) -> BenchmarkResult:
    """Small-sample benchmark of target-gene ranking and DEG recovery (the paper's Tables 1 and 3).

    For every seed in ``first_seed .. first_seed + seeds - 1`` and every perturbation, a generator
    ``np.random.default_rng(seed)`` draws ``n_control`` control cells (so the same controls for
    every perturbation of a seed) and then ``n_target`` of the perturbation's cells (all of them
    when it has fewer), without replacement from all cells. Every method ranks the genes of that same pair. For a
    perturbation whose label is a measured gene (a *target*), the rank of that gene (1 = most
    negative score, the strongest knock-down) is recorded. With ``deg``, every perturbation is
    also scored against its known DEGs (:func:`known_degs`): the method's top 100 genes by
    ``|score|`` give the Fisher overlap p, precision, direction accuracy and signed F1.

    Parameters
    ----------
    adata
        Raw counts, one perturbation label per cell in ``.obs[perturbation_key]``.
    perturbation_key, control
        Label column and the control label.
    n_target, n_control
        Cells drawn per experiment.
    seeds, first_seed
        Number of repetitions and the first seed.
    methods
        Names (``scotgm-<coupling>``, ``t-test``, ``wilcoxon``, ``logfc``) or a mapping
        name -> callable (see :mod:`scotgm_pp.benchmark._methods`); default
        :data:`~scotgm_pp.benchmark.DEFAULT_METHODS`.
    targets
        Perturbations to benchmark; default every perturbation (target ranks only for those whose
        label is a measured gene; with ``deg=False`` only those are run).
    out_dir
        When given, write ``topk.csv``, ``ranks.csv``, ``deg.csv``, ``deg_summary.csv``,
        ``timings.csv``, ``report.md`` and its figures there.
    progress
        Show a progress bar over seeds x perturbations.
    params
        Preprocessing for every method (default :class:`~scotgm_pp.pp.PreprocessParams`).
    deg
        Also compute the DEG table (Table 3 analogue).
    n_top_genes
        Each method's selected genes for the DEG table: its top ``n_top_genes`` by ``|score|``.
    batch_key
        Optional ``.obs`` column of batches (e.g. biological replicates). The scotgm count layer
        and the ``van-elteren`` row stratify by it; scanpy's tests and ``logfc`` cannot.
    blas_threads
        BLAS threads during the run (restored afterwards). The per-experiment linear algebra is
        small, and multi-threaded BLAS made it ~5x slower on a shared 2-core machine; ``None``
        leaves the setting alone.
    n_jobs, client
        Experiments run on Dask as in :func:`scotgm_pp.tl.perturbation_response` (``n_jobs``
        local workers, ``None`` every core; or an existing client / scheduler address). Each
        experiment's cells depend only on its seed, so the tables do not depend on them.

    Returns
    -------
    BenchmarkResult
    """
    if isinstance(seeds, bool) or not isinstance(seeds, (int, np.integer)) or seeds < 1:
        raise InputError(f"seeds must be a positive integer (the number of random draws), got {seeds!r}.")
    if blas_threads is not None:
        with threadpool_limits(limits=int(blas_threads), user_api="blas"):
            return run_benchmark(adata, perturbation_key, control, n_target=n_target, n_control=n_control,
                                 seeds=seeds, first_seed=first_seed, methods=methods, targets=targets,
                                 out_dir=out_dir, progress=progress, params=params, deg=deg,
                                 n_top_genes=n_top_genes, blas_threads=None, batch_key=batch_key, n_jobs=n_jobs,
                                 client=client)
    validate_screen(adata, perturbation_key, control)
    batch = batch_labels(adata, batch_key)
    params = params or PreprocessParams()
    funcs = resolve_methods(methods)
    labels = adata.obs[perturbation_key].astype(str).to_numpy()
    available = sorted(set(labels) - {control})
    genes = set(adata.var_names.astype(str))
    if targets is None:
        perts = available
    else:
        perts = [str(t) for t in targets]
        unknown = [p for p in perts if p not in available]
        if unknown:
            raise InputError(f"targets {unknown} not found in adata.obs[{perturbation_key!r}]; "
                             f"available: {available[:30]}.")
    if not deg:
        perts = [p for p in perts if p in genes]
    if not perts:
        raise InputError("no perturbation to benchmark (with deg=False only labels that are measured genes count).")
    ctrl_idx = np.flatnonzero(labels == control)
    if len(ctrl_idx) < n_control:
        raise InputError(f"{len(ctrl_idx)} control cells labelled {control!r}, fewer than n_control={n_control}.")
    known, universe = known_degs(adata, perturbation_key, control, perts, params=params) if deg else ({}, [])

    rank_rows, deg_rows, failures = [], [], []
    seconds = {m: 0.0 for m in funcs}
    calls = {m: 0 for m in funcs}
    jobs = [(s, p) for s in range(first_seed, first_seed + seeds) for p in perts]
    context = _Context(methods=funcs, params=params, known=known, universe=universe, genes=genes, deg=deg,
                       n_top_genes=n_top_genes)

    def payload(job):
        # A fresh generator per experiment: the draw depends only on the seed and the cells, not on
        # which other perturbations are benchmarked (controls: the same n_control cells per seed).
        seed, pert = job
        rng = np.random.default_rng(seed)
        ctrl = np.sort(rng.choice(ctrl_idx, n_control, replace=False))
        guide_all = np.flatnonzero(labels == pert)
        guide = np.sort(rng.choice(guide_all, min(n_target, len(guide_all)), replace=False))
        idx = np.concatenate([ctrl, guide])
        return _Experiment(seed=seed, perturbation=pert, counts=adata[idx].copy(), n_control=len(ctrl),
                           batch=None if batch is None else batch[idx])

    def collect(out):
        rank_rows.extend(out["ranks"])
        deg_rows.extend(out["deg"])
        failures.extend(out["failures"])
        for name, (sec, n) in out["timing"].items():
            seconds[name] += sec
            calls[name] += n

    from ..tl._execute import map_tasks

    map_tasks(jobs, payload, context, collect, fn=_run_experiment, n_jobs=n_jobs, client=client, progress=progress,
              desc="benchmark")
    order = {(s, p): i for i, (s, p) in enumerate(jobs)}
    rank_rows.sort(key=lambda r: (order[(r["seed"], r["target"])], list(funcs).index(r["method"])))
    deg_rows.sort(key=lambda r: (order[(r["seed"], r["perturbation"])], list(funcs).index(r["method"])))

    ranks = pd.DataFrame(rank_rows, columns=["method", "target", "seed", "rank"])
    topk = topk_table(ranks) if len(ranks) else pd.DataFrame(columns=["method"])
    topk["default"] = topk["method"] == DEFAULT_SCOTGM
    deg_df = pd.DataFrame(deg_rows)
    deg_summary = _summarise_deg(deg_df)
    timings = pd.DataFrame({"method": list(funcs), "seconds": [seconds[m] for m in funcs],
                            "calls": [calls[m] for m in funcs]})
    result = BenchmarkResult(
        topk=topk, ranks=ranks, deg=deg_df, deg_summary=deg_summary, timings=timings,
        failures=pd.DataFrame(failures, columns=["method", "perturbation", "seed", "error"]),
        settings={"perturbation_key": perturbation_key, "control": control, "n_target": n_target,
                  "n_control": n_control, "seeds": seeds, "first_seed": first_seed, "methods": list(funcs),
                  "perturbations": perts, "params": params.to_dict(), "default_method": DEFAULT_SCOTGM,
                  "n_top_genes": int(n_top_genes), "batch_key": batch_key or "",
                  "guide_cells_drawn": {p: int(min(n_target, np.sum(labels == p))) for p in perts}},
    )
    if out_dir is not None:
        from ._report import write_outputs

        write_outputs(result, Path(out_dir))
    return result


@dataclass
class _Context:
    methods: dict
    params: PreprocessParams
    known: dict
    universe: list
    genes: set
    deg: bool
    n_top_genes: int


@dataclass
class _Experiment:
    seed: int
    perturbation: str
    counts: AnnData
    n_control: int
    batch: np.ndarray | None = None


def _run_experiment(exp: _Experiment, ctx: _Context) -> dict:
    """Every method on one drawn experiment (runs on a worker): its rank rows, DEG rows, failures
    and timings."""
    out = {"ranks": [], "deg": [], "failures": [], "timing": {}}
    seed, pert = exp.seed, exp.perturbation
    measured = pert in ctx.genes
    try:
        pair = make_pair(exp.counts, np.arange(exp.counts.n_obs) < exp.n_control, seed, ctx.params, batch=exp.batch)
    except InputError as err:  # e.g. every cell filtered out: every method misses this experiment
        for name in ctx.methods:
            out["failures"].append({"method": name, "perturbation": pert, "seed": seed, "error": f"InputError: {err}"})
            if measured:
                out["ranks"].append({"method": name, "target": pert, "seed": seed, "rank": float("nan")})
        return out
    for name, fn in ctx.methods.items():
        t0 = time.perf_counter()
        try:
            scores = fn(pair)
        except Exception as err:  # noqa: BLE001 - a failing method is recorded, not fatal
            out["failures"].append({"method": name, "perturbation": pert, "seed": seed,
                                    "error": f"{type(err).__name__}: {err}"})
            scores = None
        out["timing"][name] = (time.perf_counter() - t0, 1)
        if measured:
            rank = rank_of(scores, pert) if scores is not None else float("nan")
            out["ranks"].append({"method": name, "target": pert, "seed": seed, "rank": rank})
        if ctx.deg and scores is not None:
            out["deg"].append({"method": name, "perturbation": pert, "seed": seed, "measured_target": measured,
                               **_deg_row(scores, ctx.known[pert], ctx.universe, ctx.n_top_genes)})
    return out


def _summarise_deg(deg: pd.DataFrame) -> pd.DataFrame:
    if deg.empty:
        return pd.DataFrame(columns=["method"])
    g = deg.groupby("method", sort=False)
    out = g[["overlap", "precision", "direction_accuracy", "f1"]].mean()
    out["median_fisher_p"] = g["fisher_p"].median()
    out["share_fisher_p_below_0.05"] = g["fisher_p"].apply(lambda p: float(np.mean(p < 0.05)))
    # Pooled direction accuracy: every (known DEG in top genes) comparison counts once.
    correct = (deg["direction_accuracy"].fillna(0) * deg["n_direction"]).groupby(deg["method"], sort=False).sum()
    out["direction_accuracy_pooled"] = correct / g["n_direction"].sum().replace(0, np.nan)
    out["n"] = g.size()
    out = out.reset_index()
    out["default"] = out["method"] == DEFAULT_SCOTGM
    return out

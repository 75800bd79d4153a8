"""The ``scotgm`` command: ``demo``, ``run``, ``benchmark`` and ``calibrate``."""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np

from ._arguments import MAX_INT, MAX_PCS, Parser, fraction, int_arg, number_arg, positive_int, seed, storage_error
from ._workers import SCHEDULER_TIMEOUT

COUNT_LIKELIHOODS_CLI = ("marginal", "weighted")
"""``inference.joint_em.COUNT_LIKELIHOODS``, spelled out so that the parser does not import the
modelling stack (a test checks they are equal)."""

DESCRIPTION = """\
sc-OTGM for single-cell CRISPR screens (Perturb-seq, CROP-seq, ECCITE-seq).

For every perturbation, its guide cells and a sample of non-targeting controls are normalised,
projected to PCA and fitted with a two-state model (controls = basal state; guide cells = a
mixture of escaped and perturbed cells) whose count layer gives each gene's effect in the
perturbed state. Genes are ranked by that effect, shrunk to the bound its standard error
supports (rank 1 = strongest knock-down), and called by a resampling test at a stated FDR.
Perturbations are fitted in parallel on Dask (local workers, or a cluster's scheduler) when the
screen is large enough for worker start-up to pay off.
"""

BUG_REPORT = ("scotgm: this is a bug in scotgm_pp, not a problem with your input. Please report it with the "
              "command you ran and the traceback above.")


def _add_parallel_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("parallel")
    g.add_argument("--n-workers", type=positive_int, default=None,
                   help="local Dask worker processes, at most one a core (default: every core; run and demo stay "
                        "in this process when the screen is too small for worker start-up to pay off; 1: no Dask)")
    g.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="address of a running dask.distributed scheduler (e.g. tcp://10.0.0.1:8786): run there")
    g.add_argument("--scheduler-timeout", type=number_arg(0.0, 3600.0, what="seconds"), default=SCHEDULER_TIMEOUT,
                   metavar="SECONDS",
                   help=f"how long the scheduler has to answer before the command gives up (default "
                        f"{SCHEDULER_TIMEOUT:g})")


def _add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--coupling", default="ot",
                   choices=["independent", "ot", "hit_and_run", "paper"],
                   help="how basal and perturbed states are coupled (default: ot, closed-form optimal transport)")
    pcs = g.add_mutually_exclusive_group()
    pcs.add_argument("--n-pcs", type=int_arg(1, MAX_PCS, "a number of PCs"), default=None,
                     help=f"fixed number of principal components (1 to {MAX_PCS:,})")
    pcs.add_argument("--variance-threshold", type=fraction, default=None,
                     help="keep the leading PCs explaining this share of variance, in (0, 1] (default 0.4)")
    g.add_argument("--no-escape-model", action="store_true",
                   help="treat every guide cell as perturbed (no escaped-cell detection)")
    g.add_argument("--state-space", default="signature", choices=["signature", "pca"],
                   help="where the escape model looks for perturbed cells: the cross-fitted perturbation "
                        "signature of all genes (default) or the experiment's PCA scores (the paper's)")
    g.add_argument("--rank-by", default="effect_shrunk",
                   choices=["effect_shrunk", "effect_bound", "lfc_all_guides_bound", "shift", "score"],
                   help="rank genes by the model's perturbed-state effect shrunk by empirical Bayes across genes "
                        "(effect_shrunk, default); that effect bounded by its standard error (effect_bound); "
                        "the model-free negative-binomial test of every guide cell "
                        "(lfc_all_guides_bound); the perturbed state's gene-space shift (shift); or the paper's "
                        "mu/sigma (score)")
    g.add_argument("--batch-key", default=None,
                   help=".obs column of batches (e.g. replicates): controls are sampled batch by batch and each "
                        "batch gets its own baseline and (with at least 50 controls) its own dispersion per gene in "
                        "the count layer")
    g.add_argument("--pooled-dispersion", action="store_true",
                   help="with --batch-key: one dispersion per gene pooled over the batches in the count layer "
                        "instead of one per batch")
    g.add_argument("--count-likelihood", default="marginal", choices=COUNT_LIKELIHOODS_CLI,
                   help="the count layer's likelihood of each gene given the cells' state probabilities: each cell's "
                        "state integrated out gene by gene (marginal, default) or each state's log-likelihood "
                        "weighted by its probability (weighted; attenuates a knock-down's effect)")
    g.add_argument("--n-control-cells", type=positive_int, default=None,
                   help="control cells each perturbation is compared with (at least 10; default 1000)")
    g.add_argument("--seed", type=seed, default=0, help="random seed, 0 to 2**63 - 1 (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_output_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("outputs")
    g.add_argument("--overwrite", action="store_true",
                   help="replace a finished run in --out (or an unfinished one with other settings)")
    g.add_argument("--figures", nargs="+", default=[], metavar="P",
                   help="also draw per-perturbation figures for these perturbations")
    g.add_argument("--figures-top", type=int_arg(0, MAX_INT, "a number of perturbations"), default=None,
                   metavar="N",
                   help="per-perturbation figures for the N perturbations with the most perturbed cells "
                        "(default: 0 for run, all for demo)")
    genes = g.add_mutually_exclusive_group()
    genes.add_argument("--top-genes", type=positive_int, default=50,
                       help="genes per perturbation in gene_rankings.csv (default 50)")
    genes.add_argument("--all-genes", action="store_true", help="every gene of every perturbation in gene_rankings.csv")


def _settings(args, perturbation_key: str, control: str):
    from .pp import PreprocessParams
    from .tl._plan import N_CONTROL_CELLS, RunSettings

    params = PreprocessParams()
    overrides = {k: v for k, v in (("n_pcs", args.n_pcs), ("variance_threshold", args.variance_threshold))
                 if v is not None}
    if overrides:
        params = PreprocessParams(**{**params.to_dict(), **overrides})
    return RunSettings(
        perturbation_key=perturbation_key,
        control=control,
        coupling=args.coupling,
        escape_model=not args.no_escape_model,
        state_space=args.state_space,
        rank_by=args.rank_by,
        batch_key=args.batch_key,
        dispersion_per_batch=not args.pooled_dispersion,
        count_likelihood=args.count_likelihood,
        n_control_cells=args.n_control_cells or N_CONTROL_CELLS,
        preprocess=params,
        random_state=args.seed,
    )


def _print_table(results, key: str = "scotgm", limit: int = 40) -> None:
    summary = results.uns[key]["summary"]
    print(f"{'perturbation':<16}{'guide cells':>12}{'PCs':>6}{'perturbed':>11}{'target rank':>13}")
    for pert, r in summary.head(limit).iterrows():
        rank = r.get("target_rank", np.nan)
        rank = "-" if not np.isfinite(rank) else str(int(rank))
        print(f"{str(pert)[:15]:<16}{int(r['n_guide']):>12}{int(r['n_pcs']):>6}{r['fraction_perturbed']:>11.2f}"
              f"{rank:>13}")
    if len(summary) > limit:
        print(f"... and {len(summary) - limit} more (see summary.json)")
    skipped = results.uns[key]["skipped"]
    for pert, why in zip(skipped["perturbation"].head(limit), skipped["reason"].head(limit)):
        print(f"{str(pert)[:15]:<16} skipped: {why}")


def _cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not on Linux
        return max(1, os.cpu_count() or 1)


def _parallel(args) -> None:
    """Settle the parallel options before any work: ``--n-workers`` at most one a core (a warning
    says so), and a ``--scheduler`` connected (or refused) now, within ``--scheduler-timeout``:
    ``args.client`` is then the client, closed by :func:`main`."""
    cores = _cores()
    if args.n_workers is not None and args.n_workers > cores:
        print(f"scotgm {args.command}: warning: --n-workers {args.n_workers} is more than the {cores} cores this "
              f"process may use; running {cores} workers.", file=sys.stderr)
        args.n_workers = cores
    args.client = None
    if args.scheduler is not None:
        from ._workers import connect_scheduler

        args.client = connect_scheduler(args.scheduler, args.scheduler_timeout, what="--scheduler")


def _run_folder(screen, args, settings, perturbations=None, de_genes=None, figures_top_default=0,
                guide_assignment=None):
    from ._workflow import run_to_folder

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return run_to_folder(
            screen, settings, args.out, perturbations=perturbations, overwrite=args.overwrite,
            n_jobs=args.n_workers, client=args.client, progress=not args.quiet, figures=args.figures,
            figures_top=figures_top_default if args.figures_top is None else args.figures_top,
            top_genes=None if args.all_genes else args.top_genes, de_genes=de_genes, command=args.command,
            guide_assignment=guide_assignment,
        )


def cmd_demo(args) -> int:
    from . import datasets
    from ._screen import screen_from_anndata

    t0 = time.perf_counter()
    settings_check = _settings(args, "perturbation", "control")  # every setting checked before the simulation
    adata = datasets.simulate(random_state=args.seed)
    sim = adata.uns["simulation"]
    print(f"simulated screen: {adata.n_obs} cells x {adata.n_vars} genes, "
          f"{len(sim['target_gene'])} knock-downs, control label {sim['control']!r}")
    settings = replace(settings_check, control=sim["control"])
    results, paths = _run_folder(screen_from_anndata(adata), args, settings, de_genes=sim["de_genes"],
                                 figures_top_default=len(sim["target_gene"]))
    _print_table(results)
    summary = results.uns["scotgm"]["summary"]
    top1 = float(np.mean(summary["target_rank"].to_numpy() == 1))
    guide = adata.obs["perturbation"].astype(str).to_numpy() != sim["control"]
    p = results.obs["scotgm_p_perturbed"].to_numpy()[guide]
    escaped = adata.obs["escaped"].to_numpy()[guide]
    ok = np.isfinite(p)
    acc = float(np.mean((p[ok] >= 0.5) == ~escaped[ok]))
    print(f"true target ranked first: {top1:.0%} of perturbations; "
          f"escaped/perturbed calls correct for {acc:.0%} of guide cells")
    print(f"outputs in {Path(args.out).resolve()} ({', '.join(sorted(paths))}); {time.perf_counter() - t0:.1f} s")
    return 0


def _start_fork_server(args) -> None:
    """With local workers asked for (``--n-workers`` above 1), start the fork server they will be
    forked from before anything heavy is imported: its imports (about 2 s of CPU) then run on
    another core while this process loads the package and plans (see :mod:`scotgm_pp._workers`)."""
    if args.scheduler is None and args.n_workers is not None and args.n_workers > 1:
        from ._workers import start_fork_server

        start_fork_server()


def _guide_options(args):
    """The guide assignment asked for on the command line (``None`` without ``--guide-modality``)."""
    from ._inputs import GUIDE_TARGET_KEY, GuideOptions
    from ._validation import InputError

    if (args.guide_modality is None) != (args.guide_library is None):
        raise InputError("--guide-modality and --guide-library go together: the guide counts' modality (e.g. gdo) "
                         "and the CSV (columns guide,target) that maps each guide to its target.")
    if args.guide_modality is None:
        if args.perturbation_key is None:
            raise InputError("give --perturbation-key (the .obs column of each cell's perturbation), or assign them "
                             "from guide counts with --guide-modality and --guide-library.")
        return None
    if args.perturbation_key not in (None, GUIDE_TARGET_KEY):
        raise InputError(f"with --guide-modality the perturbation of each cell is its assigned "
                         f"{GUIDE_TARGET_KEY!r}; drop --perturbation-key {args.perturbation_key}.")
    return GuideOptions(modality=args.guide_modality, library=args.guide_library, method=args.guide_method,
                        threshold=args.guide_threshold)


def _print_guides(record: dict) -> None:
    n = record["counts"]
    print(f"guides ({record['params']['method']}): {n['one_guide']} cells with one guide, {n['several_guides']} with "
          f"several (not analysed: low-MOI), {n['no_guide']} with none")


def cmd_run(args) -> int:
    t0 = time.perf_counter()
    guides = _guide_options(args)
    _start_fork_server(args)
    from ._inputs import GUIDE_TARGET_KEY, load_screen

    key = GUIDE_TARGET_KEY if guides is not None else args.perturbation_key
    settings = _settings(args, key, args.control)  # every setting checked before any work
    screen, assignment = load_screen(args.data, layer=args.layer, rna=args.rna_modality, guides=guides)
    print(f"{args.data}: {screen.n_obs} cells x {len(screen.var_names)} genes")
    if assignment is not None:
        _print_guides(assignment)
    results, _ = _run_folder(screen, args, settings, perturbations=args.perturbations, guide_assignment=assignment)
    _print_table(results)
    print(f"outputs in {Path(args.out).resolve()}; {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_benchmark(args) -> int:
    from . import datasets
    from .benchmark import run_benchmark

    if args.first_seed + args.seeds - 1 > 2**63 - 1:
        from ._validation import InputError

        raise InputError(f"--first-seed {args.first_seed} with --seeds {args.seeds} passes the largest seed, "
                         "2**63 - 1; choose a smaller --first-seed.")
    adata = datasets.read(args.data, args.perturbation_key, args.control)
    t0 = time.perf_counter()
    result = run_benchmark(
        adata,
        args.perturbation_key,
        args.control,
        n_target=args.n_target,
        n_control=args.n_control,
        seeds=args.seeds,
        first_seed=args.first_seed,
        methods=args.methods,
        batch_key=args.batch_key,
        out_dir=args.out,
        progress=not args.quiet,
        n_jobs=args.n_workers,
        client=args.client,
    )
    print(result.topk.to_string(index=False))
    print(f"outputs in {Path(args.out).resolve()}; {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_calibrate(args) -> int:
    import json

    from . import datasets, pl
    from .io import atomic_write_text, write_csv
    from .tl import calibration_check

    out = Path(args.out)
    for parent in [out, *out.parents]:
        if parent.exists() and not parent.is_dir():
            from ._validation import InputError

            raise InputError(f"cannot write outputs under {out}: {parent} is a file, not a folder.")
    out.mkdir(parents=True, exist_ok=True)
    adata = datasets.read(args.data, args.perturbation_key, args.control, layer=args.layer)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        res = calibration_check(
            adata, args.perturbation_key, args.control, n_null=args.n_null, null_size=args.null_size,
            guide_key=args.guide_key, n_control_cells=args.n_control_cells or 300, batch_key=args.batch_key,
            fdr=args.fdr, random_state=args.seed, n_jobs=args.n_workers, client=args.client,
            progress=not args.quiet, dispersion_per_batch=not args.pooled_dispersion,
            count_likelihood=args.count_likelihood,
        )
    write_csv(res.table, out / ".calibration.csv.tmp")
    Path(out / ".calibration.csv.tmp").replace(out / "calibration.csv")
    write_csv(res.sets, out / ".null_sets.csv.tmp")
    Path(out / ".null_sets.csv.tmp").replace(out / "null_sets.csv")
    pl.calibration_qq(res).savefig(out / ".qq.png.tmp", dpi=120, format="png")
    Path(out / ".qq.png.tmp").replace(out / "qq.png")
    atomic_write_text(out / "calibration.json", json.dumps(
        {"table": res.table.to_dict("records"), "settings": res.settings}, indent=2, default=str))
    print(res.table.to_string(index=False))
    print(f"outputs in {out.resolve()} (calibration.csv, null_sets.csv, qq.png, calibration.json); "
          f"{time.perf_counter() - t0:.1f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="scotgm", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    from . import __version__

    parser.add_argument("--version", action="version", version=f"scotgm_pp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="simulate a small screen, analyse it and write the outputs",
                          description="Simulate a knock-down screen with known targets, escaped cells and "
                                      "downstream genes; analyse it; report how often the true target ranks first.")
    demo.add_argument("--out", default="scotgm_demo", help="output folder (default: scotgm_demo)")
    _add_model_options(demo)
    _add_parallel_options(demo)
    _add_output_options(demo)
    demo.set_defaults(func=cmd_demo)

    run = sub.add_parser("run", help="analyse a screen stored as .h5ad, .h5mu or 10x .h5",
                         description="Analyse every perturbation of a screen (raw UMI counts in .X) against "
                                     "its control cells. Each cell's perturbation is an .obs column "
                                     "(--perturbation-key), or is assigned from its guide counts (--guide-modality "
                                     "with --guide-library). Writes DIR/results.h5ad, DIR/responses.h5ad, "
                                     "DIR/gene_rankings.csv, DIR/guide_fractions.csv (with guides), DIR/records/, "
                                     "DIR/figures/ and, last, DIR/summary.json. Rerunning the same command resumes "
                                     "an interrupted run.")
    run.add_argument("data", help="the screen: an .h5ad file, an .h5mu file (MuData: --rna-modality and the guide "
                                  "modality) or a 10x Cell Ranger .h5 (Gene Expression and CRISPR Guide Capture)")
    run.add_argument("--perturbation-key", default=None,
                     help=".obs column holding each cell's perturbation (not with --guide-modality: then it is the "
                          "assigned 'target')")
    run.add_argument("--control", required=True, help="label of the non-targeting control cells in that column")
    run.add_argument("--out", required=True, help="output folder")
    run.add_argument("--perturbations", nargs="+", default=None, help="analyse only these perturbations")
    run.add_argument("--layer", default=None, help="take the counts from this layer instead of .X")
    guides = run.add_argument_group("guides")
    guides.add_argument("--guide-modality", default=None, metavar="NAME",
                        help="the guide-capture counts: a modality of the .h5mu (often gdo), or gdo for a 10x .h5")
    guides.add_argument("--guide-library", default=None, metavar="CSV",
                        help="CSV with columns guide,target (control guides carry the --control label as target)")
    guides.add_argument("--guide-method", default="mixture", choices=["mixture", "umi", "max"],
                        help="how guides are called: a background/signal mixture per guide (default), a UMI "
                             "threshold, or the guide with the most UMIs")
    guides.add_argument("--guide-threshold", type=positive_int, default=5,
                        help="UMIs of a called guide for --guide-method umi or max (default 5)")
    guides.add_argument("--rna-modality", default="rna", help="the gene-expression modality of an .h5mu (default rna)")
    _add_model_options(run)
    _add_parallel_options(run)
    _add_output_options(run)
    run.set_defaults(func=cmd_run)

    bench = sub.add_parser("benchmark", help="compare scotgm with scanpy's tests on the small-sample protocol",
                           description="For each perturbation whose target gene is measured: draw N target and "
                                       "M control cells, rank genes with every method, record the target's rank; "
                                       "repeat over seeds. Writes DIR/topk.csv, ranks.csv, deg.csv, report.md.")
    bench.add_argument("data", help="the screen, an .h5ad file with raw counts")
    bench.add_argument("--perturbation-key", required=True)
    bench.add_argument("--control", required=True)
    bench.add_argument("--n-target", type=positive_int, default=60, help="guide cells drawn per perturbation (default 60)")
    bench.add_argument("--n-control", type=positive_int, default=300, help="control cells drawn (default 300)")
    bench.add_argument("--seeds", type=int_arg(1, 100_000, "a number of draws"), default=10,
                       help="number of random draws (default 10)")
    bench.add_argument("--first-seed", type=seed, default=0)
    bench.add_argument("--methods", nargs="+", default=None, help="methods to compare (default: all fast ones)")
    bench.add_argument("--batch-key", default=None,
                       help=".obs column of batches (e.g. bio_rep): the scotgm count layer and the van-elteren "
                            "row stratify by it; scanpy's tests cannot")
    bench.add_argument("--out", required=True, help="output folder")
    bench.add_argument("--quiet", action="store_true")
    _add_parallel_options(bench)
    bench.set_defaults(func=cmd_benchmark)

    cal = sub.add_parser("calibrate", help="check the calls on null pseudo-perturbations made of control cells",
                         description="Build null sets of control cells (random, or one control guide each with "
                                     "--guide-key), run the full pipeline and scanpy's Wilcoxon and t-test on each "
                                     "against other controls, and report how often p < 0.05 / 0.01 and how many "
                                     "discoveries are made. Writes DIR/calibration.csv, null_sets.csv, qq.png and "
                                     "calibration.json.")
    cal.add_argument("data", help="the screen, an .h5ad file with raw counts")
    cal.add_argument("--perturbation-key", required=True)
    cal.add_argument("--control", required=True)
    cal.add_argument("--out", required=True, help="output folder")
    cal.add_argument("--n-null", type=int_arg(1, 100_000, "a number of null sets"), default=50,
                     help="random null sets (default 50)")
    cal.add_argument("--null-size", type=positive_int, default=None,
                     help="cells per null set (default: the median size of the real perturbations)")
    cal.add_argument("--guide-key", default=None, help=".obs column of guide identities: one null set per control guide")
    cal.add_argument("--n-control-cells", type=positive_int, default=None,
                     help="controls each null set is compared with (default 300)")
    cal.add_argument("--batch-key", default=None)
    cal.add_argument("--pooled-dispersion", action="store_true",
                     help="with --batch-key: one dispersion per gene pooled over the batches, as scotgm run's option")
    cal.add_argument("--count-likelihood", default="marginal", choices=COUNT_LIKELIHOODS_CLI,
                     help="the count layer's likelihood whose Wald p-values are checked (as scotgm run's option)")
    cal.add_argument("--fdr", type=number_arg(0.0, 1.0, what="a level"), default=0.1,
                     help="Benjamini-Hochberg level of the counted discoveries, in (0, 1] (default 0.1)")
    cal.add_argument("--layer", default=None)
    cal.add_argument("--seed", type=seed, default=0)
    cal.add_argument("--quiet", action="store_true")
    _add_parallel_options(cal)
    cal.set_defaults(func=cmd_calibrate)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from ._validation import InputError

    try:
        _parallel(args)
        return args.func(args)
    except (InputError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as err:
        message = " ".join(str(err).split())
        print(f"scotgm {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"scotgm {args.command}: interrupted; rerun the same command to resume.", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - unexpected: keep the traceback, ask for a report
        message = storage_error(err, getattr(args, "out", None)) if isinstance(err, OSError) else None
        if message is not None:
            print(f"scotgm {args.command}: error: {message}", file=sys.stderr)
            return 2
        traceback.print_exc()
        print(BUG_REPORT, file=sys.stderr)
        return 1
    finally:
        if getattr(args, "client", None) is not None:
            args.client.close()


def entry_point() -> int:
    """The ``scotgm`` command: :func:`main`, then a quick exit. The interpreter's last garbage
    collection before it exits walks every object of the libraries the run loaded (NumPy, SciPy,
    pandas, AnnData, matplotlib, Dask): 1-2 s after a screen run has finished, for nothing, since
    the process ends. :func:`gc.freeze` moves them out of the collector's reach first."""
    import gc

    code = main()
    gc.freeze()
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(entry_point())

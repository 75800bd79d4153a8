"""The ``scotgm`` command: ``demo``, ``run`` and ``benchmark``."""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np

DESCRIPTION = """\
sc-OTGM for single-cell CRISPR screens (Perturb-seq, CROP-seq, ECCITE-seq).

For every perturbation, its guide cells and the non-targeting controls are normalised,
projected to PCA and fitted with a two-state Gaussian model (controls = basal state;
guide cells = a mixture of escaped and perturbed cells). Genes are ranked by a
negative-binomial count layer: the log fold change of guide against control cells,
shrunk to the bound its standard error supports; rank 1 = strongest knock-down.
"""


def _add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--coupling", default="ot",
                   choices=["independent", "ot", "hit_and_run", "paper"],
                   help="how basal and perturbed states are coupled (default: ot, closed-form optimal transport)")
    pcs = g.add_mutually_exclusive_group()
    pcs.add_argument("--n-pcs", type=int, default=None, help="fixed number of principal components")
    pcs.add_argument("--variance-threshold", type=float, default=None,
                     help="keep the leading PCs explaining this share of variance (default 0.4)")
    g.add_argument("--no-escape-model", action="store_true",
                   help="treat every guide cell as perturbed (no escaped-cell detection)")
    g.add_argument("--rank-by", default="lfc_bound", choices=["lfc_bound", "shift", "score"],
                   help="rank genes by the count layer's bound on the log fold change (lfc_bound, default), "
                        "the perturbed state's gene-space shift in log-normalised units (shift) or the "
                        "model's standardised shift mu/sigma (score)")
    g.add_argument("--batch-key", default=None,
                   help=".obs column of batches (e.g. replicates); each gets its own baseline in the count layer")
    g.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _fit(adata, key, control, args, perturbations=None):
    from . import tl

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        tl.perturbation_response(
            adata,
            key,
            control,
            perturbations=perturbations,
            coupling=args.coupling,
            n_pcs=args.n_pcs,
            variance_threshold=args.variance_threshold,
            escape_model=not args.no_escape_model,
            rank_by=args.rank_by,
            batch_key=args.batch_key,
            random_state=args.seed,
            progress=not args.quiet,
        )


def _print_table(adata, truth: dict | None = None) -> None:
    res = adata.uns["scotgm"]["results"]
    print(f"{'perturbation':<16}{'guide cells':>12}{'PCs':>6}{'perturbed':>11}{'target rank':>13}")
    for pert, r in res.items():
        rank = r.get("target_rank", "-")
        print(f"{pert:<16}{r['n_guide']:>12}{r['n_pcs']:>6}{r['fraction_perturbed']:>11.2f}{rank!s:>13}")
    for pert, why in adata.uns["scotgm"]["skipped"].items():
        print(f"{pert:<16} skipped: {why}")


def cmd_demo(args) -> int:
    from . import datasets
    from .io import write_outputs

    t0 = time.perf_counter()
    adata = datasets.simulate(random_state=args.seed)
    sim = adata.uns["simulation"]
    print(f"simulated screen: {adata.n_obs} cells x {adata.n_vars} genes, "
          f"{len(sim['target_gene'])} knock-downs, control label {sim['control']!r}")
    _fit(adata, "perturbation", sim["control"], args)
    _print_table(adata)
    res = adata.uns["scotgm"]["results"]
    top1 = np.mean([r.get("target_rank") == 1 for r in res.values()])
    guide = adata.obs["perturbation"].astype(str) != sim["control"]
    p = adata.obs["scotgm_p_perturbed"][guide].to_numpy()
    escaped = adata.obs["escaped"][guide].to_numpy()
    ok = np.isfinite(p)
    called = p[ok] >= 0.5
    acc = float(np.mean(called == ~escaped[ok]))
    print(f"true target ranked first: {top1:.0%} of perturbations; "
          f"escaped/perturbed calls correct for {acc:.0%} of guide cells")
    paths = write_outputs(adata, args.out)
    print(f"outputs in {Path(args.out).resolve()} ({', '.join(p.name for p in paths.values() if isinstance(p, Path))}); "
          f"{time.perf_counter() - t0:.1f} s")
    return 0


def cmd_run(args) -> int:
    from . import datasets
    from .io import write_outputs

    t0 = time.perf_counter()
    adata = datasets.read(args.data, args.perturbation_key, args.control, layer=args.layer)
    print(f"read {adata.n_obs} cells x {adata.n_vars} genes from {args.data}")
    _fit(adata, args.perturbation_key, args.control, args, perturbations=args.perturbations)
    _print_table(adata)
    write_outputs(adata, args.out)
    print(f"outputs in {Path(args.out).resolve()}; {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_benchmark(args) -> int:
    from . import datasets

    try:
        from .benchmark import run_benchmark
    except ImportError as err:  # pragma: no cover
        print(f"benchmark unavailable: {err}", file=sys.stderr)
        return 2
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
    )
    print(result.topk.to_string(index=False))
    print(f"outputs in {Path(args.out).resolve()}; {time.perf_counter() - t0:.1f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scotgm", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    from . import __version__

    parser.add_argument("--version", action="version", version=f"scotgm_pp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="simulate a small screen, analyse it and write the outputs",
                          description="Simulate a knock-down screen with known targets, escaped cells and "
                                      "downstream genes; analyse it; report how often the true target ranks first.")
    demo.add_argument("--out", default="scotgm_demo", help="output folder (default: scotgm_demo)")
    _add_model_options(demo)
    demo.set_defaults(func=cmd_demo)

    run = sub.add_parser("run", help="analyse a screen stored as .h5ad",
                         description="Analyse every perturbation of a screen (raw UMI counts in .X) against "
                                     "its control cells. Writes DIR/results.h5ad, DIR/gene_rankings.csv, "
                                     "DIR/summary.json and DIR/figures/.")
    run.add_argument("data", help="the screen, an .h5ad file with raw counts")
    run.add_argument("--perturbation-key", required=True, help=".obs column holding each cell's perturbation")
    run.add_argument("--control", required=True, help="label of the non-targeting control cells in that column")
    run.add_argument("--out", required=True, help="output folder")
    run.add_argument("--perturbations", nargs="+", default=None, help="analyse only these perturbations")
    run.add_argument("--layer", default=None, help="take the counts from this layer instead of .X")
    _add_model_options(run)
    run.set_defaults(func=cmd_run)

    bench = sub.add_parser("benchmark", help="compare scotgm with scanpy's tests on the small-sample protocol",
                           description="For each perturbation whose target gene is measured: draw N target and "
                                       "M control cells, rank genes with every method, record the target's rank; "
                                       "repeat over seeds. Writes DIR/topk.csv, ranks.csv, deg.csv, report.md.")
    bench.add_argument("data", help="the screen, an .h5ad file with raw counts")
    bench.add_argument("--perturbation-key", required=True)
    bench.add_argument("--control", required=True)
    bench.add_argument("--n-target", type=int, default=60, help="guide cells drawn per perturbation (default 60)")
    bench.add_argument("--n-control", type=int, default=300, help="control cells drawn (default 300)")
    bench.add_argument("--seeds", type=int, default=10, help="number of random draws (default 10)")
    bench.add_argument("--first-seed", type=int, default=0)
    bench.add_argument("--methods", nargs="+", default=None, help="methods to compare (default: all fast ones)")
    bench.add_argument("--batch-key", default=None,
                       help=".obs column of batches (e.g. bio_rep): the scotgm count layer and the van-elteren "
                            "row stratify by it; scanpy's tests cannot")
    bench.add_argument("--out", required=True, help="output folder")
    bench.add_argument("--quiet", action="store_true")
    bench.set_defaults(func=cmd_benchmark)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from ._validation import InputError

    try:
        return args.func(args)
    except (InputError, FileNotFoundError) as err:
        print(f"scotgm {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

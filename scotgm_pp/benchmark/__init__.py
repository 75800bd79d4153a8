"""Evaluation protocol and baselines: target-gene ranking and DEG recovery on small samples.

The paper's Tables 1 and 3 on any screen: :func:`run_benchmark` draws small experiments (a few
dozen guide cells and a few hundred controls), runs sc-OTGM and scanpy's t-test / Wilcoxon and
a log-fold-change ranking on the same cells, and scores the rank of the knocked-down gene and
the overlap with DEGs from the full data.
"""

from ._methods import (
    DEFAULT_METHODS,
    DEFAULT_SCOTGM,
    Pair,
    logfc_method,
    make_pair,
    resolve_methods,
    scanpy_method,
    scotgm_method,
)
from ._metrics import direction_accuracy, fisher_overlap, rank_of, signed_f1, topk_accuracy, topk_table
from ._report import plot_target_ranks, plot_topk_curves, write_outputs
from ._run import BenchmarkResult, known_degs, run_benchmark

__all__ = [
    "BenchmarkResult",
    "DEFAULT_METHODS",
    "DEFAULT_SCOTGM",
    "Pair",
    "direction_accuracy",
    "fisher_overlap",
    "known_degs",
    "logfc_method",
    "make_pair",
    "plot_target_ranks",
    "plot_topk_curves",
    "rank_of",
    "resolve_methods",
    "run_benchmark",
    "scanpy_method",
    "scotgm_method",
    "signed_f1",
    "topk_accuracy",
    "topk_table",
    "write_outputs",
]

"""Tools: perturbation responses, gene rankings, escaped cells (compute only; never plot)."""

from ._core import COUPLINGS, PerturbationFit, fit_perturbation, gene_statistics
from ._response import analyse_pair, get_rankings, perturbation_response

__all__ = [
    "COUPLINGS",
    "PerturbationFit",
    "analyse_pair",
    "fit_perturbation",
    "gene_statistics",
    "get_rankings",
    "perturbation_response",
]

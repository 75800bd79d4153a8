"""Tools: perturbation responses, gene rankings, escaped cells, response prediction and synthetic
cells (compute only; never plot)."""

from ._core import COUPLINGS, RANK_BY, PerturbationFit, fit_perturbation, gene_statistics, state_shift
from ._calibrate import CalibrationResult, calibration_check
from ._counts import count_shift, universal_threshold
from ._hits import call_hits
from ._predict import observed_response, predict_response
from ._pair import analyse_pair
from ._response import get_rankings, get_record, get_responses, perturbation_response
from ._synthetic import sample_cells

__all__ = [
    "COUPLINGS",
    "RANK_BY",
    "PerturbationFit",
    "analyse_pair",
    "call_hits",
    "calibration_check",
    "CalibrationResult",
    "count_shift",
    "fit_perturbation",
    "gene_statistics",
    "get_rankings",
    "get_record",
    "get_responses",
    "observed_response",
    "perturbation_response",
    "predict_response",
    "sample_cells",
    "state_shift",
    "universal_threshold",
]

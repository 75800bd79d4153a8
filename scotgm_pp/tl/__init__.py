"""Tools: perturbation responses, gene rankings, escaped cells, posterior draws, response prediction,
synthetic cells and posterior predictive checks (compute only; never plot)."""

from ._calibrate import CalibrationResult, calibration_check
from ._core import (
    COUPLINGS,
    DEFAULT_RANK_BY,
    RANK_BY,
    PerturbationFit,
    StateFit,
    fit_perturbation,
    fit_states,
    gene_statistics,
    state_shift,
)
from ._counts import count_shift, universal_threshold
from ._effects import CountFit, effect_table, fit_count_layer, library_sizes
from ._hits import call_hits
from ._model import get_model
from ._ppc import posterior_draws, posterior_predictive, ppc_statistics
from ._predict import observed_response, predict_response
from ._pair import analyse_pair
from ._response import get_rankings, get_record, get_responses, perturbation_response
from ._synthetic import sample_cells

__all__ = [
    "COUPLINGS",
    "CountFit",
    "DEFAULT_RANK_BY",
    "RANK_BY",
    "PerturbationFit",
    "StateFit",
    "analyse_pair",
    "call_hits",
    "calibration_check",
    "CalibrationResult",
    "count_shift",
    "effect_table",
    "fit_count_layer",
    "fit_perturbation",
    "fit_states",
    "library_sizes",
    "gene_statistics",
    "get_model",
    "get_rankings",
    "get_record",
    "get_responses",
    "observed_response",
    "perturbation_response",
    "posterior_draws",
    "posterior_predictive",
    "ppc_statistics",
    "predict_response",
    "sample_cells",
    "state_shift",
    "universal_threshold",
]

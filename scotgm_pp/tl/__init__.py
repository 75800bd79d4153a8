"""Tools: perturbation responses, gene rankings, escaped cells, posterior draws, response prediction,
synthetic cells and posterior predictive checks (compute only; never plot)."""

from importlib import import_module

_WHERE = {
    "CalibrationResult": "_calibrate",
    "calibration_check": "_calibrate",
    "COUPLINGS": "_core",
    "DEFAULT_RANK_BY": "_core",
    "RANK_BY": "_core",
    "PerturbationFit": "_core",
    "StateFit": "_core",
    "fit_perturbation": "_core",
    "fit_states": "_core",
    "gene_statistics": "_core",
    "state_shift": "_core",
    "count_shift": "_counts",
    "universal_threshold": "_counts",
    "CountFit": "_effects",
    "effect_table": "_effects",
    "fit_count_layer": "_effects",
    "library_sizes": "_effects",
    "call_hits": "_hits",
    "get_model": "_model",
    "posterior_draws": "_ppc",
    "posterior_predictive": "_ppc",
    "ppc_statistics": "_ppc",
    "observed_response": "_predict",
    "predict_response": "_predict",
    "analyse_pair": "_pair",
    "get_rankings": "_response",
    "get_record": "_response",
    "get_responses": "_response",
    "perturbation_response": "_response",
    "sample_cells": "_synthetic",
    "to_mixscape_classes": "_export",
    "to_rank_genes_groups": "_export",
    "guide_fractions": "_guides",
    "guide_model": "_guides",
}
"""Public name -> the submodule that defines it. Each is imported on first access, so that a
screen run (and each of its workers) loads only the modules it uses: the posterior predictive
and model tools bring in PyMC and ArviZ, which a run does not need."""


def __getattr__(name):
    if name in _WHERE:
        value = getattr(import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_WHERE))


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
    "to_mixscape_classes",
    "to_rank_genes_groups",
    "guide_fractions",
    "guide_model",
    "universal_threshold",
]

"""Inference: EM/MAP backends (Gaussian states, and with the count layer), transport couplings and
their diagnostics (pure functions over arrays).

PyMC-dependent pieces (the :class:`HitAndRun` step method and the coupling model) are imported
on first use, so ``import scotgm_pp.inference`` stays light.
"""

from importlib import import_module

from .em import (
    EMResult,
    NormalWishartPrior,
    default_prior,
    fit_em,
    free_responsibilities,
    gaussian_logpdf,
    log_density,
    validate_fixed_state,
)
from .count_layer import CountData, CountParams, CountPrior, control_dispersion, default_count_prior
from .dispersion import DispersionFit, shrink_dispersion
from .gibbs import GibbsResult, sample_gibbs
from .hit_and_run import (
    CouplingResult,
    chord,
    default_temperature,
    sample_coupling,
    truncated_exponential,
)
from .joint_em import JointEMResult, any_effect_llr, conditional_full_m_step, fit_joint_em, joint_log_density
from .normal_means import NormalMeansFit, normal_means
from .ot import coupling_cost, gaussian_w2, ot_cross_covariance, perturbation_covariance, psd_sqrt
from .paper import PaperResult, paper_cross_covariance

_LAZY = {
    "HitAndRun": ".step",
    "build_coupling_model": ".step",
}

__all__ = [
    "EMResult",
    "NormalWishartPrior",
    "default_prior",
    "fit_em",
    "log_density",
    "free_responsibilities",
    "gaussian_logpdf",
    "validate_fixed_state",
    "CountData",
    "CountParams",
    "CountPrior",
    "control_dispersion",
    "default_count_prior",
    "DispersionFit",
    "shrink_dispersion",
    "JointEMResult",
    "any_effect_llr",
    "conditional_full_m_step",
    "fit_joint_em",
    "joint_log_density",
    "NormalMeansFit",
    "normal_means",
    "GibbsResult",
    "sample_gibbs",
    "CouplingResult",
    "chord",
    "default_temperature",
    "sample_coupling",
    "truncated_exponential",
    "coupling_cost",
    "gaussian_w2",
    "ot_cross_covariance",
    "perturbation_covariance",
    "psd_sqrt",
    "PaperResult",
    "paper_cross_covariance",
    *_LAZY,
]


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""The sc-OTGM generative graph declared in PyMC, and the user-facing ``ScOTGM`` model class."""

from .graph import LogCholeskyTransform, build_model, initial_values, model_point
from .scotgm import (
    DEFAULT_MODEL_CONFIG,
    DEFAULT_SAMPLER_CONFIG,
    ConvergenceWarning,
    PerturbationDistribution,
    ScOTGM,
    check_convergence,
)

__all__ = [
    "ConvergenceWarning",
    "DEFAULT_MODEL_CONFIG",
    "DEFAULT_SAMPLER_CONFIG",
    "LogCholeskyTransform",
    "PerturbationDistribution",
    "ScOTGM",
    "build_model",
    "check_convergence",
    "initial_values",
    "model_point",
]

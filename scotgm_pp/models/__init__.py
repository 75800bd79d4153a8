"""The sc-OTGM generative graph declared in PyMC, and the user-facing ``ScOTGM`` model class."""

from .graph import LogCholeskyTransform, build_model, model_point
from .scotgm import PerturbationDistribution, ScOTGM

__all__ = ["LogCholeskyTransform", "PerturbationDistribution", "ScOTGM", "build_model", "model_point"]

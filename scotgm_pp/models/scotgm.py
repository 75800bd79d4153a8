"""``ScOTGM``: the user-facing model class over the PyMC graph and the numeric backends.

The pattern is pymc-marketing's ``ModelBuilder``: the model's definition in a ``model_config``
dict (states, covariance type, priors), the sampler's in ``sampler_config``, one
``fit(data, *, method=...)`` entry point, the PyMC model of the fitted data as ``.model`` and
the result as an :class:`xarray.DataTree` (``.idata``, the ArviZ 1 container) whose root ``attrs``
carry both configs,
so that :meth:`ScOTGM.save` / :meth:`ScOTGM.load` through netCDF rebuild the same model.

One naming scheme
-----------------
Every parameter in ``.idata`` carries the name of a variable of ``.model`` (``weights``,
``mean_{k}``, ``precision_{k}`` or the tied ``precision``, and the deterministics ``means``,
``precisions``, ``covariances``, ``perturbation_mean``, ``perturbation_cov_independent``), and
the observed cells are ``X`` (dims ``cell, pc``) in ``observed_data``, ``log_likelihood``,
``prior_predictive`` and ``posterior_predictive`` alike, whatever the options. With
``model_config["mean_parametrization"] = "shift"`` the graph's free ``shift_{k}`` stand in for the
free ``mean_{k}`` of the states after the first (``mean_{k}`` is then a deterministic of the same
name); with ``fit(..., design=...)`` the graph adds ``design_coef`` (and, with counts,
``design_count_coef``). EM and Gibbs fit only the default graph; these are fitted by ``"map"`` or
``"nuts"``.

Where results go
----------------
* ``method="nuts"`` (``pm.sample``) and ``"mcmc"`` (conjugate Gibbs): draws in ``posterior``,
  the per-cell ``log_likelihood`` of ``X`` (for ``az.loo`` / ``az.compare``), ``sample_stats``.
* ``method="em"`` and ``"map"``: point estimates are not draws, so they are not stored as a
  one-draw ``posterior`` (on which ``az.summary`` returns NaN); they are in the ``map_estimate``
  group, without ``chain`` / ``draw`` dimensions, with the same variable names. (No group is
  named like an attribute of ``xarray.DataTree`` or ``xarray.Dataset``: files of version 0.1
  called this group ``map``, which shadows ``Dataset.map``; :meth:`ScOTGM.load` renames it.)
* :meth:`ScOTGM.sample_prior_predictive` adds ``prior`` and ``prior_predictive``,
  :meth:`ScOTGM.sample_posterior_predictive` ``posterior_predictive``.
"""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import arviz as az
import numpy as np
import pandas as pd
import xarray as xr

from .._tree import group, has_group, make_tree, set_group
from ._counts import COUNT_EVIDENCE
from ._persist import POINT_GROUP

from ..inference.em import (
    NormalWishartPrior,
    default_prior,
    fit_em,
    free_responsibilities,
    scaled_prior,
    validate_allowed_states,
)
from ..inference.joint_em import COUNT_LIKELIHOODS
from .graph import MEAN_PARAMETRIZATIONS, default_contrasts, default_state_names

__all__ = ["ScOTGM", "PerturbationDistribution", "ConvergenceWarning", "DEFAULT_MODEL_CONFIG",
           "DEFAULT_SAMPLER_CONFIG", "check_convergence"]

_METHODS = ("em", "map", "mcmc", "nuts")
_FORMAT_VERSION = 3

RHAT_MAX = 1.01
ESS_MIN = 400

DEFAULT_MODEL_CONFIG: dict[str, Any] = {
    "n_states": 2,
    "state_names": None,
    "covariance": "full",
    "prior": "scaled",
    "kappa": 0.1,
    "extra_dof": 2,
    "dirichlet": 1.0,
    "regularization": 0.01,
    "count_evidence": "cut",
    "count_likelihood": "marginal",
    "delta_sd": 0.5,
    "beta_sd": 5.0,
    "gamma_sd": 1.0,
    "mean_parametrization": "state",
    "shift_sd": None,
    "design_sd": None,
    "design_count_sd": 1.0,
}
"""The model's definition. ``prior``: ``"scaled"`` (default; weakly informative on the data's
scale, :func:`~scotgm_pp.inference.em.scaled_prior`: prior predictive cells within the data's
range) or ``"ridge"`` (:func:`~scotgm_pp.inference.em.default_prior`, the prior of the screen
pipeline, built so that the MAP covariance carries the paper's ``regularization`` ridge; its scale
grows with the number of cells, so its prior predictive is far wider than the data). ``kappa``:
prior pseudo-count of the state means; ``extra_dof``: Wishart degrees of freedom above the
dimension (an integer); ``dirichlet``: concentration of the weights; ``covariance``: ``"full"``
(one per state) or ``"tied"`` (shared). With counts (:meth:`ScOTGM.fit` ``counts=``):
``count_evidence`` (``"cut"``: the graph infers the states from the scores alone and, per gene,
integrates each cell's state out of its count's likelihood over its probabilities of the states,
as the screen does; EM, MAP and NUTS all fit this graph; ``"joint"``: the joint density, the
counts informing the states too), ``count_likelihood`` (the cut's count density: ``"marginal"``,
``sum_g log sum_k r_ik NB(y_ig | k)``, or ``"weighted"``, ``sum_k r_ik log p(y_i | k)``, as
:func:`~scotgm_pp.tl.perturbation_response` takes it) and the count
layer's prior standard deviations ``delta_sd`` (state effects), ``beta_sd`` (basal log rates),
``gamma_sd`` (batch offsets).

``mean_parametrization``: ``"state"`` (default: a Normal-Wishart mean per state, the graph EM fits)
or ``"shift"`` (``mean_0`` as before, ``shift_k ~ Normal(0, shift_sd)`` per PC for every other
state and ``mean_k = mean_0 + shift_k``: a prior on the perturbation itself). ``shift_sd``:
``None`` (default) for the SD of the scores along each PC over all the fit's cells, a positive
number, or one per PC. With a design (:meth:`ScOTGM.fit` ``design=``): ``design_sd``, the prior SD
of ``design_coef`` (PC offset per unit of a covariate; ``None``: the scores' SD per PC, as
``shift_sd``), and ``design_count_sd``, that of ``design_count_coef`` (natural-log rate per unit of
a covariate). EM fits only the default graph (``"state"``, no design): the others are fitted with
``method="map"`` or ``"nuts"``."""

DEFAULT_SAMPLER_CONFIG: dict[str, Any] = {
    "draws": 1000,
    "tune": 1000,
    "chains": 2,
    "target_accept": 0.9,
    "nuts_sampler": "pymc",
}
"""``pm.sample`` settings of ``method="nuts"`` (``draws``, ``tune``, ``chains`` also set the
Gibbs sampler of ``method="mcmc"``); ``nuts_sampler`` may be ``"nutpie"`` or ``"numpyro"`` where
those packages are installed."""


class ConvergenceWarning(UserWarning):
    """A sampler's chains missed R-hat <= 1.01 or a bulk ESS >= 400."""


@dataclass
class PerturbationDistribution:
    """The perturbation ``Z = Y - X`` between two states under the independent coupling.

    Attributes
    ----------
    mean
        Posterior mean of ``mu_state - mu_reference``, ``(d,)``.
    covariance
        Posterior mean of ``Sigma_state + Sigma_reference``, ``(d, d)``.
    mean_draws, covariance_draws
        Per posterior draw (chains x draws flattened): ``(S, d)`` and ``(S, d, d)``.
    state, reference
        The state names compared.
    """

    mean: np.ndarray
    covariance: np.ndarray
    mean_draws: np.ndarray
    covariance_draws: np.ndarray
    state: str
    reference: str


def _check_model_config(config: dict) -> dict:
    unknown = set(config) - set(DEFAULT_MODEL_CONFIG)
    if unknown:
        raise ValueError(f"model_config has unknown keys {sorted(unknown)}; known: {sorted(DEFAULT_MODEL_CONFIG)}.")
    c = {**DEFAULT_MODEL_CONFIG, **config}
    K = c["n_states"]
    if isinstance(K, bool) or int(K) != K or K < 1:
        raise ValueError(f"n_states must be a positive integer, got {K!r}.")
    c["n_states"] = K = int(K)
    names = c["state_names"] if c["state_names"] is not None else default_state_names(K)
    if len(names) != K or len(set(map(str, names))) != K:
        raise ValueError(f"state_names must be {K} distinct labels, got {c['state_names']!r}.")
    c["state_names"] = [str(x) for x in names]
    if c["covariance"] not in ("full", "tied"):
        raise ValueError(f"covariance must be 'full' or 'tied', got {c['covariance']!r}.")
    if c["prior"] not in ("scaled", "ridge"):
        raise ValueError(f"prior must be 'scaled' (weakly informative on the data's scale) or 'ridge', got {c['prior']!r}.")
    dof = c["extra_dof"]
    if isinstance(dof, bool) or int(dof) != dof or dof < (2 if c["prior"] == "scaled" else 0):
        raise ValueError(f"extra_dof must be an integer (pm.Wishart needs integer dof), >= 2 with the scaled prior; "
                         f"got {dof!r}.")
    c["extra_dof"] = int(dof)
    if c["count_evidence"] not in COUNT_EVIDENCE:
        raise ValueError(f"count_evidence must be one of {COUNT_EVIDENCE}, got {c['count_evidence']!r}.")
    if c["count_likelihood"] not in COUNT_LIKELIHOODS:
        raise ValueError(f"count_likelihood must be one of {COUNT_LIKELIHOODS}, got {c['count_likelihood']!r}.")
    for key in ("kappa", "regularization", "delta_sd", "beta_sd", "gamma_sd"):
        if not float(c[key]) > 0:
            raise ValueError(f"{key} must be > 0, got {c[key]!r}.")
        c[key] = float(c[key])
    if c["mean_parametrization"] not in MEAN_PARAMETRIZATIONS:
        raise ValueError(f"mean_parametrization must be one of {MEAN_PARAMETRIZATIONS}, got "
                         f"{c['mean_parametrization']!r}.")
    for key in ("shift_sd", "design_sd"):
        c[key] = _check_sd_setting(key, c[key])
    if not float(c["design_count_sd"]) > 0:
        raise ValueError(f"design_count_sd must be > 0, got {c['design_count_sd']!r}.")
    c["design_count_sd"] = float(c["design_count_sd"])
    if not float(c["dirichlet"]) >= 1:
        raise ValueError(f"dirichlet must be >= 1 (the MAP needs it), got {c['dirichlet']!r}.")
    c["dirichlet"] = float(c["dirichlet"])
    return c


def _check_sd_setting(key: str, value):
    """``None``, a positive number, or a list of positive numbers (one per PC, checked at build)."""
    if value is None:
        return None
    values = np.asarray(value, float)
    if values.ndim > 1 or values.size == 0 or not np.all(np.isfinite(values)) or not np.all(values > 0):
        raise ValueError(f"{key} must be None (the scores' SD per PC), a positive number or a list of positive "
                         f"numbers (one per PC), got {value!r}.")
    return float(values) if values.ndim == 0 else [float(v) for v in values]


class ScOTGM:
    """sc-OTGM mixture of basal and perturbed cell states, fitted by EM, MAP, Gibbs or NUTS.

    Parameters
    ----------
    n_states
        Number of Gaussian states (2: basal and perturbed; more for several perturbations or
        cell types x condition). Shorthand for ``model_config["n_states"]``.
    model_config
        The model (see :data:`DEFAULT_MODEL_CONFIG`): states, ``covariance`` (``"full"`` or
        ``"tied"``) and the priors. Stored in the result tree's attrs.
    sampler_config
        ``pm.sample`` settings (see :data:`DEFAULT_SAMPLER_CONFIG`).
    covariance, state_names, prior, regularization, kappa, extra_dof, dirichlet, mean_parametrization, shift_sd
        Shorthands for the ``model_config`` keys of the same names (they override it).
    m_step
        ``"map"`` (exact MAP M-step) or ``"paper"`` (Algorithm 3 as published), passed to
        :func:`scotgm_pp.inference.fit_em`.
    max_iter, tol
        EM stopping rule.
    n_init
        EM restarts when two or more states hold no pinned cells (the best log density wins).
    draws, tune, chains
        Shorthands for the ``sampler_config`` keys (per chain).
    random_state
        Integer seed (or ``None``); every random draw comes from a Generator built from it.

    Notes
    -----
    A state's meaning comes from the cells allowed in it. States that no cell is pinned to are
    exchangeable under the model unless the allowed states tell them apart: pass ``labels`` and
    ``control`` to :meth:`fit` with one state per perturbation (``state_names``) so that guide
    cells of perturbation ``g`` may only be basal or ``g``.

    Examples
    --------
    >>> model = ScOTGM(random_state=0).fit(adata, labels="gene", control="NT")  # doctest: +SKIP
    >>> model.model  # the pm.Model of the fit  # doctest: +SKIP
    >>> model.fit(adata, labels="gene", control="NT", method="nuts")  # doctest: +SKIP
    """

    def __init__(
        self,
        n_states: int | None = None,
        *,
        model_config: dict | None = None,
        sampler_config: dict | None = None,
        covariance: str | None = None,
        state_names: list[str] | None = None,
        prior: str | None = None,
        regularization: float | None = None,
        kappa: float | None = None,
        extra_dof: int | None = None,
        dirichlet: float | None = None,
        mean_parametrization: str | None = None,
        shift_sd: float | list[float] | None = None,
        m_step: str = "map",
        max_iter: int = 500,
        tol: float = 1e-8,
        n_init: int = 4,
        draws: int | None = None,
        tune: int | None = None,
        chains: int | None = None,
        random_state: int | None = 0,
    ):
        config = dict(model_config or {})
        for key, value in (("n_states", n_states), ("covariance", covariance), ("state_names", state_names),
                           ("prior", prior), ("regularization", regularization), ("kappa", kappa), ("extra_dof", extra_dof),
                           ("dirichlet", dirichlet), ("mean_parametrization", mean_parametrization),
                           ("shift_sd", shift_sd)):
            if value is not None:
                config[key] = value
        self.model_config = _check_model_config(config)
        sampler = {**DEFAULT_SAMPLER_CONFIG, **(sampler_config or {})}
        for key, value in (("draws", draws), ("tune", tune), ("chains", chains)):
            if value is not None:
                sampler[key] = value
        for key in ("draws", "tune", "chains"):
            if isinstance(sampler[key], bool) or int(sampler[key]) != sampler[key] or sampler[key] < (key != "tune"):
                raise ValueError(f"{key} must be a {'non-negative' if key == 'tune' else 'positive'} integer, "
                                 f"got {sampler[key]!r}.")
            sampler[key] = int(sampler[key])
        self.sampler_config = sampler
        if m_step not in ("map", "paper"):
            raise ValueError(f"m_step must be 'map' or 'paper', got {m_step!r}.")
        if random_state is not None and (isinstance(random_state, bool) or not isinstance(random_state, (int, np.integer))):
            raise TypeError(
                "random_state must be an int or None (it is stored with the model so that fits "
                f"can be reproduced), got {type(random_state).__name__}."
            )
        self.settings: dict[str, Any] = {
            "m_step": str(m_step),
            "max_iter": int(max_iter),
            "tol": float(tol),
            "n_init": int(n_init),
            "random_state": None if random_state is None else int(random_state),
        }
        self.idata: xr.DataTree | None = None
        self._model = None
        self._data: dict | None = None

    @property
    def n_states(self) -> int:
        return self.model_config["n_states"]

    @property
    def state_names(self) -> list[str]:
        return self.model_config["state_names"]

    # ------------------------------------------------------------------ data
    def _resolve_data(self, data, fixed_state=None, allowed_states=None, labels=None, control=None,
                      obsm_key: str = "X_pca") -> dict:
        """Scores, the allowed-state mask, cell names and PCA info from an ndarray or an AnnData."""
        pca: dict[str, np.ndarray] = {}
        is_adata = hasattr(data, "obsm") and hasattr(data, "obs")
        if is_adata:
            if obsm_key not in data.obsm:
                raise KeyError(
                    f"obsm_key {obsm_key!r} not in adata.obsm (keys: {list(data.obsm.keys())}); "
                    "run scanpy.pp.pca first or pass obsm_key=..."
                )
            X = np.asarray(data.obsm[obsm_key], float)
            cells = [str(c) for c in data.obs_names]
            for name, value in (("fixed_state", fixed_state), ("labels", labels)):
                if isinstance(value, str):
                    if value not in data.obs.columns:
                        raise KeyError(f"{name} column {value!r} not in adata.obs; columns are: {list(data.obs.columns)}.")
            if isinstance(fixed_state, str):
                fixed_state = np.asarray(data.obs[fixed_state])
            if isinstance(labels, str):
                labels = np.asarray(data.obs[labels]).astype(str)
            if "PCs" in getattr(data, "varm", {}) and data.varm["PCs"].shape[1] == X.shape[1]:
                pca["pca_loadings"] = np.asarray(data.varm["PCs"], float)
                pca["genes"] = np.asarray([str(g) for g in data.var_names], dtype=object)
            info = data.uns.get("pca", {}) if hasattr(data, "uns") else {}
            for key in ("variance", "variance_ratio"):
                if key in info and np.shape(info[key]) == (X.shape[1],):
                    pca[f"pca_{key}"] = np.asarray(info[key], float)
        else:
            if isinstance(fixed_state, str) or isinstance(labels, str):
                raise TypeError("fixed_state or labels may name an obs column only when data is an AnnData; pass an array.")
            X = np.asarray(data, float)
            if X.ndim != 2:
                raise ValueError(f"data must be a 2-D array (cells x PCs) or an AnnData, got shape {X.shape}.")
            cells = [f"cell_{i}" for i in range(X.shape[0])]
        if not np.all(np.isfinite(X)):
            raise ValueError("data contains non-finite values; remove or impute them before fitting.")
        if labels is not None:
            if fixed_state is not None or allowed_states is not None:
                raise ValueError("pass labels (with control) or fixed_state or allowed_states, not several.")
            allowed_states = self.allowed_from_labels(labels, control)
        elif control is not None:
            raise ValueError("control= needs labels= (the obs column or array of guide labels).")
        fixed, mask = validate_allowed_states(allowed_states, fixed_state, X.shape[0], self.n_states)
        if X.shape[0] < self.n_states + 1:
            raise ValueError(f"need more than {self.n_states} cells to fit {self.n_states} states, got {X.shape[0]}.")
        return {"X": X, "fixed": fixed, "mask": mask, "cells": cells, "pca": pca}

    def allowed_from_labels(self, labels, control) -> np.ndarray:
        """The allowed-state mask of cells labelled by their guide.

        Control cells (``labels == control``) are pinned to the first state (basal). With two
        states every other cell may be basal or perturbed. With more, a cell labelled ``g`` may be
        basal or the state named ``g`` (so ``state_names=["basal", "STAT1", "IRF1"]`` declares
        one perturbed state per perturbation); a label without a state of its name is an error.
        """
        labels = np.asarray(labels).astype(str)
        if control is None:
            raise ValueError("labels= needs control= (the label of the non-targeting control cells).")
        control = str(control)
        if not np.any(labels == control):
            raise ValueError(f"control label {control!r} is not among the labels; found {sorted(set(labels))[:10]}.")
        K = self.n_states
        mask = np.zeros((labels.size, K), bool)
        mask[:, 0] = True
        if K == 2:
            mask[labels != control, 1] = True
            return mask
        names = self.state_names
        missing = sorted(set(labels[labels != control]) - set(names[1:]))
        if missing:
            raise ValueError(f"labels {missing[:5]} name no state; with {K} states, state_names must name one "
                             f"perturbed state per label (state_names={names}), or pass allowed_states.")
        for k, name in enumerate(names[1:], start=1):
            mask[labels == name, k] = True
        return mask

    def _prior(self, X: np.ndarray) -> NormalWishartPrior:
        c = self.model_config
        if c["prior"] == "scaled":
            return scaled_prior(X, c["n_states"], kappa=c["kappa"], extra_dof=c["extra_dof"], dirichlet=c["dirichlet"])
        return default_prior(X, c["n_states"], regularization=c["regularization"], kappa=c["kappa"],
                             extra_dof=c["extra_dof"], dirichlet=c["dirichlet"])

    # ----------------------------------------------------------------- model
    def build_model(self, data, *, fixed_state=None, allowed_states=None, labels=None, control=None,
                    obsm_key: str = "X_pca", counts=None, size_factors=None, dispersion=None, batch=None,
                    genes=None, design=None):
        """The PyMC model of ``data`` under this ``model_config`` (also kept as :attr:`model`).

        Parameters
        ----------
        data
            Cells x PCs ndarray, or an AnnData with the scores in ``.obsm[obsm_key]``.
        fixed_state, allowed_states, labels, control
            Which states each cell may take; see :meth:`fit`.
        obsm_key
            Key of the PCA scores in ``adata.obsm``.
        counts, size_factors, dispersion, batch, genes
            The count layer (see :meth:`fit`).
        design
            The per-cell design matrix (see :meth:`fit`).

        Returns
        -------
        pymc.Model
            Named dims and coords ``state``, ``pc``, ``pc_bis``, ``cell`` (and ``contrast``; with
            counts ``gene``, ``effect_state``, ``feature``; with a design ``covariate``).
        """
        from ._design import resolve_design
        from .graph import _prior_sd

        self._data = self._resolve_data(data, fixed_state, allowed_states, labels, control, obsm_key)
        X = self._data["X"]
        self._data["prior"] = self._prior(X)
        obs = data.obs if hasattr(data, "obsm") and hasattr(data, "obs") else None
        resolved = resolve_design(design, X.shape[0], obs)
        c = self.model_config
        if resolved is not None:
            self._data["design"], self._data["covariates"] = resolved
            self._data["design_sd"] = _prior_sd(c["design_sd"], X.shape[1], "design_sd", X)
        if c["mean_parametrization"] == "shift":
            self._data["shift_sd"] = _prior_sd(c["shift_sd"], X.shape[1], "shift_sd", X)
        if counts is not None:
            from ._counts import resolve_counts

            self._data["counts"] = resolve_counts(counts, self._data["X"].shape[0], size_factors=size_factors,
                                                  dispersion=dispersion, batch=batch, genes=genes,
                                                  fixed=self._data["fixed"], config=self.model_config)
        elif any(v is not None for v in (size_factors, dispersion, batch, genes)):
            raise ValueError("size_factors, dispersion, batch and genes belong to the count layer: pass counts= too.")
        self._model = self._graph(self._data)
        return self._model

    def _graph(self, data: dict):
        from .graph import build_model

        d = data["X"].shape[1]
        coords = {"cell": data["cells"], "pc": [f"PC{j + 1}" for j in range(d)]}
        loadings = data["pca"].get("pca_loadings")
        counts = data.get("counts")
        c = self.model_config
        options = {}
        if c["mean_parametrization"] != "state":
            options.update(mean_parametrization=c["mean_parametrization"], shift_sd=data["shift_sd"])
        if data.get("design") is not None:
            coords["covariate"] = list(data["covariates"])
            options.update(design=data["design"], design_sd=data["design_sd"], design_count_sd=c["design_count_sd"])
        if counts is not None:
            coords["gene"] = list(counts.genes)
            return build_model(
                data["X"], allowed_states=data["mask"], n_states=self.n_states, prior=data["prior"],
                state_names=self.state_names, coords=coords, covariance=self.model_config["covariance"],
                counts=counts.Y, size_factors=counts.size_factors, dispersion=counts.dispersion, batch=counts.batch,
                count_prior=counts.prior, count_evidence=c["count_evidence"], count_likelihood=c["count_likelihood"],
                state_probability=data.get("state_probability") if c["count_evidence"] == "cut" else None, **options,
            )
        if loadings is not None:
            coords["gene"] = [str(g) for g in data["pca"]["genes"]]
        return build_model(
            data["X"], allowed_states=data["mask"], n_states=self.n_states, prior=data["prior"],
            state_names=self.state_names, coords=coords, covariance=self.model_config["covariance"],
            loadings=loadings, **options,
        )

    @property
    def model(self):
        """The ``pm.Model`` of the fitted (or built) data: inspect it (``model.to_graphviz()``),
        extend it (``pm.model.fgraph.clone_model``), sample it. Rebuilt from ``.idata`` after
        :meth:`load`."""
        if self._model is None:
            if self._data is None and self.idata is not None:
                self._data = self._data_from_idata(self.idata, self.model_config)
            if self._data is None:
                raise RuntimeError("no data yet: call .fit(data, ...) or .build_model(data, ...) first.")
            self._model = self._graph(self._data)
        return self._model

    @staticmethod
    def _data_from_idata(idata, config: dict | None = None) -> dict:
        cd = group(idata, "constant_data")
        observed = group(idata, "observed_data")
        prior = NormalWishartPrior(
            mean=cd["prior_mean"].values, kappa=float(cd["prior_kappa"].values), dof=float(cd["prior_dof"].values),
            scale_inv=cd["prior_scale_inv"].values, dirichlet=cd["prior_dirichlet"].values,
        )
        allowed = cd["allowed_states"].values
        fixed, mask = validate_allowed_states(allowed, None, *allowed.shape)
        pca = {}
        out = {"fixed": fixed, "mask": mask, "cells": [str(c) for c in observed["cell"].values], "prior": prior}
        if "XY" in observed:  # a fit with the count layer: scores, then counts
            from ._counts import resolve_counts

            d = cd.sizes["pc"]
            XY = observed["XY"].values
            out["X"] = XY[:, :d]
            labels = np.asarray(cd["batch"].values).astype(str)
            batch = None if len(labels) == 1 else labels[cd["batch_code"].values]
            out["counts"] = resolve_counts(XY[:, d:], XY.shape[0], size_factors=cd["size_factors"].values,
                                           dispersion=cd["dispersion"].values, batch=batch,
                                           genes=np.asarray(cd["gene"].values).astype(str), fixed=fixed,
                                           config=config or DEFAULT_MODEL_CONFIG)
            if "state_probability" in cd:
                out["state_probability"] = np.asarray(cd["state_probability"].values, float)
        else:
            out["X"] = observed["X"].values
            if "pca_loadings" in cd:
                pca = {"pca_loadings": cd["pca_loadings"].values,
                       "genes": np.asarray(cd["gene"].values).astype(str)}
        out["pca"] = pca
        if "design" in cd:
            out["design"] = np.asarray(cd["design"].values, float)
            out["covariates"] = [str(v) for v in cd["covariate"].values]
            out["design_sd"] = np.asarray(cd["design_prior_sd"].values, float)
        if "shift_prior_sd" in cd:
            out["shift_sd"] = np.asarray(cd["shift_prior_sd"].values, float)
        return out

    # ------------------------------------------------------------------- fit
    def fit(
        self,
        data,
        *,
        fixed_state=None,
        allowed_states=None,
        labels=None,
        control=None,
        method: str = "em",
        obsm_key: str = "X_pca",
        progressbar: bool = False,
        model=None,
        counts=None,
        size_factors=None,
        dispersion=None,
        batch=None,
        genes=None,
        design=None,
        **kwargs,
    ) -> ScOTGM:
        """Fit the model.

        Parameters
        ----------
        data
            Cells x PCs ndarray, or an AnnData whose ``.obsm[obsm_key]`` holds the PCA scores
            (``.varm["PCs"]`` and ``.uns["pca"]`` are kept in ``constant_data`` when present).
        fixed_state
            Per-cell ``-1`` (free) or state index ``k`` (pinned, e.g. non-targeting controls in
            state 0); with an AnnData also the name of an ``.obs`` column holding those integers.
        allowed_states
            A boolean ``(cells, states)`` mask of the states each cell may take.
        labels, control
            Guide labels per cell (an ``.obs`` column name or an array) and the control label:
            the mask of :meth:`allowed_from_labels`.
        method
            ``"em"``: the MAP by EM (:func:`scotgm_pp.inference.fit_em`), for the default graph
            only: with ``mean_parametrization="shift"`` or a ``design`` it refuses, naming
            ``"map"`` and ``"nuts"``, which fit those graphs from a start found by EM on the
            default graph (for a design: EM on the scores minus the covariates' least-squares
            offsets, alternated five times; ``design_count_coef`` starts at 0).
            ``"map"``: ``pm.find_MAP`` on :attr:`model`, started from the EM solution (a cold
            start sits on the symmetric saddle where the gradient is zero).
            ``"mcmc"``: conjugate Gibbs sampling (:func:`scotgm_pp.inference.gibbs.sample_gibbs`),
            started from and relabelled to the EM solution; needs every cell free or pinned.
            ``"nuts"``: ``pm.sample`` on :attr:`model` (``sampler_config``), chains started from
            the EM solution through ``initvals`` (jittered).
        obsm_key
            Key of the PCA scores in ``adata.obsm``.
        progressbar
            Show the progress of ``pm.find_MAP``, ``pm.sample`` or the Gibbs sweeps.
        model
            An extension of this data's graph (e.g. ``pm.model.fgraph.clone_model(fit.model)``
            with a variable added or a prior changed), fitted instead of the built graph with
            ``method="nuts"`` or ``"map"``: the variables :func:`build_model` declares start from
            the EM solution of the built graph, the others from PyMC's initial point. EM and Gibbs
            know only the built graph's variables, so ``"em"`` and ``"mcmc"`` refuse a model with
            others, naming them. The extended model becomes :attr:`model` (a saved fit rebuilds
            the built graph on load).
        counts, size_factors, dispersion, batch, genes
            The count observation layer (:mod:`scotgm_pp.models.count_graph`): cells x genes raw
            counts of the same cells, each cell's total count over all its measured genes (the
            offset), the NB dispersion per gene or per batch and gene (default: the moment
            estimates over the cells pinned to the basal state, shrunk toward their trend, per
            batch with ``batch``: :func:`~scotgm_pp.inference.count_layer.control_dispersion_by_batch`), an optional batch label per cell and the genes' names. The graph's
            observed variable is then ``XY`` (the scores, then the counts, per cell); EM follows
            ``model_config["count_evidence"]``; :meth:`effects` reads the state effects.
        design
            An optional per-cell design matrix (batch, covariates) on the state means and, with
            counts, on the log rates: with an AnnData the name of an ``.obs`` column or a list of
            them (categorical, string and boolean columns become one-hot columns without their
            first level, numeric columns are centred), a DataFrame coded the same way (indexed by
            the AnnData's cells), or a cells x covariates array used as it is (no intercept
            column: the state means carry it). The graph gains the data ``design`` (dims
            ``cell, covariate``) and ``design_coef`` (``covariate, pc``), with counts also
            ``design_count_coef`` (``covariate, gene``); the state means are those of a cell whose
            covariates are 0 (reference levels, average numeric covariates). Fitted by ``"map"``
            or ``"nuts"`` only (EM fits the graph without a design); ``constant_data["design"]``
            keeps it, so :meth:`load` rebuilds the same graph.
        **kwargs
            ``random_seed`` (PyMC's name) seeds this fit in place of the ``random_state`` setting;
            the rest go to ``fit_em`` (``"em"``: ``max_iter``, ``tol``, ``n_init``, ``init_responsibilities``),
            ``pm.find_MAP`` (``"map"``), ``sample_gibbs`` (``"mcmc"``: ``draws``, ``tune``,
            ``chains``) or ``pm.sample`` (``"nuts"``); a keyword the method does not take is an
            error naming the ones it does.

        Returns
        -------
        ScOTGM
            ``self``, with ``.idata`` and ``.model`` set. ``"mcmc"`` and ``"nuts"`` warn
            (:class:`ConvergenceWarning`) when a parameter's R-hat exceeds 1.01 or its bulk ESS is
            below 400.
        """
        if method not in _METHODS:
            raise ValueError(f"method must be one of {', '.join(map(repr, _METHODS))}; got {method!r}.")
        seed = kwargs.pop("random_seed", None)
        _check_method_kwargs(method, kwargs)
        changes = _graph_changes(self.model_config, design is not None)
        if changes and method in ("em", "mcmc"):
            backend = "EM" if method == "em" else "the conjugate Gibbs sampler"
            raise ValueError(f"method={method!r} ({backend}) fits only the default graph "
                             f"(mean_parametrization='state', no design), not one with {' and '.join(changes)}: "
                             "call fit(..., method='map') or fit(..., method='nuts').")
        self.build_model(data, fixed_state=fixed_state, allowed_states=allowed_states, labels=labels,
                         control=control, obsm_key=obsm_key, counts=counts, size_factors=size_factors,
                         dispersion=dispersion, batch=batch, genes=genes, design=design)
        if model is not None:
            self._model = self._check_extension(model, method)
        data = self._data
        s, K = self.settings, self.n_states
        X, fixed, mask, prior = data["X"], data["fixed"], data["mask"], data["prior"]
        cov_type = self.model_config["covariance"]
        rng = np.random.default_rng(s["random_state"] if seed is None else seed)
        counts_in = data.get("counts")
        if method == "mcmc" and np.any(fixed == -2):
            raise ValueError("method='mcmc' (conjugate Gibbs) needs every cell free or pinned; cells allowed a subset "
                             "of the states make the weights non-conjugate. Use method='nuts' (or 'em' for the MAP).")
        if counts_in is not None and (method == "mcmc" or np.any(fixed == -2)):
            raise ValueError("with counts, fit by method='em', 'map' or 'nuts', with every cell free or pinned (the "
                             "conjugate Gibbs sampler and restricted state sets know only the Gaussian graph).")
        em_kwargs = dict(
            allowed_states=mask, n_states=K, prior=prior, regularization=s["m_step"], covariance=cov_type,
            max_iter=s["max_iter"], tol=s["tol"], n_init=s["n_init"], random_state=rng,
        )
        em_kwargs.update(kwargs if method == "em" else {})
        count_fit = None
        design_coefs = None
        if data.get("design") is not None:
            # the start of MAP / NUTS: EM of the default graph on the scores minus the design's offsets
            coef = _design_start(X, data["design"], em_kwargs)
            design_coefs = {"design_coef": coef}
            X = X - data["design"] @ coef
        if counts_in is None:
            em = fit_em(X, **em_kwargs)
        else:
            from ..inference.joint_em import fit_joint_em

            evidence = {"cut": "gaussian", "joint": "joint"}[self.model_config["count_evidence"]]
            count_fit = fit_joint_em(X, counts_in.Y, size_factors=counts_in.size_factors,
                                     dispersion=counts_in.dispersion, fixed_state=fixed, n_states=K,
                                     batch=counts_in.batch, prior=prior, count_prior=counts_in.prior,
                                     covariance=cov_type, evidence=evidence, regularization=s["m_step"],
                                     count_likelihood=self.model_config["count_likelihood"],
                                     max_iter=em_kwargs["max_iter"], tol=em_kwargs["tol"])
            em = count_fit.gaussian
            if self.model_config["count_evidence"] == "cut":
                # the cut graph's fixed state probabilities: the states EM found from the scores
                self._set_state_probability(em.responsibilities)
        groups: dict[str, Any] = {}
        match method:
            case "em":
                lp = em.logp if count_fit is None else self._graph_logp(em, count_fit.counts)
                groups[POINT_GROUP] = self._point_dataset(em.weights, em.means, em.covariances, lp,
                                                          counts=None if count_fit is None else count_fit.counts)
            case "map":
                point, lp = self._find_map(em, progressbar, kwargs, None if count_fit is None else count_fit.counts,
                                           design_coefs)
                groups[POINT_GROUP] = point
            case "mcmc":
                from ..inference.gibbs import sample_gibbs

                opts = {k: self.sampler_config[k] for k in ("draws", "tune", "chains")}
                opts.update(kwargs)
                g = sample_gibbs(X, fixed_state=fixed, n_states=K, prior=prior, init=em, random_state=rng,
                                 progressbar=progressbar, covariance=cov_type, **opts)
                groups["posterior"] = self._posterior_dataset(g.weights, g.means, g.covariances)
                groups["sample_stats"] = xr.Dataset({"lp": (("chain", "draw"), g.lp),
                                                     "relabelled": (("chain", "draw"), g.relabelled)})
            case "nuts":
                groups.update(self._sample_nuts(em, rng, progressbar, kwargs,
                                                None if count_fit is None else count_fit.counts, design_coefs, X))
        em_group = {
            "logp_trace": (("em_iteration",), em.logp_trace),
            "n_iter": ((), int(em.n_iter)),
            "converged": ((), np.int8(em.converged)),
            "responsibilities": (("cell", "state"), em.responsibilities),
        }
        if count_fit is not None and not changes:
            em_group["effect_se"] = (("effect_state", "gene"), count_fit.effect_se[1:])
        groups["em"] = xr.Dataset(em_group, coords={"cell": data["cells"], "state": self.state_names,
                                                    **({} if count_fit is None else {
                                                        "gene": counts_in.genes,
                                                        "effect_state": self.state_names[1:]})})
        if changes:
            groups["em"].attrs["role"] = (
                "the starting point of this fit: EM of the default graph"
                + (" on the scores minus the design's starting offsets" if design_coefs is not None else "")
                + ", not the MAP of the fitted graph")
        self.idata = self._assemble(method, groups)
        if method == "mcmc":
            set_group(self.idata, "log_likelihood", self._log_likelihood(group(self.idata, "posterior")))
        if method in ("mcmc", "nuts"):
            check_convergence(self.idata, f"ScOTGM.fit(method={method!r})")
        if not np.any(fixed < 0):
            warnings.warn("no cell is free to take more than one state: the weights are their Dirichlet prior "
                          "(result attrs 'weights_from_prior_only'), not an estimate from these cells.",
                          UserWarning, stacklevel=2)
        return self

    def _set_state_probability(self, R: np.ndarray) -> None:
        """Give the cut graph (and an extension of it) the state probabilities its count layer is
        weighted by (the weighted likelihood) or integrated over (the marginal one)."""
        import pymc as pm

        self._data["state_probability"] = np.asarray(R, float)
        model = self._model
        if model is not None and "state_probability" in model.named_vars:
            pm.set_data({"state_probability": self._data["state_probability"]}, model=model)

    def _check_extension(self, model, method: str):
        import pymc as pm

        from .graph import known_free_variables

        if not isinstance(model, pm.Model):
            raise TypeError(f"model must be a pymc.Model (an extension of ScOTGM.model), got {type(model).__name__}.")
        name = self._observed_name
        if name not in model.named_vars or model.named_vars[name] not in model.observed_RVs:
            raise ValueError(f"model has no observed variable {name!r}; extend the graph of ScOTGM.model "
                             "(pm.model.fgraph.clone_model(fit.model)) so that it observes the same cells.")
        observed = model.rvs_to_values[model.named_vars[name]]
        shape = tuple(np.shape(observed.data if hasattr(observed, "data") else observed.eval()))
        counts = self._data.get("counts")
        expected = self._data["X"].shape if counts is None else (self._data["X"].shape[0],
                                                                  self._data["X"].shape[1] + counts.Y.shape[1])
        if shape != expected:
            raise ValueError(f"model observes {name} of shape {shape} but the data has {expected}.")
        unknown = sorted(v.name for v in model.free_RVs
                         if v.name not in known_free_variables(self.n_states) | _COUNT_VARIABLES)
        if unknown and method in ("em", "mcmc"):
            raise ValueError(f"method={method!r} knows only the variables build_model declares; the model adds "
                             f"{unknown}. Fit it with method='nuts' (or 'map').")
        return model

    def _find_map(self, em, progressbar, kwargs, counts=None, design_coefs=None):
        """``pm.find_MAP`` on :attr:`model` from the EM point: every variable of the model's MAP
        (an extension's too) in the point group, with ``lp`` (the graph's log density) and, for
        the built graph only, ``lp_gain_over_em`` (a gain is only meaningful within one model)."""
        import pymc as pm

        from ._counts import count_params_from
        from .graph import model_point

        model = self.model
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Support point not defined", category=UserWarning)
            initial = model.initial_point(random_seed=0)
        start = initial | model_point(model, em.weights, em.means, np.linalg.inv(em.covariances), counts,
                                      unknown="skip", design_coefs=design_coefs)
        opts = {"jitter": False, **kwargs}
        out = pm.find_MAP(initvals=start, model=model, progressbar=progressbar, return_inferencedata=True, **opts)
        point = group(out, "posterior").isel(chain=0, draw=0, drop=True)
        lp = -float(group(out, "optimizer_result")["fun"])
        ds = self._point_dataset(point["weights"].values, point["means"].values, point["covariances"].values, lp,
                                 counts=None if counts is None else count_params_from(point, self.n_states))
        extra = [v for v in point.data_vars if v not in ds]
        ds = ds.assign({v: point[v] for v in extra})
        if not self._extended() and not _graph_changes(self.model_config, self._data.get("design") is not None):
            em_lp = em.logp if counts is None else self._graph_logp(em, counts)
            ds["lp_gain_over_em"] = ((), lp - em_lp)
        return ds, lp

    def _extended(self) -> bool:
        """Whether :attr:`model` has variables the built graph does not declare (an extension)."""
        from .graph import known_free_variables

        model = self._model
        return model is not None and any(v.name not in known_free_variables(self.n_states) | _COUNT_VARIABLES
                                         for v in model.free_RVs)

    def _graph_logp(self, em, counts) -> float:
        """The joint graph's log density (untransformed space) at a point with counts."""
        from ..inference.joint_em import joint_log_density

        data = self._data
        c = data["counts"]
        return float(joint_log_density(data["X"], c.Y, size_factors=c.size_factors, dispersion=c.dispersion,
                                       weights=em.weights, means=em.means, covariances=em.covariances, params=counts,
                                       prior=data["prior"], count_prior=c.prior, fixed_state=data["fixed"],
                                       batch=c.batch, covariance=self.model_config["covariance"],
                                       state_probability=data.get("state_probability")
                                       if self.model_config["count_evidence"] == "cut" else None,
                                       count_likelihood=self.model_config["count_likelihood"]))

    def _dispersed_starts(self, em, rng, chains: int, X: np.ndarray | None = None) -> list:
        """Chain 0 starts at the EM solution; every other chain at the EM solution reached from
        random state assignments of the free cells, so chains that settle in different modes
        disagree (R-hat sees it) instead of all leaving from one. ``X``: the scores EM runs on
        (default the data's; the scores minus the design's starting offsets for a design)."""
        data = self._data
        starts = [em]
        X = data["X"] if X is None else X
        fixed, mask = data["fixed"], data["mask"]
        for _ in range(1, chains):
            R0 = rng.dirichlet(np.ones(self.n_states), size=X.shape[0]) * mask
            R0 /= R0.sum(axis=1, keepdims=True)
            starts.append(fit_em(X, allowed_states=mask, n_states=self.n_states, prior=data["prior"],
                                 regularization=self.settings["m_step"], covariance=self.model_config["covariance"],
                                 max_iter=self.settings["max_iter"], tol=self.settings["tol"],
                                 init_responsibilities=R0))
        return starts

    def _sample_nuts(self, em, rng, progressbar, kwargs, counts=None, design_coefs=None, X=None) -> dict:
        import pymc as pm
        from threadpoolctl import threadpool_limits

        from .graph import initial_values

        model = self.model
        cfg = {**self.sampler_config, **kwargs}
        chains = int(cfg.pop("chains"))
        starts = self._dispersed_starts(em, rng, chains, X) if "initvals" not in cfg else None
        initvals = cfg.pop("initvals", None) or [
            initial_values(model, e.weights, e.means, np.linalg.inv(e.covariances), counts, unknown="skip",
                           design_coefs=design_coefs)
            for e in starts]
        seed = int(rng.integers(2**31))
        idata_kwargs = cfg.pop("idata_kwargs", {})
        # One BLAS thread: numpy's and scipy's OpenBLAS pools otherwise spin against each other
        # on the many small matrix ops of the gradient (60x slower on a busy 2-core machine).
        with threadpool_limits(limits=1, user_api="blas"), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Support point not defined", category=UserWarning)
            idata = pm.sample(model=model, chains=chains, cores=cfg.pop("cores", 1), initvals=initvals,
                              random_seed=seed, progressbar=progressbar, idata_kwargs=idata_kwargs,
                              compute_convergence_checks=False, **cfg)
        groups = {name: group(idata, name) for name in ("posterior", "sample_stats")}
        groups["log_likelihood"] = self._log_likelihood(groups["posterior"])
        return groups

    @property
    def _observed_name(self) -> str:
        return "X" if (self._data or {}).get("counts") is None else "XY"

    def _log_likelihood(self, posterior) -> xr.Dataset:
        """Per-cell log-likelihood of the observed variable (``X``, or ``XY`` with counts) at every
        draw, by the graph's own compiled logp."""
        import pymc as pm

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning)
            ll = pm.compute_log_likelihood(make_tree({"posterior": posterior}), model=self.model,
                                           var_names=[self._observed_name], extend_inferencedata=False,
                                           progressbar=False)
        return ll.to_dataset() if isinstance(ll, xr.DataTree) else ll

    # ------------------------------------------------------------ result tree
    def _named_parameters(self, weights, means, covs) -> dict[str, tuple[tuple[str, ...], np.ndarray]]:
        """Arrays ``(..., K)``, ``(..., K, d)``, ``(..., K, d, d)`` as the graph's variables."""
        K = self.n_states
        lead = weights.shape[:-1]
        L = tuple("chain draw".split()[: len(lead)]) if lead else ()
        precs = np.linalg.inv(covs)
        precs = 0.5 * (precs + np.swapaxes(precs, -1, -2))
        out = {
            "weights": (L + ("state",), weights),
            "means": (L + ("state", "pc"), means),
            "precisions": (L + ("state", "pc", "pc_bis"), precs),
            "covariances": (L + ("state", "pc", "pc_bis"), covs),
        }
        for k in range(K):
            out[f"mean_{k}"] = (L + ("pc",), means[..., k, :])
        if self.model_config["covariance"] == "tied":
            out["precision"] = (L + ("pc", "pc_bis"), precs[..., 0, :, :])
        else:
            for k in range(K):
                out[f"precision_{k}"] = (L + ("pc", "pc_bis"), precs[..., k, :, :])
        pairs = default_contrasts(K)
        if pairs:
            a = np.array([p[0] for p in pairs])
            b = np.array([p[1] for p in pairs])
            out["perturbation_mean"] = (L + ("contrast", "pc"), means[..., a, :] - means[..., b, :])
            out["perturbation_cov_independent"] = (L + ("contrast", "pc", "pc_bis"), covs[..., a, :, :] + covs[..., b, :, :])
            V = (self._data or {}).get("pca", {}).get("pca_loadings")
            if V is not None:
                out["perturbation_gene_mean"] = (L + ("contrast", "gene"), (means[..., a, :] - means[..., b, :]) @ V.T)
        return out

    def _coords(self, d: int) -> dict:
        names = self.state_names
        pcs = [f"PC{j + 1}" for j in range(d)]
        coords = {"state": names, "pc": pcs, "pc_bis": pcs}
        pca = (self._data or {}).get("pca", {})
        if "pca_loadings" in pca:
            coords["gene"] = [str(g) for g in pca["genes"]]
        pairs = default_contrasts(self.n_states)
        if pairs:
            coords["contrast"] = [f"{names[i]} - {names[j]}" for i, j in pairs]
        counts = (self._data or {}).get("counts")
        if counts is not None:
            coords["gene"] = list(counts.genes)
            coords["effect_state"] = names[1:]
            labels = counts.batch_labels
            if len(labels) > 1:
                coords["batch_offset"] = labels[1:]
        if (self._data or {}).get("design") is not None:
            coords["covariate"] = list(self._data["covariates"])
        return coords

    def _point_dataset(self, weights, means, covs, lp, counts=None, **extra) -> xr.Dataset:
        from ._counts import count_variables

        variables = self._named_parameters(np.asarray(weights), np.asarray(means), np.asarray(covs))
        if counts is not None:
            variables.update(count_variables(counts))
        variables["lp"] = ((), float(lp))
        for key, value in extra.items():
            variables[key] = ((), float(value))
        return xr.Dataset(variables, coords=self._coords(np.shape(means)[-1]))

    def _posterior_dataset(self, weights, means, covs) -> xr.Dataset:
        C, D = weights.shape[:2]
        coords = {"chain": np.arange(C), "draw": np.arange(D), **self._coords(means.shape[-1])}
        return xr.Dataset(self._named_parameters(weights, means, covs), coords=coords)

    def _assemble(self, method: str, groups: dict) -> xr.DataTree:
        data = self._data
        X, mask, cells, pca, prior = data["X"], data["mask"], data["cells"], data["pca"], data["prior"]
        d = X.shape[1]
        names = self.state_names
        pcs = [f"PC{j + 1}" for j in range(d)]
        counts = data.get("counts")
        if counts is None:
            observed = xr.Dataset({"X": (("cell", "pc"), X)}, coords={"cell": cells, "pc": pcs})
        else:
            observed = xr.Dataset({"XY": (("cell", "feature"), np.hstack([X, counts.Y]))},
                                  coords={"cell": cells, "feature": pcs + list(counts.genes)})
        const = {
            "allowed_states": (("cell", "state"), mask.astype(np.int8)),
            "prior_mean": (("pc",), np.asarray(prior.mean, float)),
            "prior_scale_inv": (("pc", "pc_bis"), np.asarray(prior.scale_inv, float)),
            "prior_dirichlet": (("state",), np.asarray(prior.dirichlet, float)),
            "prior_kappa": ((), float(prior.kappa)),
            "prior_dof": ((), float(prior.dof)),
        }
        const_coords = {"cell": cells, "pc": pcs, "pc_bis": pcs, "state": names}
        if "pca_loadings" in pca:
            const["pca_loadings"] = (("gene", "pc"), pca["pca_loadings"])
            const_coords["gene"] = pca["genes"].tolist()
        for key in ("pca_variance", "pca_variance_ratio"):
            if key in pca:
                const[key] = (("pc",), pca[key])
        if counts is not None:
            from ..inference.count_layer import batch_codes

            const["size_factors"] = (("cell",), counts.size_factors)
            const["dispersion"] = (("batch", "gene") if counts.dispersion.ndim == 2 else ("gene",), counts.dispersion)
            const["batch_code"] = (("cell",), batch_codes(counts.batch, len(cells))[0].astype(np.int64))
            if data.get("state_probability") is not None and self.model_config["count_evidence"] == "cut":
                const["state_probability"] = (("cell", "state"), data["state_probability"])
            const_coords["gene"] = list(counts.genes)
            const_coords["batch"] = counts.batch_labels
        if data.get("design") is not None:
            const["design"] = (("cell", "covariate"), data["design"])
            const["design_prior_sd"] = (("pc",), data["design_sd"])
            const_coords["covariate"] = list(data["covariates"])
        if data.get("shift_sd") is not None:
            const["shift_prior_sd"] = (("pc",), data["shift_sd"])
        groups["observed_data"] = observed
        groups["constant_data"] = xr.Dataset(const, coords=const_coords)
        attrs = {
            "model_config": json.dumps(self.model_config, sort_keys=True),
            "sampler_config": json.dumps(self.sampler_config, sort_keys=True),
            "settings": json.dumps(self.settings, sort_keys=True),
            "method": method,
            "model": "scotgm_pp.models.ScOTGM",
            "format_version": str(_FORMAT_VERSION),
            "weights_from_prior_only": int(not np.any(data["fixed"] < 0)),
        }
        if self._extended():
            from .graph import known_free_variables

            attrs["extension_variables"] = json.dumps(sorted(
                v.name for v in self.model.free_RVs if v.name not in known_free_variables(self.n_states)
                | _COUNT_VARIABLES))
        # "map_estimate" and "em" are groups of this package beside ArviZ's standard ones
        return make_tree(groups, attrs)

    def _require_fit(self) -> xr.DataTree:
        if not (has_group(self.idata, "posterior") or has_group(self.idata, POINT_GROUP)):
            raise RuntimeError("the model is not fitted; call .fit(data, ...) or ScOTGM.load(path) first.")
        return self.idata

    def _parameter_draws(self, draws: int | None = None) -> xr.Dataset:
        """The fit's parameters with ``chain`` and ``draw`` dims (a point estimate as one draw)."""
        idata = self._require_fit()
        if has_group(idata, "posterior"):
            post = group(idata, "posterior")
            if draws is not None:
                if int(draws) < 1:
                    raise ValueError(f"draws must be a positive integer, got {draws!r}.")
                keep = np.unique(np.linspace(0, post.sizes["draw"] - 1, min(int(draws), post.sizes["draw"])).astype(int))
                post = post.isel(draw=keep)
            return post
        point = group(idata, POINT_GROUP)
        names = [v for v in point.data_vars if v not in ("lp", "lp_gain_over_em")]
        return point[names].expand_dims(chain=[0], draw=[0])

    def point_as_posterior(self) -> xr.DataTree:
        """The fit as a trace PyMC's functions take (``pm.sample_posterior_predictive(
        fit.point_as_posterior(), model=fit.model)``): a sampler's ``posterior``, or the EM / MAP
        point estimate as a one-draw ``posterior`` (kept out of :attr:`idata`, whose
        ``posterior`` group holds draws only)."""
        return make_tree({"posterior": self._parameter_draws(),
                          "observed_data": group(self._require_fit(), "observed_data")})

    def _draws(self):
        post = self._parameter_draws()
        K = self.n_states
        d = post.sizes["pc"]
        w = post["weights"].values.reshape(-1, K)
        m = post["means"].values.reshape(-1, K, d)
        c = post["covariances"].values.reshape(-1, K, d, d)
        return w, m, c

    # ------------------------------------------------------------ results
    @property
    def method(self) -> str:
        """How the model was fitted: ``"em"``, ``"map"``, ``"mcmc"`` or ``"nuts"``."""
        return str(self._require_fit().attrs["method"])

    def predict_proba(self, X, *, obsm_key: str = "X_pca") -> np.ndarray:
        """Posterior state probabilities of new cells (all treated as free).

        Parameters
        ----------
        X
            Cells x PCs in the fitted PCA space, or an AnnData (``.obsm[obsm_key]``).
        obsm_key
            Key of the PCA scores when ``X`` is an AnnData.

        Returns
        -------
        numpy.ndarray
            ``(n, K)``; averaged over the posterior draws (a single draw for EM and MAP).
        """
        self._refuse_extension("predict_proba", "pm.sample_posterior_predictive or pm.compute_log_likelihood on "
                               "fit.model")
        if self._ensure_data().get("design") is not None:
            raise ValueError("predict_proba takes scores only, and this fit's graph has a design (every cell's mean "
                             "moves with its covariates); use fit.responsibilities for the fitted cells, or build a "
                             "model of the new cells with their design.")
        if hasattr(X, "obsm"):
            if obsm_key not in X.obsm:
                raise KeyError(f"obsm_key {obsm_key!r} not in adata.obsm (keys: {list(X.obsm.keys())}).")
            X = X.obsm[obsm_key]
        X = np.asarray(X, float)
        w, m, c = self._draws()
        if X.ndim != 2 or X.shape[1] != m.shape[2]:
            raise ValueError(f"X must be cells x {m.shape[2]} PCs (the fitted space), got shape {X.shape}.")
        out = np.zeros((X.shape[0], m.shape[1]))
        for s in range(len(w)):
            out += free_responsibilities(X, w[s], m[s], c[s])
        return out / len(w)

    @property
    def responsibilities(self) -> np.ndarray:
        """State probabilities of the training cells ``(n, K)`` given the states each may take
        (pinned cells are one-hot), averaged over the posterior draws.

        The evidence is the graph's: the scores, and with counts and ``count_evidence="joint"``
        their count log-likelihood too; with ``count_evidence="cut"`` the scores alone (an EM fit
        reports its own states). A graph with a design gets them from the graph's
        own per-state log terms (:func:`~scotgm_pp.models.graph.state_log_terms_function`), its
        cells' means moved by their covariates. An extended graph is refused (its
        responsibilities depend on variables these formulas do not know)."""
        from ..inference.em import _log_gaussians, _mixture_terms

        self._require_fit()
        self._refuse_extension("responsibilities", "pm.compute_log_likelihood on fit.model")
        data = self._ensure_data()
        if data.get("design") is not None:
            return self._graph_responsibilities()
        X, fixed, mask, counts = data["X"], data["fixed"], data["mask"], data.get("counts")
        cut = counts is not None and self.model_config["count_evidence"] == "cut"
        if cut and self.method == "em":
            return group(self.idata, "em")["responsibilities"].values
        K = self.n_states
        w, m, c = self._draws()
        if cut:
            counts = None  # the cut graph's states see the scores only
        if counts is not None:
            from ..inference import count_fit
            from ..inference.count_layer import CountData
            from ._counts import count_params_from

            cdata = CountData(counts.Y, counts.size_factors, counts.dispersion, fixed, K, counts.batch)
            post = self._parameter_draws().stack(sample=("chain", "draw"))
        out = np.zeros((X.shape[0], K))
        for s in range(len(w)):
            logN = _log_gaussians(X, m[s], c[s])
            if counts is not None:
                # the graph's NB terms of every cell under each state (NaN: a pinned cell's other states)
                rows = count_fit.evaluate(cdata, count_params_from(post.isel(sample=s), K)).row_loglik
                logN = logN + np.nan_to_num(rows, nan=-np.inf)
            out += _mixture_terms(logN, w[s], fixed == -1, fixed, mask)[1]
        return out / len(w)

    def _graph_responsibilities(self) -> np.ndarray:
        """State probabilities of the training cells from the graph's own per-state log terms
        (:func:`~scotgm_pp.models.graph.state_log_terms_function`), averaged over the draws: the
        rule for a graph with a design, whose cells' means move with their covariates."""
        from scipy.special import softmax

        from .graph import state_log_terms_function

        model = self.model
        evaluate = state_log_terms_function(model)
        post = self._parameter_draws().stack(sample=("chain", "draw"))
        names = [rv.name for rv in model.free_RVs]
        missing = [v for v in names if v not in post]
        if missing:
            raise ValueError(f"the fit holds no values of {missing}; refit the model.")
        S = post.sizes["sample"]
        out = np.zeros((self._data["X"].shape[0], self.n_states))
        for s in range(S):
            terms = evaluate({v: post[v].isel(sample=s).values for v in names})
            out += softmax(terms, axis=1)
        return out / S

    def _ensure_data(self) -> dict:
        if self._data is None:
            self._data = self._data_from_idata(self._require_fit(), self.model_config)
        return self._data

    def _refuse_extension(self, what: str, instead: str) -> None:
        """An extended graph's answers come from PyMC on the graph, not from this class's formulas."""
        extension = json.loads(self.idata.attrs.get("extension_variables", "[]")) if self.idata is not None else []
        if self._extended() or extension:
            names = extension or sorted(v.name for v in self.model.free_RVs)
            raise ValueError(f"{what} knows only the built graph, and this fit's graph is extended ({names}); "
                             f"use {instead} instead.")

    # ------------------------------------------------------------ count layer
    def effects(self, *, ci: float = 0.9) -> pd.DataFrame:
        """The count layer's state effects of every gene, with the screen's columns.

        Returns
        -------
        pandas.DataFrame
            One row per non-basal state and gene: ``effect`` (natural-log fold change against the
            basal state: the point estimate of EM / MAP, the posterior mean of a sampled fit),
            ``effect_se`` (EM: the screen's standard error, Louis' for the marginal cut, imputation-corrected for the weighted cut,
            Louis' for the joint fit; MAP and samplers: the posterior standard deviation of
            the draws, or, for MAP, of the normal approximation at EM; NaN for a MAP of a graph
            EM does not fit, with ``mean_parametrization="shift"`` or a design), ``effect_z``,
            ``effect_bound``, ``effect_pvalue`` and a ``ci`` interval ``lower`` / ``upper``.
        """
        from ._counts import effects_frame

        idata = self._require_fit()
        counts = self._ensure_data().get("counts")
        if counts is None:
            raise ValueError("this fit has no count layer; fit with counts=... (or sg.tl.get_model(..., counts=True)).")
        K = self.n_states
        if has_group(idata, "posterior"):
            d = group(idata, "posterior")["delta"].values.reshape(-1, K - 1, len(counts.genes))
            draws = np.concatenate([np.zeros((d.shape[0], 1, d.shape[2])), d], axis=1)
            return effects_frame(counts.genes, self.state_names, draws.mean(axis=0), draws.std(axis=0, ddof=1),
                                 draws=draws, ci=ci)
        point = group(idata, POINT_GROUP)
        delta = np.vstack([np.zeros((1, len(counts.genes))), point["delta"].values])
        em = group(idata, "em")
        # a MAP of the shift or design graph has no EM standard error of its own: NaN (sample with NUTS)
        em_se = em["effect_se"].values if "effect_se" in em else np.full((K - 1, len(counts.genes)), np.nan)
        se = np.vstack([np.full((1, len(counts.genes)), np.nan), em_se])
        return effects_frame(counts.genes, self.state_names, delta, se, ci=ci)

    def effect(self, gene: str, state: int | str = 1) -> pd.Series:
        """One gene's row of :meth:`effects` in ``state`` (default the first perturbed state)."""
        table = self.effects()
        name = self.state_names[self._state_index(state)]
        row = table[(table["gene"] == str(gene)) & (table["state"] == name)]
        if row.empty:
            genes = list(table["gene"].unique())
            raise KeyError(f"gene {gene!r} is not in the count layer (genes: {genes[:10]}{' ...' if len(genes) > 10 else ''}).")
        return row.iloc[0]

    def perturbation(self, state: int | str = 1, reference: int | str = 0) -> PerturbationDistribution:
        """Distribution of ``Z = mu_state - mu_reference`` under the independent coupling.

        Parameters
        ----------
        state, reference
            State indices or names (default: perturbed vs basal).

        Returns
        -------
        PerturbationDistribution
            Mean ``mu_state - mu_reference`` and covariance ``Sigma_state + Sigma_reference``,
            averaged over posterior draws, and the per-draw values.
        """
        names = self.state_names
        a, b = (self._state_index(x) for x in (state, reference))
        if a == b:
            raise ValueError(f"state and reference must differ, both are {names[a]!r}.")
        _, m, c = self._draws()
        md = m[:, a] - m[:, b]
        cd = c[:, a] + c[:, b]
        return PerturbationDistribution(md.mean(0), cd.mean(0), md, cd, names[a], names[b])

    def _state_index(self, state: int | str) -> int:
        names = self.state_names
        if isinstance(state, str):
            if state not in names:
                raise ValueError(f"state {state!r} unknown; states are {names}.")
            return names.index(state)
        k = int(state)
        if not 0 <= k < len(names):
            raise ValueError(f"state index {k} out of range 0..{len(names) - 1}.")
        return k

    def sample_prior_predictive(
        self,
        draws: int = 500,
        *,
        random_state: int | np.random.Generator | None = None,
        extend_inferencedata: bool = True,
        random_seed: int | np.random.Generator | None = None,
    ) -> xr.DataTree:
        """Draws of the parameters from the prior and of the cells from them, by
        ``pm.sample_prior_predictive`` on :attr:`model`.

        Parameters
        ----------
        draws
            Number of prior draws.
        random_state, random_seed
            Seed or Generator (``random_seed`` is PyMC's name for it; give one of the two);
            defaults to the model's ``random_state`` setting.
        extend_inferencedata
            Also add the ``prior`` and ``prior_predictive`` groups to ``self.idata`` (replacing
            ones that are there); an unfitted model with built data gets an ``idata`` holding them.

        Returns
        -------
        xarray.DataTree
            ``prior`` (every parameter under its graph name) and ``prior_predictive`` (``X``,
            dims ``chain, draw, cell, pc``), with ``observed_data``.
        """
        import pymc as pm

        if isinstance(draws, bool) or int(draws) != draws or draws < 1:
            raise ValueError(f"draws must be a positive integer, got {draws!r}.")
        random_state = _one_seed(random_state, random_seed)
        rng = np.random.default_rng(self.settings["random_state"] if random_state is None else random_state)
        model = self.model
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Support point not defined", category=UserWarning)
            out = pm.sample_prior_predictive(draws=int(draws), model=model, random_seed=rng)
        if extend_inferencedata:
            if self.idata is None:
                self.idata = make_tree({"observed_data": group(out, "observed_data")}, attrs={
                    "model_config": json.dumps(self.model_config, sort_keys=True), "model": "scotgm_pp.models.ScOTGM"})
            for name in ("prior", "prior_predictive"):
                set_group(self.idata, name, group(out, name))
        return out

    def sample_posterior_predictive(
        self,
        n: int | None = None,
        *,
        state: int | str | None = None,
        draws: int | None = None,
        random_state: int | np.random.Generator | None = None,
        extend_inferencedata: bool = False,
        random_seed: int | np.random.Generator | None = None,
    ) -> xr.DataTree:
        """Posterior predictive draws of the state model's cells (PCA scores), as a DataTree.

        For every posterior draw (chains and draws kept), cells get a state and then
        ``x ~ N(mu_state, Sigma_state)`` from that draw, so parameter uncertainty is carried
        (an EM or MAP fit has a single draw: the fitted point).

        * ``n=None``: replicate the observed cells, the law of ``pm.sample_posterior_predictive``
          on :attr:`model`'s ``X``: each cell's state is drawn from the draw's weights
          renormalised over the states the cell may take (a pinned cell stays in its state;
          ``tests/test_predictive.py`` holds the two to each other).
        * ``n`` cells: new cells per draw, in ``state`` if given, else states from the weights.

        Parameters
        ----------
        n
            New cells per posterior draw, or ``None`` to replicate the observed cells.
        state
            State index or name for new cells; ``None`` samples states by their weights.
        draws
            Use at most this many draws per chain (evenly thinned); default all.
        random_state
            Seed or Generator; defaults to the model's ``random_state`` setting.
        extend_inferencedata
            Also add the ``posterior_predictive`` group to ``self.idata`` (replacing one that is
            there), so that :meth:`save` keeps it.

        Returns
        -------
        xarray.DataTree
            ``posterior`` (the draws used), ``posterior_predictive`` with ``X`` (chain, draw,
            cell, pc) and ``state`` (chain, draw, cell), and, when replicating, ``observed_data``
            (so ``az.plot_ppc_dist`` draws it).
        """
        idata = self._require_fit()
        if n is not None and (isinstance(n, bool) or int(n) != n or n < 1):
            raise ValueError(f"n must be a positive integer or None (replicate the observed cells), got {n!r}.")
        if state is not None and n is None:
            raise ValueError("state= applies to new cells; pass n= as well (replicated cells keep their own states).")
        random_state = _one_seed(random_state, random_seed)
        rng = np.random.default_rng(self.settings["random_state"] if random_state is None else random_state)
        data = self._ensure_data()
        if data.get("counts") is not None or self._extended() or data.get("design") is not None:
            if n is not None:
                raise ValueError("new cells (n=...) come from the Gaussian state graph only; with counts, a design or an "
                                 "extended graph, replicate the observed cells (n=None) through PyMC.")
            return self._pymc_posterior_predictive(draws, rng, extend_inferencedata)
        post = self._parameter_draws(draws)
        C, D = post.sizes["chain"], post.sizes["draw"]
        K = self.n_states
        d = post.sizes["pc"]
        w = post["weights"].values.reshape(-1, K)
        m = post["means"].values.reshape(-1, K, d)
        L = np.linalg.cholesky(post["covariances"].values.reshape(-1, K, d, d))
        if n is None:
            mask = group(idata, "constant_data")["allowed_states"].values.astype(bool)
            cells = group(idata, "observed_data")["cell"].values
        else:
            mask = np.ones((int(n), K), bool)
            if state is not None:
                mask[:] = False
                mask[:, self._state_index(state)] = True
            cells = np.array([f"synthetic_{i}" for i in range(int(n))])
        n_cells = mask.shape[0]
        X = np.empty((C * D, n_cells, d))
        Z = np.empty((C * D, n_cells), dtype=np.int64)
        for s in range(C * D):
            p = w[s][None, :] * mask
            p /= p.sum(axis=1, keepdims=True)
            u = rng.random(n_cells)[:, None]
            z = np.minimum((np.cumsum(p, axis=1) < u).sum(axis=1), K - 1)
            X[s] = m[s, z] + np.einsum("nij,nj->ni", L[s, z], rng.standard_normal((n_cells, d)))
            Z[s] = z
        coords = {"chain": post["chain"].values, "draw": post["draw"].values, "cell": cells, "pc": post["pc"].values}
        pp = xr.Dataset({"X": (("chain", "draw", "cell", "pc"), X.reshape(C, D, n_cells, d)),
                         "state": (("chain", "draw", "cell"), Z.reshape(C, D, n_cells))}, coords=coords)
        groups = {"posterior": post, "posterior_predictive": pp}
        if n is None:
            groups["observed_data"] = group(idata, "observed_data")
        out = make_tree(groups, attrs={"model": "scotgm_pp.models.ScOTGM", "method": self.method})
        if extend_inferencedata:
            set_group(idata, "posterior_predictive", pp)
        return out

    def _pymc_posterior_predictive(self, draws, rng, extend: bool) -> xr.DataTree:
        """``pm.sample_posterior_predictive`` of the observed variable on :attr:`model` (the graph with
        counts, or an extension): the draws of the fit (a point estimate as one draw) as its trace."""
        import pymc as pm

        post = self._parameter_draws(draws)
        name = self._observed_name
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning)
            out = pm.sample_posterior_predictive(make_tree({"posterior": post}), model=self.model, var_names=[name],
                                                 random_seed=rng, progressbar=False)
        pp = group(out, "posterior_predictive")
        tree = make_tree({"posterior": post, "posterior_predictive": pp,
                          "observed_data": group(self.idata, "observed_data")},
                         attrs={"model": "scotgm_pp.models.ScOTGM", "method": self.method})
        if extend:
            set_group(self.idata, "posterior_predictive", pp)
        return tree

    # ---------------------------------------------------------------- io
    def save(self, path: str | Path) -> Path:
        """Write ``.idata`` (with the configs and a digest of the contents in its attrs) to a
        netCDF file (``xarray.DataTree.to_netcdf``, one netCDF group per tree group).

        Parameters
        ----------
        path
            Target file (``.nc``); overwritten if it exists.

        Returns
        -------
        pathlib.Path
        """
        from ._persist import DIGEST_ATTR, digest

        idata = self._require_fit()
        idata.attrs[DIGEST_ATTR] = digest(idata)
        path = Path(path)
        idata.to_netcdf(str(path), engine="h5netcdf")
        return path

    @classmethod
    def load(cls, path: str | Path) -> ScOTGM:
        """Rebuild a fitted model from :meth:`save`'s netCDF file.

        The file is verified first (:func:`scotgm_pp.models._persist.verify`): a file that is not
        a saved model, or whose contents or settings were altered after saving, is refused. The
        loaded model has the saved ``model_config`` and ``sampler_config``; its :attr:`model` is
        rebuilt from the saved data and prior (with the count layer when the fit had one, and the
        design and the shift's prior SD from ``constant_data`` when it had them). A fit
        of an extended graph (``fit(model=...)``) loads with a warning naming the extension's
        variables: the graph rebuilt on load is the built one, so rebuild the extension to refit.

        Parameters
        ----------
        path
            File written by :meth:`save`.

        Returns
        -------
        ScOTGM
        """
        from ._persist import upgrade, verify

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no saved model at {path}.")
        if path.is_dir():
            raise ValueError(f"{path} is a folder, not a saved model.")
        try:
            idata = xr.load_datatree(str(path), engine="h5netcdf")
        except (OSError, ValueError, KeyError) as err:
            raise ValueError(f"{path} is not a readable netCDF file written by ScOTGM.save ({err}).") from err
        config = verify(idata, path)
        upgrade(idata)
        # a file saved before the count likelihood was a setting was fitted with the weighted one
        config["model_config"].setdefault("count_likelihood", "weighted")
        model = cls(model_config=config["model_config"], sampler_config=config["sampler_config"],
                    **config["settings"])
        model.idata = idata
        extension = json.loads(idata.attrs.get("extension_variables", "[]"))
        if extension:
            warnings.warn(f"{path.name} was fitted on an extended graph (extra variables {extension}); the file keeps "
                          "its draws, but the loaded .model is the built graph without them. Rebuild the extension "
                          "on the loaded .model (pm.model.fgraph.clone_model) and refit to use it; helpers that "
                          "need the graph refuse this fit.", UserWarning, stacklevel=2)
        return model

    def copy(self) -> ScOTGM:
        """An unfitted copy with the same configs and settings."""
        return ScOTGM(model_config=copy.deepcopy(self.model_config), sampler_config=dict(self.sampler_config),
                      **self.settings)

    def __repr__(self) -> str:
        fitted = has_group(self.idata, "posterior") or has_group(self.idata, POINT_GROUP)
        status = f"fitted by {self.method!r}" if fitted else "unfitted"
        c = self.model_config
        return f"ScOTGM(n_states={c['n_states']}, covariance={c['covariance']!r}, prior={c['prior']!r}, {status})"


_COUNT_VARIABLES = {"beta", "delta", "gamma"}

DESIGN_START_ROUNDS = 5
"""Alternations of EM and least squares that find the start of a graph with a design."""


def _graph_changes(config: dict, has_design: bool) -> list[str]:
    """What makes a model's graph other than the default one EM and Gibbs fit (empty: the default)."""
    changes = []
    if config["mean_parametrization"] != "state":
        changes.append(f"mean_parametrization={config['mean_parametrization']!r}")
    if has_design:
        changes.append("a design")
    return changes


def _design_start(X: np.ndarray, design: np.ndarray, em_kwargs: dict) -> np.ndarray:
    """Starting ``design_coef`` ``(q, d)``: EM of the default graph on ``X - design @ coef``
    alternated with the least-squares ``coef`` of the scores minus each cell's expected state mean,
    :data:`DESIGN_START_ROUNDS` times from ``coef = 0`` (a start for MAP and NUTS, not an estimate)."""
    coef = np.zeros((design.shape[1], X.shape[1]))
    em = fit_em(X, **em_kwargs)
    for _ in range(DESIGN_START_ROUNDS):
        coef = np.linalg.lstsq(design, X - em.responsibilities @ em.means, rcond=None)[0]
        em = fit_em(X - design @ coef, **{**em_kwargs, "init_responsibilities": em.responsibilities})
    return coef

_METHOD_KWARGS = {"em": {"max_iter", "tol", "n_init", "init_responsibilities"}, "mcmc": {"draws", "tune", "chains"}}


def _one_seed(random_state, random_seed):
    """``random_seed`` (PyMC's name) and ``random_state`` (scikit-learn's) are one setting."""
    if random_state is not None and random_seed is not None:
        raise TypeError("give random_seed or random_state, not both (they are the same setting).")
    return random_state if random_seed is None else random_seed


def _check_method_kwargs(method: str, kwargs: dict) -> None:
    """EM and Gibbs take only their own keywords (``map`` and ``nuts`` pass theirs to PyMC)."""
    allowed = _METHOD_KWARGS.get(method)
    if allowed is None:
        return
    bad = sorted(set(kwargs) - allowed)
    if bad:
        hint = " (sampler settings: use method='nuts' or 'mcmc')" if {"draws", "tune", "chains"} & set(bad) else ""
        raise TypeError(f"method={method!r} takes {', '.join(sorted(allowed))} (and random_seed); got "
                        f"{', '.join(map(repr, bad))}{hint}.")


def check_convergence(idata, what: str, var_names=("weights", "means", "covariances", "design_coef",
                                                  "design_count_coef")) -> dict:
    """R-hat and bulk ESS of a posterior's parameters; warn (:class:`ConvergenceWarning`) when the
    largest R-hat exceeds :data:`RHAT_MAX` or the smallest ESS is below :data:`ESS_MIN`.

    Returns ``{"r_hat_max": ..., "ess_bulk_min": ...}``.
    """
    post = group(idata, "posterior")
    names = [v for v in var_names if v in post]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        rhat = az.rhat(post[names])
        ess = az.ess(post[names], method="bulk")
    vals_r = np.concatenate([np.ravel(rhat[v].values) for v in names])
    vals_e = np.concatenate([np.ravel(ess[v].values) for v in names])
    r_max = float(np.nanmax(vals_r)) if np.isfinite(vals_r).any() else float("nan")
    e_min = float(np.nanmin(vals_e)) if np.isfinite(vals_e).any() else float("nan")
    if not (r_max <= RHAT_MAX) or not (e_min >= ESS_MIN):
        warnings.warn(
            f"{what}: the chains have not converged well enough: max R-hat {r_max:.3f} (want <= {RHAT_MAX}), "
            f"min bulk ESS {e_min:.0f} (want >= {ESS_MIN}). Run more draws, tune or chains, or check label "
            "switching between unpinned states (az.plot_trace_dist).",
            ConvergenceWarning, stacklevel=3,
        )
    return {"r_hat_max": r_max, "ess_bulk_min": e_min}

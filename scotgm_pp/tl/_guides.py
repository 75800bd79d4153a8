"""Several guides per target: each guide's perturbed fraction (its efficiency), nested under the target.

The screen's state model of a perturbation gives every guide cell two log densities of its
state-model score: ``l0`` under the basal (escaped) state and ``l1`` under the perturbed state,
at the screen's fitted means and covariance. The guide model replaces the perturbation's one
mixture weight by a weight per guide, drawn around the target's::

    target_fraction     ~ Beta(1, 1)
    guide_concentration ~ LogNormal(log 10, 1.5)
    guide_fraction[g]   ~ Beta(target_fraction * c, (1 - target_fraction) * c)
    score[i]            ~ (1 - guide_fraction[g_i]) N(mean_0, S_0) + guide_fraction[g_i] N(mean_1, S_1)

(the states' means and covariances, one shared covariance in the screen's tied escape model, are
held at the screen's fit: a cut, as the count layer's states are). :func:`guide_model` declares this graph in PyMC; :func:`guide_fractions` computes
its posterior by quadrature: given the state densities, each guide's likelihood is a function of
its one weight, so the posterior of every parameter is an integral over a grid of
``(target_fraction, guide_concentration, guide_fraction)``, exact up to the grid's resolution
(``tests/test_guides.py`` holds it to PyMC's NUTS on the same graph).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import special

from .._validation import InputError
from ._core import BASAL
from ._response import _uns, get_record

__all__ = ["guide_fractions", "guide_model", "GuidePrior", "guide_posterior"]


@dataclass(frozen=True)
class GuidePrior:
    """Priors of the guide model (module docstring)."""

    concentration_log_mean: float = float(np.log(10.0))
    concentration_log_sd: float = 1.5


@dataclass(frozen=True)
class _Grid:
    """Quadrature nodes: every fraction on a uniform grid in logit space (no endpoint singularity
    of a Beta density survives the change of variables), the concentration on a log grid."""

    n_fraction: int = 801
    n_target: int = 121
    n_concentration: int = 41


FRACTION_LOGIT_RANGE = 10.0
TARGET_LOGIT_RANGE = 9.0
"""Fractions are integrated over ``expit(-range) .. expit(range)``."""


def _logit_nodes(n: int, half_width: float) -> np.ndarray:
    """Fractions at ``n`` equally spaced logits: a uniform weight on these nodes is the density
    ``p (1 - p)`` times a constant, so a Beta's ``p^(a-1) (1-p)^(b-1)`` becomes ``p^a (1-p)^b``."""
    return special.expit(np.linspace(-half_width, half_width, n))


def guide_posterior(l0: np.ndarray, l1: np.ndarray, guide_index: np.ndarray, n_guides: int,
                    prior: GuidePrior = GuidePrior(), interval: float = 0.9, grid: _Grid = _Grid()) -> dict:
    """Posterior of the guide model of one perturbation, by quadrature.

    Parameters
    ----------
    l0, l1
        Log densities of each guide cell's state-model score under the basal and perturbed states.
    guide_index
        Each cell's guide, ``0 .. n_guides - 1``.
    n_guides
        Number of guides.
    prior
        :class:`GuidePrior`.
    interval
        Probability of the central credible intervals.

    Returns
    -------
    dict
        ``guide_mean``, ``guide_lower``, ``guide_upper`` (per guide), ``target_mean``,
        ``target_lower``, ``target_upper``, ``concentration`` (``exp`` of the posterior mean of
        its logarithm).
    """
    l0, l1 = np.asarray(l0, float), np.asarray(l1, float)
    gi = np.asarray(guide_index, np.int64)
    pi = _logit_nodes(grid.n_fraction, FRACTION_LOGIT_RANGE)
    t = _logit_nodes(grid.n_target, TARGET_LOGIT_RANGE)
    logc = prior.concentration_log_mean + prior.concentration_log_sd * np.linspace(-4.5, 4.5, grid.n_concentration)
    c = np.exp(logc)
    # each guide's log-likelihood at every node of its fraction: (guides, nodes)
    per_cell = np.logaddexp(np.log1p(-pi)[None, :] + l0[:, None], np.log(pi)[None, :] + l1[:, None])
    loglik = np.zeros((n_guides, pi.size))
    np.add.at(loglik, gi, per_cell)
    # Beta(pi | t c, (1 - t) c) on the logit nodes, pi^a (1 - pi)^b, normalised over the nodes (a
    # discrete prior: exact however narrow the Beta is against the spacing of the nodes)
    a = (t[:, None] * c[None, :])[..., None]
    b = ((1.0 - t)[:, None] * c[None, :])[..., None]
    log_beta = a * np.log(pi) + b * np.log1p(-pi)
    log_beta -= special.logsumexp(log_beta, axis=-1, keepdims=True)
    # log marginal likelihood of each guide given (t, c): (guides, t, c), one guide at a time
    log_z = np.stack([special.logsumexp(log_beta + ll, axis=-1) for ll in loglik])
    # priors on the nodes: Beta(1, 1) for t (t (1 - t) in logit coordinates), Normal for log c
    log_prior = np.log(t * (1.0 - t))[:, None] - 0.5 * (
        (logc - prior.concentration_log_mean) / prior.concentration_log_sd)[None, :] ** 2
    log_w = log_prior + log_z.sum(axis=0)
    w = np.exp(log_w - special.logsumexp(log_w))
    # each guide's posterior over its fraction: its conditional posteriors mixed over (t, c)
    post = np.stack([np.einsum("tc,tcm->m", w, np.exp(log_beta + ll - lz[..., None])) for ll, lz in zip(loglik, log_z)])
    post /= post.sum(axis=1, keepdims=True)
    tail = 0.5 * (1.0 - interval)

    def quantile(weights, values, q):
        cdf = np.cumsum(weights, axis=-1)
        return values[np.argmax(cdf >= q, axis=-1)]

    w_t = w.sum(axis=1)
    w_c = w.sum(axis=0)
    return {
        "guide_mean": post @ pi,
        "guide_lower": quantile(post, pi, tail),
        "guide_upper": quantile(post, pi, 1.0 - tail),
        "target_mean": float(w_t @ t),
        "target_lower": float(quantile(w_t, t, tail)),
        "target_upper": float(quantile(w_t, t, 1.0 - tail)),
        "concentration": float(np.exp(w_c @ logc)),
    }


@dataclass
class _GuideData:
    """One perturbation's guide cells: their state densities and guides."""

    guides: list[str]
    index: np.ndarray
    cells: np.ndarray
    scores: np.ndarray
    means: np.ndarray
    covariances: np.ndarray
    l0: np.ndarray
    l1: np.ndarray
    p_perturbed: np.ndarray
    n_without_guide: int


def _mvn_logpdf(X: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
    L = np.linalg.cholesky(cov)
    z = np.linalg.solve(L, (X - mean).T)
    return -0.5 * (z * z).sum(axis=0) - np.log(np.diag(L)).sum() - 0.5 * X.shape[1] * np.log(2.0 * np.pi)


def _guide_data(adata: AnnData, perturbation: str, guide_key: str, key: str, store) -> _GuideData:
    record = get_record(adata, perturbation, key, store=store)
    fixed = np.asarray(record["state_fixed_state"], int)
    free = fixed != BASAL  # the guide cells: free, or pinned perturbed when the escape model fell back
    cells = np.asarray(record["state_cell_names"]).astype(str)[free]
    X = np.asarray(record["state_scores"], float)[free]
    means = np.asarray(record["state_means"], float)
    cov = np.asarray(record["state_model_covariance"], float)
    cov = np.stack([cov, cov]) if cov.ndim == 2 else cov  # one per state (tied: the same twice)
    labels = adata.obs[guide_key].reindex(pd.Index(cells, dtype=object))
    has = labels.notna().to_numpy()
    guides = sorted(set(labels[has].astype(str)))
    index = pd.Index(guides).get_indexer(labels[has].astype(str))
    p = adata.obs[f"{key}_p_perturbed"].reindex(pd.Index(cells[has], dtype=object)).to_numpy(float)
    return _GuideData(guides=guides, index=index, cells=cells[has], scores=X[has], means=means, covariances=cov,
                      l0=_mvn_logpdf(X[has], means[0], cov[0]), l1=_mvn_logpdf(X[has], means[1], cov[1]),
                      p_perturbed=p, n_without_guide=int((~has).sum()))


def _check(adata: AnnData, guide_key: str, key: str) -> pd.DataFrame:
    summary = _uns(adata, key)["summary"]
    if guide_key not in adata.obs.columns:
        raise InputError(f"guide_key {guide_key!r} is not a column of adata.obs; assign guides first "
                         "(sg.pp.assign_guides writes 'guide') or name the column holding each cell's guide.")
    return summary


def guide_fractions(adata: AnnData, guide_key: str = "guide", key: str = "scotgm", *,
                    perturbations=None, interval: float = 0.9, prior: GuidePrior = GuidePrior(),
                    store=None) -> pd.DataFrame:
    """Each guide's perturbed fraction (guide efficiency), from the guide model nested under its target.

    Parameters
    ----------
    adata
        The analysed screen (:func:`~scotgm_pp.tl.perturbation_response` or
        :func:`scotgm_pp.read_results`), with each cell's guide in ``.obs[guide_key]``.
    guide_key
        ``.obs`` column of guides (``sg.pp.assign_guides`` writes ``guide``).
    key
        ``key_added`` of the run.
    perturbations
        Only these (default: every analysed perturbation).
    interval
        Probability of the central credible intervals.
    prior
        :class:`GuidePrior`.
    store
        The run's record folder, if it moved (see :func:`~scotgm_pp.tl.get_record`).

    Returns
    -------
    DataFrame
        One row per guide: ``perturbation``, ``guide``, ``n_cells`` (its guide cells in the
        perturbation's experiment), ``fraction_perturbed`` (posterior mean of the guide's
        weight), ``fraction_lower``, ``fraction_upper``; the perturbation's ``target_fraction``
        (posterior mean of the target's weight) and ``guide_concentration`` (``exp`` of the
        posterior mean of its logarithm: large when the guides agree); ``mean_p_perturbed``
        (the screen's per-cell posteriors averaged over the guide's cells, under the target's
        one weight); ``escape_model``.
        Perturbations whose escape model fell back (every guide cell treated as perturbed) have
        no perturbed state to weigh: their fractions are NaN and ``escape_model`` says why.
        Guide cells without a guide in ``.obs[guide_key]`` are left out, with a warning.
    """
    if not 0 < interval < 1:
        raise InputError(f"interval must be in (0, 1), got {interval!r}.")
    summary = _check(adata, guide_key, key)
    chosen = list(summary.index) if perturbations is None else [str(p) for p in perturbations]
    unknown = [p for p in chosen if p not in summary.index]
    if unknown:
        raise InputError(f"no results for perturbation(s) {unknown[:5]}; analysed: {list(summary.index[:20])}.")
    rows, without = [], {}
    for pert in chosen:
        status = str(summary.loc[pert, "escape_model"]) if "escape_model" in summary else "on"
        data = _guide_data(adata, pert, guide_key, key, store)
        if data.n_without_guide:
            without[pert] = data.n_without_guide
        counts = np.bincount(data.index, minlength=len(data.guides))
        mean_p = np.bincount(data.index, weights=data.p_perturbed, minlength=len(data.guides)) / np.maximum(counts, 1)
        fitted = status == "on" and len(data.guides) > 0
        post = guide_posterior(data.l0, data.l1, data.index, len(data.guides), prior, interval) if fitted else None
        for g, name in enumerate(data.guides):
            rows.append({
                "perturbation": pert, "guide": name, "n_cells": int(counts[g]),
                "fraction_perturbed": post["guide_mean"][g] if fitted else np.nan,
                "fraction_lower": post["guide_lower"][g] if fitted else np.nan,
                "fraction_upper": post["guide_upper"][g] if fitted else np.nan,
                "target_fraction": post["target_mean"] if fitted else np.nan,
                "guide_concentration": post["concentration"] if fitted else np.nan,
                "mean_p_perturbed": mean_p[g], "escape_model": status,
            })
    if without:
        warnings.warn(f"guide cells without a guide in adata.obs[{guide_key!r}] are left out of the guide model: "
                      f"{without}.", UserWarning, stacklevel=2)
    return pd.DataFrame(rows)


def guide_model(adata: AnnData, perturbation: str, guide_key: str = "guide", key: str = "scotgm", *,
                prior: GuidePrior = GuidePrior(), store=None):
    """The guide model of one perturbation as a PyMC graph (module docstring).

    Returns
    -------
    pymc.Model
        Variables ``target_fraction``, ``guide_concentration``, ``guide_fraction`` (dims
        ``guide``) and the observed ``score`` (dims ``cell, score_dim``): each guide cell's
        state-model score, a mixture of the screen's two states with its guide's weight.
        ``pm.sample(model=...)`` samples the posterior that :func:`guide_fractions` integrates.
    """
    import pymc as pm
    import pytensor.tensor as pt

    _check(adata, guide_key, key)
    data = _guide_data(adata, str(perturbation), guide_key, key, store)
    if not data.guides:
        raise InputError(f"no guide cell of {perturbation!r} has a guide in adata.obs[{guide_key!r}].")
    coords = {"guide": data.guides, "cell": list(data.cells), "score_dim": np.arange(data.scores.shape[1])}
    with pm.Model(coords=coords) as model:
        index = pm.Data("guide_index", data.index, dims="cell")
        target = pm.Beta("target_fraction", 1.0, 1.0)
        conc = pm.LogNormal("guide_concentration", mu=prior.concentration_log_mean, sigma=prior.concentration_log_sd)
        frac = pm.Beta("guide_fraction", alpha=target * conc, beta=(1.0 - target) * conc, dims="guide")
        w = frac[index]
        components = [pm.MvNormal.dist(mu=data.means[k], cov=data.covariances[k]) for k in (0, 1)]
        pm.Mixture("score", w=pt.stack([1.0 - w, w], axis=-1), comp_dists=components, observed=data.scores,
                   dims=("cell", "score_dim"))
    return model

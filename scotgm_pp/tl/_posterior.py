"""Posterior draws of one fitted perturbation, from the quantities its record keeps.

What the draws are
------------------
The pipeline fits each experiment by EM (the states from the PCA scores, then the count layer
given the state posteriors ``R``: a cut). Its draws are the declared graph's posterior
**conditional on those state posteriors**, each cell counting ``r_ik`` times in state ``k``:

* states: the exact conjugate posterior of the full-covariance Gaussian graph given ``R``,
  ``Lambda_k ~ Wishart(nu0 + N_k, Psi_k^-1)``, ``mu_k | Lambda_k ~ N(m_k, (kappa_k Lambda_k)^-1)``
  with ``N_k = sum_i r_ik`` and ``Psi_k``, ``m_k``, ``kappa_k`` the Normal-Wishart update of the
  prior the fit used (:func:`state_posterior`; its mode is the record's means and covariances);
  weights ``~ Dirichlet(alpha + sum_free r_ik)``;
* coupling, per draw: ``"ot"`` recomputed in closed form from the drawn covariances;
  ``"independent"`` zero; ``"hit_and_run"`` a plan ``K`` drawn from the chain's recorded plans
  (``C = L0 K L1^T`` with the drawn covariances' Cholesky factors; the mean plan when the chain's
  plans were not kept); ``"paper"`` the fitted plan;
* count layer: the Gaussian approximation of its posterior, gene by gene. The basal log rate
  ``beta`` and the perturbed state's ``beta + delta`` are drawn independently,
  ``beta ~ N(beta_hat, v0)``, ``beta + delta ~ N(beta_hat + delta_hat, se^2 - v0)``, so that
  ``delta`` has the fitted standard error ``se`` (``effect_se``) and ``cov(beta, delta) = -v0``;
  ``v0`` is the inverse NB information of ``beta`` from the basal cells (library sizes from the
  record's quantiles). The dispersion stays the plug-in constant of the graph.

Uncertainty in which cells are perturbed enters through ``R`` (soft counts) and the count
layer's standard errors (Louis' observed information of the per-gene marginal likelihood, or the
imputation correction with ``count_likelihood="weighted"``), not by redrawing the states: the draws are not
the joint posterior of states and parameters (``ScOTGM.fit(method="mcmc")`` samples that for the
Gaussian part). Compute only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.linalg import solve_triangular

from .._validation import InputError
from ..inference.ot import ot_cross_covariance, perturbation_covariance

__all__ = [
    "PosteriorDraws",
    "draw_posterior",
    "point_draws",
    "posterior_record",
    "state_posterior",
    "plan_kernel",
    "weighted_quantiles",
    "N_LIBRARY_QUANTILES",
    "MAX_PLAN_DRAWS",
]

BASAL, PERTURBED = 0, 1

N_LIBRARY_QUANTILES = 51
"""Library-size quantiles kept per state (0%, 2%, ..., 100%)."""

MAX_PLAN_DRAWS = 100
"""Transport plans of a Hit-and-Run chain kept in the record (evenly thinned)."""

_REQUIRED = ("nw_mean", "nw_kappa", "nw_dof", "nw_scale_inv", "dirichlet_posterior", "count_beta", "count_effect",
             "count_effect_se", "count_dispersion", "library_quantiles")


@dataclass
class PosteriorDraws:
    """Draws of one perturbation's parameters (``S`` draws, ``K`` states, ``d`` PCs, ``G`` genes).

    Attributes
    ----------
    weights
        ``(S, K)``.
    means, covariances
        ``(S, K, d)`` and ``(S, K, d, d)``.
    cross_covariance
        ``(S, d, d)``: the coupling's ``C = Cov(X, Y)``.
    perturbation_mean, perturbation_cov
        ``mu_1 - mu_0`` ``(S, d)`` and ``S0 + S1 - C - C^T`` ``(S, d, d)``.
    log_rate_basal, effect
        ``beta`` and the perturbed state's ``delta`` ``(S, G)`` (natural log).
    batch_offset
        ``gamma`` ``(B, G)``, row 0 zero (point values; not redrawn).
    """

    weights: np.ndarray
    means: np.ndarray
    covariances: np.ndarray
    cross_covariance: np.ndarray
    perturbation_mean: np.ndarray
    perturbation_cov: np.ndarray
    log_rate_basal: np.ndarray
    effect: np.ndarray
    batch_offset: np.ndarray

    @property
    def n_draws(self) -> int:
        return self.means.shape[0]

    def log_rates(self, draw: np.ndarray, state: np.ndarray) -> np.ndarray:
        """``beta + delta_z`` of the given draws and states (each ``(n,)``): ``(n, G)``."""
        return self.log_rate_basal[draw] + np.where(np.asarray(state)[:, None] == PERTURBED, self.effect[draw], 0.0)


# ---------------------------------------------------------------------------------------------- record


def weighted_quantiles(values: np.ndarray, weights: np.ndarray, n: int = N_LIBRARY_QUANTILES) -> np.ndarray:
    """``n`` evenly spaced quantiles (0 to 1) of ``values`` weighted by ``weights`` (NaN if no weight)."""
    v = np.asarray(values, float)
    w = np.asarray(weights, float)
    keep = w > 0
    if not keep.any():
        return np.full(n, np.nan)
    order = np.argsort(v[keep])
    v, w = v[keep][order], w[keep][order]
    cum = np.cumsum(w) - 0.5 * w
    cum /= w.sum()
    return np.interp(np.linspace(0.0, 1.0, n), cum, v)


def state_posterior(X: np.ndarray, R: np.ndarray, prior) -> dict:
    """Normal-Wishart posterior of every state given responsibilities (the conjugate update).

    ``kappa_k = kappa0 + N_k``, ``m_k = (kappa0 m0 + sum_i r_ik x_i) / kappa_k``,
    ``nu_k = nu0 + N_k``, ``Psi_k = Psi0 + sum_i r_ik (x_i - xbar_k)(x_i - xbar_k)^T +
    kappa0 N_k / kappa_k (xbar_k - m0)(xbar_k - m0)^T``. Its mode ``(m_k, Psi_k / (nu_k - d))`` is
    the MAP M-step given ``R`` (:func:`scotgm_pp.inference.joint_em.conditional_full_m_step`).

    Returns
    -------
    dict
        ``nw_mean`` ``(K, d)``, ``nw_kappa`` ``(K,)``, ``nw_dof`` ``(K,)``, ``nw_scale_inv``
        ``(K, d, d)``.
    """
    X = np.asarray(X, float)
    R = np.asarray(R, float)
    d = X.shape[1]
    m0, k0, nu0 = np.asarray(prior.mean, float), float(prior.kappa), float(prior.dof)
    N = R.sum(axis=0)
    sums = R.T @ X
    xbar = sums / np.maximum(N, 1e-12)[:, None]
    kappa = k0 + N
    mean = (k0 * m0 + sums) / kappa[:, None]
    psi = np.empty((R.shape[1], d, d))
    for k in range(R.shape[1]):
        D = X - xbar[k]
        dm = xbar[k] - m0
        psi[k] = np.asarray(prior.scale_inv, float) + (D * R[:, k, None]).T @ D + (k0 * N[k] / kappa[k]) * np.outer(dm, dm)
        psi[k] = 0.5 * (psi[k] + psi[k].T)
    return {"nw_mean": mean, "nw_kappa": kappa, "nw_dof": nu0 + N, "nw_scale_inv": psi}


def posterior_record(
    scores: np.ndarray,
    responsibilities: np.ndarray,
    fixed_state: np.ndarray,
    prior,
    *,
    size_factors: np.ndarray,
    batch_codes: np.ndarray,
    beta: np.ndarray,
    effect: np.ndarray,
    effect_se: np.ndarray,
    dispersion: np.ndarray,
    batch_offset: np.ndarray,
) -> dict:
    """The record entries :func:`draw_posterior` and the synthetic cells need (arrays only, no
    cells x genes array).

    ``batch_offset`` is ``(B, G)`` with row 0 zero; ``batch_codes`` the cells' batch index;
    ``dispersion`` ``(G,)`` or, one per batch, ``(B, G)`` in the same batch order. The
    Hit-and-Run plans, when that coupling ran, are written by the coupling step itself
    (``coupling_plan_draws``, plans ``K`` in the convention of :func:`plan_kernel`).
    """
    R = np.asarray(responsibilities, float)
    free = np.asarray(fixed_state) < 0
    alpha = np.asarray(prior.dirichlet, float)
    s = np.asarray(size_factors, float)
    codes = np.asarray(batch_codes, int)
    B = np.asarray(batch_offset).shape[0]
    bw = np.stack([np.bincount(codes, weights=R[:, k], minlength=B) for k in range(R.shape[1])])
    out = {
        **state_posterior(scores, R, prior),
        "dirichlet_posterior": alpha + R[free].sum(axis=0),
        "state_cells": R.sum(axis=0),
        "library_quantiles": np.stack([weighted_quantiles(s, R[:, k]) for k in range(R.shape[1])]),
        "batch_weights": bw / np.maximum(bw.sum(axis=1, keepdims=True), 1e-12),
        "count_beta": np.asarray(beta, float),
        "count_effect": np.asarray(effect, float),
        "count_effect_se": np.asarray(effect_se, float),
        "count_dispersion": np.asarray(dispersion, float),
        "count_batch_offset": np.asarray(batch_offset, float),
    }
    return out


def check_record(record: dict) -> None:
    """Refuse a record written before posterior draws existed, naming the fix."""
    missing = [k for k in _REQUIRED if k not in record]
    if missing:
        raise InputError(
            f"the record lacks {missing[:3]} (written by an older scotgm_pp, or not by perturbation_response); "
            "rerun scotgm_pp.tl.perturbation_response to get posterior draws."
        )


# ------------------------------------------------------------------------------------------------ draws


def _sym(S: np.ndarray) -> np.ndarray:
    return 0.5 * (S + np.swapaxes(S, -1, -2))


def _chol(S: np.ndarray) -> np.ndarray:
    S = _sym(S)
    d = S.shape[-1]
    jitter = 1e-10 * np.maximum(np.trace(S, axis1=-2, axis2=-1) / d, 1e-300)
    return np.linalg.cholesky(S + jitter[..., None, None] * np.eye(d))


def plan_kernel(S0: np.ndarray, S1: np.ndarray, C: np.ndarray) -> np.ndarray:
    """``K`` with ``C = L0 K L1^T`` (``L`` the Cholesky factors): the plan in whitened coordinates."""
    L0, L1 = _chol(S0), _chol(S1)
    K = solve_triangular(L0, C, lower=True)
    return solve_triangular(L1, K.T, lower=True).T


def sample_normal_wishart(rng, mean, kappa, dof, scale_inv, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` draws of ``(mu, Sigma)`` with ``Lambda = Sigma^-1 ~ Wishart(dof, scale_inv^-1)`` and
    ``mu | Lambda ~ N(mean, (kappa Lambda)^-1)`` (Bartlett decomposition, vectorised)."""
    d = mean.shape[0]
    C = np.linalg.cholesky(_sym(scale_inv))  # Psi = C C^T
    A = np.zeros((n, d, d))
    rows, cols = np.tril_indices(d, -1)
    A[:, rows, cols] = rng.standard_normal((n, rows.size))
    A[:, np.arange(d), np.arange(d)] = np.sqrt(rng.chisquare(dof - np.arange(d), size=(n, d)))
    # Lambda = C^-T A A^T C^-1, Sigma = G G^T with G = C A^-T
    Ainv = np.linalg.inv(A)
    G = C[None] @ np.swapaxes(Ainv, -1, -2)
    Sigma = _sym(G @ np.swapaxes(G, -1, -2))
    mu = mean + np.einsum("nij,nj->ni", G, rng.standard_normal((n, d))) / np.sqrt(kappa)
    return mu, Sigma


def gene_dispersion(record: dict, state: int = BASAL) -> np.ndarray:
    """``(G,)``: the record's NB dispersion per gene; when it is per batch (``(B, G)``, rows in the
    order of ``count_batches``), its average over the batches weighted by the state's cells."""
    phi = np.asarray(record["count_dispersion"], float)
    if phi.ndim == 1:
        return phi
    w = np.asarray(record["batch_weights"], float)[state]
    return (w / max(w.sum(), 1e-12)) @ phi


def cell_alpha(record: dict, batch: np.ndarray) -> np.ndarray:
    """NB shapes ``1 / phi`` for cells of the given batch codes: ``(G,)`` when the record's
    dispersion is per gene, ``(n, G)`` when it is per batch (a code of ``-1``, a batch the
    experiment did not hold, reads :func:`gene_dispersion`, the basal cells' average)."""
    phi = np.asarray(record["count_dispersion"], float)
    if phi.ndim == 2:
        codes = np.asarray(batch, int)
        phi = np.where((codes >= 0)[:, None], phi[np.maximum(codes, 0)], gene_dispersion(record)[None, :])
    return 1.0 / np.maximum(phi, 1e-12)


def _basal_rate_variance(record: dict, beta: np.ndarray) -> np.ndarray:
    """Inverse NB information of ``beta`` from the basal cells: ``1 / sum_i alpha mu_i / (alpha + mu_i)``
    (over the basal library-size quantiles and, with a dispersion per batch, the basal cells' batches)."""
    q = np.asarray(record["library_quantiles"], float)[BASAL]
    n0 = float(np.asarray(record["state_cells"], float)[BASAL])
    mu = q[:, None] * np.exp(beta)[None, :]
    phi = np.asarray(record["count_dispersion"], float)
    w = np.ones(1) if phi.ndim == 1 else np.asarray(record["batch_weights"], float)[BASAL]
    alpha = 1.0 / np.maximum(np.atleast_2d(phi), 1e-12)  # (B, G)
    per_batch = np.mean(alpha[:, None, :] * mu[None] / (alpha[:, None, :] + mu[None]), axis=1)  # (B, G)
    info = n0 * ((w / max(w.sum(), 1e-12)) @ per_batch)
    return 1.0 / np.maximum(info, 1e-12)


def _couplings(record: dict, covs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    coupling = str(record.get("coupling", "ot"))
    S = covs.shape[0]
    S0, S1 = covs[:, BASAL], covs[:, PERTURBED]
    match coupling:
        case "independent":
            return np.zeros_like(S0)
        case "ot":
            return np.stack([ot_cross_covariance(S0[s], S1[s]) for s in range(S)])
        case _:
            plans = record.get("coupling_plan_draws")
            if plans is None or np.size(plans) == 0:
                fit = np.asarray(record["covariances"], float)
                plans = plan_kernel(fit[BASAL], fit[PERTURBED], np.asarray(record["cross_covariance"], float))[None]
            plans = np.asarray(plans, float)
            K = plans[rng.integers(plans.shape[0], size=S)]
            return _chol(S0) @ K @ np.swapaxes(_chol(S1), -1, -2)


def draw_posterior(record: dict, n_draws: int, rng: np.random.Generator) -> PosteriorDraws:
    """Draw ``n_draws`` parameter sets of one perturbation (see the module docstring).

    Parameters
    ----------
    record
        A record of :func:`scotgm_pp.tl.perturbation_response` (:func:`scotgm_pp.tl.get_record`).
    n_draws
        Number of draws (``>= 1``).
    rng
        The only source of randomness.

    Returns
    -------
    PosteriorDraws
    """
    check_record(record)
    n_draws = int(n_draws)
    if n_draws < 1:
        raise InputError(f"n_draws must be a positive integer, got {n_draws}.")
    mean = np.asarray(record["nw_mean"], float)
    K, d = mean.shape
    means = np.empty((n_draws, K, d))
    covs = np.empty((n_draws, K, d, d))
    for k in range(K):
        means[:, k], covs[:, k] = sample_normal_wishart(
            rng, mean[k], float(record["nw_kappa"][k]), float(record["nw_dof"][k]),
            np.asarray(record["nw_scale_inv"][k], float), n_draws)
    weights = rng.dirichlet(np.asarray(record["dirichlet_posterior"], float), size=n_draws)
    C = _couplings(record, covs, rng)
    mu_p = means[:, PERTURBED] - means[:, BASAL]
    cov_p = np.stack([perturbation_covariance(covs[s, BASAL], covs[s, PERTURBED], C[s]) for s in range(n_draws)])

    beta = np.asarray(record["count_beta"], float)
    delta = np.asarray(record["count_effect"], float)
    se = np.asarray(record["count_effect_se"], float)
    v0 = np.minimum(_basal_rate_variance(record, beta), 0.5 * se**2)
    G = beta.size
    r0 = beta + np.sqrt(v0) * rng.standard_normal((n_draws, G))
    r1 = beta + delta + np.sqrt(se**2 - v0) * rng.standard_normal((n_draws, G))
    return PosteriorDraws(weights=weights, means=means, covariances=covs, cross_covariance=C,
                          perturbation_mean=mu_p, perturbation_cov=cov_p, log_rate_basal=r0, effect=r1 - r0,
                          batch_offset=np.asarray(record["count_batch_offset"], float))


def point_draws(record: dict) -> PosteriorDraws:
    """The fitted point (the record's MAP) as a single "draw"."""
    check_record(record)
    covs = np.asarray(record["covariances"], float)[None]
    C = np.asarray(record["cross_covariance"], float)[None]
    return PosteriorDraws(weights=np.asarray(record["weights"], float)[None],
                          means=np.asarray(record["means"], float)[None], covariances=covs, cross_covariance=C,
                          perturbation_mean=np.asarray(record["perturbation_mean"], float)[None],
                          perturbation_cov=np.asarray(record["perturbation_cov"], float)[None],
                          log_rate_basal=np.asarray(record["count_beta"], float)[None],
                          effect=np.asarray(record["count_effect"], float)[None],
                          batch_offset=np.asarray(record["count_batch_offset"], float))

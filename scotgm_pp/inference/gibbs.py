"""Exact posterior sampling of the sc-OTGM mixture by conjugate Gibbs sampling.

The model is the one of :func:`scotgm_pp.models.build_model` with the state labels
``z`` of the free cells restored. Its full conditionals are closed form:

* ``z_i | theta``: categorical with the E-step responsibilities (free cells; pinned cells keep
  their state);
* ``weights | z ~ Dirichlet(alpha + counts of free cells per state)``;
* ``(mu_k, Lambda_k) | z``: Normal-Wishart with ``kappa_n = kappa0 + N_k``,
  ``m_n = (kappa0 m0 + N_k xbar_k) / kappa_n``, ``nu_n = nu0 + N_k``,
  ``Psi_n = Psi0 + S_k + kappa0 N_k / kappa_n (xbar_k - m0)(xbar_k - m0)^T``,
  ``Lambda_k ~ Wishart(nu_n, Psi_n^{-1})`` and ``mu_k | Lambda_k ~ N(m_n, (kappa_n Lambda_k)^{-1})``.

This is the sampler of ``ScOTGM.fit(method="mcmc")``; ``method="nuts"`` samples the same graph
with ``pm.sample`` (the Wishart precisions through their log-Cholesky transform). A mixture
posterior is multimodal under label permutations. Label switching is handled by the pinned cells
(a state holding pinned cells has a fixed meaning) and, among states without pinned cells, by
relabelling every draw to the reference means (the EM solution) with the assignment that
minimises the squared distance between means. Cells allowed a proper subset of the states make
the weights' conditional non-Dirichlet; ``ScOTGM`` sends such models to NUTS.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from .em import (
    EMResult,
    NormalWishartPrior,
    _inverse_cholesky,
    _log_gaussians_from,
    _mixture_terms,
    _prior_log_density,
    default_prior,
    fit_em,
)

__all__ = ["GibbsResult", "sample_gibbs"]


@dataclass
class GibbsResult:
    """Draws of :func:`sample_gibbs` (after tuning), chains first.

    Attributes
    ----------
    weights
        ``(chains, draws, K)``.
    means
        ``(chains, draws, K, d)``.
    covariances
        ``(chains, draws, K, d, d)``.
    lp
        ``(chains, draws)``: the model log density (untransformed space) at each draw.
    relabelled
        ``(chains, draws)``: 1 where the draw's unpinned states were permuted to the reference.
    mean_responsibilities
        ``(n, K)``: the Rao-Blackwellised posterior state probabilities of the cells,
        averaged over all kept draws of all chains.
    """

    weights: np.ndarray
    means: np.ndarray
    covariances: np.ndarray
    lp: np.ndarray
    relabelled: np.ndarray
    mean_responsibilities: np.ndarray


def _sample_covariance_factor(nun, psin, rng):
    """``G`` with ``G G^T = Sigma = Lambda^{-1}``, ``Lambda ~ Wishart(nun, Psi_n^{-1})`` (Bartlett)."""
    d = psin.shape[0]
    C = np.linalg.cholesky(psin)  # Psi_n = C C^T; F = C^{-T} has F F^T = Psi_n^{-1}
    A = np.tril(rng.standard_normal((d, d)), -1)
    A[np.diag_indices(d)] = np.sqrt(rng.chisquare(nun - np.arange(d)))
    # Lambda = F A A^T F^T, Sigma = Lambda^{-1} = G G^T with G = C A^{-T}
    return C @ np.tril(np.linalg.inv(A)).T


def _sample_normal_wishart(kn, mn, nun, psin, rng):
    """One draw of ``(mu, Sigma)`` from NW(mn, kn, nun, Psi_n^{-1}) by the Bartlett decomposition."""
    G = _sample_covariance_factor(nun, psin, rng)
    Sigma = G @ G.T
    mu = mn + G @ rng.standard_normal(mn.shape[0]) / np.sqrt(kn)
    return mu, 0.5 * (Sigma + Sigma.T)


def _relabel(means, ref_means, movable):
    """Permutation of the states in ``movable`` that best matches ``ref_means``."""
    perm = np.arange(means.shape[0])
    if len(movable) < 2:
        return perm
    cost = ((means[movable][:, None, :] - ref_means[movable][None, :, :]) ** 2).sum(-1)
    rows, cols = linear_sum_assignment(cost)
    perm[np.asarray(movable)[cols]] = np.asarray(movable)[rows]
    return perm


def sample_gibbs(
    X: np.ndarray,
    *,
    fixed_state: np.ndarray | None = None,
    n_states: int = 2,
    prior: NormalWishartPrior | None = None,
    draws: int = 500,
    tune: int = 200,
    chains: int = 2,
    init: EMResult | None = None,
    random_state: int | np.random.Generator | None = None,
    progressbar: bool = False,
    covariance: str = "full",
) -> GibbsResult:
    """Sample the posterior of the sc-OTGM mixture by conjugate Gibbs sampling.

    Parameters
    ----------
    X
        Cells x PCs ``(n, d)``.
    fixed_state
        ``-1`` free, ``k`` pinned to state ``k``; ``None``: all free.
    n_states
        Number of states ``K``.
    prior
        Normal-Wishart-Dirichlet prior; :func:`default_prior` when ``None``.
    draws, tune
        Kept draws per chain, and discarded warm-up sweeps per chain.
    chains
        Independent chains (at least 2, for R-hat). Each starts from labels drawn from the
        responsibilities of ``init``.
    init
        EM solution used for the starting labels and as the relabelling reference; fitted
        with :func:`fit_em` when ``None``.
    random_state
        Seed or Generator; the only source of randomness.
    progressbar
        Show a tqdm bar over the sweeps (off by default in library calls).
    covariance
        ``"full"`` (a precision per state) or ``"tied"`` (one shared precision:
        ``Lambda | z ~ Wishart(nu0 + n, (Psi0 + sum_k [S_k + kappa0 N_k / kappa_k (xbar_k - m0)(.)^T])^{-1})``,
        then ``mu_k | Lambda, z ~ N(m_k, (kappa_k Lambda)^{-1})``).

    Returns
    -------
    GibbsResult
    """
    X = np.asarray(X, float)
    n, d = X.shape
    if chains < 2:
        raise ValueError(f"chains must be >= 2 so that R-hat can be computed, got {chains}.")
    if draws < 1 or tune < 0:
        raise ValueError(f"draws must be >= 1 and tune >= 0, got draws={draws}, tune={tune}.")
    fixed = np.full(n, -1, dtype=int) if fixed_state is None else np.asarray(fixed_state, dtype=int)
    if covariance not in ("full", "tied"):
        raise ValueError(f"covariance must be 'full' or 'tied', got {covariance!r}.")
    tied = covariance == "tied"
    if prior is None:
        prior = default_prior(X, n_states)
    rng = np.random.default_rng(random_state)
    if init is None:
        init = fit_em(X, fixed_state=fixed, n_states=n_states, prior=prior, random_state=rng, covariance=covariance)
    K = n_states
    free = fixed < 0
    free_idx = np.flatnonzero(free)
    pinned_states = set(np.unique(fixed[~free]).tolist())
    movable = [k for k in range(K) if k not in pinned_states]
    alpha = np.asarray(prior.dirichlet, float)
    m0, kappa0, nu0 = np.asarray(prior.mean, float), float(prior.kappa), float(prior.dof)
    psi0 = np.asarray(prior.scale_inv, float)

    W = np.empty((chains, draws, K))
    M = np.empty((chains, draws, K, d))
    S = np.empty((chains, draws, K, d, d))
    LP = np.empty((chains, draws))
    REL = np.zeros((chains, draws), dtype=np.int8)
    R_sum = np.zeros((n, K))
    ref = np.asarray(init.means, float)

    for c in range(chains):
        z = fixed.copy()
        Rf = init.responsibilities[free]
        u = rng.random(len(free_idx))[:, None]
        z[free_idx] = np.minimum((np.cumsum(Rf, axis=1) < u).sum(axis=1), K - 1)
        sweeps = range(tune + draws)
        if progressbar:
            from tqdm.auto import tqdm

            sweeps = tqdm(sweeps, desc=f"Gibbs chain {c + 1}/{chains}")
        for it in sweeps:
            means = np.empty((K, d))
            covs = np.empty((K, d, d))
            counts = np.bincount(z, minlength=K).astype(float)
            stats = []
            for k in range(K):
                Xk = X[z == k]
                Nk = counts[k]
                xbar = Xk.mean(axis=0) if Nk > 0 else np.zeros(d)
                D = Xk - xbar
                Sk = D.T @ D
                kn = kappa0 + Nk
                mn = (kappa0 * m0 + Nk * xbar) / kn
                dm = xbar - m0
                stats.append((kn, mn, Sk + (kappa0 * Nk / kn) * np.outer(dm, dm)))
                if not tied:
                    psin = psi0 + stats[k][2]
                    means[k], covs[k] = _sample_normal_wishart(kn, mn, nu0 + Nk, 0.5 * (psin + psin.T), rng)
            if tied:
                psin = psi0 + sum(st[2] for st in stats)
                G = _sample_covariance_factor(nu0 + n, 0.5 * (psin + psin.T), rng)
                Sigma = G @ G.T
                covs[:] = 0.5 * (Sigma + Sigma.T)
                for k, (kn, mn, _) in enumerate(stats):
                    means[k] = mn + G @ rng.standard_normal(d) / np.sqrt(kn)
            free_counts = np.bincount(z[free_idx], minlength=K).astype(float)
            weights = rng.dirichlet(alpha + free_counts)
            Linv, half_logdet = _inverse_cholesky(covs)
            logN = _log_gaussians_from(X, means, Linv, half_logdet)
            loglik, R = _mixture_terms(logN, weights, free, fixed)
            u = rng.random(len(free_idx))[:, None]
            z[free_idx] = np.minimum((np.cumsum(R[free_idx], axis=1) < u).sum(axis=1), K - 1)
            if it < tune:
                continue
            j = it - tune
            perm = _relabel(means, ref, movable)
            if np.any(perm != np.arange(K)):
                REL[c, j] = 1
            W[c, j], M[c, j], S[c, j] = weights[perm], means[perm], covs[perm]
            LP[c, j] = loglik + _prior_log_density(weights, means, Linv, half_logdet, prior, tied=tied)
            R_sum += R[:, perm]
    return GibbsResult(
        weights=W,
        means=M,
        covariances=S,
        lp=LP,
        relabelled=REL,
        mean_responsibilities=R_sum / (chains * draws),
    )

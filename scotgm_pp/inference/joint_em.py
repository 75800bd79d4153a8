"""EM backend of the joint graph: Gaussian states in PCA space and the count layer share ``z``.

The density maximised is the one :func:`scotgm_pp.models.build_model` declares when given
counts (untransformed space, PyMC's ``jacobian=False``)::

    log p = log Dirichlet(pi) + sum_k log NW(mu_k, Lambda_k) + log prior(beta, delta, gamma)
          + sum_{free i} log sum_k pi_k N(x_i | mu_k, Sigma_k) prod_g NB(y_ig | k)
          + sum_{pinned i} [log N(x_i | mu_z, Sigma_z) + sum_g log NB(y_ig | z)]

E-step: the posterior of each free cell's state uses both its PCA scores and its counts
(``evidence="joint"``), or its PCA scores only (``evidence="gaussian"``: a *cut*, in which the
counts are fitted given states they do not inform; the density then reported is that of the
Gaussian graph). Given the cut's state probabilities ``r_ik``, the count parameters maximise
each gene's marginal log posterior ``sum_i log sum_k r_ik NB(y_ig | k)``
(``count_likelihood="marginal"``, the default; :func:`~scotgm_pp.inference.count_fit.fit_marginal`)
or the expected complete-data log posterior ``sum_i sum_k r_ik log NB(y_ig | k)``
(``"weighted"``: the M-step with the states fixed).
M-step: the closed-form Normal-Wishart-Dirichlet maximiser for the Gaussian part
(:mod:`scotgm_pp.inference.em`) and one Newton step per gene with step-halving for the count part
(:mod:`scotgm_pp.inference.count_fit`): a generalised EM whose every step raises the
complete-data objective, so the log density never decreases.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import count_fit as cf
from . import count_layer as cl
from .em import (
    EMResult,
    NormalWishartPrior,
    _check_covariance,
    _inverse_cholesky,
    _log_gaussians_from,
    _m_step,
    _mixture_terms,
    _prior_log_density,
    _wishart_normalizer,
    default_prior,
    fit_em,
    validate_fixed_state,
    validate_scores,
)

__all__ = [
    "COUNT_LIKELIHOODS",
    "EVIDENCE",
    "JointEMResult",
    "fit_joint_em",
    "joint_log_density",
    "conditional_full_m_step",
    "any_effect_llr",
]

EVIDENCE = ("joint", "gaussian")
COUNT_LIKELIHOODS = ("marginal", "weighted")
"""How the cut (``evidence="gaussian"``) fits the counts given the state probabilities ``r_ik``:
``"marginal"`` ``sum_i log sum_k r_ik NB(y_ig | k)`` per gene, ``"weighted"``
``sum_i sum_k r_ik log NB(y_ig | k)``."""


@dataclass
class JointEMResult:
    """Result of :func:`fit_joint_em`: one MAP of one declared graph.

    Attributes
    ----------
    gaussian
        The Gaussian part as an :class:`~scotgm_pp.inference.EMResult` (weights, means,
        covariances, responsibilities; its ``logp_trace``, ``n_iter`` and ``converged`` are those
        of this fit, i.e. of the joint density when ``evidence="joint"``).
    counts
        Count-layer parameters at the MAP.
    effect_se
        Standard errors of ``counts.delta`` (``(K, G)``, row 0 NaN; Louis' identity).
    logp_trace
        The graph's log density after every iteration.
    n_iter, converged
        Iterations run and whether the relative change of the log density fell below ``tol``.
    evidence
        ``"joint"`` or ``"gaussian"`` (see the module docstring).
    covariance
        ``"tied"`` or ``"full"``: the Gaussian part of the graph.
    count_prior, dispersion
        The count layer's prior and plug-in dispersion.
    count_loglik
        ``(n, K)`` per-cell count log-likelihood under each state at the MAP (NaN where a pinned
        cell is not in that state).
    """

    gaussian: EMResult
    counts: cl.CountParams
    effect_se: np.ndarray
    logp_trace: np.ndarray
    n_iter: int
    converged: bool
    evidence: str
    covariance: str
    count_prior: cl.CountPrior
    dispersion: np.ndarray
    count_loglik: np.ndarray = field(repr=False)

    @property
    def responsibilities(self) -> np.ndarray:
        return self.gaussian.responsibilities

    @property
    def logp(self) -> float:
        return float(self.logp_trace[-1])


def _gaussian_terms(X, weights, means, covs, prior, tied, wishart_const):
    Linv, half_logdet = _inverse_cholesky(covs)
    logN = _log_gaussians_from(X, means, Linv, half_logdet)
    log_prior = _prior_log_density(weights, means, Linv, half_logdet, prior, wishart_const, tied)
    return logN, log_prior


def _combine(logN, count_rows, fixed):
    """Add each cell's count log-likelihood to its Gaussian component log densities (pinned cells:
    only their state is used, the rest is left at the Gaussian value)."""
    total = logN.copy()
    ok = np.isfinite(count_rows)
    total[ok] += count_rows[ok]
    return total


def fit_joint_em(
    X: np.ndarray,
    counts,
    *,
    size_factors: np.ndarray,
    dispersion: np.ndarray,
    fixed_state: np.ndarray | None = None,
    n_states: int = 2,
    batch: np.ndarray | None = None,
    prior: NormalWishartPrior | None = None,
    count_prior: cl.CountPrior | None = None,
    covariance: str = "tied",
    evidence: str = "joint",
    regularization: str = "map",
    max_iter: int = 500,
    tol: float = 1e-10,
    init_responsibilities: np.ndarray | None = None,
    count_data: cl.CountData | None = None,
    count_likelihood: str = "marginal",
) -> JointEMResult:
    """MAP of the joint graph (Gaussian states + count layer) by generalised EM.

    Parameters
    ----------
    X
        Cells x PCs ``(n, d)``.
    counts
        Cells x genes raw counts of the same cells (dense or sparse).
    size_factors
        Library size of every cell (its total count over all measured genes).
    dispersion
        Plug-in NB dispersion per gene (e.g. :func:`~scotgm_pp.inference.count_layer.control_dispersion`).
    fixed_state
        ``-1`` free, ``k`` pinned to state ``k`` (controls: 0).
    n_states
        ``K``.
    batch
        Optional batch label per cell (count layer offsets ``gamma``).
    prior, count_prior
        Priors of the Gaussian part (:func:`~scotgm_pp.inference.default_prior`) and of the count
        layer (:func:`~scotgm_pp.inference.count_layer.default_count_prior`).
    covariance
        ``"tied"`` (one precision shared by the states) or ``"full"``.
    evidence
        ``"joint"``: free cells' states are inferred from PCA scores and counts;
        ``"gaussian"``: from PCA scores only (a cut; see the module docstring).
    regularization
        Gaussian M-step, ``"map"`` or ``"paper"`` (see :func:`~scotgm_pp.inference.fit_em`).
    max_iter, tol
        Stop after ``max_iter`` iterations or when the relative change of the log density is at
        most ``tol``.
    init_responsibilities
        Starting responsibilities: of the Gaussian EM (``evidence="gaussian"``) or of the joint
        EM itself (``"joint"``); default: the joint EM starts from the converged Gaussian EM.
    count_data
        A prepared :class:`~scotgm_pp.inference.count_layer.CountData` of the same cells (to
        reuse it between fits); built from the arguments when ``None``.
    count_likelihood
        With ``evidence="gaussian"``: ``"marginal"`` (default) or ``"weighted"``
        (:data:`COUNT_LIKELIHOODS`); its standard errors are Louis' (marginal) or the imputation
        correction (weighted), :func:`~scotgm_pp.inference.count_fit.effect_standard_errors`.

    Returns
    -------
    JointEMResult
    """
    X = validate_scores(X)
    n, d = X.shape
    if evidence not in EVIDENCE:
        raise ValueError(f"evidence must be one of {EVIDENCE}, got {evidence!r}.")
    if count_likelihood not in COUNT_LIKELIHOODS:
        raise ValueError(f"count_likelihood must be one of {COUNT_LIKELIHOODS}, got {count_likelihood!r}.")
    tied = _check_covariance(covariance)
    fixed = validate_fixed_state(fixed_state, n, int(n_states))
    K = int(n_states)
    if prior is None:
        prior = default_prior(X, K)
    data = count_data if count_data is not None else cl.CountData(counts, size_factors, dispersion, fixed, K, batch)
    if data.n_cells != n:
        raise ValueError(f"counts have {data.n_cells} cells but X has {n}; pass the same cells in the same order.")
    if count_prior is None:
        count_prior = cl.default_count_prior(counts, size_factors)
    if np.shape(count_prior.beta_mean) != (data.n_genes,):
        raise ValueError(f"count_prior is for {np.size(count_prior.beta_mean)} genes, counts have {data.n_genes}.")
    free = fixed < 0
    if init_responsibilities is not None:
        R0 = np.array(init_responsibilities, float)
        if R0.shape != (n, K):
            raise ValueError(f"init_responsibilities must have shape ({n}, {K}), got {R0.shape}.")
    if evidence == "joint" and init_responsibilities is not None:
        R = R0
        R[~free] = 0.0
        R[np.flatnonzero(~free), fixed[~free]] = 1.0
    else:
        # The Gaussian graph's EM: the whole state fit for the cut (with this call's stopping
        # rule), the start of the joint EM (run to convergence).
        cut = evidence == "gaussian"
        gauss = fit_em(X, fixed_state=fixed, n_states=K, prior=prior, covariance=covariance,
                       regularization=regularization, max_iter=max_iter if cut else 500, tol=tol if cut else 1e-10,
                       init_responsibilities=None if init_responsibilities is None else R0)
        R = gauss.responsibilities
    if evidence == "gaussian":
        # The cut: the count layer given the Gaussian graph's converged state probabilities.
        cp, Q, _, _, method = cf.fit_cut(data, R, count_prior, count_likelihood)
        se = cf.effect_standard_errors(data, cp, R, count_prior, correction=method, Q=Q)
        return JointEMResult(gaussian=gauss, counts=cp.params, effect_se=se, logp_trace=gauss.logp_trace,
                             n_iter=gauss.n_iter, converged=gauss.converged, evidence=evidence, covariance=covariance,
                             count_prior=count_prior, dispersion=data.phi.copy(), count_loglik=cp.row_loglik)
    wishart_const = _wishart_normalizer(prior)
    cp, _, _ = cf.fit_given_states(data, R, count_prior)  # start the counts at their MAP given R
    trace: list[float] = []
    converged = False
    it = 0
    for it in range(1, int(max_iter) + 1):
        weights, means, covs = _m_step(X, R, free, prior, regularization, tied)
        cp, _, _ = cf.newton_step(data, cp, R, count_prior)
        logN, log_prior = _gaussian_terms(X, weights, means, covs, prior, tied, wishart_const)
        loglik, R = _mixture_terms(_combine(logN, cp.row_loglik, fixed), weights, free, fixed)
        trace.append(loglik + log_prior + cl.count_log_prior(cp.params, count_prior))
        if len(trace) > 1 and abs(trace[-1] - trace[-2]) <= tol * max(1.0, abs(trace[-2])):
            converged = True
            break
    se = cf.effect_standard_errors(data, cp, R, count_prior, correction="louis")
    gauss = EMResult(weights=weights, means=means, covariances=covs, responsibilities=R, n_iter=it,
                     converged=converged, logp_trace=np.asarray(trace), prior=prior, regularization=regularization,
                     fixed_state=fixed, covariance="tied" if tied else "full")
    return JointEMResult(gaussian=gauss, counts=cp.params, effect_se=se, logp_trace=np.asarray(trace), n_iter=it,
                         converged=converged, evidence=evidence, covariance=covariance, count_prior=count_prior,
                         dispersion=data.phi.copy(), count_loglik=cp.row_loglik)


def joint_log_density(
    X: np.ndarray,
    counts,
    *,
    size_factors: np.ndarray,
    dispersion: np.ndarray,
    weights: np.ndarray,
    means: np.ndarray,
    covariances: np.ndarray,
    params: cl.CountParams,
    prior: NormalWishartPrior,
    count_prior: cl.CountPrior,
    fixed_state: np.ndarray | None = None,
    batch: np.ndarray | None = None,
    covariance: str = "tied",
    state_probability: np.ndarray | None = None,
    count_likelihood: str = "marginal",
) -> float:
    """Log density of the joint graph at given parameters (untransformed space): the number
    ``build_model(X, counts=..., ...).compile_logp(jacobian=False)`` returns. With
    ``state_probability`` (``(n, K)``), the cut graph's (``count_evidence="cut"``): the scores'
    mixture density plus ``sum_ig log sum_k r_ik NB(y_ig | k)`` (``count_likelihood="marginal"``)
    or ``sum_ik r_ik log p(y_i | k)`` (``"weighted"``)."""
    if count_likelihood not in COUNT_LIKELIHOODS:
        raise ValueError(f"count_likelihood must be one of {COUNT_LIKELIHOODS}, got {count_likelihood!r}.")
    X = validate_scores(X)
    n = X.shape[0]
    K = len(weights)
    fixed = validate_fixed_state(fixed_state, n, K)
    tied = _check_covariance(covariance)
    data = cl.CountData(counts, size_factors, dispersion, fixed, K, batch)
    cp = cf.evaluate(data, params)
    logN, log_prior = _gaussian_terms(X, np.asarray(weights, float), np.asarray(means, float),
                                      np.asarray(covariances, float), prior, tied, _wishart_normalizer(prior))
    if state_probability is None:
        loglik, _ = _mixture_terms(_combine(logN, cp.row_loglik, fixed), np.asarray(weights, float), fixed < 0, fixed)
    else:
        r = np.asarray(state_probability, float)
        loglik, _ = _mixture_terms(logN, np.asarray(weights, float), fixed < 0, fixed)
        if count_likelihood == "marginal":
            with np.errstate(divide="ignore"):
                terms = np.log(r)[:, :, None] + _entry_loglik(data, params)  # (n, K, G)
            top = terms.max(axis=1, keepdims=True)
            loglik += float(np.sum(np.log(np.exp(terms - top).sum(axis=1)) + top[:, 0]))
        else:
            loglik += float(np.sum(np.where(r > 0, r * np.nan_to_num(cp.row_loglik, nan=0.0), 0.0)))
    return loglik + log_prior + cl.count_log_prior(params, count_prior)


def _entry_loglik(data: cl.CountData, params: cl.CountParams) -> np.ndarray:
    """``(n, K, G)``: ``log NB(y_ig | state k)`` of every cell (original order), gene and state."""
    from scipy.special import gammaln

    codes = np.empty(data.n_cells, int)
    codes[data.order] = data.batch
    y = np.empty_like(data.ya)
    y[data.order] = data.ya
    alpha = data.alpha[codes]  # (n, G)
    y -= alpha
    mu = data.size_factors[:, None, None] * np.exp(params.log_rates()[:, codes].transpose(1, 0, 2))
    log_t = np.log(mu + alpha[:, None])
    const = gammaln(y + alpha) - gammaln(alpha) - gammaln(y + 1.0) + alpha * np.log(alpha)
    return const[:, None] + y[:, None] * np.log(mu) - (y + alpha)[:, None] * log_t


def conditional_full_m_step(
    X: np.ndarray, responsibilities: np.ndarray, prior: NormalWishartPrior, regularization: str = "map"
) -> tuple[np.ndarray, np.ndarray]:
    """State means and full covariances that maximise the full-covariance model's complete-data
    log posterior given fixed responsibilities (a conditional MAP).

    With ``R`` from a converged tied fit, this gives each state its own covariance (what the
    transport coupling needs) without moving any cell between states. Returns ``(means, covs)``
    of shapes ``(K, d)`` and ``(K, d, d)``.
    """
    X = validate_scores(X)
    R = np.asarray(responsibilities, float)
    free = np.ones(X.shape[0], bool)
    _, means, covs = _m_step(X, R, free, prior, regularization, False)
    return means, covs


def any_effect_llr(
    X: np.ndarray,
    *,
    weights: np.ndarray,
    means: np.ndarray,
    covariances: np.ndarray,
    fixed_state: np.ndarray,
    count_data: cl.CountData,
    count_params: cl.CountParams,
    count_prior: cl.CountPrior,
    regularization: float = 0.01,
    count_loglik: np.ndarray | None = None,
) -> dict[str, float]:
    """Log-likelihood ratio of a fitted two-state model against the one-state model (every cell basal).

    The numerator is the joint graph's log-likelihood (PCA scores and counts, the free cells'
    state marginalised with ``weights``) at the given parameters; the denominator is the
    one-state model at its MAP: one Gaussian (Normal-Wishart prior
    ``default_prior(X, 1, regularization=...)``, closed form) and the count layer without state
    effects (Newton to convergence, same count prior and dispersion). Priors are not included.
    It is an "any effect" statistic per perturbation; its null distribution is not ``chi^2``
    (states are not identified under the null) and grows with the model's size (a guide state
    with its own ``d x d`` covariance gains about ``d (d + 3) / 4`` under the null, the count
    layer about half a unit per gene before shrinkage), so calibrate it, e.g. by permutation.

    ``count_loglik``: the ``(n, K)`` per-cell count log-likelihood at ``count_params``
    (``CountPass.row_loglik``), to skip recomputing it.

    Returns
    -------
    dict
        ``llr`` (scores and counts), ``llr_gaussian`` (the PCA scores alone) and ``llr_counts``
        (``llr - llr_gaussian``).
    """
    X = validate_scores(X)
    n = X.shape[0]
    fixed = np.asarray(fixed_state, int)
    free = fixed < 0
    Linv, half = _inverse_cholesky(np.asarray(covariances, float))
    logN = _log_gaussians_from(X, np.asarray(means, float), Linv, half)
    w = np.asarray(weights, float)
    gauss_two, _ = _mixture_terms(logN, w, free, fixed)
    rows = cf.evaluate(count_data, count_params).row_loglik if count_loglik is None else np.asarray(count_loglik)
    joint_two, _ = _mixture_terms(_combine(logN, rows, fixed), w, free, fixed)
    prior1 = default_prior(X, 1, regularization=regularization)
    _, mean1, cov1 = _m_step(X, np.ones((n, 1)), np.zeros(n, bool), prior1, "map", False)
    L1, h1 = _inverse_cholesky(cov1)
    gauss_one = float(_log_gaussians_from(X, mean1, L1, h1).sum())
    basal = count_data.all_basal()
    init = cl.CountParams(beta=count_params.beta.copy(), delta=np.zeros((1, basal.n_genes)),
                          gamma=count_params.gamma.copy())
    one, _, _ = cf.fit_given_states(basal, np.ones((n, 1)), count_prior, init=init)
    joint_one = gauss_one + float(one.row_loglik[:, 0].sum())
    llr = joint_two - joint_one
    llr_g = gauss_two - gauss_one
    return {"llr": float(llr), "llr_gaussian": float(llr_g), "llr_counts": float(llr - llr_g)}

"""EM backend: the MAP of the sc-OTGM mixture under a conjugate Normal-Wishart prior.

The density maximised here is the one declared by :func:`scotgm_pp.models.build_model`
(in the untransformed parameter space, i.e. PyMC's ``jacobian=False``):

* ``pi ~ Dirichlet(alpha)`` over the states of the *free* cells,
* ``Lambda_k ~ Wishart(nu0, Psi0^{-1})`` (precision of state ``k``),
* ``mu_k | Lambda_k ~ N(m0, (kappa0 Lambda_k)^{-1})``,
* free cells ``x_i ~ sum_k pi_k N(mu_k, Lambda_k^{-1})``,
* pinned cells (``fixed_state[i] = k >= 0``, e.g. non-targeting controls in state 0)
  ``x_i ~ N(mu_k, Lambda_k^{-1})``: their state is known, so they carry no ``pi`` term.

Given responsibilities ``r_ik`` the M-step is the exact joint maximiser over
``(pi, mu, Lambda)``::

    pi_k     = (N_k^free + alpha_k - 1) / (N^free + sum(alpha) - K)
    mu_k     = (sum_i r_ik x_i + kappa0 m0) / (N_k + kappa0)
    Sigma_k  = (Psi0 + S_k + kappa0 (mu_k - m0)(mu_k - m0)^T) / (N_k + nu0 - d)

with ``S_k = sum_i r_ik (x_i - mu_k)(x_i - mu_k)^T``, so the log density never decreases.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from scipy.special import gammaln, multigammaln

__all__ = [
    "NormalWishartPrior",
    "default_prior",
    "EMResult",
    "fit_em",
    "log_density",
    "gaussian_logpdf",
    "validate_fixed_state",
]

_LOG2PI = np.log(2.0 * np.pi)


@dataclass(frozen=True)
class NormalWishartPrior:
    """Conjugate prior of the state parameters.

    Attributes
    ----------
    mean
        ``m0``, prior mean of every state mean, shape ``(d,)``.
    kappa
        ``kappa0 > 0``, prior pseudo-count on the means.
    dof
        ``nu0 > d - 1``, Wishart degrees of freedom.
    scale_inv
        ``Psi0``, the inverse of the Wishart scale matrix, shape ``(d, d)``; it adds
        ``Psi0 / (N_k + nu0 - d)`` to each covariance: the Tikhonov term of the paper.
    dirichlet
        ``alpha``, Dirichlet concentration of the state weights, shape ``(K,)``, all ``>= 1``.
    """

    mean: np.ndarray
    kappa: float
    dof: float
    scale_inv: np.ndarray
    dirichlet: np.ndarray

    def __post_init__(self):
        d = np.asarray(self.mean).shape[0]
        if self.kappa <= 0:
            raise ValueError(f"prior kappa must be > 0, got {self.kappa}.")
        if self.dof <= d - 1:
            raise ValueError(f"prior dof must exceed d - 1 = {d - 1}, got {self.dof}.")
        if np.any(np.asarray(self.dirichlet) < 1):
            raise ValueError("Dirichlet concentrations must be >= 1 for the MAP to exist.")

    @property
    def scale(self) -> np.ndarray:
        """The Wishart scale matrix ``V = Psi0^{-1}`` (as PyMC's ``pm.Wishart(nu, V)`` takes it)."""
        return np.linalg.inv(self.scale_inv)

    def to_dict(self) -> dict:
        return {
            "mean": np.asarray(self.mean).tolist(),
            "kappa": float(self.kappa),
            "dof": float(self.dof),
            "scale_inv": np.asarray(self.scale_inv).tolist(),
            "dirichlet": np.asarray(self.dirichlet).tolist(),
        }


def default_prior(
    X: np.ndarray,
    n_states: int = 2,
    *,
    regularization: float = 0.01,
    kappa: float = 0.01,
    extra_dof: float = 2.0,
    dirichlet: float = 1.0,
) -> NormalWishartPrior:
    """Weakly informative, data-scaled prior.

    ``Psi0 = regularization * mean(diag Cov X) * (n / n_states) * I``: for a state holding its
    share ``n / n_states`` of the cells, the MAP covariance then carries a ridge of about
    ``regularization * mean(diag Cov X)``, the Tikhonov term of sc-OTGM (appendix A.6, 0.01).
    ``nu0 = d + extra_dof`` and ``m0`` is the data mean.

    Parameters
    ----------
    X
        Cells x features ``(n, d)``.
    n_states
        Number of states ``K``.
    regularization
        Ridge as a fraction of the mean feature variance (paper: 0.01).
    kappa
        Prior pseudo-count of the means (small: nearly flat).
    extra_dof
        ``nu0 - d``; keep it an integer for :func:`scotgm_pp.models.build_model` (``pm.Wishart``
        truncates a non-integer ``nu``).
    dirichlet
        Concentration of the state weights (``>= 1``).

    Returns
    -------
    NormalWishartPrior
    """
    X = np.asarray(X, float)
    n, d = X.shape
    var = float(np.mean(np.var(X, axis=0))) if n > 1 else 1.0
    var = var if var > 0 else 1.0
    psi = regularization * var * max(n / n_states, 1.0)
    return NormalWishartPrior(
        mean=X.mean(axis=0),
        kappa=float(kappa),
        dof=float(d + extra_dof),
        scale_inv=psi * np.eye(d),
        dirichlet=np.full(n_states, float(dirichlet)),
    )


@dataclass
class EMResult:
    """Result of :func:`fit_em`.

    Attributes
    ----------
    weights
        State weights of the free cells, shape ``(K,)``.
    means, covariances
        State means ``(K, d)`` and covariances ``(K, d, d)``.
    responsibilities
        Posterior state probabilities per cell ``(n, K)``; pinned cells are one-hot.
    n_iter, converged
        Iterations run and whether the relative change fell below ``tol``.
    logp_trace
        The model's log density (prior + likelihood, untransformed space) after every
        M-step; the same number PyMC's ``model.compile_logp(jacobian=False)`` returns.
    prior, regularization
        What was maximised.
    """

    weights: np.ndarray
    means: np.ndarray
    covariances: np.ndarray
    responsibilities: np.ndarray
    n_iter: int
    converged: bool
    logp_trace: np.ndarray
    prior: NormalWishartPrior
    regularization: str = "map"
    fixed_state: np.ndarray | None = field(default=None, repr=False)
    covariance: str = "full"

    @property
    def precisions(self) -> np.ndarray:
        """Inverse covariances ``(K, d, d)`` (the ``precision_k`` of the PyMC graph)."""
        return np.linalg.inv(self.covariances)

    @property
    def logp(self) -> float:
        """The log density at the returned parameters (last entry of ``logp_trace``)."""
        return float(self.logp_trace[-1])


def gaussian_logpdf(X: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """Row-wise log density of ``N(mean, cov)``.

    Parameters
    ----------
    X
        Points, shape ``(n, d)``.
    mean, cov
        Mean ``(d,)`` and positive-definite covariance ``(d, d)``.

    Returns
    -------
    numpy.ndarray
        ``(n,)`` log densities.
    """
    X = np.atleast_2d(np.asarray(X, float))
    Linv, half_logdet = _inverse_cholesky(np.asarray(cov, float)[None])
    return _log_gaussians_from(X, np.asarray(mean, float)[None], Linv, half_logdet)[:, 0]


def _inverse_cholesky(covs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``Linv_k = L_k^{-1}`` (lower) with ``L_k L_k^T = Sigma_k``, and ``log|L_k| = log|Sigma_k| / 2``.

    ``Linv_k^T Linv_k = Sigma_k^{-1}``: one Cholesky per state serves the E-step, the
    likelihood and the Wishart prior term of the same iteration.
    """
    try:
        L = np.linalg.cholesky(covs)  # batched over states
    except np.linalg.LinAlgError as err:
        bad = [k for k in range(len(covs)) if np.any(np.linalg.eigvalsh(covs[k]) <= 0)]
        raise np.linalg.LinAlgError(
            f"covariance of state(s) {bad} is not positive definite; increase the prior "
            "regularization (default_prior(..., regularization=...)) or reduce the number of PCs."
        ) from err
    # NumPy's inverse, not scipy's solve_triangular: the hot loop then stays on one BLAS
    # (two OpenBLAS thread pools thrash each other on a busy machine).
    Linv = np.tril(np.linalg.inv(L))
    half_logdet = np.log(np.diagonal(L, axis1=1, axis2=2)).sum(axis=1)
    return Linv, half_logdet


@lru_cache(maxsize=32)
def _block_ones(K: int, d: int) -> np.ndarray:
    out = np.repeat(np.eye(K), d, axis=0)
    out.setflags(write=False)
    return out


def _log_gaussians_from(X, means, Linv, half_logdet) -> np.ndarray:
    """``(n, K)`` log N(x_i | mu_k, Sigma_k) from the inverse Cholesky factors (one matmul for all K)."""
    n, d = X.shape
    K = means.shape[0]
    W = Linv.transpose(2, 0, 1).reshape(d, K * d)  # [Linv_0^T | Linv_1^T | ...]
    blocks = _block_ones(K, d)
    shift = np.einsum("kij,kj->ki", Linv, means).reshape(K * d)
    Z = X @ W
    Z -= shift
    Z *= Z
    out = Z @ blocks  # block sums over each state's d columns, by BLAS
    out *= -0.5
    out -= 0.5 * d * _LOG2PI + half_logdet
    return out


def _log_gaussians(X, means, covs) -> np.ndarray:
    Linv, half_logdet = _inverse_cholesky(np.asarray(covs, float))
    return _log_gaussians_from(X, np.asarray(means, float), Linv, half_logdet)


def _wishart_normalizer(prior: NormalWishartPrior) -> tuple[float, float]:
    """Parameter-free parts of the prior: log Wishart normaliser, log Dirichlet normaliser."""
    d = np.shape(prior.mean)[0]
    nu = float(prior.dof)
    _, logdet_psi = np.linalg.slogdet(np.asarray(prior.scale_inv, float))  # log|V| = -log|Psi0|
    alpha = np.asarray(prior.dirichlet, float)
    return (
        float(-0.5 * nu * d * np.log(2.0) + 0.5 * nu * logdet_psi - multigammaln(0.5 * nu, d)),
        float(gammaln(alpha.sum()) - gammaln(alpha).sum()),
    )


def _prior_log_density(weights, means, Linv, half_logdet, prior, wishart_const=None, tied=False) -> float:
    """log Dirichlet(weights) + sum_k [log Wishart(Lambda_k) + log N(mu_k | m0, Sigma_k / kappa)].

    With ``tied`` every state shares one precision, whose Wishart term is counted once.
    """
    K, d = means.shape
    alpha = np.asarray(prior.dirichlet, float)
    with np.errstate(divide="ignore"):
        logw = np.log(weights)
    dirichlet_kernel = np.where(alpha > 1, (alpha - 1) * logw, 0.0)
    if wishart_const is None:
        wishart_const = _wishart_normalizer(prior)
    total = float(dirichlet_kernel.sum()) + wishart_const[1]
    wishart_const = wishart_const[0]
    nu, kappa = float(prior.dof), float(prior.kappa)
    psi = np.asarray(prior.scale_inv, float)
    Lam = np.einsum("kji,kjl->kil", Linv, Linv)  # Linv_k^T Linv_k = Sigma_k^{-1}
    trace_term = np.einsum("ij,kij->k", psi, Lam)
    z = np.einsum("kij,kj->ki", Linv, means - np.asarray(prior.mean, float))
    quad = np.einsum("ki,ki->k", z, z)
    logdet_lam = -2.0 * half_logdet
    wishart = 0.5 * (nu - d - 1) * logdet_lam - 0.5 * trace_term + wishart_const
    # N(mu_k | m0, Sigma_k / kappa): log|Sigma_k / kappa| / 2 = half_logdet - d log(kappa) / 2
    normal = -0.5 * (d * _LOG2PI + kappa * quad) - half_logdet + 0.5 * d * np.log(kappa)
    if tied:
        wishart = wishart[:1]
    return total + float(np.sum(wishart) + np.sum(normal))


def _mixture_terms(logN, weights, free, fixed):
    """Likelihood and responsibilities from the ``(n, K)`` component log densities."""
    all_free = bool(free.all())
    R = logN.copy() if all_free else np.zeros_like(logN)
    loglik = 0.0
    if free.any():
        with np.errstate(divide="ignore"):
            logw = np.log(weights)
        a = R if all_free else logN[free]
        a += logw
        amax = a.max(axis=1, keepdims=True)
        a -= amax
        np.exp(a, out=a)
        total = a.sum(axis=1, keepdims=True)
        loglik += float(np.sum(np.log(total)) + np.sum(amax))
        a /= total
        if not all_free:
            R[free] = a
    pinned = ~free
    if pinned.any():
        rows = np.flatnonzero(pinned)
        loglik += float(logN[rows, fixed[pinned]].sum())
        R[rows, fixed[pinned]] = 1.0
    return loglik, R


def free_responsibilities(X: np.ndarray, weights, means, covariances) -> np.ndarray:
    """State posteriors ``(n, K)`` of cells treated as free (no pinned state), e.g. new cells or
    controls with their label hidden."""
    X = np.asarray(X, float)
    n = X.shape[0]
    logN = _log_gaussians(X, means, covariances)
    return _mixture_terms(logN, np.asarray(weights, float), np.ones(n, bool), np.full(n, -1))[1]


def log_density(
    X: np.ndarray,
    weights: np.ndarray,
    means: np.ndarray,
    covariances: np.ndarray,
    prior: NormalWishartPrior,
    fixed_state: np.ndarray | None = None,
    covariance: str = "full",
) -> float:
    """Joint log density (prior + likelihood) of the model in the untransformed space.

    This is the number ``build_model(X, fixed_state=..., prior=...).compile_logp(jacobian=False)``
    returns at the same parameters (with ``precision_k = inv(covariances[k])``).

    Parameters
    ----------
    X
        Cells x features ``(n, d)``.
    weights, means, covariances
        ``(K,)``, ``(K, d)``, ``(K, d, d)``.
    prior
        The :class:`NormalWishartPrior`.
    fixed_state
        ``-1`` free, ``k`` pinned to state ``k``; ``None``: all free.
    covariance
        ``"full"`` (one precision per state) or ``"tied"`` (one shared precision; the
        ``covariances`` must then be equal).

    Returns
    -------
    float
    """
    X = np.asarray(X, float)
    means = np.asarray(means, float)
    fixed = np.full(X.shape[0], -1) if fixed_state is None else np.asarray(fixed_state, dtype=int)
    Linv, half_logdet = _inverse_cholesky(np.asarray(covariances, float))
    logN = _log_gaussians_from(X, means, Linv, half_logdet)
    loglik, _ = _mixture_terms(logN, np.asarray(weights, float), fixed < 0, fixed)
    tied = _check_covariance(covariance)
    return loglik + _prior_log_density(np.asarray(weights, float), means, Linv, half_logdet, prior, tied=tied)


def _check_covariance(covariance: str) -> bool:
    if covariance not in ("full", "tied"):
        raise ValueError(f"covariance must be 'full' or 'tied', got {covariance!r}.")
    return covariance == "tied"


def _m_step(X, R, free, prior, regularization, tied=False):
    n, d = X.shape
    K = R.shape[1]
    Nk = R.sum(axis=0)
    alpha = np.asarray(prior.dirichlet, float)
    Nfree = Nk if free.all() else R[free].sum(axis=0)
    denom = Nfree.sum() + alpha.sum() - K
    weights = (Nfree + alpha - 1) / denom if denom > 0 else np.full(K, 1.0 / K)
    Sx = R.T @ X  # (K, d) weighted sums
    if regularization == "map":
        means = (Sx + prior.kappa * prior.mean) / (Nk + prior.kappa)[:, None]
    else:
        means = Sx / np.maximum(Nk, 1e-12)[:, None]
    D = X[None, :, :] - means[:, None, :]  # (K, n, d)
    S = (D * R.T[:, :, None]).transpose(0, 2, 1) @ D  # (K, d, d) weighted scatter
    if regularization == "map" and tied:
        # One precision: log|Lambda| collects N/2 (data) + K/2 (mean priors) + (nu0 - d - 1)/2.
        dm = means - prior.mean
        B = prior.scale_inv + S.sum(axis=0) + prior.kappa * dm.T @ dm
        covs = np.broadcast_to(B / (Nk.sum() + K + prior.dof - d - 1), (K, d, d)).copy()
    elif regularization == "map":
        dm = means - prior.mean
        B = prior.scale_inv + S + prior.kappa * dm[:, :, None] * dm[:, None, :]
        covs = B / (Nk + prior.dof - d)[:, None, None]
    else:  # the published Algorithm 3: ML step, then a Tikhonov ridge
        covs = S / np.maximum(Nk, 1e-12)[:, None, None]
        if tied:
            covs = np.broadcast_to(S.sum(axis=0) / Nk.sum(), (K, d, d)).copy()
        ridge = 0.01 * np.trace(covs, axis1=1, axis2=2) / d + 1e-9
        covs = covs + ridge[:, None, None] * np.eye(d)
    covs = 0.5 * (covs + covs.transpose(0, 2, 1))
    return weights, means, covs


def _initial_responsibilities(X, fixed, K, rng):
    n = X.shape[0]
    free = fixed < 0
    R = np.zeros((n, K))
    R[np.flatnonzero(~free), fixed[~free]] = 1.0
    if not free.any():
        return R
    pinned_states = set(np.unique(fixed[~free]).tolist())
    open_states = [k for k in range(K) if k not in pinned_states]
    Xf = X[free]
    if len(open_states) == 1:
        # Semi-supervised two-state case: every free cell starts in the unpinned state,
        # the E-step then moves the cells that look like the pinned ones back.
        R[free, open_states[0]] = 1.0
        return R
    # k-means++ seeding of the open states over the free cells, with the pinned states' means as
    # fixed seeds (so open states start away from them), then a few Lloyd steps.
    centers = np.empty((K, X.shape[1]))
    for k in pinned_states:
        centers[k] = X[fixed == k].mean(axis=0)
    seeded = [centers[k] for k in pinned_states]
    for k in open_states:
        if seeded:
            d2 = np.min([np.sum((Xf - c) ** 2, axis=1) for c in seeded], axis=0)
            p = d2 / d2.sum() if d2.sum() > 0 else np.full(len(Xf), 1.0 / len(Xf))
            centers[k] = Xf[rng.choice(len(Xf), p=p)]
        else:
            centers[k] = Xf[rng.integers(len(Xf))]
        seeded.append(centers[k])
    labels = np.zeros(len(Xf), dtype=int)
    for _ in range(20):
        d2 = ((Xf[:, None, :] - centers[None, :, :]) ** 2).sum(-1)
        labels = np.argmin(d2, axis=1)
        for k in range(K):
            members = Xf[labels == k]
            if k in pinned_states:
                members = np.vstack([members, X[fixed == k]])
            if len(members):
                centers[k] = members.mean(axis=0)
    Rf = np.zeros((len(Xf), K))
    Rf[np.arange(len(Xf)), labels] = 1.0
    R[free] = Rf
    return R


def validate_scores(X) -> np.ndarray:
    """Cells x features as a finite float array, or an error naming the problem."""
    X = np.asarray(X, dtype=float)
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D (cells x features), got shape {X.shape}.")
    if not np.all(np.isfinite(X)):
        raise ValueError("X contains non-finite values; remove or impute them before fitting.")
    return X


def validate_fixed_state(fixed_state, n_cells: int, n_states: int) -> np.ndarray:
    """Check ``fixed_state`` and return it as an integer array (``-1`` free, ``k`` pinned to state ``k``).

    Parameters
    ----------
    fixed_state
        ``None`` (every cell free) or one integer per cell; integral floats are accepted,
        booleans and labels are refused (they would pin cells silently to states 0 and 1).
    n_cells, n_states
        Expected length and number of states.

    Returns
    -------
    numpy.ndarray
        ``(n_cells,)`` integers in ``-1 .. n_states - 1``.
    """
    if fixed_state is None:
        return np.full(n_cells, -1, dtype=int)
    raw = np.asarray(fixed_state)
    if raw.shape != (n_cells,):
        raise ValueError(f"fixed_state must have length {n_cells} (one entry per cell), got shape {raw.shape}.")
    if raw.dtype.kind == "f":
        if not np.all(np.isfinite(raw)) or not np.all(raw == np.round(raw)):
            raise ValueError("fixed_state must hold integers: -1 for a free cell, k to pin a cell to state k.")
    elif raw.dtype.kind not in "iu":
        raise ValueError(
            f"fixed_state must be integers (-1 free, k pinned to state k), got dtype {raw.dtype}; "
            "map labels to states first, e.g. np.where(labels == 'control', 0, -1)."
        )
    fixed = raw.astype(int)
    bad = (fixed < -1) | (fixed >= n_states)
    if bad.any():
        raise ValueError(
            f"fixed_state values must be -1 (free) or a state in 0..{n_states - 1}; "
            f"found {sorted(set(fixed[bad].tolist()))[:5]}."
        )
    return fixed


def fit_em(
    X: np.ndarray,
    *,
    fixed_state: np.ndarray | None = None,
    n_states: int = 2,
    prior: NormalWishartPrior | None = None,
    regularization: str = "map",
    max_iter: int = 200,
    tol: float = 1e-7,
    init_responsibilities: np.ndarray | None = None,
    random_state: int | np.random.Generator | None = None,
    n_init: int = 1,
    covariance: str = "full",
) -> EMResult:
    """MAP of the sc-OTGM mixture by expectation-maximisation.

    Parameters
    ----------
    X
        Cells x features (PCA scores), shape ``(n, d)``.
    fixed_state
        Integer array of length ``n``: ``-1`` for a free cell, ``k`` to pin the cell to state ``k``
        (e.g. non-targeting controls to state 0). ``None``: all cells free.
    n_states
        Number of Gaussian states ``K``.
    prior
        The Normal-Wishart-Dirichlet prior; :func:`default_prior` when ``None``.
    regularization
        ``"map"`` (default): the exact maximiser of prior + likelihood, monotone in the
        log density. ``"paper"``: Algorithm 3 as published, a maximum-likelihood M-step followed
        by the Tikhonov ridge ``0.01 * mean(diag Sigma_k)``; this is not the MAP of any fixed
        prior, and its ``logp_trace`` (still evaluated under ``prior``) need not increase.
    max_iter, tol
        Stop after ``max_iter`` iterations or when the relative change of the log density is
        below ``tol``.
    init_responsibilities
        Optional starting responsibilities ``(n, K)`` (pinned rows are overwritten).
    random_state
        Seed or Generator for the k-means++ start (used when two or more states hold no pinned
        cells; with one open state, e.g. controls pinned to state 0 of two, the start is
        deterministic: every free cell in the open state).
    n_init
        Number of k-means++ starts when the start is random; the fit with the highest log
        density is returned. Ignored for deterministic starts and ``init_responsibilities``.
    covariance
        ``"full"``: a precision per state. ``"tied"``: one precision shared by every state
        (``build_model(..., covariance="tied")``), so states differ only by their means; the
        semi-supervised escape model uses it to find which guide cells carry the perturbation.

    Returns
    -------
    EMResult
    """
    X = validate_scores(X)
    n, d = X.shape
    if regularization not in ("map", "paper"):
        raise ValueError(f"regularization must be 'map' or 'paper', got {regularization!r}.")
    if int(n_states) != n_states or n_states < 1:
        raise ValueError(f"n_states must be a positive integer, got {n_states!r}.")
    fixed = validate_fixed_state(fixed_state, n, int(n_states))
    if n < n_states + 1:
        raise ValueError(f"need more than {n_states} cells to fit {n_states} states, got {n}.")
    if int(max_iter) < 1 or tol < 0:
        raise ValueError(f"max_iter must be >= 1 and tol >= 0, got max_iter={max_iter}, tol={tol}.")
    if prior is None:
        prior = default_prior(X, n_states)
    if np.shape(prior.mean) != (d,) or np.shape(prior.dirichlet) != (n_states,):
        raise ValueError(
            f"prior does not match the data: prior.mean has shape {np.shape(prior.mean)} (need ({d},)) and "
            f"prior.dirichlet {np.shape(prior.dirichlet)} (need ({n_states},)); build it with "
            "default_prior(X, n_states)."
        )
    if init_responsibilities is not None and np.shape(init_responsibilities) != (n, n_states):
        raise ValueError(
            f"init_responsibilities must have shape ({n}, {n_states}), got {np.shape(init_responsibilities)}."
        )
    if int(n_init) < 1:
        raise ValueError(f"n_init must be >= 1, got {n_init}.")
    tied = _check_covariance(covariance)
    rng = np.random.default_rng(random_state)
    free = fixed < 0

    if init_responsibilities is not None:
        R = np.array(init_responsibilities, dtype=float)
        R[np.flatnonzero(~free)] = 0.0
        R[np.flatnonzero(~free), fixed[~free]] = 1.0
        return _run_em(X, R, fixed, n_states, prior, regularization, max_iter, tol, uniform_start=False, tied=tied)
    n_open = n_states - len(np.unique(fixed[~free]))
    deterministic_start = (not free.any()) or n_open <= 1
    best = None
    for _ in range(1 if deterministic_start else int(n_init)):
        R = _initial_responsibilities(X, fixed, n_states, rng)
        result = _run_em(X, R, fixed, n_states, prior, regularization, max_iter, tol, uniform_start=True, tied=tied)
        if best is None or result.logp > best.logp:
            best = result
    return best


def _run_em(X, R, fixed, n_states, prior, regularization, max_iter, tol, *, uniform_start, tied=False) -> EMResult:
    free = fixed < 0
    wishart_const = _wishart_normalizer(prior)
    trace = []
    converged = False
    it = 0
    for it in range(1, max_iter + 1):
        weights, means, covs = _m_step(X, R, free, prior, regularization, tied)
        if it == 1 and uniform_start:
            # The starting point: states from the initial partition, uniform weights, so
            # that no state starts with zero weight for the free cells.
            weights = np.full(n_states, 1.0 / n_states)
        # One Cholesky per state serves the log density of this iterate and the next E-step.
        Linv, half_logdet = _inverse_cholesky(covs)
        logN = _log_gaussians_from(X, means, Linv, half_logdet)
        loglik, R = _mixture_terms(logN, weights, free, fixed)
        trace.append(loglik + _prior_log_density(weights, means, Linv, half_logdet, prior, wishart_const, tied))
        if len(trace) > 1 and abs(trace[-1] - trace[-2]) <= tol * max(1.0, abs(trace[-2])):
            converged = True
            break
    return EMResult(
        weights=weights,
        means=means,
        covariances=covs,
        responsibilities=R,
        n_iter=it,
        converged=converged,
        logp_trace=np.asarray(trace),
        prior=prior,
        regularization=regularization,
        fixed_state=fixed,
        covariance="tied" if tied else "full",
    )

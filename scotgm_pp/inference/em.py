"""EM backend: the MAP of the sc-OTGM mixture under a conjugate Normal-Wishart prior.

The density maximised here is the one declared by :func:`scotgm_pp.models.build_model`
(in the untransformed parameter space, i.e. PyMC's ``jacobian=False``):

* ``pi ~ Dirichlet(alpha)`` over the states of the *free* cells,
* ``Lambda_k ~ Wishart(nu0, Psi0^{-1})`` (precision of state ``k``),
* ``mu_k | Lambda_k ~ N(m0, (kappa0 Lambda_k)^{-1})``,
* free cells ``x_i ~ sum_k pi_k N(mu_k, Lambda_k^{-1})``,
* pinned cells (``fixed_state[i] = k >= 0``, e.g. non-targeting controls in state 0)
  ``x_i ~ N(mu_k, Lambda_k^{-1})``: their state is known, so they carry no ``pi`` term;
* in general, a per-cell allowed-state mask ``A_i`` (``allowed_states``): the cell's state is
  drawn from the weights renormalised over ``A_i``,
  ``x_i ~ sum_{k in A_i} pi_k / (sum_{j in A_i} pi_j) N(mu_k, Lambda_k^{-1})``. Free cells
  (every state allowed) and pinned cells (one state allowed) are its two extremes; partly
  restricted cells (e.g. guide cells allowed {basal, their own perturbed state} in a
  multi-perturbation model) lie between.

Given responsibilities ``r_ik`` the M-step is the exact joint maximiser over
``(pi, mu, Lambda)``::

    pi_k     = (N_k^free + alpha_k - 1) / (N^free + sum(alpha) - K)
    mu_k     = (sum_i r_ik x_i + kappa0 m0) / (N_k + kappa0)
    Sigma_k  = (Psi0 + S_k + kappa0 (mu_k - m0)(mu_k - m0)^T) / (N_k + nu0 - d)

with ``S_k = sum_i r_ik (x_i - mu_k)(x_i - mu_k)^T``, so the log density never decreases.
With partly restricted cells the weights have no closed form; the M-step then raises the
weights' objective by minorise-maximise steps (each one increases it), a generalised EM that
still never decreases the log density.
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
    "validate_allowed_states",
    "scaled_prior",
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



def scaled_prior(
    X: np.ndarray,
    n_states: int = 2,
    *,
    kappa: float = 0.1,
    extra_dof: int = 2,
    dirichlet: float = 1.0,
) -> NormalWishartPrior:
    """Weakly informative prior on the data's scale: a priori every state looks like the data.

    ``Psi0 = (nu0 - d - 1) diag(Var X)`` so that the prior mean of every state covariance
    ``E[Sigma_k] = Psi0 / (nu0 - d - 1)`` is the data's per-feature variance, and
    ``mu_k | Sigma_k ~ N(mean X, Sigma_k / kappa)`` puts state means within a few standard
    deviations of the data (``kappa = 0.1``: about 3.2). Unlike :func:`default_prior`, whose
    scale grows with the number of cells (it is built to act as the paper's ridge on the MAP
    covariance), its prior predictive stays within the data's range.

    Parameters
    ----------
    X
        Cells x features ``(n, d)``.
    n_states
        Number of states ``K``.
    kappa
        Prior pseudo-count of the means.
    extra_dof
        ``nu0 - d``, an integer ``>= 2`` (the prior mean of the covariance needs ``nu0 > d + 1``).
    dirichlet
        Concentration of the state weights (``>= 1``).

    Returns
    -------
    NormalWishartPrior
    """
    X = np.asarray(X, float)
    n, d = X.shape
    if int(extra_dof) != extra_dof or extra_dof < 2:
        raise ValueError(f"extra_dof must be an integer >= 2 (E[Sigma] exists only for nu0 > d + 1), got {extra_dof!r}.")
    var = np.var(X, axis=0) if n > 1 else np.ones(d)
    var = np.where(var > 0, var, max(float(np.mean(var)), 1.0))
    return NormalWishartPrior(
        mean=X.mean(axis=0),
        kappa=float(kappa),
        dof=float(d + int(extra_dof)),
        scale_inv=(int(extra_dof) - 1) * np.diag(var),
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
    allowed_states: np.ndarray | None = field(default=None, repr=False)

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


def _mixture_terms(logN, weights, free, fixed, mask=None):
    """Likelihood and responsibilities from the ``(n, K)`` component log densities.

    ``free`` marks cells with every state allowed, ``fixed >= 0`` pinned cells and, with
    ``mask``, ``fixed == -2`` cells restricted to the states ``mask[i]`` allows.
    """
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
    pinned = fixed >= 0
    if pinned.any():
        rows = np.flatnonzero(pinned)
        loglik += float(logN[rows, fixed[pinned]].sum())
        R[rows, fixed[pinned]] = 1.0
    if mask is not None and np.any(fixed == -2):
        rows = np.flatnonzero(fixed == -2)
        allowed = mask[rows]
        with np.errstate(divide="ignore"):
            a = np.where(allowed, logN[rows] + np.log(weights)[None, :], -np.inf)
            log_norm = np.log((weights[None, :] * allowed).sum(axis=1))
        amax = a.max(axis=1, keepdims=True)
        e = np.exp(a - amax)
        total = e.sum(axis=1, keepdims=True)
        loglik += float(np.sum(np.log(total[:, 0]) + amax[:, 0] - log_norm))
        R[rows] = e / total
    return loglik, R


def _restricted_weights(a: np.ndarray, allowed: np.ndarray, w0: np.ndarray | None, n_steps: int = 25) -> np.ndarray:
    """Raise ``sum_k a_k log w_k - sum_i log(sum_{k in A_i} w_k)`` over the simplex.

    Minorise-maximise: ``-log s >= -log s0 - (s - s0) / s0`` turns each step into
    ``max sum_k a_k log w_k - sum_k c_k w_k`` s.t. ``sum w = 1``, solved by
    ``w_k = a_k / (c_k + lambda)`` with the scalar ``lambda`` found by bracketing. Every step
    increases the objective, so EM stays monotone.
    """
    from scipy.optimize import brentq

    K = a.size
    M = allowed.astype(float)
    w = np.full(K, 1.0 / K) if w0 is None else np.asarray(w0, float).copy()
    w = np.where(a > 0, np.maximum(w, 1e-300), 0.0)
    w /= w.sum()
    pos = a > 0
    for _ in range(n_steps):
        c = M.T @ (1.0 / (M @ w))
        lo = -float(c[pos].min())
        hi = float(a.sum())

        def excess(lam, c=c):
            return float(np.sum(a[pos] / (c[pos] + lam))) - 1.0

        step = 1e-12 * max(1.0, abs(lo))
        while excess(lo + step) <= 0:  # pragma: no cover - needs a_k ~ 0 at the minimum c_k
            step /= 10.0
            if step < 1e-300:
                break
        lam = brentq(excess, lo + step, max(hi, lo + 2 * step), xtol=1e-14, rtol=1e-14)
        new = np.where(pos, a / (c + lam), 0.0)
        new /= new.sum()
        if np.max(np.abs(new - w)) < 1e-13:
            w = new
            break
        w = new
    return w


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
    allowed_states: np.ndarray | None = None,
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
    allowed_states
        Instead of ``fixed_state``: a ``(n, K)`` boolean mask of the states each cell may take.

    Returns
    -------
    float
    """
    X = np.asarray(X, float)
    means = np.asarray(means, float)
    fixed, mask = validate_allowed_states(allowed_states, fixed_state, X.shape[0], means.shape[0])
    Linv, half_logdet = _inverse_cholesky(np.asarray(covariances, float))
    logN = _log_gaussians_from(X, means, Linv, half_logdet)
    loglik, _ = _mixture_terms(logN, np.asarray(weights, float), fixed == -1, fixed, mask)
    tied = _check_covariance(covariance)
    return loglik + _prior_log_density(np.asarray(weights, float), means, Linv, half_logdet, prior, tied=tied)


def _check_covariance(covariance: str) -> bool:
    if covariance not in ("full", "tied"):
        raise ValueError(f"covariance must be 'full' or 'tied', got {covariance!r}.")
    return covariance == "tied"


def _m_step(X, R, free, prior, regularization, tied=False, partial=None, weights_old=None):
    n, d = X.shape
    K = R.shape[1]
    Nk = R.sum(axis=0)
    alpha = np.asarray(prior.dirichlet, float)
    Nfree = Nk if free.all() else R[free].sum(axis=0)
    if partial is not None:
        rows, allowed = partial
        weights = _restricted_weights(Nfree + R[rows].sum(axis=0) + alpha - 1, allowed, weights_old)
    else:
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



def _restricted_start(fixed, mask):
    """Deterministic start with partly restricted cells: every unpinned cell in its one allowed
    state that no cell is pinned to (its "open" state), or ``None`` when some cell has several."""
    K = mask.shape[1]
    pinned_states = np.zeros(K, bool)
    pinned_states[np.unique(fixed[fixed >= 0])] = True
    open_allowed = mask & ~pinned_states[None, :]
    rows = np.flatnonzero(fixed < 0)
    if np.any(open_allowed[rows].sum(axis=1) > 1):
        return None
    R = np.zeros(mask.shape)
    R[np.flatnonzero(fixed >= 0), fixed[fixed >= 0]] = 1.0
    for i in rows:
        choice = open_allowed[i] if open_allowed[i].any() else mask[i]
        R[i] = choice / choice.sum()
    return R


def _restricted_kmeans_start(X, fixed, mask, rng):
    """Random start with partly restricted cells: k-means with each cell assigned to the nearest
    centre among its allowed states; pinned states' centres start at their pinned cells' mean,
    the others at a cell allowed in them, drawn k-means++ style away from the centres so far."""
    n, K = mask.shape
    centers = np.zeros((K, X.shape[1]))
    seeded = []
    pinned_states = set(np.unique(fixed[fixed >= 0]).tolist())
    for k in pinned_states:
        centers[k] = X[fixed == k].mean(axis=0)
        seeded.append(centers[k])
    for k in range(K):
        if k in pinned_states:
            continue
        rows = np.flatnonzero(mask[:, k])
        if seeded:
            d2 = np.min([np.sum((X[rows] - c) ** 2, axis=1) for c in seeded], axis=0)
            p = d2 / d2.sum() if d2.sum() > 0 else None
        else:
            p = None
        centers[k] = X[rows[rng.choice(rows.size, p=p)]]
        seeded.append(centers[k])
    pinned = np.flatnonzero(fixed >= 0)
    for _ in range(20):
        d2 = ((X[:, None, :] - centers[None, :, :]) ** 2).sum(-1)
        labels = np.argmin(np.where(mask, d2, np.inf), axis=1)
        labels[pinned] = fixed[pinned]
        for k in range(K):
            if np.any(labels == k):
                centers[k] = X[labels == k].mean(axis=0)
    return np.eye(K)[labels]

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



def validate_allowed_states(allowed_states, fixed_state, n_cells: int, n_states: int) -> tuple[np.ndarray, np.ndarray]:
    """One per-cell description of which states each cell may take.

    Parameters
    ----------
    allowed_states
        ``None`` or a boolean ``(n_cells, n_states)`` mask (0/1 integers accepted): ``True``
        where the cell may be in the state. Every row needs at least one allowed state.
    fixed_state
        ``None`` or the ``-1`` / ``k`` vector of :func:`validate_fixed_state`; give at most one
        of the two.
    n_cells, n_states
        Expected shape.

    Returns
    -------
    fixed, mask
        ``fixed``: ``-1`` every state allowed, ``k`` only state ``k``, ``-2`` a proper subset of
        two or more states; ``mask``: the ``(n_cells, n_states)`` boolean mask.
    """
    if allowed_states is None:
        fixed = validate_fixed_state(fixed_state, n_cells, n_states)
        mask = np.ones((n_cells, n_states), bool)
        pinned = np.flatnonzero(fixed >= 0)
        mask[pinned] = False
        mask[pinned, fixed[pinned]] = True
        return fixed, mask
    if fixed_state is not None:
        raise ValueError("pass fixed_state or allowed_states, not both (a pinned cell is a row of allowed_states "
                         "with one True entry).")
    raw = np.asarray(allowed_states)
    if raw.shape != (n_cells, n_states):
        raise ValueError(f"allowed_states must have shape ({n_cells}, {n_states}) (cells x states), got {raw.shape}.")
    if raw.dtype.kind == "b":
        mask = raw.copy()
    elif raw.dtype.kind in "iuf" and np.all(np.isin(raw, (0, 1))):
        mask = raw.astype(bool)
    else:
        raise ValueError("allowed_states must be booleans (or 0/1): True where the cell may be in the state.")
    empty = np.flatnonzero(~mask.any(axis=1))
    if empty.size:
        raise ValueError(f"allowed_states allows no state for {empty.size} cell(s) (first: row {empty[0]}); "
                         "every cell needs at least one allowed state.")
    count = mask.sum(axis=1)
    fixed = np.where(count == n_states, -1, np.where(count == 1, mask.argmax(axis=1), -2)).astype(int)
    return fixed, mask


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
    allowed_states: np.ndarray | None = None,
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
    allowed_states
        Instead of ``fixed_state``: a ``(n, n_states)`` boolean mask of the states each cell may
        take (e.g. in a screen model, guide cells of perturbation ``g`` allowed ``{basal, g}``).
        A cell allowed a subset of states draws its state from the weights renormalised over it.

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
    fixed, mask = validate_allowed_states(allowed_states, fixed_state, n, int(n_states))
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
    partial = bool(np.any(fixed == -2))

    if init_responsibilities is not None:
        R = np.array(init_responsibilities, dtype=float)
        pinned = np.flatnonzero(fixed >= 0)
        R[pinned] = 0.0
        R[pinned, fixed[pinned]] = 1.0
        if partial:  # restricted rows: keep their allowed states only
            rows = np.flatnonzero(fixed == -2)
            Rp = R[rows] * mask[rows]
            total = Rp.sum(axis=1, keepdims=True)
            R[rows] = np.where(total > 0, Rp / np.where(total > 0, total, 1.0), mask[rows] / mask[rows].sum(1, keepdims=True))
        return _run_em(X, R, fixed, n_states, prior, regularization, max_iter, tol, uniform_start=False, tied=tied,
                       mask=mask if partial else None)
    if partial:
        # Restricted cells: the deterministic start (every unpinned cell in its open state) and
        # n_init nearest-allowed-centre starts; a state allowed to a group with many escaped
        # cells can otherwise settle between the group's two modes. The best log density wins.
        candidates = [_restricted_start(fixed, mask)]
        candidates += [_restricted_kmeans_start(X, fixed, mask, rng) for _ in range(int(n_init))]
        best = None
        for R in (c for c in candidates if c is not None):
            result = _run_em(X, R, fixed, n_states, prior, regularization, max_iter, tol, uniform_start=True,
                             tied=tied, mask=mask)
            if best is None or result.logp > best.logp:
                best = result
        return best
    free = fixed < 0
    n_open = n_states - len(np.unique(fixed[~free]))
    deterministic_start = (not free.any()) or n_open <= 1
    best = None
    for _ in range(1 if deterministic_start else int(n_init)):
        R = _initial_responsibilities(X, fixed, n_states, rng)
        result = _run_em(X, R, fixed, n_states, prior, regularization, max_iter, tol, uniform_start=True, tied=tied)
        if best is None or result.logp > best.logp:
            best = result
    return best


def _run_em(X, R, fixed, n_states, prior, regularization, max_iter, tol, *, uniform_start, tied=False,
            mask=None) -> EMResult:
    free = fixed == -1
    partial = None if mask is None else (np.flatnonzero(fixed == -2), mask[fixed == -2])
    wishart_const = _wishart_normalizer(prior)
    trace = []
    converged = False
    it = 0
    weights = None
    for it in range(1, max_iter + 1):
        weights, means, covs = _m_step(X, R, free, prior, regularization, tied, partial, weights)
        if it == 1 and uniform_start:
            # The starting point: states from the initial partition, uniform weights, so
            # that no state starts with zero weight for the free cells.
            weights = np.full(n_states, 1.0 / n_states)
        # One Cholesky per state serves the log density of this iterate and the next E-step.
        Linv, half_logdet = _inverse_cholesky(covs)
        logN = _log_gaussians_from(X, means, Linv, half_logdet)
        loglik, R = _mixture_terms(logN, weights, free, fixed, mask)
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
        allowed_states=mask,
    )

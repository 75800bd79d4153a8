"""Forward draws of the declared graph in NumPy: the posterior predictive of one cell at a time.

:func:`scotgm_pp.models.build_model` with counts declares, for a cell in state ``z`` with library
size ``s`` (and batch offset ``gamma``)::

    x ~ N(mu_z, Sigma_z)                                  (PCA scores)
    y_g ~ NB(mean = s exp(beta_g + delta_zg + gamma_g), var = mean + phi_g mean^2)   (counts)

with ``x`` and the ``y_g`` independent given ``z``. ``pm.sample_posterior_predictive`` draws
exactly this (``tests/test_predictive.py`` holds :func:`draw_cells` with
``dependence="independent"`` to it, moment by moment and by KS tests). The graph leaves the genes
independent given the state; real cells are not (they share expression programs), so
:func:`draw_cells` also offers ``dependence="state"``:

``dependence="state"`` (Gaussian copula driven by the cell's PCA draw)
    Every gene keeps the graph's negative-binomial marginal exactly; only the dependence between
    genes changes. The cell's within-state deviation ``x - mu_z`` is mapped to genes with the
    loadings, ``w = V (x - mu_z) + sqrt(r) e`` (``r`` the scaled variance the kept PCs do not
    explain, ``e ~ N(0, I)``), standardised per gene (``sd_g^2 = (V Sigma_z V^T)_gg + r_g``), and
    ``y_g = F_NB^-1(Phi(w_g / sd_g))``. Genes then co-vary as the PCA state says they do, and the
    cell's counts project back near its PCA draw.

:func:`counterfactual_counts` moves a real cell's counts from one state to another through the
same latent scale (randomised probability integral transform, then the coupling in PCA space).
Pure functions over arrays; randomness only from the ``Generator`` passed in.
"""

from __future__ import annotations

import numpy as np
from scipy import special, stats

__all__ = ["DEPENDENCE", "draw_states", "draw_scores", "draw_counts", "draw_cells", "counterfactual_counts",
           "nb_quantile", "latent_scale"]

DEPENDENCE = ("state", "independent")

_POISSON_ALPHA = 1e6
"""Above this NB shape ``alpha = 1 / phi`` a gene's counts are drawn as Poisson (the NB limit)."""

_U_CLIP = 1e-12


def _nb_p(mu: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    return alpha / (alpha + mu)


def draw_states(rng: np.random.Generator, weights: np.ndarray) -> np.ndarray:
    """One state per row of ``weights`` ``(n, K)`` (each row a probability vector)."""
    w = np.asarray(weights, float)
    u = rng.random(w.shape[0])[:, None]
    return np.minimum((np.cumsum(w, axis=1) < u * w.sum(axis=1, keepdims=True)).sum(axis=1), w.shape[1] - 1)


def draw_scores(rng: np.random.Generator, means: np.ndarray, chols: np.ndarray) -> np.ndarray:
    """``x_i ~ N(means_i, L_i L_i^T)`` for per-cell means ``(n, d)`` and Cholesky factors ``(n, d, d)``."""
    eps = rng.standard_normal(means.shape)
    return means + np.einsum("nij,nj->ni", chols, eps)


def nb_quantile(u: np.ndarray, mu: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Quantile function of ``NB(mean mu, shape alpha)`` (Poisson where ``alpha`` is huge), as integers."""
    u = np.clip(u, _U_CLIP, 1.0 - _U_CLIP)
    alpha = np.broadcast_to(np.asarray(alpha, float), np.shape(mu))
    poisson = alpha > _POISSON_ALPHA
    out = np.empty(np.shape(mu))
    nb = ~poisson
    if nb.any():
        out[nb] = stats.nbinom.ppf(u[nb], alpha[nb], _nb_p(mu[nb], alpha[nb]))
    if poisson.any():
        out[poisson] = stats.poisson.ppf(u[poisson], mu[poisson])
    return out.astype(np.int64)


def nb_cdf(y: np.ndarray, mu: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``P(Y <= y)`` under ``NB(mean mu, shape alpha)``; 0 for ``y < 0``."""
    alpha = np.broadcast_to(np.asarray(alpha, float), np.shape(mu))
    y = np.asarray(y, float)
    out = np.zeros(np.shape(mu))
    ok = y >= 0
    poisson = alpha > _POISSON_ALPHA
    a = ok & ~poisson
    out[a] = special.betainc(alpha[a], np.floor(y[a]) + 1.0, _nb_p(mu[a], alpha[a]))  # I_p(alpha, y + 1)
    b = ok & poisson
    out[b] = special.pdtr(y[b], mu[b])
    return out


def draw_counts(rng: np.random.Generator, mu: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Independent ``NB(mean mu, shape alpha)`` draws (the graph's count layer given the state)."""
    alpha = np.broadcast_to(np.asarray(alpha, float), np.shape(mu))
    lam = rng.gamma(alpha, np.asarray(mu, float) / alpha)
    lam = np.where(alpha > _POISSON_ALPHA, mu, lam)
    return rng.poisson(lam).astype(np.int64)


def latent_scale(loadings: np.ndarray, covariances: np.ndarray, residual_variance: np.ndarray) -> np.ndarray:
    """``sd_g = sqrt((V Sigma V^T)_gg + r_g)`` for each covariance in ``(..., d, d)``: ``(..., G)``."""
    V = np.asarray(loadings, float)
    var = np.einsum("gi,...ij,gj->...g", V, covariances, V)
    return np.sqrt(np.clip(var, 0.0, None) + np.asarray(residual_variance, float))


def draw_cells(
    rng: np.random.Generator,
    *,
    means: np.ndarray,
    chols: np.ndarray,
    log_mu: np.ndarray,
    alpha: np.ndarray,
    dependence: str = "state",
    loadings: np.ndarray | None = None,
    residual_variance: np.ndarray | None = None,
    scale: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """PCA scores and counts of ``n`` cells, each with its own state parameters.

    Parameters
    ----------
    rng
        The only source of randomness.
    means, chols
        Per cell: the mean ``(n, d)`` and Cholesky factor ``(n, d, d)`` of its state's Gaussian.
    log_mu
        Per cell and gene: ``log s_i + beta_g + delta_zg + gamma_g`` ``(n, G)``.
    alpha
        NB shape per gene, ``1 / phi_g`` ``(G,)``.
    dependence
        ``"independent"`` (the declared graph: genes independent given the state, scores
        independent of counts) or ``"state"`` (Gaussian copula driven by the scores; see the
        module docstring). Every gene's marginal is the same under both.
    loadings, residual_variance
        ``V`` (genes x PCs) and ``r`` (per gene); needed for ``"state"``.
    scale
        Per cell and gene ``sd_g`` of the latent (:func:`latent_scale` of the cell's covariance);
        computed from ``chols`` when ``None``.

    Returns
    -------
    x : numpy.ndarray
        ``(n, d)`` PCA scores.
    y : numpy.ndarray
        ``(n, G)`` integer counts.
    """
    if dependence not in DEPENDENCE:
        raise ValueError(f"dependence must be one of {DEPENDENCE}, got {dependence!r}.")
    x = draw_scores(rng, means, chols)
    mu = np.exp(log_mu)
    if dependence == "independent":
        return x, draw_counts(rng, mu, alpha)
    if loadings is None or residual_variance is None:
        raise ValueError("dependence='state' needs the loadings and the residual variance of the genes.")
    V = np.asarray(loadings, float)
    r = np.asarray(residual_variance, float)
    if scale is None:
        scale = latent_scale(V, chols @ np.swapaxes(chols, -1, -2), r)
    w = (x - means) @ V.T + rng.standard_normal(mu.shape) * np.sqrt(r)
    u = special.ndtr(w / scale)
    return x, nb_quantile(u, mu, alpha)


def counterfactual_counts(
    rng: np.random.Generator,
    counts: np.ndarray,
    *,
    log_mu_from: np.ndarray,
    log_mu_to: np.ndarray,
    alpha: np.ndarray,
    loadings: np.ndarray,
    scale_from: np.ndarray,
    scale_to: np.ndarray,
    transport: np.ndarray,
    noise_chol: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Move real cells' counts from one state to another, keeping what is the cell's own.

    1. Randomised probability integral transform under the source state's NB marginal:
       ``u_g ~ U(F(y_g - 1), F(y_g))``, latent ``w_g = Phi^-1(u_g) sd_from_g``.
    2. Split the latent into its PCA part ``a`` (least squares on the loadings) and the rest
       ``rho = w - V a``; move the PCA part with the coupling, ``a' = T a + L e``
       (``T = C^T Sigma_from^-1``, ``L L^T = Sigma_to - C^T Sigma_from^-1 C``).
    3. ``y'_g = F_to^-1(Phi((V a' + rho)_g / sd_to_g))``.

    Under the OT coupling with equal state covariances ``T = I`` and ``L = 0``, so every gene's
    count moves by its monotone (one-dimensional optimal transport) map between the two
    marginals. With ``n`` cells, ``G`` genes, ``d`` PCs: ``counts``, ``log_mu_*``,
    ``scale_*`` are ``(n, G)``; ``transport`` and ``noise_chol`` ``(n, d, d)``.

    Returns
    -------
    y_new : numpy.ndarray
        ``(n, G)`` integer counts in the target state.
    a, a_new : numpy.ndarray
        ``(n, d)`` the cells' latent PCA parts before and after the move.
    """
    y = np.asarray(counts, float)
    mu0 = np.exp(log_mu_from)
    lo = nb_cdf(y - 1.0, mu0, alpha)
    hi = nb_cdf(y, mu0, alpha)
    u = lo + rng.random(y.shape) * (hi - lo)
    w = special.ndtri(np.clip(u, _U_CLIP, 1.0 - _U_CLIP)) * scale_from
    V = np.asarray(loadings, float)
    a = np.linalg.solve(V.T @ V, V.T @ w.T).T
    rho = w - a @ V.T
    eps = rng.standard_normal(a.shape)
    a_new = np.einsum("nij,nj->ni", transport, a) + np.einsum("nij,nj->ni", noise_chol, eps)
    u_new = special.ndtr((a_new @ V.T + rho) / scale_to)
    return nb_quantile(u_new, np.exp(log_mu_to), alpha), a, a_new

"""Prototype: per-gene mixture (marginal) likelihood for the perturbed effect, given the state probabilities."""
import numpy as np
import scipy.sparse as sp
from scipy.special import expit, gammaln

def _ll(y, mu, a):
    # NB log-lik up to terms without mu
    return y * np.log(mu) - (y + a) * np.log(mu + a)

def mixture_effects(y, s, w, beta, alpha, delta0, delta_sd=0.5, n_iter=200, tol=1e-7):
    """y (n, G) guide cells' counts, s (n,), w (n,) P(perturbed), beta (G,) basal log rate, alpha (G,).
    Returns delta (G,), se (G,) maximising sum_i log(w NB(y|beta+delta) + (1-w) NB(y|beta)) - delta^2 / (2 sd^2)."""
    y = np.asarray(y.toarray() if sp.issparse(y) else y, float)
    mu0 = s[:, None] * np.exp(beta)[None, :]
    l0 = _ll(y, mu0, alpha)
    lw = np.log(np.clip(w, 1e-12, 1)) - np.log(np.clip(1 - w, 1e-12, 1))
    d = np.asarray(delta0, float).copy()
    prec = 1.0 / delta_sd**2
    for _ in range(n_iter):
        mu1 = mu0 * np.exp(d)[None, :]
        q = expit(lw[:, None] + _ll(y, mu1, alpha) - l0)
        t = mu1 + alpha
        g1 = alpha * (y - mu1) / t             # d l1 / d delta
        h1 = alpha * mu1 * (y + alpha) / t**2  # -d2 l1 / d delta2
        grad = (q * g1).sum(0) - prec * d
        info = (q * h1).sum(0) + prec
        step = np.clip(grad / info, -1.0, 1.0)
        d = d + step
        if np.max(np.abs(step)) < tol:
            break
    mu1 = mu0 * np.exp(d)[None, :]
    q = expit(lw[:, None] + _ll(y, mu1, alpha) - l0)
    t = mu1 + alpha
    g1 = alpha * (y - mu1) / t
    h1 = alpha * mu1 * (y + alpha) / t**2
    obs = (q * h1).sum(0) - (q * (1 - q) * g1**2).sum(0) + prec  # Louis
    comp = (q * h1).sum(0) + prec
    obs = np.where(obs > 1e-12, obs, comp)
    return d, 1.0 / np.sqrt(obs)

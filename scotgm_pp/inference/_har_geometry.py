"""Geometry of Gaussian couplings, the exact chord of the plan ball and the truncated-exponential draw.

The pieces of :mod:`scotgm_pp.inference.hit_and_run` that need no chain: input checks, the
square roots and SVD frame of ``G = Sx^{1/2} Sy^{1/2}``, the exact chord
``{t : ||K + t D||_2 <= 1}`` and the exact draw ``t ~ exp(rate t)`` on an interval.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg

from ._har_cache import enable_kernel_cache
from ._har_kernel import truncated_exponential_inv as _truncated_exponential
from .ot import psd_sqrt

__all__ = ["CouplingGeometry", "chord", "coupling_geometry", "truncated_exponential"]


# --------------------------------------------------------------------------------------------
# Input checks and geometry
# --------------------------------------------------------------------------------------------
def _as_covariance(S, name: str) -> np.ndarray:
    S = np.asarray(S, dtype=float)
    if S.ndim != 2 or S.shape[0] != S.shape[1]:
        raise ValueError(f"{name} must be a square (m, m) covariance matrix, got shape {S.shape}.")
    if S.shape[0] == 0:
        raise ValueError(f"{name} is empty; it needs at least one dimension.")
    if not np.all(np.isfinite(S)):
        raise ValueError(f"{name} has non-finite entries; check the fitted covariances.")
    scale = max(1.0, float(np.max(np.abs(S))))
    if not np.allclose(S, S.T, rtol=1e-8, atol=1e-10 * scale):
        raise ValueError(f"{name} is not symmetric; pass a covariance matrix (e.g. 0.5 * (S + S.T)).")
    S = 0.5 * (S + S.T)
    w_min = float(np.linalg.eigvalsh(S)[0])
    if w_min < -1e-8 * scale:
        raise ValueError(
            f"{name} is not positive semi-definite (smallest eigenvalue {w_min:.3g}); "
            "regularise it, e.g. add alpha * I."
        )
    return S


def _as_mean(mu, m: int, name: str) -> np.ndarray:
    if mu is None:
        return np.zeros(m)
    mu = np.asarray(mu, dtype=float)
    if mu.shape != (m,):
        raise ValueError(f"{name} must have shape ({m},) to match the covariances, got {mu.shape}.")
    if not np.all(np.isfinite(mu)):
        raise ValueError(f"{name} has non-finite entries.")
    return mu


@dataclass(frozen=True)
class CouplingGeometry:
    """Everything the sampler needs about a pair of Gaussians.

    Attributes
    ----------
    Lx, Ly
        Symmetric square roots of ``Sx`` and ``Sy``.
    G
        ``Lx Ly``: the cost is ``const - 2 <K, G>``.
    K_star
        The optimal plan ``Q P^T`` (SVD ``G = Q diag(s) P^T``); ``Lx K_star Ly`` is the OT
        cross-covariance.
    singular_values
        ``s``; ``sum(s)`` is the Bures fidelity term, ``2 sum(s)`` the cost gap between the
        independent and the optimal coupling.
    const
        ``|mu_y - mu_x|^2 + tr Sx + tr Sy``.
    Q, Pt
        The SVD frame ``G = Q diag(s) Pt``; the sampler works with ``J = Q^T K Pt^T``.
    """

    Lx: np.ndarray
    Ly: np.ndarray
    G: np.ndarray
    K_star: np.ndarray
    singular_values: np.ndarray
    const: float
    Q: np.ndarray | None = None
    Pt: np.ndarray | None = None

    @property
    def m(self) -> int:
        """Dimension of each Gaussian."""
        return self.G.shape[0]

    @property
    def w2_squared(self) -> float:
        """Squared 2-Wasserstein distance, the minimum expected cost."""
        return self.const - 2.0 * float(self.singular_values.sum())

    def cost(self, inner: np.ndarray | float) -> np.ndarray | float:
        """Expected transport cost from ``<K, G>``."""
        return self.const - 2.0 * np.asarray(inner)

    def cross_covariance(self, K: np.ndarray) -> np.ndarray:
        """``C = Lx K Ly``."""
        return self.Lx @ K @ self.Ly


def coupling_geometry(Sx, Sy, mu_x=None, mu_y=None) -> CouplingGeometry:
    """Validate the two Gaussians and precompute the square roots, ``G`` and the optimal plan.

    Parameters
    ----------
    Sx, Sy
        Source and target covariances, shape ``(m, m)``, symmetric positive semi-definite.
    mu_x, mu_y
        Means, shape ``(m,)``; zero if omitted (they only shift the cost by a constant).

    Returns
    -------
    CouplingGeometry
    """
    Sx = _as_covariance(Sx, "Sx")
    Sy = _as_covariance(Sy, "Sy")
    if Sx.shape != Sy.shape:
        raise ValueError(f"Sx and Sy must have the same shape, got {Sx.shape} and {Sy.shape}.")
    m = Sx.shape[0]
    dmu = _as_mean(mu_y, m, "mu_y") - _as_mean(mu_x, m, "mu_x")
    Lx, Ly = psd_sqrt(Sx), psd_sqrt(Sy)
    G = Lx @ Ly
    Q, s, Pt = np.linalg.svd(G)
    const = float(dmu @ dmu + np.trace(Sx) + np.trace(Sy))
    return CouplingGeometry(Lx=Lx, Ly=Ly, G=G, K_star=Q @ Pt, singular_values=s, const=const, Q=Q, Pt=Pt)


# --------------------------------------------------------------------------------------------
# The two exact one-dimensional pieces: chord and truncated exponential
# --------------------------------------------------------------------------------------------
def _rank_one_chord(alpha: float, beta: float, gamma: float) -> tuple[float, float]:
    r = np.sqrt(alpha * beta)
    return -1.0 / (r + gamma), 1.0 / (r - gamma)


def chord(K: np.ndarray, D: np.ndarray) -> tuple[float, float]:
    """Exact chord ``{t : ||K + t D||_2 <= 1}`` of the spectral-norm unit ball.

    Parameters
    ----------
    K
        Point strictly inside the ball (``||K||_2 < 1``), shape ``(m, n)``.
    D
        Direction, same shape, not zero.  A rank-one ``D`` uses the closed form of the module
        docstring; any other ``D`` solves the generalised symmetric eigenproblem
        ``[[0, D], [D^T, 0]] x = lambda [[I, K], [K^T, I]] x`` (``t_hi = -1/lambda_min``,
        ``t_lo = -1/lambda_max``).

    Returns
    -------
    (t_lo, t_hi)
        ``t_lo < 0 < t_hi``; ``||K + t D||_2 = 1`` at both ends.
    """
    K = np.asarray(K, dtype=float)
    D = np.asarray(D, dtype=float)
    if K.ndim != 2 or D.shape != K.shape:
        raise ValueError(f"K and D must be matrices of the same shape, got {K.shape} and {D.shape}.")
    if not (np.all(np.isfinite(K)) and np.all(np.isfinite(D))):
        raise ValueError("K and D must be finite.")
    U, sig, Vt = np.linalg.svd(K, full_matrices=True)
    if sig.size and sig[0] >= 1.0:
        raise ValueError(f"K must lie strictly inside the unit spectral-norm ball; ||K||_2 = {sig[0]:.17g}.")
    Ud, sd, Vdt = np.linalg.svd(D)
    if sd[0] == 0.0:
        raise ValueError("D is the zero matrix; a direction must be non-zero.")
    if sd.size == 1 or sd[1] <= 1e-14 * sd[0]:
        return _chord_rank_one_svd(U, sig, Vt, sd[0] * Ud[:, 0], Vdt[0])
    m, n = K.shape
    M = np.block([[np.eye(m), K], [K.T, np.eye(n)]])
    N = np.block([[np.zeros((m, m)), D], [D.T, np.zeros((n, n))]])
    lam = scipy.linalg.eigh(N, M, eigvals_only=True)
    return -1.0 / lam[-1], -1.0 / lam[0]


def _chord_rank_one_svd(U, sig, Vt, u, v) -> tuple[float, float]:
    """Chord along ``u v^T`` from the full SVD of ``K`` (``1 - sigma^2`` formed as a product)."""
    m, n = U.shape[0], Vt.shape[0]
    one_minus = np.ones(max(m, n))
    one_minus[: sig.size] = (1.0 - sig) * (1.0 + sig)
    uu, vv = U.T @ u, Vt @ v
    alpha = float(np.sum(uu**2 / one_minus[:m]))
    beta = float(np.sum(vv**2 / one_minus[:n]))
    k = sig.size
    gamma = -float(np.sum(uu[:k] * vv[:k] * sig / one_minus[:k]))
    return _rank_one_chord(alpha, beta, gamma)


def truncated_exponential(rate: float, lo: float, hi: float, rng: np.random.Generator) -> float:
    """Draw ``t`` with density proportional to ``exp(rate * t)`` on ``[lo, hi]``.

    Inverse CDF written from the end the mass piles up at, with ``log1p``/``expm1``: no overflow
    for ``|rate| (hi - lo)`` up to ``inf`` and no cancellation as ``rate -> 0`` (below
    ``|rate| (hi - lo) = 1e-12`` the draw is uniform, an error below 1e-12 in distribution).

    Parameters
    ----------
    rate
        Any finite real.
    lo, hi
        Finite interval ends, ``lo < hi``.
    rng
        Source of the single uniform used.

    Returns
    -------
    float
    """
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        raise ValueError(f"need finite lo < hi, got lo={lo}, hi={hi}.")
    if not np.isfinite(rate):
        raise ValueError(f"rate must be finite, got {rate}.")
    enable_kernel_cache()
    return _truncated_exponential(rate, lo, hi, 1.0 - rng.random())

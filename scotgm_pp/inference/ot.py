"""Closed-form optimal transport between Gaussians (the Bures / Wasserstein-2 geometry).

Every Gaussian coupling of ``N(mu_x, Sx)`` and ``N(mu_y, Sy)`` has a cross-covariance
``C = Lx K Ly^T`` with ``Lx Lx^T = Sx``, ``Ly Ly^T = Sy`` and ``||K||_2 <= 1``.  The optimal
(quadratic-cost) coupling maximises ``tr C``.  With symmetric square roots and the SVD
``Ly Lx = P diag(s) Q^T`` the maximiser is ``K* = Q P^T`` and

    C* = Lx Q P^T Ly = Sx^{1/2} (Sx^{1/2} Sy Sx^{1/2})^{1/2} Sx^{-1/2},

the second form being the textbook one.  The SVD form needs no inverse, so it stays a valid
coupling when ``Sx`` is singular or badly conditioned.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "psd_sqrt",
    "ot_cross_covariance",
    "gaussian_w2",
    "coupling_cost",
    "perturbation_covariance",
]


def _check_cov(S: np.ndarray, name: str) -> np.ndarray:
    S = np.asarray(S, dtype=float)
    if S.ndim != 2 or S.shape[0] != S.shape[1]:
        raise ValueError(f"{name} must be a square matrix, got shape {S.shape}.")
    if not np.all(np.isfinite(S)):
        raise ValueError(f"{name} has non-finite entries; check the fitted covariances.")
    return 0.5 * (S + S.T)


def psd_sqrt(S: np.ndarray) -> np.ndarray:
    """Symmetric square root of a positive semi-definite matrix.

    Eigenvalues below zero (round-off on near-singular input) are clipped to zero.
    """
    S = _check_cov(S, "S")
    w, V = np.linalg.eigh(S)
    w = np.clip(w, 0.0, None)
    return (V * np.sqrt(w)) @ V.T


def _bures_svd(Sx: np.ndarray, Sy: np.ndarray):
    Lx = psd_sqrt(Sx)
    Ly = psd_sqrt(Sy)
    P, s, Qt = np.linalg.svd(Ly @ Lx)
    return Lx, Ly, P, s, Qt


def ot_cross_covariance(Sx: np.ndarray, Sy: np.ndarray) -> np.ndarray:
    """Cross-covariance ``Cov(X, Y)`` of the optimal transport coupling of two Gaussians.

    Parameters
    ----------
    Sx, Sy
        Covariances of the source (basal) and target (perturbed) Gaussians, shape ``(m, m)``.

    Returns
    -------
    numpy.ndarray
        ``C* = Sx^{1/2} (Sx^{1/2} Sy Sx^{1/2})^{1/2} Sx^{-1/2}``, computed without inverting ``Sx``.
        The joint covariance ``[[Sx, C*], [C*^T, Sy]]`` is positive semi-definite and
        ``tr C*`` is maximal among all couplings.
    """
    Sx = _check_cov(Sx, "Sx")
    Sy = _check_cov(Sy, "Sy")
    if Sx.shape != Sy.shape:
        raise ValueError(f"Sx and Sy must have the same shape, got {Sx.shape} and {Sy.shape}.")
    Lx, Ly, P, _, Qt = _bures_svd(Sx, Sy)
    return Lx @ Qt.T @ P.T @ Ly


def gaussian_w2(mu_x, Sx, mu_y, Sy) -> float:
    """Squared 2-Wasserstein distance between ``N(mu_x, Sx)`` and ``N(mu_y, Sy)``."""
    Sx = _check_cov(Sx, "Sx")
    Sy = _check_cov(Sy, "Sy")
    *_, s, _ = _bures_svd(Sx, Sy)
    dmu = np.asarray(mu_y, float) - np.asarray(mu_x, float)
    return float(dmu @ dmu + np.trace(Sx) + np.trace(Sy) - 2.0 * s.sum())


def coupling_cost(mu_x, Sx, mu_y, Sy, C) -> float:
    """Expected squared transport cost ``E|Y - X|^2`` of a Gaussian coupling with cross-covariance ``C``."""
    dmu = np.asarray(mu_y, float) - np.asarray(mu_x, float)
    return float(dmu @ dmu + np.trace(Sx) + np.trace(Sy) - 2.0 * np.trace(C))


def perturbation_covariance(Sx, Sy, C) -> np.ndarray:
    """Covariance of ``Z = Y - X`` under a coupling: ``Sx + Sy - C - C^T`` (symmetrised, PSD-clipped)."""
    Sx = _check_cov(Sx, "Sx")
    Sy = _check_cov(Sy, "Sy")
    C = np.asarray(C, float)
    Sp = Sx + Sy - C - C.T
    Sp = 0.5 * (Sp + Sp.T)
    w, V = np.linalg.eigh(Sp)
    return (V * np.clip(w, 0.0, None)) @ V.T

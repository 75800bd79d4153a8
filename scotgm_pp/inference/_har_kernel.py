"""The exact Hit-and-Run line move on the spectral-norm unit ball, compiled with numba.

One move along a rank-one direction ``D = u v^T``:

* chord.  ``||A||_2 <= 1`` iff ``M(A) = [[I, A], [A^T, I]]`` is positive semi-definite, and
  ``M(K + t D) = M(K) + t W T W^T`` with ``W = [[u, 0], [0, v]]``, ``T = [[0, 1], [1, 0]]``.
  With ``H = W^T M^{-1} W = [[alpha, gamma], [gamma, beta]]``, ``M(K + t D)`` is singular
  exactly at ``t = -+1 / (sqrt(alpha beta) +- gamma)``: the two ends of the chord.
* draw.  ``t`` from ``exp(rate * t)`` truncated to the chord (inverse CDF from the heavy end).
* update.  Woodbury: ``M'^{-1} = M^{-1} - Z^T S Z`` with ``Z = W^T M^{-1}`` and a 2 x 2 ``S``,
  i.e. ``O(m^2)`` per move.  ``M^{-1}`` is ill-conditioned near the boundary; the chain
  recomputes it exactly (:func:`refresh`) before each sweep's line moves, and a running
  round-off bound (:func:`line_move`) triggers a refresh within them.

``M(K)^{-1} = [[A, -E], [-E^T, B]]`` with ``A = (I - K K^T)^{-1}``, ``E = A K``,
``B = (I - K^T K)^{-1}``.  Everything here is a pure function over arrays; the random numbers
are drawn by the caller from its ``numpy.random.Generator``, so a chain is reproducible from
its seed.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

INTERIOR = 1.0 - 1e-12  # relative shrink of the chord that keeps every state strictly inside

# slots of the accumulator array ``acc`` shared by the compiled functions
LOST, CHORD_SUM, STEP_SUM, N_EXACT, N_REPROJ, INNER, NORM = range(7)
N_ACC = 7


@njit(cache=False)
def truncated_exponential_inv(rate, lo, hi, v):
    """Inverse CDF at ``v`` in ``(0, 1]`` of ``exp(rate t)`` on ``[lo, hi]`` (``v -> 0``: heavy end)."""
    length = hi - lo
    a = abs(rate)
    if a * length < 1e-12:
        x = -v * length
    else:
        x = math.log1p(v * math.expm1(-a * length)) / a  # offset from the heavy end, in [-length, 0]
    return hi + x if rate > 0 else lo - x


@njit(cache=False)
def _spd_inverse(N, A):
    """``A = N^{-1}`` by an explicit Cholesky factorisation ``N = L L^T`` (loops: quick to compile);
    returns ``False``, leaving ``A`` undefined, when ``N`` is not numerically positive definite."""
    m = N.shape[0]
    L = np.zeros((m, m))
    for j in range(m):
        d = N[j, j]
        for k in range(j):
            d -= L[j, k] * L[j, k]
        if not d > 0.0:
            return False
        L[j, j] = math.sqrt(d)
        for i in range(j + 1, m):
            x = N[i, j]
            for k in range(j):
                x -= L[i, k] * L[j, k]
            L[i, j] = x / L[j, j]
    W = np.zeros((m, m))  # W = L^{-1} (lower triangular), by forward substitution
    for j in range(m):
        W[j, j] = 1.0 / L[j, j]
        for i in range(j + 1, m):
            x = 0.0
            for k in range(j, i):
                x -= L[i, k] * W[k, j]
            W[i, j] = x / L[i, i]
    A[:, :] = W.T @ W
    return True


@njit(cache=False)
def refresh(K, Minv, acc):
    """Recompute ``M(K)^{-1}`` exactly: ``A = (I - K K^T)^{-1}`` by Cholesky inversion,
    ``E = A K``, ``B = I + K^T A K`` (relative error ~``1e-16 / (1 - sigma_max^2)``, like an SVD).
    If round-off has put ``K`` on or outside the unit sphere (``I - K K^T`` not numerically positive
    definite), ``K`` is first pulled inside by scaling it by ``1 - 2^k 1e-12`` (smallest ``k``
    that works), counted in ``acc[N_REPROJ]``.

    (No flag arguments here or in the other kernels: a constant flag passed from compiled code
    is a literal type, which makes numba compile the whole call tree once more.)"""
    m = K.shape[0]
    A = np.empty((m, m))
    shrink = 1e-12
    while True:
        N = np.eye(m) - K @ K.T
        N = 0.5 * (N + N.T)
        if _spd_inverse(N, A):
            break
        K *= 1.0 - shrink
        shrink *= 2.0
        acc[N_REPROJ] += 1.0
    A = 0.5 * (A + A.T)
    E = A @ K
    B = np.eye(m) + K.T @ E
    B = 0.5 * (B + B.T)
    Minv[:m, :m] = A
    Minv[m:, m:] = B
    Minv[:m, m:] = -E
    Minv[m:, :m] = -E.T
    acc[LOST] = 0.0
    acc[NORM] = math.sqrt(np.sum(Minv * Minv))


@njit(cache=False)
def _rank_one_move(K, Minv, u, v, rate, unif, acc):
    m = K.shape[0]
    za = np.dot(u, Minv[:m])
    zb = np.dot(v, Minv[m:])
    alpha = np.dot(u, za[:m])
    beta = np.dot(v, zb[m:])
    gamma = np.dot(v, za[m:])
    r = math.sqrt(alpha * beta)
    t_lo = -1.0 / (r + gamma)
    t_hi = 1.0 / (r - gamma)
    t = truncated_exponential_inv(rate, t_lo * INTERIOR, t_hi * INTERIOR, unif)
    if t == 0.0:
        return t, t_lo, t_hi
    det = ((t_hi - t) / t_hi) * ((t_lo - t) / t_lo)
    s00 = -t * t * beta / det
    s01 = t * (1.0 + t * gamma) / det
    s11 = -t * t * alpha / det
    upd2 = 0.0
    new2 = 0.0
    n2 = 2 * m
    for p in range(n2):
        ya = s00 * za[p] + s01 * zb[p]
        yb = s01 * za[p] + s11 * zb[p]
        for q in range(n2):
            d = ya * za[q] + yb * zb[q]
            Minv[p, q] -= d
            upd2 += d * d
            new2 += Minv[p, q] * Minv[p, q]
    for i in range(m):
        tu = t * u[i]
        for j in range(m):
            K[i, j] += tu * v[j]
    acc[LOST] += math.sqrt(upd2)
    acc[NORM] = math.sqrt(new2)
    return t, t_lo, t_hi


@njit(cache=False)
def line_move(K, Minv, u, v, rate, unif, acc, tol):
    """One exact Hit-and-Run move along ``u v^T`` (``unif`` in ``(0, 1]``); returns ``(t, t_lo, t_hi)``.

    Round-off budget: the Woodbury-updated inverse is the exact inverse of a matrix within
    ``~ 4 u sum ||update||_F`` of ``M`` (``u = 1.1e-16`` per update), so its relative error is
    bounded by about ``||M^{-1}||`` times that; when the bound exceeds ``tol`` the inverse is
    recomputed exactly (O(m^3)).  The bound is very pessimistic: in chains at the default
    temperature (``m = 20``, ``50``), chords from the updated inverse agree with chords recomputed
    from an SVD to ~1e-10 (median; 1e-8 at worst, the conditioning of the reference itself) with or
    without refreshes, so the chain's ``tol`` (0.1) is only a safety net.
    """
    t, t_lo, t_hi = _rank_one_move(K, Minv, u, v, rate, unif, acc)
    if 4.4e-16 * acc[LOST] * acc[NORM] > tol:
        refresh(K, Minv, acc)
        acc[N_EXACT] += 1.0
    return t, t_lo, t_hi

"""The exact Hit-and-Run move on the spectral-norm unit ball, compiled with numba.

One move along a direction ``D = U V^T`` of rank ``k`` (``k = 1``: ``u v^T``; ``k = 2``:
``u1 v1^T + u2 v2^T``, e.g. a skew direction ``a b^T - b a^T``):

* chord.  ``||A||_2 <= 1`` iff ``M(A) = [[I, A], [A^T, I]]`` is positive semi-definite, and
  ``M(K + t D) = M(K) + t W T W^T`` with ``W = [[U, 0], [0, V]]``, ``T = [[0, I_k], [I_k, 0]]``.
  With ``H = W^T M^{-1} W = L L^T`` and the eigenvalues ``mu`` of ``L^T T L`` (``k`` negative,
  ``k`` positive), ``M(K + t D)`` is singular exactly at ``t = -1 / mu``:
  ``t_hi = -1 / mu_min``, ``t_lo = -1 / mu_max``.  For ``k = 1`` this is the closed form
  ``t = -+1 / (sqrt(alpha beta) +- gamma)`` (``H = [[alpha, gamma], [gamma, beta]]``).
* draw.  ``t`` from ``exp(rate * t)`` truncated to the chord (inverse CDF from the heavy end).
* update.  Woodbury: ``M'^{-1} = M^{-1} - Z^T S Z`` with ``Z = W^T M^{-1}`` and
  ``S = t T - t^2 F diag(1 / (1 + t mu)) F^T``, ``F = T L R`` (``R`` the eigenvectors), i.e.
  ``O(k m^2)`` per move.  ``1 + t mu`` is the only ill-conditioned quantity (small when ``t`` is
  near a chord end) and ``M^{-1}`` itself is ill-conditioned near the boundary; a running
  round-off estimate (:func:`move`) triggers an exact refresh from an SVD.

Everything here is a pure function over arrays; the random numbers are drawn by the caller
(from its ``numpy.random.Generator``) and passed in, so a chain is reproducible from its seed.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

INTERIOR = 1.0 - 1e-12  # relative shrink of the chord that keeps every state strictly inside

# slots of the accumulator array ``acc`` shared by the compiled functions
LOST, CHORD_SUM, STEP_SUM, N_EXACT, N_REPROJ, DRIFT, INNER, NORM = range(8)
N_ACC = 8


@njit(cache=True)
def truncated_exponential_inv(rate, lo, hi, v):
    """Inverse CDF at ``v`` in ``(0, 1]`` of ``exp(rate t)`` on ``[lo, hi]`` (``v -> 0``: heavy end)."""
    length = hi - lo
    a = abs(rate)
    if a * length < 1e-12:
        x = -v * length
    else:
        x = math.log1p(v * math.expm1(-a * length)) / a  # offset from the heavy end, in [-length, 0]
    return hi + x if rate > 0 else lo - x


@njit(cache=True)
def refresh(K, Minv, acc, measure):
    """Recompute ``M(K)^{-1}`` exactly: ``A = (I - K K^T)^{-1}`` by Cholesky-checked inversion,
    ``E = A K``, ``B = I + K^T A K`` (relative error ~``1e-16 / (1 - sigma_max^2)``, like an SVD);
    falls back to :func:`refresh_svd` when ``I - K K^T`` is not numerically positive definite."""
    m = K.shape[0]
    N = np.eye(m) - K @ K.T
    N = 0.5 * (N + N.T)
    ok = True
    for i in range(m):
        if not N[i, i] > 0.0:
            ok = False
    if ok:
        try:
            np.linalg.cholesky(N)
        except Exception:  # noqa: BLE001 (numba raises a generic error)
            ok = False
    if not ok:
        refresh_svd(K, Minv, acc, measure)
        return
    A = np.linalg.inv(N)
    A = 0.5 * (A + A.T)
    if measure:
        _record_drift(A, Minv, acc)
    E = A @ K
    B = np.eye(m) + K.T @ E
    B = 0.5 * (B + B.T)
    Minv[:m, :m] = A
    Minv[m:, m:] = B
    Minv[:m, m:] = -E
    Minv[m:, :m] = -E.T
    acc[LOST] = 0.0
    acc[NORM] = math.sqrt(np.sum(Minv * Minv))


@njit(cache=True)
def _record_drift(A, Minv, acc):
    """Largest relative entry-wise gap between the exact inverse block ``A`` and the running one."""
    m = A.shape[0]
    num = 0.0
    den = 0.0
    for i in range(m):
        for j in range(m):
            num = max(num, abs(A[i, j] - Minv[i, j]))
            den = max(den, abs(A[i, j]))
    acc[DRIFT] = max(acc[DRIFT], num / den)


@njit(cache=True)
def refresh_svd(K, Minv, acc, measure):
    """Recompute ``M(K)^{-1}`` exactly from an SVD of ``K`` (pull ``K`` inside if round-off pushed it out)."""
    m = K.shape[0]
    U, sig, Vt = np.linalg.svd(K)
    if sig[0] >= INTERIOR:
        for i in range(m):
            sig[i] = min(sig[i], INTERIOR)
        K[:, :] = (U * sig) @ Vt
        acc[N_REPROJ] += 1.0
    inv = 1.0 / ((1.0 - sig) * (1.0 + sig))
    A = (U * inv) @ U.T
    if measure:
        _record_drift(A, Minv, acc)
    E = (U * (inv * sig)) @ Vt
    B = (Vt.T * inv) @ Vt
    Minv[:m, :m] = A
    Minv[m:, m:] = B
    Minv[:m, m:] = -E
    Minv[m:, :m] = -E.T
    acc[LOST] = 0.0
    acc[NORM] = math.sqrt(2.0 * np.sum(inv * inv * (1.0 + sig * sig)))  # ||M^{-1}||_F


@njit(cache=True)
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


@njit(cache=True)
def _rank_two_move(K, Minv, U, V, rate, unif, acc):
    m = K.shape[0]
    n2 = 2 * m
    Z = np.empty((4, n2))
    Z[0] = np.dot(U[0], Minv[:m])
    Z[1] = np.dot(U[1], Minv[:m])
    Z[2] = np.dot(V[0], Minv[m:])
    Z[3] = np.dot(V[1], Minv[m:])
    H = np.empty((4, 4))
    for p in range(4):
        H[p, 0] = np.dot(Z[p, :m], U[0])
        H[p, 1] = np.dot(Z[p, :m], U[1])
        H[p, 2] = np.dot(Z[p, m:], V[0])
        H[p, 3] = np.dot(Z[p, m:], V[1])
    H = 0.5 * (H + H.T)
    lam, RH = np.linalg.eigh(H)
    if lam[0] <= 1e-12 * lam[3]:  # U or V (numerically) rank-deficient: no move
        return 0.0, 0.0, 0.0
    L = RH * np.sqrt(lam)  # H = L L^T
    TL = np.empty((4, 4))
    TL[:2] = L[2:]
    TL[2:] = L[:2]
    B = L.T @ TL
    B = 0.5 * (B + B.T)
    mu, R = np.linalg.eigh(B)
    t_hi = -1.0 / mu[0]
    t_lo = -1.0 / mu[3]
    t = truncated_exponential_inv(rate, t_lo * INTERIOR, t_hi * INTERIOR, unif)
    if t == 0.0:
        return t, t_lo, t_hi
    d = np.empty(4)
    for i in range(4):
        d[i] = 1.0 + t * mu[i]
    d[0] = (t_hi - t) / t_hi
    d[3] = (t_lo - t) / t_lo
    F = TL @ R
    S = -t * t * ((F / d) @ F.T)
    S[0, 2] += t
    S[1, 3] += t
    S[2, 0] += t
    S[3, 1] += t
    Y = S @ Z
    upd2 = 0.0
    new2 = 0.0
    for p in range(n2):
        for q in range(n2):
            dd = Z[0, p] * Y[0, q] + Z[1, p] * Y[1, q] + Z[2, p] * Y[2, q] + Z[3, p] * Y[3, q]
            Minv[p, q] -= dd
            upd2 += dd * dd
            new2 += Minv[p, q] * Minv[p, q]
    for i in range(m):
        a0 = t * U[0, i]
        a1 = t * U[1, i]
        for j in range(m):
            K[i, j] += a0 * V[0, j] + a1 * V[1, j]
    acc[LOST] += math.sqrt(upd2)
    acc[NORM] = math.sqrt(new2)
    return t, t_lo, t_hi


@njit(cache=True)
def move(K, Minv, U, V, rank, rate, unif, acc, tol):
    """One exact Hit-and-Run move along ``sum_{l < rank} U[l] V[l]^T``; returns ``(t, t_lo, t_hi)``."""
    if rank == 1:
        t, t_lo, t_hi = _rank_one_move(K, Minv, U[0], V[0], rate, unif, acc)
    else:
        t, t_lo, t_hi = _rank_two_move(K, Minv, U, V, rate, unif, acc)
    # Round-off budget.  The Woodbury-updated inverse is the exact inverse of a matrix within
    # ~ 4 u sum ||update||_F of M (backward error; u = 1.1e-16 per update), so its relative error
    # is about ||M^{-1}|| times that: near the boundary ||M^{-1}|| ~ 1 / (1 - sigma_max^2) is
    # large and the bound triggers exact refreshes often (O(m^3)); BallState uses tol = 1e-6.
    if 4.4e-16 * acc[LOST] * acc[NORM] > tol:
        refresh(K, Minv, acc, False)
        acc[N_EXACT] += 1.0
    return t, t_lo, t_hi


@njit(cache=True)
def run_block(K, Minv, U, V, ranks, slopes, rates, unifs, first, burn_in, thin, refresh_every, tol,
              acc, K_sum, inner_draws, K_draws, store):
    """Moves ``first, ..., first + len(ranks) - 1`` of a chain (global step index ``i``).

    ``acc[INNER]`` carries ``<K, G>`` (updated by ``t * slopes[j]``); post-burn-in steps add
    ``K`` to ``K_sum``, the chord length and ``|t|`` to ``acc``, and every ``thin``-th one writes
    ``inner_draws`` (and ``K_draws`` when ``store``).
    """
    n_draws = inner_draws.shape[0]
    for j in range(ranks.shape[0]):
        i = first + j
        t, t_lo, t_hi = move(K, Minv, U[j], V[j], ranks[j], rates[j], unifs[j], acc, tol)
        acc[INNER] += t * slopes[j]
        if (i + 1) % refresh_every == 0:
            refresh(K, Minv, acc, True)
        if i >= burn_in:
            k = i - burn_in
            acc[CHORD_SUM] += t_hi - t_lo
            acc[STEP_SUM] += abs(t)
            K_sum += K
            if (k + 1) % thin == 0 and k // thin < n_draws:
                inner_draws[k // thin] = acc[INNER]
                if store:
                    K_draws[k // thin] = K

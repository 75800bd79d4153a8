"""The breathing move: rescale the symmetric polar factor about the identity (numba).

Polar coordinates.  An invertible ``J`` is ``O H`` with ``O`` orthogonal and ``H`` symmetric
positive definite, uniquely, and Lebesgue measure is ``prod_{i<j} (h_i + h_j) dH dO``
(``h`` the eigenvalues of ``H``, i.e. the singular values ``sigma`` of ``J``; ``dO`` the Haar
measure).  The ball is ``{0 <= H <= I}``, so in these coordinates the target is
``exp(beta <O H, diag(s)>) prod_{i<j} (h_i + h_j)`` on ``O(m) x {0 <= H <= I}``.

Move.  The maps ``H -> I - lambda (I - H)``, ``lambda > 0``, form a group acting on symmetric
matrices with Jacobian ``lambda^d``, ``d = m(m+1)/2``; they keep ``H <= I`` and keep ``H >= 0``
for ``lambda <= 1 / max(p)`` (``p = 1 - sigma``).  By the group-move theorem (Liu & Sabatti
2000), drawing ``lambda`` with density ``~ target(O, H_lambda) lambda^{d - 1}`` and moving to
``O H_lambda`` leaves the target invariant.  With ``J = U diag(sigma) V^T``:
``O H_lambda = U diag(1 - lambda p) V^T`` and, for ``eta = log lambda``,

    log density(eta) = d eta - lambda b + sum_{i<j} log(2 - lambda (p_i + p_j)),
    b = beta sum_k p_k (V^T diag(s) U)_kk,

log-concave in ``eta``.  One slice-sampling update (Neal 2003, stepping out then shrinkage)
moves ``eta``; slice sampling leaves the conditional exactly invariant.

Why: near the optimum the excess cost is a sum of ``~ m^2`` nearly independent pieces whose
common scale (all eigenvalues of ``I - H`` together) moves only by a random walk under
single-direction moves: ``~ m`` sweeps.  This move redraws that scale every sweep.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from . import _har_kernel as hk


@njit(cache=False)
def _log_density(eta, p, p_max, b, d):
    lam = math.exp(eta)
    if lam * p_max > 1.0:
        return -np.inf
    out = d * eta - lam * b
    m = p.shape[0]
    for i in range(m):
        for j in range(i + 1, m):
            out += math.log(2.0 - lam * (p[i] + p[j]))
    return out


@njit(cache=False)
def breathing_move(J, s, beta, rng, acc, width):
    """Breathing move on ``J`` in place (see the module docstring); ``M(J)^{-1}`` is not updated.
    Singular values that round-off put at or above ``INTERIOR`` are pulled inside first
    (counted in ``acc[N_REPROJ]``)."""
    m = J.shape[0]
    U, sig, Vt = np.linalg.svd(J)
    if sig[0] >= hk.INTERIOR:
        for k in range(m):
            sig[k] = min(sig[k], hk.INTERIOR)
        acc[hk.N_REPROJ] += 1.0
    p = 1.0 - sig
    p_max = p[m - 1]
    c = np.zeros(m)
    for k in range(m):
        for l in range(m):
            c[k] += s[l] * U[l, k] * Vt[k, l]
    b = beta * np.sum(p * c)
    d = m * (m + 1) / 2.0
    y = _log_density(0.0, p, p_max, b, d) + math.log(1.0 - rng.random())  # minus an Exp(1) draw
    lo = -width * rng.random()
    hi = lo + width
    while _log_density(lo, p, p_max, b, d) > y:
        lo -= width
    while _log_density(hi, p, p_max, b, d) > y:
        hi += width
    eta = 0.0
    for _ in range(10_000):  # shrinkage; ends long before the cap (interval halves on average)
        eta = lo + (hi - lo) * rng.random()
        if _log_density(eta, p, p_max, b, d) > y:
            break
        if eta < 0.0:
            lo = eta
        else:
            hi = eta
    else:
        eta = 0.0  # unreachable in practice: y equal to the current log-density (probability 0)
    J[:, :] = (U * (1.0 - math.exp(eta) * p)) @ Vt

"""Moves in the singular-value coordinates of the plan: breathing and singular-value updates (numba).

Coordinates.  Write ``J = U diag(sigma) V^T``.  Lebesgue measure on ``m x m`` matrices is
``prod_{i<j} |sigma_i^2 - sigma_j^2| d sigma dU dV`` (``dU``, ``dV`` Haar), so, lifted to these
coordinates, the target ``exp(beta <J, diag(s)>)`` on the ball reads

    exp(beta sum_k c_k sigma_k) prod_{i<j} |sigma_i^2 - sigma_j^2|,   c_k = (V^T diag(s) U)_kk,

on ``|sigma_k| <= 1`` (signed singular values: the sign of ``sigma_k`` is that of ``u_k v_k^T``).
A move that leaves this lifted density invariant and treats the indices ``k`` and the signs of
``(u_k, sigma_k)`` symmetrically leaves ``pi`` invariant on ``J``, whichever SVD LAPACK returns.

Singular-value update.  For each ``k`` in a random order, one slice-sampling update (Neal 2003;
shrinkage from the whole interval ``[-1, 1]``) of ``sigma_k`` from its conditional
``exp(beta c_k x) prod_{j != k} |x^2 - sigma_j^2|``: the spectrum of the plan, one value at a
time, in its own frame (the rotations keep turning the frame).

Breathing move.  Polar coordinates ``J = O H`` (``O = U V^T``, ``H = V diag(sigma) V^T``,
``sigma >= 0``): Lebesgue measure is ``prod_{i<j} (sigma_i + sigma_j) dH dO``.  The maps
``H -> I - lambda (I - H)``, ``lambda > 0``, form a group acting on symmetric matrices with
Jacobian ``lambda^d``, ``d = m(m+1)/2``; they keep ``H <= I``, and ``H >= 0`` while
``lambda <= 1 / max(p)`` (``p = 1 - sigma``).  By the group-move theorem (Liu & Sabatti 2000),
drawing ``lambda`` with density ``~ target(O, H_lambda) lambda^{d - 1}`` leaves the target
invariant.  For ``eta = log lambda``:

    log density(eta) = d eta - lambda b + sum_{i<j} log(2 - lambda (p_i + p_j)),
    b = beta sum_k p_k c_k,

log-concave in ``eta``; one slice-sampling update (stepping out, then shrinkage) moves it.  Near
the optimum the excess cost is a sum of ``~ m^2`` nearly independent pieces whose common scale
(all of ``I - H`` together) moves only by a random walk under one-value-at-a-time moves (``~ m``
sweeps); this move redraws that scale every sweep.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from . import _har_kernel as hk

_BLOCK = 8  # logs of products of this many factors (fewer logs; no underflow above 1e-38 a factor)


@njit(cache=False)
def _log_breath(eta, p, p_max, b, d):
    lam = math.exp(eta)
    if lam * p_max > 1.0:
        return -np.inf
    out = d * eta - lam * b
    m = p.shape[0]
    prod = 1.0
    n = 0
    for i in range(m):
        for j in range(i + 1, m):
            prod *= 2.0 - lam * (p[i] + p[j])  # in (0, 2]
            n += 1
            if n == _BLOCK:
                out += math.log(prod)
                prod = 1.0
                n = 0
    return out + math.log(prod)


@njit(cache=False)
def _log_singular(x, k, sig, slope):
    """``slope x + sum_{j != k} log |x^2 - sigma_j^2|``."""
    out = slope * x
    x2 = x * x
    prod = 1.0
    n = 0
    for j in range(sig.shape[0]):
        if j == k:
            continue
        f = abs(x2 - sig[j] * sig[j])
        if f == 0.0:
            return -np.inf
        prod *= f
        n += 1
        if n == _BLOCK or prod < 1e-280:
            out += math.log(prod)
            prod = 1.0
            n = 0
    return out + math.log(prod)


@njit(cache=False)
def _breathe(sig, c, beta, rng, width):
    """Breathing move on the (non-negative) singular values ``sig``, in place."""
    m = sig.shape[0]
    p = 1.0 - sig
    p_max = np.max(p)
    b = beta * np.sum(p * c)
    d = m * (m + 1) / 2.0
    y = _log_breath(0.0, p, p_max, b, d) + math.log(1.0 - rng.random())  # minus an Exp(1) draw
    lo = -width * rng.random()
    hi = lo + width
    while _log_breath(lo, p, p_max, b, d) > y:
        lo -= width
    while _log_breath(hi, p, p_max, b, d) > y:
        hi += width
    eta = 0.0
    for _ in range(10_000):  # shrinkage; ends long before the cap (the interval halves on average)
        eta = lo + (hi - lo) * rng.random()
        if _log_breath(eta, p, p_max, b, d) > y:
            break
        if eta < 0.0:
            lo = eta
        else:
            hi = eta
    else:
        eta = 0.0  # unreachable in practice: y equal to the current log-density (probability 0)
    sig[:] = 1.0 - math.exp(eta) * p


@njit(cache=False)
def _update_singular_values(sig, c, beta, rng):
    """One slice-sampling update of every signed singular value, in a random order, in place."""
    m = sig.shape[0]
    order = np.arange(m)
    for i in range(m - 1, 0, -1):
        j = min(int(rng.random() * (i + 1)), i)
        order[i], order[j] = order[j], order[i]
    for k in order:
        x0 = sig[k]
        slope = beta * c[k]
        y = _log_singular(x0, k, sig, slope) + math.log(1.0 - rng.random())
        lo, hi = -hk.INTERIOR, hk.INTERIOR
        x = x0
        for _ in range(10_000):
            x = lo + (hi - lo) * rng.random()
            if _log_singular(x, k, sig, slope) > y:
                break
            if x < x0:
                lo = x
            else:
                hi = x
        else:
            x = x0
        sig[k] = x


@njit(cache=False)
def spectral_moves(J, s, beta, rng, acc, width, breathe, singular):
    """One SVD of ``J``; the breathing move (if ``breathe``), then the singular-value updates (if
    ``singular``); ``J`` rebuilt in place.  ``M(J)^{-1}`` is not updated.  Singular values that
    round-off put at or above ``INTERIOR`` are pulled inside first (counted in ``acc[N_REPROJ]``)."""
    m = J.shape[0]
    U, sig, Vt = np.linalg.svd(J)
    if sig[0] >= hk.INTERIOR:
        for k in range(m):
            sig[k] = min(sig[k], hk.INTERIOR)
        acc[hk.N_REPROJ] += 1.0
    c = np.zeros(m)
    for k in range(m):
        for l in range(m):
            c[k] += s[l] * U[l, k] * Vt[k, l]
    if breathe:
        _breathe(sig, c, beta, rng, width)
    if singular:
        _update_singular_values(sig, c, beta, rng)
    J[:, :] = (U * sig) @ Vt

"""One fused sweep of exact moves on ``pi(J) ~ exp(beta <J, diag(s)>)``, ``||J||_2 <= 1`` (numba).

A sweep, in the SVD frame of ``G`` (where ``G = diag(s)``), is the composition of

1. for every plane ``(i, j)``, ``i < j``, in a random order: one exact draw on the rotation
   orbit of each family in ``families`` (:mod:`scotgm_pp.inference._har_rotations`): the
   orthogonal part of ``J`` and the frame of its symmetric part;
2. if ``coordinate``: ``m`` Hit-and-Run line moves along ``e_k e_k^T`` (``k`` in a random order):
   the eigenvalues of the symmetric part one direction at a time;
3. ``n_iso`` Hit-and-Run line moves along ``u v^T``, ``u`` and ``v`` uniform on the unit sphere
   (the original kernel: irreducible from any start on its own);
4. in the SVD coordinates (:mod:`scotgm_pp.inference._har_spectral`): if ``breathe``, the
   breathing move; if ``singular``, one slice-sampling update of each signed singular value.

The line moves need ``M(J)^{-1}``; it is recomputed exactly before them (O(m^3), cheaper than
carrying it through the ``O(m^2)`` rotations) and kept current through them by Woodbury updates.

Every move leaves ``pi`` invariant exactly (rotation and breathing moves by the group-move
theorem, line moves because each direction is drawn independently of the state, singular-value
updates as slice-sampling updates of a conditional), hence so does the sweep; nothing is adapted.  All random numbers come from the chain's
``numpy.random.Generator``, passed in (numba draws from the same bit generator state).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from . import _har_kernel as hk
from ._har_rotations import rotation_move
from ._har_spectral import spectral_moves

N_LINE, ROT_SUM = hk.N_ACC, hk.N_ACC + 1  # extra accumulator slots: line moves made, sum |d<J, s>| of rotations
N_ACC = hk.N_ACC + 2


@njit(cache=False)
def shuffled(n, rng):
    """A uniformly random permutation of ``0, ..., n - 1`` (Fisher-Yates on ``rng.random()``)."""
    out = np.arange(n)
    for i in range(n - 1, 0, -1):
        j = min(int(rng.random() * (i + 1)), i)
        out[i], out[j] = out[j], out[i]
    return out


@njit(cache=False)
def run_sweeps(J, Minv, s, beta, families, coordinate, n_iso, breathe, singular, pair_i, pair_j, rng, acc, tol,
               burn_in, n_kept, thin, J_sum, inner_draws, J_draws, store):
    """``burn_in + n_kept`` sweeps (see the module docstring); the kept ones add ``J`` to ``J_sum``,
    accumulate the line moves' chord lengths and steps in ``acc``, and every ``thin``-th writes
    ``<J, diag(s)>`` to ``inner_draws`` (and ``J`` to ``J_draws`` if ``store``), up to
    ``len(inner_draws)`` draws.  ``acc[INNER]`` carries ``<J, diag(s)>``."""
    m = J.shape[0]
    n_pairs = pair_i.shape[0]
    n_draws = inner_draws.shape[0]
    width = 3.0 / math.sqrt(m * (m + 1) / 2.0)  # slice width of the breathing move: ~3 sd of log(lambda)
    u = np.zeros(m)
    v = np.empty(m)
    for i in range(burn_in + n_kept):
        record = i >= burn_in
        # 1. rotation orbits, every plane in a random order
        if families.shape[0] > 0:
            for p in shuffled(n_pairs, rng):
                for f in families:
                    d = rotation_move(J, s, beta, pair_i[p], pair_j[p], f, rng)
                    acc[hk.INNER] += d
                    if record:
                        acc[ROT_SUM] += abs(d)
        # 2.-3. Hit-and-Run line moves: coordinate directions e_k e_k^T, then isotropic u v^T
        n_line = (m if coordinate else 0) + n_iso
        if n_line > 0:
            hk.refresh(J, Minv, acc)
        order = shuffled(m, rng)
        for q in range(n_line):
            if q < m and coordinate:
                k = order[q]
                u[:] = 0.0
                u[k] = 1.0
                v[:] = u
                slope = s[k]
            else:
                for k in range(m):
                    u[k] = rng.standard_normal()
                    v[k] = rng.standard_normal()
                u /= math.sqrt(np.sum(u * u))
                v /= math.sqrt(np.sum(v * v))
                slope = np.sum(s * u * v)
            t, t_lo, t_hi = hk._rank_one_move(J, Minv, u, v, beta * slope, 1.0 - rng.random(), acc)
            if 4.4e-16 * acc[hk.LOST] * acc[hk.NORM] > tol:  # round-off bound (see hk.line_move)
                hk.refresh(J, Minv, acc)
                acc[hk.N_EXACT] += 1.0
            acc[hk.INNER] += t * slope
            if record:
                acc[hk.CHORD_SUM] += t_hi - t_lo
                acc[hk.STEP_SUM] += abs(t)
                acc[N_LINE] += 1.0
        # 4. breathing move and singular-value updates, in the SVD coordinates
        if breathe or singular:
            spectral_moves(J, s, beta, rng, acc, width, breathe, singular)
        acc[hk.INNER] = np.sum(s * np.diag(J))  # exact again (the updates above accumulate round-off)
        if record:
            k = i - burn_in
            J_sum += J
            if (k + 1) % thin == 0 and k // thin < n_draws:
                inner_draws[k // thin] = acc[hk.INNER]
                if store:
                    J_draws[k // thin] = J

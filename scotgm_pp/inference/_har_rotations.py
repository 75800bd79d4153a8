"""Exact moves along rotation orbits of the plan ball, compiled with numba.

The ball ``{J : ||J||_2 <= 1}`` and Lebesgue measure are invariant under ``J -> R J R'`` for
orthogonal ``R``, ``R'``.  For a one-parameter rotation group ``theta -> (R_theta, R'_theta)``
acting in the plane of two coordinates ``(i, j)``, the orbit ``{R_theta J R'_theta}`` is a circle
inside the ball, and drawing ``theta`` from ``pi(R_theta J R'_theta)`` (the target restricted to the
orbit, with the uniform measure on the angle) leaves ``pi`` invariant: this is the group move of
Liu & Sabatti (2000, "Generalised Gibbs sampler and multigrid Monte Carlo for Bayesian
computation"), Jacobian 1 since rotations preserve volume.  In the frame where
``G = diag(s)`` the log-density ``beta tr(diag(s) J)`` (``beta = 2 / eps``) depends on the orbit
only through the diagonal entries ``J_ii`` and ``J_jj``, which are trigonometric polynomials of
degree one in ``psi`` (``psi = theta`` for one-sided rotations, ``psi = 2 theta`` for two-sided
ones), so the draw is a von Mises variate: exact, in O(1), and the update costs O(m).

Four rotation families per plane:

* ``ROWS``: ``J -> R J`` (left factor of the polar decomposition);
* ``COLS``: ``J -> J R^T``;
* ``CONJ``: ``J -> R J R^T`` (rotates the frame of the symmetric part and leaves the orthogonal
  factor in place: near the optimum, the loose direction);
* ``TWIST``: ``J -> R J R`` (moves the orthogonal factor along the skew direction: near the
  optimum, the tight direction, spread ``~ sqrt(eps / (s_i + s_j))``).

``CONJ`` and ``TWIST`` together generate both one-sided groups (``R_a J R_b^T`` with
``a = x + y``, ``b = x - y``), so with the line moves the kernel is irreducible; being aligned
with the loose and tight directions near the optimum, they are the default
(:class:`~scotgm_pp.inference._har_chain.SweepMoves`).  Measured: without ``CONJ`` the diagonal
entries of ``C`` mix ~10x slower on covariances with decaying spectra; ``ROWS`` and ``COLS`` add
work without adding effective draws.

Rotation moves need no inverse; the sweep recomputes ``M(J)^{-1}`` once, after all of them and
before the line moves that need it (cheaper than rotating it along: O(m^3) once against
O(m) per rotation times ``m(m-1)`` rotations).
"""

from __future__ import annotations

import math

from numba import njit

ROWS, COLS, CONJ, TWIST = 0, 1, 2, 3
N_FAMILIES = 4
_VM_UNIFORM = 1e-8  # below this concentration the von Mises draw is uniform (density error < 2e-8)
_VM_NORMAL = 700.0  # above it: exact half-normal rejection (the mass beyond |x| > pi/2 is < 1e-304)


@njit(cache=False)
def von_mises(rng, kappa):
    """Draw ``x`` in ``(-pi, pi]`` with density proportional to ``exp(kappa cos x)``, ``kappa >= 0``.

    Best & Fisher (1979) rejection (wrapped-Cauchy envelope, as numpy's ``vonmises``) for
    ``1e-8 <= kappa <= 700``, uniform below (density error under 2e-8); for ``kappa > 700`` the variable
    ``u = 1 - cos x`` (density ``~ exp(-kappa u) u^{-1/2} (2 - u)^{-1/2}``) is proposed from
    ``Z^2 / (2 kappa)`` (``Z`` standard normal) and accepted with probability ``(2 - u)^{-1/2}``
    on ``u <= 1``; the part ``u > 1`` has mass below ``exp(-700)`` and is dropped.
    """
    if kappa < _VM_UNIFORM:
        return math.pi * (2.0 * rng.random() - 1.0)
    if kappa > _VM_NORMAL:
        while True:
            z = rng.standard_normal()
            u = z * z / (2.0 * kappa)
            if u <= 1.0 and rng.random() * math.sqrt(2.0 - u) <= 1.0:
                x = 2.0 * math.asin(math.sqrt(0.5 * u))
                return x if rng.random() < 0.5 else -x
    if kappa < 1e-5:  # the envelope parameter below loses all digits: its expansion (as numpy)
        s = 1.0 / kappa + kappa
    else:
        r = 1.0 + math.sqrt(1.0 + 4.0 * kappa * kappa)
        rho = (r - math.sqrt(2.0 * r)) / (2.0 * kappa)
        s = (1.0 + rho * rho) / (2.0 * rho)
    while True:  # any s > 1 gives a valid envelope; the test is exact
        z = math.cos(math.pi * rng.random())
        w = (1.0 + s * z) / (s + z)
        y = kappa * (s - w)
        u2 = rng.random()
        if y * (2.0 - y) - u2 >= 0.0 or math.log(y / u2) + 1.0 - y >= 0.0:
            break
    x = math.acos(min(1.0, max(-1.0, w)))
    return x if rng.random() < 0.5 else -x


@njit(cache=False)
def _block_diag_after(b00, b01, b10, b11, family, c, sn):
    """``(J'_ii, J'_jj)`` of the 2 x 2 block after a rotation of the given family by angle (c, sn)."""
    if family == ROWS or family == CONJ or family == TWIST:  # rows: B <- R B, R = [[c, -sn], [sn, c]]
        b00, b01, b10, b11 = c * b00 - sn * b10, c * b01 - sn * b11, sn * b00 + c * b10, sn * b01 + c * b11
    if family == COLS or family == CONJ:  # cols: B <- B R^T
        b00, b01, b10, b11 = c * b00 - sn * b01, sn * b00 + c * b01, c * b10 - sn * b11, sn * b10 + c * b11
    elif family == TWIST:  # cols: B <- B R
        b00, b01, b10, b11 = c * b00 + sn * b01, -sn * b00 + c * b01, c * b10 + sn * b11, -sn * b10 + c * b11
    return b00, b11


@njit(cache=False)
def _rotate_rows(X, p, q, c, sn):
    """Rows ``p``, ``q`` of ``X`` <- ``[[c, -sn], [sn, c]]`` applied to them."""
    for k in range(X.shape[1]):
        xp = X[p, k]
        xq = X[q, k]
        X[p, k] = c * xp - sn * xq
        X[q, k] = sn * xp + c * xq


@njit(cache=False)
def _rotate_cols(X, p, q, c, sn):
    """Columns ``p``, ``q`` of ``X`` <- the same rotation (``X <- X R^T`` on them)."""
    for k in range(X.shape[0]):
        xp = X[k, p]
        xq = X[k, q]
        X[k, p] = c * xp - sn * xq
        X[k, q] = sn * xp + c * xq


# (cos, sin) of the rotation angle theta at which f is read: psi = 0, pi/2, pi with theta = psi
# (one-sided families) or theta = psi / 2 (two-sided)
_ONE_SIDED = ((1.0, 0.0), (0.0, 1.0), (-1.0, 0.0))
_TWO_SIDED = ((1.0, 0.0), (math.sqrt(0.5), math.sqrt(0.5)), (0.0, 1.0))


@njit(cache=False)
def rotation_move(J, s, beta, i, j, family, rng):
    """One exact draw on the rotation orbit of ``family`` in plane ``(i, j)``; updates ``J`` (O(m))
    and returns the change of ``<J, diag(s)>``.

    The orbit's log-density is ``beta f(psi)`` with ``f(psi) = s_i J'_ii + s_j J'_jj =
    c0 + a cos psi + b sin psi``; ``a`` and ``b`` are read off ``f`` at ``psi = 0, pi/2, pi``.
    """
    b00, b01, b10, b11 = J[i, i], J[i, j], J[j, i], J[j, j]
    half = family == CONJ or family == TWIST  # two-sided: period pi in theta, psi = 2 theta
    f0 = f1 = f2 = 0.0
    for k in range(3):
        c, sn = _TWO_SIDED[k] if half else _ONE_SIDED[k]
        d0, d1 = _block_diag_after(b00, b01, b10, b11, family, c, sn)
        fk = s[i] * d0 + s[j] * d1
        if k == 0:
            f0 = fk
        elif k == 1:
            f1 = fk
        else:
            f2 = fk
    a = 0.5 * (f0 - f2)
    b = f1 - 0.5 * (f0 + f2)
    psi = math.atan2(b, a) + von_mises(rng, beta * math.sqrt(a * a + b * b))
    th = 0.5 * psi if half else psi
    c, sn = math.cos(th), math.sin(th)
    if family != COLS:
        _rotate_rows(J, i, j, c, sn)
    if family == COLS or family == CONJ:  # J <- J R^T
        _rotate_cols(J, i, j, c, sn)
    elif family == TWIST:  # J <- J R = J R_{-theta}^T
        _rotate_cols(J, i, j, c, -sn)
    return s[i] * (J[i, i] - b00) + s[j] * (J[j, j] - b11)

"""The default temperature of the plan distribution ``pi_eps(K) ~ exp(-c(K) / eps)``, and its reason.

Principle (maximum entropy at the regret the data leave).  The optimal plan is a function of the
two covariances, which are estimated from ``n_x`` and ``n_y`` cells.  Draw covariances the data
cannot rule out (their posterior), take the OT plan of each draw, and score it with the
*estimated* cost: it is worse than the estimated optimum by the regret

    R = c_hat(K*(Sx, Sy)) - W2_hat^2 = 2 (sum(s_hat) - <K*(Sx, Sy), G_hat>) >= 0.

Among all distributions over plans whose expected excess cost equals ``E[R]``, the one with
maximum entropy is ``pi_eps`` with the ``eps`` that solves ``E_pi_eps[c(K)] - W2_hat^2 = E[R]``
(the Gibbs form is exactly the maximum-entropy solution, ``1 / eps`` the Lagrange multiplier).
So the sampled plans are, on average, exactly as suboptimal under the estimated cost as the
optimal plans of the covariances the data allow, and otherwise as spread as possible.

Solving for ``eps``: near the optimum the excess cost under ``pi_eps`` is
``Gamma(d_eff, eps)``, ``d_eff = m(m+1)/2 + m(m-1)/4`` (:func:`effective_dimension`), so
``eps = E[R] / d_eff``.  This is the small-``eps`` limit; it holds while ``eps`` is small
against the singular values ``s`` of ``G`` (checked by the chain: the benchmark prints the
sampled mean excess against ``E[R]``).

Posterior.  For each covariance, the conjugate inverse-Wishart posterior under a prior worth one
cell centred on the estimate: ``S ~ IW(n + m + 2, (n + 1) S_hat)`` (posterior mean exactly
``S_hat``; proper for any ``n > 0``).  ``E[R]`` is a Monte-Carlo average over ``n_draws``
seeded draws.  Not chosen: matching the posterior standard deviation of ``W2^2`` itself.  Most
of that uncertainty is a level shift of every plan's cost (``tr Sx + tr Sy``), which says nothing
about which plan is optimal; and as the cost of ``pi_eps`` concentrates (mean excess ``d_eff eps``,
sd ``sqrt(d_eff) eps``), matching the sd would put the mean excess ``sqrt(d_eff)`` standard
deviations above the optimum: at ``m = 30``, 300 cells, past half the gap to the independent
coupling.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

__all__ = ["DEFAULT_CELLS", "default_temperature", "effective_dimension", "plan_regret_draws", "regret_temperature"]

DEFAULT_CELLS = 100  # cells assumed behind each covariance when no count is given
N_REGRET_DRAWS = 64


def effective_dimension(m: int) -> float:
    """Number of "directions" of the plan set near the optimum: ``m(m+1)/2 + m(m-1)/4``.

    Near the orthogonal optimum ``K*`` the ball is a cone in the ``m(m+1)/2`` symmetric
    directions and a paraboloid in the ``m(m-1)/2`` skew ones, so at small ``eps`` the excess
    cost ``c(K) - W2^2`` is ``Gamma(effective_dimension(m), eps)``: mean ``d_eff * eps``.
    """
    return m * (m + 1) / 2.0 + m * (m - 1) / 4.0


def _inverse_wishart_sqrt(B: np.ndarray, dof: float, rng: np.random.Generator) -> np.ndarray:
    """Symmetric square root of one ``IW(dof, Psi)`` draw, given ``B B^T = Psi^{-1}``.

    Bartlett: ``B A A^T B^T ~ Wishart(dof, Psi^{-1})`` (the precision) for lower-triangular ``A``
    with ``A_ii^2 ~ chi2(dof - i)`` and standard normal entries below the diagonal."""
    m = B.shape[0]
    A = np.tril(rng.standard_normal((m, m)), -1)
    A[np.diag_indices(m)] = np.sqrt(rng.chisquare(dof - np.arange(m)))
    BA = B @ A
    w, V = np.linalg.eigh(BA @ BA.T)
    return (V / np.sqrt(w)) @ V.T


def _inverse_factor(S: np.ndarray, name: str) -> np.ndarray:
    """``B`` with ``B B^T = S^{-1}`` (``B = L^{-T}``, ``L L^T = S``)."""
    try:
        L = np.linalg.cholesky(S)
    except np.linalg.LinAlgError:
        raise ValueError(
            f"{name} is singular; the default temperature needs positive-definite covariances "
            "(add a ridge, e.g. S + 1e-6 * trace(S) / m * I) or pass temperature= explicitly."
        ) from None
    return scipy.linalg.solve_triangular(L, np.eye(S.shape[0]), lower=True).T


def plan_regret_draws(Sx, Sy, n_x: float, n_y: float, *, n_draws: int = N_REGRET_DRAWS,
                      random_state: int | np.random.Generator | None = 0) -> np.ndarray:
    """Regret ``R`` of the OT plans of posterior covariance draws under the estimated cost.

    Parameters
    ----------
    Sx, Sy
        Estimated covariances ``(m, m)``, symmetric positive definite.
    n_x, n_y
        Numbers of cells behind them (may be fractional, e.g. summed responsibilities), ``> 0``.
    n_draws
        Posterior draws.
    random_state
        Seed or generator of the draws.

    Returns
    -------
    numpy.ndarray
        ``n_draws`` values of ``R = 2 (sum(s_hat) - <K*(Sx', Sy'), G_hat>) >= 0`` (module docstring).
    """
    from ._har_geometry import coupling_geometry

    geom = coupling_geometry(Sx, Sy)
    if not (np.isfinite(n_x) and np.isfinite(n_y) and n_x > 0 and n_y > 0):
        raise ValueError(f"n_x and n_y must be positive cell counts, got {n_x} and {n_y}.")
    if int(n_draws) != n_draws or n_draws < 2:
        raise ValueError(f"n_draws must be an integer >= 2, got {n_draws!r}.")
    m = geom.m
    rng = np.random.default_rng(random_state)
    Sx_hat, Sy_hat = geom.Lx @ geom.Lx, geom.Ly @ geom.Ly
    cx = _inverse_factor((n_x + 1.0) * Sx_hat, "Sx")
    cy = _inverse_factor((n_y + 1.0) * Sy_hat, "Sy")
    s_sum = float(geom.singular_values.sum())
    out = np.empty(int(n_draws))
    for k in range(int(n_draws)):
        Lx = _inverse_wishart_sqrt(cx, n_x + m + 2.0, rng)
        Ly = _inverse_wishart_sqrt(cy, n_y + m + 2.0, rng)
        U, _, Vt = np.linalg.svd(Lx @ Ly)
        out[k] = 2.0 * (s_sum - float(np.sum((U @ Vt) * geom.G)))
    return np.maximum(out, 0.0)


def default_temperature(Sx, Sy, *, n_x: float | None = None, n_y: float | None = None,
                        n_draws: int = N_REGRET_DRAWS, random_state: int | np.random.Generator | None = 0) -> float:
    """Default ``eps``: the plans' mean excess cost equals the expected regret the data leave.

    ``eps = mean(plan_regret_draws(Sx, Sy, n_x, n_y)) / effective_dimension(m)``: the
    maximum-entropy plan distribution whose expected excess cost over ``W2^2`` equals the expected
    regret, under the estimated cost, of the optimal plans of covariances drawn from their
    posterior (derivation and posterior in the module docstring; the ``d_eff`` relation is the
    small-``eps`` limit).  The regret shrinks like ``1 / n``, and so does ``eps``.

    Parameters
    ----------
    Sx, Sy
        Estimated covariances, symmetric positive definite.
    n_x, n_y
        Cells behind ``Sx`` and ``Sy``; both or neither.  Neither: ``DEFAULT_CELLS`` (100) each.
    n_draws, random_state
        Posterior draws of the Monte-Carlo average (relative error ``~ 1 / sqrt(n_draws d)`` with
        ``d ~ m^2 / 2``: below 4% at ``m = 10`` with 64 draws) and their seed.
    """
    return regret_temperature(Sx, Sy, n_x, n_y, n_draws=n_draws, random_state=random_state)[0]


def regret_temperature(Sx, Sy, n_x: float | None, n_y: float | None, *, n_draws: int = N_REGRET_DRAWS,
                       random_state: int | np.random.Generator | None = 0) -> tuple[float, np.ndarray]:
    """:func:`default_temperature` and the regret draws behind it: ``(eps, R)``."""
    if (n_x is None) != (n_y is None):
        raise ValueError("give both n_x and n_y (cell counts of source and target) or neither.")
    if n_x is None:
        n_x = n_y = DEFAULT_CELLS
    regret = plan_regret_draws(Sx, Sy, n_x, n_y, n_draws=n_draws, random_state=random_state)
    eps = float(regret.mean()) / effective_dimension(np.shape(Sx)[0])
    if not eps > 0.0:
        raise ValueError("the expected plan regret is zero (Sx or Sy is zero): every coupling has the "
                         "same cost; pass temperature= explicitly.")
    return eps, regret

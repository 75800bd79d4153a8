"""Hit-and-Run sampling of Gaussian transport plans (sc-OTGM, Algorithm 1 done exactly).

Every Gaussian coupling of ``N(mu_x, Sx)`` and ``N(mu_y, Sy)`` has cross-covariance ``C = Lx K Ly``
(symmetric square roots ``Lx = Sx^{1/2}``, ``Ly = Sy^{1/2}``) with ``K`` in the unit ball of the
spectral norm, ``{K : ||K||_2 <= 1}``.  Its expected squared cost is

    c(K) = |mu_y - mu_x|^2 + tr Sx + tr Sy - 2 <K, G>,    G = Lx Ly,

so the tempered distribution over plans ``pi_eps(K) ~ exp(-c(K) / eps)`` is log-linear on a
convex body (log-concave, hence unimodal).  Hit-and-Run samples it exactly, step by step:

1. draw a direction ``D`` from a distribution fixed in advance;
2. compute the chord ``{t : ||K + t D||_2 <= 1}`` exactly (:func:`chord`; in the chain, from
   low-rank-updated inverses, see :mod:`scotgm_pp.inference._har_kernel`);
3. draw ``t`` from the density ``~ exp(2 t <D, G> / eps)`` truncated to the chord
   (:func:`truncated_exponential`) and move to ``K + t D``.

For every fixed ``D`` the move "resample along the line through ``K``" is ``pi_eps``-reversible;
a mixture of such moves with weights that do not depend on ``K`` is therefore reversible too.

Why the original kernel (``D = u v^T``, ``u``, ``v`` uniform) mixed slowly, and the fix: at low
temperature the mass sits next to the OT plan ``K* = Q P^T`` (``G = Q diag(s) P^T``), an
orthogonal matrix, i.e. an extreme point of the ball where the body is a thin curved cap.  In
the frame ``K = Q J P^T`` near ``J = I``, ``J ~ (I + A)(I - P)``: the symmetric part ``P >= 0``
spreads ``~eps / s`` and the skew part ``A`` (along the orthogonal group) ``~sqrt(eps / s)``.  A
rank-one ``u v^T`` has an indefinite symmetric part, so its chord is ``O(eps)``: the skew spread
takes ``~1 / eps`` moves to cross.  The default direction distribution
(:class:`~scotgm_pp.inference._har_directions.DirectionMixture`, fixed from ``G``) mixes skew
rank-two directions ``Q (a b^T - b a^T) P^T`` (chord ``O(sqrt(eps))``), symmetric rank-one
directions ``Q a a^T P^T = (Q a)(K*^T Q a)^T`` and a few isotropic ones, with ``a``, ``b`` partly
whitened by ``diag(s)^{-1/2}``; chains start dispersed-but-locally around ``K*``
(:func:`~scotgm_pp.inference._har_directions.local_starts`).  :func:`sample_coupling` can also
sample only the leading ``r`` singular directions of ``G`` and fix the rest at ``K*`` (its
``max_rank``; the default, for speed, see its Notes).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg

from ._har_chain import BallState as _BallState  # noqa: F401  (re-exported for step.py and tests)
from ._har_chain import ChainOutput, run_chain
from ._har_directions import DirectionMixture, local_starts
from ._har_kernel import INTERIOR as _INTERIOR  # noqa: F401
from ._har_kernel import truncated_exponential_inv as _truncated_exponential
from .ot import psd_sqrt

__all__ = [
    "CouplingGeometry",
    "ChainOutput",
    "CouplingResult",
    "DirectionMixture",
    "chord",
    "coupling_geometry",
    "covariance_estimation_noise",
    "default_temperature",
    "effective_dimension",
    "run_chain",
    "sample_coupling",
    "truncated_exponential",
]

DEFAULT_MAX_RANK = 6  # sampled plan block r x r (see sample_coupling, Notes)
STEPS_PER_DIM = 300  # default kept steps per chain: STEPS_PER_DIM * r^2
RHAT_WARN = 1.05
ESS_WARN = 100.0


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
    return _truncated_exponential(rate, lo, hi, 1.0 - rng.random())


# --------------------------------------------------------------------------------------------
# Temperature
# --------------------------------------------------------------------------------------------
def effective_dimension(m: int) -> float:
    """Number of "directions" of the plan set near the optimum: ``m(m+1)/2 + m(m-1)/4``.

    Near an orthogonal ``K*`` the ball is a cone in the ``m(m+1)/2`` symmetric directions and a
    paraboloid in the ``m(m-1)/2`` skew ones, so at small ``eps`` the excess cost
    ``c(K) - W2^2`` is ``Gamma(effective_dimension(m), eps)``: mean ``d_eff * eps``.
    """
    return m * (m + 1) / 2.0 + m * (m - 1) / 4.0


def _bures_second_order(S: np.ndarray) -> float:
    lam = np.clip(np.linalg.eigvalsh(S), 0.0, None)
    num = np.outer(lam, lam) * (1.0 + np.eye(lam.size))
    den = 2.0 * (lam[:, None] + lam[None, :])
    return float(np.sum(np.divide(num, den, out=np.zeros_like(num), where=den > 0)))


def covariance_estimation_noise(Sx, Sy, n_x: int, n_y: int) -> float:
    """Approximate standard error of the plug-in ``W2^2`` from ``n_x`` and ``n_y`` Gaussian cells.

    First order (delta method with Wishart fluctuations,
    ``Var <A, S_hat> = 2 tr(A S A S) / n``): the gradients of the Bures term are ``I - T`` and
    ``I - T^{-1}`` (``T`` the Monge map), giving, inverse-free,
    ``2 ||Sx - (Sx^{1/2} Sy Sx^{1/2})^{1/2}||_F^2 / n_x`` and the same with ``x, y`` swapped.
    This vanishes when ``Sx = Sy``; the second-order term, the expected plug-in ``W2^2`` of two
    samples of one population, ``sum_ij l_i l_j (1 + delta_ij) / (2 (l_i + l_j)) / n`` over the
    eigenvalues ``l``, is added in quadrature.
    """
    Sx = _as_covariance(Sx, "Sx")
    Sy = _as_covariance(Sy, "Sy")
    if n_x < 2 or n_y < 2:
        raise ValueError(f"n_x and n_y must be at least 2 cells, got {n_x} and {n_y}.")
    Lx, Ly = psd_sqrt(Sx), psd_sqrt(Sy)
    var1 = 2.0 * np.sum((Sx - psd_sqrt(Lx @ Sy @ Lx)) ** 2) / n_x
    var1 += 2.0 * np.sum((Sy - psd_sqrt(Ly @ Sx @ Ly)) ** 2) / n_y
    bias2 = _bures_second_order(Sx) / n_x + _bures_second_order(Sy) / n_y
    return float(np.sqrt(var1 + bias2**2))


def default_temperature(Sx, Sy, *, n_x: int | None = None, n_y: int | None = None, rel_excess: float = 0.01) -> float:
    """Default ``eps``: typical plans cost as much more than ``W2^2`` as the data can tell apart.

    Under ``pi_eps`` the mean excess cost over the optimum is ``effective_dimension(m) * eps``
    (see :func:`effective_dimension`).  The temperature is set so that this excess equals

    * the standard error of ``W2^2`` implied by estimating ``Sx`` and ``Sy`` from ``n_x`` and
      ``n_y`` cells (:func:`covariance_estimation_noise`) when the cell counts are given: a plan
      whose expected cost exceeds the optimum by less than that noise is as plausible as the
      optimum itself;
    * otherwise ``rel_excess`` (1%) of the gap ``2 sum(s)`` between the independent and the
      optimal coupling.  Measured at ``m = 10`` (full plan, converged chains): the
      posterior-mean ``C`` is then ~1% (relative Frobenius) from the OT cross-covariance.  With
      the adapted directions of :func:`sample_coupling` the mixing time in steps does not
      depend on the temperature (see its Notes).

    The result is floored at ``1e-6`` times the gap (a numerical floor, so that equal
    covariances estimated from very many cells still give a positive temperature).
    """
    geom = coupling_geometry(Sx, Sy)
    gap = 2.0 * float(geom.singular_values.sum())
    if gap <= 0.0:
        raise ValueError("Sx or Sy is zero: every coupling has the same cost; no temperature is needed.")
    if (n_x is None) != (n_y is None):
        raise ValueError("give both n_x and n_y (cell counts of source and target) or neither.")
    excess = rel_excess * gap if n_x is None else covariance_estimation_noise(Sx, Sy, n_x, n_y)
    return max(excess, 1e-6 * gap) / effective_dimension(geom.m)


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------
@dataclass
class CouplingResult:
    """Result of :func:`sample_coupling`.

    Attributes
    ----------
    cross_covariance
        Posterior mean of ``C = Lx K Ly`` (average over all post-burn-in steps of all chains).
    K_mean
        Posterior mean of ``K``.
    cost_draws
        ``(n_chains, n_draws)`` expected transport costs ``c(K)`` at the recorded steps.
    temperature
        ``eps`` used.
    rhat, ess
        ArviZ rank-normalised split R-hat and bulk ESS of the transport cost.
    w2_squared
        The minimum cost (closed form), for reference.
    idata
        ``arviz.InferenceData`` with ``posterior.transport_cost`` (and ``cross_covariance`` when
        ``store_cross_covariance=True``), ``sample_stats`` per chain and the settings in ``attrs``;
        ``None`` if ``return_idata=False``.
    step_stats
        Per-chain means: ``chord_length``, ``abs_step``; ``acceptance_rate`` (1: every move is an
        exact draw on its chord); ``n_reprojections``; ``max_refresh_drift``.
    sampled_rank
        ``r``: the plan was sampled in the leading ``r`` singular directions of ``G`` and fixed at
        the OT plan in the others (``r = m``: no reduction).
    """

    cross_covariance: np.ndarray
    K_mean: np.ndarray
    cost_draws: np.ndarray
    temperature: float
    rhat: float
    ess: float
    w2_squared: float
    idata: object | None = None
    step_stats: dict = field(default_factory=dict)
    sampled_rank: int | None = None


def _check_positive_int(value, name: str, minimum: int = 1) -> int:
    if int(value) != value or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def sample_coupling(
    Sx,
    Sy,
    *,
    mu_x=None,
    mu_y=None,
    temperature: float | None = None,
    n_x: int | None = None,
    n_y: int | None = None,
    n_steps: int | None = None,
    n_chains: int = 4,
    burn_in: int | None = None,
    thin: int | None = None,
    random_state: int | np.random.Generator | None = 0,
    max_rank: int | None = DEFAULT_MAX_RANK,
    directions: str = "adapted",
    start: str = "local",
    anneal_factor: float = 1.0,
    initial_plans: list[np.ndarray] | None = None,
    refresh_every: int = 100,
    store_cross_covariance: bool = False,
    return_idata: bool = True,
) -> CouplingResult:
    """Sample Gaussian transport plans from ``pi_eps(K) ~ exp(-c(K) / eps)`` by exact Hit-and-Run.

    Parameters
    ----------
    Sx, Sy
        Source (basal) and target (perturbed) covariances, ``(m, m)``, symmetric PSD.
    mu_x, mu_y
        Means (they shift every cost by ``|mu_y - mu_x|^2``); zero if omitted.
    temperature
        ``eps > 0``.  Default :func:`default_temperature` (using ``n_x``, ``n_y`` if given).
        ``eps -> 0`` concentrates on the OT plan, ``eps -> inf`` is uniform on the ball
        (mean ``C = 0``, the independent coupling).
    n_x, n_y
        Numbers of cells behind ``Sx`` and ``Sy``; only used for the default temperature.
    n_steps
        Hit-and-Run steps kept per chain (default ``STEPS_PER_DIM * r^2``, ``r = min(m, max_rank)``,
        at least 5,000; 10,800 at the default ``r = 6``: see Notes).
    n_chains
        Independent chains (R-hat needs at least 2).
    burn_in
        Steps discarded per chain (default ``n_steps // 4``: the local starts need little).
    thin
        Record every ``thin``-th step for ``cost_draws`` (default: about 1000 draws per chain).
        ``cross_covariance`` averages every kept step regardless.
    random_state
        Seed or generator; all randomness comes from ``np.random.default_rng(random_state)``.
    max_rank
        Sample the plan only in the ``r = min(m, max_rank)`` leading singular directions of
        ``G = Sx^{1/2} Sy^{1/2}`` (those that carry most of the transport), fixing the rest at the
        OT plan: ``K = Q diag(J_r, I) P^T`` with ``J_r`` exactly Hit-and-Run sampled from
        ``pi_eps`` restricted to that slice (an ``r x r`` problem of the same form with the leading
        singular values).  ``None``: the full ``m x m`` plan.  The default keeps a call within
        ~3 s for ``m <= 100`` (see Notes); for ``m <= max_rank`` nothing is reduced.
    directions
        ``"adapted"`` (default) or ``"isotropic"`` (see :func:`run_chain`).
    start
        ``"local"`` (default): dispersed-but-local starts around the OT plan
        (:func:`~scotgm_pp.inference._har_directions.local_starts`, overdispersed in the cost);
        ``"dispersed"``: ``lam K* + (1 - |lam|) R`` with ``lam`` from ``-0.9`` to ``0.9`` (far
        starts, for stress tests; they need annealing and ~1e5 steps at ``m = 10``).
    anneal_factor
        Starting temperature of the burn-in relative to ``temperature`` (geometric cooling over
        80% of the burn-in; ``1``: none).
    initial_plans
        One start ``K`` per chain (each ``(m, m)``, ``||K||_2 < 1``) instead of ``start``; with a
        reduction, only its leading ``r x r`` block in the SVD frame is used.
    refresh_every
        Steps between exact SVD refreshes of the low-rank-updated inverses.
    store_cross_covariance
        Keep the recorded ``C`` draws in ``idata`` (memory ``n_chains * n_draws * m^2``).
    return_idata
        Build the ``InferenceData``.

    Returns
    -------
    CouplingResult

    Warns
    -----
    RuntimeWarning
        If the transport-cost R-hat exceeds ``RHAT_WARN`` (1.05) or its bulk ESS is below
        ``ESS_WARN`` (100): the chains genuinely disagree or too few independent draws exist.
        (R-hat's own sampling noise at ESS ~ 200-400 is about 0.01, so 1.01 would cry wolf.)

    Notes
    -----
    Why mixing was slow, and what is done about it: see the module docstring.  In the SVD frame
    the target near the optimum is a fixed shape scaled by ``eps`` (symmetric part) and
    ``sqrt(eps)`` (skew part), so with the adapted directions the mixing time in steps no
    longer grows as ``eps`` shrinks; it grows with the number of coordinates: the transport
    cost's integrated autocorrelation is ~``8 r^2`` to ``10 r^2`` steps (measured at
    ``r = 6``-``10``), against ``>= 5000`` steps at ``m = 10`` for the isotropic kernel.  A step
    costs ``O(r^2)``, but near the boundary ``M(K)^{-1}`` has condition up to ~``1e6`` and the
    round-off control recomputes it (``O(r^3)``, Cholesky-based) at many steps.  Measured
    (``benchmarks/bench_hit_and_run.py``, one core, 4 chains, defaults ``r = 6``,
    ``n_steps = 300 r^2 = 10,800``, ``burn_in = n_steps / 4``, ``n_x = n_y = 300``): 0.4-1.1 s for
    ``m = 10``-``100`` (2.4-4.6 s on a heavily shared machine), transport-cost R-hat
    1.006-1.028, bulk ESS 150-250.  ``r = 10`` with ``n_steps = 30,000`` takes 2.6-4.9 s for ESS
    85-150: worse per second.  The full plan at ``m = 10`` (``n_steps = 40,000``) reaches R-hat
    1.011, ESS 211 in 1.6 s (isotropic kernel: R-hat 1.27, ESS 11); at ``m = 20`` it has not
    converged in 50,000 steps per chain (R-hat 1.35): beyond the budget.
    What the reduction gives up: the trailing ``m - r`` directions (smallest singular
    values of ``G``) are fixed at the OT plan, so ``cross_covariance`` equals the OT one there
    and ``cost_draws`` lack their spread (the mean excess over ``W2^2`` is
    ``effective_dimension(r) * eps`` rather than ``effective_dimension(m) * eps``); the
    temperature is unchanged.  Pass ``max_rank=None`` (and larger ``n_steps``) for the full plan.
    """
    geom = coupling_geometry(Sx, Sy, mu_x, mu_y)
    m = geom.m
    if temperature is None:
        temperature = default_temperature(Sx, Sy, n_x=n_x, n_y=n_y)
    temperature = float(temperature)
    if not (np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}.")
    r = m if max_rank is None else min(m, _check_positive_int(max_rank, "max_rank"))
    n_steps = _check_positive_int(max(5_000, STEPS_PER_DIM * r * r) if n_steps is None else n_steps, "n_steps")
    burn_in = _check_positive_int(n_steps // 4 if burn_in is None else burn_in, "burn_in", 0)
    if not (np.isfinite(anneal_factor) and anneal_factor >= 1.0):
        raise ValueError(f"anneal_factor must be a finite number >= 1, got {anneal_factor}.")
    thin = _check_positive_int(max(1, n_steps // 1000) if thin is None else thin, "thin")
    n_chains = _check_positive_int(n_chains, "n_chains")
    refresh_every = _check_positive_int(refresh_every, "refresh_every")
    if n_steps < thin:
        raise ValueError(f"n_steps ({n_steps}) must be at least thin ({thin}).")
    if directions not in ("adapted", "isotropic"):
        raise ValueError(f"unknown directions {directions!r}; choose 'adapted' or 'isotropic'.")

    # work in the SVD frame: K = Q J Pt, target exp(2 <J, diag(s)> / eps); J = diag(J_r, I)
    s_r = geom.singular_values[:r]
    G_r = np.diag(s_r)
    rng = np.random.default_rng(random_state)
    match start:
        case "local":
            starts = local_starts(s_r, temperature, n_chains, rng)
        case "dispersed":
            starts = _dispersed_starts(np.eye(r), n_chains, rng)
        case _:
            raise ValueError(f"unknown start {start!r}; choose 'local' or 'dispersed'.")
    if initial_plans is not None:
        starts = [(geom.Q.T @ K0 @ geom.Pt.T)[:r, :r]
                  for K0 in _check_initial_plans(initial_plans, n_chains, m)]
    chain_rngs = rng.spawn(n_chains)
    outs = [
        run_chain(G_r, temperature, J0, n_steps=n_steps, burn_in=burn_in, thin=thin, rng=rg,
                  refresh_every=refresh_every, store_draws=store_cross_covariance,
                  anneal_from=anneal_factor * temperature, directions=directions)
        for J0, rg in zip(starts, chain_rngs)
    ]
    fixed = float(geom.singular_values[r:].sum())  # <J, diag(s)> of the fixed identity block
    cost_draws = geom.cost(np.stack([o.inner_draws for o in outs]) + fixed)
    K_mean = _to_plan(geom, np.mean([o.K_mean for o in outs], axis=0))
    if store_cross_covariance:
        for o in outs:
            o.K_draws = np.stack([_to_plan(geom, J) for J in o.K_draws])
    step_stats = {
        "acceptance_rate": 1.0,
        "chord_length": np.array([o.mean_chord_length for o in outs]),
        "abs_step": np.array([o.mean_abs_step for o in outs]),
        "n_reprojections": np.array([o.n_reprojections for o in outs]),
        "max_refresh_drift": np.array([o.max_refresh_drift for o in outs]),
    }
    return _assemble_result(geom, outs, cost_draws, K_mean, temperature, step_stats, return_idata,
                            settings=dict(n_steps=n_steps, burn_in=burn_in, thin=thin, n_chains=n_chains,
                                          anneal_factor=anneal_factor, sampled_rank=r,
                                          directions=directions, start=start))


def _to_plan(geom: CouplingGeometry, J_r: np.ndarray) -> np.ndarray:
    """``K = Q diag(J_r, I) Pt`` from the sampled leading block ``J_r``."""
    r = J_r.shape[0]
    J = np.eye(geom.m)
    J[:r, :r] = J_r
    return geom.Q @ J @ geom.Pt


def _dispersed_starts(K_star: np.ndarray, n_chains: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Starts ``lam K* + (1 - |lam|) R`` with ``lam`` evenly spread in ``[-0.9, 0.9]``, ``||R||_2 = 0.5``."""
    m = K_star.shape[0]
    lams = np.linspace(-0.9, 0.9, n_chains) if n_chains > 1 else np.zeros(1)
    starts = []
    for lam in lams:
        R = rng.standard_normal((m, m))
        R *= 0.5 / np.linalg.norm(R, 2)
        starts.append(lam * K_star + (1.0 - abs(lam)) * R)
    return starts


def _check_initial_plans(initial_plans, n_chains: int, m: int) -> list[np.ndarray]:
    if len(initial_plans) != n_chains:
        raise ValueError(f"initial_plans has {len(initial_plans)} entries but n_chains is {n_chains}.")
    starts = []
    for i, K0 in enumerate(initial_plans):
        K0 = np.asarray(K0, dtype=float)
        if K0.shape != (m, m) or not np.all(np.isfinite(K0)):
            raise ValueError(f"initial_plans[{i}] must be a finite ({m}, {m}) matrix, got shape {K0.shape}.")
        if np.linalg.norm(K0, 2) >= 1.0:
            raise ValueError(f"initial_plans[{i}] must lie strictly inside the unit spectral-norm ball.")
        starts.append(K0)
    return starts


def _assemble_result(geom, outs, cost_draws, K_mean, temperature, step_stats, return_idata, settings):
    import arviz as az

    rhat = float(az.rhat(cost_draws)) if cost_draws.shape[0] > 1 else float("nan")
    ess = float(az.ess(cost_draws))
    if rhat > RHAT_WARN or ess < ESS_WARN:  # rhat is nan with one chain: only the ESS is checked
        warnings.warn(
            f"Hit-and-Run chains have not converged (transport-cost R-hat {rhat:.3f}, ESS {ess:.0f}); "
            "increase n_steps and burn_in (the cost's autocorrelation is ~10 r^2 steps for an r x r "
            "sampled plan) or lower max_rank.",
            RuntimeWarning,
            stacklevel=3,
        )
    idata = None
    if return_idata:
        posterior = {"transport_cost": cost_draws}
        if outs[0].K_draws is not None:
            posterior["cross_covariance"] = np.stack(
                [np.einsum("ij,djk,kl->dil", geom.Lx, o.K_draws, geom.Ly) for o in outs]
            )
        sample_stats = {k: np.broadcast_to(v[:, None], cost_draws.shape).copy()
                        for k, v in step_stats.items() if isinstance(v, np.ndarray)}
        idata = az.from_dict(
            posterior=posterior,
            sample_stats=sample_stats,
            dims={"cross_covariance": ["pc", "pc_target"]},
            attrs={"temperature": temperature, "w2_squared": geom.w2_squared,
                   "sampler": "scotgm_pp.hit_and_run", **settings},
        )
    return CouplingResult(
        cross_covariance=geom.cross_covariance(K_mean),
        K_mean=K_mean,
        cost_draws=cost_draws,
        temperature=temperature,
        rhat=rhat,
        ess=ess,
        w2_squared=geom.w2_squared,
        idata=idata,
        step_stats=step_stats,
        sampled_rank=settings.get("sampled_rank"),
    )

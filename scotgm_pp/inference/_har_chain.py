"""One Hit-and-Run chain on ``pi(K) ~ exp(2 <K, G> / eps)``, ``||K||_2 <= 1`` (driver of the compiled kernel)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_limits

from . import _har_kernel as hk
from ._har_directions import DirectionMixture

__all__ = ["ChainOutput", "run_chain", "BallState"]

_BLOCK = 4096  # moves per compiled call (directions and uniforms are drawn per block)


class BallState:
    """``K`` and ``M(K)^{-1} = [[A, -E], [-E^T, B]]`` kept current by low-rank updates.

    ``A = (I - K K^T)^{-1}``, ``B = (I - K^T K)^{-1}``, ``E = A K``; recomputed exactly on demand
    and whenever the running round-off bound exceeds ``tol``
    (``4.4e-16 ||M^{-1}||_F sum ||update||_F``, see :func:`scotgm_pp.inference._har_kernel.move`).
    Near the boundary ``||M^{-1}||`` reaches ~1e6, so at low temperature most steps end with a
    refresh (O(m^3), Cholesky-based); the drift measured at the periodic refreshes
    (``max_refresh_drift``) stays ~1e-6 relative or below with ``tol = 1e-6``.
    """

    def __init__(self, K: np.ndarray, tol: float = 1e-6):
        self.K = np.array(K, dtype=float, order="C")
        self.m = self.K.shape[0]
        self.tol = float(tol)
        self.Minv = np.empty((2 * self.m, 2 * self.m))
        self.acc = np.zeros(hk.N_ACC)
        hk.refresh(self.K, self.Minv, self.acc, False)

    @property
    def n_exact_refreshes(self) -> int:
        return int(self.acc[hk.N_EXACT])

    @property
    def n_reprojections(self) -> int:
        return int(self.acc[hk.N_REPROJ])

    @property
    def max_drift(self) -> float:
        return float(self.acc[hk.DRIFT])

    def materialise(self) -> np.ndarray:
        """The current ``K`` (kept up to date by every move)."""
        return self.K

    def refresh(self, measure: bool = True) -> None:
        """Recompute ``M(K)^{-1}`` exactly (recording the drift of the updated one if ``measure``)."""
        hk.refresh(self.K, self.Minv, self.acc, measure)

    def move(self, U: np.ndarray, V: np.ndarray, rank: int, rate: float, v_unif: float) -> tuple[float, float, float]:
        """Exact move along ``sum_{l < rank} U[l] V[l]^T`` (``U``, ``V`` of shape ``(2, m)``)."""
        return hk.move(self.K, self.Minv, np.ascontiguousarray(U, dtype=float),
                       np.ascontiguousarray(V, dtype=float), int(rank), float(rate), float(v_unif),
                       self.acc, self.tol)

    def step(self, u: np.ndarray, v: np.ndarray, rate: float, v_unif: float) -> tuple[float, float, float]:
        """One exact Hit-and-Run move along ``u v^T``; returns ``(t, t_lo, t_hi)``."""
        U = np.zeros((2, self.m))
        V = np.zeros((2, self.m))
        U[0], V[0] = u, v
        return self.move(U, V, 1, rate, v_unif)


@dataclass
class ChainOutput:
    """Raw output of :func:`run_chain` (one chain)."""

    inner_draws: np.ndarray  # <K, G> at the recorded steps
    K_mean: np.ndarray  # average of K over every post-burn-in step
    K_draws: np.ndarray | None  # recorded K, shape (n_draws, m, m), if asked for
    K_last: np.ndarray
    mean_chord_length: float
    mean_abs_step: float
    n_reprojections: int
    max_refresh_drift: float


def temperatures(steps: np.ndarray, temperature: float, burn_in: int, anneal_from: float | None) -> np.ndarray:
    """Per-step temperature: geometric cooling over the first 80% of the burn-in, then constant."""
    if anneal_from is None or anneal_from <= temperature or burn_in == 0:
        return np.full(steps.shape, temperature)
    frac = np.clip(1.0 - steps / (0.8 * burn_in), 0.0, 1.0)
    return temperature * (anneal_from / temperature) ** frac


def run_chain(
    G: np.ndarray,
    temperature: float,
    K0: np.ndarray,
    *,
    n_steps: int,
    burn_in: int,
    thin: int,
    rng: np.random.Generator,
    refresh_every: int = 100,
    store_draws: bool = False,
    anneal_from: float | None = None,
    directions: str | DirectionMixture = "adapted",
) -> ChainOutput:
    """Run one Hit-and-Run chain on ``pi(K) ~ exp(2 <K, G> / temperature)``, ``||K||_2 <= 1``.

    Parameters
    ----------
    G
        ``Lx Ly``, shape ``(m, m)``.
    temperature
        ``eps > 0``.
    K0
        Start, strictly inside the ball.
    n_steps, burn_in, thin
        Steps kept after ``burn_in`` discarded steps; every ``thin``-th kept step is recorded.
    rng
        The chain's generator (all directions and uniforms come from it).
    refresh_every
        Recompute the inverse blocks from an SVD every this many steps (controls round-off drift).
    store_draws
        Also return the recorded ``K`` matrices.
    anneal_from
        If given (and above ``temperature``), the burn-in cools geometrically from this
        temperature to ``temperature`` over its first 80%.  Kept steps always use ``temperature``.
    directions
        ``"adapted"`` (default: the mixture of
        :class:`~scotgm_pp.inference._har_directions.DirectionMixture` fixed from ``G``),
        ``"isotropic"`` (rank-one ``u v^T``, ``u``, ``v`` uniform on the sphere: the original
        kernel), or a ``DirectionMixture``.

    Returns
    -------
    ChainOutput
    """
    G = np.asarray(G, dtype=float)
    m = G.shape[0]
    if isinstance(directions, str):
        match directions:
            case "adapted":
                directions = DirectionMixture(G)
            case "isotropic":
                directions = DirectionMixture(G, weights=(1.0, 0.0, 0.0), whiten=0.0)
            case _:
                raise ValueError(f"unknown directions {directions!r}; choose 'adapted' or 'isotropic'.")
    state = BallState(K0)
    acc = state.acc
    acc[hk.INNER] = float(np.sum(state.K * G))
    n_total = burn_in + n_steps
    n_draws = n_steps // thin
    inner_draws = np.empty(n_draws)
    K_draws = np.empty((n_draws, m, m)) if store_draws else np.empty((0, m, m))
    K_sum = np.zeros((m, m))
    with threadpool_limits(limits=1, user_api="blas"):  # m x m BLAS calls are too small to thread
        for start in range(0, n_total, _BLOCK):
            size = min(_BLOCK, n_total - start)
            U, V, ranks, slopes = directions.draw(size, rng)
            unifs = 1.0 - rng.random(size)
            rates = (2.0 / temperatures(np.arange(start, start + size), temperature, burn_in, anneal_from)) * slopes
            hk.run_block(state.K, state.Minv, U, V, ranks, slopes, rates, unifs, start, burn_in, thin,
                         refresh_every, state.tol, acc, K_sum, inner_draws, K_draws, store_draws)
    n = max(n_steps, 1)
    return ChainOutput(
        inner_draws=inner_draws,
        K_mean=K_sum / n,
        K_draws=K_draws if store_draws else None,
        K_last=state.K.copy(),
        mean_chord_length=float(acc[hk.CHORD_SUM]) / n,
        mean_abs_step=float(acc[hk.STEP_SUM]) / n,
        n_reprojections=state.n_reprojections,
        max_refresh_drift=state.max_drift,
    )

"""One chain on ``pi(J) ~ exp(2 <J, diag(s)> / eps)``, ``||J||_2 <= 1`` (driver of the compiled sweep).

The chain works in the SVD frame of ``G = Q diag(s) P^T`` (``K = Q J P^T``), where the optimum
is ``J = I`` and the log-density only reads the diagonal of ``J``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_limits

from . import _har_kernel as hk
from . import _har_sweep as hs
from ._har_cache import enable_kernel_cache
from ._har_rotations import COLS, CONJ, ROWS, TWIST

__all__ = ["BallState", "ChainOutput", "SweepMoves", "run_chain"]

ANNEAL_FRACTION = 0.6  # share of the burn-in that cools from anneal_from to the target temperature
ANNEAL_STAGES = 20
LINE_TOL = 0.1  # round-off bound that triggers an exact refresh in a line move (a safety net, see line_move)
_FAMILY_CODES = {"rows": ROWS, "cols": COLS, "conj": CONJ, "twist": TWIST}


@dataclass(frozen=True)
class SweepMoves:
    """Which exact moves one sweep (one step of the chain) makes; see :mod:`scotgm_pp.inference._har_sweep`.

    Attributes
    ----------
    rotations
        Rotation-orbit families drawn in every plane ``(i, j)``: any of ``"rows"`` (``J -> R J``),
        ``"cols"`` (``J -> J R^T``), ``"conj"`` (``J -> R J R^T``), ``"twist"`` (``J -> R J R``).
    coordinate
        ``m`` Hit-and-Run line moves along ``e_k e_k^T``.
    n_isotropic
        Hit-and-Run line moves along ``u v^T`` with ``u``, ``v`` uniform on the sphere.
    breathing
        The breathing move (rescaling of the symmetric polar factor about the identity).
    singular
        One slice-sampling update of each signed singular value in the plan's own SVD frame.

    The default: rotations ``conj`` and ``twist`` in every plane, 2 isotropic line moves, the
    breathing move and the singular-value updates (the ``m`` coordinate line moves mix the
    spectrum as well per step but cost ``O(m^3)`` more: ~1.4x the time per step at ``m = 30``-``50``).
    ``SweepMoves(rotations=(), n_isotropic=k, breathing=False, singular=False)`` is plain isotropic
    rank-one Hit-and-Run, ``k`` moves per step.
    """

    rotations: tuple[str, ...] = ("conj", "twist")
    coordinate: bool = False
    n_isotropic: int = 2
    breathing: bool = True
    singular: bool = True

    def __post_init__(self):
        bad = [f for f in self.rotations if f not in _FAMILY_CODES]
        if bad:
            raise ValueError(f"unknown rotation families {bad}; choose from {sorted(_FAMILY_CODES)}.")
        if int(self.n_isotropic) != self.n_isotropic or self.n_isotropic < 0:
            raise ValueError(f"n_isotropic must be a non-negative integer, got {self.n_isotropic!r}.")
        if self.n_isotropic == 0 and not self.coordinate and not self.singular:
            raise ValueError("a sweep needs line moves (coordinate or n_isotropic > 0) or singular-value "
                             "updates: rotations and breathing alone never change the sign of det(K).")

    @property
    def family_codes(self) -> np.ndarray:
        return np.array([_FAMILY_CODES[f] for f in self.rotations], dtype=np.int64)

    def line_moves(self, m: int) -> int:
        """Hit-and-Run line moves per sweep."""
        return (m if self.coordinate else 0) + int(self.n_isotropic)


class BallState:
    """``J`` and ``M(J)^{-1} = [[A, -E], [-E^T, B]]`` for the Hit-and-Run line moves.

    ``A = (I - J J^T)^{-1}``, ``B = (I - J^T J)^{-1}``, ``E = A J``: recomputed exactly before the
    line moves of every sweep, updated by Woodbury in each line move (and recomputed when the
    running round-off bound exceeds ``tol``), and recomputed at the end of :meth:`run`.
    """

    def __init__(self, J: np.ndarray, tol: float | None = None):
        enable_kernel_cache()
        self.K = np.array(J, dtype=float, order="C")
        self.m = self.K.shape[0]
        self.tol = float(LINE_TOL if tol is None else tol)
        self.Minv = np.empty((2 * self.m, 2 * self.m))
        self.acc = np.zeros(hs.N_ACC)
        hk.refresh(self.K, self.Minv, self.acc)
        iu = np.triu_indices(self.m, 1)
        self._pairs = (iu[0].astype(np.int64), iu[1].astype(np.int64))

    @property
    def n_exact_refreshes(self) -> int:
        return int(self.acc[hk.N_EXACT])

    @property
    def n_reprojections(self) -> int:
        return int(self.acc[hk.N_REPROJ])

    def materialise(self) -> np.ndarray:
        """The current ``J`` (kept up to date by every move)."""
        return self.K

    def refresh(self) -> None:
        """Recompute ``M(J)^{-1}`` exactly."""
        hk.refresh(self.K, self.Minv, self.acc)

    def step(self, u: np.ndarray, v: np.ndarray, rate: float, v_unif: float) -> tuple[float, float, float]:
        """One exact Hit-and-Run line move along ``u v^T``; returns ``(t, t_lo, t_hi)``."""
        return hk.line_move(self.K, self.Minv, np.ascontiguousarray(u, dtype=float),
                            np.ascontiguousarray(v, dtype=float), float(rate), float(v_unif), self.acc, self.tol)

    def run(self, s: np.ndarray, beta: float, moves: SweepMoves, rng: np.random.Generator, n_sweeps: int, *,
            burn_in: int = 0, thin: int = 1, J_sum=None, inner_draws=None, J_draws=None) -> None:
        """``burn_in`` unrecorded sweeps, then ``n_sweeps`` kept ones (added to ``J_sum``, every
        ``thin``-th written to ``inner_draws`` and ``J_draws``); without record arrays, ``n_sweeps``
        sweeps and nothing recorded."""
        m = self.m
        if inner_draws is None:
            burn_in, n_sweeps = n_sweeps, 0
            J_sum, inner_draws, J_draws = np.zeros((m, m)), np.empty(0), np.empty((0, m, m))
        store = J_draws.shape[0] > 0
        self.acc[hk.INNER] = float(np.dot(s, np.diag(self.K)))
        with threadpool_limits(limits=1, user_api="blas"):  # m x m BLAS calls are too small to thread
            hs.run_sweeps(self.K, self.Minv, np.ascontiguousarray(s, dtype=float), float(beta), moves.family_codes,
                          bool(moves.coordinate), int(moves.n_isotropic), bool(moves.breathing),
                          bool(moves.singular), self._pairs[0],
                          self._pairs[1], rng, self.acc, self.tol, int(burn_in), int(n_sweeps), int(thin), J_sum,
                          inner_draws, J_draws, store)
            hk.refresh(self.K, self.Minv, self.acc)


def _cooling_schedule(temperature: float, anneal_from: float | None, burn_in: int) -> list[tuple[float, int]]:
    """``(temperature, sweeps)`` stages of the annealed part of the burn-in (empty: no annealing)."""
    n_anneal = int(ANNEAL_FRACTION * burn_in)
    if anneal_from is None or anneal_from <= temperature or n_anneal < ANNEAL_STAGES:
        return []
    temps = np.geomspace(anneal_from, temperature, ANNEAL_STAGES + 1)[:-1]
    sizes = np.diff(np.linspace(0, n_anneal, ANNEAL_STAGES + 1).round().astype(int))
    return [(float(e), int(n)) for e, n in zip(temps, sizes) if n > 0]


@dataclass
class ChainOutput:
    """Raw output of :func:`run_chain` (one chain, SVD frame)."""

    inner_draws: np.ndarray  # <J, diag(s)> at the recorded sweeps
    J_mean: np.ndarray  # average of J over every kept sweep
    J_draws: np.ndarray | None  # recorded J, shape (n_draws, m, m), if asked for
    J_last: np.ndarray
    mean_chord_length: float  # over the line moves of the kept sweeps
    mean_abs_step: float
    n_exact_refreshes: int
    n_reprojections: int
    seconds: float


def run_chain(
    s: np.ndarray,
    temperature: float,
    J0: np.ndarray,
    *,
    n_steps: int,
    burn_in: int,
    thin: int,
    rng: np.random.Generator,
    moves: SweepMoves | None = None,
    store_draws: bool = False,
    anneal_from: float | None = None,
) -> ChainOutput:
    """Run one chain on ``pi(J) ~ exp(2 <J, diag(s)> / temperature)``, ``||J||_2 <= 1``.

    Parameters
    ----------
    s
        Singular values of ``G`` (the target in its SVD frame), shape ``(m,)``.
    temperature
        ``eps > 0``.
    J0
        Start, strictly inside the ball, shape ``(m, m)``.
    n_steps, burn_in, thin
        Kept sweeps after ``burn_in`` discarded ones; every ``thin``-th kept sweep is recorded
        (``n_steps // thin`` draws).
    rng
        The chain's generator (every random number of every move comes from it).
    moves
        The moves of a sweep (default :class:`SweepMoves`).
    store_draws
        Also return the recorded ``J`` matrices.
    anneal_from
        If given (and above ``temperature``), the first ``ANNEAL_FRACTION`` (60%) of the burn-in
        cools geometrically from this temperature to ``temperature``, in ``ANNEAL_STAGES`` stages;
        the rest of the burn-in and every kept step use ``temperature``.

    Returns
    -------
    ChainOutput
    """
    moves = SweepMoves() if moves is None else moves
    s = np.asarray(s, dtype=float)
    m = s.size
    state = BallState(J0)
    n_draws = n_steps // thin
    inner_draws = np.empty(n_draws)
    J_draws = np.empty((n_draws if store_draws else 0, m, m))
    J_sum = np.zeros((m, m))
    t0 = time.perf_counter()
    cooling = _cooling_schedule(temperature, anneal_from, burn_in)
    for eps_k, n_k in cooling:
        state.run(s, 2.0 / eps_k, moves, rng, n_k)
    state.run(s, 2.0 / temperature, moves, rng, n_steps, burn_in=burn_in - sum(n for _, n in cooling), thin=thin,
              J_sum=J_sum, inner_draws=inner_draws, J_draws=J_draws)
    seconds = time.perf_counter() - t0
    n_line = max(float(state.acc[hs.N_LINE]), 1.0)
    return ChainOutput(
        inner_draws=inner_draws,
        J_mean=J_sum / max(n_steps, 1),
        J_draws=J_draws if store_draws else None,
        J_last=state.K.copy(),
        mean_chord_length=float(state.acc[hk.CHORD_SUM]) / n_line,
        mean_abs_step=float(state.acc[hk.STEP_SUM]) / n_line,
        n_exact_refreshes=state.n_exact_refreshes,
        n_reprojections=state.n_reprojections,
        seconds=seconds,
    )

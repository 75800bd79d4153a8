"""Sampling Gaussian transport plans from ``pi_eps(K) ~ exp(-c(K) / eps)`` (sc-OTGM, Algorithm 1 done exactly).

Every Gaussian coupling of ``N(mu_x, Sx)`` and ``N(mu_y, Sy)`` has cross-covariance ``C = Lx K Ly``
(symmetric square roots ``Lx = Sx^{1/2}``, ``Ly = Sy^{1/2}``) with ``K`` in the unit ball of the
spectral norm, ``{K : ||K||_2 <= 1}``.  Its expected squared cost is

    c(K) = |mu_y - mu_x|^2 + tr Sx + tr Sy - 2 <K, G>,    G = Lx Ly,

so ``pi_eps`` is log-linear on a convex body.  :func:`sample_coupling` samples the full
``m x m`` plan (every entry of ``K``) with a Markov chain whose every move leaves ``pi_eps``
exactly invariant.  In the SVD frame ``G = Q diag(s) P^T``, ``K = Q J P^T``, one step of the
chain is a sweep (:mod:`scotgm_pp.inference._har_sweep`) of

* exact draws on rotation orbits ``J -> R J R'`` in every coordinate plane (group moves, Liu &
  Sabatti 2000; the conditional on a circle is a von Mises law): they move the orthogonal part
  of the plan, which at low temperature spreads ``~ sqrt(eps)`` along the curved boundary where
  straight Hit-and-Run chords are only ``~ eps`` long;
* Hit-and-Run line moves (Smith 1984; Lovasz & Vempala 2006) along isotropic ``u v^T``: exact
  chord of the ball (:func:`chord`, in the chain from low-rank-updated inverses,
  :mod:`scotgm_pp.inference._har_kernel`) and an exact truncated-exponential draw on it
  (:func:`truncated_exponential`);
* moves in the singular-value coordinates (:mod:`scotgm_pp.inference._har_spectral`): a
  breathing move that rescales the symmetric polar factor about the identity (a group move,
  slice-sampled) and a slice-sampling update of each signed singular value.

Nothing is adapted, so every kept step is an exact ``pi_eps``-invariant transition (far starts are
annealed during the burn-in only, see :func:`sample_coupling`).  The default
temperature has a stated reason (:func:`default_temperature`,
:mod:`scotgm_pp.inference._har_temperature`); convergence is checked on every entry of ``C``
(:mod:`scotgm_pp.inference._har_diagnostics`).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import numpy as np
from threadpoolctl import threadpool_limits

from ._har_chain import BallState as _BallState  # noqa: F401  (re-exported for step.py and tests)
from ._har_chain import ChainOutput, SweepMoves, run_chain
from ._har_diagnostics import ESS_MIN, RHAT_MAX, ChainDiagnostics, chain_diagnostics
from ._har_geometry import (
    CouplingGeometry,
    chord,
    coupling_geometry,
    truncated_exponential,
)
from ._har_kernel import INTERIOR as _INTERIOR  # noqa: F401
from ._har_starts import dispersed_starts, local_starts
from ._har_temperature import (
    DEFAULT_CELLS,
    default_temperature,
    effective_dimension,
    plan_regret_draws,
    regret_temperature,
)

__all__ = [
    "ESS_MIN",
    "RHAT_MAX",
    "ChainDiagnostics",
    "ChainOutput",
    "CouplingGeometry",
    "CouplingResult",
    "SweepMoves",
    "chord",
    "coupling_geometry",
    "default_temperature",
    "effective_dimension",
    "plan_regret_draws",
    "run_chain",
    "sample_coupling",
    "truncated_exponential",
]

DEFAULT_STEPS = 1000  # kept sweeps per chain
MAX_DRAWS = 500  # recorded draws per chain (default thinning)
MIN_BURN_IN = 100  # default burn-in is at least this many steps


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------
@dataclass
class CouplingResult:
    """Result of :func:`sample_coupling`.

    Attributes
    ----------
    cross_covariance
        Posterior mean of ``C = Lx K Ly`` (average over every kept step of every chain).
    K_mean
        Posterior mean of ``K``.
    cost_draws
        ``(n_chains, n_draws)`` expected transport costs ``c(K)`` at the recorded steps.
    temperature
        ``eps`` used.
    rhat, ess
        ArviZ rank-normalised split R-hat and bulk ESS of the transport cost (also in
        ``diagnostics``).
    w2_squared
        The minimum cost (closed form), for reference.
    diagnostics
        :class:`~scotgm_pp.inference._har_diagnostics.ChainDiagnostics`: R-hat, bulk and tail
        ESS of the cost and of every entry of ``C`` (worst entries and ``(m, m)`` arrays).
    sampled_rank
        ``m``: every entry of the plan is sampled (no reduction is made).
    idata
        ``xarray.DataTree`` (ArviZ 1): ``posterior.transport_cost`` and, when
        ``store_cross_covariance=True`` (default), ``posterior.cross_covariance``;
        ``sample_stats`` per chain; settings and the scalar diagnostics in ``attrs``; ``None`` if
        ``return_idata=False``.
    step_stats
        Per-chain: ``chord_length`` and ``abs_step`` (means over line moves), ``n_exact_refreshes``
        (inverse refreshes triggered by the round-off bound within sweeps), ``n_reprojections``
        (round-off repairs that pulled the plan back inside the ball), ``seconds``.
    settings
        The settings used (steps, burn-in, thinning, chains, start, moves, temperature rule and,
        for the default temperature, the expected regret it matches).
    seconds
        Wall time of the call.
    """

    cross_covariance: np.ndarray
    K_mean: np.ndarray
    cost_draws: np.ndarray
    temperature: float
    rhat: float
    ess: float
    w2_squared: float
    diagnostics: ChainDiagnostics
    sampled_rank: int
    idata: object | None = None
    step_stats: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    seconds: float = float("nan")

    @property
    def converged(self) -> bool:
        """Every diagnostic meets its threshold (R-hat <= 1.01, ESS >= 400)."""
        return self.diagnostics.passed

    def summary(self) -> dict:
        """Flat record of scalars for a pipeline (what ``scotgm_pp.tl`` stores per perturbation)."""
        return {
            "temperature": float(self.temperature),
            "temperature_rule": self.settings.get("temperature_rule", ""),
            "expected_regret": float(self.settings.get("expected_regret", float("nan"))),
            "rhat": float(self.rhat),
            "ess": float(self.ess),
            "cost_mean": float(np.mean(self.cost_draws)),
            "cost_sd": float(np.std(self.cost_draws)),
            "w2_squared": float(self.w2_squared),
            "sampled_rank": int(self.sampled_rank),
            "n_steps": int(self.settings["n_steps"]),
            "burn_in": int(self.settings["burn_in"]),
            "n_chains": int(self.settings["n_chains"]),
            **self.diagnostics.summary(),
            "converged": bool(self.converged),
            "seconds": float(self.seconds),
        }


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
    n_x: float | None = None,
    n_y: float | None = None,
    n_steps: int = DEFAULT_STEPS,
    n_chains: int = 4,
    burn_in: int | None = None,
    thin: int | None = None,
    random_state: int | np.random.Generator | None = 0,
    start: str = "dispersed",
    initial_plans: list[np.ndarray] | None = None,
    moves: SweepMoves | None = None,
    anneal: bool = True,
    store_cross_covariance: bool = True,
    return_idata: bool = True,
    warn: bool = True,
) -> CouplingResult:
    """Sample the full transport plan ``K`` from ``pi_eps(K) ~ exp(-c(K) / eps)``.

    Parameters
    ----------
    Sx, Sy
        Source (basal) and target (perturbed) covariances, ``(m, m)``, symmetric PSD (positive
        definite for the default temperature).
    mu_x, mu_y
        Means (they shift every cost by ``|mu_y - mu_x|^2``); zero if omitted.
    temperature
        ``eps > 0``.  Default :func:`default_temperature` with ``n_x``, ``n_y``: the
        maximum-entropy plan distribution whose mean excess cost over ``W2^2`` equals the
        expected regret of the optimal plans of covariances drawn from their posterior.
        ``eps -> 0`` concentrates on the OT plan, ``eps -> inf`` is uniform on the ball (mean
        ``C = 0``, the independent coupling).
    n_x, n_y
        Cells behind ``Sx`` and ``Sy`` (fractional allowed); only used for the default temperature
        (neither given: ``DEFAULT_CELLS`` = 100 each).
    n_steps
        Kept steps per chain.  One step is one sweep (``SweepMoves()``): 2 rotation-orbit draws in
        each of the ``m(m-1)/2`` coordinate planes, 2 Hit-and-Run line moves, the breathing move
        and one update of each singular value; ``O(m^3)`` work.
    n_chains
        Independent chains, run one after the other on one core (R-hat needs at least 2).
    burn_in
        Steps discarded per chain (default ``max(n_steps // 4, MIN_BURN_IN)``, ``MIN_BURN_IN`` = 100:
        enough for the annealing of far starts).
    thin
        Record every ``thin``-th kept step (default: at most ``MAX_DRAWS`` = 500 draws per chain).
        ``cross_covariance`` averages every kept step regardless.
    random_state
        Seed or generator; the default temperature's posterior draws, the starts and each chain
        get independent streams spawned from ``np.random.default_rng(random_state)``.
    start
        ``"dispersed"`` (default): chain ``k`` starts at ``lam_k K* + (1 - |lam_k|) R_k`` with
        ``lam_k`` evenly spread over ``[-0.9, 0.9]`` (from near the costliest plan to near the
        optimal one) and random ``R_k``, ``||R_k||_2 = 1/2``; ``"local"``: around the optimum,
        overdispersed in the cost (:func:`~scotgm_pp.inference._har_starts.local_starts`).
    initial_plans
        One start ``K`` per chain (each ``(m, m)``, ``||K||_2 < 1``) instead of ``start``.
    moves
        The moves of one step (default :class:`SweepMoves`; for ablations and baselines).
    anneal
        With ``"dispersed"`` starts or ``initial_plans``: the first 60% of the burn-in cools
        geometrically from ``max(eps, 2 sum(s) / d_eff)`` (a temperature at which the plans' mean
        excess cost reaches the gap between the optimal and the independent coupling) to ``eps``.
        Far starts otherwise can linger: at ``m = 77`` and ``eps ~ 1e-5`` a start near the costliest
        plan stayed ~450 steps in a state with ~40 reversed singular directions.  Kept steps are
        never tempered.
    store_cross_covariance
        Keep the recorded ``C`` draws in ``idata`` (``n_chains * n_draws * m^2`` floats).
    return_idata
        Build the ``DataTree`` of the draws (``idata``).
    warn
        Warn when a diagnostic fails its threshold.

    Returns
    -------
    CouplingResult

    Warns
    -----
    RuntimeWarning
        If the largest R-hat over the entries of ``C`` or the cost's R-hat exceeds ``RHAT_MAX``
        (1.01), or the smallest bulk or tail ESS over the entries of ``C`` or the cost's bulk ESS
        is below ``ESS_MIN`` (400); the message lists what failed.

    Notes
    -----
    Measured (``python benchmarks/bench_hit_and_run.py``; one core, load average ~2 on a shared
    2-core machine; defaults: 4 chains x 1000 kept steps after 250, ``n_x = n_y = 300``; three
    random covariance pairs each): at ``m = 20`` the call takes 1.3-1.4 s, the worst entry of ``C``
    has R-hat 1.005-1.006 and bulk / tail ESS >= 1435 / 1348; at ``m = 50``, 7.7-8.2 s, R-hat
    <= 1.0064, ESS >= 1438 / 1263.  On Papalexi (all cells, 25 perturbations, ``m = 74``-``78``):
    18-22 s a perturbation, R-hat <= 1.0081, ESS >= 1220 / 1160.  A step costs ``O(m^3)`` (the
    rotation draws dominate).  Plain isotropic Hit-and-Run given 10 s at ``m = 20`` does not
    converge (R-hat > 3).  The sampled mean excess cost matches the expected regret behind the
    default temperature to 0.3% in all these runs.
    """
    t_start = time.perf_counter()
    geom = coupling_geometry(Sx, Sy, mu_x, mu_y)
    m = geom.m
    n_steps = _check_positive_int(n_steps, "n_steps")
    n_chains = _check_positive_int(n_chains, "n_chains")
    burn_in = _check_positive_int(max(n_steps // 4, MIN_BURN_IN) if burn_in is None else burn_in, "burn_in", 0)
    thin = _check_positive_int(max(1, -(-n_steps // MAX_DRAWS)) if thin is None else thin, "thin")
    if n_steps < thin:
        raise ValueError(f"n_steps ({n_steps}) must be at least thin ({thin}).")
    if start not in ("dispersed", "local"):
        raise ValueError(f"unknown start {start!r}; choose 'dispersed' or 'local'.")
    moves = SweepMoves() if moves is None else moves
    if not isinstance(moves, SweepMoves):
        raise TypeError(f"moves must be a SweepMoves, got {type(moves).__name__}.")
    if initial_plans is not None:
        initial_plans = _check_initial_plans(initial_plans, n_chains, m)
    rng = np.random.default_rng(random_state)
    temp_rng, start_rng, *chain_rngs = rng.spawn(n_chains + 2)
    with threadpool_limits(limits=1, user_api="blas"):  # m x m BLAS calls are too small to thread
        settings: dict = {}
        temperature = _temperature(Sx, Sy, temperature, n_x, n_y, temp_rng, settings)
        if initial_plans is not None:
            starts = [geom.Q.T @ K0 @ geom.Pt.T for K0 in initial_plans]
        elif start == "dispersed":
            starts = dispersed_starts(m, n_chains, start_rng)
        else:
            starts = local_starts(geom.singular_values, temperature, n_chains, start_rng)
        hot = 2.0 * float(geom.singular_values.sum()) / effective_dimension(m)
        anneal_from = max(temperature, hot) if anneal and start != "local" else None
        outs = [run_chain(geom.singular_values, temperature, J0, n_steps=n_steps, burn_in=burn_in, thin=thin,
                          rng=rg, moves=moves, store_draws=True, anneal_from=anneal_from)
                for J0, rg in zip(starts, chain_rngs)]
        cost_draws = geom.cost(np.stack([o.inner_draws for o in outs]))
        J_mean = np.mean([o.J_mean for o in outs], axis=0)
        left, right = geom.Lx @ geom.Q, geom.Pt @ geom.Ly  # C = Lx Q J Pt Ly
        C_draws = np.stack([left @ o.J_draws @ right for o in outs])
        diagnostics = chain_diagnostics(cost_draws, C_draws)
    if warn and not diagnostics.passed:
        warnings.warn(
            "Hit-and-Run chains have not converged: " + "; ".join(diagnostics.failures())
            + f". Increase n_steps (now {n_steps} kept steps per chain) or burn_in (now {burn_in}).",
            RuntimeWarning,
            stacklevel=2,
        )
    step_stats = {
        "chord_length": np.array([o.mean_chord_length for o in outs]),
        "abs_step": np.array([o.mean_abs_step for o in outs]),
        "n_exact_refreshes": np.array([o.n_exact_refreshes for o in outs]),
        "n_reprojections": np.array([o.n_reprojections for o in outs]),
        "seconds": np.array([o.seconds for o in outs]),
    }
    settings.update(n_steps=n_steps, burn_in=burn_in, thin=thin, n_chains=n_chains, sampled_rank=m,
                    start="initial_plans" if initial_plans is not None else start,
                    anneal_from=float(anneal_from) if anneal_from is not None else float("nan"),
                    rotations=",".join(moves.rotations), coordinate_moves=bool(moves.coordinate),
                    n_isotropic=int(moves.n_isotropic), breathing=bool(moves.breathing),
                    singular_value_updates=bool(moves.singular))
    idata = None
    if return_idata:
        idata = _build_idata(geom, cost_draws, C_draws if store_cross_covariance else None, step_stats,
                             temperature, diagnostics, settings)
    K_mean = geom.Q @ J_mean @ geom.Pt
    return CouplingResult(
        cross_covariance=geom.cross_covariance(K_mean),
        K_mean=K_mean,
        cost_draws=cost_draws,
        temperature=temperature,
        rhat=diagnostics.cost_rhat,
        ess=diagnostics.cost_ess_bulk,
        w2_squared=geom.w2_squared,
        diagnostics=diagnostics,
        sampled_rank=m,
        idata=idata,
        step_stats=step_stats,
        settings=settings,
        seconds=time.perf_counter() - t_start,
    )


def _temperature(Sx, Sy, temperature, n_x, n_y, rng, settings: dict) -> float:
    """The given temperature (checked) or the default one; records how it was set in ``settings``."""
    if temperature is None:
        temperature, regret = regret_temperature(Sx, Sy, n_x, n_y, random_state=rng)
        nx, ny = (DEFAULT_CELLS, DEFAULT_CELLS) if n_x is None else (n_x, n_y)
        settings.update(temperature_rule=f"plan regret, n_x={float(nx):g}, n_y={float(ny):g}",
                        expected_regret=float(regret.mean()),
                        expected_regret_se=float(regret.std(ddof=1) / np.sqrt(regret.size)))
    else:
        settings.update(temperature_rule="given")
    temperature = float(temperature)
    if not (np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}.")
    return temperature


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


def _build_idata(geom, cost_draws, C_draws, step_stats, temperature, diagnostics, settings):
    import arviz as az

    posterior = {"transport_cost": cost_draws}
    if C_draws is not None:
        posterior["cross_covariance"] = C_draws
    sample_stats = {k: np.broadcast_to(v[:, None], cost_draws.shape).copy() for k, v in step_stats.items()}
    tree = az.from_dict({"posterior": posterior, "sample_stats": sample_stats},
                        dims={"cross_covariance": ["pc", "pc_target"]})
    tree.attrs.update({"temperature": temperature, "w2_squared": geom.w2_squared, "sampler": "scotgm_pp.hit_and_run",
                       **settings, **diagnostics.summary()})
    return tree

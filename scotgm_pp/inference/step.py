"""The transport-plan distribution as a PyMC model, and the exact sampler step for it.

``build_coupling_model`` declares ``K`` (dims ``("pc", "pc_target")``) with density
``exp(2 <K, G> / eps)`` on the spectral-norm unit ball (``-inf`` outside), plus the
deterministics ``cross_covariance = Lx K Ly`` and ``transport_cost``.  ``HitAndRun`` is a
``pymc`` step method (an ``ArrayStepShared``, like ``pymc.step_methods.slicer.Slice``) that
updates ``K`` by the exact sweeps of :func:`scotgm_pp.inference.hit_and_run.sample_coupling`
(rotation-orbit draws, Hit-and-Run line moves, moves on the singular values)::

    model = build_coupling_model(Sx, Sy, temperature)
    with model:
        step = HitAndRun([model["K"]], steps_per_draw=1)
        idata = pm.sample(draws=500, tune=500, chains=4, cores=1, step=step,
                          initvals=dispersed_initvals(model, 4), random_seed=1)

No gradient is compiled: ``pm.sample`` only differentiates the log-density for variables it
must assign a sampler to itself, and ``K`` is assigned to ``HitAndRun`` explicitly.
``HitAndRun.competence`` returns ``INCOMPATIBLE``: the step is never picked automatically
(it is not in ``pm.STEP_METHODS`` and only fits this one density), so it must be passed as
``step=``.
"""

from __future__ import annotations

import numpy as np
import pymc as pm
import pytensor.tensor as pt
from pymc.blocking import RaveledVars, StatsType
from pymc.model import modelcontext
from pymc.pytensorf import make_shared_replacements
from pymc.step_methods.arraystep import ArrayStepShared
from pymc.step_methods.compound import Competence, StepMethodState
from pymc.step_methods.state import dataclass_state
from pymc.util import get_value_vars_from_user_vars
from pytensor.tensor.linalg import svd

from . import _har_kernel as hk
from . import _har_sweep as hs
from ._har_chain import BallState, SweepMoves
from ._har_starts import dispersed_starts
from .hit_and_run import coupling_geometry

__all__ = ["HitAndRun", "build_coupling_model", "dispersed_initvals"]

_G_NAME = "coupling_G"
_EPS_NAME = "coupling_temperature"
_CONST_NAME = "coupling_cost_constant"


def _check_temperature(temperature) -> float:
    temperature = float(temperature)
    if not (np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}.")
    return temperature


def build_coupling_model(Sx, Sy, temperature: float, *, mu_x=None, mu_y=None, name: str = "K") -> pm.Model:
    """PyMC model of ``pi_eps(K) ~ exp(-c(K) / eps)`` on ``{K : ||K||_2 <= 1}``.

    Parameters
    ----------
    Sx, Sy
        Source and target covariances ``(m, m)``, symmetric PSD.
    temperature
        ``eps > 0`` (see :func:`scotgm_pp.inference.hit_and_run.default_temperature`).
    mu_x, mu_y
        Means; they only shift ``transport_cost``.
    name
        Name of the plan variable.

    Returns
    -------
    pymc.Model
        Free variable ``name`` (``pm.Flat``, dims ``("pc", "pc_target")``, initial value 0); a
        ``pm.Potential`` ``coupling_density`` equal to ``2 <K, G> / eps`` inside the ball and
        ``-inf`` outside (largest singular value ``>= 1``); deterministics
        ``cross_covariance`` and ``transport_cost``; data ``coupling_G``,
        ``coupling_temperature`` and ``coupling_cost_constant`` that :class:`HitAndRun` reads.
    """
    geom = coupling_geometry(Sx, Sy, mu_x, mu_y)
    eps = _check_temperature(temperature)
    m = geom.m
    coords = {"pc": np.arange(m), "pc_target": np.arange(m)}
    with pm.Model(coords=coords) as model:
        G = pm.Data(_G_NAME, geom.G, dims=("pc", "pc_target"))
        eps_t = pm.Data(_EPS_NAME, eps)
        const = pm.Data(_CONST_NAME, geom.const)
        K = pm.Flat(name, dims=("pc", "pc_target"), initval=np.zeros((m, m)))
        inner = pt.sum(K * G)
        spectral_norm = pt.max(svd(K, full_matrices=False, compute_uv=False))
        pm.Potential("coupling_density", pt.switch(pt.lt(spectral_norm, 1.0), 2.0 * inner / eps_t, -np.inf))
        pm.Deterministic("cross_covariance", pt.as_tensor(geom.Lx) @ K @ pt.as_tensor(geom.Ly),
                         dims=("pc", "pc_target"))
        pm.Deterministic("transport_cost", const - 2.0 * inner)
    return model


def dispersed_initvals(model: pm.Model, n_chains: int, *, name: str = "K", random_state=0) -> list[dict]:
    """Dispersed starting points for ``pm.sample(initvals=...)``.

    ``lam K* + (1 - |lam|) R`` with ``lam`` evenly spread over ``[-0.9, 0.9]`` (from near the
    costliest plan to near the optimal one) and random ``R`` of spectral norm 1/2, as
    :func:`scotgm_pp.inference.hit_and_run.sample_coupling` uses.
    """
    G = model[_G_NAME].get_value()
    Q, _, Pt = np.linalg.svd(G)
    starts = dispersed_starts(G.shape[0], n_chains, np.random.default_rng(random_state))
    return [{name: Q @ J0 @ Pt} for J0 in starts]


@dataclass_state
class HitAndRunState(StepMethodState):
    steps_per_draw: int


class HitAndRun(ArrayStepShared):
    """Exact step for the transport plan ``K`` of :func:`build_coupling_model`.

    Each PyMC draw makes ``steps_per_draw`` sweeps of exact moves in the SVD frame of ``G``
    (:mod:`scotgm_pp.inference._har_sweep`): von Mises draws on the rotation orbits of every
    coordinate plane, Hit-and-Run line moves (exact chord of the spectral-norm ball, exact
    truncated-exponential draw ``exp(2 t <D, G> / eps)`` on it), a breathing move and
    singular-value updates.  Every move leaves the target invariant and nothing is adapted; every
    draw is accepted.

    Parameters
    ----------
    vars
        The plan variable (one ``(m, m)`` value variable).
    Sx, Sy, temperature, mu_x, mu_y
        The target.  Optional: read from the model's ``coupling_G`` / ``coupling_temperature``
        data when omitted; when given they must agree with the model (else ``ValueError``), so the
        step can never sample a different density from the one the model declares.
    steps_per_draw
        Sweeps per PyMC draw (each is ``O(m^3)``).
    moves
        The moves of a sweep (default :class:`~scotgm_pp.inference.hit_and_run.SweepMoves`).
    model, rng, initial_point, blocked
        As for other PyMC step methods; all randomness comes from ``self.rng``, which PyMC
        seeds per chain.

    Sampler stats: ``chord_length`` and ``step_size`` (``|t|``), means over the draw's line moves;
    ``transport_cost`` of the returned state; ``n_exact_refreshes`` (cumulative refreshes of the
    updated inverses triggered by the round-off bound).
    """

    name = "hit_and_run"
    default_blocked = True
    stats_dtypes_shapes = {
        "chord_length": (np.float64, []),
        "step_size": (np.float64, []),
        "transport_cost": (np.float64, []),
        "n_exact_refreshes": (np.int64, []),
    }
    _state_class = HitAndRunState

    def __init__(
        self,
        vars=None,
        *,
        Sx=None,
        Sy=None,
        temperature: float | None = None,
        mu_x=None,
        mu_y=None,
        steps_per_draw: int = 1,
        moves: SweepMoves | None = None,
        model=None,
        rng=None,
        initial_point=None,
        blocked: bool = True,
    ):
        model = modelcontext(model)
        vars = get_value_vars_from_user_vars(vars if vars is not None else model.value_vars, model)
        if len(vars) != 1:
            raise ValueError(f"HitAndRun updates exactly one (m, m) plan variable, got {[v.name for v in vars]}.")
        if initial_point is None:
            initial_point = model.initial_point()
        shape = initial_point[vars[0].name].shape
        if len(shape) != 2 or shape[0] != shape[1]:
            raise ValueError(f"HitAndRun needs a square (m, m) variable; {vars[0].name!r} has shape {shape}.")
        self.G, self.temperature, self.const = self._target(model, shape[0], Sx, Sy, temperature, mu_x, mu_y)
        self.m = shape[0]
        self.steps_per_draw = int(steps_per_draw)
        if self.steps_per_draw < 1:
            raise ValueError(f"steps_per_draw must be a positive integer, got {steps_per_draw!r}.")
        self.moves = SweepMoves() if moves is None else moves
        self.Q, self.s, self.Pt = np.linalg.svd(self.G)
        self._state: BallState | None = None
        self._last_K: np.ndarray | None = None
        shared = make_shared_replacements(initial_point, vars, model)
        super().__init__(vars, shared, blocked=blocked, rng=rng)
    @staticmethod
    def _target(model, m, Sx, Sy, temperature, mu_x, mu_y):
        names = model.named_vars
        from_model = _G_NAME in names and _EPS_NAME in names
        if Sx is None and Sy is None and temperature is None:
            if not from_model:
                raise ValueError("pass Sx, Sy and temperature, or build the model with build_coupling_model.")
            const = float(model[_CONST_NAME].get_value()) if _CONST_NAME in names else 0.0
            return model[_G_NAME].get_value(), float(model[_EPS_NAME].get_value()), const
        if Sx is None or Sy is None or temperature is None:
            raise ValueError("pass all of Sx, Sy and temperature (or none, to read them from the model).")
        geom = coupling_geometry(Sx, Sy, mu_x, mu_y)
        eps = _check_temperature(temperature)
        if geom.m != m:
            raise ValueError(f"Sx and Sy are {geom.m}x{geom.m} but the plan variable is {m}x{m}.")
        if from_model:
            G_model = model[_G_NAME].get_value()
            eps_model = float(model[_EPS_NAME].get_value())
            if not (np.allclose(G_model, geom.G, rtol=1e-10, atol=1e-12) and np.isclose(eps_model, eps, rtol=1e-12)):
                raise ValueError("Sx, Sy or temperature given to HitAndRun differ from those the model was built with.")
        return geom.G, eps, geom.const

    @staticmethod
    def competence(var, has_grad):
        """Never chosen automatically: pass ``step=HitAndRun(...)`` explicitly."""
        return Competence.INCOMPATIBLE

    def _ball_state(self, K: np.ndarray) -> BallState:
        if self._state is not None and self._last_K is not None and np.array_equal(self._last_K, K):
            return self._state  # continuing the same chain: keep the updated inverses
        if not np.all(np.isfinite(K)) or np.linalg.norm(K, 2) >= 1.0:
            raise ValueError("the current plan K is not strictly inside the unit spectral-norm ball; "
                             "start the chains inside it (e.g. initvals=dispersed_initvals(model, chains)).")
        self._state = BallState(self.Q.T @ K @ self.Pt.T)  # the SVD frame of G
        return self._state

    def astep(self, q0: RaveledVars) -> tuple[RaveledVars, StatsType]:
        m = self.m
        state = self._ball_state(q0.data.reshape(m, m).astype(float))
        before = state.acc[[hk.CHORD_SUM, hk.STEP_SUM, hs.N_LINE]].copy()
        state.run(self.s, 2.0 / self.temperature, self.moves, self.rng, self.steps_per_draw,
                  J_sum=np.zeros((m, m)), inner_draws=np.empty(0), J_draws=np.empty((0, m, m)))
        chord_sum, step_sum, n_line = state.acc[[hk.CHORD_SUM, hk.STEP_SUM, hs.N_LINE]] - before
        K = self.Q @ state.materialise() @ self.Pt
        self._last_K = K
        stats = {
            "chord_length": float(chord_sum / n_line) if n_line else float("nan"),
            "step_size": float(step_sum / n_line) if n_line else float("nan"),
            "transport_cost": float(self.const - 2.0 * np.sum(K * self.G)),
            "n_exact_refreshes": int(state.n_exact_refreshes),
        }
        return RaveledVars(K.ravel(), q0.point_map_info), [stats]

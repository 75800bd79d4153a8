"""Plan of a screen run: validated settings, labels, and one task per perturbation.

The driver reads as plan -> map -> collect. This module is the plan: everything that concerns
the whole screen is checked and computed here once (labels, batches, the raw-count pass with
library sizes and the controls' dispersion), and every perturbation becomes a :class:`Task`
that names its guide cells and a bounded, seeded sample of control cells (row indices, never
the data). A task's seed comes from the run's ``random_state`` and the perturbation's label,
so results do not depend on the order, the number of workers or the scheduler.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from .._labels import label_key
from .._validation import InputError
from ..pp import PreprocessParams
from ._calls import N_RESAMPLES
from ._core import COUPLINGS, DEFAULT_RANK_BY, DEFAULT_STATE_SPACE, RANK_BY, STATE_SPACES
from ._effects import COUNT_LIKELIHOODS

__all__ = [
    "RunSettings",
    "Task",
    "ScreenLabels",
    "screen_labels",
    "resolve_perturbations",
    "task_seed",
    "sample_controls",
    "MIN_CELLS",
    "N_CONTROL_CELLS",
]

MIN_CELLS = 10
"""The fewest guide (and control) cells an experiment needs: two Gaussian states in at least
one PC with a handful of cells each."""

N_CONTROL_CELLS = 1000
"""Default number of control cells each perturbation is compared with (all of them when the
screen has fewer). See ``benchmarks/README.md`` (control sample size) for how it was chosen."""

MAX_SEED = 2**63 - 1


def _int_setting(value, name: str, minimum: int, maximum: int | None = None, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise InputError(f"{name} must be an integer, got {value!r}.")
    if value < minimum or (maximum is not None and value > maximum):
        span = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise InputError(f"{name} must be {span}, got {value}.")
    return int(value)


@dataclass(frozen=True)
class RunSettings:
    """Every setting of a screen run, validated once and passed down unchanged.

    See :func:`scotgm_pp.tl.perturbation_response` for the meaning of each field.
    """

    perturbation_key: str
    control: str
    coupling: str = "ot"
    escape_model: bool = True
    state_space: str = DEFAULT_STATE_SPACE
    regularization: float = 0.01
    em_regularization: str = "map"
    rank_by: str = DEFAULT_RANK_BY
    batch_key: str | None = None
    dispersion_per_batch: bool = True
    count_likelihood: str = "marginal"
    n_control_cells: int = N_CONTROL_CELLS
    preprocess: PreprocessParams = field(default_factory=PreprocessParams)
    coupling_kwargs: dict | None = None
    random_state: int = 0
    blas_threads: int | None = 1
    n_resamples: int = N_RESAMPLES
    effect_fdr: float = 0.1

    def __post_init__(self):
        if not isinstance(self.perturbation_key, str) or not self.perturbation_key:
            raise InputError(f"perturbation_key must be a non-empty column name, got {self.perturbation_key!r}.")
        if not isinstance(self.control, str) or not self.control.strip():
            raise InputError(f"control must be the (non-empty) label of the control cells, got {self.control!r}.")
        if self.coupling not in COUPLINGS:
            raise InputError(f"unknown coupling {self.coupling!r}; choose one of {', '.join(COUPLINGS)}.")
        if self.rank_by not in RANK_BY:
            raise InputError(f"unknown rank_by {self.rank_by!r}; choose one of {', '.join(RANK_BY)}.")
        if self.em_regularization not in ("map", "paper"):
            raise InputError(f"em_regularization must be 'map' or 'paper', got {self.em_regularization!r}.")
        if not isinstance(self.escape_model, (bool, np.bool_)):
            raise InputError(f"escape_model must be True or False, got {self.escape_model!r}.")
        if not isinstance(self.dispersion_per_batch, (bool, np.bool_)):
            raise InputError(f"dispersion_per_batch must be True or False, got {self.dispersion_per_batch!r}.")
        if self.count_likelihood not in COUNT_LIKELIHOODS:
            raise InputError(f"unknown count_likelihood {self.count_likelihood!r}; choose one of "
                             f"{', '.join(COUNT_LIKELIHOODS)}.")
        if self.state_space not in STATE_SPACES:
            raise InputError(f"unknown state_space {self.state_space!r}; choose one of {', '.join(STATE_SPACES)}.")
        reg = self.regularization
        if isinstance(reg, (bool, np.bool_)) or not isinstance(reg, (int, float, np.number)) or not (
            math.isfinite(reg) and reg > 0
        ):
            raise InputError(f"regularization must be a finite number > 0, got {reg!r}.")
        _int_setting(self.n_control_cells, "n_control_cells", MIN_CELLS, 2**31 - 1)
        _int_setting(self.random_state, "random_state", 0, MAX_SEED)
        _int_setting(self.blas_threads, "blas_threads", 1, 4096, allow_none=True)
        _int_setting(self.n_resamples, "n_resamples", 20, 10**7)
        fdr = self.effect_fdr
        if isinstance(fdr, (bool, np.bool_)) or not isinstance(fdr, (int, float, np.number)) or not 0 < fdr < 1:
            raise InputError(f"effect_fdr must be a number in (0, 1), got {fdr!r}.")
        if not isinstance(self.preprocess, PreprocessParams):
            raise InputError(f"params must be a PreprocessParams, got {type(self.preprocess).__name__}.")
        if self.coupling_kwargs is not None and not isinstance(self.coupling_kwargs, dict):
            raise InputError(f"coupling_kwargs must be a dict, got {type(self.coupling_kwargs).__name__}.")

    def to_dict(self) -> dict:
        """Plain values (JSON- and HDF5-ready); ``None`` entries are left out."""
        out = asdict(self)
        out["preprocess"] = {k: v for k, v in self.preprocess.to_dict().items() if v is not None}
        if self.coupling_kwargs is None:
            out.pop("coupling_kwargs")
        return {k: v for k, v in out.items() if v is not None}


@dataclass
class ScreenLabels:
    """Each cell's perturbation label, validated.

    Attributes
    ----------
    labels
        One string per cell; ``""`` for unassigned cells (missing or empty label).
    control_mask
        Cells carrying the control label.
    unassigned
        Cells with no label (NaN, None or empty): never analysed.
    """

    labels: np.ndarray
    control_mask: np.ndarray
    unassigned: np.ndarray


def screen_labels(obs: pd.DataFrame, key: str, control: str) -> ScreenLabels:
    """Validate the perturbation column: the key exists, the control label is present, missing
    labels are set aside (with a warning), and distinct values do not collide as strings."""
    if key not in obs.columns:
        cols = ", ".join(map(repr, list(obs.columns)[:30])) or "(none)"
        raise InputError(
            f"perturbation_key {key!r} not in adata.obs; columns are: {cols}. "
            "Pass the column that holds each cell's perturbation (guide target) label."
        )
    column = obs[key]
    raw = column.astype(object).to_numpy()
    missing = pd.isna(column).to_numpy()
    # object arrays throughout: numpy's fixed-width strings would drop trailing NUL characters
    text = np.empty(raw.size, dtype=object)
    text[:] = ["" if m else str(v) for v, m in zip(raw, missing)]
    unassigned = missing | np.array([not t.strip() for t in text], dtype=bool)
    text[unassigned] = ""
    nul = [t for t in text if "\x00" in t]
    if nul:
        raise InputError(
            f"adata.obs[{key!r}] has labels with a NUL character (e.g. {nul[0]!r}); HDF5 (.h5ad) cannot store them. "
            "Clean the labels, e.g. adata.obs[key] = adata.obs[key].astype(str).str.replace('\\x00', '')."
        )
    present = pd.unique(raw[~unassigned])
    as_text = pd.Series([str(v) for v in present], dtype=object)
    if as_text.duplicated().any():
        clash = as_text[as_text.duplicated()].iloc[0]
        kinds = sorted({type(v).__name__ for v in present if str(v) == clash})
        raise InputError(
            f"adata.obs[{key!r}] holds different values that read the same as text ({clash!r}: {', '.join(kinds)}); "
            "make the labels unambiguous, e.g. adata.obs[key] = adata.obs[key].astype(str)."
        )
    control_mask = np.array([t == control for t in text], dtype=bool)
    if not control_mask.any():
        counts = pd.Series(text[~unassigned], dtype=object).value_counts()
        shown = ", ".join(f"{lab!r} ({n})" for lab, n in counts.head(15).items())
        raise InputError(
            f"control label {control!r} not found in adata.obs[{key!r}]; the most frequent labels are: "
            f"{shown}. Pass the label of the non-targeting control cells as `control`."
        )
    if unassigned.any():
        warnings.warn(
            f"{int(unassigned.sum())} cells have no label in adata.obs[{key!r}] (missing or empty); they are not "
            "analysed and are classed 'unassigned'.",
            UserWarning,
            stacklevel=3,
        )
    return ScreenLabels(labels=text, control_mask=control_mask, unassigned=unassigned)


def resolve_perturbations(labels: ScreenLabels, control: str, key: str, perturbations=None) -> list[str]:
    """The perturbations to analyse: all labels but the control (sorted) by default, or the
    requested ones (each once, in the order given), each checked to exist."""
    available = pd.unique(labels.labels[~labels.control_mask & ~labels.unassigned])
    if perturbations is None:
        chosen = sorted(str(p) for p in available)
    else:
        if isinstance(perturbations, (str, bytes)):
            raise InputError(
                f"perturbations must be a list of labels, got the single string {perturbations!r}; "
                f"pass [{perturbations!r}]."
            )
        try:
            requested = [str(p) for p in perturbations]
        except TypeError as err:
            raise InputError(f"perturbations must be a list of labels, got {type(perturbations).__name__}.") from err
        chosen = list(dict.fromkeys(requested))
        if control in chosen:
            raise InputError(f"the control label {control!r} cannot be analysed as a perturbation; leave it out.")
        known = set(available)
        unknown = [p for p in chosen if p not in known]
        if unknown:
            raise InputError(
                f"perturbations {unknown[:10]} not found in adata.obs[{key!r}] "
                f"(control {control!r} excluded); available: {sorted(known)[:20]}."
            )
    if not chosen:
        raise InputError(f"adata.obs[{key!r}] has no label other than the control {control!r}.")
    return chosen


def task_seed(random_state: int, label: str) -> int:
    """A 63-bit seed from the run's seed and the perturbation's label (not its position)."""
    digest = hashlib.sha256(f"{int(random_state)}\x1f{label}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass(frozen=True)
class Task:
    """One perturbation's share of the work: which rows to read and its seed."""

    perturbation: str
    key: str
    seed: int
    guide_rows: np.ndarray
    control_rows: np.ndarray
    n_guide_labelled: int
    skip_reason: str | None = None


def sample_controls(control_rows: np.ndarray, guide_batches: np.ndarray | None, control_batches: np.ndarray | None,
                    n: int, rng: np.random.Generator) -> tuple[np.ndarray, str | None]:
    """A seeded sample of at most ``n`` control rows, batch-matched when batches are given.

    Without batches: ``min(n, available)`` controls uniformly without replacement. With
    batches: each batch of the guide cells gets controls of the same batch in proportion to its
    share of guide cells (at least ``MIN_CELLS // 2`` where available); a batch of guide cells
    without any control cell makes the perturbation unanalysable (the reason is returned).
    """
    control_rows = np.asarray(control_rows)
    if guide_batches is None:
        take = min(n, control_rows.size)
        return np.sort(rng.choice(control_rows, size=take, replace=False)), None
    batches, counts = np.unique(guide_batches, return_counts=True)
    chosen = []
    for b, k in zip(batches, counts):
        pool = control_rows[control_batches == b]
        if pool.size == 0:
            return np.empty(0, dtype=np.int64), (
                f"batch {str(b)!r} holds {k} of its guide cells but no control cell; the count layer cannot tell the "
                "batch from the perturbation there (drop those cells or choose another batch_key)"
            )
        want = max(int(round(n * k / counts.sum())), MIN_CELLS // 2)
        chosen.append(rng.choice(pool, size=min(want, pool.size), replace=False))
    return np.sort(np.concatenate(chosen)), None


def make_tasks(labels: ScreenLabels, perturbations: list[str], settings: RunSettings, usable: np.ndarray,
               batch: np.ndarray | None) -> list[Task]:
    """One :class:`Task` per perturbation (cells failing the per-cell filter are left out)."""
    ctrl_rows = np.flatnonzero(labels.control_mask & usable)
    ctrl_batches = None if batch is None else batch[ctrl_rows]
    by_label = pd.Series(np.arange(labels.labels.size)).groupby(labels.labels).indices
    tasks = []
    for pert in perturbations:
        rows_all = np.asarray(by_label.get(pert, []), dtype=np.int64)
        rows = rows_all[usable[rows_all]]
        seed = task_seed(settings.random_state, pert)
        rng = np.random.default_rng(seed)
        reason = None
        controls = np.empty(0, dtype=np.int64)
        if rows.size < MIN_CELLS:
            dropped = rows_all.size - rows.size
            note = f" ({dropped} more failed the per-cell filter)" if dropped else ""
            reason = f"{rows.size} guide cells{note}, fewer than the {MIN_CELLS} the two-state model needs"
        else:
            controls, reason = sample_controls(ctrl_rows, None if batch is None else batch[rows], ctrl_batches,
                                               settings.n_control_cells, rng)
            if reason is None and controls.size < MIN_CELLS:
                reason = f"{controls.size} control cells, fewer than {MIN_CELLS}"
        tasks.append(Task(perturbation=pert, key=label_key(pert), seed=seed, guide_rows=rows,
                          control_rows=controls, n_guide_labelled=int(rows_all.size), skip_reason=reason))
    return tasks

"""The collect step of a screen run: results arrive one perturbation at a time and are put in place.

Gene-level numbers go straight into perturbation x gene arrays (float32), each cell's posterior
into one column, the light summary into one row per perturbation, and the heavy record either
into a :class:`~scotgm_pp.tl._store.RecordStore` on disk or, for small in-memory runs, into a
dict. Nothing else per perturbation is kept, so memory grows with the size of the answer
(perturbations x genes), not with the work done.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from anndata import AnnData

from ..inference._har_diagnostics import ESS_MIN, RHAT_MAX
from ._calls import bh_qvalues
from ._execute import TaskResult
from ._store import RecordStore

__all__ = ["Collector", "CLASSES"]

CLASSES = ("control", "perturbed", "escaped", "no effect", "not analysed", "unassigned")
"""Values of ``.obs[f"{key}_class"]``."""


class Collector:
    """Receives :class:`TaskResult` objects and assembles the run's outputs.

    Parameters
    ----------
    perturbations
        The planned perturbations (their order is the order of the responses' rows).
    var_names
        The screen's genes.
    n_cells
        Cells of the screen.
    control_mask, unassigned
        Control cells (posterior 0, class "control") and cells without a label.
    store
        Where heavy records go; ``None`` keeps them in memory.
    """

    def __init__(self, perturbations: list[str], var_names, n_cells: int, control_mask: np.ndarray,
                 unassigned: np.ndarray, store: RecordStore | None = None):
        self.perturbations = list(perturbations)
        self._row = {p: i for i, p in enumerate(self.perturbations)}
        self.var_names = pd.Index([str(v) for v in var_names], dtype=object)
        self.store = store
        self.layers: dict[str, np.ndarray] = {}
        self.summaries: dict[str, dict] = {}
        self.keys: dict[str, str] = {}
        self.records: dict[str, dict] = {}
        self.skipped: dict[str, str] = {}
        self.p_perturbed = np.full(n_cells, np.nan)
        self.p_perturbed[np.asarray(control_mask, bool)] = 0.0
        self.control_mask = np.asarray(control_mask, bool)
        self.unassigned = np.asarray(unassigned, bool)
        self.analysed = np.zeros(n_cells, bool)
        self.guide_rows: dict[str, np.ndarray] = {}

    def _layer(self, name: str) -> np.ndarray:
        if name not in self.layers:
            # float32 halves the size of the answer; p- and q-values keep float64 (they reach 1e-300)
            dtype = np.float64 if ("pval" in name or "qval" in name) else np.float32
            self.layers[name] = np.full((len(self.perturbations), len(self.var_names)), np.nan, dtype=dtype)
        return self.layers[name]

    def add(self, result: TaskResult, *, stored: bool = False) -> None:
        """Put one result in place (``stored``: it was read back from the store, so do not write it again)."""
        if self.store is not None and not (stored or result.stored):
            self.store.write(result)
        if result.skip_reason is not None:
            self.skipped[result.perturbation] = result.skip_reason
            return
        row = self._row[result.perturbation]
        for name, values in result.gene_values.items():
            self._layer(name)[row, result.gene_index] = values
        self.summaries[result.perturbation] = dict(result.summary)
        self.keys[result.perturbation] = result.key
        rows = np.asarray(result.guide_rows)
        self.p_perturbed[rows] = result.p_perturbed
        self.analysed[rows] = True
        self.guide_rows[result.perturbation] = rows
        if self.store is None and result.record:
            self.records[result.key] = result.record

    @property
    def n_done(self) -> int:
        return len(self.summaries) + len(self.skipped)

    def finalize(self, effect_fdr: float) -> None:
        """Screen-wide numbers, once every perturbation is in: Benjamini-Hochberg q-values of the
        gene p-values over the whole screen (layer ``qval_screen``) and of the perturbations'
        "any effect" p-values (``qval_any``), and which perturbations had a detectable effect
        (``effect_detected``: ``qval_any < effect_fdr``)."""
        if "pval" in self.layers:
            self.layers["qval_screen"] = bh_qvalues(self.layers["pval"])
        done = [p for p in self.perturbations if p in self.summaries]
        p_any = np.array([self.summaries[p].get("pval_any", np.nan) for p in done], dtype=float)
        q_any = bh_qvalues(p_any)
        for p, q in zip(done, q_any):
            self.summaries[p]["qval_any"] = float(q)
            self.summaries[p]["effect_detected"] = bool(not np.isfinite(q) or q < effect_fdr)
        # Hit-and-Run chains are checked in the worker; the warning is raised here, where the user is
        unmixed = [p for p in done if self.summaries[p].get("coupling_converged") is False]
        if unmixed:
            names = ", ".join(map(str, unmixed[:5])) + (", ..." if len(unmixed) > 5 else "")
            warnings.warn(
                f"the Hit-and-Run chains of {len(unmixed)} of {len(done)} perturbations ({names}) missed "
                f"R-hat <= {RHAT_MAX} or ESS >= {ESS_MIN:g} on the cross-covariance (see the summary's "
                "coupling_rhat_max_cross_cov and coupling_ess_bulk_min_cross_cov); give more steps with "
                "coupling_kwargs={'n_steps': ...}.", RuntimeWarning, stacklevel=2)

    def cell_classes(self) -> pd.Categorical:
        """control / perturbed / escaped / no effect / not analysed / unassigned, one per cell.

        Guide cells of a perturbation without a detected effect (:meth:`finalize`) are "no
        effect" whatever their posterior; among the others, ``p_perturbed > 0.5`` is "perturbed"
        and the rest "escaped" (the rule of the records' confusion matrices: the more probable
        state, ties to the basal one).
        """
        cls = np.full(self.p_perturbed.size, "not analysed", dtype=object)
        p = self.p_perturbed
        fitted = self.analysed & np.isfinite(p)
        cls[fitted & (p > 0.5)] = "perturbed"
        cls[fitted & (p <= 0.5)] = "escaped"
        for pert, rows in self.guide_rows.items():
            if not self.summaries[pert].get("effect_detected", True):
                cls[rows[np.isfinite(p[rows])]] = "no effect"
        cls[self.control_mask] = "control"
        cls[self.unassigned] = "unassigned"
        return pd.Categorical(cls, categories=[c for c in CLASSES if c in set(cls)])

    def summary_frame(self) -> pd.DataFrame:
        """One row per analysed perturbation (in plan order), with its key."""
        done = [p for p in self.perturbations if p in self.summaries]
        df = pd.DataFrame([self.summaries[p] for p in done], index=pd.Index(done, name="perturbation", dtype=object))
        df.insert(0, "key", [self.keys[p] for p in done])
        return df

    def skipped_frame(self) -> pd.DataFrame:
        skipped = [p for p in self.perturbations if p in self.skipped]
        return pd.DataFrame({"perturbation": skipped, "reason": [self.skipped[p] for p in skipped]}, dtype=object)

    def responses(self, params: dict) -> AnnData:
        """The perturbation x gene results: one row per analysed perturbation, one layer per
        gene-level statistic (NaN where the experiment did not keep the gene)."""
        summary = self.summary_frame()
        rows = np.array([self._row[p] for p in summary.index], dtype=np.int64)
        n_rows = next(iter(self.layers.values())).shape[0] if self.layers else rows.size
        if not (rows.size == n_rows and np.array_equal(rows, np.arange(rows.size))):
            # drop the rows of skipped perturbations one layer at a time (one extra layer at most)
            for name in list(self.layers):
                self.layers[name] = self.layers[name][rows]
            self._row = {p: i for i, p in enumerate(summary.index)}
        layers = dict(self.layers)
        obs = summary.copy()
        obs.index = obs.index.astype(str)
        out = AnnData(obs=obs, var=pd.DataFrame(index=self.var_names), layers=layers)
        out.uns["params"] = params
        return out

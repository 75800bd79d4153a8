"""The count layer in :class:`~scotgm_pp.models.ScOTGM`: its inputs, its point estimates, its
effects table and the cells' state probabilities given scores and counts.

The graph is :func:`scotgm_pp.models.build_model` with ``counts`` (every cell's counts share its
state with its scores, :mod:`scotgm_pp.models.count_graph`). Which evidence informs the states
is ``model_config["count_evidence"]``, and it decides the graph every method fits:

* ``"cut"`` (default): the graph integrates each cell's state out of each gene's count
  likelihood over the cell's probabilities of the states from the scores alone (data
  ``state_probability``: EM's responsibilities of the scores; ``model_config["count_likelihood"]``
  ``"weighted"`` weights each state's log-likelihood by them instead), as the screen does (:func:`scotgm_pp.tl.perturbation_response`):
  EM reproduces the screen's effects for the same cells and genes, and MAP and NUTS maximise and
  sample that graph;
* ``"joint"``: the joint density, the counts informing the states too (EM, MAP and NUTS).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import stats

from ..inference import count_layer as cl

__all__ = ["CountInputs", "resolve_counts", "count_variables", "count_params_from", "effects_frame",
           "COUNT_EVIDENCE"]

COUNT_EVIDENCE = ("cut", "joint")


@dataclass
class CountInputs:
    """The count layer's data: dense counts ``(n, G)``, library sizes, dispersions, batch labels
    (or ``None``), gene names and the prior."""

    Y: np.ndarray
    size_factors: np.ndarray
    dispersion: np.ndarray
    batch: np.ndarray | None
    genes: list[str]
    prior: cl.CountPrior

    @property
    def batch_labels(self) -> list[str]:
        return cl.batch_codes(self.batch, self.Y.shape[0])[1]


def resolve_counts(counts, n: int, *, size_factors=None, dispersion=None, batch=None, genes=None,
                   fixed: np.ndarray, config: dict) -> CountInputs:
    """Check and complete the count layer's inputs (errors name the fix)."""
    Y = counts.toarray() if sp.issparse(counts) else np.asarray(counts)
    if Y.ndim != 2 or Y.shape[0] != n:
        raise ValueError(f"counts must be cells x genes with one row per cell ({n}), got shape {Y.shape}.")
    Y = Y.astype(float)
    if not np.all(np.isfinite(Y)) or (Y < 0).any() or np.any(Y != np.round(Y)):
        raise ValueError("counts must be raw non-negative integer counts (UMIs), not normalised values.")
    G = Y.shape[1]
    genes = [f"gene_{j}" for j in range(G)] if genes is None else [str(g) for g in genes]
    if len(genes) != G or len(set(genes)) != G:
        raise ValueError(f"genes must be {G} distinct names (one per column of counts), got {len(genes)}.")
    if size_factors is None:
        raise ValueError("size_factors is needed with counts: each cell's total count over all measured genes "
                         "(not only the genes given), the offset of the count layer.")
    s = np.asarray(size_factors, float)
    if s.shape != (n,) or not np.all(np.isfinite(s)) or (s <= 0).any():
        raise ValueError(f"size_factors must hold one positive value per cell ({n}).")
    if batch is not None and np.shape(batch) != (n,):
        raise ValueError(f"batch must hold one label per cell ({n}), got shape {np.shape(batch)}.")
    if dispersion is None:
        control = fixed == 0
        if not control.any():
            raise ValueError("dispersion=None estimates it from the cells pinned to the basal state, and there are "
                             "none; pass dispersion= (one NB dispersion per gene).")
        if batch is None:
            dispersion = cl.control_dispersion(Y, s, control, batch)
        else:
            dispersion = cl.control_dispersion_by_batch(Y, s, control, batch)
    labels = cl.batch_codes(batch, n)[1]
    if isinstance(dispersion, cl.BatchDispersion):
        dispersion = dispersion.rows(labels)
    phi = np.asarray(dispersion, float)
    n_batches = len(labels)
    if phi.ndim == 2 and phi.shape != (n_batches, G):
        raise ValueError(f"a dispersion per batch must have shape (batches, genes) = ({n_batches}, {G}), rows in "
                         f"the order of scotgm_pp.inference.count_layer.batch_codes; got {phi.shape}.")
    phi = (phi.copy() if n_batches > 1 else phi[0].copy()) if phi.ndim == 2 else np.broadcast_to(phi, (G,)).copy()
    if not np.all(np.isfinite(phi)) or (phi < 0).any():
        raise ValueError("dispersion must be finite and non-negative, one value per gene (or per batch and gene).")
    prior = cl.default_count_prior(Y, s, beta_sd=config["beta_sd"], delta_sd=config["delta_sd"],
                                   gamma_sd=config["gamma_sd"])
    return CountInputs(Y=Y, size_factors=s, dispersion=phi, batch=None if batch is None else np.asarray(batch),
                       genes=genes, prior=prior)


def count_variables(params: cl.CountParams, lead: tuple[str, ...] = ()) -> dict:
    """The count layer's parameters under their graph names, ``(dims, values)``: ``beta``
    (gene), ``delta`` (effect_state, gene), ``gamma`` (batch_offset, gene, with batches) and
    ``state_log_rate`` (state, gene)."""
    beta = np.asarray(params.beta)
    delta = np.asarray(params.delta)
    gamma = np.asarray(params.gamma)
    out = {
        "beta": (lead + ("gene",), beta),
        "state_log_rate": (lead + ("state", "gene"), beta[..., None, :] + delta),
    }
    if delta.shape[-2] > 1:
        out["delta"] = (lead + ("effect_state", "gene"), delta[..., 1:, :])
    if gamma.shape[-2] > 1:
        out["gamma"] = (lead + ("batch_offset", "gene"), gamma[..., 1:, :])
    return out


def count_params_from(ds, K: int) -> cl.CountParams:
    """:class:`CountParams` of a point (no chain/draw dims) Dataset holding the graph's names."""
    beta = np.asarray(ds["beta"].values, float)
    G = beta.size
    delta = np.zeros((K, G))
    if "delta" in ds:
        delta[1:] = ds["delta"].values
    gamma = np.zeros((1, G))
    if "gamma" in ds:
        gamma = np.vstack([np.zeros((1, G)), ds["gamma"].values])
    return cl.CountParams(beta=beta, delta=delta, gamma=gamma)


def effects_frame(genes, state_names, delta: np.ndarray, se: np.ndarray, *, draws: np.ndarray | None = None,
                  ci: float = 0.9) -> pd.DataFrame:
    """One row per (non-basal state, gene): ``effect`` (natural-log fold change against the basal
    state), ``effect_se``, ``effect_z``, ``effect_bound`` (the screen's ranking key,
    ``sign * max(|effect| - sqrt(2 ln G) se, 0)``), ``effect_pvalue`` (two-sided, of ``effect_z``:
    the posterior's effect over its SD, so under the ``delta`` prior a conservative test; the
    screen's ``effect_pvalue`` tests the maximum-likelihood effect instead, see
    :func:`scotgm_pp.tl._effects.effect_table`) and the ``ci`` interval (``lower``, ``upper``:
    normal for a point fit, quantiles of the draws for a sampled one)."""
    genes = [str(g) for g in genes]
    G = len(genes)
    lam = np.sqrt(2.0 * np.log(max(G, 2)))
    rows = []
    a = (1.0 - ci) / 2.0
    for k in range(1, len(state_names)):
        eff, s = np.asarray(delta[k], float), np.asarray(se[k], float)
        if draws is not None:
            lower, upper = np.quantile(draws[:, k], a, axis=0), np.quantile(draws[:, k], 1 - a, axis=0)
        else:
            z = stats.norm.ppf(1 - a)
            lower, upper = eff - z * s, eff + z * s
        with np.errstate(divide="ignore", invalid="ignore"):
            zval = eff / s
        rows.append(pd.DataFrame({
            "state": state_names[k], "gene": genes, "effect": eff, "effect_se": s, "effect_z": zval,
            "effect_bound": np.sign(eff) * np.maximum(np.abs(eff) - lam * s, 0.0),
            "effect_pvalue": 2.0 * stats.norm.sf(np.abs(zval)), "lower": lower, "upper": upper,
        }))
    return pd.concat(rows, ignore_index=True)

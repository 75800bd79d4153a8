"""The list of calls: which perturbation changed which gene, at a stated false-discovery rate."""

from __future__ import annotations

import numpy as np
import pandas as pd
from anndata import AnnData

from .._validation import InputError
from ._response import get_responses

__all__ = ["call_hits", "SCOPES"]

SCOPES = ("screen", "perturbation")


def call_hits(adata: AnnData, fdr: float = 0.1, *, scope: str = "screen", key: str = "scotgm",
              perturbation: str | None = None) -> pd.DataFrame:
    """Discoveries of :func:`~scotgm_pp.tl.perturbation_response` at false-discovery rate ``fdr``.

    Parameters
    ----------
    adata
        The analysed screen (or its responses AnnData).
    fdr
        Benjamini-Hochberg level, in (0, 1).
    scope
        ``"screen"`` (default): q-values over every perturbation x gene test of the screen
        (layer ``qval_screen``), so the expected share of false calls in the whole returned list
        is at most ``fdr``: the list a screen analysis takes forward. ``"perturbation"``: q-values
        within each perturbation (layer ``qval``), controlling the share of false calls in each
        perturbation's own list (more calls when few perturbations have effects, but no
        guarantee for the union).
    key
        ``key_added`` of the run.
    perturbation
        Only this perturbation's calls.

    Returns
    -------
    DataFrame
        One row per call, ordered by perturbation then p-value: ``perturbation``, ``gene``,
        ``direction`` (``"down"``/``"up"``: the sign of the tested contrast, guide against
        control cells, ``lfc_all_guides``), the effect estimates of the responses (every layer
        but the q-values; the model's perturbed-state ``effect`` among them), ``pval``,
        ``qval`` (of the chosen scope) and ``perturbation_effect_detected`` (the perturbation's
        "any effect" call).
    """
    if isinstance(fdr, bool) or not isinstance(fdr, (int, float, np.number)) or not 0 < fdr < 1:
        raise InputError(f"fdr must be a number in (0, 1), got {fdr!r}.")
    if scope not in SCOPES:
        raise InputError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}.")
    resp = adata if "pval" in getattr(adata, "layers", {}) else get_responses(adata, key)
    if "pval" not in resp.layers:
        raise InputError("these results carry no p-values; rerun scotgm_pp.tl.perturbation_response.")
    qname = "qval_screen" if scope == "screen" else "qval"
    q = np.asarray(resp.layers[qname], float)
    rows = np.arange(resp.n_obs)
    if perturbation is not None:
        if str(perturbation) not in set(resp.obs_names):
            raise KeyError(f"perturbation {perturbation!r} has no results.")
        rows = np.flatnonzero(resp.obs_names == str(perturbation))
    mask = np.zeros(q.shape, bool)
    mask[rows] = np.isfinite(q[rows]) & (q[rows] < fdr)
    r, g = np.nonzero(mask)
    out = {"perturbation": resp.obs_names.to_numpy()[r], "gene": resp.var_names.to_numpy()[g]}
    # the direction of the tested contrast: guide against control cells, all guide cells
    effect = next((n for n in ("lfc_all_guides", "effect") if n in resp.layers), None)
    for name in resp.layers:
        if name.startswith("qval"):
            continue
        out[name] = np.asarray(resp.layers[name])[r, g].astype(float)
    out["qval"] = q[r, g]
    df = pd.DataFrame(out)
    sign = np.sign(df[effect]) if effect else np.nan
    df.insert(2, "direction", np.where(sign < 0, "down", "up"))
    if "effect_detected" in resp.obs:
        df["perturbation_effect_detected"] = resp.obs["effect_detected"].reindex(df["perturbation"]).to_numpy()
    return df.sort_values(["perturbation", "pval"], kind="stable").reset_index(drop=True)

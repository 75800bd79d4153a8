"""Writing a run's outputs: the AnnData with results, the ranking table, a JSON summary."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from anndata import AnnData

__all__ = ["run_summary", "write_outputs"]


def _plain(v):
    if isinstance(v, np.generic):
        return v.item()
    return v


def run_summary(adata: AnnData, key: str = "scotgm") -> dict:
    """JSON-ready summary of :func:`scotgm_pp.tl.perturbation_response` results.

    Per perturbation: cells used, PCs kept and variance explained, the KS check, EM iterations and
    convergence, how guide cells were assigned (escape model), the coupling (and its diagnostics),
    the fraction of guide cells called perturbed and, when the perturbation's label is a measured
    gene, that gene's rank.
    """
    uns = adata.uns[key]
    fields = [
        "n_control", "n_guide", "n_cells_kept", "n_genes_kept", "n_pcs", "variance_explained",
        "ks_shift_significant_pcs", "ks_gaussian_rejected_pcs", "em_n_iter", "em_converged", "coupling",
        "escape_model", "fraction_perturbed", "target_rank",
    ]
    per = {}
    for pert, rec in uns["results"].items():
        entry = {f: _plain(rec[f]) for f in fields if f in rec}
        entry.update({k: _plain(v) for k, v in rec.items() if k.startswith("coupling_")})
        entry["confusion"] = {
            "rows": ["control", "guide"],
            "columns": ["basal", "perturbed"],
            "counts": np.asarray(rec["confusion"]).tolist(),
        }
        per[pert] = entry
    params = uns["params"]
    return {
        "params": json.loads(json.dumps(params, default=_plain)),
        "n_perturbations_analysed": len(per),
        "perturbations": per,
        "skipped": dict(uns.get("skipped", {})),
    }


def write_outputs(adata: AnnData, out_dir: str | Path, key: str = "scotgm", *, figures: bool = True) -> dict:
    """Write ``results.h5ad``, ``gene_rankings.csv``, ``summary.json`` (and ``figures/``) to ``out_dir``.

    Returns the paths written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    rankings = adata.uns[key]["rankings"]
    paths["gene_rankings"] = out / "gene_rankings.csv"
    rankings.sort_values(["perturbation", "rank"]).to_csv(paths["gene_rankings"], index=False)
    paths["summary"] = out / "summary.json"
    with open(paths["summary"], "w") as fh:
        json.dump(run_summary(adata, key), fh, indent=2, default=_plain)
    paths["results"] = out / "results.h5ad"
    adata.write_h5ad(paths["results"], compression="gzip")
    if figures:
        try:
            from . import pl
        except ImportError:  # pragma: no cover - plotting optional at import time
            pl = None
        if pl is not None and hasattr(pl, "save_run_figures"):
            paths["figures"] = pl.save_run_figures(adata, key, out / "figures")
    return paths

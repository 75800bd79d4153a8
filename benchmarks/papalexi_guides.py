"""Papalexi from its guide counts (issue 27): guide assignment against the published calls, the
screen run from a MuData with a guide library on the command line, each guide's perturbed
fraction, and the STAT1 check in scanpy's structure.

    python benchmarks/papalexi_guides.py [--out benchmarks/out/papalexi_guides]

Prints: the agreement of each assignment method with the published ``grna`` (the guide with the
most UMIs) on the ``confident`` cells and on all cells, with a baseline (a per-guide Gaussian
mixture on log counts, as Cell Ranger calls guides); the cells with several guides; the
per-guide table of ``guide_fractions.csv``; for the targets measured in the panel, how each
guide's fraction tracks the loss of its target's expression; STAT1 in
``sc.get.rank_genes_groups_df``.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
import warnings
from pathlib import Path

import anndata as ad
import mudata as md
import numpy as np
import pandas as pd
import scipy.sparse as sp

import scotgm_pp as sg
from scotgm_pp._guide_calls import share_mixture
from scotgm_pp.cli import main as scotgm

MEASURED = ["CMTM6", "IFNGR2", "JAK2", "NFKBIA", "STAT1", "STAT2", "STAT3", "TNFRSF14", "UBE2L6"]


def library(names) -> pd.DataFrame:
    targets = ["non-targeting" if n.startswith("NT") else re.sub(r"g\d+$", "", n) for n in names]
    return pd.DataFrame({"guide": names, "target": targets})


def log_count_mixture_calls(counts: sp.csc_matrix) -> np.ndarray:
    """Baseline: each guide's two-component Gaussian mixture on log UMIs of the cells with its UMIs
    (Cell Ranger's guide calling), the same EM as the default's, on log counts instead of shares."""
    called = np.zeros(counts.shape, bool)
    for j in range(counts.shape[1]):
        lo, hi = counts.indptr[j], counts.indptr[j + 1]
        if hi - lo < 10:
            continue
        y = np.log(counts.data[lo:hi])
        post, _ = share_mixture(y - np.median(y))  # centred: the EM starts from "above the median"
        called[counts.indices[lo:hi], j] = post > 0.5
    return called


def assignment(adata: ad.AnnData, lib: pd.DataFrame) -> pd.DataFrame:
    published = adata.obs["grna"].astype(str).to_numpy()
    confident = adata.obs["confident"].to_numpy(bool)
    names = np.asarray(adata.uns["grna_names"]).astype(str)
    rows = []
    for method, threshold in (("mixture", 5), ("umi", 5), ("max", 1)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = sg.pp.assign_guides(adata, "grna_counts", lib, method=method, threshold=threshold, copy=True)
        agree = out.obs["guide"].astype(object).to_numpy() == published
        n = out.uns["guide_assignment"]["counts"]
        rows.append({"method": f"{method}" + ("" if method == "mixture" else f" (threshold {threshold})"),
                     "agree_confident": agree[confident].mean(), "agree_all": agree.mean(),
                     "one_guide": n["one_guide"], "several_guides": n["several_guides"], "no_guide": n["no_guide"]})
    called = log_count_mixture_calls(sp.csc_matrix(adata.obsm["grna_counts"], dtype=float))
    k = called.sum(axis=1)
    guide = np.where(k == 1, names[called.argmax(axis=1)], None)
    agree = guide == published
    rows.append({"method": "baseline: mixture on log counts", "agree_confident": agree[confident].mean(),
                 "agree_all": agree.mean(), "one_guide": int((k == 1).sum()), "several_guides": int((k > 1).sum()),
                 "no_guide": int((k == 0).sum())})
    return pd.DataFrame(rows)


def target_loss(adata: ad.AnnData, guides: pd.Series) -> pd.DataFrame:
    """Per guide of a measured target: its cells' mean normalised expression of the target gene
    over the controls' (1 = no loss)."""
    X = sp.csr_matrix(adata.X, dtype=float)
    norm = sp.diags(1e4 / np.asarray(X.sum(axis=1)).ravel()) @ X
    control = (adata.obs["target"].astype(str) == "non-targeting").to_numpy()
    rows = []
    for gene in MEASURED:
        j = adata.var_names.get_loc(gene)
        col = np.asarray(norm[:, j].todense()).ravel()
        base = col[control].mean()
        for guide in sorted(set(guides[guides.str.startswith(gene + "g")])):
            rows.append({"guide": guide, "relative_expression": col[(guides == guide).to_numpy()].mean() / base})
    return pd.DataFrame(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/out/papalexi_guides")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    adata = ad.read_h5ad(sg.datasets.papalexi_path())
    names = np.asarray(adata.uns["grna_names"]).astype(str)
    lib = library(names)
    pd.set_option("display.width", 200)
    print("guide assignment against the published grna (16,192 confident cells, 20,729 in all):")
    print(assignment(adata, lib).to_string(index=False, float_format=lambda v: f"{v:.4f}"))

    rna = ad.AnnData(X=adata.X, obs=adata.obs[["bio_rep"]].copy(), var=adata.var.copy())
    gdo = ad.AnnData(X=adata.obsm["grna_counts"], obs=pd.DataFrame(index=adata.obs_names),
                     var=pd.DataFrame(index=names))
    md.MuData({"rna": rna, "gdo": gdo}).write(out / "papalexi.h5mu")
    lib.to_csv(out / "library.csv", index=False)
    t0 = time.perf_counter()
    code = scotgm(["run", str(out / "papalexi.h5mu"), "--guide-modality", "gdo", "--guide-library",
                   str(out / "library.csv"), "--control", "non-targeting", "--out", str(out / "run"), "--quiet",
                   "--overwrite"])
    print(f"scotgm run on the MuData: exit {code}, {time.perf_counter() - t0:.1f} s")
    res = sg.read_results(out / "run")
    table = pd.read_csv(out / "run" / "guide_fractions.csv")
    table["escape_model"] = np.where(table["escape_model"] == "on", "on", "fallback")
    print("\nper-guide perturbed fractions (guide_fractions.csv):")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))

    loss = target_loss(adata, res.obs["guide"].astype(str))
    merged = table.merge(loss, on="guide")
    fitted = merged[merged["escape_model"] == "on"]
    print(f"\nmeasured targets, guides with the escape model on ({len(fitted)} guides): correlation with the "
          "target's relative expression")
    for col in ("fraction_perturbed", "mean_p_perturbed"):
        r = np.corrcoef(fitted[col], fitted["relative_expression"])[0, 1]
        print(f"  {col}: Pearson {r:.3f}")
    print(fitted[["guide", "n_cells", "fraction_perturbed", "mean_p_perturbed", "relative_expression"]]
          .to_string(index=False, float_format=lambda v: f"{v:.3f}"))

    import scanpy as sc

    sg.tl.to_rank_genes_groups(res)
    df = sc.get.rank_genes_groups_df(res, group="STAT1")
    print("\nsc.get.rank_genes_groups_df(res, group='STAT1'), first rows:")
    print(df.head(5).to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Response predictors: predicted direction against the truth, simulated screens and Papalexi et al. 2021.

For every fitted perturbation whose target gene is measured, each predictor gives every gene's
response to the fitted change of the target (``scotgm_pp.tl.predict_response``, point estimate),
and we score the share of known DE genes (target excluded) whose direction it gets right. For
the API's predictors the 90% band (100 posterior draws) is scored too: the share of known DE
genes it separates from 0, and how many of those it gets right.

* simulated: ``datasets.simulate(random_state=seed)``, seeds 0-9, all 8 perturbations; truth =
  the simulator's DE genes. Reported per seed (mean over perturbations) and the worst perturbation.
* Papalexi: the 60-vs-300 protocol (60 guide cells, 300 controls, all cells), ``--pap-seeds``
  seeds x 9 measured targets; truth = full-data DEGs (``scotgm_pp.benchmark.known_degs``: scanpy
  Wilcoxon of all guide cells vs all controls, BH < 0.05). Pooled = correct / all DEG calls.

Extra predictors (not in the API) that the issue measured: equation 5 with ``S' = V S V^T`` for
``S`` the identity, the basal covariance ``S0``, ``S1`` and ``S1 - S0``.

Usage: python benchmarks/downstream_predictors.py [--sim-seeds 10] [--pap-seeds 10] [--out CSV]
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import pandas as pd

import scotgm_pp as sg
from scotgm_pp.benchmark import known_degs

METHODS = ("effect", "shift", "paper")
BAND_DRAWS = 100
TARGETS = ["CMTM6", "IFNGR2", "JAK2", "NFKBIA", "STAT1", "STAT2", "STAT3", "TNFRSF14", "UBE2L6"]


def _extra(rec: dict, i: int) -> dict[str, np.ndarray]:
    V = np.asarray(rec["loadings"], float)
    di = float(V[i] @ rec["perturbation_mean"])
    S0, S1 = rec["covariances"]

    def eq5(S):
        row = V @ (S @ V[i])
        return row / row[i] * di

    return {"eq5_identity": eq5(np.eye(V.shape[1])), "eq5_S0": eq5(S0), "eq5_S1": eq5(S1), "eq5_S1-S0": eq5(S1 - S0)}


def score(adata, pert: str, truth: dict[str, int]) -> list[dict]:
    rec = sg.tl.get_record(adata, pert)
    genes = list(np.asarray(rec["genes"]).astype(str))
    if pert not in genes:
        return []
    known = {g: s for g, s in truth.items() if g != pert and g in genes}
    if not known:
        return []
    tables = {m: sg.tl.predict_response(adata, pert, method=m, n_draws=BAND_DRAWS, random_state=0).set_index("gene")
              for m in METHODS}
    preds = {m: t["delta"] for m, t in tables.items()}
    preds.update({k: pd.Series(v, index=genes) for k, v in _extra(rec, genes.index(pert)).items()})
    out = []
    for name, p in preds.items():
        hits = np.array([np.sign(p[g]) == s for g, s in known.items()])
        row = {"perturbation": pert, "method": name, "accuracy": float(np.mean(hits)), "n_deg": len(hits),
               "correct": int(np.sum(hits))}
        if name in tables:  # the 90% band from posterior draws: genes it calls, and how many rightly
            t = tables[name].loc[list(known)]
            called = (np.sign(t["lower"]) == np.sign(t["upper"])).to_numpy()
            row.update(n_called=int(called.sum()), correct_called=int(hits[called].sum()))
        out.append(row)
    return out


def simulated(n_seeds: int) -> pd.DataFrame:
    rows = []
    for seed in range(n_seeds):
        ad = sg.datasets.simulate(random_state=seed)
        sg.tl.perturbation_response(ad, "perturbation", "control", n_jobs=1)
        truth = ad.uns["simulation"]["de_genes"]
        for pert in ad.uns["scotgm"]["summary"].index:
            rows += [{**r, "seed": seed} for r in score(ad, pert, truth[pert])]
    return pd.DataFrame(rows)


def papalexi(n_seeds: int) -> pd.DataFrame:
    ad = sg.datasets.read(sg.datasets.papalexi_path(), "target", "non-targeting")
    degs, _ = known_degs(ad, "target", "non-targeting", TARGETS)
    lab = ad.obs["target"].astype(str).to_numpy()
    ctrl = np.flatnonzero(lab == "non-targeting")
    rows = []
    for seed in range(n_seeds):
        rng = np.random.default_rng(seed)
        c_idx = rng.choice(ctrl, 300, replace=False)
        for target in TARGETS:
            g_idx = rng.choice(np.flatnonzero(lab == target), 60, replace=False)
            sub = ad[np.r_[c_idx, g_idx]].copy()
            sg.tl.perturbation_response(sub, "target", "non-targeting", random_state=seed, n_jobs=1)
            if target in sub.uns["scotgm"]["summary"].index:
                rows += [{**r, "seed": seed} for r in score(sub, target, degs[target])]
    return pd.DataFrame(rows)


def _band(df: pd.DataFrame) -> pd.DataFrame:
    """Per method: share of known DE genes whose 90% band excludes 0, and the direction accuracy among them."""
    b = df.dropna(subset=["n_called"]).groupby("method")[["n_deg", "n_called", "correct_called"]].sum()
    return pd.DataFrame({"band_excludes_0": b["n_called"] / b["n_deg"],
                         "accuracy_when_excluded": b["correct_called"] / b["n_called"].clip(lower=1)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sim-seeds", type=int, default=10)
    ap.add_argument("--pap-seeds", type=int, default=10)
    ap.add_argument("--out", default=None, help="write the per-perturbation rows to this CSV prefix")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    t = time.time()
    pd.set_option("display.width", 160)
    if args.sim_seeds:
        sim = simulated(args.sim_seeds)
        per_seed = sim.groupby(["method", "seed"])["accuracy"].mean().unstack()
        table = pd.DataFrame({"mean_over_seeds": per_seed.mean(axis=1), "worst_seed_mean": per_seed.min(axis=1),
                              "worst_perturbation": sim.groupby("method")["accuracy"].min(),
                              "perturbations_below_0.75": sim[sim["accuracy"] < 0.75].groupby("method").size()})
        print(f"simulated, seeds 0-{args.sim_seeds - 1}, {sim['perturbation'].nunique()} perturbation labels, "
              f"{len(sim) // sim['method'].nunique()} perturbations")
        print(per_seed.round(3).to_string())
        print(table.fillna(0).round(3).to_string())
        print(_band(sim).round(3).to_string())
        if args.out:
            sim.to_csv(f"{args.out}_sim.csv", index=False)
    if args.pap_seeds:
        pap = papalexi(args.pap_seeds)
        by_target = pap.groupby(["method", "perturbation"])["accuracy"].mean().unstack()
        by_target["pooled"] = pap.groupby("method").apply(lambda x: x["correct"].sum() / x["n_deg"].sum(),
                                                          include_groups=False)
        print(f"Papalexi 60 vs 300, seeds 0-{args.pap_seeds - 1}; DEGs per target: "
              f"{pap.groupby('perturbation')['n_deg'].first().to_dict()}")
        print(by_target.round(3).to_string())
        print(_band(pap).round(3).to_string())
        if args.out:
            pap.to_csv(f"{args.out}_papalexi.csv", index=False)
    print(f"{time.time() - t:.0f} s")


if __name__ == "__main__":
    main()

"""Can a classifier tell synthetic cells from real ones? Simulated screens and Papalexi STAT1.

Real cells: the guide cells that were truly perturbed (simulation: not escaped; Papalexi: those
the model classifies perturbed). Synthetic: as many cells from ``scotgm_pp.tl.sample_cells``.
Scores (5-fold cross-validated ROC AUC, logistic regression on standardised features, C = 0.1;
0.5 = indistinguishable; with no signal this CV estimate sits below 0.5):

* ``auc_counts``: features = raw counts of the record's genes;
* ``auc_lognorm``: features = log1p(counts per 10k of the cell's total over those genes);
* ``auc_second``: second moments only. Both groups are projected on the 10 leading PCs of
  reference basal cells (log-normalised, scaled), each group centred on its own mean, and the
  classifier sees the squared scores: it cannot use mean differences, only spread along the
  genes' shared programs (where independent genes fail). ``variance_ratio``: median over those
  PCs of the synthetic cells' variance over the real cells'. The reference cells must be cells no
  synthetic cell starts from (a sample's own leading PCs overstate its variance along them):
  simulation, the escaped guide cells of the other perturbations; Papalexi, controls outside the
  analysed screen.

Kinds: ``perturbed`` (default ``dependence="state"``), ``perturbed_independent`` (the declared
graph's independent genes), ``counterfactual`` (control cells moved), ``basal`` (a positive
control: synthetic basal cells against real perturbed ones).

Usage: python benchmarks/downstream_synthetic_auc.py [--sim-seeds 10] [--pap-seeds 3] [--out CSV]
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import scotgm_pp as sg
from scotgm_pp.tl._synthetic import gene_counts

KINDS = {"perturbed": dict(state="perturbed"), "perturbed_independent": dict(state="perturbed", dependence="independent"),
         "counterfactual": dict(state="counterfactual"), "basal": dict(state="basal")}


def cv_auc(a: np.ndarray, b: np.ndarray) -> float:
    X = np.vstack([a, b])
    y = np.r_[np.zeros(len(a)), np.ones(len(b))]
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000, solver="liblinear"))
    return float(cross_val_score(clf, X, y, cv=StratifiedKFold(5, shuffle=True, random_state=0), scoring="roc_auc").mean())


def lognorm(c: np.ndarray) -> np.ndarray:
    return np.log1p(c / np.maximum(c.sum(axis=1, keepdims=True), 1.0) * 1e4)


def second_moment_auc(a: np.ndarray, b: np.ndarray, reference: np.ndarray, k: int = 10) -> tuple[float, float]:
    Z = lognorm(reference)
    mu, sd = Z.mean(0), Z.std(0) + 1e-9
    U = np.linalg.svd((Z - mu) / sd, full_matrices=False)[2][:k].T
    fa, fb = ((lognorm(a) - mu) / sd) @ U, ((lognorm(b) - mu) / sd) @ U
    ratio = float(np.median(fb.var(0) / np.maximum(fa.var(0), 1e-12)))
    return cv_auc((fa - fa.mean(0)) ** 2, (fb - fb.mean(0)) ** 2), ratio


def score(adata, pert: str, real_rows: np.ndarray, reference, seed: int) -> list[dict]:
    """Every kind of synthetic cell against the real ones; ``reference``: (AnnData, rows) of the PC frame."""
    genes = np.asarray(sg.tl.get_record(adata, pert)["genes"]).astype(str)
    real = gene_counts(adata, real_rows, genes)
    ref = gene_counts(reference[0], reference[1], genes)
    rows = []
    for kind, kw in KINDS.items():
        synth = sg.tl.sample_cells(adata, pert, len(real_rows), random_state=seed, **kw).layers["counts"].toarray()
        second, ratio = second_moment_auc(real, synth, ref)
        rows.append({"perturbation": pert, "kind": kind, "n_real": len(real_rows), "auc_counts": cv_auc(real, synth),
                     "auc_lognorm": cv_auc(lognorm(real), lognorm(synth)), "auc_second": second,
                     "variance_ratio": ratio})
    return rows


def simulated(n_seeds: int) -> pd.DataFrame:
    rows = []
    for seed in range(n_seeds):
        ad = sg.datasets.simulate(random_state=seed)
        sg.tl.perturbation_response(ad, "perturbation", "control", n_jobs=1)
        lab = ad.obs["perturbation"].astype(str).to_numpy()
        escaped = ad.obs["escaped"].to_numpy()
        for pert in ad.uns["scotgm"]["summary"].index:
            real = np.flatnonzero((lab == pert) & ~escaped)
            frame = np.flatnonzero((lab != pert) & escaped)  # basal cells that no synthetic cell starts from
            rows += [{**r, "seed": seed} for r in score(ad, pert, real, (ad, frame), seed)]
    return pd.DataFrame(rows)


def papalexi(n_seeds: int) -> pd.DataFrame:
    """The notebook protocol: 300 controls and 150 cells of STAT1, JAK2 and IFNGR2; STAT1 scored."""
    ad = sg.datasets.read(sg.datasets.papalexi_path(), "target", "non-targeting")
    lab = ad.obs["target"].astype(str).to_numpy()
    rows = []
    for seed in range(n_seeds):
        rng = np.random.default_rng(seed)
        keep = [rng.choice(np.flatnonzero(lab == "non-targeting"), 300, replace=False)]
        keep += [rng.choice(np.flatnonzero(lab == t), 150, replace=False) for t in ("STAT1", "JAK2", "IFNGR2")]
        screen = ad[np.concatenate(keep)].copy()
        sg.tl.perturbation_response(screen, "target", "non-targeting", random_state=0, n_jobs=1)
        obs = screen.obs
        real = np.flatnonzero(((obs["target"] == "STAT1") & (obs["scotgm_class"] == "perturbed")).to_numpy())
        unused = np.setdiff1d(np.flatnonzero(lab == "non-targeting"), keep[0])[:300]  # the PC frame
        rows += [{**r, "seed": seed} for r in score(screen, "STAT1", real, (ad, unused), seed)]
    return pd.DataFrame(rows)


def _report(df: pd.DataFrame, label: str, by_seed: bool) -> None:
    metrics = ["auc_counts", "auc_lognorm", "auc_second", "variance_ratio"]
    print(label)
    if by_seed:
        seed_means = df.groupby(["kind", "seed"])[metrics].mean()
        table = pd.concat({"mean": seed_means.groupby("kind").mean(), "worst_seed": seed_means.groupby("kind").max(),
                           "worst_perturbation": df.groupby("kind")[metrics].max()}, axis=1)
    else:
        table = pd.concat({"mean": df.groupby("kind")[metrics].mean(), "max": df.groupby("kind")[metrics].max()}, axis=1)
    print(table.round(3).to_string())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sim-seeds", type=int, default=10)
    ap.add_argument("--pap-seeds", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    pd.set_option("display.width", 200)
    t = time.time()
    if args.sim_seeds:
        sim = simulated(args.sim_seeds)
        _report(sim, f"simulated, seeds 0-{args.sim_seeds - 1}, {len(sim) // len(KINDS)} perturbations "
                     "(worst = largest AUC)", True)
        if args.out:
            sim.to_csv(f"{args.out}_sim.csv", index=False)
    if args.pap_seeds:
        pap = papalexi(args.pap_seeds)
        _report(pap, f"Papalexi STAT1 (300 controls, 150 cells per target), seeds 0-{args.pap_seeds - 1}", False)
        if args.out:
            pap.to_csv(f"{args.out}_papalexi.csv", index=False)
    print(f"{time.time() - t:.0f} s")


if __name__ == "__main__":
    main()

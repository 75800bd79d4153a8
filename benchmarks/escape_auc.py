"""Escaped cells: scotgm's perturbed-state posterior against pertpy's Mixscape, on the same screens.

Simulated screens with known escapes (``sg.datasets.simulate``): 6 perturbations, 150 guide cells
each (40% escaped), 600 controls, about 3,000 UMIs per cell. Two scenarios:

* ``issue``: every perturbation moves its target (to 10%) and 12 downstream genes (the setting of
  the measurements that opened issue 23);
* ``broad``: closer to 10x screens: each perturbation moves its target and 3 to 300 downstream
  genes (log-uniform), shifts the shared expression programs (``program_shift=0.5``) and
  library sizes vary more (log-sd 0.5).

For every perturbation the AUC of each method's per-cell score against the truth (perturbed =
not escaped) is computed on the guide cells: scotgm's ``scotgm_p_perturbed`` from the default
``sg.tl.perturbation_response`` (and, with ``--with-pca``, the paper's PCA state space), and
Mixscape's ``mixscape_class_p_ko`` (pertpy: normalise, log1p, PCA, ``perturbation_signature``,
``mixscape``; a perturbation it finds no DE genes for scores 0.5), and with ``--with-oracle`` a
reference that knows the truth (:func:`oracle_scores`) and the signature's feature space along the
true direction (:func:`oracle_direction_scores`). Printed per gene count: the
mean over all perturbations and seeds and the worst perturbation, for each method side by side;
the share of perturbations moving at least 5 genes for which scotgm's escape model was fitted
(not a fallback); seconds per method.

    python benchmarks/escape_auc.py --scenario issue --genes 300 2000 5000 --seeds 10 --out benchmarks/out/escape_issue.csv

Needs pertpy for the Mixscape column (``pip install pertpy``; without it only scotgm is run).
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

import scotgm_pp as sg

SCENARIOS = {
    "issue": dict(n_de_genes=12),
    "broad": dict(n_de_genes=(3, 300), program_shift=0.5, library_size_sd=0.5),
}


def screen(scenario: str, n_genes: int, seed: int):
    return sg.datasets.simulate(n_genes=n_genes, n_perturbations=6, n_control=600, n_cells_per_perturbation=150,
                                escape_fraction=0.4, library_size=3000.0, random_state=seed, **SCENARIOS[scenario])


def aucs(adata, score: np.ndarray) -> dict[str, float]:
    lab = adata.obs["perturbation"].astype(str).to_numpy()
    escaped = adata.obs["escaped"].to_numpy()
    out = {}
    for p in sorted(set(lab) - {"control"}):
        r = lab == p
        s = np.nan_to_num(np.asarray(score, float)[r], nan=0.0)
        out[p] = roc_auc_score(~escaped[r], s) if np.ptp(s) > 0 else 0.5
    return out


def oracle_scores(adata, dispersion: float = 10.0) -> np.ndarray:
    """Each guide cell's negative-binomial log-likelihood ratio, perturbed against basal, over the
    genes its perturbation truly moves, with the true effects, basal shares and NB size, and the
    cell's library size. The programs' variation is not known to it, so it is a reference, not an
    upper bound: a score that discounts the programs can beat it."""
    from scipy.special import gammaln

    sim = adata.uns["simulation"]
    order = list(np.asarray(sim["perturbations"]).astype(str))
    lfc = np.asarray(sim["log_fold_change"], float)
    base = np.asarray(sim["base_log_share"], float)
    lab = adata.obs["perturbation"].astype(str).to_numpy()
    lib = adata.obs["library_size"].to_numpy(float)
    out = np.zeros(adata.n_obs)
    k = dispersion

    def nb(y, m):
        return gammaln(y + k) - gammaln(k) + k * np.log(k / (k + m)) + y * np.log(m / (k + m))

    for p in set(lab) - {sim["control"]}:
        rows = np.flatnonzero(lab == p)
        moved = np.flatnonzero(lfc[order.index(p)] != 0)
        y = np.asarray(adata.X[rows][:, moved].todense(), float)
        mu0 = lib[rows, None] * np.exp(base[moved])[None, :]
        mu1 = mu0 * np.exp(lfc[order.index(p), moved])[None, :]
        out[rows] = (nb(y, mu1) - nb(y, mu0)).sum(axis=1)
    return out


def oracle_direction_scores(adata) -> np.ndarray:
    """Each guide cell's score on the signature's own features (clipped Pearson residuals against
    its experiment's controls, ``scotgm_pp.tl._signature``) along the true direction: the
    perturbed cells' mean residual minus the controls', on the genes the perturbation truly moves
    only, whitened by the controls' factor model. It knows which genes move and which cells are
    perturbed (in-sample, no cross-fitting): the AUC the signature could reach if its direction
    were estimated without error, a ceiling of its feature space rather than of the counts."""
    from scotgm_pp.tl._signature import BASAL_RANK, _whiten, basal_factors, pearson_residuals

    sim = adata.uns["simulation"]
    order = list(np.asarray(sim["perturbations"]).astype(str))
    lfc = np.asarray(sim["log_fold_change"], float)
    lab = adata.obs["perturbation"].astype(str).to_numpy()
    escaped = adata.obs["escaped"].to_numpy()
    X = adata.X.tocsr()
    out = np.zeros(adata.n_obs)
    for p in set(lab) - {sim["control"]}:
        rows = np.flatnonzero((lab == p) | (lab == sim["control"]))
        ctrl = lab[rows] == sim["control"]
        Y = X[rows]
        Z, used = pearson_residuals(Y, np.asarray(Y.sum(axis=1), float).ravel(), ctrl)
        perturbed = ~ctrl & ~escaped[rows]
        L, psi = basal_factors(Z[ctrl] - Z[ctrl].mean(axis=0), BASAL_RANK)
        d = np.where(lfc[order.index(p), used] != 0, Z[perturbed].mean(axis=0) - Z[ctrl].mean(axis=0), 0.0)
        w, _ = _whiten(d, L, psi)
        out[rows[~ctrl]] = Z[~ctrl] @ w
    return out


def run_scotgm(adata, state_space: str):
    a = adata.copy()
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sg.tl.perturbation_response(a, "perturbation", "control", state_space=state_space, n_jobs=1)
    seconds = time.perf_counter() - t
    summary = a.uns["scotgm"]["summary"]
    return aucs(a, a.obs["scotgm_p_perturbed"].to_numpy()), summary["escape_model"].astype(str).to_dict(), seconds


def run_mixscape(adata):
    import pertpy as pt
    import scanpy as sc

    a = adata.copy()
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.normalize_total(a, target_sum=1e4)
        sc.pp.log1p(a)
        sc.pp.pca(a, n_comps=40, random_state=0)
        ms = pt.tl.Mixscape()
        ms.perturbation_signature(a, "perturbation", "control")
        ms.mixscape(a, "perturbation", "control", layer="X_pert", random_state=0)
    seconds = time.perf_counter() - t
    return aucs(a, a.obs["mixscape_class_p_ko"].to_numpy()), seconds


def main(argv=None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", choices=sorted(SCENARIOS), default="issue")
    ap.add_argument("--genes", type=int, nargs="+", default=[300, 2000, 5000])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--with-pca", action="store_true", help="also scotgm with the paper's PCA state space")
    ap.add_argument("--no-mixscape", action="store_true")
    ap.add_argument("--with-oracle", action="store_true",
                    help="also two references that know the truth: the true-parameter NB likelihood ratio "
                         "of the moved genes, and the signature's features along the true direction")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    try:
        import pertpy  # noqa: F401

        mixscape = not args.no_mixscape
    except ImportError:
        print("pertpy is not installed: Mixscape is left out (pip install pertpy)")
        mixscape = False
    rows = []
    for G in args.genes:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            adata = screen(args.scenario, G, seed)
            moved = adata.uns["simulation"]["n_moved"]
            sc_auc, status, sc_sec = run_scotgm(adata, "signature")
            extra = {}
            if args.with_pca:
                pca_auc, _, pca_sec = run_scotgm(adata, "pca")
                extra = {"pca": (pca_auc, pca_sec)}
            if mixscape:
                extra["mixscape"] = run_mixscape(adata)
            if args.with_oracle:
                extra["oracle"] = (aucs(adata, oracle_scores(adata)), 0.0)
                extra["oracle_dir"] = (aucs(adata, oracle_direction_scores(adata)), 0.0)
            for p in sc_auc:
                row = {"scenario": args.scenario, "n_genes": G, "seed": seed, "perturbation": p,
                       "n_moved": int(moved[p]), "scotgm": sc_auc[p], "escape_model": status.get(p, "not analysed"),
                       "scotgm_seconds": sc_sec}
                for name, (auc, sec) in extra.items():
                    row[name], row[f"{name}_seconds"] = auc[p], sec
                rows.append(row)
            done = pd.DataFrame([r for r in rows if r["n_genes"] == G and r["seed"] == seed])
            cols = [c for c in ("scotgm", "pca", "mixscape", "oracle", "oracle_dir") if c in done]
            print(f"{args.scenario} G={G} seed={seed}: " + ", ".join(f"{c} {done[c].mean():.3f}" for c in cols),
                  flush=True)
    df = pd.DataFrame(rows)
    methods = [c for c in ("scotgm", "pca", "mixscape", "oracle", "oracle_dir") if c in df]
    print(f"\nscenario {args.scenario}: escape AUC over seeds {args.first_seed}-{args.first_seed + args.seeds - 1}, "
          "6 perturbations each (mean over perturbations and seeds / worst perturbation)")
    header = "genes  " + "  ".join(f"{m:>17}" for m in methods) + "  fitted(>=5 genes moved)"
    print(header)
    for G, g in df.groupby("n_genes"):
        cells = "  ".join(f"{g[m].mean():8.3f} / {g[m].min():5.3f}" for m in methods)
        big = g[g["n_moved"] >= 5]
        fitted = float((big["escape_model"] == "on").mean()) if len(big) else float("nan")
        secs = "  ".join(f"{m} {g[f'{m}_seconds'].groupby(g['seed']).first().mean():.1f}s"
                         for m in methods if not m.startswith("oracle"))
        print(f"{G:5d}  {cells}  {fitted:6.1%} of {len(big)}   ({secs} per screen)")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(args.out, index=False)
    return df


if __name__ == "__main__":
    main()

"""Lever experiments for sc-OTGM on the Papalexi 2021 subset (target-gene ranking, 9 targets).

Every configuration runs on the same draws as the baselines (run_benchmark's protocol: 60 guide
cells, 300 controls, seeds 0-9). Nothing is chosen per perturbation or with the true target.

    python benchmarks/papalexi_levers.py [--seeds 10] [--out benchmarks/out/levers]
    [--only NAME ...] [--deg]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
from scipy import stats

from scotgm_pp import datasets
from scotgm_pp.benchmark import logfc_method, run_benchmark, scanpy_method, scotgm_method
from scotgm_pp.pp import PreprocessParams, pca_projection
from scotgm_pp.tl import fit_perturbation, gene_statistics

P = PreprocessParams


# ---- prototypes that need a change inside the package (a normal-score transform before the PCA) ----


def normal_scores(X: np.ndarray) -> np.ndarray:
    """Per-gene rank-based inverse normal transform (Gaussian copula), ties get average ranks."""
    n = X.shape[0]
    return stats.norm.ppf((stats.rankdata(X, axis=0) - 0.5) / n)


def _dense(pair) -> np.ndarray:
    X = pair.lognorm.X
    return np.asarray(X.toarray() if hasattr(X, "toarray") else X, float)


def _fit(pair, transform: str, coupling: str = "ot", escape: bool = True, cap: int | None = None):
    """analyse_pair's steps on the pair's log-normalised cells, optionally normal-score transformed.

    ``cap``: the most PCs kept (prepare_pair's cap is a third of the smaller group: 20 here).
    """
    key = ("lever", transform, coupling, escape, cap)
    if key not in pair.cache:
        X = _dense(pair)
        c = pair.lognorm_is_control
        Xt = normal_scores(X) if transform == "ns" else X
        limit = max(1, min(100, min(c.sum(), (~c).sum()) // 3)) if cap is None else cap
        pca = pca_projection(Xt, variance_threshold=0.4, max_pcs=limit)
        fit = fit_perturbation(pca.scores, c, coupling=coupling, escape_model=escape, random_state=pair.seed)
        pair.cache[key] = (Xt, pca, fit)
    return pair.cache[key]


def proto(transform: str, score: str, **kw):
    def run(pair):
        Xt, pca, fit = _fit(pair, transform, **kw)
        if score == "model":
            s = gene_statistics(pca.loadings, fit.mean, fit.cov)["score"].to_numpy()
        elif score == "model_shift":  # V (mu1 - mu0) back in unscaled units
            s = (pca.loadings @ fit.mean) * pca.gene_std
        elif score == "state_shift":  # gene-space M-step means given p_perturbed
            w1 = fit.p_perturbed
            w0 = 1 - w1
            s = w1 @ Xt / w1.sum() - w0 @ Xt / w0.sum()
        else:
            raise ValueError(score)
        return pd.Series(s, index=pair.lognorm.var_names.astype(str))

    return run


def ns_shift(pair):
    """Baseline without the model: mean normal-score difference, all guide vs control cells."""
    X = normal_scores(_dense(pair))
    c = pair.lognorm_is_control
    return pd.Series(X[~c].mean(0) - X[c].mean(0), index=pair.lognorm.var_names.astype(str))


def levers() -> dict:
    m = {
        "t-test": scanpy_method("t-test"),
        "wilcoxon": scanpy_method("wilcoxon"),
        "logfc": logfc_method,
        # the paper's prototype: two states, independent coupling, 40% variance PCs, no escape model
        "paper-proto: indep, no escape, 40%": scotgm_method("independent", escape_model=False, score="mu_sigma"),
        "indep, escape, 40%": scotgm_method("independent", score="mu_sigma"),
        "ot, no escape, 40%": scotgm_method("ot", escape_model=False, score="mu_sigma"),
        "ot, escape, 40%": scotgm_method("ot", score="mu_sigma"),
        "ot, escape, 60%": scotgm_method("ot", params=P(variance_threshold=0.6), score="mu_sigma"),
        "ot, escape, 80%": scotgm_method("ot", params=P(variance_threshold=0.8), score="mu_sigma"),
        "ot, escape, max PCs": scotgm_method("ot", params=P(variance_threshold=1.0), score="mu_sigma"),
        "indep, escape, max PCs": scotgm_method("independent", params=P(variance_threshold=1.0), score="mu_sigma"),
        "ot, escape, 10 PCs": scotgm_method("ot", params=P(n_pcs=10), score="mu_sigma"),
        "ot, escape, 40%, HVG": scotgm_method("ot", params=P(use_highly_variable=True), score="mu_sigma"),
        "ot, escape, 40%, reg 0.1": scotgm_method("ot", regularization=0.1, score="mu_sigma"),
        "ot, escape, 40%, state_t": scotgm_method("ot", score="state_t"),
        "ot, escape, 80%, state_t": scotgm_method("ot", params=P(variance_threshold=0.8), score="state_t"),
        "ot, escape, max PCs, state_t": scotgm_method("ot", params=P(variance_threshold=1.0), score="state_t"),
        "ot, no escape, state_t": scotgm_method("ot", escape_model=False, score="state_t"),
        "ot, escape, 40%, state_shift": scotgm_method("ot", score="state_shift"),
        "ot, escape, 40%, model_shift (V mu * gene_std)": proto("ln", "model_shift"),
        "normal scores: ot, escape, model": proto("ns", "model"),
        "normal scores: ot, escape, model_shift": proto("ns", "model_shift"),
        "normal scores: ot, no escape, model_shift": proto("ns", "model_shift", escape=False),
        "normal scores: ot, escape, state_shift": proto("ns", "state_shift"),
        "normal scores: ot, no escape, state_shift": proto("ns", "state_shift", escape=False),
        "normal-score shift, no model (baseline)": ns_shift,
        "ot, escape, 40%, PC cap 40": proto("ln", "model", cap=40),
        "ot, escape, 40%, PC cap 100": proto("ln", "model", cap=100),
        "ot, escape, 40%, PC cap 100, state_shift": proto("ln", "state_shift", cap=100),
    }
    return m


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--out", default="benchmarks/out/levers")
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--deg", action="store_true")
    a = ap.parse_args()
    adata = datasets.read(datasets.papalexi_path(), "target", "non-targeting")
    methods = levers()
    if a.only:
        methods = {k: v for k, v in methods.items() if k in a.only or k in ("t-test", "wilcoxon", "logfc")}
    t0 = time.time()
    res = run_benchmark(adata, "target", "non-targeting", seeds=a.seeds, methods=methods, deg=a.deg,
                        out_dir=a.out, progress=True)
    pd.set_option("display.width", 200)
    print(res.topk.drop(columns="default").to_string(index=False))
    print(res.timings.to_string(index=False))
    if a.deg:
        print(res.deg_summary.to_string(index=False))
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()

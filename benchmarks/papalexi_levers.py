"""Lever experiments for sc-OTGM on the Papalexi 2021 subset (target-gene ranking, 9 targets).

Every configuration runs on the same draws as the baselines (run_benchmark's protocol: 60 guide
cells, 300 controls, seeds 0-9). Nothing is chosen per perturbation or with the true target.

    /work/venv/bin/python benchmarks/papalexi_levers.py [--seeds 10] [--out benchmarks/out/levers]
    [--only NAME ...] [--deg]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd

from scotgm_pp import datasets
from scotgm_pp.benchmark import run_benchmark, scanpy_method, logfc_method, scotgm_method
from scotgm_pp.pp import PreprocessParams

P = PreprocessParams


def levers() -> dict:
    m = {
        "t-test": scanpy_method("t-test"),
        "wilcoxon": scanpy_method("wilcoxon"),
        "logfc": logfc_method,
        # the paper's prototype: two states, independent coupling, 40% variance PCs, no escape model
        "paper-proto: indep, no escape, 40%": scotgm_method("independent", escape_model=False),
        "indep, escape, 40%": scotgm_method("independent"),
        "ot, no escape, 40%": scotgm_method("ot", escape_model=False),
        "ot, escape, 40%": scotgm_method("ot"),
        "ot, escape, 60%": scotgm_method("ot", params=P(variance_threshold=0.6)),
        "ot, escape, 80%": scotgm_method("ot", params=P(variance_threshold=0.8)),
        "ot, escape, max PCs": scotgm_method("ot", params=P(variance_threshold=1.0)),
        "indep, escape, max PCs": scotgm_method("independent", params=P(variance_threshold=1.0)),
        "ot, escape, 10 PCs": scotgm_method("ot", params=P(n_pcs=10)),
        "ot, escape, 40%, HVG": scotgm_method("ot", params=P(use_highly_variable=True)),
        "ot, escape, 40%, reg 0.1": scotgm_method("ot", regularization=0.1),
        "ot, escape, 40%, state_t": scotgm_method("ot", score="state_t"),
        "ot, escape, 80%, state_t": scotgm_method("ot", params=P(variance_threshold=0.8), score="state_t"),
        "ot, escape, max PCs, state_t": scotgm_method("ot", params=P(variance_threshold=1.0), score="state_t"),
        "ot, no escape, state_t": scotgm_method("ot", escape_model=False, score="state_t"),
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

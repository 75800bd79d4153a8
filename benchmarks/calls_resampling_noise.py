"""How much the target power of the calls moves with the resampling seed and the number of resamples.

    python benchmarks/calls_resampling_noise.py --offsets 100 200 300 --resamples 500 1000

Papalexi 60-vs-300 protocol (seeds 0-9, the benchmark's draws), the 9 measured targets: the
share of experiments where the target is a (down) discovery at q < 0.1 (BH within the
experiment) by :func:`scotgm_pp.tl._calls.resampling_test` with the controls' dispersion, for
each resampling seed offset and number of resamples.
"""

import argparse
import warnings

import numpy as np

import scotgm_pp as sg
from scotgm_pp._screen import scan_counts
from scotgm_pp.tl._calls import bh_qvalues, resampling_test

MEASURED = ["CMTM6", "IFNGR2", "JAK2", "NFKBIA", "STAT1", "STAT2", "STAT3", "TNFRSF14", "UBE2L6"]

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--offsets", type=int, nargs="+", default=[100, 200, 300])
    ap.add_argument("--resamples", type=int, nargs="+", default=[500, 1000])
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    adata = sg.datasets.read(sg.datasets.papalexi_path(), "target", "non-targeting")
    labels = adata.obs["target"].astype(str).to_numpy()
    X = adata.X.tocsr()
    controls = np.flatnonzero(labels == "non-targeting")
    scan = scan_counts(X, labels == "non-targeting")
    genes = list(adata.var_names)
    for B in args.resamples:
        for offset in args.offsets:
            hits = []
            for seed in range(10):
                for target in MEASURED:
                    rng = np.random.default_rng(seed)
                    ctrl = np.sort(rng.choice(controls, 300, replace=False))
                    guide_all = np.flatnonzero(labels == target)
                    guide = np.sort(rng.choice(guide_all, min(60, len(guide_all)), replace=False))
                    rows = np.sort(np.r_[ctrl, guide])
                    Y = X[rows]
                    keep = np.flatnonzero(np.asarray((Y > 0).sum(0)).ravel() >= 3)
                    res = resampling_test(Y[:, keep], np.isin(rows, ctrl), library_size=scan.library_size[rows],
                                          dispersion=scan.dispersion[keep], random_state=seed + offset, n_resamples=B)
                    q = bh_qvalues(res.pval)
                    t = np.flatnonzero(keep == genes.index(target))
                    hits.append(bool(t.size and q[t[0]] < 0.1 and res.z[t[0]] < 0))
            print(f"resamples {B}, seed offset {offset}: power {np.mean(hits):.3f}", flush=True)

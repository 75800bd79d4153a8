"""What mattered for the model-free count test (``nb-all-guides``, the default before issue 11) on
the Papalexi small-sample protocol.

Every row ranks genes of the same experiments (60 guide vs 300 control cells, the 9 measured
targets) through ``scotgm_pp.benchmark.run_benchmark``; only the ranking statistic changes:

- the test (``lfc_all_guides_bound``: NB fold change, moment dispersion, bound at sqrt(2 ln G) * se),
  with and without replicate strata (``bio_rep``);
- the bound's threshold (2.5, 3.0, 4.5 instead of sqrt(2 ln 299) = 3.38), the plain z and the
  plain fold change (threshold 0);
- Poisson instead of NB standard errors;
- the effect in the model's perturbed state (guide cells weighted by ``p_perturbed``) instead of
  every guide cell;
- scanpy's Wilcoxon test as the baseline.

    python benchmarks/papalexi_count_layer.py [--seeds 10] [--first-seed 0] [--out DIR]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd

from scotgm_pp import datasets
from scotgm_pp.benchmark import run_benchmark, scanpy_method
from scotgm_pp.benchmark._methods import scotgm_method
from scotgm_pp.tl import count_shift
from scotgm_pp.tl._counts import bound_order_score


def counts_method(*, threshold=None, batch=True, poisson=False, perturbed_state=False, z=False):
    ranker = scotgm_method("ot", score="effect_bound")

    def run(pair):
        if perturbed_state:
            ranker(pair)  # fits the model once per experiment (cached on the pair)
            _, _, p = next(v for k, v in pair.cache.items() if k[0] == "scotgm")
        ln = pair.lognorm
        rows = pair.counts.obs_names.get_indexer(ln.obs_names)
        cols = pair.counts.var_names.get_indexer(ln.var_names)
        y = pair.counts.X[rows][:, cols]
        b = pair.batch[rows] if (batch and pair.batch is not None) else None
        w = p.reindex(ln.obs_names).to_numpy(float) if perturbed_state else None
        tab = count_shift(y, pair.lognorm_is_control, batch=b, weights=w, threshold=threshold,
                          dispersion=0.0 if poisson else None)
        score = tab["lfc_z"] if z else bound_order_score(tab["lfc_bound"], tab["lfc_z"])
        return pd.Series(np.asarray(score, float), index=ln.var_names.astype(str))

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).with_name("out") / "count_layer"))
    args = ap.parse_args()
    adata = datasets.read(datasets.papalexi_path(), "target", "non-targeting")
    methods = {
        "nb-all-guides (bio_rep strata, lambda=sqrt(2 ln G))": counts_method(),
        "no strata": counts_method(batch=False),
        "lambda=2.5": counts_method(threshold=2.5),
        "lambda=3.0": counts_method(threshold=3.0),
        "lambda=4.5": counts_method(threshold=4.5),
        "z (no bound)": counts_method(z=True),
        "lfc (lambda=0)": counts_method(threshold=0.0),
        "Poisson se": counts_method(poisson=True),
        "perturbed state (p_perturbed weights)": counts_method(perturbed_state=True),
        "wilcoxon (scanpy)": scanpy_method("wilcoxon"),
    }
    t0 = time.perf_counter()
    res = run_benchmark(adata, "target", "non-targeting", seeds=args.seeds, first_seed=args.first_seed,
                        methods=methods, deg=False, batch_key="bio_rep", out_dir=args.out)
    print(res.topk[["method", "top1", "top3", "top10", "n"]].to_string(index=False))
    print(res.ranks.pivot_table(index="target", columns="method", values="rank",
                                aggfunc=lambda r: float(np.mean(r <= 1))).round(2).T.to_string())
    print(f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()

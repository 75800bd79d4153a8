"""Speed of one experiment's fit at the screen driver's size: 1,000 controls + 100 guide cells, 5,000 genes.

Times, on one BLAS thread, the steps :func:`scotgm_pp.tl.analyse_pair` runs after preprocessing:
the state model and coupling (:func:`~scotgm_pp.tl.fit_perturbation`), the count layer with its
standard errors (:func:`~scotgm_pp.tl.fit_count_layer`), the gene table
(:func:`~scotgm_pp.tl.effect_table`) and the "any effect" ratio
(:func:`~scotgm_pp.inference.joint_em.any_effect_llr`), with the dispersion given (as the screen
driver passes it) and, separately, the count layer estimating it; then ``analyse_pair`` end to end
(preprocessing included, reported separately). Best and median of ``--repeats``.

    python benchmarks/bench_count_layer.py [--genes 5000] [--controls 1000] [--guides 100] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
from threadpoolctl import threadpool_limits

from scotgm_pp import datasets
from scotgm_pp.inference.count_layer import control_dispersion
from scotgm_pp.inference.joint_em import any_effect_llr
from scotgm_pp.pp import PreprocessParams, prepare_pair
from scotgm_pp.tl import analyse_pair, effect_table, fit_count_layer, fit_perturbation, library_sizes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--genes", type=int, default=5000)
    ap.add_argument("--controls", type=int, default=1000)
    ap.add_argument("--guides", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    adata = datasets.simulate(n_genes=args.genes, n_perturbations=1, n_control=args.controls,
                              n_cells_per_perturbation=args.guides, library_size=5000.0, random_state=0)
    ctrl = (adata.obs["perturbation"] == "control").to_numpy()
    with threadpool_limits(1, user_api="blas"):
        t0 = time.perf_counter()
        pair = prepare_pair(adata, ctrl, PreprocessParams())
        t_prep = time.perf_counter() - t0
        rows = adata.obs_names.get_indexer(pair.obs_names)
        X = adata.X[rows]
        y = X[:, adata.var_names.get_indexer(pair.var_names)].tocsr()
        s = library_sizes(X)
        phi = control_dispersion(y, s, pair.is_control)  # what the screen driver passes, estimated once
        steps = {"states + coupling": [], "count layer + SEs": [], "gene table": [], "any-effect ratio": [],
                 "whole fit": [], "count layer, dispersion estimated here": []}
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fit = fit_perturbation(pair.pca.scores, pair.is_control, coupling="ot")
            t1 = time.perf_counter()
            cf = fit_count_layer(y, fit.em.fixed_state, fit.em.responsibilities, size_factors=s, dispersion=phi)
            t2 = time.perf_counter()
            effect_table(cf)
            t3 = time.perf_counter()
            em = fit.em
            any_effect_llr(pair.pca.scores, weights=em.weights, means=em.means, covariances=em.covariances,
                           fixed_state=em.fixed_state, count_data=cf.data, count_params=cf.params, count_prior=cf.prior,
                           count_loglik=cf.row_loglik)
            t4 = time.perf_counter()
            fit_count_layer(y, fit.em.fixed_state, fit.em.responsibilities, size_factors=s)
            t5 = time.perf_counter()
            for key, dt in zip(steps, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0, t5 - t4)):
                steps[key].append(dt)
        t0 = time.perf_counter()
        analyse_pair(adata, ctrl, params=PreprocessParams(), coupling="ot", escape_model=True, regularization=0.01,
                     baseline=False)
        t_pair = time.perf_counter() - t0
    n, G = y.shape
    print(f"{n} cells ({int(pair.is_control.sum())} controls) x {G} genes, {pair.pca.n_pcs} PCs, "
          f"{y.nnz / (n * G):.0%} non-zero; state model: {fit.state_info['state_model']}, "
          f"count layer: {cf.n_iter} Newton iterations")
    for key, times in steps.items():
        print(f"{key:<20} best {min(times):.3f} s   median {np.median(times):.3f} s")
    print(f"analyse_pair end to end {t_pair:.2f} s (preprocessing and PCA, pp.prepare_pair: {t_prep:.2f} s)")


if __name__ == "__main__":
    main()

"""The count layer's pinned-cell sums: from the non-zero counts and library-size series against entry by entry.

For simulated experiments of the screen driver's shape (``--controls`` sampled controls and
``--guides`` guide cells, the genes the preprocessing keeps), times in one process, on one BLAS
thread, alternating the two paths ``--repeats`` times:

* one pass over the counts (``count_fit.evaluate``) at the fitted parameters;
* ``tl.fit_count_layer`` end to end (the marginal fit, its standard errors and the unshrunk
  effects), given the states of the PCA-space state model and the controls' dispersion;

with the per-entry path forced by setting ``_pinned_sums.SPARSE_MAX_DENSITY`` below 0. Prints the
median times, their ratio (series / per-entry) and the largest differences between the two fits'
effects and standard errors.

    python benchmarks/count_layer_sparse.py [--genes 2000 5000 8000] [--library-size 1000 5000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
from threadpoolctl import threadpool_limits

from scotgm_pp import datasets
from scotgm_pp.inference import _pinned_sums
from scotgm_pp.inference import count_fit as cf
from scotgm_pp.inference import count_layer as cl
from scotgm_pp.pp import PreprocessParams, prepare_pair
from scotgm_pp.tl import fit_count_layer, fit_perturbation, library_sizes


def _experiment(genes: int, controls: int, guides: int, library_size: float, seed: int):
    adata = datasets.simulate(n_genes=genes, n_perturbations=1, n_control=controls,
                              n_cells_per_perturbation=guides, library_size=library_size, random_state=seed)
    ctrl = (adata.obs["perturbation"] == "control").to_numpy()
    pair = prepare_pair(adata, ctrl, PreprocessParams())
    rows = adata.obs_names.get_indexer(pair.obs_names)
    X = adata.X[rows]
    y = X[:, adata.var_names.get_indexer(pair.var_names)].tocsr()
    s = library_sizes(X)
    phi = cl.control_dispersion(y, s, pair.is_control)
    fit = fit_perturbation(pair.pca.scores, pair.is_control, coupling="ot")
    return y, s, phi, fit.em.fixed_state, fit.em.responsibilities


def _run(dense: bool, fn):
    saved = _pinned_sums.SPARSE_MAX_DENSITY
    _pinned_sums.SPARSE_MAX_DENSITY = -1.0 if dense else saved
    try:
        t0 = time.perf_counter()
        out = fn()
        return time.perf_counter() - t0, out
    finally:
        _pinned_sums.SPARSE_MAX_DENSITY = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--genes", type=int, nargs="+", default=[2000, 5000, 8000])
    ap.add_argument("--library-size", type=float, nargs="+", default=[1000.0, 5000.0])
    ap.add_argument("--controls", type=int, default=1000)
    ap.add_argument("--guides", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    print("genes kept | library size | non-zero share | pass: series / per-entry (s) | ratio | "
          "fit_count_layer: series / per-entry (s) | ratio | max |effect diff| | max rel. SE diff")
    with threadpool_limits(1, user_api="blas"):
        for genes in args.genes:
            for lib in args.library_size:
                y, s, phi, fixed, R = _experiment(genes, args.controls, args.guides, lib, args.seed)
                density = y.nnz / (y.shape[0] * y.shape[1])
                prior = cl.default_count_prior(y, s)
                datas = {}
                for dense in (False, True):
                    datas[dense] = _run(dense, lambda: cl.CountData(y, s, phi, fixed, R.shape[1]))[1]
                params = _run(True, lambda: cf.fit_marginal(datas[True], R, prior, tol=1e-4)[0].params)[1]
                times = {("pass", d): [] for d in (False, True)} | {("fit", d): [] for d in (False, True)}
                fits = {}
                for _ in range(args.repeats):
                    for dense in (False, True):
                        # the block preparation is part of the first pass of a fit, not of later ones
                        _run(dense, lambda: cf.evaluate(datas[dense], params))
                        t, _ = _run(dense, lambda: cf.evaluate(datas[dense], params))
                        times["pass", dense].append(t)
                        t, fits[dense] = _run(dense, lambda: fit_count_layer(
                            y, fixed, R, size_factors=s, dispersion=phi))
                        times["fit", dense].append(t)
                med = {k: float(np.median(v)) for k, v in times.items()}
                d_eff = np.nanmax(np.abs(fits[False].params.delta[1] - fits[True].params.delta[1]))
                se_a, se_b = fits[False].effect_se[1], fits[True].effect_se[1]
                d_se = np.nanmax(np.abs(se_a - se_b) / se_b)
                print(f"{y.shape[1]} | {lib:.0f} | {density:.3f} | {med['pass', False]:.4f} / {med['pass', True]:.4f} | "
                      f"{med['pass', False] / med['pass', True]:.2f} | {med['fit', False]:.3f} / {med['fit', True]:.3f} | "
                      f"{med['fit', False] / med['fit', True]:.2f} | {d_eff:.1e} | {d_se:.1e}", flush=True)


if __name__ == "__main__":
    main()

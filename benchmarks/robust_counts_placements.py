"""One extreme count in one cell, placed in many cells: does it move a call, a target rank, an "any effect" call?

    python benchmarks/robust_counts_placements.py [--value 1e5] [--cells 3 11 19 27] [--genes G0005 G0100]

``tests/test_robust_counts.py`` checks four placements on the embedded default screen
(``sg.datasets.simulate(random_state=0)``). This script puts the count in more of them: the
``k``-th control cell and the ``k``-th guide cell of the screen's second perturbation, for each
``k`` of ``--cells`` and each gene of ``--genes``; each placement is analysed by
``perturbation_response(..., random_state=0)`` like the clean screen, and the script prints how
many gene calls (``qval < 0.1``) moved across the threshold, with the moved genes' p- and
q-values, and whether any target rank or "any effect" call changed.
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np
import scipy.sparse as sp

import scotgm_pp as sg


def answers(adata):
    out = sg.tl.perturbation_response(adata, "perturbation", "control", n_jobs=1, random_state=0, copy=True)
    return sg.tl.get_responses(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--value", type=float, default=1e5)
    ap.add_argument("--cells", type=int, nargs="+", default=[3, 11, 19, 27])
    ap.add_argument("--genes", nargs="+", default=["G0005", "G0100"])
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    clean = sg.datasets.simulate(random_state=0)
    clean.X = sp.csr_matrix(np.asarray(clean.X.toarray() if sp.issparse(clean.X) else clean.X, dtype=np.float32))
    r0 = answers(clean)
    calls0 = r0.layers["qval"] < 0.1
    labels = clean.obs["perturbation"].astype(str).to_numpy()
    second = [p for p in clean.obs["perturbation"].unique() if p != "control"][1]
    moved_any = 0
    n = 0
    for where in ("control", second):
        for k in args.cells:
            row = np.flatnonzero(labels == where)[k]
            for gene in args.genes:
                adata = clean.copy()
                X = adata.X.tolil()
                X[row, list(adata.var_names).index(gene)] = args.value
                adata.X = sp.csr_matrix(X, dtype=np.float32)
                r1 = answers(adata)
                flips = calls0 != (r1.layers["qval"] < 0.1)
                ranks = bool((r1.obs["target_rank"].to_numpy() != r0.obs["target_rank"].to_numpy()).any())
                anys = bool(((r1.obs["qval_any"] < 0.1).to_numpy() != (r0.obs["qval_any"] < 0.1).to_numpy()).any())
                n += 1
                moved_any += int(flips.any())
                detail = "; ".join(f"{r0.obs_names[a]}/{r0.var_names[b]} p {r0.layers['pval'][a, b]:.4g} -> "
                                   f"{r1.layers['pval'][a, b]:.4g}, q {r0.layers['qval'][a, b]:.3f} -> "
                                   f"{r1.layers['qval'][a, b]:.3f}" for a, b in zip(*np.nonzero(flips)))
                print(f"{args.value:g} in {'control' if where == 'control' else 'guide'} cell {k + 1} ({gene}): "
                      f"{int(flips.sum())} of {int(calls0.sum())} calls moved, target ranks changed: {ranks}, "
                      f"any-effect calls changed: {anys}" + (f" [{detail}]" if detail else ""), flush=True)
    print(f"placements that moved a call: {moved_any} of {n}")


if __name__ == "__main__":
    main()

"""Papalexi, all cells: target ranks and fit time against the number of controls per perturbation.

    python benchmarks/control_sample.py [300 500 1000 2000 2386]
"""

import sys
import time
import warnings

import scotgm_pp as sg

MEASURED = ["CMTM6", "IFNGR2", "JAK2", "NFKBIA", "STAT1", "STAT2", "STAT3", "TNFRSF14", "UBE2L6"]

if __name__ == "__main__":
    warnings.simplefilter("ignore")
    adata = sg.datasets.read(sg.datasets.papalexi_path(), "target", "non-targeting")
    for n in [int(x) for x in sys.argv[1:]] or [300, 500, 1000, 2000, 2386]:
        t0 = time.perf_counter()
        out = sg.tl.perturbation_response(adata, "target", "non-targeting", n_control_cells=n, n_jobs=1, copy=True)
        summary = out.uns["scotgm"]["summary"]
        ranks = summary.loc[MEASURED, "target_rank"].astype(int)
        print(f"n_control_cells={n}: targets at rank 1: {int((ranks == 1).sum())}/9, ranks {ranks.to_dict()}, "
              f"{len(summary)} perturbations analysed, {time.perf_counter() - t0:.1f} s", flush=True)

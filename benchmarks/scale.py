"""Scale benchmark: ``scotgm run`` against scanpy's Wilcoxon test on the same simulated screen.

    python benchmarks/scale.py --cells 20000 --genes 5000 --perturbations 100 --controls 10000
    python benchmarks/scale.py --cells 300000 --genes 8000 --perturbations 2000 --controls 100000 \
        --wilcoxon-fraction 0.1
    python benchmarks/scale.py --cells 1000000 --genes 8000 --perturbations 2000 --controls 100000 \
        --skip-wilcoxon

The screen is simulated straight to an .h5ad file (``sg.datasets.write_simulated``, cells in
shuffled order). Then, one after the other on the same file and machine, each in its own process
so that its wall time and peak memory (resident set of the process and its children, the Dask
workers included, sampled every 0.2 s) are its own:

* ``scotgm run FILE --out DIR --n-workers N`` (the package default settings);
* scanpy's Wilcoxon as a user would run it: read the file, ``normalize_total`` + ``log1p``, one
  ``rank_genes_groups(..., reference=control, method="wilcoxon")`` over every perturbation against
  all control cells. With ``--wilcoxon-fraction f < 1`` it runs on that share of the
  perturbations (with all controls) and the time of the tests (not of reading and normalising)
  is scaled by ``1 / f`` (said in the output);
* scanpy's Wilcoxon on the same cells as scotgm (each perturbation against its own sample of
  ``n_control_cells`` controls; the same scaling applies), for fairness.

Prints wall time, peak RSS and the ratio scotgm / Wilcoxon; writes ``OUT/scale.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

WILCOXON_ALL = r"""
import sys, time, warnings, numpy as np, scanpy as sc, anndata as ad
warnings.simplefilter("ignore")
path, key, control, fraction, seed = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), int(sys.argv[5])
t0 = time.perf_counter()
adata = ad.read_h5ad(path)
labels = adata.obs[key].astype(str)
perts = sorted(set(labels) - {control})
if fraction < 1:
    rng = np.random.default_rng(seed)
    perts = sorted(rng.choice(perts, max(1, int(round(fraction * len(perts)))), replace=False))
    adata = adata[labels.isin([control, *perts]).to_numpy()].copy()
sc.pp.normalize_total(adata, target_sum=1e4)
sc.pp.log1p(adata)
t1 = time.perf_counter()
sc.tl.rank_genes_groups(adata, key, groups=perts, reference=control, method="wilcoxon")
print(f"RESULT setup={t1 - t0:.3f} test={time.perf_counter() - t1:.3f} perturbations={len(perts)}")
"""

WILCOXON_SAMPLED = r"""
import sys, time, warnings, numpy as np, scanpy as sc, anndata as ad
warnings.simplefilter("ignore")
from scotgm_pp._screen import screen_from_h5ad
from scotgm_pp.tl._plan import RunSettings, make_tasks, resolve_perturbations, screen_labels
path, key, control, fraction, seed = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), int(sys.argv[5])
t0 = time.perf_counter()
adata = ad.read_h5ad(path)
screen = screen_from_h5ad(path)
settings = RunSettings(perturbation_key=key, control=control)
labels = screen_labels(screen.obs, key, control)
perts = resolve_perturbations(labels, control, key)
if fraction < 1:
    rng = np.random.default_rng(seed)
    perts = sorted(rng.choice(perts, max(1, int(round(fraction * len(perts)))), replace=False))
tasks = make_tasks(labels, perts, settings, np.ones(adata.n_obs, bool), None)
sc.pp.normalize_total(adata, target_sum=1e4)
sc.pp.log1p(adata)
t1 = time.perf_counter()
for t in tasks:
    sub = adata[np.concatenate([t.guide_rows, t.control_rows])].copy()
    sc.tl.rank_genes_groups(sub, key, groups=[t.perturbation], reference=control, method="wilcoxon")
print(f"RESULT setup={t1 - t0:.3f} test={time.perf_counter() - t1:.3f} perturbations={len(perts)}")
"""


def _tree_rss(pid: int) -> int:
    import psutil

    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def measure(cmd: list[str], label: str) -> dict:
    """Run ``cmd``; wall time, peak RSS of its process tree, and its RESULT line."""
    shown = " ".join(c if "\n" not in c else "<script>" for c in cmd)
    print(f"\n== {label}: {shown}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _tree_rss(proc.pid))
            time.sleep(0.2)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "RESULT" in line or "error" in line.lower() or "outputs in" in line:
            print("   ", line.rstrip(), flush=True)
    code = proc.wait()
    done.set()
    thread.join()
    wall = time.perf_counter() - t0
    if code != 0:
        print("".join(lines[-30:]))
        raise SystemExit(f"{label} failed with exit code {code}")
    result = {"wall_seconds": wall, "peak_rss_gib": peak[0] / 2**30}
    for line in lines:
        if line.startswith("RESULT"):
            for item in line.split()[1:]:
                k, v = item.split("=")
                result[k] = float(v)
    print(f"   wall {wall:.1f} s, peak RSS {result['peak_rss_gib']:.2f} GiB", flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, required=True, help="total cells (controls included)")
    ap.add_argument("--genes", type=int, required=True)
    ap.add_argument("--perturbations", type=int, required=True)
    ap.add_argument("--controls", type=int, required=True)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="scotgm --n-workers (default: all cores)")
    ap.add_argument("--wilcoxon-fraction", type=float, default=1.0,
                    help="time the Wilcoxon tests on this share of the perturbations and scale up")
    ap.add_argument("--skip-wilcoxon", action="store_true")
    ap.add_argument("--skip-sampled-wilcoxon", action="store_true")
    ap.add_argument("--compare-workers", action="store_true",
                    help="also run scotgm with 1 worker and print the speed-up of --workers over it")
    ap.add_argument("--out", default="benchmarks/out/scale")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    per = (args.cells - args.controls) // args.perturbations
    name = f"screen_{args.cells}x{args.genes}x{args.perturbations}_c{args.controls}_s{args.seed}.h5ad"
    data = out / name
    if not data.exists():
        import scotgm_pp as sg

        t0 = time.perf_counter()
        sg.datasets.write_simulated(data, n_genes=args.genes, n_perturbations=args.perturbations,
                                    n_control=args.controls, n_cells_per_perturbation=per, random_state=args.seed)
        print(f"simulated {data} in {time.perf_counter() - t0:.0f} s ({data.stat().st_size / 2**30:.2f} GiB)")
    report = {"cells": args.perturbations * per + args.controls, "genes": args.genes,
              "perturbations": args.perturbations, "controls": args.controls, "workers": args.workers,
              "cpu_count": os.cpu_count(), "load_average_start": os.getloadavg()}
    run_dir = out / f"run_{data.stem}"
    scotgm = measure([sys.executable, "-m", "scotgm_pp.cli", "run", str(data), "--perturbation-key", "perturbation",
                      "--control", "control", "--out", str(run_dir), "--overwrite", "--quiet",
                      "--n-workers", str(args.workers)], "scotgm run")
    report["scotgm"] = scotgm
    if args.compare_workers and args.workers > 1:
        one = measure([sys.executable, "-m", "scotgm_pp.cli", "run", str(data), "--perturbation-key", "perturbation",
                       "--control", "control", "--out", str(run_dir) + "_1worker", "--overwrite", "--quiet",
                       "--n-workers", "1"], "scotgm run, 1 worker")
        report["scotgm_1_worker"] = one
        report["speedup_workers"] = one["wall_seconds"] / scotgm["wall_seconds"]
        from anndata import read_h5ad

        a = read_h5ad(run_dir / "responses.h5ad")
        b = read_h5ad(Path(str(run_dir) + "_1worker") / "responses.h5ad")
        report["max_abs_difference_1_vs_n_workers"] = float(max(
            np.nanmax(np.abs(np.asarray(a.layers[k], float) - np.asarray(b.layers[k], float))) for k in a.layers))
    f = args.wilcoxon_fraction
    for tag, script, skip in (("wilcoxon_all_controls", WILCOXON_ALL, args.skip_wilcoxon),
                              ("wilcoxon_sampled_controls", WILCOXON_SAMPLED,
                               args.skip_wilcoxon or args.skip_sampled_wilcoxon)):
        if skip:
            continue
        res = measure([sys.executable, "-c", script, str(data), "perturbation", "control", str(f), str(args.seed)],
                      f"scanpy {tag} ({f:.0%} of perturbations)")
        # reading and normalising happen once; the tests scale with the number of perturbations
        res["scaled_seconds"] = res["wall_seconds"] if f >= 1 else res["wall_seconds"] + res["test"] * (1 / f - 1)
        res["scaled_from_fraction"] = f
        report[tag] = res
    report["load_average_end"] = os.getloadavg()
    print("\n== summary")
    print(f"screen: {report['cells']} cells x {args.genes} genes x {args.perturbations} perturbations "
          f"({args.controls} controls), {args.workers} scotgm workers")
    print(f"scotgm run: {scotgm['wall_seconds']:.1f} s, peak RSS {scotgm['peak_rss_gib']:.2f} GiB")
    if "speedup_workers" in report:
        print(f"scotgm run, 1 worker: {report['scotgm_1_worker']['wall_seconds']:.1f} s; speed-up of {args.workers} "
              f"workers {report['speedup_workers']:.2f}x; largest difference between their results "
              f"{report['max_abs_difference_1_vs_n_workers']:.3g}")
    for tag in ("wilcoxon_all_controls", "wilcoxon_sampled_controls"):
        if tag in report:
            w = report[tag]
            note = f" (timed on {f:.0%} of the perturbations, scaled x{1 / f:.0f})" if f < 1 else ""
            ratio = scotgm["wall_seconds"] / w["scaled_seconds"]
            report[f"ratio_scotgm_over_{tag}"] = ratio
            print(f"scanpy {tag}: {w['scaled_seconds']:.1f} s{note}, peak RSS {w['peak_rss_gib']:.2f} GiB; "
                  f"ratio scotgm / wilcoxon = {ratio:.2f}")
    (out / f"scale_{data.stem}.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

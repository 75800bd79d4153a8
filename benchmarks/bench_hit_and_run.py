"""Every "done when" figure of issue 12 for the transport-plan sampler, and its baseline.

All timings on one core (``sample_coupling`` limits BLAS to one thread; nothing runs in
parallel); the load average is printed with each section because the machine is shared.
Covariance pairs are ``A A^T / m + 0.1 I`` with Gaussian ``A`` (seeds ``0 .. n_pairs - 1``),
and every figure is given as mean and worst over those pairs.

1. m = 10, the default call with ``temperature=1e6`` (high-temperature limit: ``|C_mean| / |C*|``,
   target < 0.1) and ``temperature=1e-3`` (``|C_mean - C*| / |C*|``, target < 0.05).
2. The default call (``n_x = n_y = 300`` cells, the default temperature) at m = 20 and m = 50:
   wall time of the whole call, worst R-hat over the ``m^2`` entries of C (target <= 1.01),
   smallest bulk and tail ESS over them (target >= 400), the cost's R-hat and ESS, and the
   temperature's promise (mean excess cost over ``W2^2`` against the expected plan regret).
3. Baseline: plain isotropic rank-one Hit-and-Run on the full plan (the kernel this replaces),
   at m = 20, the same number of line-move-equivalent seconds: its worst R-hat and ESS.
4. Papalexi (``--papalexi PATH``): ``tl.perturbation_response`` on all cells with
   ``coupling="ot"`` and ``coupling="hit_and_run"``; per perturbation the recorded sampled rank
   and diagnostics; time per perturbation and its ratio.
5. The small-sample protocol (``run_benchmark``: 60 guide / 300 control cells, 9 measured targets,
   ``--seeds`` draws): target-gene top-1 of the coupling-dependent ``mu / sigma`` ranking and of
   the default ``lfc_bound`` ranking under both couplings; time per pair and its ratio.

Run: ``python benchmarks/bench_hit_and_run.py [--pairs 3] [--seeds 10] [--sections 1 2 3 4 5]
[--papalexi ../shared/data/papalexi2021_eccite_subset.h5ad]``
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import numpy as np

from scotgm_pp.inference.hit_and_run import SweepMoves, sample_coupling
from scotgm_pp.inference.ot import ot_cross_covariance


def random_pair(m: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    A, B = rng.standard_normal((m, m)), rng.standard_normal((m, m))
    return A @ A.T / m + 0.1 * np.eye(m), B @ B.T / m + 0.1 * np.eye(m)


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} (2 cores)"


def mean_worst(values, worst=max) -> str:
    values = np.asarray(values, dtype=float)
    return f"mean {values.mean():.4g}, worst {worst(values):.4g}"


def quiet_call(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the diagnostics printed say it all
        return sample_coupling(*args, **kwargs)


def section_limits(n_pairs: int) -> None:
    print(f"\n[1] m = 10, default settings, {n_pairs} covariance pairs; {load()}")
    hi, lo = [], []
    for seed in range(n_pairs):
        Sx, Sy = random_pair(10, seed)
        C_star = ot_cross_covariance(Sx, Sy)
        r = quiet_call(Sx, Sy, temperature=1e6, random_state=seed, return_idata=False)
        hi.append(np.linalg.norm(r.cross_covariance) / np.linalg.norm(C_star))
        r = quiet_call(Sx, Sy, temperature=1e-3, random_state=seed, return_idata=False)
        lo.append(np.linalg.norm(r.cross_covariance - C_star) / np.linalg.norm(C_star))
    print(f"  temperature 1e6:  |C_mean| / |C*|         {mean_worst(hi)}   (target < 0.1)")
    print(f"  temperature 1e-3: |C_mean - C*| / |C*|    {mean_worst(lo)}   (target < 0.05)")


def section_default(m: int, n_pairs: int, budget: float) -> None:
    print(f"\n[2] m = {m}, the default call (n_x = n_y = 300, default temperature, 4 chains x 1000 steps), "
          f"{n_pairs} pairs; {load()}")
    rows = []
    for seed in range(n_pairs):
        Sx, Sy = random_pair(m, seed)
        r = quiet_call(Sx, Sy, n_x=300, n_y=300, random_state=seed, return_idata=False)
        d = r.diagnostics
        excess = r.cost_draws.mean() - r.w2_squared
        rows.append((r.seconds, r.step_stats["seconds"].sum(), d.rhat_max, d.ess_bulk_min, d.ess_tail_min,
                     d.cost_rhat, d.cost_ess_bulk, excess / r.settings["expected_regret"]))
        print(f"  pair {seed}: {r.seconds:6.2f} s (chains {rows[-1][1]:6.2f} s)  C: max R-hat {d.rhat_max:.4f}, "
              f"min bulk ESS {d.ess_bulk_min:5.0f}, min tail ESS {d.ess_tail_min:5.0f} | cost: R-hat {d.cost_rhat:.4f}, "
              f"ESS {d.cost_ess_bulk:5.0f} | mean excess / expected regret {rows[-1][7]:.3f}")
    rows = np.array(rows)
    print(f"  wall time of the call (s)           {mean_worst(rows[:, 0])}   (target <= {budget:g} s)")
    print(f"  max R-hat over the entries of C     {mean_worst(rows[:, 2])}   (target <= 1.01)")
    print(f"  min bulk ESS over the entries of C  {mean_worst(rows[:, 3], min)}   (target >= 400)")
    print(f"  min tail ESS over the entries of C  {mean_worst(rows[:, 4], min)}   (target >= 400)")
    print(f"  mean excess cost / expected regret  {mean_worst(rows[:, 7], lambda v: v[np.argmax(np.abs(v - 1))])}"
          "   (the temperature's promise: 1)")


def section_baseline(m: int, seconds: float) -> None:
    print(f"\n[3] baseline at m = {m}: plain isotropic rank-one Hit-and-Run on the full plan (the kernel this "
          f"replaces), given the whole {seconds:g} s budget; {load()}")
    Sx, Sy = random_pair(m, 0)
    iso = SweepMoves(rotations=(), n_isotropic=m * m, breathing=False, singular=False)  # m^2 line moves a step
    probe = quiet_call(Sx, Sy, n_x=300, n_y=300, moves=iso, n_steps=40, burn_in=10, return_idata=False)
    per_step = probe.step_stats["seconds"].sum() / (4 * 50)
    n_steps = max(40, int(seconds / (4 * 1.25 * per_step) * 0.8))
    for start in ("dispersed", "local"):
        r = quiet_call(Sx, Sy, n_x=300, n_y=300, moves=iso, n_steps=n_steps, start=start, return_idata=False)
        d = r.diagnostics
        print(f"  isotropic, {start} starts, {n_steps} steps of {m * m} line moves per chain: {r.seconds:.2f} s, "
              f"C: max R-hat {d.rhat_max:.3f}, min bulk ESS {d.ess_bulk_min:.0f}; cost: R-hat {d.cost_rhat:.3f}, "
              f"ESS {d.cost_ess_bulk:.0f}")


def section_papalexi(path: str) -> None:
    import scotgm_pp as sg

    print(f"\n[4] Papalexi, all cells ({path}); {load()}")
    adata = sg.datasets.read(path, "target", "non-targeting")
    times, outs = {}, {}
    for coupling in ("ot", "hit_and_run"):
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            outs[coupling] = sg.tl.perturbation_response(adata, "target", "non-targeting", coupling=coupling, copy=True)
        times[coupling] = time.perf_counter() - t0
    recs = outs["hit_and_run"].uns["scotgm"]["results"]
    n = len(recs)
    print(f"  {n} perturbations: ot {times['ot'] / n:.2f} s per perturbation, hit_and_run "
          f"{times['hit_and_run'] / n:.2f} s per perturbation (ratio {times['hit_and_run'] / times['ot']:.1f})")
    print("  per perturbation (hit_and_run record): m, steps x chains, max R-hat / min bulk / min tail ESS over C, "
          "cost R-hat, converged, seconds, mean excess cost / expected regret")
    for p, r in recs.items():
        print(f"    {p:10s} m={r['coupling_sampled_rank']:3d} {r['coupling_n_steps']}x{r['coupling_n_chains']} "
              f"R-hat {r['coupling_rhat_max_cross_cov']:.4f} ESS {r['coupling_ess_bulk_min_cross_cov']:5.0f} / "
              f"{r['coupling_ess_tail_min_cross_cov']:5.0f} cost R-hat {r['coupling_cost_rhat']:.4f} "
              f"{'converged' if r['coupling_converged'] else 'NOT converged'} {r['coupling_seconds']:5.1f} s "
              f"excess/regret {(r['coupling_cost_mean'] - r['coupling_w2_squared']) / r['coupling_expected_regret']:.3f}")
    conv = [r["coupling_converged"] for r in recs.values()]
    print(f"  converged: {sum(conv)} of {n}; worst R-hat {max(r['coupling_rhat_max_cross_cov'] for r in recs.values()):.4f}, "
          f"smallest bulk ESS {min(r['coupling_ess_bulk_min_cross_cov'] for r in recs.values()):.0f}")


def section_protocol(path: str, n_seeds: int) -> None:
    import scotgm_pp as sg
    from scotgm_pp.benchmark import run_benchmark

    print(f"\n[5] Papalexi small-sample protocol (60 guide / 300 control cells, 9 measured targets, seeds "
          f"0-{n_seeds - 1}); {load()}")
    adata = sg.datasets.read(path, "target", "non-targeting")
    methods = ["scotgm-ot", "scotgm-hit_and_run", "scotgm-ot:lfc_bound", "scotgm-hit_and_run:lfc_bound"]
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bench = run_benchmark(adata, "target", "non-targeting", methods=methods, seeds=n_seeds, deg=False)
    top = bench.topk.set_index("method")
    tim = bench.timings.set_index("method")
    per_call = tim["seconds"] / tim["calls"]
    print(f"  ({time.perf_counter() - t0:.0f} s; the :lfc_bound rows reuse the fit of the same coupling, so their "
          "time is in the row above)")
    for name in methods:
        print(f"    {name:30s} top-1 {top.loc[name, 'top1']:.3f}  top-3 {top.loc[name, 'top3']:.3f}  "
              f"median rank {top.loc[name, 'median_rank']:.0f}  ({int(top.loc[name, 'n'])} experiments)"
              + (f"  {per_call[name]:.2f} s per pair" if ":" not in name else ""))
    print(f"    per-pair time hit_and_run / ot: {per_call['scotgm-hit_and_run'] / per_call['scotgm-ot']:.1f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3, help="covariance pairs (seeds) per size")
    parser.add_argument("--sections", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--papalexi", default="../shared/data/papalexi2021_eccite_subset.h5ad")
    parser.add_argument("--seeds", type=int, default=10, help="draws of the small-sample protocol")
    args = parser.parse_args(argv)

    quiet_call(*random_pair(3), n_steps=10, return_idata=False)  # compile (or load) the kernels once
    if 1 in args.sections:
        section_limits(args.pairs)
    if 2 in args.sections:
        section_default(20, args.pairs, 10.0)
        section_default(50, args.pairs, 60.0)
    if 3 in args.sections:
        section_baseline(20, 10.0)
    if 4 in args.sections and os.path.exists(args.papalexi):
        section_papalexi(args.papalexi)
    if 5 in args.sections and os.path.exists(args.papalexi):
        section_protocol(args.papalexi, args.seeds)


if __name__ == "__main__":
    main()

"""Speed and mixing of the exact Hit-and-Run plan sampler against the published Algorithm 1.

Prints, on one core (BLAS limited to one thread), all in this process:

* the time of 10,000 Hit-and-Run steps at m = 50 (one chain, full 50 x 50 plan, adapted
  directions, started at 0.9 K*) and of the named baseline, the published Algorithm 1
  (``scotgm_pp.inference.paper``, 10,000 iterations at m = 50 and at m = 74, literal loop and
  vectorised), with the ratios;
* per m in (10, 20, 50, 100): the pipeline call ``sample_coupling(S0, S1, mu_x=..., mu_y=...,
  n_x=..., n_y=..., random_state=0, return_idata=False)`` with the defaults (wall time, R-hat and
  bulk ESS of the transport cost, ESS/s, relative Frobenius error of the posterior-mean ``C``
  against the closed-form OT cross-covariance), and, at m = 10 and 20, the full plan with the
  adapted directions against the original isotropic kernel at the same budget and the default
  (low) temperature without cell counts.

Run: ``python benchmarks/bench_hit_and_run.py``
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
from threadpoolctl import threadpool_limits

from scotgm_pp.inference.hit_and_run import coupling_geometry, default_temperature, run_chain, sample_coupling
from scotgm_pp.inference.ot import ot_cross_covariance
from scotgm_pp.inference.paper import paper_cross_covariance


def random_pair(m: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    A, B = rng.standard_normal((m, m)), rng.standard_normal((m, m))
    return A @ A.T / m + 0.1 * np.eye(m), B @ B.T / m + 0.1 * np.eye(m)


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def time_hit_and_run(m: int, n_steps: int, repeats: int) -> float:
    Sx, Sy = random_pair(m)
    geom = coupling_geometry(Sx, Sy)
    eps = default_temperature(Sx, Sy)
    return best_of(lambda: run_chain(geom.G, eps, 0.9 * geom.K_star, n_steps=n_steps, burn_in=0, thin=10,
                                     rng=np.random.default_rng(0)), repeats)


def time_paper(m: int, n_iter: int, vectorised: bool, repeats: int) -> float:
    Sx, Sy = random_pair(m, seed=1)
    mu = np.zeros(m)
    return best_of(lambda: paper_cross_covariance(mu, Sx, mu, Sy, n_iter=n_iter, vectorised=vectorised), repeats)


def run(m: int, **kwargs) -> dict:
    Sx, Sy = random_pair(m)
    rng = np.random.default_rng(m)
    C_star = ot_cross_covariance(Sx, Sy)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the R-hat / ESS printed say it all
        res = sample_coupling(Sx, Sy, mu_x=rng.standard_normal(m), mu_y=rng.standard_normal(m),
                              random_state=0, return_idata=False, **kwargs)
    wall = time.perf_counter() - t0
    err = np.linalg.norm(res.cross_covariance - C_star) / np.linalg.norm(C_star)
    return dict(wall=wall, rhat=res.rhat, ess=res.ess, ess_per_s=res.ess / wall, rel_err=err,
                rank=res.sampled_rank)


def fmt(label: str, out: dict) -> str:
    return (f"{label:<58s} r = {out['rank']:3d}  {out['wall']:6.2f} s  R-hat {out['rhat']:.3f}  ESS {out['ess']:7.1f}  "
            f"ESS/s {out['ess_per_s']:7.1f}  rel.err(C) {out['rel_err']:.4f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="best of this many timings")
    parser.add_argument("--dims", type=int, nargs="+", default=[10, 20, 50, 100])
    args = parser.parse_args(argv)

    with threadpool_limits(limits=1, user_api="blas"):
        run_chain(np.eye(3), 1.0, 0.5 * np.eye(3), n_steps=10, burn_in=0, thin=1,
                  rng=np.random.default_rng(0))  # load the compiled kernel once (cached on disk)
        t_har = time_hit_and_run(50, 10_000, args.repeats)
        t_loop50 = time_paper(50, 10_000, vectorised=False, repeats=args.repeats)
        t_loop = time_paper(74, 10_000, vectorised=False, repeats=args.repeats)
        t_vec = time_paper(74, 10_000, vectorised=True, repeats=args.repeats)
        print(f"hit-and-run, 10,000 steps, m = 50, full plan, one chain: {t_har:7.3f} s")
        print(f"baseline: published Alg. 1 (literal loop), m = 50, 10k:  {t_loop50:7.3f} s")
        print(f"baseline: published Alg. 1 (literal loop), m = 74, 10k:  {t_loop:7.3f} s")
        print(f"          published Alg. 1 (vectorised),   m = 74, 10k:  {t_vec:7.3f} s")
        print(f"ratio hit-and-run / literal-loop baseline (m = 50):      {t_har / t_loop50:7.3f}")
        print(f"ratio hit-and-run / literal-loop baseline (m = 74):      {t_har / t_loop:7.3f}")
        print(f"ratio hit-and-run / vectorised baseline (m = 74):        {t_har / t_vec:7.3f}")
        print("transport cost, 4 chains, default temperature with n_x = n_y = 300 cells (the pipeline call):")
        for m in args.dims:
            print(fmt(f"  m = {m:3d}, defaults", run(m, n_x=300, n_y=300)))
        print("default temperature without cell counts (1% excess: colder), full plan, same budget:")
        for m in [d for d in args.dims if d <= 20]:
            budget = dict(max_rank=None, n_steps=40_000, burn_in=10_000)
            print(fmt(f"  m = {m:3d}, adapted directions, local starts", run(m, **budget)))
            print(fmt(f"  m = {m:3d}, isotropic directions (original), local starts",
                      run(m, directions="isotropic", **budget)))


if __name__ == "__main__":
    main()

"""The paper's Figure 4 done right: error of the cross-covariance estimate against the true target.

For d = 20, 50, 100 (random covariances, fixed seeds) the target is the closed-form OT
cross-covariance ``C*``.  Curves, relative Frobenius error ``||C_hat - C*|| / ||C*||`` against
iterations:

* ``hit_and_run``: the running posterior mean of ``C = Lx K Ly`` of one exact Hit-and-Run chain
  at the default temperature, started at ``K = 0`` (the independent coupling), averaging the
  recorded states after the first 20% of the iterations;
* ``hit_and_run_state``: ``C`` of the chain's current state;
* ``paper``: the published Algorithm 1 on the same inputs (its running estimate).

Writes ``figure4.png`` and ``figure4.csv`` (columns d, iteration, method, rel_error) to --out.

Run: ``/work/venv/bin/python benchmarks/figure4.py --out benchmarks/out``
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np

from scotgm_pp.inference.hit_and_run import coupling_geometry, default_temperature, run_chain
from scotgm_pp.inference.ot import ot_cross_covariance
from scotgm_pp.inference.paper import paper_cross_covariance


def random_pair(d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    A, B = rng.standard_normal((d, d)), rng.standard_normal((d, d))
    return A @ A.T / d + 0.1 * np.eye(d), B @ B.T / d + 0.1 * np.eye(d)


def hit_and_run_curves(Sx, Sy, n_iter: int, n_points: int, seed: int):
    geom = coupling_geometry(Sx, Sy)
    C_star = ot_cross_covariance(Sx, Sy)
    thin = max(1, n_iter // n_points)
    out = run_chain(geom.G, default_temperature(Sx, Sy), np.zeros_like(geom.G), n_steps=n_iter, burn_in=0,
                    thin=thin, rng=np.random.default_rng(seed), store_draws=True)
    C_draws = np.einsum("ij,njk,kl->nil", geom.Lx, out.K_draws, geom.Ly)
    iters = thin * np.arange(1, len(C_draws) + 1)
    norm = np.linalg.norm(C_star)
    state_err = np.linalg.norm((C_draws - C_star).reshape(len(C_draws), -1), axis=1) / norm
    start = len(C_draws) // 5
    running = np.cumsum(C_draws[start:], axis=0) / np.arange(1, len(C_draws) - start + 1)[:, None, None]
    mean_err = np.linalg.norm((running - C_star).reshape(len(running), -1), axis=1) / norm
    return iters, state_err, iters[start:], mean_err


def paper_curve(Sx, Sy, n_iter: int, n_points: int, seed: int):
    d = Sx.shape[0]
    C_star = ot_cross_covariance(Sx, Sy)
    rng = np.random.default_rng(seed + 1000)
    mu_x, mu_y = rng.standard_normal(d), rng.standard_normal(d)
    res = paper_cross_covariance(mu_x, Sx, mu_y, Sy, n_iter=n_iter, random_state=seed, ground_truth=C_star)
    idx = np.unique(np.geomspace(1, n_iter, n_points).astype(int)) - 1
    return idx + 1, res.errors[idx] / np.linalg.norm(C_star)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    parser.add_argument("--dims", type=int, nargs="+", default=[20, 50, 100])
    parser.add_argument("--n-iter", type=int, default=None,
                        help="iterations per run (default max(20000, 5 d^2))")
    parser.add_argument("--points", type=int, default=400, help="recorded points per curve")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    fig, axes = plt.subplots(1, len(args.dims), figsize=(4.5 * len(args.dims), 3.8), sharey=True)
    axes = np.atleast_1d(axes)
    for ax, d in zip(axes, args.dims):
        n_iter = args.n_iter or max(20_000, 5 * d * d)
        Sx, Sy = random_pair(d, seed=d)
        t0 = time.perf_counter()
        it_s, err_s, it_m, err_m = hit_and_run_curves(Sx, Sy, n_iter, args.points, seed=d)
        t_har = time.perf_counter() - t0
        t0 = time.perf_counter()
        it_p, err_p = paper_curve(Sx, Sy, n_iter, args.points, seed=d)
        t_pap = time.perf_counter() - t0
        for method, its, errs in [("hit_and_run", it_m, err_m), ("hit_and_run_state", it_s, err_s),
                                  ("paper", it_p, err_p)]:
            rows += [(d, int(i), method, float(e)) for i, e in zip(its, errs)]
        ax.loglog(it_p, err_p, label="published Alg. 1", color="tab:red")
        ax.loglog(it_s, err_s, label="Hit-and-Run, current state", color="tab:blue", alpha=0.4)
        ax.loglog(it_m, err_m, label="Hit-and-Run, posterior mean", color="tab:blue")
        ax.set_title(f"d = {d}")
        ax.set_xlabel("iteration")
        ax.grid(True, which="both", alpha=0.3)
        print(f"d = {d:3d}, {n_iter} iterations: final relative error hit-and-run mean {err_m[-1]:.3f}, "
              f"state {err_s[-1]:.3f}, published {err_p[-1]:.3f}  (times {t_har:.1f} s, {t_pap:.1f} s)")
    axes[0].set_ylabel(r"$\|\hat C - C^*\|_F / \|C^*\|_F$")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "figure4.png", dpi=120)
    with open(args.out / "figure4.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["d", "iteration", "method", "rel_error"])
        writer.writerows(rows)
    print(f"wrote {args.out / 'figure4.png'} and {args.out / 'figure4.csv'}")


if __name__ == "__main__":
    main()

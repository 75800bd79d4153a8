"""The paper's Figure 4 done right: error of the cross-covariance estimate against the true target.

For d = 20, 50, 100 (random covariances, fixed seeds) the target is the closed-form OT
cross-covariance ``C*``.  Curves, relative Frobenius error ``||C_hat - C*|| / ||C*||`` of the
running posterior mean of ``C = Lx K Ly`` (one chain, default temperature, the default local
start; the mean over the recorded states after the first 20% of the iterations) against
iterations:

* ``hit_and_run``: the default sampler (adapted directions, plan sampled in the leading
  ``DEFAULT_MAX_RANK`` singular directions of ``G``, the rest fixed at the OT plan);
* ``hit_and_run_full``: adapted directions on the full ``d x d`` plan;
* ``hit_and_run_isotropic``: the original kernel (isotropic rank-one directions) on the full plan;
* ``paper``: the published Algorithm 1 on the same inputs (its running estimate).

Writes ``figure4.png`` and ``figure4.csv`` (columns d, iteration, method, rel_error, seconds) to --out.

Run: ``python benchmarks/figure4.py --out benchmarks/out``
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np

from scotgm_pp.inference._har_directions import local_starts
from scotgm_pp.inference.hit_and_run import DEFAULT_MAX_RANK, coupling_geometry, default_temperature, run_chain
from scotgm_pp.inference.ot import ot_cross_covariance
from scotgm_pp.inference.paper import paper_cross_covariance


def random_pair(d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    A, B = rng.standard_normal((d, d)), rng.standard_normal((d, d))
    return A @ A.T / d + 0.1 * np.eye(d), B @ B.T / d + 0.1 * np.eye(d)


def hit_and_run_curve(Sx, Sy, n_iter: int, n_points: int, seed: int, rank: int, directions: str):
    """Running-mean error of one chain in the SVD frame, plan block ``rank x rank`` (rest = OT)."""
    geom = coupling_geometry(Sx, Sy)
    C_star = ot_cross_covariance(Sx, Sy)
    eps = default_temperature(Sx, Sy)
    s_r = geom.singular_values[:rank]
    rng = np.random.default_rng(seed)
    J0 = local_starts(s_r, eps, 1, rng)[0]
    thin = max(1, n_iter // n_points)
    t0 = time.perf_counter()
    out = run_chain(np.diag(s_r), eps, J0, n_steps=n_iter, burn_in=0, thin=thin, rng=rng,
                    store_draws=True, directions=directions)
    seconds = time.perf_counter() - t0
    J = np.tile(np.eye(geom.m), (len(out.K_draws), 1, 1))
    J[:, :rank, :rank] = out.K_draws
    C_draws = np.einsum("ij,njk,kl->nil", geom.Lx @ geom.Q, J, geom.Pt @ geom.Ly)
    iters = thin * np.arange(1, len(C_draws) + 1)
    norm = np.linalg.norm(C_star)
    start = len(C_draws) // 5
    running = np.cumsum(C_draws[start:], axis=0) / np.arange(1, len(C_draws) - start + 1)[:, None, None]
    mean_err = np.linalg.norm((running - C_star).reshape(len(running), -1), axis=1) / norm
    return iters[start:], mean_err, seconds


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
    parser.add_argument("--n-iter", type=int, default=20_000, help="iterations per run")
    parser.add_argument("--points", type=int, default=400, help="recorded points per curve")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    fig, axes = plt.subplots(1, len(args.dims), figsize=(4.5 * len(args.dims), 3.8), sharey=True)
    axes = np.atleast_1d(axes)
    curves = [("hit_and_run", "Hit-and-Run, default (r = %d)" % DEFAULT_MAX_RANK, "tab:blue", "adapted", True),
              ("hit_and_run_full", "Hit-and-Run, full plan, adapted", "tab:green", "adapted", False),
              ("hit_and_run_isotropic", "Hit-and-Run, full plan, isotropic", "tab:gray", "isotropic", False)]
    for ax, d in zip(axes, args.dims):
        Sx, Sy = random_pair(d, seed=d)
        line = [f"d = {d:3d}, {args.n_iter} iterations, final relative error:"]
        for method, label, color, directions, reduced in curves:
            rank = min(d, DEFAULT_MAX_RANK) if reduced else d
            its, errs, sec = hit_and_run_curve(Sx, Sy, args.n_iter, args.points, seed=d, rank=rank,
                                               directions=directions)
            rows += [(d, int(i), method, float(e), sec) for i, e in zip(its, errs)]
            ax.loglog(its, errs, label=label, color=color)
            line.append(f"{method} {errs[-1]:.4f} ({sec:.1f} s)")
        t0 = time.perf_counter()
        it_p, err_p = paper_curve(Sx, Sy, args.n_iter, args.points, seed=d)
        sec = time.perf_counter() - t0
        rows += [(d, int(i), "paper", float(e), sec) for i, e in zip(it_p, err_p)]
        ax.loglog(it_p, err_p, label="published Alg. 1", color="tab:red")
        line.append(f"paper {err_p[-1]:.3f} ({sec:.1f} s)")
        ax.set_title(f"d = {d}")
        ax.set_xlabel("iteration")
        ax.grid(True, which="both", alpha=0.3)
        print(", ".join(line), flush=True)
    axes[0].set_ylabel(r"$\|\hat C - C^*\|_F / \|C^*\|_F$")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "figure4.png", dpi=120)
    with open(args.out / "figure4.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["d", "iteration", "method", "rel_error", "seconds"])
        writer.writerows(rows)
    print(f"wrote {args.out / 'figure4.png'} and {args.out / 'figure4.csv'}")


if __name__ == "__main__":
    main()

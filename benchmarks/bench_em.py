"""Speed of :func:`scotgm_pp.inference.fit_em` against scikit-learn's GaussianMixture.

Both fit a full-covariance two-state mixture to the same simulated PCA scores, from the same
start (k-means-like hard labels: our first M-step, and sklearn's ``weights_init``,
``means_init``, ``precisions_init`` set to its output), for the same number of iterations
(``tol=0``: neither stops early). Each is timed ``--repeat`` times, alternating; the best counts.
On a busy machine run it with ``OPENBLAS_NUM_THREADS=1``: scikit-learn's scipy calls and NumPy
use two OpenBLAS thread pools that otherwise thrash each other (which flatters our ratio).

Run::

    python benchmarks/bench_em.py            # 3000 x 20 and 400 x 10
    python benchmarks/bench_em.py --iters 50 --repeat 5

Prints one line a size: times in ms, and the ratio ours / sklearn (< 1: ours faster).
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture

from scotgm_pp.inference.em import _m_step, default_prior, fit_em


def simulate(n: int, d: int, rng: np.random.Generator) -> np.ndarray:
    """Two overlapping Gaussian states in ``d`` dimensions with decaying PC variances."""
    scales = np.sqrt(np.linspace(4.0, 0.5, d))
    shift = np.zeros(d)
    shift[: max(1, d // 4)] = 1.5
    n1 = n // 3
    X0 = rng.normal(size=(n - n1, d)) * scales
    X1 = rng.normal(size=(n1, d)) * scales * 0.8 + shift
    return np.vstack([X0, X1])


def initial_responsibilities(X: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Hard labels from the sign of a random projection around the mean (a fixed start)."""
    proj = (X - X.mean(axis=0)) @ rng.normal(size=X.shape[1])
    R = np.zeros((X.shape[0], 2))
    R[np.arange(X.shape[0]), (proj > 0).astype(int)] = 1.0
    return R


def best_times(fns, repeat: int) -> tuple[list[float], list[object]]:
    """Best wall time of each function over ``repeat`` rounds, the functions alternating within
    a round so that a change of machine load hits both alike."""
    best, out = [np.inf] * len(fns), [None] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            out[i] = fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best, out


def run(n: int, d: int, iters: int, repeat: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    X = simulate(n, d, rng)
    R0 = initial_responsibilities(X, rng)
    prior = default_prior(X, 2)
    free = np.ones(n, dtype=bool)
    w0, m0, c0 = _m_step(X, R0, free, prior, "map")

    def ours():
        return fit_em(X, n_states=2, prior=prior, init_responsibilities=R0, max_iter=iters, tol=0.0)

    def sklearn():
        gm = GaussianMixture(
            n_components=2,
            covariance_type="full",
            tol=0.0,
            max_iter=iters,
            weights_init=w0,
            means_init=m0,
            precisions_init=np.linalg.inv(c0),
            random_state=seed,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            return gm.fit(X)

    (t_ours, t_sk), (res, gm) = best_times([ours, sklearn], repeat)
    assert res.n_iter == iters and gm.n_iter_ == iters, (res.n_iter, gm.n_iter_)
    agree = float(np.mean(res.responsibilities.argmax(1) == gm.predict(X)))
    return {"n": n, "d": d, "iters": iters, "ours_ms": 1e3 * t_ours, "sklearn_ms": 1e3 * t_sk,
            "ratio": t_ours / t_sk, "label_agreement": agree}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    rows = []
    for n, d in [(3000, 20), (400, 10)]:
        row = run(n, d, args.iters, args.repeat)
        rows.append(row)
        print(
            f"n={row['n']:5d} d={row['d']:3d} iters={row['iters']}: fit_em {row['ours_ms']:8.1f} ms, "
            f"sklearn {row['sklearn_ms']:8.1f} ms, ratio ours/sklearn {row['ratio']:.2f}, "
            f"label agreement {row['label_agreement']:.3f}"
        )
    return rows


if __name__ == "__main__":
    main()

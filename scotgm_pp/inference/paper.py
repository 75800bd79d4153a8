"""Algorithm 1 of sc-OTGM as published, reproduced for comparison only.

What the published procedure does, step by step (``i = 0, 1, ..., n_iter - 1``):

* ``C`` starts as a random positive semi-definite matrix ``R R^T`` (``R`` standard normal).
  Because the first update multiplies ``C`` by ``i / (i + 1) = 0``, this start is erased at once.
* Two chains, one for ``x`` (source) and one for ``y`` (target), run **independently** of
  each other: nothing in either chain looks at the other one or at any coupling.
* Each chain step draws a standard normal direction ``d``, normalises it to unit length,
  projects the current point on it (``p = <point, d>``), forms the "95% interval"
  ``p +- 1.96 sqrt(d^T S d)`` and replaces the point by **one uniform scalar** drawn from that
  interval.  From then on the "point" is that scalar broadcast to every coordinate, so its
  projection on the next direction is ``s * sum(d)``.  The state space collapses to the line
  spanned by ``(1, ..., 1)``; no step targets ``N(mu, S)``.
* The cross-covariance is updated as
  ``C <- i/(i+1) C + i/(i+1)^2 (x - mu_x)(y - mu_y)^T`` (the scalars broadcast against the
  mean vectors).  Unrolled, ``C_n = (1/n) sum_i i/(i+1) (x_i - mu_x)(y_i - mu_y)^T``: a running
  average of outer products of two independent sequences.

Consequences (asserted in ``tests/test_paper_algorithm.py``): since the scalar chains have mean
zero, ``E[(s_x 1 - mu_x)(s_y 1 - mu_y)^T] = mu_x mu_y^T``; the estimate converges (slowly, with
heavy-tailed noise) to ``mu_x mu_y^T``, whatever ``Sx`` and ``Sy`` are.  That is neither the
OT cross-covariance nor ``0`` (the independent coupling) unless the means are zero, and it is
not even invariant to translating the data.
"""

from __future__ import annotations

import numpy as np

__all__ = ["PaperResult", "paper_cross_covariance"]

_Z95 = 1.96


class PaperResult(dict):
    """``{"cross_covariance": (m, m) array, "errors": (n_iter,) array or None}``, attribute access too."""

    __getattr__ = dict.__getitem__


def _check(mu_x, Sx, mu_y, Sy):
    arrays = []
    for name, S in (("Sx", Sx), ("Sy", Sy)):
        S = np.asarray(S, dtype=float)
        if S.ndim != 2 or S.shape[0] != S.shape[1]:
            raise ValueError(f"{name} must be a square (m, m) matrix, got shape {S.shape}.")
        if not np.all(np.isfinite(S)):
            raise ValueError(f"{name} has non-finite entries.")
        arrays.append(0.5 * (S + S.T))
    Sx, Sy = arrays
    if Sx.shape != Sy.shape:
        raise ValueError(f"Sx and Sy must have the same shape, got {Sx.shape} and {Sy.shape}.")
    m = Sx.shape[0]
    mus = []
    for name, mu in (("mu_x", mu_x), ("mu_y", mu_y)):
        mu = np.asarray(mu, dtype=float)
        if mu.shape != (m,) or not np.all(np.isfinite(mu)):
            raise ValueError(f"{name} must be a finite vector of shape ({m},), got shape {mu.shape}.")
        mus.append(mu)
    for name, S in (("Sx", Sx), ("Sy", Sy)):
        if np.linalg.eigvalsh(S)[0] < -1e-8 * max(1.0, np.abs(S).max()):
            raise ValueError(f"{name} is not positive semi-definite.")
    return mus[0], Sx, mus[1], Sy


def _scalar_chain(mu: np.ndarray, S: np.ndarray, dirs: np.ndarray, unif: np.ndarray) -> np.ndarray:
    """The published chain: returns the scalar "point" after each step (shape ``(n,)``)."""
    dirs = dirs / np.linalg.norm(dirs, axis=1, keepdims=True)
    half = _Z95 * np.sqrt(np.sum((dirs @ S) * dirs, axis=1))  # 1.96 sqrt(d^T S d), all steps
    sums = dirs.sum(axis=1).tolist()  # projection of a broadcast scalar s on d is s * sum(d)
    offsets = (half * (2.0 * unif - 1.0)).tolist()  # uniform on [proj - h, proj + h] is proj + offset
    out = [0.0] * len(offsets)
    s = float(mu @ dirs[0]) + offsets[0]  # the first point is the mean vector
    out[0] = s
    for i in range(1, len(offsets)):  # s_i = s_{i-1} sum(d_i) + offset_i: a scalar recursion
        s = s * sums[i] + offsets[i]
        out[i] = s
    return np.array(out)


def _draws(rng: np.random.Generator, m: int, n_iter: int):
    R = rng.standard_normal((m, m))
    return R @ R.T, rng.standard_normal((n_iter, m)), rng.standard_normal((n_iter, m)), rng.random(n_iter), rng.random(n_iter)


def paper_cross_covariance(
    mu_x,
    Sx,
    mu_y,
    Sy,
    *,
    n_iter: int = 1000,
    random_state: int | np.random.Generator | None = 0,
    ground_truth: np.ndarray | None = None,
    vectorised: bool = True,
) -> PaperResult:
    """Cross-covariance estimate of the published sc-OTGM Algorithm 1 (for comparison only).

    Parameters
    ----------
    mu_x, Sx, mu_y, Sy
        Means ``(m,)`` and covariances ``(m, m)`` of the source and target Gaussians.
    n_iter
        Iterations.
    random_state
        Seed or generator (``np.random.default_rng``).
    ground_truth
        If given, ``errors[i] = ||C_i - ground_truth||_F`` after every iteration.
    vectorised
        ``True``: all directions, interval widths and the running average at once (chunked
        cumulative sums).  ``False``: the literal per-iteration loop, as published; used as the
        timing baseline and to check that both give the same numbers.

    Returns
    -------
    PaperResult
        ``cross_covariance`` (the final ``C``) and ``errors`` (``None`` without ground truth).
        See the module docstring for what this converges to (``mu_x mu_y^T``).
    """
    mu_x, Sx, mu_y, Sy = _check(mu_x, Sx, mu_y, Sy)
    if int(n_iter) != n_iter or n_iter < 1:
        raise ValueError(f"n_iter must be a positive integer, got {n_iter!r}.")
    m = Sx.shape[0]
    if ground_truth is not None:
        ground_truth = np.asarray(ground_truth, dtype=float)
        if ground_truth.shape != (m, m):
            raise ValueError(f"ground_truth must have shape ({m}, {m}), got {ground_truth.shape}.")
    rng = np.random.default_rng(random_state)
    C0, dx, dy, ux, uy = _draws(rng, m, n_iter)
    if not vectorised:
        return _paper_loop(mu_x, Sx, mu_y, Sy, C0, dx, dy, ux, uy, ground_truth)
    sx = _scalar_chain(mu_x, Sx, dx, ux)
    sy = _scalar_chain(mu_y, Sy, dy, uy)
    X = sx[:, None] - mu_x[None, :]  # x_i - mu_x with the scalar broadcast
    Y = sy[:, None] - mu_y[None, :]
    i = np.arange(n_iter, dtype=float)
    w = i / (i + 1.0)  # weight of the i-th outer product in (i + 1) C_i
    if ground_truth is None:
        C = (X.T * w) @ Y / n_iter if n_iter > 0 else C0
        return PaperResult(cross_covariance=C, errors=None)
    errors = np.empty(n_iter)
    acc = np.zeros((m, m))
    chunk = max(1, 2_000_000 // (m * m))
    for a in range(0, n_iter, chunk):
        b = min(n_iter, a + chunk)
        partial = np.cumsum(np.einsum("k,ki,kj->kij", w[a:b], X[a:b], Y[a:b]), axis=0) + acc
        Cs = partial / (i[a:b] + 1.0)[:, None, None]
        errors[a:b] = np.linalg.norm((Cs - ground_truth).reshape(b - a, -1), axis=1)
        acc = partial[-1]
    return PaperResult(cross_covariance=acc / n_iter, errors=errors)


def _paper_loop(mu_x, Sx, mu_y, Sy, C, dx, dy, ux, uy, ground_truth) -> PaperResult:
    """Literal transcription: one iteration at a time (same random numbers as the vectorised path)."""
    n_iter = len(ux)
    errors = np.empty(n_iter) if ground_truth is not None else None
    x, y = mu_x.copy(), mu_y.copy()
    for i in range(n_iter):
        x = _paper_step(x, Sx, dx[i], ux[i])
        y = _paper_step(y, Sy, dy[i], uy[i])
        C = (i / (i + 1)) * C + (i / (i + 1) ** 2) * np.outer(x - mu_x, y - mu_y)
        if errors is not None:
            errors[i] = np.linalg.norm(C - ground_truth)
    return PaperResult(cross_covariance=C, errors=errors)


def _paper_step(point, S, d, u):
    d = d / np.linalg.norm(d)
    proj = np.sum(point * d)  # a broadcast scalar "point" projects to s * sum(d)
    half = _Z95 * np.sqrt(d @ S @ d)
    lo, hi = proj - half, proj + half
    return lo + (hi - lo) * u  # a scalar

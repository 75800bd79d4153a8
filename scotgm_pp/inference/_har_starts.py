"""Starting plans for the chains, in the SVD frame of ``G`` (where the optimum is ``J = I``).

``"dispersed"`` (the default of :func:`~scotgm_pp.inference.hit_and_run.sample_coupling`)
spreads the chains from near the optimal plan to near the costliest one, so that R-hat compares
chains that began far apart; ``"local"`` starts them around the optimum with an excess cost
spread around its expected value (overdispersed in the cost, for short runs).
"""

from __future__ import annotations

import numpy as np

from ._har_temperature import effective_dimension

__all__ = ["dispersed_starts", "local_starts"]


def dispersed_starts(m: int, n_chains: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``lam I + (1 - |lam|) R`` with ``lam`` evenly spread over ``[-0.9, 0.9]`` and random ``R`` of
    spectral norm 1/2 (in the SVD frame ``I`` is the OT plan and ``-I`` the costliest plan)."""
    lams = np.linspace(-0.9, 0.9, n_chains) if n_chains > 1 else np.zeros(1)
    starts = []
    for lam in lams:
        R = rng.standard_normal((m, m))
        R *= 0.5 / np.linalg.norm(R, 2)
        starts.append(lam * np.eye(m) + (1.0 - abs(lam)) * R)
    return starts


def _excess(J: np.ndarray, s: np.ndarray) -> float:
    return 2.0 * float(np.sum(s * (1.0 - np.diag(J))))


def local_starts(s: np.ndarray, temperature: float, n_chains: int, rng: np.random.Generator,
                 spread: tuple[float, float] = (0.5, 2.0)) -> list[np.ndarray]:
    """Dispersed-but-local starts ``J0 = expm(A) (I - P)`` around the mode ``J = I`` (SVD frame).

    ``P = c diag(h) X X^T diag(h) / m`` (PSD, ``h = s^{-1/2}`` normalised) and
    ``A = sqrt(c) diag(h) (Y - Y^T) diag(h) / sqrt(2 m)`` (skew), random ``X``, ``Y``; the scale ``c``
    of chain ``k`` is set (bisection) so that the start's excess cost over the optimum is
    ``f_k d_eff eps``, ``f_k`` log-spaced over ``spread``: the mean excess under ``pi_eps`` is
    ``d_eff eps`` (:func:`effective_dimension`) with relative spread ``~ 1 / sqrt(d_eff)``, so the
    starts are overdispersed in the transport cost (as R-hat needs) yet inside the region of
    appreciable mass (for a unimodal log-concave target, no mode can be missed).  When the
    target excess exceeds what ``||I - P|| < 1`` allows (high temperature), the largest feasible
    scale is used.
    """
    r = s.size
    floor = 1e-3 * max(float(s.mean()), np.finfo(float).tiny)
    h = 1.0 / np.sqrt(np.maximum(s, floor))
    h /= np.sqrt(np.mean(h**2))
    d_eff = effective_dimension(r)
    fs = np.geomspace(spread[0], spread[1], n_chains) if n_chains > 1 else np.ones(1)
    fs = rng.permutation(fs)
    starts = []
    for f in fs:
        X = rng.standard_normal((r, r))
        Y = rng.standard_normal((r, r))
        P1 = (h[:, None] * (X @ X.T) * h[None, :]) / r
        A1 = (h[:, None] * (Y - Y.T) * h[None, :]) / np.sqrt(2.0 * r)
        c_max = 0.999 / np.linalg.eigvalsh(P1)[-1]  # keeps ||I - P|| < 1
        w, Vc = np.linalg.eigh(1j * A1)  # A1 = -i Vc diag(w) Vc^H: expm(x A1) in O(r^3) per x

        def make(c, w=w, Vc=Vc, P1=P1):
            rot = ((Vc * np.exp(-1j * np.sqrt(c) * w)) @ Vc.conj().T).real
            return rot @ (np.eye(r) - c * P1)

        target = f * d_eff * temperature
        lo, hi = 0.0, c_max
        if _excess(make(c_max), s) > target:
            for _ in range(60):
                mid = 0.5 * (lo + hi)
                if _excess(make(mid), s) > target:
                    hi = mid
                else:
                    lo = mid
        starts.append(make(hi))
    return starts

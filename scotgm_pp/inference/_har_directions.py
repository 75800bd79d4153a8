"""Direction distributions and starting points for Hit-and-Run on the plan ball, adapted to ``G``.

Geometry near the optimum.  Write ``G = Q diag(s) P^T`` and ``K = Q J P^T``: the target becomes
``exp(2 <J, diag(s)> / eps)`` on the same ball, with mode ``J = I`` (the OT plan ``K* = Q P^T``,
an orthogonal matrix: an extreme point of the ball).  Near it ``J ~ (I + A)(I - P)`` with ``P``
symmetric positive semi-definite and ``A`` skew; the excess cost is
``~ 2 tr(diag(s) P) + tr(diag(s) A^T A)``, so under ``pi_eps`` the symmetric part ``P`` has
spread ``~ eps / s`` and the skew part ``A`` spread ``~ sqrt(eps / s)``.  An isotropic
rank-one direction ``u v^T`` has an indefinite symmetric part, so from a typical state its chord
is only ``O(eps)`` long: it cannot traverse the ``O(sqrt(eps))`` skew spread, which is why
isotropic Hit-and-Run mixes in ``~1 / eps`` steps there.

The mixture used instead, fixed in advance from ``G`` (it never looks at the current state, so
every component, and the mixture, is a ``pi_eps``-reversible Hit-and-Run kernel):

* ``"skew"``: ``Q (a b^T - b a^T) P^T`` (rank two): moves along the orthogonal group through
  ``K*`` (the curved boundary); rate ``<D, G> = 0``, chord ``O(sqrt(eps))``;
* ``"sym"``: ``Q a a^T P^T = (Q a)(K*^T Q a)^T`` (rank one): moves the symmetric part, inwards
  or outwards, with an exponential draw on a long chord;
* ``"iso"``: ``u v^T`` with ``u``, ``v`` uniform on the sphere (the original kernel), a small
  share for robustness far from the optimum (high temperature).

Each of ``a``, ``b`` is, with probability ``whiten``, scaled by ``diag(s)^{-1/2}`` (normalised):
the state's spread in the direction ``e_i`` is ``~ s_i^{-1/2}`` times the common scale.  The sym
and skew families together span all ``m x m`` matrices, so the chain is irreducible.
"""

from __future__ import annotations

import numpy as np

__all__ = ["DirectionMixture", "local_starts"]

FAMILIES = ("iso", "sym", "skew")


class DirectionMixture:
    """Fixed mixture of direction distributions in the SVD frame of ``G``.

    Parameters
    ----------
    G
        ``Lx Ly`` of the target (any frame).
    weights
        Probabilities of the ``("iso", "sym", "skew")`` families.  ``(1, 0, 0)`` with
        ``whiten=0`` is plain isotropic rank-one Hit-and-Run.
    whiten
        Probability that a direction's vectors are scaled by ``diag(s)^{-1/2}``.
    """

    def __init__(self, G: np.ndarray, weights=(0.1, 0.6, 0.3), whiten: float = 0.5):
        weights = np.asarray(weights, dtype=float)
        if weights.shape != (3,) or np.any(weights < 0) or weights.sum() <= 0:
            raise ValueError(f"weights must be 3 non-negative numbers for {FAMILIES}, got {weights}.")
        if weights[0] == 0 and (weights[1] == 0 or weights[2] == 0):
            raise ValueError("without 'iso' directions both 'sym' and 'skew' are needed (irreducibility).")
        if not 0.0 <= whiten <= 1.0:
            raise ValueError(f"whiten must be a probability, got {whiten}.")
        self.weights = weights / weights.sum()
        self.whiten = float(whiten)
        self.Q, self.s, self.Pt = np.linalg.svd(np.asarray(G, dtype=float))
        floor = 1e-3 * max(float(self.s.mean()), np.finfo(float).tiny)
        h = 1.0 / np.sqrt(np.maximum(self.s, floor))
        self.h = h / np.sqrt(np.mean(h**2))
        self.m = self.s.size

    def draw(self, n: int, rng: np.random.Generator):
        """``n`` directions: ``U``, ``V`` of shape ``(n, 2, m)`` (direction ``sum_l U[l] V[l]^T``),
        ``ranks`` (1 or 2) and ``slopes = <D, G>``."""
        m = self.m
        family = rng.choice(3, size=n, p=self.weights)
        X = rng.standard_normal((n, 2, m))
        Y = rng.standard_normal((n, m))
        if self.whiten > 0:
            w = rng.random(n) < self.whiten
            X[w] *= self.h
            Y[w] *= self.h
        X /= np.linalg.norm(X, axis=2, keepdims=True)
        Y /= np.linalg.norm(Y, axis=1, keepdims=True)
        a, b = X[:, 0], X[:, 1]
        U = np.zeros((n, 2, m))
        V = np.zeros((n, 2, m))
        U[:, 0] = a
        iso, sym, skew = family == 0, family == 1, family == 2
        V[iso, 0] = Y[iso]
        V[sym, 0] = a[sym]
        U[skew, 1] = b[skew]
        V[skew, 0] = b[skew]
        V[skew, 1] = -a[skew]
        ranks = np.where(skew, 2, 1).astype(np.int64)
        slopes = np.einsum("nlm,nlm->n", U * self.s, V)
        U = np.ascontiguousarray(U @ self.Q.T)  # J-frame -> K-frame: D_K = Q D_J P^T
        V = np.ascontiguousarray(V @ self.Pt)
        return U, V, ranks, slopes


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
    d_eff = r * (r + 1) / 2.0 + r * (r - 1) / 4.0
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

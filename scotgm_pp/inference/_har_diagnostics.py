"""Convergence diagnostics of the plan chains on the quantities used downstream.

Rank-normalised split R-hat and bulk and tail effective sample sizes (Vehtari, Gelman, Simpson,
Carpenter & Buerkner 2021) of every entry of the cross-covariance ``C = Lx K Ly`` (what the
pipeline turns into the perturbation covariance ``Sx + Sy - C - C^T``) and of the transport
cost.  The formulas are ArviZ's (``arviz.rhat``, ``arviz.ess(method="bulk")`` and
``arviz.ess(method="tail", prob=(0.05, 0.95))``, ArviZ 1: Blom ranks, Geyer's initial monotone
sequence), written once over all ``m^2`` entries
at a time instead of one variable at a time (ArviZ takes ~6 s for ``m = 50``);
``tests/test_hit_and_run.py`` checks they agree with ArviZ to 1e-10.  Thresholds are those
Vehtari et al. recommend: R-hat at most 1.01 and ESS at least 400 (100 per chain for four
chains); the worst entry of ``C`` must pass, as must the cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ESS_MIN", "RHAT_MAX", "ChainDiagnostics", "chain_diagnostics"]

RHAT_MAX = 1.01
ESS_MIN = 400.0


@dataclass(frozen=True)
class ChainDiagnostics:
    """R-hat and ESS of the transport cost and of every entry of ``C``.

    Attributes
    ----------
    cost_rhat, cost_ess_bulk, cost_ess_tail
        Of the transport cost.
    rhat_max, ess_bulk_min, ess_tail_min
        Worst entry of ``C`` (largest R-hat, smallest ESS).
    rhat, ess_bulk, ess_tail
        Per entry of ``C``, shape ``(m, m)``.
    """

    cost_rhat: float
    cost_ess_bulk: float
    cost_ess_tail: float
    rhat_max: float
    ess_bulk_min: float
    ess_tail_min: float
    rhat: np.ndarray
    ess_bulk: np.ndarray
    ess_tail: np.ndarray

    def failures(self, rhat_max: float = RHAT_MAX, ess_min: float = ESS_MIN) -> list[str]:
        """Human-readable list of the thresholds not met (empty when all pass)."""
        checks = [
            ("max R-hat over the entries of C", self.rhat_max, rhat_max, True),
            ("R-hat of the transport cost", self.cost_rhat, rhat_max, True),
            ("min bulk ESS over the entries of C", self.ess_bulk_min, ess_min, False),
            ("min tail ESS over the entries of C", self.ess_tail_min, ess_min, False),
            ("bulk ESS of the transport cost", self.cost_ess_bulk, ess_min, False),
        ]
        out = []
        for label, value, bound, upper in checks:
            if upper and not value <= bound:  # nan fails too
                out.append(f"{label} {value:.3f} > {bound:g}")
            elif not upper and not value >= bound:
                out.append(f"{label} {value:.0f} < {bound:g}")
        return out

    @property
    def passed(self) -> bool:
        """All thresholds met."""
        return not self.failures()

    def summary(self) -> dict:
        """The scalar diagnostics, as plain floats."""
        return {
            "cost_rhat": float(self.cost_rhat),
            "cost_ess_bulk": float(self.cost_ess_bulk),
            "cost_ess_tail": float(self.cost_ess_tail),
            "rhat_max_cross_cov": float(self.rhat_max),
            "ess_bulk_min_cross_cov": float(self.ess_bulk_min),
            "ess_tail_min_cross_cov": float(self.ess_tail_min),
        }


def _split(X: np.ndarray) -> np.ndarray:
    """``(chains, draws, V)`` -> ``(2 chains, draws // 2, V)``: first and last halves as chains."""
    half = X.shape[1] // 2
    return np.concatenate([X[:, :half], X[:, X.shape[1] - half:]], axis=0)


def _z_scale(X: np.ndarray) -> np.ndarray:
    """Normal scores of the pooled ranks of each variable (average ties, Blom offset 3/8)."""
    from scipy import special, stats

    c, n, V = X.shape
    ranks = stats.rankdata(np.ascontiguousarray(X.reshape(c * n, V).T), axis=1, method="average")
    return np.ascontiguousarray(special.ndtri((ranks - 0.375) / (c * n + 0.25)).T).reshape(c, n, V)


def _rhat(X: np.ndarray) -> np.ndarray:
    n = X.shape[1]
    between = n * np.var(X.mean(axis=1), axis=0, ddof=1)
    within = np.mean(np.var(X, axis=1, ddof=1), axis=0)
    return np.sqrt((between / within + n - 1) / n)


def rank_normalized_rhat(X: np.ndarray) -> np.ndarray:
    """Rank-normalised split R-hat of each variable of ``X`` ``(chains, draws, V)`` (``arviz.rhat``;
    ``nan`` with fewer than 2 chains or 4 draws, or for a constant variable)."""
    X = np.asarray(X, dtype=float)
    return _rank_rhat(_split(X), None, X.shape[0])


def _rank_rhat(S: np.ndarray, Z: np.ndarray | None, n_chains: int) -> np.ndarray:
    if n_chains < 2 or S.shape[1] < 2:
        return np.full(S.shape[2], np.nan)
    Z = _z_scale(S) if Z is None else Z
    folded = np.abs(S - np.median(S.reshape(-1, S.shape[2]), axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.maximum(_rhat(Z), _rhat(_z_scale(folded)))


def _ess(X: np.ndarray) -> np.ndarray:
    """Effective sample size of each variable of ``X`` ``(chains, draws, V)`` (ArviZ's ``_ess``)."""
    from scipy.fft import irfft, next_fast_len, rfft

    X = np.asarray(X, dtype=float)
    c, n, V = X.shape
    out = np.full(V, float(c * n))
    spread = X.max(axis=(0, 1)) - X.min(axis=(0, 1))
    live = spread >= np.finfo(float).resolution  # a constant variable has ESS c * n
    if not live.any():
        return out
    chain_mean = X[:, :, live].mean(axis=1)
    Y = X[:, :, live] - chain_mean[:, None, :]
    size = next_fast_len(2 * n)
    F = rfft(Y, n=size, axis=1)
    acov = irfft(F * np.conjugate(F), n=size, axis=1)[:, :n] / n
    mean_var = acov[:, 0].mean(axis=0) * n / (n - 1.0)
    var_plus = mean_var * (n - 1.0) / n
    if c > 1:
        var_plus = var_plus + np.var(chain_mean, axis=0, ddof=1)
    R = 1.0 - (mean_var - acov.mean(axis=0)) / var_plus  # rho_hat at every lag, (n, V')
    W = R.shape[1]
    rho = np.zeros((n, W))
    rho[0] = 1.0
    rho[1] = R[1]
    # Geyer's initial positive sequence: pairs (t + 1, t + 2), t = 1, 3, ..., while the previous pair
    # sum is positive and t < n - 3; a pair is kept when its sum is >= 0
    even, odd = np.ones(W), R[1].copy()
    t = np.ones(W, dtype=int)
    active = (t < n - 3) & (even + odd > 0.0)
    while active.any():
        idx = np.nonzero(active)[0]
        ti = t[idx]
        even[idx], odd[idx] = R[ti + 1, idx], R[ti + 2, idx]
        keep = even[idx] + odd[idx] >= 0.0
        rho[ti[keep] + 1, idx[keep]] = even[idx[keep]]
        rho[ti[keep] + 2, idx[keep]] = odd[idx[keep]]
        t[idx] += 2
        active = (t < n - 3) & (even + odd > 0.0)
    max_t = t - 2
    cols = np.arange(W)
    pos = even > 0.0
    rho[max_t[pos] + 1, cols[pos]] = even[pos]
    # Geyer's initial monotone sequence: pair sums (t + 1, t + 2), t = 1, 3, ... <= max_t - 2, made
    # non-increasing (a running minimum), each element of a lowered pair set to half the sum
    for v in range(W):  # short loops: the sequences end after a few lags for mixing chains
        j_last = (max_t[v] - 1) // 2  # pairs (2j, 2j + 1), j = 1 .. j_last, against pair j - 1
        prev = rho[0, v] + rho[1, v]
        for j in range(1, j_last + 1):
            cur = rho[2 * j, v] + rho[2 * j + 1, v]
            if cur > prev:
                rho[2 * j, v] = rho[2 * j + 1, v] = prev / 2.0
                cur = prev
            prev = cur
    lags = np.arange(n)[:, None]
    tau = -1.0 + 2.0 * np.where(lags <= max_t, rho, 0.0).sum(axis=0) + np.where(lags == max_t + 1, rho, 0.0).sum(axis=0)
    tau = np.maximum(tau, 1.0 / np.log10(c * n))
    ess = c * n / tau
    ess[np.isnan(rho).any(axis=0)] = np.nan
    out[live] = ess
    return out


def ess_bulk(X: np.ndarray) -> np.ndarray:
    """Bulk ESS of each variable of ``X`` ``(chains, draws, V)`` (``arviz.ess(method="bulk")``)."""
    return _ess(_z_scale(_split(np.asarray(X, dtype=float))))


def ess_tail(X: np.ndarray, prob: tuple[float, float] = (0.05, 0.95)) -> np.ndarray:
    """Tail ESS: the smaller ESS of the indicators of the 5% and 95% quantiles (Vehtari et al. 2021;
    ``arviz.ess(method="tail", prob=(0.05, 0.95))``; ArviZ 1's default ``prob`` follows its
    ``stats.ci_prob`` instead)."""
    X = np.asarray(X, dtype=float)
    flat = X.reshape(-1, X.shape[2])
    out = []
    for p in prob:
        q = np.quantile(flat, p, axis=0)  # R type 7, as ArviZ
        out.append(_ess(_split((X <= q).astype(float))))
    return np.minimum(*out)


def chain_diagnostics(cost_draws: np.ndarray, C_draws: np.ndarray) -> ChainDiagnostics:
    """Diagnostics of ``cost_draws`` ``(chains, draws)`` and ``C_draws`` ``(chains, draws, m, m)``."""
    C_draws = np.asarray(C_draws, dtype=float)
    c, n, m, _ = C_draws.shape
    X = np.concatenate([np.asarray(cost_draws, dtype=float)[:, :, None], C_draws.reshape(c, n, m * m)], axis=2)
    S = _split(X)
    Z = _z_scale(S)  # shared by the R-hat and the bulk ESS
    rhat, bulk, tail = _rank_rhat(S, Z, c), _ess(Z), ess_tail(X)
    r, b, t = (a[1:].reshape(m, m) for a in (rhat, bulk, tail))
    return ChainDiagnostics(
        cost_rhat=float(rhat[0]),
        cost_ess_bulk=float(bulk[0]),
        cost_ess_tail=float(tail[0]),
        rhat_max=float(np.max(r)),
        ess_bulk_min=float(np.min(b)),
        ess_tail_min=float(np.min(t)),
        rhat=r,
        ess_bulk=b,
        ess_tail=t,
    )

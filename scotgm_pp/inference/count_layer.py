"""The count observation layer: negative-binomial counts of every gene, sharing the cell's state.

For gene ``g`` and cell ``i`` in state ``k`` and batch ``b``::

    y_ig ~ NB(mean = s_i exp(beta_g + delta_kg + gamma_bg), var = mean + phi_bg mean^2)

with ``s_i`` the cell's library size (its total count, an offset), ``delta_0g = 0`` (the basal
state is the reference) and ``gamma_0g = 0`` (batch 0, the most frequent, is the reference).
Priors: ``beta_g ~ N(m_g, beta_sd)`` centred on the gene's pooled log rate,
``delta_kg ~ N(0, delta_sd)`` and ``gamma_bg ~ N(0, gamma_sd)``. The dispersion ``phi_bg`` is a
plug-in constant (data, not a parameter): the moment estimate over the control cells shrunk
toward the screen's mean-dispersion trend (:func:`control_dispersion`,
:mod:`scotgm_pp.inference.dispersion`), floored at :data:`PHI_MIN`. Without batches it is one
value per gene; with batches each batch with at least :data:`MIN_BATCH_CONTROLS` control cells
has its own (:func:`control_dispersion_by_batch`: estimated and shrunk toward its own trend from
that batch's controls alone), the others the pooled one.

This module holds the layer's parameters, priors and prepared data; its fit (a Newton iteration
vectorised over genes) and standard errors are in :mod:`scotgm_pp.inference.count_fit`; the
PyMC declaration is :mod:`scotgm_pp.models.count_graph`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.special import gammaln

from .dispersion import shrink_dispersion

__all__ = [
    "PHI_MIN",
    "DELTA_SD",
    "CountPrior",
    "CountParams",
    "CountData",
    "default_count_prior",
    "control_dispersion",
    "control_dispersion_by_batch",
    "BatchDispersion",
    "MIN_BATCH_CONTROLS",
    "count_log_prior",
    "batch_codes",
    "log_prior_per_gene",
    "prior_scales",
]

PHI_MIN = 1e-6
"""Floor of the plug-in dispersion (a moment estimate of 0 means Poisson-like counts)."""

DELTA_SD = 0.5
"""Default prior standard deviation of a state effect ``delta`` (natural-log fold change)."""

_LOG2PI = np.log(2.0 * np.pi)


def _dense(counts) -> np.ndarray:
    return np.asarray(counts.toarray() if sp.issparse(counts) else counts, dtype=float)


def control_dispersion(counts, size_factors: np.ndarray, is_control: np.ndarray, batch=None, *,
                       shrink: bool = True) -> np.ndarray:
    """NB dispersion ``phi_g`` from the control cells: moment estimates shrunk toward their trend, floored at :data:`PHI_MIN`.

    Within every batch the expected count of a control cell is ``s_i * rate`` (``rate`` the
    batch's summed counts over summed library sizes); the moment estimate is
    ``phi_hat = sum((y - mu)^2 - mu) / sum(mu^2)``. With ``shrink`` (default) the estimates are
    shrunk toward the genes' mean-dispersion trend (:func:`scotgm_pp.inference.dispersion.shrink_dispersion`,
    with each gene's mean count per control cell and ``n`` controls less one per batch);
    ``shrink=False`` gives the moment estimates.

    Parameters
    ----------
    counts
        Cells x genes raw counts (dense or sparse).
    size_factors
        Library size ``s_i`` of every cell.
    is_control
        Which cells are controls (only these enter).
    batch
        Optional batch label per cell.

    Returns
    -------
    numpy.ndarray
        ``(G,)`` dispersions.
    """
    _, num, den, total, n = _control_moments(counts, size_factors, is_control, batch)
    return _moment_dispersion(num.sum(axis=0), den.sum(axis=0), total.sum(axis=0), int(n.sum()), len(n), shrink)


def _control_moments(counts, size_factors: np.ndarray, is_control: np.ndarray, batch):
    """Per batch of the control cells (in order of first appearance; one ``"all"`` without
    batches), with ``mu = s_i * rate`` and the batch's rate: its label, ``sum (y - mu)^2 - mu``,
    ``sum mu^2`` and ``sum mu`` per gene (``(L, G)`` each) and its number of cells ``(L,)``."""
    ctrl = np.asarray(is_control, bool)
    y = _dense(counts[np.flatnonzero(ctrl)] if sp.issparse(counts) else np.asarray(counts)[ctrl])
    s = np.asarray(size_factors, float)[ctrl]
    groups, labels = (np.zeros(len(s), int), np.array(["all"])) if batch is None else \
        pd.factorize(np.asarray(batch)[ctrl])
    L = len(np.unique(groups))
    num, den, total = (np.zeros((L, y.shape[1])) for _ in range(3))
    for g in range(L):
        m = groups == g
        rate = y[m].sum(axis=0) / max(s[m].sum(), 1e-300)
        mu = s[m, None] * rate[None, :]
        num[g] = ((y[m] - mu) ** 2 - mu).sum(axis=0)
        den[g] = (mu**2).sum(axis=0)
        total[g] = mu.sum(axis=0)
    return [str(x) for x in labels[:L]], num, den, total, np.bincount(groups, minlength=L)


def _moment_dispersion(num, den, total, n: int, n_levels: int, shrink: bool) -> np.ndarray:
    """The moment estimate ``num / den`` of ``n`` cells in ``n_levels`` batches, shrunk toward its
    trend (``shrink``, at least 3 cells) and floored at :data:`PHI_MIN`."""
    raw = num / np.maximum(den, 1e-300)
    if not shrink or n < 3:
        return np.maximum(raw, PHI_MIN)
    return shrink_dispersion(raw, total / max(n, 1), n - n_levels, floor=PHI_MIN).dispersion


MIN_BATCH_CONTROLS = 50
"""Control cells a batch needs for a dispersion of its own (:func:`control_dispersion_by_batch`);
a batch with fewer takes the pooled estimate."""


@dataclass(frozen=True)
class BatchDispersion:
    """NB dispersions per batch and gene, keyed by batch label.

    Attributes
    ----------
    labels
        The batch labels, most control cells first.
    values
        ``(B, G)``: row ``b`` is batch ``labels[b]``'s dispersion (the pooled one where the
        batch has too few controls, ``own[b]`` False).
    pooled
        ``(G,)``: the estimate over all control cells (rates within batches), used for batches
        not in ``labels`` and by the parts of the package that take one dispersion per gene (the
        calls' statistic, the signature's weights).
    n_controls
        ``(B,)`` control cells per batch.
    own
        ``(B,)`` whether the batch's row is its own estimate.
    """

    labels: tuple[str, ...]
    values: np.ndarray
    pooled: np.ndarray
    n_controls: np.ndarray
    own: np.ndarray

    @property
    def n_genes(self) -> int:
        return self.pooled.size

    def rows(self, labels) -> np.ndarray:
        """``(len(labels), G)``: the dispersion of each batch named (pooled for a label not held)."""
        where = {lab: b for b, lab in enumerate(self.labels)}
        return np.stack([self.values[where[str(lab)]] if str(lab) in where else self.pooled for lab in labels])

    def take(self, cols) -> BatchDispersion:
        """The same batches restricted to the genes ``cols`` (indices or a boolean mask)."""
        return BatchDispersion(self.labels, self.values[:, cols], self.pooled[cols], self.n_controls, self.own)


def control_dispersion_by_batch(counts, size_factors: np.ndarray, is_control: np.ndarray, batch, *,
                                shrink: bool = True, min_cells: int = MIN_BATCH_CONTROLS) -> BatchDispersion:
    """NB dispersion per batch and gene from the control cells (:func:`control_dispersion` within each batch).

    Every batch with at least ``min_cells`` control cells gets the moment estimates of its own
    controls, shrunk toward that batch's own mean-dispersion trend (batches differ in depth and
    quality, so their trends differ too); a batch with fewer takes the pooled estimate (all
    controls, rates within batches).

    Returns
    -------
    BatchDispersion
    """
    if batch is None:
        raise ValueError("control_dispersion_by_batch needs a batch label per cell; use control_dispersion without batches.")
    ctrl = np.asarray(is_control, bool)
    labels_all = np.asarray(batch).astype(str)
    if labels_all.shape != ctrl.shape:
        raise ValueError(f"batch must have one label per cell ({ctrl.size}), got shape {labels_all.shape}.")
    found, num, den, total, n = _control_moments(counts, size_factors, ctrl, labels_all)
    pooled = _moment_dispersion(num.sum(axis=0), den.sum(axis=0), total.sum(axis=0), int(n.sum()), len(n), shrink)
    labels = batch_codes(labels_all[ctrl], int(ctrl.sum()))[1]  # most controls first
    at = [found.index(label) for label in labels]
    n_ctrl = n[at]
    values = np.tile(pooled, (len(labels), 1))
    own = n_ctrl >= int(min_cells)
    for b in np.flatnonzero(own):
        g = at[b]
        values[b] = _moment_dispersion(num[g], den[g], total[g], int(n[g]), 1, shrink)
    return BatchDispersion(labels=tuple(labels), values=values, pooled=pooled, n_controls=n_ctrl, own=own)


@dataclass(frozen=True)
class CountPrior:
    """Normal priors of the count layer's parameters.

    Attributes
    ----------
    beta_mean
        ``m_g``: prior mean of every gene's baseline log rate ``beta_g``, shape ``(G,)``.
    beta_sd
        Prior standard deviation of ``beta_g`` (wide).
    delta_sd
        Prior standard deviation of the state effects ``delta_kg``, ``k >= 1``: shrinks the
        effects of genes with few counts towards 0.
    gamma_sd
        Prior standard deviation of the batch offsets ``gamma_bg``, ``b >= 1``.
    """

    beta_mean: np.ndarray
    beta_sd: float = 5.0
    delta_sd: float = DELTA_SD
    gamma_sd: float = 1.0

    def __post_init__(self):
        for name in ("beta_sd", "delta_sd", "gamma_sd"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"CountPrior.{name} must be > 0, got {getattr(self, name)!r}.")
        if not np.all(np.isfinite(self.beta_mean)):
            raise ValueError("CountPrior.beta_mean must be finite.")


def default_count_prior(
    counts, size_factors: np.ndarray, *, beta_sd: float = 5.0, delta_sd: float = DELTA_SD, gamma_sd: float = 1.0
) -> CountPrior:
    """Prior centred on each gene's pooled log rate ``log((sum_i y_ig + 1/2) / sum_i s_i)``."""
    y = counts.sum(axis=0)
    total = np.asarray(y).ravel().astype(float)
    m = np.log((total + 0.5) / float(np.sum(size_factors)))
    return CountPrior(beta_mean=m, beta_sd=float(beta_sd), delta_sd=float(delta_sd), gamma_sd=float(gamma_sd))


@dataclass
class CountParams:
    """Parameters of the count layer.

    Attributes
    ----------
    beta
        Baseline log rate per gene ``(G,)`` (state 0, batch 0).
    delta
        State effects ``(K, G)``; row 0 (the basal state) is 0.
    gamma
        Batch offsets ``(B, G)``; row 0 (the reference batch) is 0.
    """

    beta: np.ndarray
    delta: np.ndarray
    gamma: np.ndarray

    @property
    def n_states(self) -> int:
        return self.delta.shape[0]

    @property
    def n_batches(self) -> int:
        return self.gamma.shape[0]

    def log_rates(self) -> np.ndarray:
        """``lambda_kbg = beta_g + delta_kg + gamma_bg``, shape ``(K, B, G)``."""
        return self.beta[None, None, :] + self.delta[:, None, :] + self.gamma[None, :, :]

    def theta(self) -> np.ndarray:
        """Per-gene parameter vectors ``(G, p)``: ``beta, delta_1.., gamma_1..``."""
        return np.column_stack([self.beta, self.delta[1:].T, self.gamma[1:].T])

    @classmethod
    def from_theta(cls, theta: np.ndarray, n_states: int, n_batches: int) -> CountParams:
        G = theta.shape[0]
        delta = np.zeros((n_states, G))
        gamma = np.zeros((n_batches, G))
        delta[1:] = theta[:, 1:n_states].T
        gamma[1:] = theta[:, n_states:].T
        return cls(beta=theta[:, 0].copy(), delta=delta, gamma=gamma)

    def copy(self) -> CountParams:
        return CountParams(self.beta.copy(), self.delta.copy(), self.gamma.copy())


def count_log_prior(params: CountParams, prior: CountPrior) -> float:
    """``sum log N(beta | m, beta_sd) + sum log N(delta_k | 0, delta_sd) + sum log N(gamma_b | 0, gamma_sd)``
    over ``k, b >= 1`` (the densities PyMC's graph declares)."""
    return float(log_prior_per_gene(params.theta(), prior, params.n_states).sum())


def prior_scales(prior: CountPrior, n_states: int, p: int) -> np.ndarray:
    sd = np.full(p, float(prior.gamma_sd))
    sd[0] = prior.beta_sd
    sd[1:n_states] = prior.delta_sd
    return sd


def log_prior_per_gene(theta: np.ndarray, prior: CountPrior, n_states: int) -> np.ndarray:
    p = theta.shape[1]
    sd = prior_scales(prior, n_states, p)
    centre = np.zeros_like(theta)
    centre[:, 0] = prior.beta_mean
    z = (theta - centre) / sd
    return (-0.5 * z**2 - np.log(sd) - 0.5 * _LOG2PI).sum(axis=1)


def _nonzero(counts, y: np.ndarray):
    """Row, column and value of every non-zero count (from the CSR structure when sparse)."""
    if sp.issparse(counts):
        csr = sp.csr_matrix(counts)
        csr.eliminate_zeros()
        rows = np.repeat(np.arange(csr.shape[0]), np.diff(csr.indptr))
        return rows, csr.indices.astype(np.intp), csr.data.astype(float)
    rows, cols = np.nonzero(y)
    return rows, cols, y[rows, cols]


_TABLE_MAX = 64


def _nb_constant(vals: np.ndarray, cols: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``lgamma(y + alpha_g) - lgamma(alpha_g) - lgamma(y + 1)`` for integer counts ``y > 0``.

    Counts up to 64 read a per-gene table of ``sum_{j<y} log(alpha_g + j) - log(y!)`` (one log per
    gene and count instead of three ``gammaln`` per entry); larger counts use ``gammaln``.
    """
    y = vals.astype(np.int64)
    small = y <= _TABLE_MAX
    top = int(min(_TABLE_MAX, y.max(initial=1)))  # the table only as long as the counts need
    steps = np.log(alpha[:, None] + np.arange(top)[None, :]) - np.log(np.arange(1, top + 1))[None, :]
    table = np.concatenate([np.zeros((len(alpha), 1)), np.cumsum(steps, axis=1)], axis=1)
    out = np.empty(len(vals))
    out[small] = table[cols[small], y[small]]
    big = ~small
    if big.any():
        a = alpha[cols[big]]
        out[big] = gammaln(vals[big] + a) - gammaln(a) - gammaln(vals[big] + 1.0)
    return out


def batch_codes(batch, n: int) -> tuple[np.ndarray, list[str]]:
    """Integer batch per cell and the labels in code order; code 0 (the reference) is the most
    frequent label (ties: the first in sorted order). ``None``: one batch, ``"all"``."""
    if batch is None:
        return np.zeros(n, int), ["all"]
    raw = np.asarray(batch).astype(str)
    if raw.shape != (n,):
        raise ValueError(f"batch must have one label per cell ({n}), got shape {raw.shape}.")
    uniq, inv, cnt = np.unique(raw, return_inverse=True, return_counts=True)
    order = np.argsort(-cnt, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return rank[inv], [str(u) for u in uniq[order]]


class CountData:
    """One experiment's counts, prepared for the count layer.

    The counts are held dense (``float64``) as ``y + alpha``, with the rows sorted once by
    (pinned state, batch) so that the free cells, the cells pinned to each state and, within
    those, each batch are contiguous slices (no copies while fitting).

    Parameters
    ----------
    counts
        Cells x genes raw counts (dense or sparse).
    size_factors
        Library size ``s_i > 0`` of every cell (its total count over all measured genes).
    dispersion
        Plug-in NB dispersion (floored at :data:`PHI_MIN`): ``(G,)``, one per gene; ``(B, G)``, one
        per batch (rows in the order of :func:`batch_codes`); or a :class:`BatchDispersion`, whose
        rows are matched to the batches by label.
    fixed_state
        ``-1`` for a free cell, ``k`` for a cell pinned to state ``k`` (validated by the caller).
    n_states
        ``K``.
    batch
        Optional batch label per cell. The most frequent label is the reference (batch 0), so
        the offsets are measured against the best-sampled batch.
    """

    def __init__(self, counts, size_factors, dispersion, fixed_state, n_states: int, batch=None):
        # sparse counts stay sparse until they are put in the sorted order (one dense copy)
        csr = sp.csr_matrix(counts, dtype=float) if sp.issparse(counts) else None
        y = None if csr is not None else _dense(counts)
        n, G = csr.shape if csr is not None else y.shape
        entries = csr.data if csr is not None else y
        if not np.all(np.isfinite(entries)) or (entries < 0).any():
            raise ValueError("counts must be finite and non-negative.")
        s = np.asarray(size_factors, float)
        if s.shape != (n,) or not np.all(np.isfinite(s)) or (s <= 0).any():
            raise ValueError(
                f"size_factors must be one positive finite value per cell ({n}); cells with no counts "
                "cannot enter the count layer: filter them first."
            )
        fixed = np.asarray(fixed_state, int)
        if fixed.shape != (n,):
            raise ValueError(f"fixed_state must have one entry per cell ({n}), got shape {fixed.shape}.")
        codes, labels = batch_codes(batch, n)
        B = len(labels)
        if isinstance(dispersion, BatchDispersion):
            if dispersion.n_genes != G:
                raise ValueError(f"dispersion holds {dispersion.n_genes} genes, the counts {G}.")
            phi = dispersion.rows(labels)
        else:
            phi = np.asarray(dispersion, float)
            if phi.ndim == 2 and phi.shape != (B, G):
                raise ValueError(f"a dispersion per batch must have shape (batches, genes) = ({B}, {G}), got {phi.shape}.")
            if phi.ndim < 2:
                phi = np.broadcast_to(phi, (G,))
        if phi.ndim == 2 and B == 1:
            phi = phi[0]  # one batch: one dispersion per gene
        if not np.all(np.isfinite(phi)) or (phi < 0).any():
            raise ValueError("dispersion must be finite and non-negative (one value per gene, or per batch and gene).")
        self.n_cells, self.n_genes, self.n_states = n, G, int(n_states)
        self.per_batch_dispersion = phi.ndim == 2
        #: the dispersion as given: ``(G,)``, or ``(B, G)`` per batch (floored)
        self.phi = np.maximum(phi, PHI_MIN)
        #: ``(B, G)``: ``1 / phi`` of every batch (rows equal without a per-batch dispersion)
        self.alpha = 1.0 / np.broadcast_to(self.phi, (B, G))
        self.batch_labels = labels
        self.n_batches = B
        self.fixed = fixed
        self.size_factors = s
        # C_i + log(s_i) sum_g y_ig, with C_i = sum_g [lgamma(y + alpha) - lgamma(alpha) - lgamma(y + 1)]
        # (0 wherever y = 0) plus sum_g alpha log alpha: the parameter-free part of each cell's
        # log-likelihood.
        rows, cols, vals = _nonzero(csr if csr is not None else counts, y)
        if self.per_batch_dispersion:
            const = np.empty(len(vals))
            for b in range(B):
                m = codes[rows] == b
                const[m] = _nb_constant(vals[m], cols[m], self.alpha[b])
        else:
            const = _nb_constant(vals, cols, self.alpha[0])
        alpha_log_alpha = np.sum(self.alpha * np.log(self.alpha), axis=1)  # (B,)
        self.row_const = (np.bincount(rows, weights=const, minlength=n)
                          + np.bincount(rows, weights=vals, minlength=n) * np.log(s) + alpha_log_alpha[codes])
        self.order = np.lexsort((codes, fixed))  # free cells (-1) first, then state 0, 1, ...
        self.batch = codes[self.order]
        #: the counts in the sorted order, sparse: the pinned cells' sums read only their non-zeros
        self.y_sorted = csr[self.order] if csr is not None else sp.csr_matrix(y[self.order])
        #: per pinned block of rows, its :class:`~scotgm_pp.inference._pinned_sums.SparseRows` (built on first use)
        self.sparse_blocks = {}
        self.ya = self.y_sorted.toarray() if csr is not None else y[self.order]
        self.ya += self.alpha[self.batch] if self.per_batch_dispersion else self.alpha[0]
        self.log_s = np.log(s)[self.order]
        self._set_blocks(fixed[self.order], self.n_states)

    def _segments(self, start: int, stop: int) -> list[tuple[int, slice]]:
        b = self.batch[start:stop]
        out = []
        for code in range(self.n_batches):
            idx = np.flatnonzero(b == code)
            if idx.size:
                out.append((code, slice(start + int(idx[0]), start + int(idx[-1]) + 1)))
        return out

    def _set_blocks(self, fixed_sorted: np.ndarray, n_states: int) -> None:
        """Blocks of sorted rows: ``free`` (start, stop, segments) and ``pinned[k]`` (segments)."""
        self.n_states = int(n_states)
        n_free = int(np.sum(fixed_sorted < 0))
        self.free = (0, n_free, self._segments(0, n_free))
        self.pinned = []
        for k in range(self.n_states):
            idx = np.flatnonzero(fixed_sorted == k)
            segs = self._segments(int(idx[0]), int(idx[-1]) + 1) if idx.size else []
            self.pinned.append(segs)
        # Pinned rows' counts per batch (weight 1): fixed for the whole fit.
        self.pinned_ysum = np.zeros((self.n_states, self.n_batches, self.n_genes))
        for k, segs in enumerate(self.pinned):
            for b, sl in segs:
                self.pinned_ysum[k, b] += self.ya[sl].sum(axis=0) - (sl.stop - sl.start) * self.alpha[b]

    def all_basal(self) -> CountData:
        """The same counts with every cell pinned to state 0 (the one-state model), sharing memory."""
        out = object.__new__(CountData)
        out.__dict__.update(self.__dict__)
        out.fixed = np.zeros(self.n_cells, int)
        segs = self.free[2] + [seg for block in self.pinned for seg in block]
        out.free = (0, 0, [])
        out.n_states = 1
        out.pinned = [segs]
        out.pinned_ysum = np.zeros((1, self.n_batches, self.n_genes))
        for b, sl in segs:
            out.pinned_ysum[0, b] += self.ya[sl].sum(axis=0) - (sl.stop - sl.start) * self.alpha[b]
        return out

    @property
    def free_rows(self) -> np.ndarray:
        """Original indices of the free cells, in the order of the free block."""
        return self.order[self.free[0]:self.free[1]]

    def initial_params(self, prior: CountPrior, R: np.ndarray | None = None) -> CountParams:
        """A start for Newton: the prior means, or with responsibilities ``R`` the Poisson rates
        of the states (pooled over batches, half a count added; the ratios shrunk by the prior)."""
        G, K = self.n_genes, self.n_states
        params = CountParams(beta=np.array(prior.beta_mean, float), delta=np.zeros((K, G)),
                             gamma=np.zeros((self.n_batches, G)))
        if R is None:
            return params
        s = np.exp(self.log_s)
        y_k = self.pinned_ysum.sum(axis=1)  # (K, G)
        s_k = np.array([sum(s[sl].sum() for _, sl in segs) for segs in self.pinned])
        f0, f1, fsegs = self.free
        if f1 > f0:
            w = R[self.order[f0:f1]]  # (n_free, K)
            y_k = y_k + w.T @ (self.ya[f0:f1] - self.alpha[self.batch[f0:f1]])
            s_k = s_k + w.T @ s[f0:f1]
        log_rate = np.log((y_k + 0.5) / np.maximum(s_k, 1e-300)[:, None])
        params.beta = log_rate[0]
        # Poisson log rate ratios, shrunk towards 0 as the prior would shrink them (information
        # of a log ratio of two Poisson totals: 1 / (1 / y_k + 1 / y_0)).
        info = 1.0 / (1.0 / (y_k[1:] + 0.5) + 1.0 / (y_k[0] + 0.5))
        params.delta[1:] = (log_rate[1:] - log_rate[0]) * info / (info + 1.0 / prior.delta_sd**2)
        return params

    @property
    def n_theta(self) -> int:
        return self.n_states + self.n_batches - 1

    def design(self) -> np.ndarray:
        """``(K * B, p)`` 0/1 matrix: which entries of ``theta`` add up to ``lambda_kb``."""
        K, B = self.n_states, self.n_batches
        D = np.zeros((K * B, self.n_theta))
        for k in range(K):
            for b in range(B):
                row = k * B + b
                D[row, 0] = 1.0
                if k:
                    D[row, k] = 1.0
                if b:
                    D[row, K - 1 + b] = 1.0
        return D

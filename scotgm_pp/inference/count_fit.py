"""Fitting the count layer: its log-likelihood terms, the Newton fits and the effects' standard errors.

Given state probabilities ``R`` the screen's default (:func:`fit_marginal`) maximises, for every
gene separately, the marginal NB log-likelihood ``sum_i log sum_k r_ik NB(y_ig | k)`` plus the log
prior, by Newton with Louis' information. The M-step (:func:`fit_given_states`, the
``count_likelihood="weighted"`` fit and the joint EM's step) maximises the ``R``-weighted NB
log-likelihood ``sum_i sum_k r_ik log NB(y_ig | k)`` plus the log prior over
``theta_g = (beta_g, delta_1g.., gamma_1g..)`` (:mod:`scotgm_pp.inference.count_layer`). Both are
Newton iterations vectorised over
genes (one small ``p x p`` system per gene, ``p = K + B - 1``) with step-halving per gene, so
the objective never decreases.

Everything reduces to sums over groups of cells with the same linear predictor
``lambda_kb = beta + delta_k + gamma_b``. With ``t = mu + alpha`` (``alpha = 1 / phi``) the
derivatives of ``log NB`` in ``lambda`` are ``alpha (y - mu) / t`` and
``-alpha mu (y + alpha) / t^2``, and ``log NB = C + y log mu + alpha log alpha - (y + alpha) log t``
with ``C`` free of parameters. Cells pinned to a state (controls) enter with weight 1 and are
summed at once: where their counts are sparse (at most a quarter non-zero) from the non-zero
counts and series in the library size (:mod:`scotgm_pp.inference._pinned_sums`, to rounding of
the per-entry sums), otherwise entry by entry in cache-sized chunks; only the free cells' terms
are kept, to be reweighted when the responsibilities change.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from . import _pinned_sums
from .count_layer import CountData, CountParams, CountPrior, log_prior_per_gene, prior_scales

__all__ = [
    "CORRECTIONS",
    "CUT_CORRECTION",
    "CountPass",
    "GroupSums",
    "evaluate",
    "group_sums",
    "newton_step",
    "fit_given_states",
    "entry_posteriors",
    "fit_marginal",
    "fit_cut",
    "cut_correction",
    "effect_standard_errors",
    "sandwich_meat",
    "unshrunk_effects",
]

_CHUNK_ENTRIES = 1 << 15
"""Pinned rows are processed in chunks of about this many entries (a few hundred kB per array)."""


@dataclass
class CountPass:
    """Terms of the count log-likelihood at one parameter value.

    ``dv``, ``h`` and ``e`` are the per-entry terms of :func:`_segment_terms`. ``pinned_*`` are
    already summed over the pinned rows of each (state, batch): ``(K, B, G)``;
    ``free_*`` keep one row per free cell and state: ``(K, n_free, G)``. ``row_loglik`` is
    ``sum_g log NB(y_ig | state k)`` ``(n, K)`` in the cells' original order, NaN where a pinned
    cell is not in state ``k``.
    """

    params: CountParams
    pinned_dv: np.ndarray
    pinned_h: np.ndarray
    pinned_e: np.ndarray
    free_dv: np.ndarray
    free_h: np.ndarray
    free_e: np.ndarray
    row_loglik: np.ndarray


def _segment_terms(data: CountData, sl: slice, b: int, lam_b: np.ndarray, cols: np.ndarray | None = None):
    """Per-entry terms of the rows ``sl`` (all of batch ``b``) under log rates ``lam_b``, with
    ``mu = s exp(lam_b)`` and ``t = mu + alpha``: ``dv = (y - mu) / t`` (so ``alpha dv`` is the
    derivative of ``log NB`` in ``lambda``), ``h = mu (y + alpha) / t^2`` (``alpha h`` its negative
    second derivative), ``e = (y + alpha) log t``; and the rows' ``sum_g y lam_b``. ``dv`` is
    formed per entry so that no sum of terms near 1 is differenced (``alpha`` reaches 1 / PHI_MIN).
    With ``cols``, only those genes (``lam_b`` then holds their log rates only)."""
    ya = data.ya[sl] if cols is None else data.ya[sl][:, cols]
    alpha = data.alpha[b] if cols is None else data.alpha[b, cols]
    t = np.multiply.outer(np.exp(data.log_s[sl]), np.exp(lam_b))
    t += alpha
    e = np.log(t)
    e *= ya
    np.reciprocal(t, out=t)  # 1 / t
    v = ya * t  # (y + alpha) / t
    t *= v  # (y + alpha) / t^2
    t *= -alpha
    t += v  # h = v (1 - alpha / t) = mu (y + alpha) / t^2
    v -= 1.0  # dv
    return v, t, e, ya @ lam_b - alpha @ lam_b


def _sparse_block(data: CountData, sl: slice, b: int):
    """The pinned rows ``sl`` (all of batch ``b``) prepared for the series sums
    (:mod:`scotgm_pp.inference._pinned_sums`), or ``None`` where their counts are too dense for
    it to pay (more than :data:`~scotgm_pp.inference._pinned_sums.SPARSE_MAX_DENSITY` non-zero)."""
    key = (sl.start, sl.stop)
    blocks = data.sparse_blocks
    if key not in blocks:
        y = data.y_sorted[sl]
        dense = y.nnz > _pinned_sums.SPARSE_MAX_DENSITY * y.shape[0] * max(y.shape[1], 1)
        blocks[key] = None if dense else _pinned_sums.sparse_rows(y, np.exp(data.log_s[sl]), data.alpha[b])
    return blocks[key]


def _pinned_terms(data: CountData, seg: slice, b: int, lam_b: np.ndarray, cols: np.ndarray | None = None,
                  want_rows: bool = True):
    """Sums over the pinned rows ``seg`` (all of batch ``b``) under log rates ``lam_b`` (of the
    genes ``cols``, all when ``None``): per gene ``sum dv``, ``sum h``, ``sum e`` and, with
    ``want_rows``, per row ``sum_g e`` and ``sum_g y lambda``. Sparse counts by the series of
    :mod:`~scotgm_pp.inference._pinned_sums` (work in their non-zeros), dense ones entry by
    entry in cache-sized chunks."""
    sparse = _sparse_block(data, seg, b)
    if sparse is not None:
        return _pinned_sums.series_sums(sparse, lam_b, cols, want_rows=want_rows)
    G = lam_b.size
    chunk = max(1, _CHUNK_ENTRIES // max(G, 1))
    dv_sum, h_sum, e_sum = np.zeros(G), np.zeros(G), np.zeros(G)
    n = seg.stop - seg.start
    e_row, ylam = (np.empty(n), np.empty(n)) if want_rows else (None, None)
    for start in range(seg.start, seg.stop, chunk):
        sl = slice(start, min(start + chunk, seg.stop))
        dv, h, e, yl = _segment_terms(data, sl, b, lam_b, cols)
        dv_sum += dv.sum(axis=0)
        h_sum += h.sum(axis=0)
        e_sum += e.sum(axis=0)
        if want_rows:
            loc = slice(sl.start - seg.start, sl.stop - seg.start)
            e_row[loc] = e.sum(axis=1)
            ylam[loc] = yl
    return dv_sum, h_sum, e_sum, e_row, ylam


def evaluate(data: CountData, params: CountParams, genes: np.ndarray | None = None,
             previous: CountPass | None = None) -> CountPass:
    """All terms of the count log-likelihood at ``params`` (one pass over the counts).

    With ``genes`` (indices) and ``previous`` (a pass at parameters that differ from ``params``
    only in those genes), only those genes' columns are computed and the others copied from
    ``previous``; ``row_loglik`` (a sum over all genes) is then left NaN, to be had from a full
    pass.
    """
    if genes is not None:
        return _evaluate_genes(data, params, np.asarray(genes), previous)
    K, B, G = data.n_states, data.n_batches, data.n_genes
    lam = params.log_rates()
    f0, f1, fsegs = data.free
    pdv, ph, pe = (np.zeros((K, B, G)) for _ in range(3))
    fdv, fh, fe = (np.empty((K, f1 - f0, G)) for _ in range(3))
    rows = np.full((data.n_cells, K), np.nan)
    base = data.row_const
    for k in range(K):
        for b, seg in data.pinned[k]:
            # Pinned rows are summed at once (:func:`_pinned_terms`).
            dv, h, e, e_row, ylam = _pinned_terms(data, seg, b, lam[k, b])
            pdv[k, b] += dv
            ph[k, b] += h
            pe[k, b] += e
            idx = data.order[seg]
            rows[idx, k] = base[idx] + ylam - e_row
        for b, sl in fsegs:
            dv, h, e, ylam = _segment_terms(data, sl, b, lam[k, b])
            loc = slice(sl.start - f0, sl.stop - f0)
            fdv[k, loc], fh[k, loc], fe[k, loc] = dv, h, e
            idx = data.order[sl]
            rows[idx, k] = base[idx] + ylam - e.sum(axis=1)
    return CountPass(params, pdv, ph, pe, fdv, fh, fe, rows)


def _evaluate_genes(data: CountData, params: CountParams, genes: np.ndarray, previous: CountPass) -> CountPass:
    K, B = data.n_states, data.n_batches
    lam = params.log_rates()[:, :, genes]
    f0, f1, fsegs = data.free
    pdv, ph, pe = previous.pinned_dv.copy(), previous.pinned_h.copy(), previous.pinned_e.copy()
    fdv, fh, fe = previous.free_dv.copy(), previous.free_h.copy(), previous.free_e.copy()
    pdv[:, :, genes] = 0.0
    ph[:, :, genes] = 0.0
    pe[:, :, genes] = 0.0
    for k in range(K):
        for b, seg in data.pinned[k]:
            dv, h, e, _, _ = _pinned_terms(data, seg, b, lam[k, b], genes, want_rows=False)
            pdv[k, b, genes] += dv
            ph[k, b, genes] += h
            pe[k, b, genes] += e
        for b, sl in fsegs:
            dv, h, e, _ = _segment_terms(data, sl, b, lam[k, b], genes)
            loc = np.arange(sl.start - f0, sl.stop - f0)[:, None]
            fdv[k, loc, genes], fh[k, loc, genes], fe[k, loc, genes] = dv, h, e
    rows = np.full_like(previous.row_loglik, np.nan)
    return CountPass(params, pdv, ph, pe, fdv, fh, fe, rows)


@dataclass
class GroupSums:
    """R-weighted sums over the cells of each (state, batch) group, ``(K, B, G)`` (``n``: ``(K, B)``)."""

    n: np.ndarray
    y: np.ndarray
    dv: np.ndarray
    h: np.ndarray
    e: np.ndarray


def entry_posteriors(data: CountData, cp: CountPass, R: np.ndarray, genes: np.ndarray | None = None) -> np.ndarray:
    """``(K, n_free, G)``: for each free cell and gene, the posterior of each state given that
    gene's count alone and the fixed state probabilities ``R``: ``q_kig ~ r_ik NB(y_ig | k)``
    (the E-step of the per-gene marginal likelihood ``sum_i log sum_k r_ik NB(y_ig | k)``).
    With ``genes``, only those columns (``(K, n_free, len(genes))``)."""
    if genes is None:
        return _free_posteriors(data, cp, R)[0]
    cols = np.asarray(genes)
    return _free_posteriors(_column_view(data, cols), _column_pass(cp, cols), R)[0]


def group_sums(data: CountData, cp: CountPass, R: np.ndarray, Q: np.ndarray | None = None) -> GroupSums:
    """Sum the pass's terms over the cells of each (state, batch) with the weights ``R`` (``(n, K)``,
    original cell order), or for the free cells the per-gene weights ``Q`` (``(K, n_free, G)``,
    :func:`entry_posteriors`) when given."""
    K, B = data.n_states, data.n_batches
    n = np.zeros((K, B))
    ysum = data.pinned_ysum.copy()
    dv, h, e = cp.pinned_dv.copy(), cp.pinned_h.copy(), cp.pinned_e.copy()
    f0, f1, fsegs = data.free
    for k in range(K):
        for b, sl in data.pinned[k]:
            n[k, b] += sl.stop - sl.start
        for b, sl in fsegs:
            w = R[data.order[sl], k]
            loc = slice(sl.start - f0, sl.stop - f0)
            n[k, b] += w.sum()
            if Q is not None:
                q = Q[k, loc]
                ysum[k, b] += np.einsum("ig,ig->g", q, data.ya[sl]) - q.sum(axis=0) * data.alpha[b]
                dv[k, b] += np.einsum("ig,ig->g", q, cp.free_dv[k, loc])
                h[k, b] += np.einsum("ig,ig->g", q, cp.free_h[k, loc])
                e[k, b] += np.einsum("ig,ig->g", q, cp.free_e[k, loc])
                continue
            ysum[k, b] += w @ data.ya[sl] - w.sum() * data.alpha[b]
            dv[k, b] += w @ cp.free_dv[k, loc]
            h[k, b] += w @ cp.free_h[k, loc]
            e[k, b] += w @ cp.free_e[k, loc]
    return GroupSums(n=n, y=ysum, dv=dv, h=h, e=e)


def _objective(data: CountData, params: CountParams, sums: GroupSums, prior: CountPrior) -> np.ndarray:
    """Per-gene complete-data objective (up to parameter-free terms): ``sum_kb [lambda y - E] + log prior``."""
    lam = params.log_rates()
    return (lam * sums.y - sums.e).sum(axis=(0, 1)) + log_prior_per_gene(params.theta(), prior, data.n_states)


def _gradient_information(data: CountData, params: CountParams, sums: GroupSums, prior: CountPrior):
    """Gradient ``(G, p)`` and negative Hessian ``(G, p, p)`` of the per-gene objective."""
    K, B, G = data.n_states, data.n_batches, data.n_genes
    a = data.alpha  # (B, G)
    grad_lam = (a * sums.dv).reshape(K * B, G)
    info_lam = (a * sums.h).reshape(K * B, G)
    D = data.design()
    theta = params.theta()
    sd = prior_scales(prior, K, theta.shape[1])
    centre = np.zeros_like(theta)
    centre[:, 0] = prior.beta_mean
    grad = grad_lam.T @ D - (theta - centre) / sd**2
    info = np.einsum("mg,mp,mq->gpq", info_lam, D, D)
    info[:, np.arange(len(sd)), np.arange(len(sd))] += 1.0 / sd**2
    return grad, info


def newton_step(data: CountData, cp: CountPass, R: np.ndarray, prior: CountPrior, *, max_halvings: int = 30,
                active: np.ndarray | None = None):
    """One Newton step per gene on the ``R``-weighted objective, halved per gene until it does not decrease.

    With ``active`` (a boolean mask over genes) the other genes keep their parameters and their
    terms are not recomputed (the returned pass then has no ``row_loglik``, see :func:`evaluate`).
    Returns the new :class:`CountPass` (at the accepted parameters), the per-gene gain of the
    objective and the absolute size of each gene's step taken (0 for inactive genes).
    """
    sums = group_sums(data, cp, R)
    grad, info = _gradient_information(data, cp.params, sums, prior)
    step = np.linalg.solve(info, grad[:, :, None])[:, :, 0]
    genes = None
    if active is not None:
        step[~active] = 0.0
        genes = np.flatnonzero(active)
    theta0 = cp.params.theta()
    before = _objective(data, cp.params, sums, prior)
    scale = np.ones(data.n_genes)
    K, B = data.n_states, data.n_batches
    size = np.max(np.abs(step), axis=1, initial=0.0)
    for _ in range(max_halvings + 1):
        trial = CountParams.from_theta(theta0 + scale[:, None] * step, K, B)
        new = evaluate(data, trial, genes, cp)
        after = _objective(data, trial, group_sums(data, new, R), prior)
        # a step of rounding size (at the optimum) is accepted as it is: halving it only
        # re-evaluates every gene for a change below the objective's own rounding
        worse = ~(after >= before - 1e-12 * np.abs(before)) & (scale * size > 1e-9)
        if not worse.any():
            break
        scale[worse] *= 0.5
    else:  # pragma: no cover - a concave objective always accepts a small enough step
        scale[worse] = 0.0
        new = evaluate(data, CountParams.from_theta(theta0 + scale[:, None] * step, K, B), genes, cp)
        after = before
    return new, after - before, np.max(np.abs(scale[:, None] * step), axis=1, initial=0.0)


def fit_given_states(
    data: CountData,
    R: np.ndarray,
    prior: CountPrior,
    *,
    init: CountParams | None = None,
    max_iter: int = 100,
    tol: float = 1e-6,
) -> tuple[CountPass, int, bool]:
    """The count parameters maximising the expected complete-data log posterior given responsibilities ``R``.

    That is ``sum_i sum_k r_ik log NB(y_i | k) + log prior`` (EM's M-step with ``R`` fixed, by
    Newton to convergence); at a fixed point of the joint EM it is the joint MAP.

    A gene stops once its Newton step is below ``tol`` (natural-log units); Newton's quadratic
    convergence then leaves an error of about ``tol^2`` (rounding leaves steps of about 1e-10 at
    the optimum). Later steps recompute only the genes still moving (most genes converge in two
    or three steps, a few take more), and a last full pass gives the terms of every gene at the
    optimum. Returns the :class:`CountPass` at the optimum, the iterations run and whether every
    gene converged.
    """
    cp = evaluate(data, init if init is not None else data.initial_params(prior, R))
    active = np.ones(data.n_genes, bool)
    partial = False
    for it in range(1, max_iter + 1):
        cp, _, size = newton_step(data, cp, R, prior, active=active if partial else None)
        active &= size >= tol
        if not active.any():
            return (evaluate(data, cp.params) if partial else cp), it, True
        partial = active.mean() < 0.5  # a full pass is cheaper than gathering most of the columns
    return evaluate(data, cp.params), max_iter, False


def _column_view(data: CountData, genes: np.ndarray) -> CountData:
    """The counts of the genes ``genes`` only (gathered once), for iterating on a few genes;
    its ``row_const`` (a sum over all genes) is not valid, so neither is a pass's ``row_loglik``."""
    out = object.__new__(CountData)
    out.__dict__.update(data.__dict__)
    out.n_genes = int(genes.size)
    out.ya = data.ya[:, genes]
    out.alpha = data.alpha[:, genes]
    out.phi = data.phi[..., genes]
    out.pinned_ysum = data.pinned_ysum[:, :, genes]
    out.y_sorted = data.y_sorted[:, genes]
    out.sparse_blocks = {}
    return out


def _column_pass(cp: CountPass, cols: np.ndarray) -> CountPass:
    p = cp.params
    params = CountParams(beta=p.beta[cols], delta=p.delta[:, cols], gamma=p.gamma[:, cols])
    return CountPass(params, cp.pinned_dv[:, :, cols], cp.pinned_h[:, :, cols], cp.pinned_e[:, :, cols],
                     cp.free_dv[:, :, cols], cp.free_h[:, :, cols], cp.free_e[:, :, cols],
                     np.full_like(cp.row_loglik, np.nan))


def _set_columns(params: CountParams, cols: np.ndarray, values: CountParams) -> None:
    """Write ``values`` (parameters of the genes ``cols`` only) into ``params``, in place."""
    params.beta[cols] = values.beta
    params.delta[:, cols] = values.delta
    params.gamma[:, cols] = values.gamma


def _column_prior(prior: CountPrior, genes: np.ndarray, n_genes: int) -> CountPrior:
    return replace(prior, beta_mean=np.broadcast_to(np.asarray(prior.beta_mean, float), (n_genes,))[genes])


def _free_posteriors(data: CountData, cp: CountPass, R: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``Q`` of :func:`entry_posteriors` (all genes) and, per gene, the free cells' marginal
    log-likelihood ``sum_i log sum_k r_ik exp(y_ig lambda_kbg - e_ikg)`` (parameter-free terms dropped)."""
    K, G = data.n_states, data.n_genes
    f0, f1, fsegs = data.free
    lam = cp.params.log_rates()
    logq = np.empty((K, f1 - f0, G))
    for b, sl in fsegs:
        loc = slice(sl.start - f0, sl.stop - f0)
        with np.errstate(divide="ignore"):
            logr = np.log(R[data.order[sl]])
        y = data.ya[sl] - data.alpha[b]
        for k in range(K):
            np.multiply(y, lam[k, b], out=logq[k, loc])
            logq[k, loc] -= cp.free_e[k, loc]
            logq[k, loc] += logr[:, k, None]
    top = logq.max(axis=0)
    logq -= top
    np.exp(logq, out=logq)
    norm = logq.sum(axis=0)
    logq /= norm
    return logq, (np.log(norm) + top).sum(axis=0)


def _score_variance(data: CountData, cp: CountPass, R: np.ndarray, Q: np.ndarray | None = None) -> np.ndarray:
    """``(G, p, p)``: ``V = sum_i Cov_{z_i}(score_ig)``, the variance of the free cells' complete-data
    scores over their uncertain states (``z_i ~ R_i``, or per gene ``Q_ig`` when given)."""
    K, B, G = data.n_states, data.n_batches, data.n_genes
    f0, f1, fsegs = data.free
    D = data.design().reshape(K, B, -1)
    u = data.alpha[data.batch[f0:f1]] * cp.free_dv  # (K, n_free, G): d log NB / d lambda
    var = np.zeros((G, data.n_theta, data.n_theta))
    for b, sl in fsegs:
        r = R[data.order[sl]]  # (m, K)
        loc = slice(sl.start - f0, sl.stop - f0)
        ru = (r.T[:, :, None] if Q is None else Q[:, loc]) * u[:, loc]  # r_ik u_ikg
        for k in range(K):
            for j in range(K):
                # E[s s^T] - E[s] E[s]^T with s = sum_k z_k u_k a_kb
                coef = -np.einsum("ig,ig->g", ru[k], ru[j])
                if k == j:
                    coef += np.einsum("ig,ig->g", ru[k], u[k, loc])
                var += coef[:, None, None] * np.outer(D[k, b], D[j, b])[None]
    return var


def _marginal_objective(data: CountData, params: CountParams, cp: CountPass, free_ll: np.ndarray,
                        prior: CountPrior) -> np.ndarray:
    """Per-gene marginal log posterior (up to parameter-free terms): the pinned cells'
    ``sum_kb [lambda y - E]``, the free cells' ``free_ll`` (:func:`_free_posteriors`) and the log prior."""
    lam = params.log_rates()
    pinned = (lam * data.pinned_ysum - cp.pinned_e).sum(axis=(0, 1))
    return pinned + free_ll + log_prior_per_gene(params.theta(), prior, data.n_states)


def _marginal_newton_step(data, cp, R, prior, Q, free_ll, active, max_halvings: int = 30):
    """One Newton step per gene on the marginal log posterior, with its observed information
    ``I_c(Q) - V(Q)`` (Louis); where that is not positive definite (away from a maximum) the
    complete-data information ``I_c(Q)`` (an EM step, an ascent direction). Halved per gene until
    the marginal log posterior does not decrease. Genes outside ``active`` keep their parameters."""
    sums = group_sums(data, cp, R, Q)
    grad, info = _gradient_information(data, cp.params, sums, prior)
    observed = info - _score_variance(data, cp, R, Q)
    ok = np.all(np.linalg.eigvalsh(observed) > 0, axis=1)
    step = np.linalg.solve(np.where(ok[:, None, None], observed, info), grad[:, :, None])[:, :, 0]
    step[~active] = 0.0
    theta0 = cp.params.theta()
    before = _marginal_objective(data, cp.params, cp, free_ll, prior)
    scale = np.ones(data.n_genes)
    K, B = data.n_states, data.n_batches
    size = np.max(np.abs(step), axis=1, initial=0.0)
    for _ in range(max_halvings + 1):
        trial = CountParams.from_theta(theta0 + scale[:, None] * step, K, B)
        new = evaluate(data, trial)
        Qn, lln = _free_posteriors(data, new, R)
        after = _marginal_objective(data, trial, new, lln, prior)
        worse = ~(after >= before - 1e-12 * np.abs(before)) & (scale * size > 1e-9)
        if not worse.any():
            break
        scale[worse] *= 0.5
    else:  # pragma: no cover - a small enough step of an ascent direction is accepted
        scale[worse] = 0.0
        new = evaluate(data, CountParams.from_theta(theta0 + scale[:, None] * step, K, B))
        Qn, lln = _free_posteriors(data, new, R)
    return new, Qn, lln, np.max(np.abs(scale[:, None] * step), axis=1, initial=0.0)


def fit_marginal(data: CountData, R: np.ndarray, prior: CountPrior, *, init: CountParams | None = None,
                 max_iter: int = 100, tol: float = 1e-6) -> tuple[CountPass, np.ndarray, int, bool]:
    """The count parameters maximising each gene's marginal log posterior given the fixed state
    probabilities ``R``: ``sum_i log sum_k r_ik NB(y_ig | k) + log prior`` (per gene, the cells'
    states integrated out gene by gene).

    By Newton per gene on that objective (gradient: the complete-data score weighted by the
    per-gene posteriors ``Q`` of :func:`entry_posteriors`; information: Louis' ``I_c - V``, or
    ``I_c`` where that is not positive definite), with step-halving so the objective never
    decreases. A gene stops once its step is below ``tol``; once fewer than half of the genes
    move, the others' columns are dropped from the passes (gathered once per halving of the set),
    and a last full pass gives every gene's terms at the optimum. Without free cells it is
    :func:`fit_given_states`. Returns the pass at the optimum, the per-gene posteriors ``Q``
    there (``(K, n_free, G)``), the iterations and whether every gene converged."""
    cp, Q, it, moving = _fit_marginal(data, R, prior, init=init, max_iter=max_iter, tol=tol)
    return cp, Q, it, not moving.any()


def _fit_marginal(data, R, prior, *, init=None, max_iter=100, tol=1e-6):
    """:func:`fit_marginal`, returning per gene whether it was still moving (not converged)."""
    f0, f1, _ = data.free
    if f1 == f0:
        cp, it, ok = fit_given_states(data, R, prior, init=init, tol=tol, max_iter=max_iter)
        return cp, np.zeros((data.n_states, 0, data.n_genes)), it, np.full(data.n_genes, not ok)
    G, K, B = data.n_genes, data.n_states, data.n_batches
    cp = evaluate(data, init if init is not None else data.initial_params(prior, R))
    genes = np.arange(G)  # the working columns
    wdata, wprior, wcp = data, prior, cp
    Q, free_ll = _free_posteriors(wdata, wcp, R)
    full = None  # (pass over all genes, its Q, the first working columns, their parameters then)
    active = np.ones(G, bool)  # over the working columns
    converged = False
    for it in range(1, max_iter + 1):
        wcp, Q, free_ll, size = _marginal_newton_step(wdata, wcp, R, wprior, Q, free_ll, active)
        active &= size >= tol
        if not active.any():
            converged = True
            break
        if active.mean() < 0.5:  # iterate on the moving genes' columns only
            keep = np.flatnonzero(active)
            if full is None:
                full = (wcp, Q, genes[keep], _column_pass(wcp, keep).params)
            else:
                _set_columns(full[0].params, genes, wcp.params)  # the columns that stop here
            genes = genes[keep]
            wdata, wprior = _column_view(data, genes), _column_prior(prior, genes, G)
            wcp = _column_pass(wcp, keep)
            Q, free_ll, active = Q[:, :, keep], free_ll[keep], active[keep]
    moving = np.zeros(G, bool)
    moving[genes[active]] = not converged
    if full is None:
        return wcp, Q, it, moving
    # the full pass, with the columns that moved after it recomputed at their final values: its
    # terms and posteriors replaced, its per-cell sums over the genes corrected by the difference
    cp, Q, first, then = full
    _set_columns(cp.params, genes, wcp.params)
    view = _column_view(data, first)
    final = CountParams(cp.params.beta[first], cp.params.delta[:, first], cp.params.gamma[:, first])
    new = evaluate(view, final)
    cp.row_loglik += new.row_loglik - evaluate(view, then).row_loglik
    for name in ("pinned_dv", "pinned_h", "pinned_e", "free_dv", "free_h", "free_e"):
        getattr(cp, name)[:, :, first] = getattr(new, name)
    Q[:, :, first] = _free_posteriors(view, new, R)[0]
    return cp, Q, it, moving


def fit_cut(data: CountData, R: np.ndarray, prior: CountPrior, count_likelihood: str = "marginal", *,
            tol: float = 1e-6) -> tuple[CountPass, np.ndarray | None, int, bool, str]:
    """The count layer given the state probabilities ``R`` (the cut), with either likelihood:
    ``"marginal"`` (:func:`fit_marginal`) or ``"weighted"`` (:func:`fit_given_states`). Returns
    the pass, the per-gene posteriors ``Q`` (``None`` for the weighted fit), the iterations,
    whether every gene converged and the :func:`effect_standard_errors` correction that belongs to
    the likelihood (:func:`cut_correction`)."""
    if count_likelihood == "marginal":
        cp, Q, it, ok = fit_marginal(data, R, prior, tol=tol)
    else:
        (cp, it, ok), Q = fit_given_states(data, R, prior, tol=tol), None
    return cp, Q, it, ok, cut_correction(count_likelihood)


def cut_correction(count_likelihood: str) -> str:
    """The :func:`effect_standard_errors` correction of the cut's fit: ``"louis"`` (the observed
    information) for the marginal likelihood, :data:`CUT_CORRECTION` for the weighted one."""
    return "louis" if count_likelihood == "marginal" else CUT_CORRECTION


CORRECTIONS = ("imputation", "louis", "none", "sandwich", "robust")

CUT_CORRECTION = "imputation"
"""The correction of the weighted cut's effect standard errors (``count_likelihood="weighted"``:
the screen's ``effect_se`` and a count graph's EM with ``count_evidence="cut"``); the default
marginal cut uses ``"louis"`` (see :func:`effect_standard_errors`). The screen reports the
``"robust"`` one beside it (``effect_se_robust``)."""


def effect_standard_errors(
    data: CountData, cp: CountPass, R: np.ndarray, prior: CountPrior, correction: str = "imputation",
    Q: np.ndarray | None = None,
) -> np.ndarray:
    """Standard errors of the state effects ``delta_kg`` (``(K, G)``, row 0 NaN).

    Per gene, with the other genes' and the Gaussian parameters held at their values, let
    ``I_c`` be the complete-data information of ``theta_g`` (``R``-weighted, prior included) and
    ``V = sum_i Cov_{z_i ~ R_i}(score_ig)`` the variance of the complete-data score over the
    free cells' uncertain states (pinned cells add nothing). ``correction``:

    * ``"imputation"``: ``Cov = I_c^-1 + I_c^-1 V I_c^-1``, the within- plus between-imputation
      variance (Rubin's rules, linearised) when the states are imputed from ``R`` and not
      informed by the counts (the cut, ``evidence="gaussian"``);
    * ``"louis"``: ``Cov = (I_c - V)^-1``, the observed information by Louis' identity, right when
      ``R`` is the posterior given the counts too (``evidence="joint"``); where ``I_c - V`` is not
      positive definite (rounding at a maximum) the imputation form is used;
    * ``"none"``: ``Cov = I_c^-1``, states taken as known;
    * ``"sandwich"``: ``Cov = I_c^-1 (M + V) I_c^-1`` with ``M = sum_i s_i s_i^T`` the empirical
      variance of the cells' complete-data scores (``s_i = sum_k r_ik u_ik``, pinned cells
      included), the robust (Huber-White) form of the imputation variance: it holds when the
      negative-binomial variance is wrong (e.g. the plug-in dispersion too small), where the
      model-based forms do not. Each cell's score is taken at the fitted parameters, so genes
      with a handful of counts get a noisy ``M`` (see :func:`sandwich_meat`), and with states
      known it runs about 6% small in simulations (the scores at the fit vary less than at the
      truth);
    * ``"robust"``: per parameter the larger of the ``"imputation"`` and ``"sandwich"`` variances:
      never below the model's, and wider where the cells' scores vary more than the model says.

    With ``Q`` (``(K, n_free, G)``, the per-gene state posteriors of the marginal fit,
    :func:`fit_marginal`) the free cells' weights are ``q_ikg`` for ``r_ik`` in ``I_c`` and ``V``:
    ``"louis"`` is then the observed information of the marginal likelihood (its right form);
    ``"sandwich"`` is ``H^-1 M H^-1`` with ``H = I_c - V`` and ``M`` the empirical variance of
    the cells' marginal scores ``sum_k q_ik s_ik``; ``"robust"`` the larger of ``"louis"`` and that.
    """
    if correction not in CORRECTIONS:
        raise ValueError(f"correction must be one of {CORRECTIONS}, got {correction!r}.")
    K, B, G = data.n_states, data.n_batches, data.n_genes
    sums = group_sums(data, cp, R, Q)
    _, info = _gradient_information(data, cp.params, sums, prior)
    cov_c = np.linalg.inv(info)
    cov = cov_c
    f0, f1, fsegs = data.free
    if correction in ("sandwich", "robust"):
        meat = sandwich_meat(data, cp, R, Q)
        bread = cov_c
        if Q is not None and f1 > f0:
            # the marginal likelihood's own sandwich: its cells' scores sbar_i = sum_k q_ik s_ik
            # (meat minus the imputation variance) inside its observed information I_c - V
            var = _score_variance(data, cp, R, Q)
            meat = meat - var
            bread = _louis_inverse(info, var, cov_c)
        sandwich = bread @ meat @ bread
        if correction == "sandwich":
            cov = sandwich
        else:
            model = effect_standard_errors(data, cp, R, prior, correction="imputation" if Q is None else "louis", Q=Q)
            return np.fmax(model, _diagonal_se(sandwich, K))
    elif f1 > f0 and correction != "none":
        var = _score_variance(data, cp, R, Q)
        imputed = cov_c + cov_c @ var @ cov_c
        if correction == "louis":
            cov = _louis_inverse(info, var, imputed)
        else:
            cov = imputed
    return _diagonal_se(cov, K)


def _louis_inverse(info: np.ndarray, var: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """``(I_c - V)^-1`` per gene, ``fallback`` where ``I_c - V`` is not positive definite."""
    corrected = info - var
    ok = np.all(np.linalg.eigvalsh(corrected) > 0, axis=1)
    return np.where(ok[:, None, None], np.linalg.inv(np.where(ok[:, None, None], corrected, info)), fallback)


FLAT_DELTA_SD = 1e6
"""Prior SD of ``delta`` in :func:`unshrunk_effects`: a precision of 1e-12, below any count's
information (it only keeps the information matrix of a state without cells invertible)."""

UNSHRUNK_ONE_STEP = 0.1
"""Genes whose first Newton step in :func:`unshrunk_effects` is at most this long keep it (the
error of one step grows about as its square: below 0.01 here); longer ones are iterated."""

UNSHRUNK_MAX_ABS = 10.0
"""An unshrunk effect beyond this (a fold change of e^10) is the likelihood rising to an infinite
fold change (e.g. no count of the gene in the state): reported NaN."""


def unshrunk_effects(data: CountData, cp: CountPass, R: np.ndarray, prior: CountPrior,
                     correction: str = CUT_CORRECTION, *, max_iter: int = 30,
                     tol: float = 1e-6, Q: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The state effects without their ``N(0, delta_sd)`` prior (the maximum-likelihood fold
    changes given the states' posteriors), and their standard errors.

    The same ``R``-weighted objective as the fit ``cp`` (the MAP), with the prior on ``delta``
    removed (the weak priors on ``beta`` and ``gamma`` kept), maximised by Newton from the MAP.
    At the MAP the likelihood's gradient in ``delta`` is ``delta / delta_sd^2``, so the first step
    needs no new pass over the counts; most genes stop there (a step of at most
    :data:`UNSHRUNK_ONE_STEP`), the others (a strong effect the prior held back, few counts) are
    iterated with passes over their own columns only, to convergence (``tol``) or
    ``max_iter``. The standard error is that of the likelihood alone (its information at the
    last point, with the same ``correction`` as :func:`effect_standard_errors`).

    Reported (else NaN) where the counts carry more information on the effect than the prior
    does (the likelihood's standard error at the MAP below ``delta_sd``; only those genes are
    iterated), the iteration converged and ``|delta| <=`` :data:`UNSHRUNK_MAX_ABS` (beyond it the
    likelihood keeps rising towards an infinite fold change, e.g. a gene with no count in the
    state). On six simulated experiments (80 guide cells, 400 controls, 1,000 genes) the reported
    86-92% of the genes were within 0.0035 of the flat-prior fit run to a tight tolerance, where
    the MAP was up to 0.58 away (``tests/test_count_layer.py``).

    With ``Q`` (``cp`` then the marginal fit of :func:`fit_marginal`, ``Q`` its per-gene
    posteriors) the objective is the marginal likelihood: the genes reported (the same rule, at
    the MAP with ``Q``) are refitted by :func:`fit_marginal` with the flat prior from the MAP (on
    their columns only), and their standard errors are those of that fit (``correction``
    ``"louis"`` is the marginal likelihood's).

    Returns
    -------
    (delta, se)
        ``(K, G)`` each; row 0 is 0 and NaN.
    """
    K, B = data.n_states, data.n_batches
    flat = replace(prior, delta_sd=FLAT_DELTA_SD)
    if Q is not None and data.free[1] > data.free[0]:
        return _unshrunk_marginal(data, cp, R, prior, flat, correction, Q, max_iter, tol)
    # without free cells the marginal likelihood is the weighted one (and no state is uncertain)
    sums = group_sums(data, cp, R)
    grad, info = _gradient_information(data, cp.params, sums, flat)
    idx = np.arange(1, K)
    weak = info[:, idx, idx].T <= 2e-12  # (K - 1, G): no count information on that state's delta
    step = np.linalg.solve(info, grad[:, :, None])[:, :, 0]
    step[:, 1:K][weak.T] = 0.0
    theta = cp.params.theta()
    delta = CountParams.from_theta(theta + step, K, B).delta
    size = np.max(np.abs(step), axis=1, initial=0.0)
    # where the likelihood's information at the MAP is below the prior's the effect is not
    # reported: those genes (most of the long steps) are not iterated
    se = effect_standard_errors(data, cp, R, flat, correction=correction)
    informed = (se[1:] < float(prior.delta_sd)) & ~weak
    longer = (size > UNSHRUNK_ONE_STEP) & informed.any(axis=0)
    unconverged = np.zeros(data.n_genes, bool)
    if longer.any():
        genes = np.flatnonzero(longer)
        start = theta.copy()
        start[genes] += step[genes]
        at = evaluate(data, CountParams.from_theta(start, K, B), genes, cp)
        active = longer.copy()
        for _ in range(max_iter):
            at, _, moved = newton_step(data, at, R, flat, active=active)
            # a gene running off towards an infinite fold change is not followed further
            away = np.abs(at.params.delta[1:]).max(axis=0, initial=0.0) > UNSHRUNK_MAX_ABS
            unconverged |= active & away
            active &= (moved >= tol) & ~away
            if not active.any():
                break
        unconverged |= active
        delta = np.where(longer[None, :], at.params.delta, delta)
        # the iterated genes' SE at their last point (the others' pass is the MAP's, as before)
        se = effect_standard_errors(data, at, R, flat, correction=correction)
    keep = informed & (np.abs(delta[1:]) <= UNSHRUNK_MAX_ABS) & ~unconverged[None, :]
    delta[1:] = np.where(keep, delta[1:], np.nan)
    se[1:] = np.where(keep, se[1:], np.nan)
    return delta, se


def _unshrunk_marginal(data, cp, R, prior, flat, correction, Q, max_iter, tol):
    """:func:`unshrunk_effects` of the marginal likelihood (refitted on the reported genes)."""
    K, G = data.n_states, data.n_genes
    delta = np.full((K, G), np.nan)
    delta[0] = 0.0
    se = np.full((K, G), np.nan)
    _, info = _gradient_information(data, cp.params, group_sums(data, cp, R, Q), flat)
    idx = np.arange(1, K)
    weak = info[:, idx, idx].T <= 2e-12
    se_map = effect_standard_errors(data, cp, R, flat, correction=correction, Q=Q)
    informed = (se_map[1:] < float(prior.delta_sd)) & ~weak  # (K - 1, G)
    genes = np.flatnonzero(informed.any(axis=0))
    if genes.size == 0:
        return delta, se
    view = _column_view(data, genes)
    sub_flat = _column_prior(flat, genes, G)
    start = _column_pass(cp, genes).params
    at, Qs, _, moving = _fit_marginal(view, R, sub_flat, init=start, max_iter=max_iter, tol=tol)
    d = at.params.delta
    s_ = effect_standard_errors(view, at, R, sub_flat, correction=correction, Q=Qs)
    keep = informed[:, genes] & (np.abs(d[1:]) <= UNSHRUNK_MAX_ABS) & ~moving[None, :]
    delta[1:, genes] = np.where(keep, d[1:], np.nan)
    se[1:, genes] = np.where(keep, s_[1:], np.nan)
    return delta, se


def _diagonal_se(cov: np.ndarray, K: int) -> np.ndarray:
    """``(K, G)`` standard errors of ``delta_k`` (row 0 NaN) from per-gene covariances ``(G, p, p)``."""
    se = np.full((K, cov.shape[0]), np.nan)
    for k in range(1, K):
        se[k] = np.sqrt(cov[:, k, k])
    return se


_MEAT_ROWS = 256
"""Free cells per block of :func:`sandwich_meat` (bounds its ``(rows, G, p)`` scores)."""


def _pinned_square_sums(data: CountData, seg: slice, b: int, lam_b: np.ndarray) -> np.ndarray:
    """``sum_i dv_i^2`` per gene over the pinned rows ``seg`` (all of batch ``b``): by the series
    where their counts are sparse, otherwise entry by entry in cache-sized chunks."""
    sparse = _sparse_block(data, seg, b)
    if sparse is not None:
        return _pinned_sums.series_square_sums(sparse, lam_b)
    chunk = max(1, _CHUNK_ENTRIES // max(lam_b.size, 1))
    rate = np.exp(lam_b)
    ab = data.alpha[b]
    dv2 = np.zeros(lam_b.size)
    for start in range(seg.start, seg.stop, chunk):
        sl = slice(start, min(start + chunk, seg.stop))
        mu = np.multiply.outer(np.exp(data.log_s[sl]), rate)
        dv = (data.ya[sl] - ab - mu) / (mu + ab)
        dv2 += np.einsum("ij,ij->j", dv, dv)
    return dv2


def sandwich_meat(data: CountData, cp: CountPass, R: np.ndarray, Q: np.ndarray | None = None) -> np.ndarray:
    """``(G, p, p)``: ``sum_i sum_k r_ik s_ik s_ik^T`` per gene, the variance of the cells'
    complete-data scores ``s_ik = alpha (y_i - mu_ik) / t_ik d_kb`` (``d_kb`` the design row of
    state ``k`` and the cell's batch) over the cells and their uncertain states: the empirical
    ``sum_i sbar_i sbar_i^T`` (``sbar_i = sum_k r_ik s_ik``) plus the imputation variance
    ``sum_i Cov_{z ~ R_i}(s_iz)``. Pinned cells (weight 1 on their state) are recomputed from
    the counts (:func:`_pinned_square_sums`); free cells read the pass's stored terms. With
    ``Q`` (``(K, n_free, G)``, :func:`entry_posteriors`) the free cells' weights are per gene,
    ``q_ikg`` for ``r_ik``."""
    K, B, G = data.n_states, data.n_batches, data.n_genes
    p = data.n_theta
    D = data.design().reshape(K, B, p)
    a = data.alpha
    lam = cp.params.log_rates()
    meat = np.zeros((G, p, p))
    for k in range(K):
        for b, seg in data.pinned[k]:
            dv2 = _pinned_square_sums(data, seg, b, lam[k, b])
            meat += (a[b] ** 2 * dv2)[:, None, None] * np.outer(D[k, b], D[k, b])[None]
    f0, f1, fsegs = data.free
    if f1 > f0:
        u = a[data.batch[f0:f1]] * cp.free_dv  # (K, n_free, G)
        for b, sl in fsegs:
            for start in range(sl.start, sl.stop, _MEAT_ROWS):
                rows = slice(start, min(start + _MEAT_ROWS, sl.stop))
                r = R[data.order[rows]]  # (m, K)
                loc = slice(rows.start - f0, rows.stop - f0)
                ru = (r.T[:, :, None] if Q is None else Q[:, loc]) * u[:, loc]  # (K, m, G): r_ik u_ikg
                for k in range(K):
                    # the second moment over the states: sum_k r_k u_k^2 d_kb d_kb^T
                    meat += np.einsum("ig,ig->g", ru[k], u[k, loc])[:, None, None] * np.outer(D[k, b], D[k, b])[None]
    return meat

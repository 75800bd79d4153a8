"""The count layer of one experiment: every gene's effect in the perturbed state, with its uncertainty.

Pure functions over arrays. The states come from :func:`~scotgm_pp.tl.fit_states` (PCA scores
only: the counts do not inform them, a *cut*; ``benchmarks/count_layer_evidence.py`` measures
why); given their posteriors, :func:`fit_count_layer` computes the count parameters that maximise
each gene's marginal log posterior with the cells' states integrated out (or, with
``count_likelihood="weighted"``, the expected complete-data one; :mod:`scotgm_pp.inference.count_fit`), and
:func:`effect_table` reads the perturbed state's ``delta`` as the gene-level answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats

from ..inference import count_fit
from ..inference import count_layer as cl
from ..inference.joint_em import COUNT_LIKELIHOODS
from ..inference.normal_means import normal_means
from ._counts import universal_threshold

__all__ = ["COUNT_LIKELIHOODS", "CountFit", "fit_count_layer", "effect_table", "library_sizes"]


@dataclass
class CountFit:
    """The count layer of one experiment, fitted given the state posteriors.

    Its parameters maximise, gene by gene, the marginal log posterior
    ``sum_i log sum_k R_ik NB(y_ig | k) + log prior`` (``count_likelihood="marginal"``) or the
    expected complete-data one ``sum_i sum_k R_ik log NB(y_i | k) + log prior`` (``"weighted"``,
    the EM M-step with ``R`` fixed): either way the counts do not move the states (a cut).

    Attributes
    ----------
    params
        ``beta`` (basal log rate per gene), ``delta`` (state effects, row 0 = 0), ``gamma``
        (batch offsets, row 0 = 0).
    effect_se
        Standard errors of ``delta`` ``(K, G)`` (row 0 NaN).
    effect_se_robust
        The larger of ``effect_se`` and the sandwich standard error (``(K, G)``; the
        ``"robust"`` correction of :func:`~scotgm_pp.inference.count_fit.effect_standard_errors`):
        it stays right when the negative-binomial variance is wrong.
    count_likelihood
        ``"weighted"`` or ``"marginal"`` (:data:`COUNT_LIKELIHOODS`, :func:`fit_count_layer`).
    effect_unshrunk, effect_unshrunk_se
        ``delta`` without its ``N(0, delta_sd)`` prior and its standard error (``(K, G)``; NaN
        where the counts carry less information on the effect than the prior or the likelihood
        has no maximum; :func:`~scotgm_pp.inference.count_fit.unshrunk_effects`).
    prior
        The count prior.
    dispersion, dispersion_source
        Plug-in NB dispersion, ``(G,)`` per gene or ``(B, G)`` per batch (rows in the order of
        ``batch_labels``), and where it came from (``"given"``, ``"given per batch"``,
        ``"controls"`` or ``"controls per batch"``).
    n_iter, converged
        Newton iterations and convergence.
    row_loglik
        ``(n, K)`` per-cell count log-likelihood under each state at ``params`` (NaN where a
        pinned cell is not in that state).
    data
        The prepared counts (reused, e.g. by :func:`~scotgm_pp.inference.joint_em.any_effect_llr`).
    """

    params: cl.CountParams
    effect_se: np.ndarray
    prior: cl.CountPrior
    dispersion: np.ndarray
    dispersion_source: str
    n_iter: int
    converged: bool
    row_loglik: np.ndarray = field(repr=False)
    data: cl.CountData = field(repr=False)
    effect_se_robust: np.ndarray | None = None
    effect_unshrunk: np.ndarray | None = None
    effect_unshrunk_se: np.ndarray | None = None
    count_likelihood: str = "marginal"

    @property
    def se_method(self) -> str:
        """The correction of ``effect_se`` (:func:`~scotgm_pp.inference.count_fit.effect_standard_errors`)."""
        return count_fit.cut_correction(self.count_likelihood)

    @property
    def batch_labels(self) -> list[str]:
        return list(self.data.batch_labels)

    @property
    def gene_dispersion(self) -> np.ndarray:
        """``(G,)``: the dispersion per gene, averaged over the experiment's cells when it is per batch."""
        if self.dispersion.ndim == 1:
            return self.dispersion
        share = np.bincount(self.data.batch, minlength=self.data.n_batches) / max(self.data.n_cells, 1)
        return share @ self.dispersion


NEWTON_TOL = 1e-4
"""A gene's Newton iterations stop once its step is below this (natural-log units); by Newton's
quadratic convergence the effect is then within about 1e-8 of the optimum, far inside its
standard error."""


def library_sizes(counts) -> np.ndarray:
    """Each cell's total count (over every gene given): the size factor of the count layer."""
    return np.asarray(counts.sum(axis=1), dtype=float).ravel()


def fit_count_layer(
    counts,
    fixed_state: np.ndarray,
    responsibilities: np.ndarray,
    *,
    size_factors: np.ndarray,
    dispersion: np.ndarray | cl.BatchDispersion | None = None,
    batch: np.ndarray | None = None,
    delta_sd: float = cl.DELTA_SD,
    beta_sd: float = 5.0,
    gamma_sd: float = 1.0,
    dispersion_per_batch: bool = True,
    count_likelihood: str = "marginal",
) -> CountFit:
    """Fit the count layer given the states' posteriors (see :class:`CountFit`).

    Parameters
    ----------
    counts
        Cells x genes raw counts of the experiment (dense or sparse).
    fixed_state
        The state model's pinning: ``0`` controls, ``-1`` free guide cells, ``1`` guide cells
        pinned perturbed (escape model off).
    responsibilities
        ``(n, K)`` state posteriors from the state model.
    size_factors
        Library size of every cell (:func:`library_sizes` of all its measured genes).
    dispersion
        NB dispersion per gene ``(G,)``, per batch and gene (``(B, G)`` in the order of
        :func:`~scotgm_pp.inference.count_layer.batch_codes`, or a
        :class:`~scotgm_pp.inference.count_layer.BatchDispersion`); ``None``: the moment
        estimates over the control cells, shrunk toward their trend
        (:func:`~scotgm_pp.inference.count_layer.control_dispersion`, within batches), with a
        ``batch`` and ``dispersion_per_batch`` one per batch
        (:func:`~scotgm_pp.inference.count_layer.control_dispersion_by_batch`).
    batch
        Optional batch label per cell: each batch but the most frequent gets an offset ``gamma``.
    dispersion_per_batch
        See ``dispersion``.
    delta_sd, beta_sd, gamma_sd
        Prior standard deviations (:class:`~scotgm_pp.inference.count_layer.CountPrior`).
    count_likelihood
        ``"marginal"`` (default): each gene's marginal likelihood given the state
        probabilities, ``sum_i log sum_k r_ik NB(y_ig | k)``, every guide cell's state integrated
        out gene by gene (:func:`~scotgm_pp.inference.count_fit.fit_marginal`), with the Louis
        standard error (``"louis"``; the sandwich of the marginal scores for
        ``effect_se_robust``) and ``effect_unshrunk`` refitted with the flat prior. ``"weighted"``:
        every guide cell's ``log NB`` in each state weighted by its state probability,
        ``sum_i sum_k r_ik log NB(y_ig | k)`` (the EM M-step with ``R`` fixed), with the
        imputation standard error; escaped guide cells then keep weight in the perturbed state,
        so a knock-down's effect is measured too weak (``effect_unshrunk`` of the targets 0.58
        above the truth on average on simulated screens, ``benchmarks/batch_dispersion.py``).

    Returns
    -------
    CountFit
    """
    if count_likelihood not in COUNT_LIKELIHOODS:
        raise ValueError(f"count_likelihood must be one of {COUNT_LIKELIHOODS}, got {count_likelihood!r}.")
    fixed = np.asarray(fixed_state, int)
    R = np.asarray(responsibilities, float)
    is_control = fixed == 0
    source = "given"
    if dispersion is None:
        if batch is not None and dispersion_per_batch:
            dispersion = cl.control_dispersion_by_batch(counts, size_factors, is_control, batch)
            source = "controls per batch"
        else:
            dispersion = cl.control_dispersion(counts, size_factors, is_control, batch)
            source = "controls"
    elif isinstance(dispersion, cl.BatchDispersion) and batch is None:
        dispersion = dispersion.pooled  # no batches to match: the pooled estimate
    elif isinstance(dispersion, cl.BatchDispersion) or np.ndim(dispersion) == 2:
        source = "given per batch"
    prior = cl.default_count_prior(counts, size_factors, beta_sd=beta_sd, delta_sd=delta_sd, gamma_sd=gamma_sd)
    data = cl.CountData(counts, size_factors, dispersion, fixed, R.shape[1], batch)
    cp, Q, n_iter, converged, method = count_fit.fit_cut(data, R, prior, count_likelihood, tol=NEWTON_TOL)
    se = count_fit.effect_standard_errors(data, cp, R, prior, correction=method, Q=Q)
    robust = np.fmax(se, count_fit.effect_standard_errors(data, cp, R, prior, correction="sandwich", Q=Q))
    unshrunk, unshrunk_se = count_fit.unshrunk_effects(data, cp, R, prior, correction=method, Q=Q)
    return CountFit(params=cp.params, effect_se=se, prior=prior, dispersion=data.phi.copy(), dispersion_source=source,
                    n_iter=int(n_iter), converged=bool(converged), row_loglik=cp.row_loglik, data=data,
                    effect_se_robust=robust, effect_unshrunk=unshrunk, effect_unshrunk_se=unshrunk_se,
                    count_likelihood=count_likelihood)


def _maximum_likelihood(fit: CountFit, state: int) -> tuple[np.ndarray, np.ndarray]:
    """The unshrunk effect of ``state`` and its SE (all NaN when the fit has none)."""
    if fit.effect_unshrunk is None or fit.effect_unshrunk_se is None:
        nan = np.full(fit.params.delta.shape[1], np.nan)
        return nan, nan
    return np.asarray(fit.effect_unshrunk[state], float), np.asarray(fit.effect_unshrunk_se[state], float)


def effect_table(fit: CountFit, *, state: int = 1, threshold: float | None = None) -> pd.DataFrame:
    """Per-gene effect of ``state`` (default: perturbed) against the basal state.

    Columns: ``effect`` (``delta``, natural-log fold change of the gene's share of the library),
    ``effect_se``, ``effect_z``, ``effect_bound = sign(effect) * max(|effect| - lambda * se, 0)``
    with ``lambda = sqrt(2 ln G)`` unless ``threshold`` is given (the fold change the counts
    support after clearing the largest ``|z|`` expected among ``G`` null genes),
    ``effect_pvalue`` (two-sided Wald test of no change: of the maximum-likelihood effect,
    ``effect_unshrunk / effect_unshrunk_se``, where that is reported, and of ``effect_z`` where
    it is not: where the counts carry less information on the effect than the prior, which
    makes that test conservative, or the likelihood has no maximum, e.g. a gene without counts
    in the state), ``effect_qvalue`` (Benjamini-Hochberg over the genes),
    ``log_rate_basal`` (``beta``) and ``dispersion`` (per batch: its average over the
    experiment's cells; :attr:`CountFit.dispersion` holds the batches').

    Empirical Bayes across the experiment's genes (:func:`scotgm_pp.inference.normal_means`):
    each ``effect`` with its ``effect_se`` is read as ``N(theta_g, se_g^2)`` and ``theta_g`` gets
    a prior learned from all genes (a point mass at 0 and zero-centred normals, ash-like), giving
    ``effect_shrunk`` (posterior mean; ``rank_by="effect_shrunk"`` ranks by it, with no ties),
    ``effect_shrunk_sd`` and ``effect_lfsr`` (local false sign rate: the posterior probability
    that the effect is 0 or of the other sign). ``effect`` itself is the count layer's MAP under
    its fixed ``N(0, delta_sd)`` prior; the learned prior comes on top of it. ``effect_unshrunk``
    and ``effect_unshrunk_se`` (when the fit has them) are the effect without that prior (the
    maximum-likelihood fold change given the states' posteriors) and its standard error, NaN
    where the counts carry less information on the effect than the prior or the likelihood has
    no maximum (a gene without counts in the state)
    (:func:`~scotgm_pp.inference.count_fit.unshrunk_effects`).

    ``effect_pvalue`` does not test the MAP because a prior of fixed width pulls ``effect_z``
    towards 0 by about ``delta_sd / sqrt(delta_sd^2 + s^2)`` (``s`` the likelihood's SE): on 50
    Papalexi null sets (60 control cells against 300 others) that test put 1.5% of the p-values
    below 0.05, the maximum-likelihood test 4.6% of those it covers (59% of the genes; 2.7% of
    all). Where the negative binomial does not hold the variance, it calls too much (see the
    README). ``effect_se_robust`` (when the fit has it) is the larger of ``effect_se`` and the
    sandwich standard error, and ``effect_pvalue_robust`` the Wald test of ``effect`` (the MAP)
    with it: more conservative than ``effect_pvalue`` (the prior's pull and the larger SE), the
    p-value to read when calls must survive a wrong variance (on confounded simulated batches its
    false-discovery proportion is still above the nominal, see the README).

    The ranking and the empirical Bayes columns use the model-based ``effect_se``: on Papalexi
    (60 guide cells vs 300 controls, seeds 0-19; measured with the weighted likelihood) ranking by
    ``effect_shrunk`` with the robust SE found the target first in 0.606 of the experiments, with
    the sandwich SE alone in 0.294, against 0.672 with
    ``effect_se``: a sandwich over a few dozen cells is too noisy for genes with few counts.
    """
    d = fit.params.delta[state]
    se = fit.effect_se[state]
    z = d / se
    lam = universal_threshold(len(d)) if threshold is None else float(threshold)
    # the Wald test is of the maximum-likelihood effect where it is reported; elsewhere (the
    # counts carry less information than the prior) of the MAP with its posterior SD
    ml, ml_se = _maximum_likelihood(fit, state)
    tested = np.isfinite(ml) & np.isfinite(ml_se) & (ml_se > 0)
    p = 2.0 * stats.norm.sf(np.abs(np.where(tested, ml / np.where(tested, ml_se, 1.0), z)))
    eb_mean = np.full(d.shape, np.nan)
    eb_sd = np.full(d.shape, np.nan)
    lfsr = np.full(d.shape, np.nan)
    ok = np.isfinite(d) & np.isfinite(se) & (se > 0)
    if ok.sum() >= 2:
        eb = normal_means(d[ok], se[ok])
        eb_mean[ok], eb_sd[ok], lfsr[ok] = eb.mean, eb.sd, eb.lfsr
    extra = {}
    if fit.effect_unshrunk is not None:
        extra = {"effect_unshrunk": fit.effect_unshrunk[state], "effect_unshrunk_se": fit.effect_unshrunk_se[state]}
    if fit.effect_se_robust is not None:
        robust = fit.effect_se_robust[state]
        extra |= {"effect_se_robust": robust, "effect_pvalue_robust": 2.0 * stats.norm.sf(np.abs(d / robust))}
    return pd.DataFrame({
        "effect": d,
        "effect_se": se,
        "effect_z": z,
        "effect_bound": np.sign(d) * np.maximum(np.abs(d) - lam * se, 0.0),
        "effect_pvalue": p,
        "effect_qvalue": stats.false_discovery_control(p),
        "effect_shrunk": eb_mean,
        "effect_shrunk_sd": eb_sd,
        "effect_lfsr": lfsr,
        **extra,
        "log_rate_basal": fit.params.beta,
        "dispersion": fit.gene_dispersion,
    })

"""One experiment (a perturbation's guide cells and its controls): preprocess, fit, rank.

The AnnData-aware driver :func:`scotgm_pp.tl.perturbation_response` maps this over the
perturbations of a screen; the benchmark calls it on sampled pairs.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from ..inference.count_layer import DELTA_SD, BatchDispersion, batch_codes
from ..inference.em import default_prior
from ..inference.joint_em import any_effect_llr
from ..pp import PreprocessParams, prepare_pair
from ._core import (
    DEFAULT_RANK_BY,
    KS_ALPHA,
    DEFAULT_STATE_SPACE,
    STATE_SPACES,
    fit_perturbation,
    gene_statistics,
    resolve_rank_by,
    state_shift,
    states_from_signature,
    unpinned_posterior,
)
from ._calls import bh_qvalues, resampling_test
from ._counts import count_shift, universal_threshold
from ._effects import COUNT_LIKELIHOODS, effect_table, fit_count_layer, library_sizes
from ._posterior import posterior_record
from ._signature import fit_signature_states, pearson_residuals

__all__ = ["analyse_pair"]


def analyse_pair(
    counts: AnnData,
    is_control: np.ndarray,
    *,
    params: PreprocessParams,
    coupling: str,
    escape_model: bool,
    regularization: float,
    em_regularization: str = "map",
    random_state=None,
    coupling_kwargs: dict | None = None,
    rank_by: str = DEFAULT_RANK_BY,
    batch: np.ndarray | None = None,
    dispersion: np.ndarray | BatchDispersion | None = None,
    baseline: bool = True,
    delta_sd: float = DELTA_SD,
    any_effect: bool = True,
    state_space: str = DEFAULT_STATE_SPACE,
    n_resamples: int | None = None,
    dispersion_per_batch: bool = True,
    count_likelihood: str = "marginal",
) -> tuple[dict, pd.DataFrame, pd.Series]:
    """Preprocess, fit and rank one experiment (raw counts of its control and guide cells).

    1. :func:`~scotgm_pp.pp.prepare_pair`: filter, normalise, PCA (the PCA scores).
    2. The state model (which guide cells are perturbed: ``p_perturbed``): by default on the
       cross-fitted perturbation signature of the raw counts
       (:func:`~scotgm_pp.tl._signature.fit_signature_states`), with ``state_space="pca"`` on
       the PCA scores (the paper's); then :func:`~scotgm_pp.tl.fit_perturbation`: the PCA-space
       states, the coupling and the perturbation distribution (``mu``, ``sigma``, ``score``).
    3. :func:`~scotgm_pp.tl.fit_count_layer`: the negative-binomial count layer given those
       state posteriors, with each cell's total count (over all genes of ``counts``) as offset;
       ``effect`` is the perturbed state's log fold change of every gene, with ``effect_se``.
    4. Genes are ranked by ``rank_by`` (default ``"effect_shrunk"``, the empirical-Bayes posterior
       mean of the model's effect; see :func:`~scotgm_pp.tl.gene_statistics`).

    Parameters
    ----------
    counts
        Raw counts of the experiment's cells (controls and guide cells), all measured genes.
    is_control
        Which cells of ``counts`` are controls.
    params, coupling, escape_model, regularization, em_regularization, random_state, coupling_kwargs
        See :func:`~scotgm_pp.tl.perturbation_response`.
    rank_by
        One of :data:`~scotgm_pp.tl.RANK_BY`.
    batch
        Optional stratum label per cell of ``counts``: batch offsets in the count layer (and
        strata of the model-free ``lfc_all_guides`` baseline).
    dispersion
        NB dispersion per gene of ``counts.var_names`` (e.g. estimated once from all control
        cells of a screen), or per batch and gene (a
        :class:`~scotgm_pp.inference.count_layer.BatchDispersion`: the count layer reads each
        batch's, the calls and the signature its pooled one); ``None``: estimated from this
        experiment's control cells (per batch with ``batch`` and ``dispersion_per_batch``).
    dispersion_per_batch
        With ``batch`` and ``dispersion=None``: the count layer's dispersion per batch
        (:func:`~scotgm_pp.inference.count_layer.control_dispersion_by_batch`) instead of one
        pooled over batches.
    count_likelihood
        ``"marginal"`` (default) or ``"weighted"``: the count layer's likelihood given the state
        posteriors (see :func:`~scotgm_pp.tl.fit_count_layer`).
    delta_sd
        Prior standard deviation of the state effects (natural-log units; shrinks the effects
        of genes with few counts).
    baseline
        Also compute the model-free baseline columns ``lfc_all_guides*``
        (:func:`~scotgm_pp.tl.count_shift` of every guide cell against the controls); needed
        for ``rank_by="lfc_all_guides_bound"``.
    state_space
        ``"signature"`` (default) or ``"pca"``: where the escape model looks for the perturbed
        state (see :data:`~scotgm_pp.tl._core.STATE_SPACES`).
    n_resamples
        Also run the calls' resampling test (:func:`~scotgm_pp.tl._calls.resampling_test`, this
        many label reassignments, seeded by ``[random_state, 1]``): per-gene ``pval`` and
        ``qval`` columns (and, unless ``baseline``, the model-free ``lfc_all_guides*`` columns
        from its statistic), and the perturbation's ``pval_any``. Its "any effect" p-value then
        joins the signature's split-half test in deciding whether the guide cells hold a
        perturbed state (Bonferroni over the two). ``None``: no calls.
    any_effect
        Also record the model's log-likelihood ratio of the two-state against the one-state
        model (``llr``, ``llr_gaussian``, ``llr_counts``; :func:`scotgm_pp.inference.any_effect_llr`).
        It is not calibrated (a free state gains about ``d (d + 3) / 4`` even under the null);
        :func:`~scotgm_pp.tl.perturbation_response` leaves it out and tests "any effect" by
        resampling instead.

    Returns
    -------
    record : dict
        Everything needed to reuse the fit (numpy arrays and scalars); the keys
        ``state_model``, ``coupling_covariances``, ``count_model`` and ``effect_se_method`` say
        which graph or step produced each number.
    genes : pandas.DataFrame
        One row per kept gene (see :func:`~scotgm_pp.tl.gene_statistics` and
        :func:`~scotgm_pp.tl.effect_table`).
    p_perturbed : pandas.Series
        Posterior probability of the perturbed state per kept cell (controls 0).
    """
    rank_by = resolve_rank_by(rank_by)
    by_batch = None
    if isinstance(dispersion, BatchDispersion):
        if dispersion.n_genes != counts.n_vars:
            raise ValueError(f"dispersion holds {dispersion.n_genes} genes, counts {counts.n_vars}.")
        by_batch, dispersion = dispersion, dispersion.pooled
    if dispersion is not None:
        dispersion = np.asarray(dispersion, float)
        if dispersion.shape != (counts.n_vars,) or not np.all(np.isfinite(dispersion)) or (dispersion < 0).any():
            raise ValueError(
                f"dispersion must hold one finite non-negative value per gene of counts ({counts.n_vars}), "
                f"got shape {dispersion.shape}; pass None to estimate it from the experiment's controls."
            )
    if state_space not in STATE_SPACES:
        raise ValueError(f"unknown state_space {state_space!r}; choose one of {', '.join(STATE_SPACES)}.")
    if count_likelihood not in COUNT_LIKELIHOODS:
        raise ValueError(f"count_likelihood must be one of {COUNT_LIKELIHOODS}, got {count_likelihood!r}.")
    pair = prepare_pair(counts, is_control, params)
    rows = counts.obs_names.get_indexer(pair.obs_names)
    cols = counts.var_names.get_indexer(pair.var_names)
    X = counts.X[rows]
    size_factors = library_sizes(X)
    y = X[:, cols]
    y = y.tocsr() if sp.issparse(y) else np.asarray(y)
    b = None if batch is None else np.asarray(batch)[rows]
    rng = np.random.default_rng(random_state)
    test = None
    if n_resamples is not None:
        seed = [int(random_state), 1] if isinstance(random_state, (int, np.integer)) else rng.spawn(1)[0]
        phi = np.zeros(len(cols)) if dispersion is None else dispersion[cols]
        test = resampling_test(y, pair.is_control, library_size=size_factors, dispersion=phi, batch=b,
                               n_resamples=n_resamples, random_state=np.random.default_rng(seed))
    states = None
    if escape_model and state_space == "signature":
        Z, used = pearson_residuals(y, size_factors, pair.is_control, batch=b,
                                    dispersion=None if dispersion is None else dispersion[cols])
        # the split-half test only matters when the calls' any-effect test alone does not decide
        decided = test is not None and 2.0 * test.pval_any < KS_ALPHA
        signature = fit_signature_states(Z, pair.is_control, genes=pair.var_names.to_numpy()[used],
                                         regularization=regularization, em_regularization=em_regularization,
                                         random_state=rng.spawn(1)[0], shift_test=not decided)
        del Z
        states = states_from_signature(signature, pair.pca.scores, pair.is_control, regularization=regularization,
                                       em_regularization=em_regularization,
                                       any_effect_pvalue=None if test is None else test.pval_any)
    fit = fit_perturbation(
        pair.pca.scores,
        pair.is_control,
        coupling=coupling,
        escape_model=escape_model,
        regularization=regularization,
        em_regularization=em_regularization,
        random_state=rng,
        coupling_kwargs=coupling_kwargs,
        states=states,
    )
    em = fit.em
    count_dispersion = None if dispersion is None else dispersion[cols]
    if by_batch is not None and b is not None:
        count_dispersion = by_batch.take(cols)
    cf = fit_count_layer(y, em.fixed_state, em.responsibilities, size_factors=size_factors,
                         dispersion=count_dispersion, batch=b, delta_sd=delta_sd,
                         dispersion_per_batch=dispersion_per_batch, count_likelihood=count_likelihood)
    table = effect_table(cf)
    if baseline or rank_by == "lfc_all_guides_bound":
        base = count_shift(y, pair.is_control, batch=b)
        for col in ("lfc", "lfc_se", "lfc_z", "lfc_bound"):
            table[col.replace("lfc", "lfc_all_guides")] = base[col].to_numpy()

    shift = state_shift(pair.lognorm, fit.p_perturbed)
    genes = gene_statistics(pair.pca.loadings, fit.mean, fit.cov, genes=pair.var_names.to_numpy(), shift=shift,
                            counts=table, rank_by=rank_by)
    if test is not None:
        if "lfc_all_guides" not in genes:  # the calls' statistic is the same negative-binomial contrast
            lam = universal_threshold(len(cols))
            genes["lfc_all_guides"] = test.lfc
            genes["lfc_all_guides_se"] = test.lfc_se
            genes["lfc_all_guides_z"] = test.z
            genes["lfc_all_guides_bound"] = np.sign(test.lfc) * np.maximum(np.abs(test.lfc) - lam * test.lfc_se, 0.0)
        genes["pval"] = test.pval
        genes["qval"] = bh_qvalues(test.pval)
    llr = {} if not any_effect else any_effect_llr(
        fit.states.features, weights=em.weights, means=em.means, covariances=em.covariances, fixed_state=em.fixed_state,
        count_data=cf.data, count_params=cf.params, count_prior=cf.prior, regularization=regularization,
        count_loglik=cf.row_loglik)
    record = {
        **pair.record,
        **_state_record(pair, fit),
        **_state_model_data(pair, fit, regularization, em_regularization),
        **_count_record(cf),
        **llr,
        **_posterior_entries(pair, fit, cf, size_factors, b, regularization),
        "rank_by": rank_by,
        "loadings": pair.pca.loadings.astype(np.float32),
        "genes": pair.var_names.to_numpy().astype(str),
        "gene_mean": pair.pca.gene_mean,
        "gene_std": pair.pca.gene_std,
        "explained_variance_ratio": pair.pca.explained_variance_ratio[: pair.pca.n_pcs],
        "ks": pair.ks,
    }
    if test is not None:
        src = test.pval_source
        record.update(pval_any=float(test.pval_any), any_statistic=float(test.any_statistic),
                      n_resamples=int(test.n_resamples), n_pval_fitted_tail=int((src == 1).sum()),
                      n_pval_extra_resamples=int((src == 2).sum()), n_pval_exact_sparse=int((src == 3).sum()))
    p = pd.Series(fit.p_perturbed, index=pair.obs_names)
    return record, genes, p


def _state_record(pair, fit) -> dict:
    """States, coupling and perturbation distribution; which graph produced them."""
    em = fit.em
    ctrl = pair.is_control
    assigned = em.responsibilities.argmax(axis=1)
    hidden = unpinned_posterior(fit.states.features, em) >= 0.5
    guide_state = assigned[~ctrl]
    confusion = np.array(
        [
            [int((~hidden[ctrl]).sum()), int(hidden[ctrl].sum())],
            [int((guide_state == 0).sum()), int((guide_state == 1).sum())],
        ]
    )
    return {
        "coupling": fit.coupling,
        # The state model (one graph): its EM trace, iterations and convergence.
        "em_n_iter": int(em.n_iter),
        "em_converged": bool(em.converged),
        "em_logp": float(em.logp_trace[-1]),
        "em_logp_trace": np.asarray(em.logp_trace),
        "state_model_covariance": np.asarray(em.covariances),
        "weights": np.asarray(em.weights),
        "state_means": np.asarray(em.means),
        "means": np.asarray(fit.states.means),
        # The per-state covariances the coupling used (see record["coupling_covariances"]).
        "covariances": np.asarray(fit.states.covariances),
        "cross_covariance": np.asarray(fit.cross_covariance),
        "perturbation_mean": np.asarray(fit.mean),
        "perturbation_cov": np.asarray(fit.cov),
        "fraction_perturbed": float(fit.p_perturbed[~ctrl].mean()),
        "confusion": confusion,
        "confusion_labels": np.array(["control", "guide"]),
        "confusion_states": np.array(["basal", "perturbed"]),
        "state_evidence": "signature score" if fit.state_info.get("state_space") == "signature" else "pca scores",
        **{f"coupling_{k}": v for k, v in fit.coupling_info.items()},
        **fit.state_info,
    }



def _state_model_data(pair, fit, regularization: float, em_regularization: str) -> dict:
    """What :func:`~scotgm_pp.tl.get_model` needs to rebuild the state model's graph: the state
    model's features (signature or PCA scores) and names of the experiment's cells, their fixed
    states, and the prior's settings."""
    em = fit.em
    extra = {}
    if fit.state_info.get("state_space") == "signature":  # the PCA scores the PCA-space states came from
        extra["pca_scores"] = np.asarray(pair.pca.scores, float)
    return {
        **extra,
        "state_scores": np.asarray(fit.states.features, float),
        "state_cell_names": np.asarray(pair.obs_names).astype(str),
        "state_fixed_state": np.asarray(em.fixed_state, np.int8),
        "state_covariance": str(em.covariance),
        "state_prior": "scaled" if fit.state_info.get("state_space") == "signature" else "ridge",
        "state_prior_regularization": float(regularization),
        "state_em_regularization": str(em_regularization),
    }

def _posterior_entries(pair, fit, cf, size_factors, batch, regularization) -> dict:
    """What the posterior draws and synthetic cells need (:func:`~scotgm_pp.tl._posterior.posterior_record`):
    the states' conjugate posterior given their responsibilities, the count layer, library-size
    quantiles and batch shares per state (the Hit-and-Run plans come with the coupling's record,
    ``coupling_plan_draws``)."""
    em = fit.em
    se = np.asarray(cf.effect_se[1], float)
    se = np.where(np.isfinite(se) & (se > 0), se, cf.prior.delta_sd)
    prior = default_prior(pair.pca.scores, 2, regularization=regularization)  # the prior fit_states used
    return posterior_record(
        pair.pca.scores, em.responsibilities, em.fixed_state, prior, size_factors=size_factors,
        batch_codes=batch_codes(batch, len(size_factors))[0], beta=cf.params.beta, effect=cf.params.delta[1],
        effect_se=se, dispersion=cf.dispersion, batch_offset=cf.params.gamma,
    )


def _count_record(cf) -> dict:
    return {
        "count_model": ("negative binomial count layer, weighted M-step given the state posteriors "
                        "(counts do not inform states)"
                        if cf.count_likelihood != "marginal" else
                        "negative binomial count layer, per-gene marginal likelihood over the state posteriors "
                        "(counts do not inform states)"),
        "count_likelihood": str(cf.count_likelihood),
        "count_n_iter": int(cf.n_iter),
        "count_converged": bool(cf.converged),
        "effect_se_method": cf.se_method,
        "dispersion_source": cf.dispersion_source,
        "count_batches": np.asarray(cf.batch_labels, dtype=str),
        "delta_prior_sd": float(cf.prior.delta_sd),
        "beta_prior_sd": float(cf.prior.beta_sd),
        "gamma_prior_sd": float(cf.prior.gamma_sd),
    }

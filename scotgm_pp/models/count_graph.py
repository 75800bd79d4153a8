"""The count observation layer of the PyMC graph, sharing each cell's state with its PCA scores.

Declared by :func:`scotgm_pp.models.build_model` when it is given counts. For gene ``g`` and
cell ``i`` in state ``z_i`` and batch ``b_i``::

    y_ig ~ NegativeBinomial(mu = s_i exp(beta_g + delta[z_i, g] + gamma[b_i, g]), alpha = 1 / phi_g)

* ``beta ~ Normal(m, beta_sd)`` (dims ``gene``), ``m`` the genes' pooled log rates;
* ``delta ~ Normal(0, delta_sd)`` (dims ``effect_state, gene``): the effect of every state but
  the basal one (``delta`` of state 0 is 0); deterministic ``state_log_rate`` (``state, gene``);
* ``gamma ~ Normal(0, gamma_sd)`` (dims ``batch_offset, gene``) when there are batches: the
  offset of every batch but the reference (the most frequent) one;
* ``design_count_coef ~ Normal(0, design_count_sd)`` (dims ``covariate, gene``) when the graph
  has a per-cell design matrix ``design`` (``cell, covariate``): ``design_i @ design_count_coef``
  is added to cell ``i``'s log rate of every gene, whatever its state;
* ``size_factors`` (``cell``), ``dispersion`` (``gene``, or ``batch, gene`` with one per
  batch) and ``batch_code`` (``cell``) are ``pm.Data``: the library size is an offset and the
  dispersion a plug-in constant (the moment estimates over the control cells shrunk toward
  their mean-dispersion trend, :func:`scotgm_pp.inference.count_layer.control_dispersion`, or
  per batch :func:`~scotgm_pp.inference.count_layer.control_dispersion_by_batch`); a cell of
  batch ``b`` reads ``phi_bg``.

How ``z`` is declared
---------------------
``pm.Mixture`` marginalises the state of one observed variable; here two observations of a
cell (its PCA scores ``x_i``, an MvNormal, and its counts ``y_i``, NegativeBinomials) share one
state. Every cell is one row of a :class:`pymc.CustomDist`, ``XY`` (dims ``cell, feature``;
``feature`` = the PCs then the genes), with

* a ``logp`` that marginalises ``z`` exactly over the cell's allowed states ``A_i``:
  ``logsumexp_{k in A_i} [log w_k - log sum_{j in A_i} w_j + log N(x_i | k) + sum_g log NB(y_ig | k)]``,
  the density EM climbs (a pinned cell has one allowed state and no weight term);
* a generative ``dist``: ``z_i`` from the renormalised weights, ``x_i ~ N(mu_z, Sigma_z)``,
  ``y_i ~ NB(. | z)``, so ``pm.sample_prior_predictive`` / ``pm.sample_posterior_predictive``
  draw synthetic cells (scores and counts) from the graph.

This needs no extra dependency (``pymc_extras.marginalize`` would declare ``z`` explicitly but
adds a package); the price is the concatenated ``feature`` axis of ``XY``.

Which evidence informs ``z``
----------------------------
The generative model is joint, and :func:`scotgm_pp.inference.joint_em.fit_joint_em`
(``evidence="joint"``) computes the MAP of its density. The package's default path does not: it
infers the states from the scores alone and fits the count layer given their posteriors, a cut.
The cut is a graph too (``count_evidence="cut"`` in :func:`~scotgm_pp.models.build_model`): each
cell's density is its scores' mixture density times ``prod_g sum_k r_ik NB(y_ig | k)``, each
gene's count with the cell's state integrated out over the fixed state probabilities ``r`` (EM's
responsibilities of the scores); ``count_likelihood="weighted"`` declares
``prod_k p(y_i | k)^{r_ik}`` instead. Its MAP is the screen's count fit, NUTS samples it, and the generative ``dist`` is the same as the joint graph's (the
cut changes what informs the states, not how cells are generated). On simulated screens with 60% escaped cells the joint MAP found the escaped
cells worse (AUC 0.70 against 0.86) and ranked the knocked-down gene first less often (0.48
against 0.90): genes independent given the state, a few hundred of them, outvote the PCA part
and split the cells along shared expression programs (``benchmarks/count_layer_evidence.py``).
"""

from __future__ import annotations

import numpy as np
import pymc as pm
import pytensor.tensor as pt
from pytensor.tensor.type_other import NoneTypeT

from ..inference.count_layer import PHI_MIN, CountPrior, batch_codes
from ..inference.joint_em import COUNT_LIKELIHOODS

__all__ = ["count_coords", "add_count_layer", "cells_joint", "joint_state_terms", "count_state_terms"]


def count_coords(n: int, batch, state_names: list[str], genes: list[str], pcs: list[str]) -> dict:
    """Coordinates the count layer adds to the model (pass them to ``pm.Model(coords=...)``:
    coordinates added later are mutable, and PyMC would redraw every variable sized by them
    in ``sample_posterior_predictive``)."""
    _, labels = batch_codes(batch, n)
    out = {"gene": list(genes)}
    if len(state_names) > 1:
        out["effect_state"] = list(state_names[1:])
    if len(labels) > 1:
        out["batch"] = labels
        out["batch_offset"] = labels[1:]
    out["feature"] = list(pcs) + list(genes)
    return out


def add_count_layer(
    counts: np.ndarray,
    *,
    size_factors: np.ndarray,
    dispersion: np.ndarray,
    batch,
    count_prior: CountPrior,
    state_names: list[str],
    genes: list[str],
    design=None,
    design_count_sd: float = 1.0,
) -> dict:
    """Declare the count layer's parameters and data in the current model context.

    Returns the tensors the observed variables need: ``state_log_rate`` ``(K, G)``,
    ``cell_offset`` ``(n, G)`` (``log s_i + gamma[b_i]``, plus ``design_i @ design_count_coef``
    when ``design``, the model's ``(n, q)`` design data, is given) and ``alpha`` ``(G,)`` (``(n, G)``
    with a dispersion per batch, ``(B, G)`` in the order of
    :func:`~scotgm_pp.inference.count_layer.batch_codes`).
    """
    n, G = counts.shape
    K = len(state_names)
    codes, labels = batch_codes(batch, n)
    s = pm.Data("size_factors", np.asarray(size_factors, float), dims="cell")
    phi_value = np.maximum(np.asarray(dispersion, float), PHI_MIN)
    per_batch = phi_value.ndim == 2
    if per_batch and phi_value.shape != (len(labels), G):
        raise ValueError(f"a dispersion per batch must have shape (batches, genes) = ({len(labels)}, {G}), "
                         f"got {phi_value.shape}.")
    if per_batch and len(labels) == 1:
        phi_value, per_batch = phi_value[0], False
    phi = pm.Data("dispersion", phi_value, dims=("batch", "gene") if per_batch else "gene")
    code = pm.Data("batch_code", codes.astype("int64"), dims="cell")
    # Explicit shapes: a size taken from the (shared) coordinate lengths would make PyMC redraw
    # these parameters in sample_posterior_predictive whenever the trace lacks the coordinates.
    beta = pm.Normal("beta", mu=np.asarray(count_prior.beta_mean, float), sigma=count_prior.beta_sd, shape=(G,),
                     dims="gene")
    rows = [pt.zeros((1, G))]
    if K > 1:
        rows.append(pm.Normal("delta", mu=0.0, sigma=count_prior.delta_sd, shape=(K - 1, G),
                              dims=("effect_state", "gene")))
    state_log_rate = pm.Deterministic("state_log_rate", beta[None, :] + pt.concatenate(rows, axis=0),
                                      dims=("state", "gene"))
    offset = pt.log(s)[:, None]
    if len(labels) > 1:
        gamma = pm.Normal("gamma", mu=0.0, sigma=count_prior.gamma_sd, shape=(len(labels) - 1, G),
                          dims=("batch_offset", "gene"))
        offset = offset + pt.concatenate([pt.zeros((1, G)), gamma], axis=0)[code]
    if design is not None:
        q = int(design.type.shape[1]) if design.type.shape[1] is not None else int(design.shape[1].eval())
        coef = pm.Normal("design_count_coef", mu=0.0, sigma=float(design_count_sd), shape=(q, G),
                         dims=("covariate", "gene"))
        offset = offset + design @ coef
    return {"state_log_rate": state_log_rate, "cell_offset": offset, "alpha": 1.0 / (phi[code] if per_batch else phi)}


def count_state_terms(y, log_rate, offset, alpha, *, n_states: int, per_gene: bool = False):
    """``(n, K)``: each cell's count log-likelihood ``sum_g log NB(y_ig | k)`` in every state;
    with ``per_gene``, ``(n, K, G)``: each gene's term."""
    comps = []
    for k in range(n_states):
        mu = pt.exp(offset + log_rate[k])
        term = pm.logp(pm.NegativeBinomial.dist(mu=mu, alpha=alpha), y)
        comps.append(term if per_gene else term.sum(axis=-1))
    return pt.stack(comps, axis=-2 if per_gene else -1)


def joint_state_terms(value, means, precisions, log_w, log_rate, offset, alpha, *, d: int, n_states: int,
                      cell_shift=None):
    """``(n, K)``: a cell's log prior state probability plus the log density of its scores (the
    first ``d`` features) and counts in each state; their ``logsumexp`` is the cell's marginal
    (``cell_shift``: the ``(n, d)`` design offsets of the cells' means, or ``None``)."""
    from .graph import gaussian_log_densities

    x = value[..., :d]
    lx = gaussian_log_densities(x if cell_shift is None else x - cell_shift, means, precisions, n_states)
    return lx + count_state_terms(value[..., d:], log_rate, offset, alpha, n_states=n_states) + log_w


def _joint_logp(d: int, n_states: int, shifted: bool = False, cut: bool = False, marginal: bool = True):
    """The cell's log density: the joint (``logsumexp`` over its states of the scores' and counts'
    terms) or, with ``cut``, the scores' mixture density plus, per gene, the count's likelihood
    with the state integrated out over the fixed state probabilities ``r`` (the last input before
    ``cell_shift``), ``sum_g logsumexp_k(log r_k + log NB(y_g | k))``; with ``marginal=False``
    the counts' log-likelihood in each state weighted by ``r``."""
    def density(value, means, precisions, log_w, log_rate, offset, alpha, r=None, cell_shift=None):
        if not cut:
            return pt.logsumexp(joint_state_terms(value, means, precisions, log_w, log_rate, offset, alpha, d=d,
                                                  n_states=n_states, cell_shift=cell_shift), axis=-1)
        from .graph import gaussian_state_terms

        x = value[..., :d]
        lx = gaussian_state_terms(x, means, precisions, log_w, n_states, cell_shift)
        if marginal:
            terms = count_state_terms(value[..., d:], log_rate, offset, alpha, n_states=n_states, per_gene=True)
            # r = 0 (a state the cell cannot take) drops out of the sum, whatever its count term
            log_r = pt.switch(pt.gt(r, 0.0), pt.log(pt.maximum(r, 1e-300)), -np.inf)[..., None]
            return pt.logsumexp(lx, axis=-1) + pt.logsumexp(log_r + terms, axis=-2).sum(axis=-1)
        counts = count_state_terms(value[..., d:], log_rate, offset, alpha, n_states=n_states)
        # r = 0 (a state the cell cannot take) contributes nothing, whatever its count term
        weighted = pt.switch(pt.gt(r, 0.0), r * counts, 0.0).sum(axis=-1)
        return pt.logsumexp(lx, axis=-1) + weighted

    def logp(value, *params):
        # params: means, precisions, log_w, log_rate, offset, alpha, then r (cut), then cell_shift
        base, rest = params[:6], list(params[6:])
        r = rest.pop(0) if cut else None
        return density(value, *base, r, rest.pop(0) if shifted else None)

    return logp


def _joint_dist(d: int, shifted: bool = False, cut: bool = False):
    """The generative draw of a cell (the same with and without the cut: the cut changes what
    informs the states, not how cells are generated)."""
    def draw(means, precisions, log_w, log_rate, offset, alpha, cell_shift, size):
        n = offset.shape[0] if size is None or isinstance(size.type, NoneTypeT) else size[0]
        z = pm.Categorical.dist(logit_p=log_w, shape=(n,))
        chol = pt.linalg.cholesky(pt.linalg.inv(precisions))  # (K, d, d), Sigma_k = L L^T
        eps = pm.Normal.dist(0.0, 1.0, shape=(n, d))
        x = means[z] + (chol[z] @ eps[..., None])[..., 0]
        if cell_shift is not None:
            x = x + cell_shift
        y = pm.NegativeBinomial.dist(mu=pt.exp(offset + log_rate[z]), alpha=alpha)
        return pt.concatenate([x, pt.cast(y, "float64")], axis=-1)

    def dist(*params):
        # params: means, precisions, log_w, log_rate, offset, alpha, [r], [cell_shift], size
        base, rest, size = params[:6], list(params[6:-1]), params[-1]
        if cut:
            rest.pop(0)  # the cut's state probabilities play no part in generating a cell
        return draw(*base, rest.pop(0) if shifted else None, size)

    return dist


def cells_joint(name: str, *, means, precisions, log_weights, layer: dict, observed: np.ndarray, d: int,
                n_states: int, dims, cell_shift=None, state_probability=None,
                count_likelihood: str = "marginal") -> pt.TensorVariable:
    """Every cell's PCA scores and counts under one marginalised state (see the module docstring);
    ``log_weights`` is the ``(n, K)`` log prior state probability of each cell (``-inf`` for a
    state the cell may not take); ``cell_shift`` the ``(n, d)`` design offsets of the cells'
    state means (a graph with a design), else ``None``; ``state_probability`` the ``(n, K)``
    fixed state probabilities of the cut (the counts then do not inform the states), else
    ``None`` (the joint density); ``count_likelihood`` the cut's count density (``"marginal"``
    or ``"weighted"``, :func:`~scotgm_pp.models.build_model`)."""
    if count_likelihood not in COUNT_LIKELIHOODS:
        raise ValueError(f"count_likelihood must be one of {COUNT_LIKELIHOODS}, got {count_likelihood!r}.")
    cut = state_probability is not None
    inputs = [means, precisions, log_weights, layer["state_log_rate"], layer["cell_offset"], layer["alpha"]]
    signature = "(k,d),(k,d,d),(k),(k,g),(g),(g)"
    if cut:
        inputs.append(state_probability)
        signature += ",(k)"
    if cell_shift is not None:
        inputs.append(cell_shift)
        signature += ",(d)"
    shifted = cell_shift is not None
    return pm.CustomDist(
        name,
        *inputs,
        logp=_joint_logp(d, int(n_states), shifted=shifted, cut=cut, marginal=count_likelihood == "marginal"),
        dist=_joint_dist(d, shifted=shifted, cut=cut),
        signature=signature + "->(c)",
        observed=observed,
        dims=dims,
    )

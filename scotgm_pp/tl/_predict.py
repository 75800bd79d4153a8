"""In-silico response prediction: every gene's change when one gene changes, with a posterior band.

Three predictors, all linear in the perturbed gene's change ``Delta X_i`` (the form of the
paper's equation 5), ``Delta X_j = (r_j / r_i) Delta X_i`` with a gene-level response vector
``r``:

``"effect"`` (default)
    ``r`` is the count layer's perturbed-state effect ``delta`` of every gene, expressed as the
    change of the gene's mean log-normalised expression it implies (:func:`lognorm_change`),
    divided by the gene's scale. At the fitted change of gene ``i`` this *is* the model's
    gene-level answer for the perturbed state.
``"shift"``
    ``r = V_m (mu_1 - mu_0)``: the Gaussian states' mean difference mapped to genes.
``"paper"``
    Equation 5 as published: ``r = S'_{i.}`` with ``S' = V_m Sigma_p V_m^T``.

Which is the default was measured (``benchmarks/downstream_predictors.py --pap-seeds 40``), as
the share of known DE genes whose direction the prediction gets right (measured on 925e595: the
signature states and the marginal count likelihood):

=========  ====================================  ===========================================
method     simulated, seeds 0-9, 80 perturb.     Papalexi 60 vs 300, seeds 0-39, full-data
           (per-seed mean; worst perturbation)   DEGs (pooled; STAT1, JAK2, IFNGR2)
=========  ====================================  ===========================================
effect     0.990-1.000; 0.917                    0.959; 0.983, 0.957, 0.945
shift      0.979-1.000; 0.917                    0.912; 0.966, 0.891, 0.890
paper      0.875-0.927; 0.667                    0.695; 0.767, 0.717, 0.615
=========  ====================================  ===========================================

``"paper"`` regresses on the residual covariance of ``Z``, which under the transport coupling is
small and mostly estimation noise; it is kept for comparison.

The band comes from posterior draws of the parameters (:func:`scotgm_pp.tl._posterior.draw_posterior`):
each draw gives its own ``r`` (and, by default, its own ``Delta X_i``). Compute only.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import stats

from .._validation import InputError
from ._posterior import PERTURBED, PosteriorDraws, check_record, draw_posterior, gene_dispersion
from ._response import get_record

__all__ = ["predict_response", "observed_response", "response_draws", "lognorm_change", "get_record", "METHODS",
           "DEFAULT_METHOD"]

METHODS = ("effect", "shift", "paper")
DEFAULT_METHOD = "effect"
_LIBRARY_POINTS = slice(2, 50, 5)
"""Library-size quantiles (of the 51 kept) the log-normalised expectation averages over."""


def expected_lognorm(log_rate: np.ndarray, dispersion: np.ndarray, library_sizes: np.ndarray,
                     target_sum: float = 1e4, tol: float = 1e-7, chunk: int = 32) -> np.ndarray:
    """``E log1p(target_sum y / s)`` per gene, ``y ~ NB(s exp(log_rate), dispersion)``, averaged over ``s``.

    Exact sums over the counts up to the ``1 - tol`` quantile, genes in chunks of similar depth.
    """
    log_rate = np.asarray(log_rate, float)
    alpha = 1.0 / np.maximum(np.asarray(dispersion, float), 1e-8)
    s = np.asarray(library_sizes, float)
    p_min = alpha / (alpha + s.max() * np.exp(log_rate))
    top = stats.nbinom.ppf(1.0 - tol, alpha, p_min).astype(int) + 1
    order = np.argsort(top)
    out = np.empty(log_rate.size)
    for start in range(0, order.size, chunk):
        g = order[start:start + chunk]
        y = np.arange(int(top[g].max()) + 1)
        p = alpha[g, None] / (alpha[g, None] + s[None, :] * np.exp(log_rate[g])[:, None])  # (genes, s)
        pmf = stats.nbinom.pmf(y[None, None, :], alpha[g, None, None], p[:, :, None])
        out[g] = (pmf * np.log1p(target_sum * y[None, None, :] / s[None, :, None])).sum(axis=2).mean(axis=1)
    return out


def lognorm_change(record: dict, target_sum: float = 1e4) -> np.ndarray:
    """Per gene, the factor ``f`` turning the count layer's effect into a log-normalised change.

    ``f_j = [L_j(beta + delta) - L_j(beta)] / delta`` with ``L_j`` the expected log-normalised
    expression (:func:`expected_lognorm`, library sizes of the perturbed state); ``f`` is about 1
    for well-expressed genes and smaller for sparse ones, where ``log1p`` compresses changes.
    Where ``|delta| < 1e-3`` the derivative is used.
    """
    beta = np.asarray(record["count_beta"], float)
    delta = np.asarray(record["count_effect"], float)
    phi = gene_dispersion(record, PERTURBED)
    libs = np.asarray(record["library_quantiles"], float)[1][_LIBRARY_POINTS]
    step = np.where(np.abs(delta) < 1e-3, 1e-3, delta)
    base = expected_lognorm(beta, phi, libs, target_sum)
    return (expected_lognorm(beta + step, phi, libs, target_sum) - base) / step


def _gene_index(record: dict, perturbation: str, gene: str | None) -> tuple[int, str]:
    genes = np.asarray(record["genes"]).astype(str)
    if gene is None:
        if str(perturbation) not in set(genes):
            raise InputError(
                f"perturbation {perturbation!r} is not a measured gene, so its target is unknown; "
                "pass gene=<the perturbed gene> (one of the record's genes)."
            )
        gene = str(perturbation)
    where = np.flatnonzero(genes == str(gene))
    if where.size == 0:
        raise InputError(f"gene {gene!r} is not among the {len(genes)} genes kept for {perturbation!r}.")
    return int(where[0]), str(gene)


def _paper_rows(V: np.ndarray, cov: np.ndarray, i: int) -> np.ndarray:
    """Row ``i`` of ``S' = V cov V^T`` for each covariance in ``(..., d, d)``."""
    rows = np.einsum("gk,...kl,l->...g", V, cov, V[i])
    bad = ~(np.take(rows, i, axis=-1) > 0)
    if np.any(bad):
        raise InputError(
            f"the perturbation distribution has no variance along gene index {i} (S'_ii <= 0); "
            "equation 5 cannot propagate a change of that gene. Pick another gene or method."
        )
    return rows


def response_draws(record: dict, method: str, i: int, draws: PosteriorDraws | None = None,
                   factor: np.ndarray | None = None) -> np.ndarray:
    """Gene-level response vectors ``r`` (scaled units) of a method: ``(G,)`` at the fitted point,
    or ``(S, G)`` for posterior draws. ``factor``: :func:`lognorm_change` (computed when ``None``)."""
    V = np.asarray(record["loadings"], float)
    std = np.asarray(record["gene_std"], float)
    match method:
        case "effect":
            f = lognorm_change(record) if factor is None else factor
            eff = np.asarray(record["count_effect"], float) if draws is None else draws.effect
            return eff * f / std
        case "shift":
            mu_p = np.asarray(record["perturbation_mean"], float) if draws is None else draws.perturbation_mean
            return mu_p @ V.T
        case "paper":
            cov = np.asarray(record["perturbation_cov"], float) if draws is None else draws.perturbation_cov
            return _paper_rows(V, cov, i)
        case _:
            raise InputError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}.")


def _predict(record, method, i, r, delta, fitted_change):
    """``Delta X_j`` from response vectors ``r`` (``(G,)`` or ``(S, G)``)."""
    r_i = np.take(r, i, axis=-1)[..., None]
    if method == "paper":
        d_i = fitted_change if delta is None else delta
        return r / r_i * np.asarray(d_i)[..., None] if np.ndim(d_i) else r / r_i * d_i
    if delta is None:
        return r
    return r / np.where(r_i == 0, np.nan, r_i) * delta


def predict_response(
    adata: AnnData,
    perturbation: str,
    *,
    gene: str | None = None,
    delta: float | None = None,
    method: str = DEFAULT_METHOD,
    key: str = "scotgm",
    n_draws: int = 200,
    ci: float = 0.9,
    random_state: int | np.random.Generator | None = 0,
) -> pd.DataFrame:
    """Predict every gene's response to a change of one gene, with a band from posterior draws.

    ``Delta X_j = (r_j / r_i) Delta X_i`` for the method's response vector ``r`` (see the module
    docstring). At the default ``delta`` (the fitted change of gene ``i``) ``"effect"`` and
    ``"shift"`` return ``r`` itself, the model's response of every gene in the perturbed state.

    Parameters
    ----------
    adata
        Screen analysed by :func:`~scotgm_pp.tl.perturbation_response`.
    perturbation
        Which fitted perturbation.
    gene
        The perturbed gene ``i``; default the perturbation's label when it is a measured gene
        (its target), else required.
    delta
        ``Delta X_i`` in **scaled expression units** (standard deviations of the gene's
        log-normalised expression across the experiment's cells). Default: the fitted change of
        that gene under the method (``r_i``; for ``"paper"`` ``(V_m mu_p)_i``), redrawn with the
        parameters in the band. A given ``delta`` is divided by each draw's ``r_i``, so the band
        is wide when the perturbed gene's own response is uncertain.
    method
        ``"effect"`` (default; the best measured), ``"shift"`` or ``"paper"`` (equation 5).
    key
        ``adata.uns`` key of the results.
    n_draws
        Posterior draws for the band (0: point estimate only, band = point).
    ci
        Central probability of the band.
    random_state
        Seed or Generator.

    Returns
    -------
    pandas.DataFrame
        One row per gene: ``gene``, ``delta`` (point prediction at the fitted parameters, scaled
        units), ``lower``, ``upper`` (the ``ci`` band of the posterior draws), ``sd``,
        ``p_positive`` (share of draws above 0), ``coefficient`` (``r_j / r_i``), ``fitted_mu``
        (``(V_m mu_p)_j``), ``effect`` (the count layer's log fold change), and
        ``delta_lognorm``, ``lower_lognorm``, ``upper_lognorm`` (log-normalised units: scaled x
        ``gene_std``). ``.attrs``: ``perturbation``, ``gene``, ``method``, ``delta_i`` (scaled),
        ``units``, ``ci``, ``n_draws``.
    """
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), got {ci}.")
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}.")
    record = get_record(adata, perturbation, key)
    check_record(record)
    i, gene = _gene_index(record, perturbation, gene)
    genes = np.asarray(record["genes"]).astype(str)
    V = np.asarray(record["loadings"], float)
    std = np.asarray(record["gene_std"], float)
    fitted_mu = V @ np.asarray(record["perturbation_mean"], float)
    factor = lognorm_change(record) if method == "effect" else None

    r = response_draws(record, method, i, factor=factor)
    point = _predict(record, method, i, r, delta, fitted_mu[i])
    delta_i = float(point[i])
    coef = r / r[i] if r[i] != 0 else np.full_like(r, np.nan)
    if n_draws > 0:
        draws = draw_posterior(record, n_draws, np.random.default_rng(random_state))
        rd = response_draws(record, method, i, draws, factor)
        preds = _predict(record, method, i, rd, delta, draws.perturbation_mean @ V[i])
        a = (1 - ci) / 2
        lower, upper = np.nanquantile(preds, [a, 1 - a], axis=0)
        sd = np.nanstd(preds, axis=0, ddof=1) if n_draws > 1 else np.zeros(len(genes))
        p_pos = np.mean(preds > 0, axis=0)
    else:
        lower = upper = point.copy()
        sd = np.zeros(len(genes))
        p_pos = (point > 0).astype(float)
    df = pd.DataFrame({
        "gene": genes,
        "delta": point,
        "lower": lower,
        "upper": upper,
        "sd": sd,
        "p_positive": p_pos,
        "coefficient": coef,
        "fitted_mu": fitted_mu,
        "effect": np.asarray(record["count_effect"], float),
        "delta_lognorm": point * std,
        "lower_lognorm": lower * std,
        "upper_lognorm": upper * std,
    })
    df.attrs.update({"perturbation": str(perturbation), "gene": gene, "method": method, "delta_i": delta_i,
                     "units": "scaled expression (delta, lower, upper); log-normalised (*_lognorm)",
                     "ci": float(ci), "n_draws": int(n_draws)})
    return df


def observed_response(
    adata: AnnData,
    perturbation: str,
    *,
    key: str = "scotgm",
    cells: str = "all",
    layer: str | None = None,
    test: bool = True,
) -> pd.DataFrame:
    """Observed per-gene response of one perturbation: guide cells vs control cells.

    Both groups are log-normalised as in the fit (counts per ``target_sum`` over the record's
    genes, ``log1p``).

    Parameters
    ----------
    cells
        ``"all"`` guide cells, or ``"perturbed"`` (only those classified perturbed, from
        ``.obs[f"{key}_class"]``).
    test
        Add a two-sided Wilcoxon rank-sum test per gene with Benjamini-Hochberg adjustment.

    Returns
    -------
    pandas.DataFrame
        ``gene``, ``logfc`` (mean log-normalised guide minus control), ``scaled_change``
        (``logfc / gene_std``, the units of :func:`predict_response`'s ``delta``) and, with
        ``test``, ``pvalue`` and ``padj``.
    """
    from scipy.stats import false_discovery_control, mannwhitneyu

    from ._synthetic import gene_counts

    record = get_record(adata, perturbation, key)
    params = adata.uns[key]["params"]
    target_sum = float(params.get("preprocess", {}).get("target_sum", 1e4))
    labels = adata.obs[params["perturbation_key"]].astype(str).to_numpy()
    ctrl = np.flatnonzero(labels == params["control"])
    guide_mask = labels == str(perturbation)
    if cells == "perturbed":
        guide_mask &= adata.obs[f"{key}_class"].astype(str).to_numpy() == "perturbed"
    elif cells != "all":
        raise InputError(f"cells must be 'all' or 'perturbed', got {cells!r}.")
    guide = np.flatnonzero(guide_mask)
    genes = np.asarray(record["genes"]).astype(str)

    def lognorm(idx):
        c = gene_counts(adata, idx, genes, layer)
        lib = c.sum(axis=1, keepdims=True)
        lib[lib == 0] = 1.0
        return np.log1p(c / lib * target_sum)

    A, B = lognorm(guide), lognorm(ctrl)
    logfc = A.mean(axis=0) - B.mean(axis=0)
    df = pd.DataFrame({"gene": genes, "logfc": logfc, "scaled_change": logfc / np.asarray(record["gene_std"], float)})
    if test:
        p = mannwhitneyu(A, B, axis=0, alternative="two-sided").pvalue
        p = np.where(np.isfinite(p), p, 1.0)
        df["pvalue"] = p
        df["padj"] = false_discovery_control(p)
    return df

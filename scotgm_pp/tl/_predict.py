"""In-silico response prediction (equation 5 of sc-OTGM) with parameter uncertainty.

The perturbation distribution ``Z ~ N(mu_p, Sigma_p)`` fitted in PCA space maps to genes as
``S' = V_m Sigma_p V_m^T``. A change ``Delta X_i`` of one gene ``i`` propagates to every gene ``j``
by the Gaussian regression of equation 5::

    Delta X_j = (S'_ij / S'_ii) Delta X_i

Uncertainty comes from a parametric bootstrap of the fitted states: the state means and
covariances are redrawn from their sampling distributions given the cells behind them
(normal for the means, Wishart for the covariances), the coupling is recomputed for every draw
(closed form for ``"ot"``; for ``"hit_and_run"``/``"paper"`` the fitted transport plan
``K = L0^-1 C L1^-T`` is carried over to the redrawn covariances), and equation 5 is evaluated
per draw.

Compute only: nothing here plots or writes files.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy.linalg import solve_triangular
from scipy.stats import wishart

from .._validation import InputError
from ..inference.ot import ot_cross_covariance, perturbation_covariance
from ._response import get_record

__all__ = ["predict_response", "observed_response", "ParameterDraws", "draw_parameters", "get_record"]

BASAL, PERTURBED = 0, 1


def state_cell_counts(record: dict) -> tuple[float, float]:
    """Cells behind the basal state (controls + escaped guide cells) and the perturbed state."""
    n_c, n_g = float(record["n_control"]), float(record["n_guide"])
    f = float(record["fraction_perturbed"])
    return n_c + n_g * (1.0 - f), n_g * f


@dataclass
class ParameterDraws:
    """Bootstrap draws of the fitted parameters of one perturbation (PCA space).

    Attributes
    ----------
    means
        ``(n_draws, 2, m)`` state means (0 basal, 1 perturbed).
    covariances
        ``(n_draws, 2, m, m)`` state covariances.
    cross_covariance
        ``(n_draws, m, m)`` coupling cross-covariances ``C``.
    perturbation_mean, perturbation_cov
        ``mu_1 - mu_0`` and ``S0 + S1 - C - C^T`` per draw.
    """

    means: np.ndarray
    covariances: np.ndarray
    cross_covariance: np.ndarray
    perturbation_mean: np.ndarray
    perturbation_cov: np.ndarray

    @property
    def n_draws(self) -> int:
        return self.means.shape[0]


def _sym(S: np.ndarray) -> np.ndarray:
    return 0.5 * (S + S.T)


def _chol(S: np.ndarray) -> np.ndarray:
    S = _sym(S)
    jitter = 1e-10 * max(float(np.trace(S)) / len(S), 1e-300)
    return np.linalg.cholesky(S + jitter * np.eye(len(S)))


def _plan_kernel(S0: np.ndarray, S1: np.ndarray, C: np.ndarray) -> tuple[np.ndarray, tuple]:
    """``K`` with ``C = L0 K L1^T`` (the coupling's plan in whitened coordinates)."""
    L0, L1 = _chol(S0), _chol(S1)
    K = solve_triangular(L0, C, lower=True)
    K = solve_triangular(L1, K.T, lower=True).T
    return K, (L0, L1)


def draw_parameters(
    record: dict,
    n_draws: int,
    rng: np.random.Generator,
    *,
    include_point: bool = False,
) -> ParameterDraws:
    """Parametric bootstrap of a fitted record's states and coupling.

    ``mu_k* ~ N(mu_k, S_k / n_k)`` and ``S_k* ~ Wishart(n_k - 1, S_k / (n_k - 1))`` with ``n_k`` the
    cells behind state ``k`` (:func:`state_cell_counts`); the coupling is recomputed per draw.
    With ``include_point`` the first draw is the fitted point itself.
    """
    if n_draws < 1:
        raise ValueError(f"n_draws must be >= 1, got {n_draws}.")
    means = np.asarray(record["means"], float)
    covs = np.asarray(record["covariances"], float)
    C_fit = np.asarray(record["cross_covariance"], float)
    coupling = str(record.get("coupling", "ot"))
    m = means.shape[1]
    counts = state_cell_counts(record)
    K_fit = None
    if coupling not in ("ot", "independent"):
        K_fit, _ = _plan_kernel(covs[BASAL], covs[PERTURBED], C_fit)
    out_mu = np.empty((n_draws, 2, m))
    out_S = np.empty((n_draws, 2, m, m))
    out_C = np.empty((n_draws, m, m))
    for d in range(n_draws):
        if include_point and d == 0:
            out_mu[d], out_S[d], out_C[d] = means, covs, C_fit
            continue
        for k in (BASAL, PERTURBED):
            n_k = max(counts[k], 2.0)
            dof = max(n_k - 1.0, m + 1.0)
            S = _sym(covs[k])
            out_S[d, k] = _sym(wishart.rvs(df=dof, scale=S / dof, random_state=rng)) if m > 1 else (
                S * rng.chisquare(dof) / dof
            )
            out_mu[d, k] = rng.multivariate_normal(means[k], S / n_k, method="cholesky")
        S0, S1 = out_S[d, BASAL], out_S[d, PERTURBED]
        match coupling:
            case "independent":
                out_C[d] = 0.0
            case "ot":
                out_C[d] = ot_cross_covariance(S0, S1)
            case _:
                out_C[d] = _chol(S0) @ K_fit @ _chol(S1).T
    mu_p = out_mu[:, PERTURBED] - out_mu[:, BASAL]
    cov_p = np.stack([
        perturbation_covariance(out_S[d, BASAL], out_S[d, PERTURBED], out_C[d]) for d in range(n_draws)
    ])
    return ParameterDraws(out_mu, out_S, out_C, mu_p, cov_p)


def response_coefficients(loadings: np.ndarray, cov: np.ndarray, i: int) -> tuple[np.ndarray, float]:
    """Row ``i`` of ``S' = V Sigma_p V^T`` divided by its diagonal: ``S'_ij / S'_ii`` for every ``j``."""
    V = np.asarray(loadings, float)
    row = V @ (cov @ V[i])
    s_ii = float(row[i])
    if not np.isfinite(s_ii) or s_ii <= 0:
        raise InputError(
            f"the perturbation distribution has no variance along gene index {i} (S'_ii = {s_ii:.3g}); "
            "equation 5 cannot propagate a change of that gene. Pick another gene."
        )
    return row / s_ii, s_ii


def predict_response(
    adata: AnnData,
    perturbation: str,
    *,
    gene: str | None = None,
    delta: float | None = None,
    key: str = "scotgm",
    n_draws: int = 200,
    ci: float = 0.9,
    random_state: int | np.random.Generator | None = 0,
) -> pd.DataFrame:
    """Predict every gene's response to a change of one gene (equation 5), with an uncertainty band.

    ``Delta X_j = (S'_ij / S'_ii) Delta X_i`` with ``S' = V_m Sigma_p V_m^T`` (``V_m`` the loadings,
    ``Sigma_p`` the fitted perturbation covariance).

    Parameters
    ----------
    adata
        Screen analysed by :func:`~scotgm_pp.tl.perturbation_response`.
    perturbation
        Which fitted perturbation's distribution to use.
    gene
        The perturbed gene ``i``; default the perturbation's label when it is a measured gene
        (its target), else required.
    delta
        ``Delta X_i`` in **scaled expression units** (standard deviations of the gene's
        log-normalised expression across the experiment's cells). Default: the fitted change of
        that gene, ``mu_i = (V_m (mu_1 - mu_0))_i``, redrawn with the parameters in the band.
    key
        ``adata.uns`` key of the results.
    n_draws
        Parametric bootstrap draws for the band (0: point estimate only, band = point).
    ci
        Central probability of the band.
    random_state
        Seed or Generator.

    Returns
    -------
    pandas.DataFrame
        One row per gene: ``gene``, ``delta`` (point prediction, scaled units), ``lower``, ``upper``
        (the ``ci`` band, scaled units), ``sd`` (bootstrap standard deviation), ``p_positive``
        (share of draws above 0), ``coefficient`` (``S'_ij / S'_ii``), ``fitted_mu`` (the fitted
        gene-level mean ``(V_m mu_p)_j``, for comparison), and ``delta_lognorm``, ``lower_lognorm``,
        ``upper_lognorm`` (the same in log-normalised units: scaled x ``gene_std``).
        ``.attrs`` holds ``perturbation``, ``gene``, ``delta_i`` (scaled) and ``units``.
    """
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), got {ci}.")
    record = get_record(adata, perturbation, key)
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
    i = int(where[0])
    V = np.asarray(record["loadings"], float)
    std = np.asarray(record["gene_std"], float)
    mu_p = np.asarray(record["perturbation_mean"], float)
    cov_p = np.asarray(record["perturbation_cov"], float)

    coef, _ = response_coefficients(V, cov_p, i)
    fitted_mu = V @ mu_p
    delta_i = float(fitted_mu[i]) if delta is None else float(delta)
    point = coef * delta_i

    rng = np.random.default_rng(random_state)
    if n_draws > 0:
        draws = draw_parameters(record, n_draws, rng)
        preds = np.empty((n_draws, len(genes)))
        for d in range(n_draws):
            c_d, _ = response_coefficients(V, draws.perturbation_cov[d], i)
            d_i = float(V[i] @ draws.perturbation_mean[d]) if delta is None else delta_i
            preds[d] = c_d * d_i
        a = (1 - ci) / 2
        lower, upper = np.quantile(preds, [a, 1 - a], axis=0)
        sd = preds.std(axis=0, ddof=1) if n_draws > 1 else np.zeros(len(genes))
        p_pos = (preds > 0).mean(axis=0)
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
        "delta_lognorm": point * std,
        "lower_lognorm": lower * std,
        "upper_lognorm": upper * std,
    })
    df.attrs.update({"perturbation": str(perturbation), "gene": str(gene), "delta_i": delta_i,
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

    from ._synthetic import _gene_counts

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
        c = _gene_counts(adata, idx, genes, layer)
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

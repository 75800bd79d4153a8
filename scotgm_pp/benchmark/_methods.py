"""Ranking methods compared by the benchmark, all on the same cells of one experiment.

A method is a callable ``method(pair) -> pd.Series`` of per-gene scores indexed by gene name,
where a *negative* score means lower expression in the guide cells than in the controls (so
the most negative score is the strongest knock-down candidate, and ``|score|`` orders genes by
response strength).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scanpy as sc
from anndata import AnnData
from scipy import stats

from ..pp import PreprocessParams, normalize_log
from ..tl import COUPLINGS, analyse_pair
from ..tl._core import DEFAULT_STATE_SPACE, STATE_SPACES
from ..tl._counts import _dense as dense
from ..tl._counts import bound_order_score, count_shift

__all__ = [
    "Pair",
    "make_pair",
    "scanpy_method",
    "logfc_method",
    "van_elteren_method",
    "nb_all_guides_method",
    "scotgm_method",
    "resolve_methods",
    "DEFAULT_METHODS",
    "DEFAULT_SCOTGM",
    "SCOTGM_SCORES",
]

DEFAULT_SCOTGM = "scotgm-ot:effect_shrunk"
"""The row of the package's default configuration (``analyse_pair`` defaults: ot coupling,
escape model, genes ranked by the count layer's perturbed-state effect shrunk by empirical Bayes,
``rank_by="effect_shrunk"``)."""

DEFAULT_METHODS = ("scotgm-ot:effect_shrunk", "scotgm-ot:effect_bound", "nb-all-guides", "scotgm-ot:mu_sigma", "scotgm-independent:mu_sigma",
                   "scotgm-ot:state_shift", "t-test", "wilcoxon", "van-elteren", "logfc")
"""Fast methods run by default; ``scotgm-hit_and_run`` and ``scotgm-paper`` are opt-in (slow)."""

SCOTGM_SCORES = ("effect_bound", "effect_shrunk", "mu_sigma", "state_t", "state_shift")
"""What a ``scotgm-<coupling>:<score>`` row ranks by: the count layer's perturbed-state effect
bound, its empirical-Bayes posterior mean, the paper's ``mu / sigma`` (also the bare
``scotgm-<coupling>``), and two gene-space statistics of the fitted states. The count layer's
scores take a suffix ``_weighted`` (``scotgm-ot:effect_shrunk_weighted``): the same score with
``analyse_pair(..., count_likelihood="weighted")`` in place of the default marginal likelihood."""

WEIGHTED_SUFFIX = "_weighted"
_COUNT_SCORES = ("effect_bound", "effect_shrunk")


def _split_score(score: str) -> tuple[str, str]:
    """``(score, count_likelihood)`` of a score name with the optional ``_weighted`` suffix."""
    if score.endswith(WEIGHTED_SUFFIX) and score[: -len(WEIGHTED_SUFFIX)] in _COUNT_SCORES:
        return score[: -len(WEIGHTED_SUFFIX)], "weighted"
    return score, "marginal"

_RENAMED = {
    "lfc_bound": "the model-free NB test of all guide cells is now the row 'nb-all-guides' (it does not use "
                 "sc-OTGM); the model's effect is 'scotgm-<coupling>:effect_bound'",
    "model": "the paper's mu / sigma is 'scotgm-<coupling>:mu_sigma' (or bare 'scotgm-<coupling>')",
}


@dataclass
class Pair:
    """One experiment: raw counts of the drawn control + guide cells and their log-normalised copy."""

    counts: AnnData
    is_control: np.ndarray
    lognorm: AnnData
    seed: int
    params: PreprocessParams
    batch: np.ndarray | None = None
    cache: dict = field(default_factory=dict)

    @property
    def lognorm_is_control(self) -> np.ndarray:
        kept = self.counts.obs_names.get_indexer(self.lognorm.obs_names)
        return self.is_control[kept]


def make_pair(counts: AnnData, is_control: np.ndarray, seed: int, params: PreprocessParams,
              batch: np.ndarray | None = None) -> Pair:
    """Log-normalise (with :func:`scotgm_pp.pp.normalize_log`) once for every baseline.

    ``batch``: optional stratum label per cell of ``counts`` (used by the methods that can)."""
    lognorm, _ = normalize_log(counts, params)
    return Pair(counts=counts, is_control=np.asarray(is_control, bool), lognorm=lognorm, seed=int(seed),
                params=params, batch=None if batch is None else np.asarray(batch).astype(str))


def scanpy_method(test: str) -> Callable[[Pair], pd.Series]:
    """``sc.tl.rank_genes_groups`` of the guide cells against the control reference.

    ``test`` is a scanpy method (``"t-test"``: Welch, ``"wilcoxon"``: Mann-Whitney). The score is
    scanpy's statistic (negative when lower in the guide cells).
    """

    def run(pair: Pair) -> pd.Series:
        ad = pair.lognorm.copy()
        ad.obs["bench_group"] = pd.Categorical(
            np.where(pair.lognorm_is_control, "control", "guide"), categories=["control", "guide"]
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sc.tl.rank_genes_groups(ad, "bench_group", groups=["guide"], reference="control", method=test,
                                    n_genes=ad.n_vars, use_raw=False, key_added="bench")
        df = sc.get.rank_genes_groups_df(ad, group="guide", key="bench")
        return pd.Series(df["scores"].to_numpy(float), index=df["names"].astype(str).to_numpy())

    run.__name__ = f"scanpy_{test}"
    return run


def logfc_method(pair: Pair) -> pd.Series:
    """Difference of mean log-normalised expression, guide minus control."""
    X = pair.lognorm.X
    c = pair.lognorm_is_control
    diff = np.asarray(X[~c].mean(axis=0)).ravel() - np.asarray(X[c].mean(axis=0)).ravel()
    return pd.Series(diff.astype(float), index=pair.lognorm.var_names.astype(str))


def van_elteren_method(pair: Pair) -> pd.Series:
    """Stratified Mann-Whitney (van Elteren) z of guide against control cells, log-normalised values.

    Within each batch of ``pair.batch`` the Mann-Whitney U (ties: mid-ranks) is centred and
    weighted by ``1 / (n + 1)``; the weighted sum is divided by its null standard deviation (with
    the tie correction). Without batches it is the tie-corrected Mann-Whitney z, scanpy's
    ``wilcoxon`` score. A baseline that uses the batches as the count layer does.
    """
    X = dense(pair.lognorm.X)
    c = pair.lognorm_is_control
    if pair.batch is None:
        strata = np.zeros(len(c), dtype=int)
    else:
        kept = pair.counts.obs_names.get_indexer(pair.lognorm.obs_names)
        strata = pd.factorize(pair.batch[kept])[0]
    num = np.zeros(X.shape[1])
    var = np.zeros(X.shape[1])
    for s_ in np.unique(strata):
        m = strata == s_
        Xm, cm = X[m], c[m]
        n1, n0 = int((~cm).sum()), int(cm.sum())
        if n1 == 0 or n0 == 0:
            continue
        n = n0 + n1
        r = stats.rankdata(Xm, axis=0)
        u = r[~cm].sum(axis=0) - n1 * (n1 + 1) / 2.0
        ties = np.array([_tie_sum(col) for col in Xm.T])
        v = n0 * n1 / 12.0 * ((n + 1) - ties / (n * (n - 1)))
        w = 1.0 / (n + 1)
        num += w * (u - n0 * n1 / 2.0)
        var += w**2 * v
    z = np.where(var > 0, num / np.sqrt(np.where(var > 0, var, 1.0)), 0.0)
    return pd.Series(z, index=pair.lognorm.var_names.astype(str))


def _tie_sum(col: np.ndarray) -> float:
    t = np.unique(col, return_counts=True)[1].astype(float)
    return float((t**3 - t).sum())


def _effect_bound(genes: pd.DataFrame) -> pd.Series:
    """The ranking ``rank_by="effect_bound"`` as one sortable number per gene."""
    return pd.Series(bound_order_score(genes["effect_bound"], genes["effect_z"]),
                     index=genes["gene"].astype(str).to_numpy())


def nb_all_guides_method(pair: Pair) -> pd.Series:
    """Model-free NB test of every guide cell against the controls (:func:`scotgm_pp.tl.count_shift`).

    The natural-log fold change with the cell's total count as offset, a moment dispersion and
    its standard error, bounded at ``sqrt(2 ln G)`` standard errors, ties by its z (stratified
    by ``pair.batch`` when given); on the cells and genes the preprocessing keeps. It uses no
    state, no PCA and no sc-OTGM: the package's default before issue 11, kept as a baseline.
    """
    ln = pair.lognorm
    rows = pair.counts.obs_names.get_indexer(ln.obs_names)
    cols = pair.counts.var_names.get_indexer(ln.var_names)
    y = pair.counts.X[rows][:, cols]
    b = None if pair.batch is None else pair.batch[rows]
    tab = count_shift(y, pair.lognorm_is_control, batch=b)
    return pd.Series(bound_order_score(tab["lfc_bound"], tab["lfc_z"]), index=ln.var_names.astype(str))


def _state_stats(pair: Pair, p: pd.Series):
    ln = pair.lognorm
    X = dense(ln.X)
    w1 = p.reindex(ln.obs_names).fillna(0.0).to_numpy(float)
    out = []
    for w in (1.0 - w1, w1):
        n = w.sum()
        m = (w @ X) / max(n, 1e-12)
        v = (w @ (X - m) ** 2) / max(n - 1.0, 1.0)
        out.append((n, m, v))
    return out


def _state_shift(pair: Pair, p: pd.Series) -> pd.Series:
    """Gene-space shift of the fitted perturbed state from the basal state, in log-normalised units.

    The M-step mean of each gene given the model's state posteriors: guide cells weighted by
    ``p_perturbed`` (perturbed) and ``1 - p_perturbed`` (basal, with the controls). Unlike the
    model score it is not limited to the variation the kept PCs carry, so a gene-specific
    knock-down is not lost in the projection.
    """
    (_, m0, _), (_, m1, _) = _state_stats(pair, p)
    return pd.Series(m1 - m0, index=pair.lognorm.var_names.astype(str))


def _state_t(pair: Pair, p: pd.Series) -> pd.Series:
    """Gene-space Welch statistic of the model's perturbed state against the basal state.

    Each guide cell enters the perturbed group with weight ``p_perturbed`` and the basal group
    with ``1 - p_perturbed``; controls are basal. With weighted means and variances, the
    statistic is ``(m_1 - m_0) / sqrt(v_1 / n_1 + v_0 / n_0)`` (``n_k`` the total weights).
    """
    (n0, m0, v0), (n1, m1, v1) = _state_stats(pair, p)
    se = np.sqrt(v1 / max(n1, 1e-12) + v0 / max(n0, 1e-12))
    se = np.maximum(se, 1e-8 * max(float(se.max(initial=0.0)), 1e-300))
    return pd.Series((m1 - m0) / se, index=pair.lognorm.var_names.astype(str))


def scotgm_method(
    coupling: str = "ot",
    *,
    escape_model: bool = True,
    params: PreprocessParams | None = None,
    regularization: float = 0.01,
    score: str = "effect_shrunk",
    coupling_kwargs: dict | None = None,
    state_space: str = DEFAULT_STATE_SPACE,
    count_likelihood: str = "marginal",
) -> Callable[[Pair], pd.Series]:
    """sc-OTGM on the pair through :func:`scotgm_pp.tl.analyse_pair` (fitted once per pair and coupling).

    Parameters
    ----------
    coupling, escape_model, regularization, coupling_kwargs, state_space
        Passed to ``analyse_pair``.
    params
        Preprocessing; the pair's (benchmark-wide) params when None.
    score
        ``"effect_bound"``: the count layer's perturbed-state effect bounded
        at ``sqrt(2 ln G)`` standard errors (``genes["effect_bound"]``, ties by ``effect_z``;
        batch offsets from ``pair.batch`` when given).
        ``"effect_shrunk"``: the package default, the empirical-Bayes posterior mean of that
        effect (no ties; :func:`scotgm_pp.tl.effect_table`).
        ``"mu_sigma"``: the paper's standardised shift ``mu / sigma`` (``genes["score"]``).
        ``"state_shift"``: the gene-space mean shift of the fitted perturbed state from the basal
        state, in log-normalised units (see ``_state_shift``).
        ``"state_t"``: the Welch statistic of the fitted perturbed state against the basal state
        in gene space, cells weighted by their posterior ``p_perturbed`` (see ``_state_t``).
        ``"effect_bound_weighted"`` / ``"effect_shrunk_weighted"``: those with
        ``count_likelihood="weighted"``.
    count_likelihood
        Passed to ``analyse_pair`` (``"marginal"``, the default, or ``"weighted"``).
    """
    name = score
    score, likelihood = _split_score(score)
    if likelihood == "weighted":
        count_likelihood = likelihood
    if coupling not in COUPLINGS:
        raise ValueError(f"unknown coupling {coupling!r}; choose one of {', '.join(COUPLINGS)}.")
    if score in _RENAMED:
        raise ValueError(f"score {score!r} was renamed: {_RENAMED[score]}.")
    if score not in SCOTGM_SCORES:
        raise ValueError(f"unknown score {score!r}; choose one of {', '.join(SCOTGM_SCORES)}.")
    if state_space not in STATE_SPACES:
        raise ValueError(f"unknown state_space {state_space!r}; choose one of {', '.join(STATE_SPACES)}.")

    def run(pair: Pair) -> pd.Series:
        prm = params or pair.params
        key = ("scotgm", coupling, escape_model, prm, regularization, repr(coupling_kwargs), state_space,
               count_likelihood)
        if key not in pair.cache:
            pair.cache[key] = analyse_pair(pair.counts, pair.is_control, params=prm, coupling=coupling,
                                           escape_model=escape_model, regularization=regularization,
                                           random_state=pair.seed, coupling_kwargs=coupling_kwargs,
                                           batch=pair.batch, baseline=False, state_space=state_space,
                                           count_likelihood=count_likelihood)
        _, genes, p = pair.cache[key]
        if score == "effect_bound":
            return _effect_bound(genes)
        if score == "effect_shrunk":
            return pd.Series(genes["effect_shrunk"].to_numpy(float), index=genes["gene"].astype(str).to_numpy())
        if score == "state_t":
            return _state_t(pair, p)
        if score == "state_shift":
            return _state_shift(pair, p)
        return pd.Series(genes["score"].to_numpy(float), index=genes["gene"].astype(str).to_numpy())

    if count_likelihood == "weighted" and not name.endswith(WEIGHTED_SUFFIX):
        name += WEIGHTED_SUFFIX  # the name says which likelihood however it was asked for
    run.__name__ = f"scotgm_{coupling}_{name}" + ("" if state_space == DEFAULT_STATE_SPACE else f"_{state_space}")
    return run


def resolve_methods(methods) -> dict[str, Callable[[Pair], pd.Series]]:
    """Method names (``scotgm-<coupling>[:<score>][@<state_space>]``, ``nb-all-guides``, ``t-test``,
    ``wilcoxon``, ``van-elteren``, ``logfc``) or a mapping name -> callable, to a mapping name ->
    callable. ``None``: :data:`DEFAULT_METHODS`. A bare ``scotgm-<coupling>`` ranks by the paper's
    ``mu / sigma``; ``@pca`` fits the states on the PCA scores instead of the signature."""
    if methods is None:
        methods = DEFAULT_METHODS
    if isinstance(methods, dict):
        return dict(methods)
    out = {}
    for name in methods:
        if callable(name):
            out[getattr(name, "__name__", str(name))] = name
        elif name in ("t-test", "wilcoxon"):
            out[name] = scanpy_method(name)
        elif name == "logfc":
            out[name] = logfc_method
        elif name == "van-elteren":
            out[name] = van_elteren_method
        elif name == "nb-all-guides":
            out[name] = nb_all_guides_method
        elif isinstance(name, str) and name.startswith("scotgm-"):
            spec, _, space = name[len("scotgm-"):].partition("@")
            coupling, _, score = spec.partition(":")
            if score in _RENAMED:
                raise ValueError(f"method {name!r} was renamed: {_RENAMED[score]}.")
            if coupling not in COUPLINGS or (score and _split_score(score)[0] not in SCOTGM_SCORES) or (
                    space and space not in STATE_SPACES):
                raise ValueError(f"unknown method {name!r}; scotgm methods are scotgm-<coupling>[:<score>][@<space>] "
                                 f"with coupling in {COUPLINGS}, score in {SCOTGM_SCORES} (effect_bound and "
                                 f"effect_shrunk also with the suffix {WEIGHTED_SUFFIX}) and space in {STATE_SPACES}.")
            out[name] = scotgm_method(coupling, score=score or "mu_sigma", state_space=space or DEFAULT_STATE_SPACE)
        else:
            valid = ["nb-all-guides", "t-test", "wilcoxon", "van-elteren", "logfc"] + [
                f"scotgm-{c}[:<score>]" for c in COUPLINGS]
            raise ValueError(f"unknown method {name!r}; choose from {', '.join(valid)} or pass callables.")
    return out

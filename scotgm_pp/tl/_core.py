"""Pure per-experiment math: states, coupling, perturbation distribution, gene statistics.

Everything here takes arrays for one experiment (control cells, guide cells) and returns
arrays; the AnnData-aware driver in :mod:`scotgm_pp.tl._response` maps it over perturbations.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..inference.em import EMResult, default_prior, fit_em, free_responsibilities
from ..inference.joint_em import conditional_full_m_step
from ..inference.ot import ot_cross_covariance, perturbation_covariance
from ..pp import ks_check
from ._counts import bound_order_score

__all__ = [
    "COUPLINGS",
    "STATE_SPACES",
    "DEFAULT_STATE_SPACE",
    "PerturbationFit",
    "StateFit",
    "fit_states",
    "states_from_signature",
    "couple",
    "fit_perturbation",
    "gene_statistics",
    "unpinned_posterior",
    "state_shift",
    "RANK_BY",
    "DEFAULT_RANK_BY",
    "resolve_rank_by",
]

RANK_BY = ("effect_bound", "effect_shrunk", "lfc_all_guides_bound", "shift", "score", "lfc_bound")
"""Gene rankings: the model's perturbed-state effect bound, its empirical-Bayes posterior mean
(the default since issue 25: no ties), the model-free NB test of all guide cells, the gene-space state shift, the paper's
``mu / sigma``; ``"lfc_bound"`` is the former name of ``"lfc_all_guides_bound"``, still accepted."""

DEFAULT_RANK_BY = "effect_shrunk"

_RANK_ALIASES = {"lfc_bound": "lfc_all_guides_bound"}
"""Former names still accepted."""

COUPLINGS = ("independent", "ot", "hit_and_run", "paper")
STATE_SPACES = ("signature", "pca")
"""Where the state model looks for the perturbation: the cross-fitted perturbation signature
(default, :mod:`scotgm_pp.tl._signature`) or the experiment's PCA scores (the paper's)."""
DEFAULT_STATE_SPACE = "signature"
BASAL, PERTURBED = 0, 1


@dataclass
class StateFit:
    """States of one experiment: a converged MAP of one declared Gaussian graph, and the per-state
    covariances the transport coupling uses.

    Attributes
    ----------
    em
        EM of the state model: its weights, means, covariances, responsibilities and its own
        ``logp_trace`` / ``n_iter`` / ``converged`` (``build_model(features, ...,
        covariance=em.covariance)`` with ``fixed_state=em.fixed_state`` is the graph).
    means, covariances
        State means ``(K, d)`` and per-state covariances ``(K, d, d)`` in the experiment's PCA
        space, for the coupling and the paper's gene statistics: the full-covariance model's
        M-step given the state model's converged responsibilities (:func:`conditional_full_m_step`);
        with the PCA state model these means equal ``em.means``.
    features
        The state model's observed cells x features: the signature score (``state_space
        "signature"``) or the PCA scores (``"pca"``).
    info
        Record of how the states were found: ``state_space``, ``state_model`` (``"tied"`` or
        ``"pinned"``), ``coupling_covariances``, ``escape_model`` (``"on"``, ``"off"`` or
        ``"fallback: <why>"``), ``escape_fraction_perturbed`` (the tied model's perturbed share of
        the guide cells, NaN when it was not fitted) and the evidence that a perturbed state
        exists (the signature's KS test, or the number of separating PCs).
    """

    em: EMResult
    means: np.ndarray
    covariances: np.ndarray
    features: np.ndarray | None = None
    info: dict = field(default_factory=dict)

    @property
    def responsibilities(self) -> np.ndarray:
        return self.em.responsibilities


@dataclass
class PerturbationFit:
    """The perturbation distribution of one experiment in PCA space.

    ``Z = Y - X ~ N(mean, cov)`` with ``mean = mu_1 - mu_0`` and
    ``cov = Sigma_0 + Sigma_1 - C - C^T`` for the coupling's cross-covariance ``C`` (the
    per-state covariances are ``states.covariances``).
    """

    states: StateFit
    coupling: str
    cross_covariance: np.ndarray
    mean: np.ndarray
    cov: np.ndarray
    p_perturbed: np.ndarray
    coupling_info: dict = field(default_factory=dict)

    @property
    def em(self) -> EMResult:
        """EM of the state model (see :class:`StateFit`)."""
        return self.states.em

    @property
    def state_info(self) -> dict:
        return self.states.info

    @property
    def mu_basal(self) -> np.ndarray:
        return self.states.means[BASAL]

    @property
    def mu_perturbed(self) -> np.ndarray:
        return self.states.means[PERTURBED]

    @property
    def cov_basal(self) -> np.ndarray:
        return self.states.covariances[BASAL]

    @property
    def cov_perturbed(self) -> np.ndarray:
        return self.states.covariances[PERTURBED]


MIN_PERTURBED_FRACTION = 0.1
"""Below this posterior share of the guide cells (or fewer than 10 cells), the perturbed state of
the escape model is an outlier group rather than a perturbation, and every guide cell is
treated as perturbed instead."""

KS_ALPHA = 0.05
"""The escape model needs at least one PC whose guide-cell scores differ from the controls'
(Algorithm 2's two-sample KS test, Benjamini-Hochberg adjusted p below this)."""


def fit_states(
    scores: np.ndarray,
    is_control: np.ndarray,
    *,
    escape_model: bool = True,
    regularization: float = 0.01,
    em_regularization: str = "map",
    max_iter: int = 500,
    tol: float = 1e-10,
    random_state=None,
) -> StateFit:
    """Two-state fit of one experiment: which guide cells are perturbed, and the state parameters.

    Controls are pinned to the basal state. With ``escape_model`` the state model is the
    tied-covariance graph (``build_model(scores, fixed_state=..., covariance="tied")``): one
    shared covariance, so the states differ only by a mean shift and the perturbed state is the
    guide cells' common displacement from the controls (the perturbation signature, as in
    Mixscape's discriminant), not whatever sub-population the guide cells contain. Its EM runs to
    convergence (relative change ``tol``; the tied likelihood has long plateaus) and its
    responsibilities are the state posteriors; the coupling's per-state covariances are then the
    full-covariance M-step given them.

    The escape model needs a perturbation to classify by: if no PC separates the guide cells
    from the controls (Algorithm 2's KS check, :data:`KS_ALPHA`), a two-state split of the guide
    cells can only find a sub-population, so it is not fitted; nor is it kept if its perturbed
    state holds less than :data:`MIN_PERTURBED_FRACTION` of the guide cells or fewer than 10
    cells. In those cases, and without ``escape_model``, the state model is the graph with
    every guide cell pinned to the perturbed state and full covariances (closed form). Only the
    PCA scores inform the states (``benchmarks/count_layer_evidence.py``).

    ``random_state`` is accepted for a uniform interface; both fits start deterministically.

    Returns
    -------
    StateFit
    """
    is_control = np.asarray(is_control, bool)
    prior = default_prior(scores, 2, regularization=regularization)
    n_guide = int((~is_control).sum())
    n_separating = int((ks_check(scores, is_control)["ks_shift_padj"] < KS_ALPHA).sum())
    info = {"state_space": "pca", "escape_model": "off", "escape_separating_pcs": n_separating,
            "escape_fraction_perturbed": np.nan}
    if escape_model and n_separating == 0:
        info["escape_model"] = "fallback: no PC separates the guide cells from the controls, all treated as perturbed"
    elif escape_model:
        tied = fit_em(scores, fixed_state=np.where(is_control, BASAL, -1).astype(int), n_states=2, prior=prior,
                      covariance="tied", regularization=em_regularization, max_iter=max_iter, tol=tol)
        mass = float(tied.responsibilities[~is_control, PERTURBED].sum())
        info.update(escape_model="on", escape_fraction_perturbed=mass / max(n_guide, 1))
        if mass >= max(MIN_PERTURBED_FRACTION * n_guide, 10):
            means, covs = conditional_full_m_step(scores, tied.responsibilities, prior, em_regularization)
            info.update(state_model="tied", coupling_covariances="full-covariance M-step given the state posteriors")
            return StateFit(em=tied, means=means, covariances=covs, features=scores, info=info)
        info["escape_model"] = FALLBACK_TOO_SMALL
    pinned = fit_em(scores, fixed_state=np.where(is_control, BASAL, PERTURBED).astype(int), n_states=2, prior=prior,
                    regularization=em_regularization, max_iter=max_iter, tol=tol)
    info.update(state_model="pinned", coupling_covariances="state model")
    return StateFit(em=pinned, means=pinned.means, covariances=pinned.covariances, features=scores, info=info)


FALLBACK_TOO_SMALL = "fallback: perturbed state too small, all guide cells treated as perturbed"
FALLBACK_NO_SIGNATURE = ("fallback: the guide cells do not differ from the controls (signature split-half and "
                         "any-effect tests, p >= 0.05), all treated as perturbed")


def states_from_signature(
    signature,
    scores: np.ndarray,
    is_control: np.ndarray,
    *,
    regularization: float = 0.01,
    em_regularization: str = "map",
    max_iter: int = 500,
    tol: float = 1e-10,
    any_effect_pvalue: float | None = None,
) -> StateFit:
    """The experiment's states from its signature (:func:`~scotgm_pp.tl._signature.fit_signature_states`).

    The state model is the two-state graph on the signature score (tied covariance, controls
    pinned basal) at its converged MAP. It is kept when the guide cells differ from the controls
    (p below :data:`KS_ALPHA`: the guide cells hold a perturbed state) and its perturbed state
    holds at least :data:`MIN_PERTURBED_FRACTION` of the
    guide cells and 10 cells; otherwise every guide cell is pinned to the perturbed state (the
    graph on the same score with no free cell), and ``info["escape_model"]`` says why. Either
    way the PCA-space means and per-state covariances (for the coupling and the paper's
    ``mu`` / ``sigma``) are the full-covariance M-step on ``scores`` given the states' posteriors.

    The p-value is the signature's exact split-half test
    (:func:`~scotgm_pp.tl._signature.split_half_test`) or, with ``any_effect_pvalue`` (the calls'
    resampling test of the largest gene-level statistic), ``min(1, 2 min(p_split, p_any))``: the
    split-half test sees broad shifts, the largest gene statistic a strong knock-down whose
    direction half of the cells cannot estimate well. (When ``2 p_any`` alone is below the level,
    the split-half test is not run: its p-value is NaN and ``escape_test_pvalue = 2 p_any``.)
    """
    from ._signature import signature_prior

    is_control = np.asarray(is_control, bool)
    n_guide = int((~is_control).sum())
    features = np.asarray(signature.scores, float)
    info = {"state_space": "signature", "escape_model": "on", "escape_fraction_perturbed": np.nan,
            **signature.info}
    em = signature.em
    mass = float(em.responsibilities[~is_control, PERTURBED].sum())
    info["escape_fraction_perturbed"] = mass / max(n_guide, 1)
    p = signature.shift_pvalue if np.isfinite(signature.shift_pvalue) else 1.0
    if any_effect_pvalue is not None:  # Bonferroni over the two tests (a test not run counts as p = 1)
        p = min(1.0, 2.0 * min(p, float(any_effect_pvalue)))
    info["escape_test_pvalue"] = p
    if not p < KS_ALPHA:
        info["escape_model"] = FALLBACK_NO_SIGNATURE
    elif mass < max(MIN_PERTURBED_FRACTION * n_guide, 10):
        info["escape_model"] = FALLBACK_TOO_SMALL
    if info["escape_model"] != "on":
        em = fit_em(features, fixed_state=np.where(is_control, BASAL, PERTURBED).astype(int), n_states=2,
                    prior=signature_prior(features), covariance="tied",
                    regularization=em_regularization, max_iter=max_iter, tol=tol)
        info["state_model"] = "pinned"
    else:
        info["state_model"] = "tied"
    prior = default_prior(scores, 2, regularization=regularization)
    means, covs = conditional_full_m_step(scores, em.responsibilities, prior, em_regularization)
    info["coupling_covariances"] = "full-covariance M-step in PCA space given the state posteriors"
    return StateFit(em=em, means=means, covariances=covs, features=features, info=info)


MAX_PLAN_DIM = 40
"""Up to this many PCs the Hit-and-Run coupling keeps its recorded plans (memory ``chains x draws x
d^2`` while it runs) and the record carries :data:`~scotgm_pp.tl._posterior.MAX_PLAN_DRAWS` of them,
for the posterior draws; above it the record carries the mean plan only."""


def _thinned_plans(S0: np.ndarray, S1: np.ndarray, C_draws: np.ndarray) -> np.ndarray:
    """At most ``MAX_PLAN_DRAWS`` recorded couplings ``(chain, draw, d, d)`` as plans ``K``
    (``C = L0 K L1^T``, Cholesky factors), evenly thinned over the chains."""
    from ._posterior import MAX_PLAN_DRAWS, plan_kernel

    flat = C_draws.reshape(-1, *C_draws.shape[-2:])
    pick = np.unique(np.linspace(0, len(flat) - 1, min(MAX_PLAN_DRAWS, len(flat))).astype(int))
    return np.stack([plan_kernel(S0, S1, flat[i]) for i in pick])


def couple(
    mu0: np.ndarray,
    S0: np.ndarray,
    mu1: np.ndarray,
    S1: np.ndarray,
    coupling: str,
    *,
    n0: float | None = None,
    n1: float | None = None,
    rng: np.random.Generator | None = None,
    coupling_kwargs: dict | None = None,
) -> tuple[np.ndarray, dict]:
    """Cross-covariance ``C = Cov(X, Y)`` of the chosen coupling and a record of how it was found."""
    kw = dict(coupling_kwargs or {})
    match coupling:
        case "independent":
            return np.zeros_like(S0), {}
        case "ot":
            return ot_cross_covariance(S0, S1), {}
        case "hit_and_run":
            from ..inference.hit_and_run import sample_coupling

            seed = int(rng.integers(2**32)) if rng is not None else 0
            keep = S0.shape[0] <= MAX_PLAN_DIM
            kw.setdefault("store_cross_covariance", keep)
            res = sample_coupling(
                S0, S1, mu_x=mu0, mu_y=mu1, n_x=n0, n_y=n1, random_state=seed,
                return_idata=bool(kw["store_cross_covariance"]), **kw
            )
            # temperature (and its rule), R-hat/ESS of the cost, cost_mean/sd, sampled_rank, n_steps,
            # burn_in, n_chains, worst R-hat and bulk/tail ESS over the entries of C, converged,
            # seconds.  sample_coupling has already warned (naming what failed) if not converged.
            info = res.summary()
            if res.idata is not None and "cross_covariance" in res.idata.posterior:
                info["plan_draws"] = _thinned_plans(S0, S1, res.idata.posterior["cross_covariance"].values)
            return res.cross_covariance, info
        case "paper":
            from ..inference.paper import paper_cross_covariance

            seed = int(rng.integers(2**32)) if rng is not None else 0
            out = paper_cross_covariance(mu0, S0, mu1, S1, random_state=seed, **kw)
            return np.asarray(out["cross_covariance"]), {}
        case _:
            raise ValueError(f"unknown coupling {coupling!r}; choose one of {', '.join(COUPLINGS)}.")


def fit_perturbation(
    scores: np.ndarray,
    is_control: np.ndarray,
    *,
    coupling: str = "ot",
    escape_model: bool = True,
    regularization: float = 0.01,
    em_regularization: str = "map",
    random_state=None,
    coupling_kwargs: dict | None = None,
    states: StateFit | None = None,
) -> PerturbationFit:
    """States (given, e.g. :func:`states_from_signature`, or :func:`fit_states` on the PCA
    scores), coupling and perturbation distribution for one experiment."""
    if coupling not in COUPLINGS:
        raise ValueError(f"unknown coupling {coupling!r}; choose one of {', '.join(COUPLINGS)}.")
    rng = np.random.default_rng(random_state)
    if states is None:
        states = fit_states(
            scores,
            is_control,
            escape_model=escape_model,
            regularization=regularization,
            em_regularization=em_regularization,
        )
    R = states.responsibilities
    n0, n1 = float(R[:, BASAL].sum()), float(R[:, PERTURBED].sum())
    m, S = states.means, states.covariances
    C, info = couple(m[BASAL], S[BASAL], m[PERTURBED], S[PERTURBED], coupling, n0=n0, n1=n1, rng=rng,
                     coupling_kwargs=coupling_kwargs)
    mean = m[PERTURBED] - m[BASAL]
    cov = perturbation_covariance(S[BASAL], S[PERTURBED], C)
    p = np.where(np.asarray(is_control, bool), 0.0, R[:, PERTURBED])
    return PerturbationFit(states=states, coupling=coupling, cross_covariance=C, mean=mean, cov=cov, p_perturbed=p,
                           coupling_info=info)


def gene_statistics(
    loadings: np.ndarray,
    mean: np.ndarray,
    cov: np.ndarray,
    genes=None,
    *,
    shift: np.ndarray | None = None,
    counts: pd.DataFrame | None = None,
    rank_by: str = "score",
) -> pd.DataFrame:
    """Map the perturbation distribution to genes, add the count-layer columns, and rank.

    ``mu = V_m mean`` (a difference: no PCA centre is added back), ``sigma^2 = diag(V_m cov V_m^T)``,
    ``score = mu / sigma`` (the paper's statistic). ``counts``: per-gene columns to add, in the
    genes' order (the model's ``effect`` table of :func:`~scotgm_pp.tl.effect_table` and/or the
    model-free ``lfc_all_guides`` table). ``rank_by`` (one of :data:`RANK_BY`):

    * ``"effect_bound"``: the count layer's perturbed-state effect, bounded at
      ``sqrt(2 ln G)`` standard errors (``effect_bound``), ties (bound 0) by ``effect_z``;
    * ``"effect_shrunk"``: the empirical-Bayes posterior mean of that effect
      (:func:`~scotgm_pp.tl.effect_table`), continuous, so no mass of ties;
    * ``"lfc_all_guides_bound"`` (alias ``"lfc_bound"``, its former name): the model-free NB
      fold change of every guide cell against the controls (:func:`~scotgm_pp.tl.count_shift`),
      bounded the same way, ties by ``lfc_all_guides_z``;
    * ``"shift"``: the gene-space shift of the perturbed state (:func:`state_shift`);
    * ``"score"``: ``mu / sigma``.

    ``rank`` 1 is the most negative key (the strongest knock-down), ``abs_rank`` 1 the largest
    ``|key|``.
    """
    rank_by = resolve_rank_by(rank_by)
    if rank_by == "shift" and shift is None:
        raise ValueError("rank_by='shift' needs the gene-space shift.")
    V = np.asarray(loadings, float)
    mu = V @ mean
    var = np.einsum("gi,ij,gj->g", V, cov, V)
    sigma = np.sqrt(np.clip(var, 0.0, None))
    floor = 1e-8 * max(float(np.max(sigma, initial=0.0)), 1e-300)
    score = mu / np.maximum(sigma, floor)
    df = pd.DataFrame({"gene": genes if genes is not None else np.arange(len(mu))})
    if counts is not None:
        if len(counts) != len(df):
            raise ValueError(f"count table has {len(counts)} rows for {len(df)} genes.")
        for col in counts.columns:
            df[col] = counts[col].to_numpy()
    df["mu"], df["sigma"], df["score"] = mu, sigma, score
    if shift is not None:
        df["shift"] = np.asarray(shift, float)
    bounds = {"effect_bound": "effect_z", "lfc_all_guides_bound": "lfc_all_guides_z"}
    if rank_by in bounds:
        if rank_by not in df or bounds[rank_by] not in df:
            raise ValueError(f"rank_by={rank_by!r} needs the columns {rank_by!r} and {bounds[rank_by]!r} in counts.")
        key = pd.Series(bound_order_score(df[rank_by], df[bounds[rank_by]]), index=df.index)
    else:
        if rank_by not in df:
            raise ValueError(f"rank_by={rank_by!r} needs the column {rank_by!r} in counts.")
        key = df[rank_by]
    df["rank"] = key.rank(method="first", ascending=True).astype(int)
    df["abs_rank"] = (-key.abs()).rank(method="first").astype(int)
    return df


def resolve_rank_by(rank_by: str) -> str:
    """The ranking's current name (``"lfc_bound"`` -> ``"lfc_all_guides_bound"``), or an error naming the options."""
    name = _RANK_ALIASES.get(rank_by, rank_by)
    if rank_by not in RANK_BY:
        raise ValueError(f"rank_by must be one of {RANK_BY}, got {rank_by!r}.")
    return name


def unpinned_posterior(scores: np.ndarray, em: EMResult) -> np.ndarray:
    """Posterior probability of the perturbed state for every cell as if its label were hidden
    (uses the fitted weights of the guide cells); for controls this measures how many look perturbed."""
    return free_responsibilities(scores, em.weights, em.means, em.covariances)[:, PERTURBED]


def state_shift(lognorm, p_perturbed: np.ndarray) -> np.ndarray:
    """Gene-space mean shift of the perturbed state from the basal state (log-normalised units).

    The full model's M-step mean of every gene given the state posteriors: cells enter the
    perturbed state with weight ``p_perturbed`` and the basal state with ``1 - p_perturbed``
    (controls: 0 and 1). Unlike ``mu = V_m (mu_1 - mu_0)`` it is not confined to the variation the
    kept PCs carry (the residual, gene-specific part of the shift is kept), so a knock-down that
    changes little but its own gene is not lost in the projection.
    """
    w1 = np.asarray(p_perturbed, float)
    w0 = 1.0 - w1
    X = lognorm
    m1 = np.asarray(X.T @ w1).ravel() / max(w1.sum(), 1e-12)
    m0 = np.asarray(X.T @ w0).ravel() / max(w0.sum(), 1e-12)
    return m1 - m0

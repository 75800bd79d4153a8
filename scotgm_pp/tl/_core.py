"""Pure per-experiment math: states, coupling, perturbation distribution, gene statistics.

Everything here takes arrays for one experiment (control cells, guide cells) and returns
arrays; the AnnData-aware driver in :mod:`scotgm_pp.tl._response` maps it over perturbations.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..inference.em import EMResult, default_prior, fit_em, free_responsibilities
from ..inference.ot import ot_cross_covariance, perturbation_covariance
from ._counts import bound_order_score

__all__ = [
    "COUPLINGS",
    "PerturbationFit",
    "fit_states",
    "couple",
    "fit_perturbation",
    "gene_statistics",
    "unpinned_posterior",
    "state_shift",
    "RANK_BY",
]

RANK_BY = ("lfc_bound", "shift", "score")

COUPLINGS = ("independent", "ot", "hit_and_run", "paper")
BASAL, PERTURBED = 0, 1


@dataclass
class PerturbationFit:
    """The perturbation distribution of one experiment in PCA space.

    ``Z = Y - X ~ N(mean, cov)`` with ``mean = mu_1 - mu_0`` and
    ``cov = Sigma_0 + Sigma_1 - C - C^T`` for the coupling's cross-covariance ``C``.
    """

    em: EMResult
    coupling: str
    cross_covariance: np.ndarray
    mean: np.ndarray
    cov: np.ndarray
    p_perturbed: np.ndarray
    coupling_info: dict = field(default_factory=dict)
    state_info: dict = field(default_factory=dict)

    @property
    def mu_basal(self) -> np.ndarray:
        return self.em.means[BASAL]

    @property
    def mu_perturbed(self) -> np.ndarray:
        return self.em.means[PERTURBED]

    @property
    def cov_basal(self) -> np.ndarray:
        return self.em.covariances[BASAL]

    @property
    def cov_perturbed(self) -> np.ndarray:
        return self.em.covariances[PERTURBED]


MIN_PERTURBED_FRACTION = 0.1
"""Below this posterior share of the guide cells (or fewer than 10 cells), the perturbed state of
the escape model is an outlier group rather than a perturbation, and every guide cell is
treated as perturbed instead."""


def fit_states(
    scores: np.ndarray,
    is_control: np.ndarray,
    *,
    escape_model: bool = True,
    regularization: float = 0.01,
    em_regularization: str = "map",
    max_iter: int = 300,
    tol: float = 1e-7,
    random_state=None,
) -> tuple[EMResult, dict]:
    """Two-state fit of one experiment.

    Controls are pinned to the basal state. With ``escape_model`` the guide cells' states are
    the posterior of the tied-covariance model (``fit_em(..., covariance="tied")``), and the
    state-specific means and covariances are then the full model's M-step given those
    responsibilities (the covariances feed the transport coupling); otherwise every guide cell
    is pinned to the perturbed state. Returns the
    EM result and a record of how the guide cells were assigned.
    """
    is_control = np.asarray(is_control, bool)
    prior = default_prior(scores, 2, regularization=regularization)
    info = {"escape_model": "off"}
    init = None
    fixed = np.where(is_control, BASAL, PERTURBED).astype(int)
    if escape_model:
        # Which guide cells are perturbed: the tied-covariance model (build_model(...,
        # covariance="tied")). With one shared covariance the states can differ only by a mean
        # shift, so the perturbed state is the guide cells' common displacement from the
        # controls (the perturbation signature, as in Mixscape's discriminant), not whatever
        # sub-population the guide cells happen to contain.
        tied = fit_em(
            scores,
            fixed_state=np.where(is_control, BASAL, -1).astype(int),
            n_states=2,
            prior=prior,
            covariance="tied",
            max_iter=max_iter,
            tol=1e-10,  # the tied likelihood has long plateaus: a looser relative tolerance stops early
        )
        R, n_iter = tied.responsibilities, tied.n_iter
        mass = float(R[~is_control, PERTURBED].sum())
        n_guide = int((~is_control).sum())
        info = {"escape_model": "on", "classification_iter": int(n_iter),
                "classification_fraction": mass / max(n_guide, 1)}
        if mass >= max(MIN_PERTURBED_FRACTION * n_guide, 10):
            # Keep the assignments: one full-model M-step given the responsibilities.
            fixed = np.where(is_control, BASAL, -1).astype(int)
            init = R
            max_iter = 1
        else:
            info["escape_model"] = "fallback: perturbed state too small, all guide cells treated as perturbed"
    em = fit_em(
        scores,
        fixed_state=fixed,
        n_states=2,
        prior=prior,
        regularization=em_regularization,
        max_iter=max_iter,
        tol=tol,
        init_responsibilities=init,
        random_state=random_state,
    )
    if init is not None:
        # The states come from the tied EM; the full-model step given them is closed form, so
        # the iteration count and convergence reported are the tied EM's.
        em.responsibilities = init
        em.n_iter, em.converged = tied.n_iter, tied.converged
    return em, info


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
            res = sample_coupling(
                S0, S1, mu_x=mu0, mu_y=mu1, n_x=n0, n_y=n1, random_state=seed, return_idata=False, **kw
            )
            # temperature (and its rule), R-hat/ESS of the cost, cost_mean/sd, sampled_rank, n_steps,
            # burn_in, n_chains, worst R-hat and bulk/tail ESS over the entries of C, converged,
            # seconds.  sample_coupling has already warned (naming what failed) if not converged.
            info = res.summary()
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
) -> PerturbationFit:
    """States, coupling and perturbation distribution for one experiment."""
    if coupling not in COUPLINGS:
        raise ValueError(f"unknown coupling {coupling!r}; choose one of {', '.join(COUPLINGS)}.")
    rng = np.random.default_rng(random_state)
    em, state_info = fit_states(
        scores,
        is_control,
        escape_model=escape_model,
        regularization=regularization,
        em_regularization=em_regularization,
        random_state=rng,
    )
    R = em.responsibilities
    n0, n1 = float(R[:, BASAL].sum()), float(R[:, PERTURBED].sum())
    C, info = couple(
        em.means[BASAL],
        em.covariances[BASAL],
        em.means[PERTURBED],
        em.covariances[PERTURBED],
        coupling,
        n0=n0,
        n1=n1,
        rng=rng,
        coupling_kwargs=coupling_kwargs,
    )
    mean = em.means[PERTURBED] - em.means[BASAL]
    cov = perturbation_covariance(em.covariances[BASAL], em.covariances[PERTURBED], C)
    p = np.where(np.asarray(is_control, bool), 0.0, R[:, PERTURBED])
    return PerturbationFit(em=em, coupling=coupling, cross_covariance=C, mean=mean, cov=cov, p_perturbed=p,
                           coupling_info=info, state_info=state_info)


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
    """Map the perturbation distribution to genes and rank them.

    ``mu = V_m mean`` (a difference: no PCA centre is added back), ``sigma^2 = diag(V_m cov V_m^T)``,
    ``score = mu / sigma``. With ``rank_by="score"`` (default) ``rank`` 1 is the most negative
    score (the strongest knock-down) and ``abs_rank`` 1 the largest ``|score|``; with
    ``rank_by="shift"`` the ranks follow the gene-space ``shift`` column instead
    (:func:`state_shift`); with ``rank_by="lfc_bound"`` they follow the count layer's bound on
    the log fold change, ties (bound 0) broken by ``lfc_z`` (``counts``: the table of
    :func:`~scotgm_pp.tl.count_shift`, its columns are added).
    """
    if rank_by not in RANK_BY:
        raise ValueError(f"rank_by must be one of {RANK_BY}, got {rank_by!r}.")
    if rank_by == "shift" and shift is None:
        raise ValueError("rank_by='shift' needs the gene-space shift.")
    if rank_by == "lfc_bound" and counts is None:
        raise ValueError("rank_by='lfc_bound' needs the count table of count_shift.")
    V = np.asarray(loadings, float)
    mu = V @ mean
    var = np.einsum("gi,ij,gj->g", V, cov, V)
    sigma = np.sqrt(np.clip(var, 0.0, None))
    floor = 1e-8 * max(float(np.max(sigma, initial=0.0)), 1e-300)
    score = mu / np.maximum(sigma, floor)
    df = pd.DataFrame({"gene": genes if genes is not None else np.arange(len(mu)), "mu": mu, "sigma": sigma,
                       "score": score})
    if shift is not None:
        df["shift"] = np.asarray(shift, float)
    if counts is not None:
        if len(counts) != len(df):
            raise ValueError(f"count table has {len(counts)} rows for {len(df)} genes.")
        for col in counts.columns:
            df[col] = counts[col].to_numpy()
    if rank_by == "lfc_bound":
        key = pd.Series(bound_order_score(df["lfc_bound"], df["lfc_z"]), index=df.index)
    else:
        key = df[rank_by]
    df["rank"] = key.rank(method="first", ascending=True).astype(int)
    df["abs_rank"] = (-key.abs()).rank(method="first").astype(int)
    return df


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

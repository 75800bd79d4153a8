"""``ScOTGM``: the user-facing model class over the PyMC graph and the numeric backends.

The pattern is pymc-marketing's ``ModelBuilder``: settings in the constructor, one
``fit(data, *, method=...)`` entry point, the result as an :class:`arviz.InferenceData`
(``.idata``) whose ``attrs`` carry the settings, so that :meth:`ScOTGM.save` /
:meth:`ScOTGM.load` through netCDF round-trip exactly.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import arviz as az
import numpy as np
import xarray as xr

from ..inference.em import (
    NormalWishartPrior,
    default_prior,
    fit_em,
    free_responsibilities,
    validate_fixed_state,
)
from .graph import default_contrasts, default_state_names

__all__ = ["ScOTGM", "PerturbationDistribution"]

_METHODS = ("em", "map", "mcmc")
_FORMAT_VERSION = 1


@dataclass
class PerturbationDistribution:
    """The perturbation ``Z = Y - X`` between two states under the independent coupling.

    Attributes
    ----------
    mean
        Posterior mean of ``mu_state - mu_reference``, ``(d,)``.
    covariance
        Posterior mean of ``Sigma_state + Sigma_reference``, ``(d, d)``.
    mean_draws, covariance_draws
        Per posterior draw (chains x draws flattened): ``(S, d)`` and ``(S, d, d)``.
    state, reference
        The state names compared.
    """

    mean: np.ndarray
    covariance: np.ndarray
    mean_draws: np.ndarray
    covariance_draws: np.ndarray
    state: str
    reference: str


class ScOTGM:
    """sc-OTGM mixture of basal and perturbed cell states, fitted by EM, MAP or MCMC.

    Parameters
    ----------
    n_states
        Number of Gaussian states (2: basal and perturbed; more for cell types x condition).
    regularization
        Prior covariance ridge as a fraction of the mean PC variance (paper: 0.01), see
        :func:`scotgm_pp.inference.default_prior`.
    kappa
        Prior pseudo-count of the state means.
    extra_dof
        Wishart degrees of freedom above the dimension (an integer: ``pm.Wishart`` needs one).
    dirichlet
        Dirichlet concentration of the state weights (``>= 1``).
    m_step
        ``"map"`` (exact MAP M-step) or ``"paper"`` (Algorithm 3 as published), passed to
        :func:`scotgm_pp.inference.fit_em`.
    state_names
        Labels of the states; default ``["basal", "perturbed"]`` for two states.
    max_iter, tol
        EM stopping rule.
    n_init
        EM restarts when two or more states hold no pinned cells (the best log density wins).
    draws, tune, chains
        MCMC settings (``method="mcmc"``), per chain.
    random_state
        Integer seed (or ``None``); every random draw comes from a Generator built from it.

    Notes
    -----
    A state's meaning comes from its pinned cells (``fixed_state``). States without pinned cells
    are exchangeable under the model: their labels are arbitrary (for ``n_states=2`` with
    controls pinned to state 0 there is one such state, "perturbed", so nothing is ambiguous).
    To label several unpinned states (e.g. the perturbed state of each cell type), pin some of
    their cells or pass ``init_responsibilities=`` to ``fit``.

    Examples
    --------
    >>> model = ScOTGM(random_state=0).fit(adata, fixed_state="state0", method="em")  # doctest: +SKIP
    >>> model.perturbation().mean  # doctest: +SKIP
    """

    def __init__(
        self,
        n_states: int = 2,
        *,
        regularization: float = 0.01,
        kappa: float = 0.01,
        extra_dof: int = 2,
        dirichlet: float = 1.0,
        m_step: str = "map",
        state_names: list[str] | None = None,
        max_iter: int = 500,
        tol: float = 1e-8,
        n_init: int = 4,
        draws: int = 500,
        tune: int = 200,
        chains: int = 2,
        random_state: int | None = 0,
    ):
        if int(n_states) != n_states or n_states < 1:
            raise ValueError(f"n_states must be a positive integer, got {n_states!r}.")
        if int(extra_dof) != extra_dof or extra_dof < 0:
            raise ValueError(f"extra_dof must be a non-negative integer (pm.Wishart needs integer dof), got {extra_dof!r}.")
        if m_step not in ("map", "paper"):
            raise ValueError(f"m_step must be 'map' or 'paper', got {m_step!r}.")
        if random_state is not None and not isinstance(random_state, (int, np.integer)):
            raise TypeError(
                "random_state must be an int or None (it is stored with the model so that fits "
                f"can be reproduced), got {type(random_state).__name__}."
            )
        names = list(state_names) if state_names is not None else default_state_names(int(n_states))
        if len(names) != n_states or len(set(map(str, names))) != n_states:
            raise ValueError(f"state_names must be {n_states} distinct labels, got {state_names!r}.")
        self.settings: dict[str, Any] = {
            "n_states": int(n_states),
            "regularization": float(regularization),
            "kappa": float(kappa),
            "extra_dof": int(extra_dof),
            "dirichlet": float(dirichlet),
            "m_step": str(m_step),
            "state_names": [str(s) for s in names],
            "max_iter": int(max_iter),
            "tol": float(tol),
            "n_init": int(n_init),
            "draws": int(draws),
            "tune": int(tune),
            "chains": int(chains),
            "random_state": None if random_state is None else int(random_state),
        }
        self.idata: az.InferenceData | None = None

    # ------------------------------------------------------------------ data
    @staticmethod
    def _resolve_data(data, fixed_state, obsm_key: str):
        """Return X, fixed_state (raw), cell names, PCA info from an ndarray or an AnnData."""
        pca: dict[str, np.ndarray] = {}
        if hasattr(data, "obsm") and hasattr(data, "obs"):
            if obsm_key not in data.obsm:
                raise KeyError(
                    f"obsm_key {obsm_key!r} not in adata.obsm (keys: {list(data.obsm.keys())}); "
                    "run scanpy.pp.pca first or pass obsm_key=..."
                )
            X = np.asarray(data.obsm[obsm_key], float)
            cells = [str(c) for c in data.obs_names]
            if isinstance(fixed_state, str):
                if fixed_state not in data.obs.columns:
                    raise KeyError(
                        f"fixed_state column {fixed_state!r} not in adata.obs; columns are: {list(data.obs.columns)}."
                    )
                fixed_state = np.asarray(data.obs[fixed_state])
            if "PCs" in getattr(data, "varm", {}) and data.varm["PCs"].shape[1] == X.shape[1]:
                pca["pca_loadings"] = np.asarray(data.varm["PCs"], float)
                pca["genes"] = np.asarray([str(g) for g in data.var_names], dtype=object)
            info = data.uns.get("pca", {}) if hasattr(data, "uns") else {}
            for key in ("variance", "variance_ratio"):
                if key in info and np.shape(info[key]) == (X.shape[1],):
                    pca[f"pca_{key}"] = np.asarray(info[key], float)
        else:
            if isinstance(fixed_state, str):
                raise TypeError("fixed_state may name an obs column only when data is an AnnData; pass an array.")
            X = np.asarray(data, float)
            if X.ndim != 2:
                raise ValueError(f"data must be a 2-D array (cells x PCs) or an AnnData, got shape {X.shape}.")
            cells = [f"cell_{i}" for i in range(X.shape[0])]
        if not np.all(np.isfinite(X)):
            raise ValueError("data contains non-finite values; remove or impute them before fitting.")
        return X, fixed_state, cells, pca

    def _prior(self, X: np.ndarray) -> NormalWishartPrior:
        s = self.settings
        return default_prior(
            X,
            s["n_states"],
            regularization=s["regularization"],
            kappa=s["kappa"],
            extra_dof=s["extra_dof"],
            dirichlet=s["dirichlet"],
        )

    # ------------------------------------------------------------------- fit
    def fit(
        self,
        data,
        *,
        fixed_state=None,
        method: str = "em",
        obsm_key: str = "X_pca",
        progressbar: bool = False,
        **kwargs,
    ) -> ScOTGM:
        """Fit the model.

        Parameters
        ----------
        data
            Cells x PCs ndarray, or an AnnData whose ``.obsm[obsm_key]`` holds the PCA scores
            (``.varm["PCs"]`` and ``.uns["pca"]`` are kept in ``constant_data`` when present).
        fixed_state
            Per-cell ``-1`` (free) or state index ``k`` (pinned, e.g. non-targeting controls in
            state 0); with an AnnData also the name of an ``.obs`` column holding those integers.
        method
            ``"em"``: the MAP by EM (:func:`scotgm_pp.inference.fit_em`).
            ``"map"``: ``pm.find_MAP`` on the PyMC graph, started from the EM solution. A cold
            start (e.g. both means equal) sits on a symmetric saddle where the gradient is zero and
            L-BFGS stops at once; EM escapes it, which is why EM provides the start.
            ``"mcmc"``: exact conjugate Gibbs sampling (:func:`scotgm_pp.inference.gibbs.sample_gibbs`)
            with ``chains`` chains, started from and relabelled to the EM solution.
        obsm_key
            Key of the PCA scores in ``adata.obsm``.
        progressbar
            Show progress of ``pm.find_MAP`` (``"map"``) or of the Gibbs sweeps (``"mcmc"``).
        **kwargs
            Passed to ``fit_em`` (``"em"``), ``pm.find_MAP`` (``"map"``) or ``sample_gibbs``
            (``"mcmc"``, e.g. ``draws=``).

        Returns
        -------
        ScOTGM
            ``self``, with ``.idata`` set.
        """
        s = self.settings
        K = s["n_states"]
        X, fixed_raw, cells, pca = self._resolve_data(data, fixed_state, obsm_key)
        fixed = validate_fixed_state(fixed_raw, X.shape[0], K)
        prior = self._prior(X)
        rng = np.random.default_rng(s["random_state"])
        em_kwargs = dict(
            fixed_state=fixed, n_states=K, prior=prior, regularization=s["m_step"],
            max_iter=s["max_iter"], tol=s["tol"], n_init=s["n_init"], random_state=rng,
        )
        stats: dict[str, tuple[tuple[str, ...], np.ndarray]] = {}
        match method:
            case "em":
                em = fit_em(X, **{**em_kwargs, **kwargs})
                weights, means, covs = (a[None, None] for a in (em.weights, em.means, em.covariances))
                stats["lp"] = (("chain", "draw"), np.array([[em.logp]]))
            case "map":
                em = fit_em(X, **em_kwargs)
                weights, means, covs, lp = self._find_map(X, fixed, prior, em, cells, progressbar, kwargs)
                stats["lp"] = (("chain", "draw"), np.array([[lp]]))
                stats["lp_gain_over_em"] = (("chain", "draw"), np.array([[lp - em.logp]]))
            case "mcmc":
                from ..inference.gibbs import sample_gibbs

                em = fit_em(X, **em_kwargs)
                opts = dict(draws=s["draws"], tune=s["tune"], chains=s["chains"])
                opts.update(kwargs)
                g = sample_gibbs(
                    X, fixed_state=fixed, n_states=K, prior=prior, init=em, random_state=rng,
                    progressbar=progressbar, **opts,
                )
                weights, means, covs = g.weights, g.means, g.covariances
                stats["lp"] = (("chain", "draw"), g.lp)
                stats["relabelled"] = (("chain", "draw"), g.relabelled)
            case _:
                raise ValueError(f"method must be one of {', '.join(map(repr, _METHODS))}; got {method!r}.")
        self.idata = self._to_idata(
            method, X, fixed, cells, pca, prior, weights, means, covs, stats, em
        )
        return self

    def _find_map(self, X, fixed, prior, em, cells, progressbar, kwargs):
        import pymc as pm

        from .graph import build_model, model_point

        K = self.settings["n_states"]
        model = build_model(
            X, fixed_state=fixed, n_states=K, prior=prior,
            state_names=self.settings["state_names"], coords={"cell": cells},
        )
        start = model_point(model, em.weights, em.means, np.linalg.inv(em.covariances))
        point, raw = pm.find_MAP(start=start, model=model, progressbar=progressbar, return_raw=True, **kwargs)
        weights = np.asarray(point["weights"])[None, None]
        means = np.asarray(point["means"])[None, None]
        covs = np.asarray(point["covariances"])[None, None]
        return weights, means, covs, float(-raw.fun)

    # ----------------------------------------------------------------- idata
    def _to_idata(self, method, X, fixed, cells, pca, prior, weights, means, covs, stats, em):
        s = self.settings
        K = s["n_states"]
        names = s["state_names"]
        d = X.shape[1]
        C, D = weights.shape[:2]
        pcs = [f"PC{j + 1}" for j in range(d)]
        pairs = default_contrasts(K)
        coords = {
            "chain": np.arange(C),
            "draw": np.arange(D),
            "state": names,
            "pc": pcs,
            "pc_bis": pcs,
            "cell": cells,
        }
        post = {
            "weights": (("chain", "draw", "state"), weights),
            "means": (("chain", "draw", "state", "pc"), means),
            "covariances": (("chain", "draw", "state", "pc", "pc_bis"), covs),
        }
        pert_coords = {}
        if pairs:
            a = np.array([p[0] for p in pairs])
            b = np.array([p[1] for p in pairs])
            pert_coords["contrast"] = [f"{names[i]} - {names[j]}" for i, j in pairs]
            post["perturbation_mean"] = (("chain", "draw", "contrast", "pc"), means[:, :, a] - means[:, :, b])
            post["perturbation_cov_independent"] = (
                ("chain", "draw", "contrast", "pc", "pc_bis"),
                covs[:, :, a] + covs[:, :, b],
            )
        posterior = xr.Dataset(post, coords={**coords, **pert_coords})
        posterior = posterior.drop_vars("cell") if "cell" in posterior.coords else posterior

        ss = dict(stats)
        if method in ("em", "map"):
            ss["em_logp_trace"] = (("chain", "draw", "em_iteration"), em.logp_trace[None, None])
            ss["em_n_iter"] = (("chain", "draw"), np.array([[em.n_iter]]))
            ss["em_converged"] = (("chain", "draw"), np.array([[int(em.converged)]], dtype=np.int8))
        sample_stats = xr.Dataset(ss, coords={"chain": coords["chain"], "draw": coords["draw"]})

        observed = xr.Dataset({"X": (("cell", "pc"), X)}, coords={"cell": cells, "pc": pcs})
        const = {
            "fixed_state": (("cell",), fixed.astype(np.int64)),
            "prior_mean": (("pc",), np.asarray(prior.mean, float)),
            "prior_scale_inv": (("pc", "pc_bis"), np.asarray(prior.scale_inv, float)),
            "prior_dirichlet": (("state",), np.asarray(prior.dirichlet, float)),
            "prior_kappa": ((), float(prior.kappa)),
            "prior_dof": ((), float(prior.dof)),
        }
        const_coords = {"cell": cells, "pc": pcs, "pc_bis": pcs, "state": names}
        if method == "mcmc":
            const["em_logp_trace"] = (("em_iteration",), em.logp_trace)
        if "pca_loadings" in pca:
            const["pca_loadings"] = (("gene", "pc"), pca["pca_loadings"])
            const_coords["gene"] = pca["genes"].tolist()
        for key in ("pca_variance", "pca_variance_ratio"):
            if key in pca:
                const[key] = (("pc",), pca[key])
        constant = xr.Dataset(const, coords=const_coords)
        attrs = {
            "settings": json.dumps(self.settings, sort_keys=True),
            "method": method,
            "model": "scotgm_pp.models.ScOTGM",
            "format_version": str(_FORMAT_VERSION),
        }
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return az.InferenceData(
                posterior=posterior,
                sample_stats=sample_stats,
                observed_data=observed,
                constant_data=constant,
                attrs=attrs,
            )

    def _require_fit(self) -> az.InferenceData:
        if self.idata is None:
            raise RuntimeError("the model is not fitted; call .fit(data, ...) or ScOTGM.load(path) first.")
        return self.idata

    def _draws(self):
        post = self._require_fit().posterior
        K = self.settings["n_states"]
        d = post.sizes["pc"]
        w = post["weights"].values.reshape(-1, K)
        m = post["means"].values.reshape(-1, K, d)
        c = post["covariances"].values.reshape(-1, K, d, d)
        return w, m, c

    # ------------------------------------------------------------ results
    @property
    def method(self) -> str:
        """How the model was fitted: ``"em"``, ``"map"`` or ``"mcmc"``."""
        return str(self._require_fit().attrs["method"])

    def predict_proba(self, X, *, obsm_key: str = "X_pca") -> np.ndarray:
        """Posterior state probabilities of new cells (all treated as free).

        Parameters
        ----------
        X
            Cells x PCs in the fitted PCA space, or an AnnData (``.obsm[obsm_key]``).
        obsm_key
            Key of the PCA scores when ``X`` is an AnnData.

        Returns
        -------
        numpy.ndarray
            ``(n, K)``; averaged over the posterior draws (a single draw for EM and MAP).
        """
        if hasattr(X, "obsm"):
            X = self._resolve_data(X, None, obsm_key)[0]
        X = np.asarray(X, float)
        w, m, c = self._draws()
        if X.ndim != 2 or X.shape[1] != m.shape[2]:
            raise ValueError(f"X must be cells x {m.shape[2]} PCs (the fitted space), got shape {X.shape}.")
        out = np.zeros((X.shape[0], m.shape[1]))
        for s in range(len(w)):
            out += free_responsibilities(X, w[s], m[s], c[s])
        return out / len(w)

    @property
    def responsibilities(self) -> np.ndarray:
        """State probabilities of the training cells ``(n, K)``; pinned cells are one-hot."""
        idata = self._require_fit()
        R = self.predict_proba(idata.observed_data["X"].values)
        fixed = idata.constant_data["fixed_state"].values
        pinned = np.flatnonzero(fixed >= 0)
        R[pinned] = 0.0
        R[pinned, fixed[pinned]] = 1.0
        return R

    def perturbation(self, state: int | str = 1, reference: int | str = 0) -> PerturbationDistribution:
        """Distribution of ``Z = mu_state - mu_reference`` under the independent coupling.

        Parameters
        ----------
        state, reference
            State indices or names (default: perturbed vs basal).

        Returns
        -------
        PerturbationDistribution
            Mean ``mu_state - mu_reference`` and covariance ``Sigma_state + Sigma_reference``,
            averaged over posterior draws, and the per-draw values.
        """
        names = self.settings["state_names"]
        a, b = (self._state_index(x) for x in (state, reference))
        if a == b:
            raise ValueError(f"state and reference must differ, both are {names[a]!r}.")
        _, m, c = self._draws()
        md = m[:, a] - m[:, b]
        cd = c[:, a] + c[:, b]
        return PerturbationDistribution(md.mean(0), cd.mean(0), md, cd, names[a], names[b])

    def _state_index(self, state: int | str) -> int:
        names = self.settings["state_names"]
        if isinstance(state, str):
            if state not in names:
                raise ValueError(f"state {state!r} unknown; states are {names}.")
            return names.index(state)
        k = int(state)
        if not 0 <= k < len(names):
            raise ValueError(f"state index {k} out of range 0..{len(names) - 1}.")
        return k

    def sample_posterior_predictive(
        self,
        n: int | None = None,
        *,
        state: int | str | None = None,
        draws: int | None = None,
        random_state: int | np.random.Generator | None = None,
        extend_inferencedata: bool = False,
    ) -> az.InferenceData:
        """Posterior predictive draws of the state model's cells (PCA scores), as InferenceData.

        For every posterior draw (chains and draws kept), cells get a state and then
        ``x ~ N(mu_state, Sigma_state)`` from that draw, so parameter uncertainty is carried
        (an EM or MAP fit has a single draw: the fitted point).

        * ``n=None``: replicate the observed cells, as ``pm.sample_posterior_predictive`` does on
          :func:`~scotgm_pp.models.build_model` (``x_free`` and ``x_pinned_k``): pinned cells stay
          in their state, free cells draw theirs from the draw's weights
          (``tests/test_predictive.py`` holds the two to each other).
        * ``n`` cells: new cells per draw, in ``state`` if given, else states from the weights.

        Parameters
        ----------
        n
            New cells per posterior draw, or ``None`` to replicate the observed cells.
        state
            State index or name for new cells; ``None`` samples states by their weights.
        draws
            Use at most this many draws per chain (evenly thinned); default all.
        random_state
            Seed or Generator; defaults to the model's ``random_state`` setting.
        extend_inferencedata
            Also add the ``posterior_predictive`` group to ``self.idata`` (replacing one that is
            there), so that :meth:`save` keeps it.

        Returns
        -------
        arviz.InferenceData
            ``posterior`` (the draws used), ``posterior_predictive`` with ``X`` (chain, draw,
            cell, pc) and ``state`` (chain, draw, cell), and, when replicating, ``observed_data``.
        """
        idata = self._require_fit()
        if n is not None and (isinstance(n, bool) or int(n) != n or n < 1):
            raise ValueError(f"n must be a positive integer or None (replicate the observed cells), got {n!r}.")
        if state is not None and n is None:
            raise ValueError("state= applies to new cells; pass n= as well (replicated cells keep their own states).")
        rng = np.random.default_rng(self.settings["random_state"] if random_state is None else random_state)
        post = idata.posterior
        if draws is not None:
            if int(draws) < 1:
                raise ValueError(f"draws must be a positive integer, got {draws!r}.")
            keep = np.unique(np.linspace(0, post.sizes["draw"] - 1, min(int(draws), post.sizes["draw"])).astype(int))
            post = post.isel(draw=keep)
        C, D = post.sizes["chain"], post.sizes["draw"]
        K = self.settings["n_states"]
        d = post.sizes["pc"]
        w = post["weights"].values.reshape(-1, K)
        m = post["means"].values.reshape(-1, K, d)
        L = np.linalg.cholesky(post["covariances"].values.reshape(-1, K, d, d))
        if n is None:
            fixed = idata.constant_data["fixed_state"].values
            cells = idata.observed_data["cell"].values
        else:
            fixed = np.full(int(n), -1 if state is None else self._state_index(state))
            cells = np.array([f"synthetic_{i}" for i in range(int(n))])
        free = fixed < 0
        X = np.empty((C * D, fixed.size, d))
        Z = np.empty((C * D, fixed.size), dtype=np.int64)
        for s in range(C * D):
            z = fixed.copy()
            u = rng.random(int(free.sum()))[:, None]
            z[free] = np.minimum((np.cumsum(w[s], axis=0)[None, :] < u).sum(axis=1), K - 1)
            X[s] = m[s, z] + np.einsum("nij,nj->ni", L[s, z], rng.standard_normal((fixed.size, d)))
            Z[s] = z
        coords = {"chain": post["chain"].values, "draw": post["draw"].values, "cell": cells, "pc": post["pc"].values}
        pp = xr.Dataset({"X": (("chain", "draw", "cell", "pc"), X.reshape(C, D, fixed.size, d)),
                         "state": (("chain", "draw", "cell"), Z.reshape(C, D, fixed.size))}, coords=coords)
        groups = {"posterior": post, "posterior_predictive": pp}
        if n is None:
            groups["observed_data"] = idata.observed_data
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            out = az.InferenceData(**groups, attrs={"model": "scotgm_pp.models.ScOTGM", "method": self.method})
            if extend_inferencedata:
                if "posterior_predictive" in idata.groups():
                    del idata.posterior_predictive
                idata.add_groups(posterior_predictive=pp)
        return out

    # ---------------------------------------------------------------- io
    def save(self, path: str | Path) -> Path:
        """Write ``.idata`` (with the settings and a digest of the contents in its attrs) to a
        netCDF file.

        Parameters
        ----------
        path
            Target file (``.nc``); overwritten if it exists.

        Returns
        -------
        pathlib.Path
        """
        from ._persist import DIGEST_ATTR, digest

        idata = self._require_fit()
        idata.attrs[DIGEST_ATTR] = digest(idata)
        path = Path(path)
        idata.to_netcdf(str(path), engine="h5netcdf")
        return path

    @classmethod
    def load(cls, path: str | Path) -> ScOTGM:
        """Rebuild a fitted model from :meth:`save`'s netCDF file.

        The file is verified first (:func:`scotgm_pp.models._persist.verify`): a file that is not
        a saved model, or whose contents or settings were altered after saving, is refused.

        Parameters
        ----------
        path
            File written by :meth:`save`.

        Returns
        -------
        ScOTGM
        """
        from ._persist import verify

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no saved model at {path}.")
        if path.is_dir():
            raise ValueError(f"{path} is a folder, not a saved model.")
        try:
            with az.rc_context(rc={"data.load": "eager"}):
                idata = az.from_netcdf(str(path), engine="h5netcdf")
        except (OSError, ValueError, KeyError) as err:
            raise ValueError(f"{path} is not a readable netCDF file written by ScOTGM.save ({err}).") from err
        model = cls(**verify(idata, path))
        model.idata = idata
        return model

    def __repr__(self) -> str:
        status = "unfitted" if self.idata is None else f"fitted by {self.method!r}"
        return f"ScOTGM(n_states={self.settings['n_states']}, {status})"

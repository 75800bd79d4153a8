"""The joint graph (Gaussian states + count layer) in PyMC and its EM are one model.

PyMC's compiled log density of ``build_model(scores, counts=...)`` equals the joint EM's trace at
every iterate, the trace never decreases, and PyMC's gradient vanishes at EM's fixed point; the
graph draws synthetic cells (scores and counts) forward. Compiled once per module.
"""

from __future__ import annotations

import warnings

import arviz as az
import numpy as np
import pymc as pm
import pytest

import scotgm_pp as sg
from scotgm_pp.inference import count_layer as cl
from scotgm_pp.inference.em import default_prior
from scotgm_pp.inference.joint_em import fit_joint_em, joint_log_density
from scotgm_pp.models import build_model, model_point
from scotgm_pp.pp import PreprocessParams, prepare_pair

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def screen():
    """One simulated perturbation: 100 controls, 60 guide cells (half escaped), 24 genes, 2 replicates."""
    ad = sg.datasets.simulate(n_genes=24, n_perturbations=1, n_control=100, n_cells_per_perturbation=60,
                              n_de_genes=4, escape_fraction=0.5, random_state=4)
    ctrl = (ad.obs["perturbation"] == "control").to_numpy()
    pair = prepare_pair(ad, ctrl, PreprocessParams(n_pcs=2))
    y = ad[pair.obs_names, pair.var_names].X.toarray()
    s = np.asarray(ad[pair.obs_names].X.sum(axis=1)).ravel().astype(float)
    batch = np.where(np.arange(len(s)) % 3 == 0, "rep2", "rep1")
    fixed = np.where(pair.is_control, 0, -1)
    X = pair.pca.scores
    phi = cl.control_dispersion(y, s, pair.is_control, batch)
    prior = default_prior(X, 2)
    cprior = cl.default_count_prior(y, s)
    kw = dict(size_factors=s, dispersion=phi, fixed_state=fixed, batch=batch, prior=prior, count_prior=cprior,
              covariance="tied")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(X, counts=y, coords={"gene": list(pair.var_names)}, **kw)
        logp = model.compile_logp(jacobian=False)
        dlogp = model.compile_dlogp(jacobian=False)
    return dict(X=X, y=y, kw=kw, model=model, logp=logp, dlogp=dlogp, escaped=ad.obs["escaped"].to_numpy())


def _point(model, fit):
    g = fit.gaussian
    return model_point(model, g.weights, g.means, np.linalg.inv(g.covariances), counts=fit.counts)


def test_pymc_logp_of_the_joint_graph_equals_the_joint_em_trace(screen):
    X, y, kw, model, logp = screen["X"], screen["y"], screen["kw"], screen["model"], screen["logp"]
    full = fit_joint_em(X, y, evidence="joint", max_iter=12, tol=0.0, **kw)
    values = []
    for t in range(1, 13):
        fit = fit_joint_em(X, y, evidence="joint", max_iter=t, tol=0.0, **kw)
        value = float(logp(_point(model, fit)))
        assert value == pytest.approx(fit.logp_trace[-1], rel=1e-6)
        assert value == pytest.approx(full.logp_trace[t - 1], rel=1e-6)
        values.append(value)
    g = full.gaussian
    ours = joint_log_density(X, y, weights=g.weights, means=g.means, covariances=g.covariances, params=full.counts,
                             **{k: v for k, v in kw.items()})
    assert ours == pytest.approx(full.logp_trace[-1], rel=1e-10)
    steps = np.diff(values)
    assert np.all(steps >= -1e-8 * np.abs(values[:-1]))
    assert values[-1] - values[0] > 1.0  # EM climbed


def test_gradient_vanishes_at_the_joint_em_fixed_point(screen):
    X, y, kw, model, dlogp = screen["X"], screen["y"], screen["kw"], screen["model"], screen["dlogp"]
    fit = fit_joint_em(X, y, evidence="joint", max_iter=3000, tol=1e-15, **kw)
    grad = np.asarray(dlogp(_point(model, fit)))
    start = fit_joint_em(X, y, evidence="joint", max_iter=1, tol=0.0, **kw)
    g0 = np.asarray(dlogp(_point(model, start)))
    print(f"|grad| at the fixed point {np.linalg.norm(grad):.2e} ({fit.n_iter} iterations), "
          f"after one iteration {np.linalg.norm(g0):.2e}")
    assert fit.converged
    assert np.linalg.norm(grad) < 1e-4
    assert np.all(np.diff(fit.logp_trace) >= -1e-8 * np.abs(fit.logp_trace[:-1]))


def test_graph_declares_the_count_layer(screen):
    model = screen["model"]
    names = {v.name for v in model.free_RVs}
    assert {"weights", "precision", "mean_0", "mean_1", "beta", "delta", "gamma"} <= names
    assert model.named_vars_to_dims["delta"] == ("effect_state", "gene")
    assert model.named_vars_to_dims["gamma"] == ("batch_offset", "gene")
    assert model.named_vars_to_dims["XY"] == ("cell", "feature")
    assert [v.name for v in model.observed_RVs] == ["XY"]
    assert model.coords["batch"] == ("rep1", "rep2")  # the most frequent batch is the reference
    assert len(model.coords["feature"]) == screen["X"].shape[1] + screen["y"].shape[1]
    with pytest.raises(ValueError, match="size_factors"):
        build_model(screen["X"], counts=screen["y"], dispersion=np.ones(screen["y"].shape[1]))


def test_graph_draws_synthetic_cells_forward(screen):
    """Posterior predictive draws at fixed parameters: state frequencies, scores and count rates."""
    model, y = screen["model"], screen["y"]
    n_draws, G = 300, y.shape[1]
    w = np.array([0.25, 0.75])
    means = np.array([[0.0, 0.0], [4.0, -2.0]])
    delta = np.zeros(G)
    delta[0] = -1.0
    post = {"weights": np.tile(w, (1, n_draws, 1)), "mean_0": np.tile(means[0], (1, n_draws, 1)),
            "mean_1": np.tile(means[1], (1, n_draws, 1)), "precision": np.tile(np.eye(2) * 4.0, (1, n_draws, 1, 1)),
            "beta": np.full((1, n_draws, G), np.log(0.02)), "delta": np.tile(delta, (1, n_draws, 1, 1)),
            "gamma": np.zeros((1, n_draws, 1, G))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with model:
            pp = pm.sample_posterior_predictive(az.from_dict({"posterior": post}), var_names=["XY"],
                                                random_seed=1, progressbar=False)
    free = screen["kw"]["fixed_state"] < 0
    draws = pp.posterior_predictive["XY"].values[0][:, free]  # (draws, free cells, PCs + genes)
    x, counts = draws[..., :2], draws[..., 2:]
    perturbed = x[..., 0] > 2.0
    assert perturbed.mean() == pytest.approx(0.75, abs=0.02)
    np.testing.assert_allclose(x[perturbed].std(axis=0), 0.5, atol=0.02)
    s = np.broadcast_to(model["size_factors"].get_value()[free], perturbed.shape)
    rate = counts[..., 0][perturbed].sum() / (s[perturbed].sum() * 0.02)
    assert rate == pytest.approx(np.exp(-1.0), rel=0.05)
    assert np.all(counts == np.round(counts)) and counts.min() >= 0


def test_the_cut_graph_is_the_marginal_count_likelihood_and_its_em_is_its_map(screen):
    """The cut graph (``count_evidence="cut"``, the screen's): PyMC's log density equals
    ``joint_log_density`` for both count likelihoods, and the gradient of the default (marginal)
    graph vanishes at the cut EM's point (``fit_marginal``), not at the weighted fit's."""
    X, y, kw = screen["X"], screen["y"], screen["kw"]
    fits = {lik: fit_joint_em(X, y, evidence="gaussian", max_iter=3000, tol=1e-15, count_likelihood=lik, **kw)
            for lik in ("marginal", "weighted")}
    R = fits["marginal"].gaussian.responsibilities
    np.testing.assert_array_equal(R, fits["weighted"].gaussian.responsibilities)
    grads = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lik in ("marginal", "weighted"):
            model = build_model(X, counts=y, coords={"gene": [f"g{j}" for j in range(y.shape[1])]},
                                count_evidence="cut", state_probability=R, count_likelihood=lik, **kw)
            logp = model.compile_logp(jacobian=False)
            for at, fit in fits.items():
                lp = float(logp(_point(model, fit)))
                g = fit.gaussian
                closed = joint_log_density(X, y, weights=g.weights, means=g.means, covariances=g.covariances,
                                           params=fit.counts, state_probability=R, count_likelihood=lik, **kw)
                assert lp == pytest.approx(closed, rel=1e-10)
            if lik == "marginal":
                dlogp = model.compile_dlogp(jacobian=False)
                grads = {at: np.linalg.norm(dlogp(_point(model, fit))) for at, fit in fits.items()}
    print(f"|grad| of the marginal cut graph at its EM point {grads['marginal']:.2e}, "
          f"at the weighted fit {grads['weighted']:.2e}")
    assert grads["marginal"] < 1e-4
    assert grads["weighted"] > 1.0

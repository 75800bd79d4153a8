"""Response prediction: closed forms of the predictors, direction over simulated seeds, the posterior band."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats

import scotgm_pp as sg
from scotgm_pp._validation import InputError
from scotgm_pp.tl._predict import (
    DEFAULT_METHOD,
    expected_lognorm,
    get_record,
    lognorm_change,
    observed_response,
    predict_response,
)

SEEDS = (3, 5, 7)
"""Besides seed 0 (the shared fixture). Seed 3 is the one where equation 5 got 9 of 13 genes of
G0000 right; ``benchmarks/downstream_predictors.py`` reports seeds 0-9."""


@pytest.fixture(scope="module")
def truth(sim_fitted):
    return sim_fitted.uns["simulation"]["de_genes"]


@pytest.fixture(scope="module")
def screens(sim_fitted):
    out = {0: sim_fitted}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for seed in SEEDS:
            out[seed] = sg.tl.perturbation_response(sg.datasets.simulate(random_state=seed), "perturbation", "control",
                                                    n_jobs=1, copy=True)
    return out


def _direction_accuracy(pred: pd.DataFrame, de: dict, target: str) -> float:
    p = pred.set_index("gene")
    genes = [g for g in de if g != target and g in p.index]
    return float(np.mean([np.sign(p.loc[g, "delta"]) == de[g] for g in genes]))


def test_closed_forms(sim_fitted):
    pert = sim_fitted.uns["scotgm"]["summary"].index[0]
    rec = get_record(sim_fitted, pert)
    V = np.asarray(rec["loadings"], float)
    i = list(rec["genes"]).index(pert)
    mu = V @ rec["perturbation_mean"]
    # equation 5
    paper = predict_response(sim_fitted, pert, method="paper", n_draws=0)
    Sp = V @ rec["perturbation_cov"] @ V.T
    np.testing.assert_allclose(paper["delta"], Sp[i] / Sp[i, i] * mu[i], rtol=1e-8, atol=1e-12)
    assert paper["delta"].iloc[i] == pytest.approx(mu[i]) and paper.attrs["delta_i"] == pytest.approx(mu[i])
    # the states' mean difference in gene space
    shift = predict_response(sim_fitted, pert, method="shift", n_draws=0)
    np.testing.assert_allclose(shift["delta"], mu, rtol=1e-10)
    np.testing.assert_allclose(shift["fitted_mu"], mu)
    # the count layer's effect, as the log-normalised change it implies, in scaled units
    eff = predict_response(sim_fitted, pert, n_draws=0)
    assert eff.attrs["method"] == DEFAULT_METHOD == "effect"
    np.testing.assert_allclose(eff["delta"], rec["count_effect"] * lognorm_change(rec) / rec["gene_std"], rtol=1e-10)
    np.testing.assert_allclose(eff["delta_lognorm"], eff["delta"] * rec["gene_std"])
    np.testing.assert_allclose(eff["effect"], rec["count_effect"])


def test_expected_lognorm_matches_monte_carlo():
    rng = np.random.default_rng(0)
    libs = np.array([600.0, 1000.0, 1800.0])
    log_rate, phi = np.log([2e-4, 3e-3, 5e-2]), np.array([0.3, 0.1, 0.05])
    exact = expected_lognorm(log_rate, phi, libs)
    s = np.repeat(libs, 40000)
    for g in range(3):
        mu = s * np.exp(log_rate[g])
        y = rng.negative_binomial(1 / phi[g], (1 / phi[g]) / (1 / phi[g] + mu))
        mc = np.log1p(1e4 * y / s)
        assert exact[g] == pytest.approx(mc.mean(), abs=4 * mc.std() / np.sqrt(mc.size))


@pytest.mark.parametrize("method", ["effect", "shift", "paper"])
def test_prediction_is_linear_in_delta(sim_fitted, method):
    pert = sim_fitted.uns["scotgm"]["summary"].index[0]
    a = predict_response(sim_fitted, pert, method=method, delta=1.0, n_draws=20, random_state=3)
    b = predict_response(sim_fitted, pert, method=method, delta=-2.0, n_draws=20, random_state=3)
    np.testing.assert_allclose(b["delta"], -2.0 * a["delta"], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(b["upper"], -2.0 * a["lower"], rtol=1e-8, atol=1e-12)
    assert a["delta"].iloc[list(a["gene"]).index(pert)] == pytest.approx(1.0)


def test_direction_matches_truth_over_seeds(screens):
    """Every seed: mean over perturbations >= 0.9; every perturbation >= 0.75 (the default predictor).

    Measured over seeds 0-9, all 80 perturbations (benchmarks/downstream_predictors.py): per-seed
    means 0.98-1.00, worst perturbation 0.92; equation 5 ("paper") 0.83-0.93 and 0.67.
    """
    pooled = {"effect": [], "paper": []}
    for seed, screen in screens.items():
        de = screen.uns["simulation"]["de_genes"]
        accs = {p: _direction_accuracy(predict_response(screen, p, n_draws=0), de[p], p) for p in de}
        assert np.mean(list(accs.values())) >= 0.9, (seed, accs)
        assert min(accs.values()) >= 0.75, (seed, accs)
        pooled["effect"] += list(accs.values())
        pooled["paper"] += [_direction_accuracy(predict_response(screen, p, method="paper", n_draws=0), de[p], p)
                            for p in de]
    assert np.mean(pooled["effect"]) > np.mean(pooled["paper"]) + 0.05


def test_band_is_reproducible_and_brackets_the_point(sim_fitted, truth):
    pert = next(iter(truth))
    a = predict_response(sim_fitted, pert, n_draws=60, random_state=7)
    b = predict_response(sim_fitted, pert, n_draws=60, random_state=7)
    np.testing.assert_array_equal(a["lower"], b["lower"])
    inside = (a["lower"] <= a["delta"] + 1e-12) & (a["delta"] <= a["upper"] + 1e-12)
    assert inside.mean() >= 0.9
    assert (a["upper"] >= a["lower"]).all()
    # Genes whose band excludes 0 are called in the right direction, and most true DE genes are.
    p = a.set_index("gene")
    de = [g for g in truth[pert] if g != pert]
    called = [g for g in de if np.sign(p.loc[g, "lower"]) == np.sign(p.loc[g, "upper"])]
    assert len(called) >= 0.75 * len(de)
    assert np.mean([np.sign(p.loc[g, "delta"]) == truth[pert][g] for g in called]) >= 0.9
    # The band is the posterior of the count layer's effect: its width follows effect_se.
    rec = get_record(sim_fitted, pert)
    width = (a["upper"] - a["lower"]) / (lognorm_change(rec) / rec["gene_std"])
    assert stats.spearmanr(width, rec["count_effect_se"]).correlation > 0.9


def test_observed_response_finds_the_true_directions(sim_fitted, truth):
    pert = next(iter(truth))
    obs = observed_response(sim_fitted, pert).set_index("gene")
    genes = [g for g in truth[pert] if g in obs.index]
    assert np.mean([np.sign(obs.loc[g, "logfc"]) == truth[pert][g] for g in genes]) >= 0.9
    assert (obs.loc[pert, "padj"] < 1e-6) and obs.loc[pert, "logfc"] < 0


def test_errors_name_the_fix(sim_fitted):
    pert = sim_fitted.uns["scotgm"]["summary"].index[0]
    with pytest.raises(InputError, match="not among"):
        predict_response(sim_fitted, pert, gene="no-such-gene", n_draws=0)
    with pytest.raises(InputError, match="choose one of"):
        predict_response(sim_fitted, pert, method="regression", n_draws=0)
    with pytest.raises(KeyError, match="perturbation_response"):
        predict_response(sim_fitted, pert, key="nothing-here")
    with pytest.raises(KeyError, match="Fitted perturbations"):
        predict_response(sim_fitted, "not-a-perturbation")
    uns = sim_fitted.uns["scotgm"]
    summary = uns["summary"]
    uns["summary"] = pd.concat([summary, summary.loc[[pert]].rename(index={pert: "unmeasured"})])
    uns["summary"].loc["unmeasured", "key"] = "p_unmeasured"
    uns["records"]["p_unmeasured"] = uns["records"][summary.loc[pert, "key"]]
    try:
        with pytest.raises(InputError, match="pass gene="):
            predict_response(sim_fitted, "unmeasured", n_draws=0)
        df = predict_response(sim_fitted, "unmeasured", gene=pert, n_draws=0)
        assert df.attrs["gene"] == pert
    finally:
        uns["summary"] = summary
        del uns["records"]["p_unmeasured"]

"""Response prediction (equation 5): closed form, direction on known ground truth, uncertainty band."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from scotgm_pp._validation import InputError
from scotgm_pp.tl._predict import (
    draw_parameters,
    get_record,
    observed_response,
    predict_response,
    state_cell_counts,
)


@pytest.fixture(scope="module")
def truth(sim_fitted):
    return sim_fitted.uns["simulation"]["de_genes"]


def _direction_accuracy(pred, de: dict, target: str) -> float:
    p = pred.set_index("gene")
    genes = [g for g in de if g != target and g in p.index]
    return float(np.mean([np.sign(p.loc[g, "delta"]) == de[g] for g in genes]))


def test_equation_5_closed_form(sim_fitted):
    pert = sim_fitted.uns["scotgm"]["summary"].index[0]
    rec = get_record(sim_fitted, pert)
    df = predict_response(sim_fitted, pert, n_draws=0)
    V = np.asarray(rec["loadings"], float)
    Sp = V @ rec["perturbation_cov"] @ V.T
    i = list(rec["genes"]).index(pert)
    mu_i = float(V[i] @ rec["perturbation_mean"])
    np.testing.assert_allclose(df["delta"], Sp[i] / Sp[i, i] * mu_i, rtol=1e-8, atol=1e-12)
    # The perturbed gene reproduces its own fitted change, and the lognorm column is scaled * std.
    assert df["delta"].iloc[i] == pytest.approx(mu_i)
    assert df.attrs["delta_i"] == pytest.approx(mu_i)
    np.testing.assert_allclose(df["delta_lognorm"], df["delta"] * rec["gene_std"])
    np.testing.assert_allclose(df["fitted_mu"], V @ rec["perturbation_mean"])


def test_prediction_is_linear_in_delta(sim_fitted):
    pert = sim_fitted.uns["scotgm"]["summary"].index[0]
    a = predict_response(sim_fitted, pert, delta=1.0, n_draws=20, random_state=3)
    b = predict_response(sim_fitted, pert, delta=-2.0, n_draws=20, random_state=3)
    np.testing.assert_allclose(b["delta"], -2.0 * a["delta"], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(b["upper"], -2.0 * a["lower"], rtol=1e-8, atol=1e-12)


def test_direction_matches_truth_on_simulation(sim_fitted, truth):
    """Predicted direction agrees with the true direction for >= 80% of the true DE genes."""
    accs = {p: _direction_accuracy(predict_response(sim_fitted, p, n_draws=0), truth[p], p) for p in truth}
    # Measured on the default screen with the default (OT) coupling: every perturbation between
    # 83% and 100% (mean 93%).
    assert np.mean(list(accs.values())) >= 0.9, accs
    assert sum(a >= 0.8 for a in accs.values()) >= 7, accs


def test_band_is_reproducible_and_brackets_the_point(sim_fitted, truth):
    pert = next(iter(truth))
    a = predict_response(sim_fitted, pert, n_draws=60, random_state=7)
    b = predict_response(sim_fitted, pert, n_draws=60, random_state=7)
    np.testing.assert_array_equal(a["lower"], b["lower"])
    inside = (a["lower"] <= a["delta"] + 1e-12) & (a["delta"] <= a["upper"] + 1e-12)
    assert inside.mean() >= 0.9
    assert (a["upper"] >= a["lower"]).all()
    # Genes with a band excluding 0 are called in the right direction (true DE genes).
    p = a.set_index("gene")
    called = [g for g in truth[pert] if g != pert and np.sign(p.loc[g, "lower"]) == np.sign(p.loc[g, "upper"])]
    assert called, "no true DE gene has a band excluding 0"
    assert np.mean([np.sign(p.loc[g, "delta"]) == truth[pert][g] for g in called]) >= 0.9


def test_parameter_draws_centre_on_the_fit(sim_fitted):
    pert = sim_fitted.uns["scotgm"]["summary"].index[0]
    rec = get_record(sim_fitted, pert)
    draws = draw_parameters(rec, 300, np.random.default_rng(0))
    n0, n1 = state_cell_counts(rec)
    assert n0 + n1 == pytest.approx(rec["n_control"] + rec["n_guide"])
    # Wishart(n - 1, S / (n - 1)) has mean S; the normal draws of the means have sd sqrt(S / n).
    for k in (0, 1):
        S = rec["covariances"][k]
        rel = np.abs(np.diag(draws.covariances[:, k].mean(axis=0)) - np.diag(S)) / np.diag(S)
        assert rel.max() < 0.05
        se = np.sqrt(np.diag(S) / (n0, n1)[k])
        z = (draws.means[:, k].mean(axis=0) - rec["means"][k]) / (se / np.sqrt(300))
        assert np.abs(z).max() < 4.5
    np.testing.assert_allclose(draws.perturbation_mean, draws.means[:, 1] - draws.means[:, 0])
    # The OT coupling is recomputed per draw, so every perturbation covariance stays PSD.
    assert min(np.linalg.eigvalsh(c).min() for c in draws.perturbation_cov) > -1e-8


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

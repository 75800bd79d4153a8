import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from sklearn.metrics import roc_auc_score

import scotgm_pp as sg
from scotgm_pp._validation import InputError


def _run(adata, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sg.tl.perturbation_response(adata, "perturbation", "control", copy=True, **kw)


def test_true_targets_rank_first_on_the_default_simulation(sim_fitted):
    summary = sim_fitted.uns["scotgm"]["summary"]
    truth = sim_fitted.uns["simulation"]["target_gene"]
    ranks = [summary.loc[p, "target_rank"] for p in truth]
    assert np.mean(np.array(ranks) == 1) >= 0.9
    assert max(ranks) <= 3


def test_escaped_cells_are_detected(sim_fitted):
    obs = sim_fitted.obs
    guide = obs["perturbation"] != "control"
    p = obs.loc[guide, "scotgm_p_perturbed"]
    assert p.between(0, 1).all()
    auc = roc_auc_score(~obs.loc[guide, "escaped"], p)
    assert auc >= 0.88
    # Fraction called perturbed is close to the simulated 70%.
    fr = sim_fitted.uns["scotgm"]["summary"]["fraction_perturbed"]
    assert abs(np.mean(fr) - 0.7) < 0.08
    assert set(obs["scotgm_class"].cat.categories) == {"control", "perturbed", "escaped"}


def test_downstream_directions_are_recovered(sim_fitted):
    truth = sim_fitted.uns["simulation"]["de_genes"]
    tab = sg.tl.get_rankings(sim_fitted)
    hits = []
    for pert, genes in truth.items():
        sub = tab[tab["perturbation"] == pert].set_index("gene")
        for gene, sign in genes.items():
            hits.append(np.sign(sub.loc[gene, "mu"]) == sign)
    assert np.mean(hits) >= 0.9


def test_result_slots_and_ranking_table(sim, sim_fitted):
    uns = sim_fitted.uns["scotgm"]
    assert uns["params"]["control"] == "control"
    assert len(uns["skipped"]) == 0
    resp = sg.tl.get_responses(sim_fitted)
    assert resp.shape == (8, sim.n_vars) and list(resp.var_names) == list(sim.var_names)
    assert list(resp.obs_names) == sorted(sim.uns["simulation"]["target_gene"])
    assert list(resp.layers) == ["effect", "effect_se", "effect_z", "effect_bound", "effect_pvalue", "effect_qvalue",
                                 "effect_shrunk", "effect_shrunk_sd", "effect_lfsr", "effect_unshrunk", "effect_unshrunk_se", "effect_se_robust", "effect_pvalue_robust", "log_rate_basal", "dispersion", "mu", "sigma", "score", "shift", "rank", "abs_rank",
                                 "lfc_all_guides", "lfc_all_guides_se", "lfc_all_guides_z", "lfc_all_guides_bound",
                                 "pval", "qval", "qval_screen"]
    tab = sg.tl.get_rankings(sim_fitted)
    assert list(tab.columns) == ["perturbation", "gene", *resp.layers]
    assert len(tab) == 8 * sim.n_vars
    top = sg.tl.get_rankings(sim_fitted, top=3)
    assert len(top) == 24 and top.groupby("perturbation")["rank"].apply(list).map(lambda r: r == [1, 2, 3]).all()
    # the ranking the run asked for: the empirical-Bayes posterior mean, with no ties
    assert uns["params"]["rank_by"] == "effect_shrunk"
    for _, sub in tab.groupby("perturbation"):
        order = sub.sort_values("rank")
        assert order["effect_shrunk"].is_monotonic_increasing
        assert order["effect_shrunk"].nunique() == len(order)
    for _, sub in tab.groupby("perturbation"):
        assert sorted(sub["rank"]) == list(range(1, len(sub) + 1))
        assert np.allclose(sub["score"], sub["mu"] / sub["sigma"])
        assert np.allclose(sub["effect_z"], sub["effect"] / sub["effect_se"])
    rec = sg.tl.get_record(sim_fitted, resp.obs_names[0])
    m = rec["n_pcs"]
    assert rec["covariances"].shape == (2, m, m)
    assert np.allclose(rec["perturbation_mean"], rec["means"][1] - rec["means"][0])
    C = rec["cross_covariance"]
    S = rec["covariances"]
    assert np.allclose(rec["perturbation_cov"], S[0] + S[1] - C - C.T, atol=1e-8)
    assert rec["confusion"].sum() == rec["n_control"] + rec["n_guide"]
    # the input was not modified: copy=True leaves `sim` without results
    assert "scotgm" not in sim.uns and "scotgm_p_perturbed" not in sim.obs


def test_x_is_never_overwritten_and_seed_reproduces(small_sim):
    adata = small_sim.copy()
    before = adata.X.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sg.tl.perturbation_response(adata, "perturbation", "control", random_state=3)
    assert (adata.X != before).nnz == 0
    again = _run(small_sim, random_state=3)
    pd.testing.assert_frame_equal(sg.tl.get_rankings(adata), sg.tl.get_rankings(again))
    np.testing.assert_array_equal(adata.obs["scotgm_p_perturbed"], again.obs["scotgm_p_perturbed"])


def test_ot_coupling_shrinks_the_perturbation_covariance(small_sim):
    ind = _run(small_sim, coupling="independent")
    ot = _run(small_sim, coupling="ot")
    for pert in ot.uns["scotgm"]["summary"].index:
        rec = sg.tl.get_record(ot, pert)
        tr_ot = np.trace(rec["perturbation_cov"])
        tr_ind = np.trace(sg.tl.get_record(ind, pert)["perturbation_cov"])
        assert tr_ot < tr_ind
        S0, S1 = rec["covariances"]
        assert np.allclose(rec["cross_covariance"], sg.inference.ot_cross_covariance(S0, S1))


def test_escape_model_off_pins_every_guide_cell(small_sim):
    out = _run(small_sim, escape_model=False)
    guide = out.obs["perturbation"] != "control"
    assert (out.obs.loc[guide, "scotgm_p_perturbed"] == 1.0).all()


# ---- bad input -------------------------------------------------------------------------------


def test_missing_obs_column_is_named(small_sim):
    with pytest.raises(InputError, match="perturbation_key 'guide' not in adata.obs; columns are"):
        sg.tl.perturbation_response(small_sim, "guide", "control")


def test_unknown_control_label_lists_the_labels(small_sim):
    with pytest.raises(InputError, match="control label 'NT' not found.*'control' \\(120\\)"):
        sg.tl.perturbation_response(small_sim, "perturbation", "NT")


def test_unknown_perturbation_is_named(small_sim):
    with pytest.raises(InputError, match="perturbations \\['XYZ'\\] not found"):
        sg.tl.perturbation_response(small_sim, "perturbation", "control", perturbations=["XYZ"])


def test_too_few_cells_is_a_recorded_skip_or_an_error(small_sim):
    adata = small_sim.copy()
    labels = adata.obs["perturbation"].astype(str).to_numpy()
    first = sorted(set(labels) - {"control"})[0]
    idx = np.flatnonzero(labels == first)[5:]
    labels[idx] = "dropped"
    keep = labels != "dropped"
    adata = adata[keep].copy()
    with pytest.warns(UserWarning, match="skipped 1 perturbation"):
        sg.tl.perturbation_response(adata, "perturbation", "control")
    skipped = adata.uns["scotgm"]["skipped"].set_index("perturbation")["reason"]
    assert "5 guide cells" in skipped[first]
    assert first not in adata.uns["scotgm"]["summary"].index
    assert len(adata.uns["scotgm"]["summary"]) == 2
    with pytest.raises(KeyError, match="was skipped: 5 guide cells"):
        sg.tl.get_record(adata, first)
    with pytest.raises(InputError, match="no perturbation could be analysed"):
        sg.tl.perturbation_response(adata, "perturbation", "control", perturbations=[first])
    few_controls = small_sim[(small_sim.obs["perturbation"] != "control").to_numpy() | (np.arange(small_sim.n_obs) < 5)]
    with pytest.raises(InputError, match="only 5 control cells"):
        sg.tl.perturbation_response(few_controls.copy(), "perturbation", "control")


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda X: X.astype(float) * 0.5 + 0.25, "non-integer values"),
        (lambda X: X - 3, "negative values"),
        (lambda X: np.where(np.arange(X.size).reshape(X.shape) == 7, np.nan, X), "non-finite"),
        (lambda X: np.zeros_like(X), "all zeros"),
    ],
)
def test_bad_matrices_are_refused(small_sim, corrupt, message):
    adata = small_sim.copy()
    adata.X = sp.csr_matrix(corrupt(adata.X.toarray()))
    with pytest.raises(InputError, match=message):
        sg.tl.perturbation_response(adata, "perturbation", "control")


def test_duplicated_obs_names_are_refused(small_sim):
    adata = small_sim.copy()
    names = adata.obs_names.to_numpy().copy()
    names[1] = names[0]
    adata.obs_names = names
    with pytest.raises(InputError, match="obs_names are not unique.*obs_names_make_unique"):
        sg.tl.perturbation_response(adata, "perturbation", "control")


def test_unknown_coupling_names_the_options(small_sim):
    with pytest.raises(InputError, match="unknown coupling 'sinkhorn'; choose one of independent, ot"):
        sg.tl.perturbation_response(small_sim, "perturbation", "control", coupling="sinkhorn")


def test_score_ranking_is_available(small_sim):
    out = _run(small_sim, rank_by="score")
    tab = sg.tl.get_rankings(out)
    for _, sub in tab.groupby("perturbation"):
        assert sub.sort_values("rank")["score"].is_monotonic_increasing
    with pytest.raises(InputError, match="unknown rank_by 'pvalue'"):
        sg.tl.perturbation_response(small_sim, "perturbation", "control", rank_by="pvalue")


def test_model_free_baseline_matches_count_shift_and_batches_are_validated(small_sim):
    truth = small_sim.uns["simulation"]["target_gene"]
    pert = sorted(truth)[0]
    labels = small_sim.obs["perturbation"].astype(str).to_numpy()
    ad = small_sim.copy()
    ad.obs["rep"] = np.where(np.arange(ad.n_obs) % 2 == 0, "r1", "r2")
    out = _run(ad, perturbations=[pert], batch_key="rep")
    assert out.uns["scotgm"]["params"]["batch_key"] == "rep"
    tab = sg.tl.get_rankings(out).set_index("gene")
    assert tab.loc[truth[pert], "rank"] == 1
    # the table is count_shift on the same cells and genes (no gene or cell of this simulation is
    # filtered), with the dispersion the driver estimates once from every control cell
    cells = np.isin(labels, ["control", pert])
    sub = ad[cells]
    ctrl = labels == "control"
    # (moment estimates shrunk toward their trend: the in-memory estimator, not the driver's pass)
    phi = sg.inference.control_dispersion(ad.X, np.asarray(ad.X.sum(1)).ravel(), ctrl, ad.obs["rep"].to_numpy())
    want = sg.tl.count_shift(sub.X, labels[cells] == "control", batch=sub.obs["rep"].to_numpy(), dispersion=phi)
    want.index = sub.var_names
    got = tab.loc[sub.var_names]
    # (the responses hold gene statistics in float32)
    np.testing.assert_allclose(got["lfc_all_guides"], want["lfc"], rtol=1e-6)
    np.testing.assert_allclose(got["lfc_all_guides_bound"], want["lfc_bound"], rtol=1e-6, atol=1e-7)
    with pytest.raises(InputError, match="batch_key 'replicate' is not a column of adata.obs"):
        sg.tl.perturbation_response(small_sim, "perturbation", "control", batch_key="replicate")


def test_gene_space_shift_ranks_targets_and_matches_weighted_means(small_sim):
    out = _run(small_sim, rank_by="shift")
    tab = sg.tl.get_rankings(out)
    truth = small_sim.uns["simulation"]["target_gene"]
    assert all(tab[(tab.perturbation == p) & (tab.gene == g)]["rank"].iloc[0] == 1 for p, g in truth.items())
    # shift = weighted mean difference of log-normalised expression (hand computation)
    pert = next(iter(truth))
    labels = small_sim.obs["perturbation"].astype(str).to_numpy()
    cells = np.isin(labels, ["control", pert])
    sub = small_sim[cells]
    X = sub.X.toarray().astype(float)
    X = np.log1p(X / X.sum(1, keepdims=True) * 1e4)
    w1 = out.obs["scotgm_p_perturbed"].to_numpy()[cells]
    expected = X.T @ w1 / w1.sum() - X.T @ (1 - w1) / (1 - w1).sum()
    got = tab[tab.perturbation == pert].set_index("gene").loc[sub.var_names, "shift"].to_numpy()
    assert np.allclose(got, expected, atol=1e-4)


def test_paper_coupling_runs_in_the_pipeline(small_sim):
    out = _run(small_sim, coupling="paper", perturbations=[sorted(small_sim.uns["simulation"]["target_gene"])[0]])
    rec = sg.tl.get_record(out, out.uns["scotgm"]["summary"].index[0])
    S0, S1 = rec["covariances"]
    C = rec["cross_covariance"]
    assert np.all(np.isfinite(C)) and C.shape == S0.shape
    # Algorithm 1 as published is no coupling of the two states: its C differs from both the
    # independent (0) and the optimal-transport cross-covariance.
    ot = sg.inference.ot_cross_covariance(S0, S1)
    assert np.linalg.norm(C - ot) > 0.1 * np.linalg.norm(ot)


def test_hit_and_run_coupling_in_the_pipeline(small_sim):
    pert = sorted(small_sim.uns["simulation"]["target_gene"])[0]
    har = _run(small_sim, coupling="hit_and_run", perturbations=[pert])
    rec = sg.tl.get_record(har, pert)
    assert rec["coupling_rhat"] < 1.1 and rec["coupling_ess"] > 50
    S0, S1 = rec["covariances"]
    ot = sg.inference.ot_cross_covariance(S0, S1)
    # posterior-mean plan at the default temperature: close to, but not exactly, the OT plan
    rel = np.linalg.norm(rec["cross_covariance"] - ot) / np.linalg.norm(ot)
    assert 0 < rel < 0.05
    # the spread of plans widens the perturbation distribution beyond the OT one, below independent
    tr = np.trace(rec["perturbation_cov"])
    tr_ot = np.trace(S0 + S1 - ot - ot.T)
    assert tr_ot < tr < np.trace(S0 + S1)
    w2 = sg.inference.gaussian_w2(*rec["means"][:1], S0, rec["means"][1], S1)
    assert rec["coupling_cost_mean"] >= w2 - 1e-9
    assert rec["coupling_cost_sd"] > 0


def test_screen_warns_when_hit_and_run_chains_do_not_mix(small_sim):
    """The worker's convergence check reaches the user: too few steps fail R-hat/ESS, and the
    screen says which perturbations and how to fix it."""
    pert = sorted(small_sim.uns["simulation"]["target_gene"])[0]
    with pytest.warns(RuntimeWarning, match=r"Hit-and-Run chains of 1 of 1 perturbations .*n_steps"):
        out = sg.tl.perturbation_response(small_sim, "perturbation", "control", copy=True, n_jobs=1,
                                          perturbations=[pert], coupling="hit_and_run",
                                          coupling_kwargs={"n_steps": 4})
    summary = out.uns["scotgm"]["summary"]
    assert not summary.loc[pert, "coupling_converged"]
    assert summary.loc[pert, "coupling_ess_bulk_min_cross_cov"] < 400


def test_the_coupling_changes_sigma_and_score_but_no_state_effect_rank_or_call(small_sim):
    out = {}
    for coupling in ("ot", "independent"):
        out[coupling] = sg.tl.perturbation_response(small_sim, "perturbation", "control", coupling=coupling,
                                                    n_jobs=1, copy=True)
    a, b = out["ot"], out["independent"]
    np.testing.assert_array_equal(a.obs["scotgm_p_perturbed"].to_numpy(), b.obs["scotgm_p_perturbed"].to_numpy())
    assert (a.obs["scotgm_class"] == b.obs["scotgm_class"]).all()
    ra, rb = sg.tl.get_responses(a), sg.tl.get_responses(b)
    for layer in ("effect", "effect_se", "effect_bound", "rank", "pval", "qval", "qval_screen", "mu"):
        np.testing.assert_array_equal(ra.layers[layer], rb.layers[layer], err_msg=layer)
    for layer in ("sigma", "score"):
        assert np.nanmax(np.abs(ra.layers[layer] - rb.layers[layer])) > 1e-3, layer

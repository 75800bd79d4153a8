"""Guide assignment from guide-capture counts (sg.pp.assign_guides) and the guide model's
per-guide perturbed fractions (sg.tl.guide_fractions, sg.tl.guide_model)."""

from __future__ import annotations

import re
import warnings

import anndata as ad
import mudata as md
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import scotgm_pp as sg
from scotgm_pp._guide_calls import call_guides, guide_log_odds, share_mixture
from scotgm_pp._validation import InputError


def papalexi_library(names) -> pd.DataFrame:
    """Papalexi's guides are named <target>g<k>; NTg<k> are the non-targeting controls."""
    names = np.asarray(names).astype(str)
    targets = ["non-targeting" if n.startswith("NT") else re.sub(r"g\d+$", "", n) for n in names]
    return pd.DataFrame({"guide": names, "target": targets})


@pytest.fixture(scope="session")
def guided():
    """The default simulated screen with three guides per target, guides assigned (from the
    obsm counts) and analysed; every guide has its own escape probability."""
    adata = sg.datasets.simulate(random_state=0, guides_per_target=3)
    sg.pp.assign_guides(adata, "guide_counts", adata.uns["simulation"]["guide_library"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the cells with several guides or none are reported unassigned
        sg.tl.perturbation_response(adata, "target", "control")
    return adata


# ------------------------------------------------------------------------------ the numeric part
def test_share_mixture_separates_two_known_components():
    rng = np.random.default_rng(0)
    truth = rng.random(2000) < 0.3
    y = np.where(truth, rng.normal(3.0, 0.8, 2000), rng.normal(-4.0, 1.2, 2000))
    post, fit = share_mixture(y)
    assert np.mean((post > 0.5) == truth) > 0.999
    assert fit["converged"]
    assert fit["signal_mean"] == pytest.approx(3.0, abs=0.1) and fit["background_mean"] == pytest.approx(-4.0, abs=0.1)
    assert fit["signal_weight"] == pytest.approx(truth.mean(), abs=0.01)


def test_log_odds_and_rule_calls_are_exact():
    counts = sp.csr_matrix(np.array([[10, 1, 0], [3, 3, 0], [0, 0, 0], [0, 6, 7]]))
    np.testing.assert_allclose(guide_log_odds(np.array([10.0]), np.array([11.0])), [np.log(10.5 / 1.5)])
    umi = call_guides(counts, "umi", threshold=5)
    np.testing.assert_array_equal(umi.called.toarray(), counts.toarray() >= 5)
    top = call_guides(counts, "max", threshold=2)
    # the maximum; both guides of a tie; nothing in an empty cell
    np.testing.assert_array_equal(top.called.toarray(), [[1, 0, 0], [1, 1, 0], [0, 0, 0], [0, 0, 1]])
    np.testing.assert_array_equal(top.n_guides, [1, 2, 0, 1])
    np.testing.assert_array_equal(top.single_guide(), [0, -1, -1, 2])
    assert np.isnan(top.call_probability()).all()


# ------------------------------------------------------------------------------ assign_guides
def test_assign_guides_recovers_the_simulated_guides(guided):
    obs = guided.obs
    single = obs["true_n_guides"].to_numpy() == 1
    right = obs["guide"].astype(object).to_numpy() == obs["true_guide"].astype(str).to_numpy()
    assert right[single].mean() >= 0.99
    counts = guided.uns["guide_assignment"]["counts"]
    assert counts["cells"] == guided.n_obs == counts["no_guide"] + counts["one_guide"] + counts["several_guides"]
    assert counts["several_guides"] == int((obs["n_guides"] > 1).sum()) > 0
    # the target is the library's for one guide, missing otherwise (a low-MOI run leaves those cells out)
    lib = guided.uns["simulation"]["guide_library"]
    one = obs["n_guides"].to_numpy() == 1
    assert (obs["target"].astype(object)[one] == obs["guide"].astype(str)[one].map(lib)).all()
    assert obs["target"][~one].isna().all()
    assert (guided.obs["scotgm_class"][~one] == "unassigned").all()
    # the probability of each cell's call: in [0, 1], high where one guide dominates
    p = obs["guide_probability"].to_numpy()
    assert np.all((p >= 0) & (p <= 1)) and np.median(p[one]) > 0.99
    table = guided.uns["guide_assignment"]["guides"]
    assert table["n_cells_assigned"].sum() == counts["one_guide"]
    assert (table["call_rule"] == "mixture").all() and table["converged"].all()


def test_assign_guides_reads_the_same_counts_in_every_shape():
    adata = sg.datasets.simulate(n_genes=60, n_perturbations=3, n_control=100, n_cells_per_perturbation=50,
                                 n_de_genes=5, random_state=3, guides_per_target=2)
    lib = adata.uns["simulation"]["guide_library"]
    names = adata.uns["guide_names"]
    base = sg.pp.assign_guides(adata, "guide_counts", lib, copy=True)
    assert "guide" not in adata.obs  # copy=True leaves the input alone
    gdo = ad.AnnData(X=adata.obsm["guide_counts"], obs=pd.DataFrame(index=adata.obs_names),
                     var=pd.DataFrame(index=names))
    rna = ad.AnnData(X=adata.X, obs=adata.obs[["perturbation"]].copy(), var=adata.var.copy())
    mdata = md.MuData({"rna": rna, "gdo": gdo})
    sg.pp.assign_guides(mdata, "gdo", pd.DataFrame({"guide": list(lib), "target": list(lib.values())}))
    shuffled = gdo[np.random.default_rng(0).permutation(gdo.n_obs)[:-7]].copy()  # reordered, 7 cells missing
    from_anndata = sg.pp.assign_guides(adata, shuffled, lib, copy=True)
    as_frame = adata.copy()
    as_frame.obsm["guide_counts"] = pd.DataFrame(adata.obsm["guide_counts"].toarray(), index=adata.obs_names,
                                                 columns=names)
    del as_frame.uns["guide_names"]
    from_frame = sg.pp.assign_guides(as_frame, "guide_counts", lib, copy=True)
    for other in (mdata["rna"].obs, from_frame.obs):
        pd.testing.assert_frame_equal(other[["guide", "n_guides", "target", "guide_probability"]],
                                      base.obs[["guide", "n_guides", "target", "guide_probability"]],
                                      check_categorical=False)
    missing = ~adata.obs_names.isin(shuffled.obs_names)
    assert from_anndata.uns["guide_assignment"]["counts"]["without_guide_data"] == 7
    assert (from_anndata.obs["n_guides"][missing] == 0).all()
    # the other cells' calls: the same up to the mixtures fitted without the 7 cells
    same = from_anndata.obs["guide"][~missing].astype(object) == base.obs["guide"][~missing].astype(object)
    assert same.mean() >= 0.99


def test_assign_guides_errors_name_the_input_and_the_fix(tmp_path):
    adata = sg.datasets.simulate(n_genes=60, n_perturbations=2, n_control=60, n_cells_per_perturbation=30,
                                 n_de_genes=5, random_state=4, guides_per_target=2)
    lib = dict(adata.uns["simulation"]["guide_library"])
    short = {g: t for g, t in lib.items() if not g.endswith("_g2")}
    with pytest.raises(InputError, match=r"not in the guide library, e.g. \['control_g2'"):
        sg.pp.assign_guides(adata, "guide_counts", short, copy=True)
    with pytest.raises(InputError, match=r"not a key of adata.obsm .*'guide_counts'"):
        sg.pp.assign_guides(adata, "grna_counts", lib, copy=True)
    with pytest.raises(InputError, match="library is required"):
        sg.pp.assign_guides(adata, "guide_counts", copy=True)
    with pytest.raises(InputError, match="method must be one of mixture, umi, max"):
        sg.pp.assign_guides(adata, "guide_counts", lib, method="gmm", copy=True)
    csv = tmp_path / "lib.csv"
    pd.DataFrame({"sgRNA": list(lib), "gene": list(lib.values())}).to_csv(csv, index=False)
    with pytest.raises(InputError, match=r"lacks column\(s\) \['guide', 'target'\]; its columns are \['sgRNA', "):
        sg.pp.assign_guides(adata, "guide_counts", csv, copy=True)
    clash = pd.DataFrame({"guide": ["a", "a"], "target": ["X", "Y"]})
    with pytest.raises(InputError, match=r"gives guide\(s\) \['a'\] more than one target"):
        sg.pp.read_guide_library(clash)
    nameless = adata.copy()
    del nameless.uns["guide_names"]
    with pytest.raises(InputError, match="no guide names for adata.obsm"):
        sg.pp.assign_guides(nameless, "guide_counts", lib, copy=True)
    mdata = md.MuData({"rna": adata.copy(), "gdo": ad.AnnData(adata.obsm["guide_counts"], obs=adata.obs[[]])})
    with pytest.raises(InputError, match=r"guides='crispr' is not a modality of the MuData; modalities: \['rna', "):
        sg.pp.assign_guides(mdata, "crispr", lib, copy=True)
    with pytest.raises(InputError, match=r"rna='gex' is not a modality"):
        sg.pp.assign_guides(mdata, "gdo", lib, rna="gex", copy=True)
    with pytest.warns(UserWarning, match=r"replaces the existing .obs column\(s\) \['guide'\]"):
        labelled = adata.copy()
        labelled.obs["guide"] = "x"
        sg.pp.assign_guides(labelled, "guide_counts", lib)


@pytest.mark.slow
def test_papalexi_assignment_agrees_with_the_published_guides(papalexi):
    names = papalexi.uns["grna_names"]
    lib = papalexi_library(names)
    with pytest.warns(UserWarning, match="replaces the existing .obs column"):  # Papalexi has a 'target'
        mixture = sg.pp.assign_guides(papalexi, "grna_counts", lib, copy=True)
        top = sg.pp.assign_guides(papalexi, "grna_counts", lib, method="max", threshold=1, copy=True)
    published = papalexi.obs["grna"].astype(str).to_numpy()
    confident = papalexi.obs["confident"].to_numpy(bool)
    agree = mixture.obs["guide"].astype(object).to_numpy() == published
    assert agree[confident].mean() >= 0.99  # measured 0.9977 on the 16,192 confident cells
    counts = mixture.uns["guide_assignment"]["counts"]
    assert 600 <= counts["several_guides"] <= 750  # measured 674
    assert counts["one_guide"] + counts["several_guides"] + counts["no_guide"] == papalexi.n_obs
    # the published guide is the one with the most UMIs: the "max" rule gives it back exactly
    assert np.array_equal(top.obs["guide"].astype(object).to_numpy(), published)
    assert "guide" not in papalexi.obs.columns  # copy=True: the session's data are untouched


# ------------------------------------------------------------------------------ guide fractions
def test_guide_fractions_follow_each_guides_efficiency(guided):
    table = sg.tl.guide_fractions(guided)
    obs = guided.obs
    assert len(table) == 24 and (table["escape_model"] == "on").all()
    analysed = obs["scotgm_p_perturbed"].notna()
    truth = np.array([1.0 - obs["escaped"][analysed & (obs["guide"] == g)].mean() for g in table["guide"]])
    assert np.corrcoef(table["fraction_perturbed"], truth)[0, 1] >= 0.9  # measured 0.967
    assert np.abs(table["fraction_perturbed"] - truth).mean() <= 0.06  # measured 0.038
    inside = (table["fraction_lower"] <= truth) & (truth <= table["fraction_upper"])
    assert inside.mean() >= 0.75  # 90% intervals; measured 22 of 24
    counts = obs.loc[analysed & obs["guide"].notna() & (obs["scotgm_class"] != "control"), "guide"]
    assert dict(zip(table["guide"], table["n_cells"])) == counts.astype(str).value_counts().to_dict()


@pytest.mark.slow
def test_guide_fractions_quadrature_is_the_pymc_graphs_posterior(guided):
    import pymc as pm

    table = sg.tl.guide_fractions(guided, perturbations=["G0019"])
    model = sg.tl.guide_model(guided, "G0019")
    assert list(model.coords["guide"]) == list(table["guide"])
    with model, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        idata = pm.sample(draws=1000, tune=1000, chains=2, random_seed=1, progressbar=False,
                          compute_convergence_checks=False)
    post = idata.posterior
    nuts = post["guide_fraction"].mean(("chain", "draw")).to_numpy()
    np.testing.assert_allclose(table["fraction_perturbed"], nuts, atol=0.015)
    for q, col in ((0.05, "fraction_lower"), (0.95, "fraction_upper")):
        np.testing.assert_allclose(table[col], post["guide_fraction"].quantile(q, ("chain", "draw")).to_numpy(),
                                   atol=0.03)
    assert table["target_fraction"].iloc[0] == pytest.approx(float(post["target_fraction"].mean()), abs=0.015)


def test_guide_fractions_errors(guided):
    with pytest.raises(InputError, match="guide_key 'sgRNA' is not a column of adata.obs; assign guides first"):
        sg.tl.guide_fractions(guided, guide_key="sgRNA")
    with pytest.raises(InputError, match=r"no results for perturbation\(s\) \['G9999'\]"):
        sg.tl.guide_fractions(guided, perturbations=["G9999"])



def test_guide_cells_without_a_guide_are_left_out_with_a_warning(guided):
    adata = guided.copy()
    cells = adata.obs_names[(adata.obs["target"] == "G0019").to_numpy()][:5]
    adata.obs["guide"] = adata.obs["guide"].astype(object)
    adata.obs.loc[cells, "guide"] = None
    with pytest.warns(UserWarning, match=r"left out of the guide model: \{'G0019': 5\}"):
        table = sg.tl.guide_fractions(adata, perturbations=["G0019"])
    full = sg.tl.guide_fractions(guided, perturbations=["G0019"])
    assert table["n_cells"].sum() == full["n_cells"].sum() - 5

"""From the sequencer's files to scanpy's structures: reading .h5mu and 10x .h5 screens, the
command line with guide counts and a guide library, sg.read_results, to_rank_genes_groups and the
Mixscape-style classes."""

from __future__ import annotations

import json
import shutil

import anndata as ad
import h5py
import mudata as md
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp

import scotgm_pp as sg
from scotgm_pp._validation import InputError
from scotgm_pp.cli import main

from .test_guides import papalexi_library


def write_10x_h5(path, counts: sp.csr_matrix, barcodes, names, feature_types) -> None:
    """A Cell Ranger v3 feature-barcode matrix (cells x features stored as features x cells CSC)."""
    counts = sp.csr_matrix(counts)
    with h5py.File(path, "w") as f:
        m = f.create_group("matrix")
        m["barcodes"] = np.asarray(barcodes, dtype="S")
        m["data"] = counts.data.astype(np.int32)
        m["indices"] = counts.indices.astype(np.int64)
        m["indptr"] = counts.indptr.astype(np.int64)
        m["shape"] = np.array([counts.shape[1], counts.shape[0]], dtype=np.int32)
        feats = m.create_group("features")
        feats["id"] = np.asarray(names, dtype="S")
        feats["name"] = np.asarray(names, dtype="S")
        feats["feature_type"] = np.asarray(feature_types, dtype="S")
        feats["genome"] = np.asarray(["GRCh38"] * len(names), dtype="S")
        feats["_all_tag_keys"] = np.array([b"genome"])


@pytest.fixture(scope="session")
def papalexi_run(papalexi, tmp_path_factory):
    """Papalexi written as a MuData (rna: the counts and the replicate; gdo: the guide counts),
    its guide library as CSV, and `scotgm run` on them: the folder."""
    base = tmp_path_factory.mktemp("papalexi_mudata")
    names = np.asarray(papalexi.uns["grna_names"]).astype(str)
    rna = ad.AnnData(X=papalexi.X, obs=papalexi.obs[["bio_rep"]].copy(), var=papalexi.var.copy())
    gdo = ad.AnnData(X=papalexi.obsm["grna_counts"], obs=pd.DataFrame(index=papalexi.obs_names),
                     var=pd.DataFrame(index=names))
    md.MuData({"rna": rna, "gdo": gdo}).write(base / "papalexi.h5mu")
    papalexi_library(names).to_csv(base / "library.csv", index=False)
    out = base / "run"
    code = main(["run", str(base / "papalexi.h5mu"), "--guide-modality", "gdo", "--guide-library",
                 str(base / "library.csv"), "--control", "non-targeting", "--out", str(out), "--quiet"])
    assert code == 0
    return out


@pytest.mark.slow
def test_stat1_from_guide_counts_to_scanpys_table(papalexi_run):
    """The issue's check: MuData + guide library through the command line, read back, in scanpy's
    structure: STAT1's own gene is called (q < 0.1) and goes down."""
    res = sg.read_results(papalexi_run)
    sg.tl.to_rank_genes_groups(res, key_added="scotgm_rgg")
    df = sc.get.rank_genes_groups_df(res, group="STAT1", key="scotgm_rgg")
    row = df.loc[df["names"] == "STAT1"].iloc[0]
    assert row["pvals_adj"] < 0.1 and row["logfoldchanges"] < 0
    assert df.index[df["names"] == "STAT1"][0] == 0  # the strongest response of its own knock-out
    effect = sg.tl.get_responses(res)[["STAT1"], ["STAT1"]].layers["effect"][0, 0]
    assert row["logfoldchanges"] == pytest.approx(effect / np.log(2), rel=1e-6)


@pytest.mark.slow
def test_every_getter_works_on_a_run_read_back(papalexi_run, tmp_path):
    summary = json.loads((papalexi_run / "summary.json").read_text())
    guides = summary["guides"]
    assert guides["one_guide"] + guides["several_guides"] + guides["no_guide"] == guides["cells"] == 20729
    assert guides["several_guides"] > 0 and guides["method"] == "mixture"
    moved = tmp_path / "moved"
    shutil.copytree(papalexi_run, moved)  # the record store follows the folder
    res = sg.read_results(moved)
    assert sg.tl.get_responses(res).shape == (25, 299)
    ranks = sg.tl.get_rankings(res, top=3)
    assert len(ranks) == 75 and set(ranks["rank"]) == {1, 2, 3}
    assert sg.tl.call_hits(res, fdr=0.1)["perturbation"].nunique() >= 10
    record = sg.tl.get_record(res, "STAT1")
    model = sg.tl.get_model(res, "STAT1")
    assert np.max(np.abs(model.idata.map_estimate["means"].values - record["state_means"])) <= 1e-10
    # the per-guide table the run wrote is the guide model's on the read-back results
    table = pd.read_csv(moved / "guide_fractions.csv")
    again = sg.tl.guide_fractions(res, perturbations=["IFNGR2", "STAT1"])  # in the table's order
    rows = table[table["perturbation"].isin(["STAT1", "IFNGR2"])]
    np.testing.assert_allclose(rows["fraction_perturbed"], again["fraction_perturbed"], rtol=1e-9)
    assert sorted(set(table["perturbation"])) == sorted(res.uns["scotgm"]["summary"].index)
    fallback = table["escape_model"].str.startswith("fallback")
    assert table.loc[fallback, "fraction_perturbed"].isna().all()
    assert table.loc[~fallback, "fraction_perturbed"].notna().all()
    assert res.uns["guide_assignment"]["counts"]["several_guides"] == guides["several_guides"]
    assert (res.obs["scotgm_class"][res.obs["n_guides"] != 1] == "unassigned").all()


@pytest.mark.slow
def test_rank_genes_groups_structure_and_mixscape_classes(papalexi_run, tmp_path):
    res = sg.read_results(papalexi_run)
    before = res.obs.copy()
    sg.tl.to_rank_genes_groups(res, order="rank", pvals_adj="qval")
    rgg = res.uns["rank_genes_groups"]
    resp = sg.tl.get_responses(res)
    assert list(rgg["names"].dtype.names) == list(resp.obs_names)
    assert rgg["params"]["groupby"] == "target" and rgg["params"]["reference"] == "non-targeting"
    for pert in ("STAT1", "IFNGR2", "ATF2"):
        i = resp.obs_names.get_loc(pert)
        rank = resp.layers["rank"][i]
        order = np.argsort(np.where(np.isfinite(rank), rank, np.inf), kind="stable")
        kept = np.isfinite(rank).sum()
        assert list(rgg["names"][pert][:kept]) == list(resp.var_names[order[:kept]])
        np.testing.assert_array_equal(rgg["pvals_adj"][pert][:kept], resp.layers["qval"][i, order[:kept]])
        np.testing.assert_allclose(rgg["scores"][pert][:kept], resp.layers["effect_z"][i, order[:kept]], rtol=1e-6)
    axes = sc.pl.rank_genes_groups(res, groups=["STAT1", "JAK2"], n_genes=5, show=False)
    assert len(axes) == 2
    res.write_h5ad(tmp_path / "with_rgg.h5ad")  # scanpy's structure survives a round trip
    back = ad.read_h5ad(tmp_path / "with_rgg.h5ad")
    pd.testing.assert_frame_equal(sc.get.rank_genes_groups_df(back, group="STAT1"),
                                  sc.get.rank_genes_groups_df(res, group="STAT1"))
    sg.tl.to_mixscape_classes(res)
    cls = res.obs["scotgm_class"].astype(str)
    glob = res.obs["scotgm_mixscape_class_global"].astype(object)
    assert ((glob == "KO") == (cls == "perturbed")).all()
    assert ((glob == "NP") == cls.isin(["escaped", "no effect"])).all()
    assert ((glob == "non-targeting") == (cls == "control")).all()
    ko = cls == "perturbed"
    assert (res.obs["scotgm_mixscape_class"][ko].astype(str) == res.obs["target"][ko].astype(str) + " KO").all()
    np.testing.assert_array_equal(res.obs["scotgm_mixscape_class_p_ko"], res.obs["scotgm_p_perturbed"])
    pd.testing.assert_frame_equal(res.obs[before.columns], before)


def test_read_screen_formats_and_a_10x_run_with_guides(tmp_path, capsys):
    adata = sg.datasets.simulate(n_genes=80, n_perturbations=3, n_control=150, n_cells_per_perturbation=80,
                                 n_de_genes=6, random_state=2, guides_per_target=2)
    guides = adata.obsm["guide_counts"]
    names = list(adata.var_names) + list(adata.uns["guide_names"])
    kinds = ["Gene Expression"] * adata.n_vars + ["CRISPR Guide Capture"] * guides.shape[1]
    write_10x_h5(tmp_path / "screen.h5", sp.hstack([adata.X, guides]).tocsr(), adata.obs_names, names, kinds)
    mdata = sg.read_screen(tmp_path / "screen.h5")
    assert set(mdata.mod) == {"rna", "gdo"} and mdata["gdo"].shape == guides.shape
    np.testing.assert_array_equal(mdata["rna"].X.toarray(), adata.X.toarray())
    lib = adata.uns["simulation"]["guide_library"]
    csv = tmp_path / "library.csv"
    pd.DataFrame({"guide": list(lib), "target": list(lib.values())}).to_csv(csv, index=False)
    out = tmp_path / "run"
    assert main(["run", str(tmp_path / "screen.h5"), "--guide-modality", "gdo", "--guide-library", str(csv),
                 "--control", "control", "--out", str(out), "--quiet"]) == 0
    assert "cells with one guide" in capsys.readouterr().out
    res = sg.read_results(out)
    python = sg.pp.assign_guides(adata, "guide_counts", lib, copy=True)
    for col in ("guide", "target"):  # the command line's calls are the Python function's
        assert res.obs[col].astype(object).fillna("-").equals(python.obs[col].astype(object).fillna("-"))
    np.testing.assert_array_equal(res.obs["n_guides"], python.obs["n_guides"])
    assert sorted(res.uns["scotgm"]["summary"].index) == sorted(adata.uns["simulation"]["target_gene"])
    # .h5ad and .h5mu come back as AnnData and MuData
    adata.write_h5ad(tmp_path / "screen.h5ad")
    mdata.write(tmp_path / "screen.h5mu")
    assert isinstance(sg.read_screen(tmp_path / "screen.h5ad"), ad.AnnData)
    assert isinstance(sg.read_screen(tmp_path / "screen.h5mu"), md.MuData)
    with pytest.raises(InputError, match="is not a screen file scotgm_pp reads"):
        sg.read_screen(csv)


def test_command_line_guide_options_are_checked(tmp_path, capsys):
    data = tmp_path / "x.h5ad"
    sg.datasets.simulate(n_genes=40, n_perturbations=2, n_control=40, n_cells_per_perturbation=20, n_de_genes=4,
                         random_state=0).write_h5ad(data)
    cases = [
        (["--guide-modality", "gdo"], "--guide-modality and --guide-library go together"),
        (["--guide-modality", "gdo", "--guide-library", "lib.csv"], "needs an .h5mu (MuData) or 10x .h5 file"),
        ([], "give --perturbation-key"),
        (["--guide-modality", "gdo", "--guide-library", "l.csv", "--perturbation-key", "perturbation"],
         "drop --perturbation-key perturbation"),
    ]
    for extra, message in cases:
        code = main(["run", str(data), "--control", "control", "--out", str(tmp_path / "o"), "--quiet", *extra])
        assert code == 2
        assert message in capsys.readouterr().err


def test_read_results_refuses_a_folder_without_a_finished_run(tmp_path):
    with pytest.raises(InputError, match="is not a folder"):
        sg.read_results(tmp_path / "nowhere")
    (tmp_path / "half" / ".scotgm-run").mkdir(parents=True)
    with pytest.raises(InputError, match="holds an unfinished run"):
        sg.read_results(tmp_path / "half")

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import scotgm_pp as sg
from scotgm_pp._validation import InputError


def test_simulate_is_seeded_and_carries_ground_truth(sim):
    again = sg.datasets.simulate(random_state=0)
    other = sg.datasets.simulate(random_state=1)
    assert (sim.X != again.X).nnz == 0
    assert (sim.X != other.X).nnz > 0
    truth = sim.uns["simulation"]
    assert sp.issparse(sim.X) and np.issubdtype(sim.X.dtype, np.integer)
    perts = set(sim.obs["perturbation"].astype(str)) - {"control"}
    assert perts == set(truth["target_gene"])
    for pert, gene in truth["target_gene"].items():
        assert gene in sim.var_names
        assert truth["de_genes"][pert][gene] == -1
        assert len(truth["de_genes"][pert]) == 13  # 12 downstream genes + the target
    guide = sim.obs["perturbation"] != "control"
    assert not sim.obs.loc[~guide, "escaped"].any()
    assert abs(sim.obs.loc[guide, "escaped"].mean() - 0.3) < 0.05


def test_simulated_knockdown_is_visible_in_counts(sim):
    truth = sim.uns["simulation"]
    X = sim.X.toarray() / np.asarray(sim.X.sum(axis=1))
    ctrl = (sim.obs["perturbation"] == "control").to_numpy()
    for pert, gene in truth["target_gene"].items():
        hit = ((sim.obs["perturbation"] == pert) & ~sim.obs["escaped"]).to_numpy()
        j = sim.var_names.get_loc(gene)
        ratio = X[hit, j].mean() / X[ctrl, j].mean()
        assert 0.03 < ratio < 0.25  # 10% knock-down, seen through count noise


def test_simulated_library_sizes_are_realistic(sim):
    totals = np.asarray(sim.X.sum(axis=1)).ravel()
    assert 1000 < np.median(totals) < 5000
    assert (sim.X.toarray() == 0).mean() > 0.25  # sparse, with dropout


def test_read_validates_and_supports_scperturb_layout(tmp_path, small_sim):
    path = tmp_path / "screen.h5ad"
    small_sim.write_h5ad(path)
    adata = sg.datasets.read(path)  # scPerturb: obs["perturbation"] with "control"
    assert adata.shape == small_sim.shape
    with pytest.raises(InputError, match="control label 'NT' not found"):
        sg.datasets.read(path, "perturbation", "NT")
    with pytest.raises(InputError, match="perturbation_key 'guide' not in adata.obs"):
        sg.datasets.read(path, "guide", "control")
    with pytest.raises(FileNotFoundError):
        sg.datasets.read(tmp_path / "missing.h5ad")


def test_read_rejects_normalised_data_and_points_to_counts(tmp_path, small_sim):
    bad = small_sim.copy()
    bad.X = sp.csr_matrix(np.log1p(bad.X.toarray().astype(float)))
    bad.layers["counts"] = small_sim.X.copy()
    path = tmp_path / "norm.h5ad"
    bad.write_h5ad(path)
    with pytest.raises(InputError, match="raw UMI counts"):
        sg.datasets.read(path)
    ok = sg.datasets.read(path, layer="counts")
    assert (ok.X != small_sim.X).nnz == 0


def test_papalexi_reads(papalexi):
    assert papalexi.shape == (20729, 299)
    counts = papalexi.obs["target"].value_counts()
    assert counts["non-targeting"] == 2386
    assert len(counts) == 26
    assert isinstance(papalexi.obs, pd.DataFrame)


def test_write_simulated_streams_a_screen_to_disk(tmp_path):
    import anndata as ad

    from scotgm_pp._screen import H5adRows

    path = sg.datasets.write_simulated(tmp_path / "big.h5ad", n_genes=120, n_perturbations=7, n_control=500,
                                       n_cells_per_perturbation=40, chunk_cells=130, random_state=3)
    a = ad.read_h5ad(path)
    assert a.shape == (780, 120) and a.X.dtype == np.int32
    counts = a.obs["perturbation"].value_counts()
    assert counts["control"] == 500 and (counts.drop("control") == 40).all() and len(counts) == 8
    truth = a.uns["simulation"]["target_gene"]
    assert sorted(truth) == sorted(counts.drop("control").index)
    # cells are shuffled, and rows read lazily equal the rows in memory
    assert (a.obs["perturbation"].to_numpy()[:500] != "control").any()
    rows = np.array([700, 3, 129, 130, 131, 5])
    np.testing.assert_array_equal(H5adRows(path).read(rows).toarray(), a.X[rows].toarray())
    # a knocked-down target is low in its perturbed cells
    pert = sorted(truth)[0]
    hit = (a.obs["perturbation"] == pert).to_numpy() & ~a.obs["escaped"].to_numpy()
    g = list(a.var_names).index(truth[pert])
    ctrl = (a.obs["perturbation"] == "control").to_numpy()
    assert a.X[hit, g].mean() < 0.3 * a.X[ctrl, g].mean()

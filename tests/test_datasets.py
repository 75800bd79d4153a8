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


def _batch_phi(adata, n_top=20):
    """Per-batch moment estimate of the NB overdispersion phi = 1 / size over the control cells and
    the ``n_top`` most expressed genes: with ``mu = s_i * q_j`` (``s_i`` the cell's true library
    size, ``q_j`` the gene's pooled share in that batch), ``phi = sum((y - mu)^2 - mu) / sum(mu^2)``."""
    X = adata.X.toarray().astype(float)
    s = adata.obs["library_size"].to_numpy(float)
    ctrl = (adata.obs["perturbation"] == "control").to_numpy()
    top = np.argsort(np.asarray(adata.uns["simulation"]["base_log_share"]))[::-1][:n_top]
    batch = adata.obs["batch"].astype(str).to_numpy()
    out = {}
    for b in sorted(set(batch)):
        rows = ctrl & (batch == b)
        y, sb = X[rows][:, top], s[rows]
        mu = sb[:, None] * (y.sum(axis=0) / sb.sum())[None, :]
        out[b] = float(((y - mu) ** 2 - mu).sum() / (mu ** 2).sum())
    return out


# no expression programs (their log-normal noise would add to phi) and no dropout: the counts'
# overdispersion is the NB's alone. Over 40 seeds the estimates of phi = 0.05 and 0.5 had sd
# 0.0026 and 0.028 (ranges 0.044-0.057 and 0.40-0.56); the default size 10 gives 0.1 in both.
_PHI_SCREEN = dict(n_genes=100, n_perturbations=2, n_control=800, n_cells_per_perturbation=20, n_de_genes=5,
                   dropout=0.0, n_programs=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_simulate_batch_dispersion_sets_each_batch_phi(seed):
    adata = sg.datasets.simulate(n_batches=2, batch_dispersion=(20, 2), random_state=seed, **_PHI_SCREEN)
    phi = _batch_phi(adata)
    assert abs(phi["b0"] - 0.05) < 0.0125, phi
    assert abs(phi["b1"] - 0.5) < 0.125, phi
    truth = adata.uns["simulation"]
    assert truth["batch_dispersion"] == {"b0": 20.0, "b1": 2.0}
    assert truth["settings"]["batch_dispersion"] == [20.0, 2.0]
    # without batch_dispersion both batches share the default size 10 (phi 0.1): the test can fail
    pooled = _batch_phi(sg.datasets.simulate(n_batches=2, random_state=seed, **_PHI_SCREEN))
    assert all(abs(v - 0.1) < 0.015 for v in pooled.values()), pooled
    assert abs(pooled["b0"] - 0.05) > 0.03 and abs(pooled["b1"] - 0.5) > 0.3


def test_simulate_batch_dispersion_follows_batch_order():
    adata = sg.datasets.simulate(n_control=900, n_batches=3, batch_dispersion=(2, 20, 5), random_state=4,
                                 **{k: v for k, v in _PHI_SCREEN.items() if k != "n_control"})
    phi = _batch_phi(adata)
    assert abs(phi["b0"] - 0.5) < 0.125 and abs(phi["b1"] - 0.05) < 0.0125 and abs(phi["b2"] - 0.2) < 0.05, phi
    assert adata.uns["simulation"]["batch_dispersion"] == {"b0": 2.0, "b1": 20.0, "b2": 5.0}


def test_simulate_batch_dispersion_none_keeps_the_screen(tmp_path):
    kw = dict(n_genes=80, n_perturbations=3, n_control=120, n_cells_per_perturbation=60, n_de_genes=6, n_batches=2,
              random_state=1)
    base, same = sg.datasets.simulate(**kw), sg.datasets.simulate(batch_dispersion=None, **kw)
    assert (base.X != same.X).nnz == 0
    assert (base.obs["batch"] == same.obs["batch"]).all()
    assert "batch_dispersion" not in same.uns["simulation"]
    assert "batch_dispersion" not in same.uns["simulation"]["settings"]
    # batches and expression are drawn before the counts: only the counts' noise changes
    other = sg.datasets.simulate(batch_dispersion=[10, 10.0], **kw)
    assert (base.obs["batch"] == other.obs["batch"]).all()
    assert np.allclose(base.obs["library_size"], other.obs["library_size"])
    other.write_h5ad(tmp_path / "b.h5ad")  # the recorded truth is writable


@pytest.mark.parametrize(
    ("n_batches", "value", "match"),
    [
        (1, (20, 2), "needs n_batches > 1"),
        (2, (20, 2, 5), "has 3 sizes but n_batches=2"),
        (3, (20, 2), "has 2 sizes but n_batches=3"),
        (2, (20, 0), "finite and > 0"),
        (2, (20, -1), "finite and > 0"),
        (2, (20, np.nan), "finite and > 0"),
        (2, (np.inf, 2), "finite and > 0"),
        (2, 5.0, "one per batch"),
        (2, "20,2", "one per batch"),
        (2, ((20, 2), (2, 20)), "one per batch"),
        (2, ("a", "b"), "must hold numbers"),
    ],
)
def test_simulate_batch_dispersion_rejects_bad_values(n_batches, value, match):
    with pytest.raises(ValueError, match=match):
        sg.datasets.simulate(n_genes=60, n_perturbations=2, n_control=40, n_cells_per_perturbation=20, n_de_genes=4,
                             n_batches=n_batches, batch_dispersion=value)

"""Figures: each function returns a Figure showing the numbers it was given; save_run_figures writes PNGs."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.figure import Figure

import scotgm_pp as sg
from scotgm_pp import pl
from scotgm_pp.inference.hit_and_run import sample_coupling
from scotgm_pp.tl._predict import observed_response, predict_response


@pytest.fixture(scope="module")
def pert(sim_fitted):
    return sorted(sim_fitted.uns["scotgm"]["summary"].index)[0]


def test_perturbation_distribution(sim_fitted, pert):
    de = sim_fitted.uns["simulation"]["de_genes"][pert]
    fig = pl.perturbation_distribution(sim_fitted, pert, "scotgm", de_genes=de, n_top=5)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    sizes = [len(c.get_offsets()) for c in ax.collections]
    n_genes = len(sg.tl.get_record(sim_fitted, pert)["genes"])
    assert sizes == [n_genes, len(de), 5]
    assert len(ax.texts) == 5
    assert "target rank" in ax.get_title()


def test_predicted_vs_observed(sim_fitted, pert):
    obs = observed_response(sim_fitted, pert)
    pred = predict_response(sim_fitted, pert, n_draws=20)
    fig = pl.predicted_vs_observed(sim_fitted, pert, prediction=pred, observed=obs)
    ax = fig.axes[0]
    n_deg = int(((obs["padj"] < 0.05) & (obs["gene"] != pert)).sum())
    shown = sum(len(c.get_offsets()) for c in ax.collections if c.get_offsets().ndim == 2
                and type(c).__name__ == "PathCollection")
    assert shown == n_deg
    assert f"{n_deg} genes" in ax.get_title()
    with pytest.raises(ValueError, match="observed"):
        pl.predicted_vs_observed(sim_fitted, pert)


def test_confusion_matrix(sim_fitted, pert):
    fig = pl.confusion_matrix(sim_fitted, pert, "scotgm")
    M = sg.tl.get_record(sim_fitted, pert)["confusion"]
    texts = [t.get_text().split("\n")[0] for t in fig.axes[0].texts]
    assert sorted(map(int, texts)) == sorted(int(v) for v in np.ravel(M))


@pytest.mark.filterwarnings("ignore:Hit-and-Run chains")
def test_coupling_diagnostics():
    rng = np.random.default_rng(0)
    A, B = rng.normal(size=(2, 2, 2))
    res = sample_coupling(A @ A.T + np.eye(2), B @ B.T + np.eye(2), n_steps=300, n_chains=2, random_state=0)
    fig = pl.coupling_diagnostics(res.idata)
    assert isinstance(fig, Figure) and len(fig.axes) >= 3
    assert "R-hat" in fig.axes[2].get_title()
    with pytest.raises(ValueError, match="posterior"):
        pl.coupling_diagnostics(None)


def test_save_run_figures(sim_fitted, tmp_path):
    summary = sim_fitted.uns["scotgm"]["summary"]
    screen_only = pl.save_run_figures(sim_fitted, "scotgm", tmp_path / "screen")
    assert sorted(p.name for p in screen_only) == ["screen_summary.png", "target_ranks.png"]
    named = summary.index[[2, 5]].tolist()
    paths = pl.save_run_figures(sim_fitted, "scotgm", tmp_path / "figures", perturbations=named, top=2,
                                de_genes=sim_fitted.uns["simulation"]["de_genes"])
    chosen = pl.figure_perturbations(sim_fitted, "scotgm", named=named, top=2)
    assert chosen[:2] == named and len(chosen) == 4 and len(set(chosen)) == 4
    # distribution + confusion + predicted-vs-observed per chosen perturbation (targets are measured),
    # + the two screen figures; files are named by the perturbation's safe key
    assert len(paths) == 3 * 4 + 2
    assert {p.name for p in paths} >= {f"{summary.loc[c, 'key']}_confusion.png" for c in chosen}
    for p in paths:
        assert p.exists() and p.suffix == ".png" and p.read_bytes()[:4] == b"\x89PNG"

"""Benchmark metrics on hand-made cases, and a tiny end-to-end run on simulated data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from scotgm_pp import datasets
from scotgm_pp.benchmark import (
    DEFAULT_SCOTGM,
    direction_accuracy,
    fisher_overlap,
    rank_of,
    resolve_methods,
    run_benchmark,
    signed_f1,
    topk_accuracy,
    topk_table,
)


def test_rank_of_orders_most_negative_first_and_nan_last():
    s = pd.Series({"a": 0.5, "b": -2.0, "c": np.nan, "d": -1.0})
    assert rank_of(s, "b") == 1
    assert rank_of(s, "d") == 2
    assert rank_of(s, "a") == 3
    assert rank_of(s, "c") == 4
    assert np.isnan(rank_of(s, "missing"))


def test_topk_accuracy_counts_missing_as_miss():
    ranks = [1, 2, 3, 7, 60, np.nan]
    assert topk_accuracy(ranks, 1) == pytest.approx(1 / 6)
    assert topk_accuracy(ranks, 3) == pytest.approx(3 / 6)
    assert topk_accuracy(ranks, 10) == pytest.approx(4 / 6)
    assert topk_accuracy(ranks, 50) == pytest.approx(4 / 6)


def test_topk_table_one_row_a_method():
    df = pd.DataFrame({"method": ["x", "x", "y", "y"], "rank": [1, 4, 2, 11]})
    t = topk_table(df)
    assert list(t["method"]) == ["x", "y"]
    assert list(t.columns[:7]) == ["method", "top1", "top3", "top5", "top10", "top50", "n"]
    assert t.loc[0, "top1"] == 0.5 and t.loc[0, "top5"] == 1.0
    assert t.loc[1, "top1"] == 0.0 and t.loc[1, "top3"] == 0.5 and t.loc[1, "top50"] == 1.0
    assert list(t["n"]) == [2, 2]


def test_fisher_overlap_matches_scipy_on_hand_table():
    universe = [f"g{i}" for i in range(20)]
    selected = ["g0", "g1", "g2", "g3", "g10", "outside"]  # "outside" is not in the universe
    known = ["g0", "g1", "g2", "g5", "g6"]
    p, overlap = fisher_overlap(selected, known, universe)
    # table: [[3 (g0-2), 2 (g3, g10)], [2 (g5, g6), 13]]
    assert overlap == 3
    expected = stats.fisher_exact([[3, 2], [2, 13]], alternative="greater").pvalue
    assert p == pytest.approx(expected)
    # hypergeometric by hand: P(X >= 3), X ~ Hypergeom(N=20, K=5, n=5)
    assert p == pytest.approx(stats.hypergeom.sf(2, 20, 5, 5))


def test_direction_accuracy_and_signed_f1_by_hand():
    predicted = {"a": -1.2, "b": 0.5, "c": 2.0, "d": -0.1}  # the method's selected genes
    known = {"a": -1, "b": -1, "c": 1, "e": 1, "f": -1}
    acc, n = direction_accuracy(predicted, known)
    assert n == 3 and acc == pytest.approx(2 / 3)  # a and c right, b wrong; d not a known DEG
    # TP = 2 (a, c); precision 2/4, recall 2/5; F1 = 2 * 0.5 * 0.4 / 0.9
    assert signed_f1(predicted, known) == pytest.approx(2 * 0.5 * 0.4 / 0.9)
    assert np.isnan(direction_accuracy({"z": 1.0}, known)[0])
    assert signed_f1({"b": 1.0}, known) == 0.0


def test_resolve_methods_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown method 'deseq'"):
        resolve_methods(["deseq"])
    # the model-free count test is not credited to sc-OTGM under its old name
    with pytest.raises(ValueError, match="renamed.*'nb-all-guides'"):
        resolve_methods(["scotgm-ot:lfc_bound"])
    assert set(resolve_methods(["nb-all-guides", "scotgm-ot:mu_sigma", "scotgm-ot"])) == {
        "nb-all-guides", "scotgm-ot:mu_sigma", "scotgm-ot"}


@pytest.fixture(scope="module")
def sim_result(tmp_path_factory):
    adata = datasets.simulate(n_genes=120, n_perturbations=3, n_control=200, n_cells_per_perturbation=80,
                              random_state=1)
    out = tmp_path_factory.mktemp("bench")
    res = run_benchmark(adata, "perturbation", "control", n_target=60, n_control=150, seeds=2,
                        methods=[DEFAULT_SCOTGM, "scotgm-ot", "t-test", "wilcoxon", "logfc"],
                        out_dir=out, n_top_genes=20)
    return adata, res, out


def test_end_to_end_on_simulated_screen(sim_result):
    adata, res, out = sim_result
    topk = pd.read_csv(out / "topk.csv")
    assert DEFAULT_SCOTGM == "scotgm-ot:effect_shrunk"
    methods = [DEFAULT_SCOTGM, "scotgm-ot", "t-test", "wilcoxon", "logfc"]
    assert list(topk["method"]) == methods
    assert {"method", "top1", "top3", "top5", "top10", "top50", "n", "default"} <= set(topk.columns)
    assert topk["n"].tolist() == [6] * 5  # 3 targets x 2 seeds
    assert topk.loc[topk["default"], "method"].tolist() == [DEFAULT_SCOTGM]
    model_score = res.topk.set_index("method").loc["scotgm-ot"]
    assert model_score["top1"] >= 0.6  # measured 0.67 (ranks 1-2) on this simulation
    assert model_score["top5"] == 1.0
    assert res.topk.set_index("method").loc[DEFAULT_SCOTGM, "top1"] == 1.0  # measured 1.0
    ranks = pd.read_csv(out / "ranks.csv")
    assert list(ranks.columns) == ["method", "target", "seed", "rank"]
    assert len(ranks) == 30
    deg = pd.read_csv(out / "deg.csv")
    assert len(deg) == 30
    # the simulated DEGs are strong: the top 20 genes overlap the known DEGs far beyond chance
    assert (deg["fisher_p"] < 0.05).mean() >= 0.9  # measured 29 of 30
    assert deg.groupby("method")["fisher_p"].median().max() < 0.005  # measured 5e-4 at most
    summ = res.deg_summary.set_index("method")
    assert summ.loc[DEFAULT_SCOTGM, "direction_accuracy"] >= 0.95  # measured 1.0
    assert summ.loc[DEFAULT_SCOTGM, "f1"] >= 0.3  # measured about 0.4, top 20 vs 13 known DEGs
    assert (out / "report.md").exists() and (out / "topk_curves.png").exists()
    assert res.failures.empty


def test_same_seed_same_result(sim_result):
    adata, res, _ = sim_result
    again = run_benchmark(adata, "perturbation", "control", n_target=60, n_control=150, seeds=1,
                          methods=["t-test"], deg=False)
    first = res.ranks[(res.ranks["method"] == "t-test") & (res.ranks["seed"] == 0)].reset_index(drop=True)
    pd.testing.assert_frame_equal(again.ranks, first)

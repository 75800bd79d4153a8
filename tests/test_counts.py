"""The negative-binomial count layer (tl.count_shift) and the stratified Mann-Whitney baseline."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from scotgm_pp.tl import count_shift, universal_threshold
from scotgm_pp.tl._counts import PSEUDOCOUNT, bound_order_score, nb_dispersion


def _nb(rng, mean, phi):
    """NB draws with var = mean + phi mean^2 (Gamma-Poisson)."""
    if phi == 0:
        return rng.poisson(mean)
    return rng.poisson(rng.gamma(1.0 / phi, mean * phi))


def test_fold_change_is_the_ratio_of_pooled_rates():
    rng = np.random.default_rng(0)
    y = rng.poisson(3.0, size=(50, 4)).astype(float)
    y[:, 0] = 0.0
    y[0, 0] = 5.0  # gene 0: only one control cell has counts
    ctrl = np.arange(50) < 30
    lib = y.sum(axis=1)
    tab = count_shift(y, ctrl)
    want = (np.log((y[~ctrl].sum(0) + PSEUDOCOUNT) / lib[~ctrl].sum())
            - np.log((y[ctrl].sum(0) + PSEUDOCOUNT) / lib[ctrl].sum()))
    np.testing.assert_allclose(tab["lfc"], want, rtol=0, atol=1e-12)
    lam = universal_threshold(4)
    assert lam == pytest.approx(np.sqrt(2 * np.log(4)), abs=1e-15)
    soft = np.sign(tab["lfc"]) * np.maximum(np.abs(tab["lfc"]) - lam * tab["lfc_se"], 0)
    np.testing.assert_allclose(tab["lfc_bound"], soft, atol=1e-15)
    np.testing.assert_allclose(tab["lfc_z"], tab["lfc"] / tab["lfc_se"], rtol=1e-12)


def test_poisson_standard_error_is_the_delta_method_one():
    # With no over-dispersion the variance of a log rate is 1 / (expected total count).
    y = np.array([[2, 0], [1, 1], [3, 0], [0, 2], [4, 1], [2, 2]], float)
    ctrl = np.array([True, True, True, False, False, False])
    tab = count_shift(y, ctrl)
    phi = nb_dispersion(y, y.sum(1), (~ctrl).astype(int))
    lib = y.sum(1)
    var = 0.0
    for m in (ctrl, ~ctrl):
        rate = (y[m].sum(0) + PSEUDOCOUNT) / lib[m].sum()
        mu = lib[m, None] * rate
        var = var + (mu * (1 + phi * mu)).sum(0) / mu.sum(0) ** 2
    np.testing.assert_allclose(tab["lfc_se"], np.sqrt(var), rtol=1e-12)


def test_null_z_is_calibrated_under_overdispersion():
    # 2000 null genes, NB with phi = 0.5, libraries varying 4-fold: z ~ N(0, 1).
    rng = np.random.default_rng(1)
    n0, n1, g = 300, 60, 2000
    lib = rng.uniform(100, 400, n0 + n1)
    base = rng.uniform(0.005, 0.05, g)
    mean = lib[:, None] * base[None, :]
    y = rng.poisson(rng.gamma(2.0, mean * 0.5))  # phi = 0.5
    ctrl = np.arange(n0 + n1) < n0
    tab = count_shift(y, ctrl)
    assert np.median(tab["dispersion"]) == pytest.approx(0.5, abs=0.08)
    z = tab["lfc_z"].to_numpy()
    assert abs(z.mean()) < 0.08
    assert 0.9 < z.std() < 1.1
    # the universal bound is 0 for (nearly) every null gene
    assert np.mean(tab["lfc_bound"] != 0) < 0.01


def test_true_fold_changes_are_covered():
    rng = np.random.default_rng(2)
    n0, n1, g = 300, 200, 400
    lib = rng.uniform(150, 300, n0 + n1)
    ctrl = np.arange(n0 + n1) < n0
    base = rng.uniform(0.01, 0.04, g)
    true = rng.normal(0, 0.5, g)
    rate = np.where(ctrl[:, None], base[None, :], base[None, :] * np.exp(true)[None, :])
    y = rng.poisson(rng.gamma(5.0, lib[:, None] * rate * 0.2))  # phi = 0.2
    tab = count_shift(y, ctrl)
    # Offsets are the cells' total counts, so the estimand is the fold change of each gene's share.
    estimand = true - np.log(np.sum(base * np.exp(true)) / np.sum(base))
    covered = np.abs(tab["lfc"] - estimand) < 1.96 * tab["lfc_se"]
    assert 0.92 <= covered.mean() <= 0.98


def test_batches_unevenly_represented_do_not_read_as_a_response():
    # In batch B the first 150 genes have twice their batch-A level; controls are mostly A,
    # guide cells mostly B, and nothing responds to the guide.
    rng = np.random.default_rng(3)
    batch = np.array(["A"] * 240 + ["B"] * 60 + ["A"] * 15 + ["B"] * 45)
    ctrl = np.arange(360) < 300
    level = np.ones((360, 300))
    level[np.ix_(batch == "B", np.arange(150))] = 2.0
    y = rng.poisson(0.02 * level * 30)
    pooled = count_shift(y, ctrl)
    strat = count_shift(y, ctrl, batch=batch)
    # pooled: the batch shift of the sensitive genes reads as a response
    assert pooled["lfc"][:150].mean() - pooled["lfc"][150:].mean() > 0.25
    assert abs(strat["lfc"].mean()) < 0.03
    assert 0.85 < strat["lfc_z"].std() < 1.15


def test_weights_select_the_perturbed_state():
    # Half of the guide cells lose 80% of gene 0; weighting by the true state recovers log(0.2).
    rng = np.random.default_rng(4)
    ctrl = np.arange(1300) < 300
    perturbed = ~ctrl & (np.arange(1300) % 2 == 0)
    lib = np.full(1300, 500.0)
    rate = np.full((1300, 200), 0.02)  # many genes: losing gene 0 barely changes a cell's total
    rate[perturbed, 0] *= 0.2
    y = rng.poisson(lib[:, None] * rate)
    avg = count_shift(y, ctrl)
    state = count_shift(y, ctrl, weights=perturbed.astype(float))
    assert state.loc[0, "lfc"] == pytest.approx(np.log(0.2), abs=0.1)
    assert avg.loc[0, "lfc"] == pytest.approx(np.log(0.6), abs=0.08)


def test_bound_order_score_sorts_like_bound_then_z():
    bound = np.array([0.0, -0.3, 0.0, 0.2, -0.3, 0.0])
    z = np.array([-2.0, -5.0, 1.5, 6.0, -9.0, -2.5])
    got = np.argsort(bound_order_score(bound, z), kind="stable")
    want = np.lexsort((z, bound))
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"weights": np.full(6, 1.5)}, "weights must be one finite value in \\[0, 1\\]"),
        ({"batch": np.array(["a"] * 6)}, "no stratum has 2 control cells"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    y = np.ones((6, 3))
    ctrl = np.array([True, True, True, True, True, False])
    with pytest.raises(ValueError, match=message):
        count_shift(y, ctrl, **kwargs)


def test_negative_or_empty_cells_are_refused():
    y = np.ones((6, 3))
    ctrl = np.arange(6) < 3
    with pytest.raises(ValueError, match="non-negative"):
        count_shift(y - 2, ctrl)
    y[0] = 0
    with pytest.raises(ValueError, match="cells with no counts"):
        count_shift(y, ctrl)


def test_van_elteren_equals_mann_whitney_without_batches_and_ignores_batch_shifts():
    import anndata as ad

    from scotgm_pp.benchmark._methods import Pair, van_elteren_method
    from scotgm_pp.pp import PreprocessParams

    rng = np.random.default_rng(5)
    X = rng.poisson(2.0, size=(80, 6)).astype(float)
    ctrl = np.arange(80) < 50
    names = [f"c{i}" for i in range(80)]
    genes = [f"g{j}" for j in range(6)]

    def pair(values, batch):
        a = ad.AnnData(values, obs=pd.DataFrame(index=names), var=pd.DataFrame(index=genes))
        return Pair(counts=a, is_control=ctrl, lognorm=a, seed=0, params=PreprocessParams(), batch=batch)

    z = van_elteren_method(pair(X, None)).to_numpy()
    for j in range(6):
        p = stats.mannwhitneyu(X[~ctrl, j], X[ctrl, j], use_continuity=False, method="asymptotic").pvalue
        assert abs(z[j]) == pytest.approx(stats.norm.isf(p / 2), rel=1e-9)
    batch = np.where(np.arange(80) % 3 == 0, "r1", "r2")
    shifted = X + np.where(batch == "r1", 100.0, 0.0)[:, None]
    a = van_elteren_method(pair(X, batch)).to_numpy()
    b = van_elteren_method(pair(shifted, batch)).to_numpy()
    np.testing.assert_allclose(a, b, atol=1e-12)
    assert np.max(np.abs(van_elteren_method(pair(shifted, None)).to_numpy() - z)) > 0.5


def test_given_dispersion_is_used_and_checked():
    rng = np.random.default_rng(6)
    y = rng.poisson(2.0, size=(40, 10)).astype(float)
    ctrl = np.arange(40) < 25
    tab = count_shift(y, ctrl, dispersion=0.0)
    var = sum(1.0 / (y[m].sum(0) + PSEUDOCOUNT) for m in (ctrl, ~ctrl))  # Poisson: 1 / expected total
    np.testing.assert_allclose(tab["lfc_se"], np.sqrt(var), rtol=1e-12)
    assert np.all(tab["dispersion"] == 0)
    with pytest.raises(ValueError, match="dispersion must be finite and non-negative"):
        count_shift(y, ctrl, dispersion=-1.0)

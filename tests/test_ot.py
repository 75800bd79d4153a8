import numpy as np
import pytest
from scipy.linalg import sqrtm

from scotgm_pp.inference import coupling_cost, gaussian_w2, ot_cross_covariance, perturbation_covariance, psd_sqrt


def _spd(rng, m, cond=10.0):
    Q, _ = np.linalg.qr(rng.normal(size=(m, m)))
    w = np.geomspace(1.0, cond, m)
    return (Q * w) @ Q.T


@pytest.mark.parametrize("m", [2, 5, 20])
def test_ot_cross_covariance_matches_textbook_formula(m):
    rng = np.random.default_rng(m)
    Sx, Sy = _spd(rng, m), _spd(rng, m, cond=50.0)
    # Independent computation: C* = Sx^{1/2} (Sx^{1/2} Sy Sx^{1/2})^{1/2} Sx^{-1/2} via scipy.linalg.sqrtm.
    r = np.real(sqrtm(Sx))
    expected = r @ np.real(sqrtm(r @ Sy @ r)) @ np.linalg.inv(r)
    C = ot_cross_covariance(Sx, Sy)
    assert np.max(np.abs(C - expected)) < 1e-9 * np.max(np.abs(expected))


def test_ot_cost_equals_gaussian_w2_and_is_minimal():
    rng = np.random.default_rng(0)
    m = 6
    Sx, Sy = _spd(rng, m), _spd(rng, m, cond=30.0)
    mx, my = rng.normal(size=m), rng.normal(size=m)
    C = ot_cross_covariance(Sx, Sy)
    w2 = gaussian_w2(mx, Sx, my, Sy)
    # W2^2 by the Bures formula with scipy's sqrtm, computed independently.
    r = np.real(sqrtm(Sx))
    bures = np.sum((mx - my) ** 2) + np.trace(Sx) + np.trace(Sy) - 2 * np.trace(np.real(sqrtm(r @ Sy @ r)))
    assert coupling_cost(mx, Sx, my, Sy, C) == pytest.approx(bures, rel=1e-10)
    assert w2 == pytest.approx(bures, rel=1e-10)
    # Every other coupling C = Lx K Ly, ||K|| <= 1, costs at least as much.
    Lx, Ly = psd_sqrt(Sx), psd_sqrt(Sy)
    for _ in range(200):
        K = rng.normal(size=(m, m))
        K /= np.linalg.norm(K, 2)
        assert coupling_cost(mx, Sx, my, Sy, Lx @ K @ Ly) >= w2 - 1e-10


def test_ot_coupling_is_a_valid_joint_covariance_even_when_singular():
    rng = np.random.default_rng(3)
    A = rng.normal(size=(5, 2))
    Sx = A @ A.T  # rank 2
    Sy = _spd(rng, 5)
    C = ot_cross_covariance(Sx, Sy)
    joint = np.block([[Sx, C], [C.T, Sy]])
    assert np.linalg.eigvalsh(joint).min() > -1e-9
    assert np.all(np.isfinite(C))


def test_identical_gaussians_are_coupled_by_the_identity_map():
    S = _spd(np.random.default_rng(4), 4)
    C = ot_cross_covariance(S, S)
    assert np.allclose(C, S, atol=1e-10)
    assert np.allclose(perturbation_covariance(S, S, C), 0.0, atol=1e-9)
    assert np.allclose(perturbation_covariance(S, S, np.zeros_like(S)), 2 * S)


def test_bad_covariances_are_named():
    with pytest.raises(ValueError, match="square"):
        ot_cross_covariance(np.ones((2, 3)), np.eye(2))
    with pytest.raises(ValueError, match="non-finite"):
        ot_cross_covariance(np.array([[np.nan, 0], [0, 1]]), np.eye(2))
    with pytest.raises(ValueError, match="same shape"):
        ot_cross_covariance(np.eye(2), np.eye(3))

"""What the published sc-OTGM Algorithm 1 actually estimates (scotgm_pp.inference.paper)."""

from __future__ import annotations

import numpy as np
import pytest

from scotgm_pp.inference.ot import ot_cross_covariance
from scotgm_pp.inference.paper import paper_cross_covariance


def _setup(m: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((m, m))
    B = rng.standard_normal((m, m))
    Sx = A @ A.T / m + 0.1 * np.eye(m)
    Sy = B @ B.T / m + 0.1 * np.eye(m)
    return rng.standard_normal(m), Sx, rng.standard_normal(m), Sy


def _rel(A, B) -> float:
    return float(np.linalg.norm(A - B) / np.linalg.norm(B))


def test_vectorised_equals_literal_loop():
    mu_x, Sx, mu_y, Sy = _setup()
    C_star = ot_cross_covariance(Sx, Sy)
    a = paper_cross_covariance(mu_x, Sx, mu_y, Sy, n_iter=3000, ground_truth=C_star, random_state=4)
    b = paper_cross_covariance(mu_x, Sx, mu_y, Sy, n_iter=3000, ground_truth=C_star, random_state=4,
                               vectorised=False)
    np.testing.assert_allclose(a.cross_covariance, b.cross_covariance, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(a.errors, b.errors, rtol=1e-10)


def test_converges_to_outer_product_of_means_not_to_any_coupling():
    """Two independent Gaussians: the independent coupling has C = 0, the OT one C*.

    The published estimate goes to mu_x mu_y^T instead: far from both.
    """
    mu_x, Sx, mu_y, Sy = _setup()
    C_star = ot_cross_covariance(Sx, Sy)
    target = np.outer(mu_x, mu_y)
    ests = [paper_cross_covariance(mu_x, Sx, mu_y, Sy, n_iter=100_000, random_state=s).cross_covariance
            for s in range(3)]
    C = np.mean(ests, axis=0)
    assert _rel(C, target) < 0.15  # measured 0.10
    assert _rel(C, C_star) > 1.0  # measured 1.68: nowhere near the OT coupling
    assert np.linalg.norm(C) / np.linalg.norm(C_star) > 1.0  # measured 1.36: nor near 0 (independent)


def test_estimate_ignores_the_covariances():
    """Same means, very different Sy (so a different C*): the estimate hardly moves."""
    mu_x, Sx, mu_y, Sy = _setup()
    a = paper_cross_covariance(mu_x, Sx, mu_y, Sy, n_iter=50_000, random_state=1).cross_covariance
    b = paper_cross_covariance(mu_x, Sx, mu_y, 4.0 * Sx, n_iter=50_000, random_state=1).cross_covariance
    C_star_a, C_star_b = ot_cross_covariance(Sx, Sy), ot_cross_covariance(Sx, 4.0 * Sx)
    assert _rel(C_star_b, C_star_a) > 0.5
    assert _rel(a, np.outer(mu_x, mu_y)) < 0.3 and _rel(b, np.outer(mu_x, mu_y)) < 0.3


def test_error_to_ot_coupling_does_not_decrease():
    mu_x, Sx, mu_y, Sy = _setup()
    C_star = ot_cross_covariance(Sx, Sy)
    res = paper_cross_covariance(mu_x, Sx, mu_y, Sy, n_iter=20_000, ground_truth=C_star, random_state=2)
    rel = res.errors / np.linalg.norm(C_star)
    assert rel.shape == (20_000,)
    assert rel[-1] > 1.0 and np.median(rel[-5000:]) > 1.0


def test_bad_input():
    with pytest.raises(ValueError, match="square"):
        paper_cross_covariance(np.zeros(2), np.ones((2, 3)), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="mu_y"):
        paper_cross_covariance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(2))
    with pytest.raises(ValueError, match="positive semi-definite"):
        paper_cross_covariance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))

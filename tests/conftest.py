"""Shared, session-scoped fixtures: simulated screens, fitted results and the real data."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")

import scotgm_pp as sg  # noqa: E402

MEASURED_TARGETS = ["CMTM6", "IFNGR2", "JAK2", "NFKBIA", "STAT1", "STAT2", "STAT3", "TNFRSF14", "UBE2L6"]


def papalexi_file() -> Path:
    """The real data: $SCOTGM_DATA_DIR, else ../shared/data relative to the repository root."""
    env = os.environ.get("SCOTGM_DATA_DIR")
    base = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"
    return base / "papalexi2021_eccite_subset.h5ad"


@pytest.fixture(scope="session")
def papalexi():
    path = papalexi_file()
    if not path.exists():
        if os.environ.get("SCOTGM_REQUIRE_DATA"):
            pytest.fail(f"real data required but not found at {path} (set SCOTGM_DATA_DIR)")
        pytest.skip(f"real data not found at {path}")
    return sg.datasets.read(path, "target", "non-targeting")


@pytest.fixture(scope="session")
def sim():
    """The embedded default screen (seed 0)."""
    return sg.datasets.simulate(random_state=0)


@pytest.fixture(scope="session")
def sim_fitted(sim):
    """The default screen analysed with the default settings (a copy; `sim` stays untouched)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sg.tl.perturbation_response(sim, "perturbation", "control", copy=True)


@pytest.fixture(scope="session")
def small_sim():
    """A small screen for fast checks of errors and bookkeeping."""
    return sg.datasets.simulate(
        n_genes=80, n_perturbations=3, n_control=120, n_cells_per_perturbation=60, n_de_genes=6, random_state=1
    )


def pytest_collection_modifyitems(config, items):
    """Run the notebooks (minutes each) first, so that with ``-n 2`` the two processes finish
    together instead of one waiting on a notebook started last."""
    items.sort(key=lambda item: 0 if item.nodeid.split("::")[0].endswith("test_notebooks.py") else 1)

"""Guide capture for :func:`scotgm_pp.datasets.simulate`: several guides per target, each with its
own efficiency, guide UMI counts with ambient background, and cells carrying a second guide."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

__all__ = ["SimulatedGuides", "draw_guides", "guide_counts"]

GUIDE_UMI_MEAN = 60.0
"""Mean UMIs of a cell's own guide (negative binomial, size :data:`GUIDE_UMI_SIZE`, plus one)."""
GUIDE_UMI_SIZE = 1.5
AMBIENT_SHARE = 0.04
"""Ambient guide UMIs of a cell, spread over every guide: 2 plus this share of its own guides' UMIs
(Poisson): ambient RNA is captured with the cell's own, so deeper cells carry more."""


@dataclass
class SimulatedGuides:
    """The guides of a simulated screen.

    Attributes
    ----------
    names
        Guide names: ``"<target>_g1"`` ... for each perturbation, ``"<control>_g1"`` ... for
        controls.
    library
        Guide -> target (the control label for control guides).
    escape
        Guide -> its probability that a cell carrying it escapes (1 - efficiency; 0 for controls).
    guide
        Column of each cell's own guide.
    second
        Column of a second guide the cell also carries, -1 for none.
    """

    names: np.ndarray
    library: dict
    escape: dict
    guide: np.ndarray
    second: np.ndarray

    def escape_of_cells(self) -> np.ndarray:
        return np.array([self.escape[self.names[g]] for g in self.guide])


def draw_guides(rng: np.random.Generator, labels: np.ndarray, control_label: str, per_target: int,
                escape_fraction: float, escape_spread: float, multiplet_rate: float) -> SimulatedGuides:
    """Guides for cells labelled ``labels``: ``per_target`` guides per label (controls too), each
    cell one of its label's guides at random; each targeting guide's escape probability uniform on
    ``escape_fraction +- escape_spread`` (within [0, 0.95]); a share ``multiplet_rate`` of the cells
    also carries a random other guide."""
    targets = list(dict.fromkeys(labels.tolist()))  # in order of appearance: controls first
    names, library, escape = [], {}, {}
    first = {}
    lo, hi = max(0.0, escape_fraction - escape_spread), min(0.95, escape_fraction + escape_spread)
    for t in targets:
        first[t] = len(names)
        for k in range(per_target):
            name = f"{t}_g{k + 1}"
            names.append(name)
            library[name] = t
            escape[name] = 0.0 if t == control_label else float(rng.uniform(lo, hi))
    names = np.array(names)
    guide = np.array([first[t] for t in labels]) + rng.integers(per_target, size=labels.size)
    second = np.where(rng.random(labels.size) < multiplet_rate, rng.integers(names.size, size=labels.size), -1)
    second[second == guide] = -1
    return SimulatedGuides(names=names, library=library, escape=escape, guide=guide, second=second)


def guide_counts(rng: np.random.Generator, guides: SimulatedGuides) -> sp.csr_matrix:
    """Cells x guides UMI counts: each carried guide ``1 + NB(GUIDE_UMI_MEAN, GUIDE_UMI_SIZE)``,
    plus ambient UMIs spread over the guides in proportion to a Dirichlet profile."""
    n, g = guides.guide.size, guides.names.size
    p = GUIDE_UMI_SIZE / (GUIDE_UMI_SIZE + GUIDE_UMI_MEAN)
    own = 1 + rng.negative_binomial(GUIDE_UMI_SIZE, p, size=n)
    extra = 1 + rng.negative_binomial(GUIDE_UMI_SIZE, p, size=n)
    has_second = guides.second >= 0
    signal = own + np.where(has_second, extra, 0)
    profile = rng.dirichlet(np.full(g, 2.0))
    ambient = rng.poisson((2.0 + AMBIENT_SHARE * signal)[:, None] * profile[None, :])
    ambient[np.arange(n), guides.guide] += own
    ambient[np.flatnonzero(has_second), guides.second[has_second]] += extra[has_second]
    return sp.csr_matrix(ambient.astype(np.int32))

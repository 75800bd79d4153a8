"""scotgm_pp: sc-OTGM for single-cell CRISPR screens, as a probabilistic program.

Submodules: :mod:`~scotgm_pp.datasets` (simulated and real screens), :mod:`~scotgm_pp.pp`
(preprocessing, PCA), :mod:`~scotgm_pp.tl` (perturbation responses, rankings, escaped cells),
:mod:`~scotgm_pp.pl` (figures), :mod:`~scotgm_pp.io` (reading screens and finished runs:
``sg.read_screen``, ``sg.read_results``), :mod:`~scotgm_pp.models` (the PyMC graph and the ScOTGM model
class), :mod:`~scotgm_pp.inference` (EM, transport couplings, Hit-and-Run) and
:mod:`~scotgm_pp.benchmark`. Every submodule is imported on first access (``sg.tl``, ``from
scotgm_pp import tl``), so that ``import scotgm_pp`` and the command line start in a fraction of
a second (the command line starts its Dask workers before it loads the rest).
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("scotgm_pp")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

_LAZY = ("datasets", "inference", "io", "pp", "tl", "models", "pl", "benchmark")
_FUNCTIONS = {"read_results": "io", "read_screen": "io"}
"""Top-level functions, imported from their submodule on first access."""

__all__ = ["__version__", "benchmark", "datasets", "inference", "io", "models", "pl", "pp", "read_results",
           "read_screen", "tl"]


def __getattr__(name):
    if name in _LAZY:
        return import_module(f".{name}", __name__)
    if name in _FUNCTIONS:
        return getattr(import_module(f".{_FUNCTIONS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | set(_FUNCTIONS))

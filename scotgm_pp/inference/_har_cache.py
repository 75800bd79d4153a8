"""On-disk cache of the compiled Hit-and-Run kernels, kept out of the package folder.

``@njit(cache=True)`` writes next to the source (``__pycache__`` inside the installed package)
whenever that folder is writable, and numba keys each cached function on its own file only, so
a change in a kernel it calls from another file can leave a stale binary.  Instead, the
kernels are compiled with ``cache=False`` and, on first use (never at import),
:func:`enable_kernel_cache` gives each of them a numba ``FunctionCache`` whose only locator
points at

    ``$NUMBA_CACHE_DIR/scotgm_pp-har/<hash>``  if the user set ``NUMBA_CACHE_DIR``, else
    ``<user cache dir>/numba/scotgm_pp-har/<hash>`` (e.g. ``~/.cache/numba/...`` on Linux),

where ``<hash>`` digests the source of every kernel file, so any edit starts a fresh cache.
This uses numba's ``numba.core.caching`` classes (present in numba 0.65); if they are missing
or the directory is not writable, the kernels are compiled in memory each session (about
20-30 s once per process) and nothing is written anywhere.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

_KERNEL_MODULES = ("_har_kernel", "_har_rotations", "_har_spectral", "_har_sweep")
_state = {"enabled": None}


def _source_hash() -> str:
    here = Path(__file__).parent
    digest = hashlib.sha256()
    for name in _KERNEL_MODULES:
        digest.update((here / f"{name}.py").read_bytes())
    return digest.hexdigest()[:16]


def kernel_cache_dir() -> Path:
    """Directory the compiled kernels are cached in (see the module docstring)."""
    from numba import config
    from numba.misc.appdirs import AppDirs

    base = config.CACHE_DIR or AppDirs(appname="numba", appauthor=False).user_cache_dir
    return Path(base) / "scotgm_pp-har" / _source_hash()


def enable_kernel_cache() -> bool:
    """Attach the user-directory cache to every compiled kernel (idempotent).  Returns whether
    caching is on."""
    if _state["enabled"] is not None:
        return _state["enabled"]
    try:
        from importlib import import_module

        from numba.core.caching import (
            CompileResultCacheImpl,
            FunctionCache,
            UserWideCacheLocator,
        )
        from numba.core.dispatcher import Dispatcher

        path = str(kernel_cache_dir())

        class _Locator(UserWideCacheLocator):
            def __init__(self, py_func, py_file):
                super().__init__(py_func, py_file)
                self._cache_path = path

        class _Impl(CompileResultCacheImpl):
            _locator_classes = (_Locator,)

        class _Cache(FunctionCache):
            _impl_class = _Impl

        kernels = []
        for name in _KERNEL_MODULES:
            module = import_module(f"{__package__}.{name}")
            kernels += [obj for obj in vars(module).values()
                        if isinstance(obj, Dispatcher) and obj.py_func.__module__ == module.__name__]
        caches = [_Cache(k.py_func) for k in kernels]  # raises if the directory is not writable
        for kernel, cache in zip(kernels, caches):
            kernel._cache = cache
        _state["enabled"] = True
    except Exception:  # noqa: BLE001 - no cache is a slower start, never a wrong result
        _state["enabled"] = False
    return _state["enabled"]


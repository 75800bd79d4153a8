"""Saved models are checked on load: a digest of the stored numbers and settings, and the
settings against the arrays they describe.

A netCDF file can be edited by anyone (``settings`` is a JSON string in the attrs). A model whose
settings no longer match its arrays, such as state names swapped so that "perturbed" labels the
basal state, would silently return the perturbation with its sign flipped; :func:`verify`
refuses it instead.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

__all__ = ["digest", "verify", "DIGEST_ATTR"]

DIGEST_ATTR = "sha256"


def digest(idata) -> str:
    """SHA-256 of every group's variables (names, dimensions, dtypes, values, coordinates) and of
    the attrs other than the digest itself."""
    h = hashlib.sha256()
    for group in sorted(idata.groups()):
        ds = getattr(idata, group)
        h.update(f"[{group}]".encode())
        for name in sorted(ds.variables):
            var = ds.variables[name]
            values = np.asarray(var.values)
            h.update(f"{name}|{var.dims}|{values.dtype.str if values.dtype.kind != 'O' else 'O'}".encode())
            if values.dtype.kind in "OUS":
                h.update("\x1f".join(map(str, values.ravel().tolist())).encode())
            else:
                h.update(np.ascontiguousarray(values).tobytes())
    attrs = {k: v for k, v in idata.attrs.items() if k != DIGEST_ATTR}
    h.update(json.dumps(attrs, sort_keys=True, default=str).encode())
    return h.hexdigest()


def verify(idata, path) -> dict:
    """Check a loaded InferenceData; return its settings. Raises ValueError naming the problem."""
    if "settings" not in idata.attrs:
        raise ValueError(f"{path} is not a saved ScOTGM model (no 'settings' in its attrs).")
    stored = idata.attrs.get(DIGEST_ATTR)
    if stored is None:
        raise ValueError(f"{path} has no {DIGEST_ATTR} digest: it was not written by ScOTGM.save (or was edited); "
                         "refit and save the model.")
    if stored != digest(idata):
        raise ValueError(f"{path} was altered after it was saved (its {DIGEST_ATTR} digest does not match its "
                         "contents); refit and save the model.")
    settings = json.loads(idata.attrs["settings"])
    post = idata.posterior
    names = [str(s) for s in post.coords["state"].values] if "state" in post.coords else None
    if names is not None and (settings.get("state_names") != names or settings.get("n_states") != len(names)):
        raise ValueError(f"{path}: the settings name the states {settings.get('state_names')} but the arrays hold "
                         f"{names}; the file is inconsistent.")
    return settings

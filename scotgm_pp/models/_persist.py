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

from .._tree import group, group_names, has_group, set_group

__all__ = ["digest", "verify", "upgrade", "DIGEST_ATTR"]

DIGEST_ATTR = "sha256"
LEGACY_POINT_GROUP = "map"
"""The point-estimate group's name in files of format 2 (scotgm_pp 0.1, written through ArviZ 0.x)."""
POINT_GROUP = "map_estimate"
"""The result tree's group of EM and MAP point estimates (no ``chain`` / ``draw`` dimensions)."""


def digest(idata) -> str:
    """SHA-256 of every group's variables (names, dimensions, dtypes, values, coordinates) and of
    the attrs other than the digest itself."""
    h = hashlib.sha256()
    for name in sorted(group_names(idata)):
        ds = group(idata, name)
        h.update(f"[{name}]".encode())
        for name in sorted(ds.variables):
            var = ds.variables[name]
            values = np.asarray(var.values)
            h.update(f"{name}|{var.dims}|{values.dtype.str if values.dtype.kind != 'O' else 'O'}".encode())
            if values.dtype.kind in "OUS":
                h.update("\x1f".join(map(str, values.ravel().tolist())).encode())
            else:
                h.update(np.ascontiguousarray(values).tobytes())
    attrs = {k: v for k, v in idata.attrs.items() if k != DIGEST_ATTR}
    # numbers read back from netCDF are numpy scalars: hash them as the Python numbers written
    h.update(json.dumps(attrs, sort_keys=True, default=lambda v: v.item() if isinstance(v, np.generic) else str(v))
             .encode())
    return h.hexdigest()


def verify(idata, path) -> dict:
    """Check a loaded result tree (a DataTree read from a file of format 2 or 3); return
    ``{"model_config", "sampler_config", "settings"}``. Raises ValueError naming the problem."""
    if "settings" not in idata.attrs:
        raise ValueError(f"{path} is not a saved ScOTGM model (no 'settings' in its attrs).")
    if "model_config" not in idata.attrs:
        raise ValueError(f"{path} was saved by an older scotgm_pp (no model_config in its attrs); refit and save "
                         "the model with this version.")
    stored = idata.attrs.get(DIGEST_ATTR)
    if stored is None:
        raise ValueError(f"{path} has no {DIGEST_ATTR} digest: it was not written by ScOTGM.save (or was edited); "
                         "refit and save the model.")
    if stored != digest(idata):
        raise ValueError(f"{path} was altered after it was saved (its {DIGEST_ATTR} digest does not match its "
                         "contents); refit and save the model.")
    config = {key: json.loads(idata.attrs[key]) for key in ("model_config", "sampler_config", "settings")}
    point = next((g for g in ("posterior", POINT_GROUP, LEGACY_POINT_GROUP) if has_group(idata, g)), None)
    ds = None if point is None else group(idata, point)
    names = [str(s) for s in ds.coords["state"].values] if ds is not None and "state" in ds.coords else None
    mc = config["model_config"]
    if names is not None and (mc.get("state_names") != names or mc.get("n_states") != len(names)):
        raise ValueError(f"{path}: the model_config names the states {mc.get('state_names')} but the arrays hold "
                         f"{names}; the file is inconsistent.")
    return config


def upgrade(idata) -> None:
    """Bring a verified tree of an older format to the current one, in place.

    Format 2 (scotgm_pp 0.1) kept the EM/MAP point estimates in a group ``map``, a name that
    shadows ``xarray.Dataset.map``; it becomes ``map_estimate``. Nothing else differs.
    """
    if has_group(idata, LEGACY_POINT_GROUP) and not has_group(idata, POINT_GROUP):
        ds = group(idata, LEGACY_POINT_GROUP)
        del idata[LEGACY_POINT_GROUP]
        set_group(idata, POINT_GROUP, ds)
    idata.attrs["format_version"] = "3"
    idata.attrs.pop(DIGEST_ATTR, None)

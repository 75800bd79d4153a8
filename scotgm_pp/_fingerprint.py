"""What a result depends on, as a fingerprint: every setting that changes it, and the content read.

A stored result (a record in a ``store=`` folder, a finished perturbation of an interrupted
``scotgm run``) is reused only when the fingerprint it was made under equals the present one:

* the settings (:class:`~scotgm_pp.tl._plan.RunSettings`, every model option, the resampling
  count), the layer the counts come from, and the package version;
* the content read: a SHA-256 digest streamed over the count matrix while the planning pass reads
  it anyway (the values and the sparse structure, block by block), over the cell and gene names,
  the perturbation labels and the batch labels. A file edited in place keeps its name, size or
  modification time at will; its digest changes.

:func:`describe_changes` turns two fingerprints into the words of an error: what changed.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import scipy.sparse as sp

__all__ = ["ContentDigest", "digest_strings", "fingerprint_id", "describe_changes", "canonical"]

_CONTENT_WORDS = {
    "shape": "the matrix shape",
    "matrix": "the count values",
    "obs_names": "the cell names",
    "var_names": "the gene names",
    "labels": "the perturbation labels",
    "batches": "the batch labels",
}


def _plain(v):
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return str(v)


def canonical(obj) -> dict:
    """``obj`` as plain JSON values (what is written to disk and compared)."""
    return json.loads(json.dumps(obj, default=_plain, sort_keys=True))


def fingerprint_id(obj) -> str:
    """A short identifier of a fingerprint (32 hex digits of the SHA-256 of its canonical JSON)."""
    return hashlib.sha256(json.dumps(canonical(obj), sort_keys=True).encode()).hexdigest()[:32]


def digest_strings(values) -> str:
    """SHA-256 of a sequence of strings (each one's UTF-8 bytes and its length, so no two
    sequences share a digest by where their boundaries fall)."""
    encoded = [str(v).encode("utf-8", "surrogatepass") for v in values]
    h = hashlib.sha256()
    h.update(np.fromiter((len(b) for b in encoded), dtype=np.int64, count=len(encoded)).tobytes())
    h.update(b"".join(encoded))
    return h.hexdigest()


class ContentDigest:
    """Digest of a count matrix fed one row block at a time, in row order.

    The row lengths, the column indices and the values (as float64, explicit zeros removed) are
    hashed as three streams, so the digest does not depend on how the rows were cut into blocks,
    nor on the integer or float type the counts are stored in.
    """

    def __init__(self):
        self._parts = [hashlib.sha256() for _ in range(3)]
        self.n_rows = 0
        self.n_cols = None

    def update(self, block: sp.csr_matrix) -> None:
        """Add the next rows (a CSR block of float64 values without explicit zeros)."""
        lengths, indices, data = self._parts
        lengths.update(np.diff(block.indptr).astype(np.int64).tobytes())
        index_type = np.int32 if block.shape[1] < 2**31 else np.int64  # whatever type the file stores
        indices.update(np.ascontiguousarray(block.indices, dtype=index_type).tobytes())
        data.update(np.ascontiguousarray(block.data, dtype=np.float64).tobytes())
        self.n_rows += block.shape[0]
        self.n_cols = block.shape[1]

    def hexdigest(self) -> str:
        h = hashlib.sha256(f"{self.n_rows}x{self.n_cols}".encode())
        for part in self._parts:
            h.update(part.digest())
        return h.hexdigest()


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict) and k != "input":
            out.update(_flatten(v, "" if k == "settings" else f"{name}."))
        else:
            out[name] = v
    return out


def describe_changes(old: dict, new: dict) -> str:
    """The differences between two fingerprints in words, e.g. ``"layer 'counts' -> None; the
    count values"`` (settings with their old and new values, content by what it is)."""
    old_input, new_input = (old or {}).get("input") or {}, (new or {}).get("input") or {}
    a, b = _flatten({k: v for k, v in (old or {}).items() if k != "input"}), \
        _flatten({k: v for k, v in (new or {}).items() if k != "input"})
    changes = [f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    for k in [*_CONTENT_WORDS, *sorted((set(old_input) | set(new_input)) - set(_CONTENT_WORDS))]:
        if old_input.get(k) != new_input.get(k):
            changes.append(_CONTENT_WORDS.get(k, f"input.{k}"))
    return "; ".join(changes) or "the fingerprint's format"

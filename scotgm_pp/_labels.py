"""Perturbation labels are keys, never paths.

Labels come from users' ``.obs`` columns and can hold anything: ``"A/B"``, ``"/"``, ``".."``,
spaces, non-ASCII letters, thousands of characters. Wherever a label names something on disk (an
HDF5 group, a file) it is replaced by :func:`label_key`: a short, safe, unique and reversible
key. The mapping is stored beside the results (``responses.obs["key"]``).
"""

from __future__ import annotations

import hashlib
from urllib.parse import quote, unquote

__all__ = ["label_key", "key_label", "MAX_KEY_LENGTH"]

MAX_KEY_LENGTH = 120
"""Longest key kept verbatim; longer ones are cut and end in a digest of the whole label (file
names are limited to 255 bytes)."""

_SAFE = "-_"  # with ASCII letters and digits, the only characters left as they are


def label_key(label: str) -> str:
    """A file- and HDF5-safe key for a perturbation label.

    ``"p_"`` followed by the label percent-encoded (every byte outside ``[A-Za-z0-9_-]``, so
    ``"/"``, ``"."`` and ``"~"`` too, becomes ``%XX``). Distinct labels give distinct keys, and
    :func:`key_label` reverses it. Labels whose encoding exceeds :data:`MAX_KEY_LENGTH` are cut
    and end in ``"~"`` plus 16 hex digits of the SHA-256 of the label (then not reversible: the
    stored mapping is).
    """
    if not isinstance(label, str):
        raise TypeError(f"a perturbation label must be a str, got {type(label).__name__}.")
    key = "p_" + quote(label, safe=_SAFE).replace(".", "%2E").replace("~", "%7E")
    if len(key) <= MAX_KEY_LENGTH:
        return key
    digest = hashlib.sha256(label.encode("utf-8")).hexdigest()[:16]
    head = key[: MAX_KEY_LENGTH - 17]
    head = head[: head.rfind("%")] if "%" in head[-2:] else head  # never cut inside an escape
    return f"{head}~{digest}"


def key_label(key: str) -> str:
    """The label of a key made by :func:`label_key` (for keys that were not shortened)."""
    if not key.startswith("p_") or "~" in key:
        raise ValueError(f"{key!r} is not a reversible perturbation key; look it up in the stored mapping.")
    return unquote(key[2:])

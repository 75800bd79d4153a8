"""Perturbation labels are keys, never paths.

Labels come from users' ``.obs`` columns and can hold anything: ``"A/B"``, ``"/"``, ``".."``,
spaces, non-ASCII letters, thousands of characters. Wherever a label names something on disk (an
HDF5 group, a file) it is replaced by :func:`label_key`: a short, safe, unique and reversible
key. The mapping is stored beside the results (``responses.obs["key"]``).

Keys stay distinct where file names are compared without case (macOS, Windows) or after Unicode
normalisation (macOS): a key is plain ASCII, so normalisation leaves it alone, and a label with a
lower-case ASCII letter carries the case of its letters in a suffix, so ``"GeneA"`` and
``"genea"`` never share a file.
"""

from __future__ import annotations

import hashlib
from urllib.parse import quote, unquote

__all__ = ["label_key", "key_label", "MAX_KEY_LENGTH"]

MAX_KEY_LENGTH = 120
"""Longest key kept verbatim; longer ones are cut and end in a digest of the whole label (file
names are limited to 255 bytes)."""

_SAFE = "-_"  # with ASCII letters and digits, the only characters left as they are
_LOWER = frozenset("abcdefghijklmnopqrstuvwxyz")
_UPPER = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _case_suffix(label: str) -> str:
    """``""`` when no ASCII letter of ``label`` is lower case, else ``"."`` and a hexadecimal mask
    whose bit ``i`` is set when the ``i``-th ASCII letter is lower case."""
    letters = [c in _LOWER for c in label if c in _LOWER or c in _UPPER]
    if not any(letters):
        return ""
    mask = sum(1 << i for i, lower in enumerate(letters) if lower)
    return f".{mask:x}"


def label_key(label: str) -> str:
    """A file- and HDF5-safe key for a perturbation label.

    ``"p_"`` followed by the label percent-encoded (every byte outside ``[A-Za-z0-9_-]``, so
    ``"/"``, ``"."`` and ``"~"`` too, becomes ``%XX``) and, when the label has a lower-case ASCII
    letter, ``"."`` and a hexadecimal mask of its lower-case letters. Distinct labels give keys
    that differ even when compared without case or after Unicode normalisation (NFC, NFD): the
    encoding is ASCII, its escapes upper case, and the mask restores what case folding removes.
    :func:`key_label` reverses it. Keys longer than :data:`MAX_KEY_LENGTH` are cut and end in
    ``"~"`` plus 16 hex digits of the SHA-256 of the label (then not reversible: the stored
    mapping is).
    """
    if not isinstance(label, str):
        raise TypeError(f"a perturbation label must be a str, got {type(label).__name__}.")
    encoded = "p_" + quote(label, safe=_SAFE, errors="surrogatepass").replace(".", "%2E").replace("~", "%7E")
    key = encoded + _case_suffix(label)
    if len(key) <= MAX_KEY_LENGTH:
        return key
    digest = hashlib.sha256(label.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    head = encoded[: MAX_KEY_LENGTH - 17]
    head = head[: head.rfind("%")] if "%" in head[-2:] else head  # never cut inside an escape
    return f"{head}~{digest}"


def key_label(key: str) -> str:
    """The label of a key made by :func:`label_key` (for keys that were not shortened)."""
    if not key.startswith("p_") or "~" in key:
        raise ValueError(f"{key!r} is not a reversible perturbation key; look it up in the stored mapping.")
    return unquote(key[2:].split(".", 1)[0], errors="surrogatepass")

"""The command line's argument types and error wording: bounded numbers checked at parse time,
one-line argparse errors, and the message of a full or read-only disk. Imports nothing heavy."""

from __future__ import annotations

import argparse
import errno
import math

__all__ = ["MAX_INT", "MAX_PCS", "Parser", "int_arg", "number_arg", "positive_int", "seed", "fraction",
           "storage_error"]

MAX_INT = 2**31 - 1
"""Upper bound of the counting arguments (cells, genes, figures): far above any screen, and
within every integer type the outputs store."""
MAX_PCS = 10_000
"""Upper bound of ``--n-pcs`` (the model keeps at most ``max_pcs``, 100 by default, anyway)."""


def int_arg(minimum: int, maximum: int, what: str = "an integer"):
    """An argparse type: an integer in ``[minimum, maximum]``, refused before any work."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(f"expected {what} from {minimum} to {maximum:,}, got {value}")
        return value

    parse.__name__ = what  # argparse names the type by it in its messages
    return parse


positive_int = int_arg(1, MAX_INT, "a positive integer")
seed = int_arg(0, 2**63 - 1, "an integer seed")


def number_arg(low: float, high: float, *, low_open: bool = True, what: str = "a number"):
    """An argparse type: a finite number in ``(low, high]`` (``[low, high]`` without ``low_open``)."""
    span = f"{'(' if low_open else '['}{low:g}, {high:g}]"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what} in {span}, got {text!r}") from None
        if not (math.isfinite(value) and (value > low if low_open else value >= low) and value <= high):
            raise argparse.ArgumentTypeError(f"expected {what} in {span}, got {text}")
        return value

    parse.__name__ = what
    return parse


fraction = number_arg(0.0, 1.0)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the problem and where the options are listed (not the
    whole usage, which for ``run`` is a dozen lines)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def storage_error(err: OSError, out: str | None = None) -> str | None:
    """The one-line message of a full or read-only disk, naming the path; ``None`` for other
    errors. h5py reports the C library's errno only inside its message."""
    text = " ".join(str(err).split())
    full = err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) or "No space left on device" in text \
        or "errno = 28" in text
    readonly = err.errno == errno.EROFS or "Read-only file system" in text or "errno = 30" in text
    if not (full or readonly):
        return None
    where = err.filename or out or "the output folder"
    if full:
        return (f"no space left on the device holding {where} while writing; free some space (or choose another "
                "--out) and rerun the same command to resume.")
    return f"{where} is on a read-only file system; choose a writable --out."

"""Pure metric functions of the benchmark (arrays in, numbers out)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats

__all__ = [
    "rank_of",
    "topk_accuracy",
    "topk_table",
    "fisher_overlap",
    "direction_accuracy",
    "signed_f1",
]

TOPK = (1, 3, 5, 10, 50)


def rank_of(scores: pd.Series, gene: str) -> float:
    """Rank of ``gene`` when genes are sorted by ``scores`` ascending (most negative = 1).

    Ties keep the order of ``scores`` (``method="first"``); NaN scores go last. Returns NaN
    when the gene is not among the scored genes (e.g. filtered out as undetected).
    """
    if gene not in scores.index:
        return float("nan")
    s = scores.astype(float).fillna(np.inf)
    return float(s.rank(method="first", ascending=True)[gene])


def topk_accuracy(ranks: Iterable[float], k: int) -> float:
    """Share of ``ranks`` that are ``<= k``; a missing rank (NaN: target not scored) is a miss."""
    r = np.asarray(list(ranks), float)
    if r.size == 0:
        return float("nan")
    return float(np.mean(np.nan_to_num(r, nan=np.inf) <= k))


def topk_table(ranks: pd.DataFrame, ks: Sequence[int] = TOPK) -> pd.DataFrame:
    """Top-k accuracy per method from a long table with columns ``method`` and ``rank``.

    Returns one row a method with columns ``method``, ``top<k>`` for each ``k``, ``n`` (the
    number of (target, seed) runs) and ``median_rank``; methods keep their first-seen order.
    """
    rows = []
    for method, grp in ranks.groupby("method", sort=False):
        row = {"method": method}
        row.update({f"top{k}": topk_accuracy(grp["rank"], k) for k in ks})
        row["n"] = int(len(grp))
        row["median_rank"] = float(np.nanmedian(grp["rank"])) if grp["rank"].notna().any() else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def fisher_overlap(selected: Iterable[str], known: Iterable[str], universe: Iterable[str]) -> tuple[float, int]:
    """One-sided Fisher exact test of the overlap of ``selected`` with ``known`` within ``universe``.

    Both sets are first intersected with the universe. The 2x2 table is
    ``[[sel & known, sel - known], [known - sel, rest]]`` and the alternative is "greater"
    (more overlap than chance). Returns ``(p_value, overlap)``.
    """
    U = set(universe)
    S, K = set(selected) & U, set(known) & U
    a = len(S & K)
    b = len(S - K)
    c = len(K - S)
    d = len(U) - a - b - c
    p = stats.fisher_exact([[a, b], [c, d]], alternative="greater").pvalue
    return float(p), a


def direction_accuracy(predicted: Mapping[str, float], known: Mapping[str, int]) -> tuple[float, int]:
    """Share of the known DEGs among ``predicted`` whose predicted sign matches the known one.

    ``predicted`` maps a gene to its predicted score or fold change (only the method's selected
    genes, e.g. its top 100); ``known`` maps each known DEG to its direction (+1 / -1). Genes in
    both are compared by sign; a zero prediction counts as wrong. Returns ``(accuracy, n)`` with
    NaN accuracy when no known DEG was selected.
    """
    common = [g for g in predicted if g in known]
    if not common:
        return float("nan"), 0
    ok = [np.sign(predicted[g]) == np.sign(known[g]) for g in common]
    return float(np.mean(ok)), len(common)


def signed_f1(predicted: Mapping[str, float], known: Mapping[str, int]) -> float:
    """F1 of a method's selected genes against the known DEGs, counting direction.

    A true positive is a selected gene that is a known DEG *and* has the known sign.
    ``precision = TP / |selected|``, ``recall = TP / |known|``,
    ``F1 = 2 precision recall / (precision + recall)`` (0 when TP = 0; NaN when either set is
    empty).
    """
    if len(predicted) == 0 or len(known) == 0:
        return float("nan")
    tp = sum(1 for g, v in predicted.items() if g in known and np.sign(v) == np.sign(known[g]))
    if tp == 0:
        return 0.0
    precision, recall = tp / len(predicted), tp / len(known)
    return float(2 * precision * recall / (precision + recall))

"""Figures and files of a benchmark run (plotting returns figures; only write_outputs writes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..io import write_csv
from ._metrics import topk_accuracy

__all__ = ["plot_topk_curves", "plot_target_ranks", "write_outputs"]


def plot_topk_curves(ranks: pd.DataFrame, *, max_k: int = 50):
    """Top-k accuracy against k, one line a method."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    ks = np.arange(1, max_k + 1)
    for method, grp in ranks.groupby("method", sort=False):
        ax.plot(ks, [topk_accuracy(grp["rank"], k) for k in ks], label=method, lw=1.6)
    ax.set_xscale("log")
    ax.set_xlabel("k")
    ax.set_ylabel("top-k accuracy of the target gene")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_target_ranks(ranks: pd.DataFrame):
    """Rank of each target gene per method (points: seeds; bar: median), log scale."""
    import matplotlib.pyplot as plt

    targets = sorted(ranks["target"].unique())
    methods = list(dict.fromkeys(ranks["method"]))
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(targets) + 2), 4))
    width = 0.8 / max(len(methods), 1)
    for j, m in enumerate(methods):
        sub = ranks[ranks["method"] == m]
        for i, t in enumerate(targets):
            r = sub.loc[sub["target"] == t, "rank"].to_numpy(float)
            x = i - 0.4 + width * (j + 0.5)
            ax.scatter(np.full(len(r), x), r, s=8, color=f"C{j}", alpha=0.6, label=m if i == 0 else None)
            if np.isfinite(r).any():
                ax.hlines(np.nanmedian(r), x - width / 2, x + width / 2, color=f"C{j}", lw=2)
    ax.set_yscale("log")
    ticks = [t for t in (1, 3, 10, 30, 100, 300) if t <= max(float(np.nanmax(ranks["rank"], initial=1)), 1) * 1.5]
    ax.set_yticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.invert_yaxis()
    ax.set_xticks(range(len(targets)), targets, rotation=45, ha="right")
    ax.set_ylabel("rank of the target gene (1 = top)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def _md_table(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    for _, row in df.iterrows():
        cells = [f"{v:.3g}" if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _guide_cells(settings: dict) -> str:
    """The guide cells drawn per experiment, in words: ``n_target``, or the fewer a perturbation has."""
    n = settings["n_target"]
    fewer = {p: k for p, k in settings.get("guide_cells_drawn", {}).items() if k < n}
    if not fewer:
        return f"{n} guide cells"
    shown = ", ".join(f"{p} {k}" for p, k in list(fewer.items())[:10]) + (" ..." if len(fewer) > 10 else "")
    return f"{n} guide cells (all of them where a perturbation has fewer: {shown})"


def write_outputs(result, out_dir: Path) -> None:
    """Write the tables (CSV), the figures (PNG) and ``report.md`` into ``out_dir``."""
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    tables = {"topk.csv": result.topk, "ranks.csv": result.ranks, "deg.csv": result.deg,
              "deg_summary.csv": result.deg_summary, "timings.csv": result.timings}
    if len(result.failures):
        tables["failures.csv"] = result.failures
    for name, table in tables.items():
        write_csv(table, out_dir / name)
    figs = {}
    if len(result.ranks):
        figs["topk_curves.png"] = plot_topk_curves(result.ranks)
        figs["target_ranks.png"] = plot_target_ranks(result.ranks)
    for name, fig in figs.items():
        fig.savefig(out_dir / name, dpi=120)
        plt.close(fig)
    s = result.settings
    text = [
        "# Benchmark report",
        "",
        f"{s['seeds']} seeds from {s['first_seed']}; {_guide_cells(s)} and {s['n_control']} control "
        f"cells per experiment; perturbations: {', '.join(s['perturbations'])}. Default sc-OTGM row: "
        f"`{s['default_method']}`.",
        "",
        "## Target-gene ranking (Table 1 analogue)",
        "",
        "Rank 1 = most negative score (strongest knock-down).",
        "",
        _md_table(result.topk) if len(result.topk) else "(no perturbation with a measured target)",
        "",
    ]
    if "topk_curves.png" in figs:
        text += ["![top-k curves](topk_curves.png)", "", "![target ranks](target_ranks.png)", ""]
    if len(result.ranks):
        med = result.ranks.pivot_table(index="target", columns="method", values="rank", aggfunc="median")
        text += ["Median rank per target:", "", _md_table(med.reset_index()), ""]
    text += [
        "## DEG recovery (Table 3 analogue)",
        "",
        "Known DEGs: all guide vs all control cells, scanpy Wilcoxon, BH p < 0.05, direction = sign of the "
        f"log fold change. Each method's top {s.get('n_top_genes', 100)} genes by |score| on the small sample; "
        "Fisher exact "
        "(one-sided) overlap p, precision, direction accuracy (known DEGs in the top genes with the right "
        "sign), signed F1 (true positive = known DEG in the top genes with the right sign).",
        "",
        _md_table(result.deg_summary) if len(result.deg_summary) else "(not computed)",
        "",
        "## Timings",
        "",
        _md_table(result.timings),
        "",
    ]
    if len(result.failures):
        text += [f"{len(result.failures)} method runs failed; see failures.csv.", ""]
    (out_dir / "report.md").write_text("\n".join(text))

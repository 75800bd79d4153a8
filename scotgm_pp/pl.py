"""Figures. Plotting never computes anything heavy, and never shows or writes unless asked.

Every function returns a :class:`matplotlib.figure.Figure` built without pyplot, so no global
figure state is touched and any backend (including ``MPLBACKEND=Agg``) works; in a notebook the
returned figure displays itself. :func:`save_run_figures` is the only function that writes files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from anndata import AnnData
from matplotlib.figure import Figure

__all__ = [
    "perturbation_distribution",
    "predicted_vs_observed",
    "confusion_matrix",
    "coupling_diagnostics",
    "target_ranks",
    "screen_summary",
    "calibration_qq",
    "posterior_predictive_check",
    "figure_perturbations",
    "save_run_figures",
]

_DOWN, _UP, _GREY = "#2166ac", "#b2182b", "#9e9e9e"


def _record(adata: AnnData, perturbation: str, key: str) -> dict:
    from .tl._predict import get_record

    return get_record(adata, perturbation, key)


def _gene_table(adata: AnnData, perturbation: str, key: str) -> pd.DataFrame:
    from .tl import get_rankings

    return get_rankings(adata, key, perturbation=str(perturbation))


def _summary(adata: AnnData, key: str) -> pd.DataFrame:
    from .tl._response import _uns

    return _uns(adata, key)["summary"]


def _new_figure(figsize) -> tuple[Figure, object]:
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def perturbation_distribution(
    adata: AnnData,
    perturbation: str,
    key: str = "scotgm",
    de_genes: dict | list | None = None,
    n_top: int = 20,
    *,
    figsize=(6.0, 4.8),
) -> Figure:
    """Per-gene perturbation distribution: mean shift ``mu`` against its spread ``sigma``.

    Parameters
    ----------
    de_genes
        Known responding genes to highlight: a list, or ``{gene: +1/-1}`` (coloured by sign).
    n_top
        Annotate the ``n_top`` genes with the largest ``|mu / sigma|`` (``abs_rank``).

    Returns
    -------
    matplotlib.figure.Figure
    """
    df = _gene_table(adata, perturbation, key)
    fig, ax = _new_figure(figsize)
    ax.scatter(df["mu"], df["sigma"], s=8, c=_GREY, alpha=0.6, lw=0, label="genes")
    if de_genes is not None:
        signs = de_genes if isinstance(de_genes, dict) else {g: 0 for g in de_genes}
        hit = df[df["gene"].isin(list(signs))]
        colours = [(_UP if signs[g] > 0 else _DOWN if signs[g] < 0 else "k") for g in hit["gene"]]
        ax.scatter(hit["mu"], hit["sigma"], s=22, c=colours, edgecolor="k", lw=0.4,
                   label=f"known DE genes ({len(hit)})")
    top = df.nsmallest(int(n_top), "abs_rank")
    for _, row in top.iterrows():
        ax.annotate(str(row["gene"]), (row["mu"], row["sigma"]), fontsize=7, xytext=(3, 2),
                    textcoords="offset points")
    ax.scatter(top["mu"], top["sigma"], s=12, facecolor="none", edgecolor="k", lw=0.6,
               label=f"top {len(top)} by |mu/sigma|")
    lim = float(np.nanmax(np.abs(df["mu"]))) * 1.1 or 1.0
    ax.set_xlim(-lim, lim)
    ax.axvline(0, color="k", lw=0.5)
    ax.set_xlabel("mu: mean change (scaled expression)")
    ax.set_ylabel("sigma: sd of the change (scaled expression)")
    row = _summary(adata, key).loc[str(perturbation)]
    title = f"{perturbation}: perturbation distribution per gene"
    if "target_rank" in row.index and np.isfinite(row["target_rank"]):
        title += f" (target rank {int(row['target_rank'])})"
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left", frameon=False)
    return fig


def predicted_vs_observed(
    adata: AnnData,
    perturbation: str,
    key: str = "scotgm",
    *,
    prediction: pd.DataFrame | None = None,
    observed: pd.DataFrame | pd.Series | dict | None = None,
    genes: list | None = None,
    units: str = "lognorm",
    annotate: int = 10,
    figsize=(5.2, 5.0),
) -> Figure:
    """Predicted against observed mean expression changes (the paper's Figure 3), for the
    prediction's method (:func:`scotgm_pp.tl.predict_response`: the count layer's effect by
    default, equation 5 with ``method="paper"``).

    Parameters
    ----------
    prediction
        Output of :func:`scotgm_pp.tl.predict_response`; default: its point estimate
        (``n_draws=0``, no band) for the perturbation's target.
    observed
        Observed changes: a DataFrame with ``gene`` and ``logfc`` (and optionally ``padj``, as
        from :func:`scotgm_pp.tl.observed_response`), or a Series/dict gene -> change, in
        log-normalised units (or scaled units with ``units="scaled"``).
    genes
        Genes to show (e.g. the DEGs); default: genes with ``padj < 0.05`` when ``observed`` has
        it, else all genes. The perturbed gene itself is left out (its change is the input).
    units
        ``"lognorm"`` (mean log-normalised change) or ``"scaled"``.
    annotate
        Label this many genes with the largest observed changes.

    Returns
    -------
    matplotlib.figure.Figure
    """
    from .tl._predict import predict_response

    if units not in ("lognorm", "scaled"):
        raise ValueError(f"units must be 'lognorm' or 'scaled', got {units!r}.")
    if prediction is None:
        prediction = predict_response(adata, perturbation, key=key, n_draws=0)
    if observed is None:
        raise ValueError("pass observed= (e.g. scotgm_pp.tl.observed_response(adata, perturbation)).")
    if isinstance(observed, pd.DataFrame):
        obs = observed.set_index("gene")
        col = "logfc" if units == "lognorm" else "scaled_change"
        obs_change = obs[col]
        if genes is None and "padj" in obs:
            genes = obs.index[obs["padj"] < 0.05].tolist()
    else:
        obs_change = pd.Series(observed, dtype=float)
    suffix = "_lognorm" if units == "lognorm" else ""
    pred = prediction.set_index("gene")
    shown = [g for g in (genes if genes is not None else obs_change.index) if g in pred.index and g in obs_change.index]
    shown = [g for g in shown if g != prediction.attrs.get("gene")]
    x = obs_change.loc[shown].to_numpy(float)
    y = pred.loc[shown, "delta" + suffix].to_numpy(float)
    lo = pred.loc[shown, "lower" + suffix].to_numpy(float)
    hi = pred.loc[shown, "upper" + suffix].to_numpy(float)
    fig, ax = _new_figure(figsize)
    agree = np.sign(x) == np.sign(y)
    if len(shown):
        ax.errorbar(x, y, yerr=[np.clip(y - lo, 0, None), np.clip(hi - y, 0, None)], fmt="none", ecolor=_GREY,
                    lw=0.6, zorder=1)
        ax.scatter(x[agree], y[agree], s=18, c=_UP, label="direction agrees", zorder=2)
        ax.scatter(x[~agree], y[~agree], s=18, c=_DOWN, marker="x", label="direction disagrees", zorder=2)
        order = np.argsort(-np.abs(x))[: int(annotate)]
        for j in order:
            ax.annotate(shown[j], (x[j], y[j]), fontsize=7, xytext=(3, 2), textcoords="offset points")
        lim = 1.1 * float(max(np.abs(x).max(), np.abs(y).max(), 1e-6))
        ax.plot([-lim, lim], [-lim, lim], color="k", lw=0.5, ls="--")
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
    ax.axhline(0, color="k", lw=0.4)
    ax.axvline(0, color="k", lw=0.4)
    unit = "log-normalised" if units == "lognorm" else "scaled"
    ax.set_xlabel(f"observed mean change ({unit})")
    method = prediction.attrs.get("method", "effect")
    ax.set_ylabel(f"predicted change, {'eq. 5' if method == 'paper' else method} ({unit})")
    acc = float(agree.mean()) if len(shown) else float("nan")
    ax.set_title(f"{perturbation}: response to {prediction.attrs.get('gene', '?')}\n"
                 f"{len(shown)} genes, direction agreement {acc:.0%}", fontsize=10)
    if len(shown):
        ax.legend(fontsize=7, frameon=False, loc="upper left")
    return fig


def posterior_predictive_check(data, *, ci: float = 0.9, figsize=(8.4, 3.9)) -> Figure:
    """Observed against replicated per-gene means and zero fractions (a posterior predictive check).

    Parameters
    ----------
    data
        The table of :func:`scotgm_pp.tl.ppc_statistics`, or the DataTree of
        :func:`scotgm_pp.tl.posterior_predictive` (its table is computed with ``ci``).
    ci
        Central probability of the replicated intervals (when ``data`` is a DataTree).

    Returns
    -------
    matplotlib.figure.Figure
        Two panels, one point per gene with its replicated interval: mean count (log scales) and
        fraction of zero counts. Genes whose observed value falls outside the interval are marked;
        the titles give the share inside.
    """
    from .tl._ppc import ppc_statistics

    stats = data if isinstance(data, pd.DataFrame) else ppc_statistics(data, ci=ci)
    needed = {"observed_mean", "replicated_mean", "mean_lower", "mean_upper", "observed_zero_fraction",
              "replicated_zero_fraction", "zero_lower", "zero_upper"}
    if not needed <= set(stats.columns):
        raise ValueError(f"data must be scotgm_pp.tl.ppc_statistics output; missing columns {sorted(needed - set(stats.columns))}.")
    fig = Figure(figsize=figsize, layout="constrained")
    panels = [("observed_mean", "replicated_mean", "mean_lower", "mean_upper", "mean count per cell", True),
              ("observed_zero_fraction", "replicated_zero_fraction", "zero_lower", "zero_upper",
               "fraction of zero counts", False)]  # (observed, replicated, lower, upper, label, log scales)
    level = stats.attrs.get("ci", ci)
    for j, (o, r, lo, hi, label, log) in enumerate(panels):
        ax = fig.add_subplot(1, 2, j + 1)
        x, y = stats[o].to_numpy(float), stats[r].to_numpy(float)
        low, high = stats[lo].to_numpy(float), stats[hi].to_numpy(float)
        inside = (x >= low) & (x <= high)
        ax.errorbar(x, y, yerr=[np.clip(y - low, 0, None), np.clip(high - y, 0, None)], fmt="none", ecolor=_GREY,
                    lw=0.5, zorder=1)
        ax.scatter(x[inside], y[inside], s=9, c=_DOWN, label="observed inside the interval", zorder=2)
        ax.scatter(x[~inside], y[~inside], s=14, c=_UP, marker="x", label="outside", zorder=3)
        finite = np.concatenate([x, y, low, high])
        if log:
            pos = finite[finite > 0]
            lim = (float(pos.min()) / 1.5, float(pos.max()) * 1.5) if pos.size else (1e-3, 1.0)
            ax.set_xscale("log")
            ax.set_yscale("log")
        else:
            lim = (-0.02, 1.02)
        ax.plot(lim, lim, color="k", lw=0.5, ls="--")
        ax.set_xlim(lim)
        ax.set_ylim(lim)
        ax.set_xlabel(f"observed {label}")
        ax.set_ylabel(f"replicated {label}")
        ax.set_title(f"{label}\n{inside.mean():.0%} of {len(x)} genes inside the {level:.0%} interval", fontsize=9)
        if j == 0:
            ax.legend(fontsize=7, frameon=False, loc="upper left")
    return fig


def confusion_matrix(adata: AnnData, perturbation: str, key: str = "scotgm", *, figsize=(3.8, 3.4)) -> Figure:
    """Cells by label (control / guide) and assigned state (basal / perturbed).

    Controls are counted as perturbed when they would be classified perturbed with their label
    hidden; guide cells by their fitted state (basal = escaped).
    """
    rec = _record(adata, perturbation, key)
    M = np.asarray(rec["confusion"], float)
    rows = [str(s) for s in rec.get("confusion_labels", ["control", "guide"])]
    cols = [str(s) for s in rec.get("confusion_states", ["basal", "perturbed"])]
    frac = M / np.clip(M.sum(axis=1, keepdims=True), 1, None)
    fig, ax = _new_figure(figsize)
    ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(M.shape[0]):
        for j in range(M.shape[1]):
            ax.text(j, i, f"{int(M[i, j])}\n({frac[i, j]:.0%})", ha="center", va="center",
                    color="white" if frac[i, j] > 0.6 else "black", fontsize=9)
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("assigned state")
    ax.set_ylabel("label")
    title = f"{perturbation}: {rec['fraction_perturbed']:.0%} of guide cells in the perturbed state"
    row = _summary(adata, key).loc[str(perturbation)]
    if "effect_detected" in row.index and not bool(row["effect_detected"]):
        title += f"\nno effect detected (any-effect q = {row['qval_any']:.2g}): guide cells classed 'no effect'"
    ax.set_title(title, fontsize=9)
    return fig


def coupling_diagnostics(idata, var_names=("transport_cost",), *, figsize=(10.0, 2.8)) -> Figure:
    """Marginal density, trace and rank plots of the transport-plan sampler's chains (arviz-plots).

    One row per variable: ``az.plot_dist``, ``az.plot_trace`` and ``az.plot_rank``, arranged by
    ``az.combine_plots`` on the matplotlib backend; each rank panel's title gives the variable's
    rank-normalised R-hat and bulk ESS (``az.rhat``, ``az.ess``).

    Parameters
    ----------
    idata
        ``CouplingResult.idata`` from :func:`scotgm_pp.inference.sample_coupling` (or any
        ``xarray.DataTree`` with these posterior variables), or a ``CouplingResult``.
    var_names
        Scalar posterior variables to show, one row each.

    Returns
    -------
    matplotlib.figure.Figure
    """
    import arviz as az
    import xarray as xr

    idata = getattr(idata, "idata", idata)
    if not isinstance(idata, xr.DataTree) or "posterior" not in idata.children:
        raise ValueError("idata has no posterior group; call sample_coupling(..., return_idata=True).")
    var_names = list(var_names)
    missing = [v for v in var_names if v not in idata["posterior"].data_vars]
    if missing:
        raise ValueError(f"var_names {missing} are not in the posterior; it holds {list(idata['posterior'].data_vars)}.")
    pc = az.combine_plots(idata, [(az.plot_dist, {}), (az.plot_trace, {}), (az.plot_rank, {})],
                          var_names=var_names, backend="matplotlib",
                          figure_kwargs={"figsize": (figsize[0], figsize[1] * len(var_names))})
    fig = pc.viz["figure"].item()
    rhat = az.rhat(idata, var_names=var_names)
    ess = az.ess(idata, var_names=var_names)
    rank_axes = fig.axes[2::3]
    for ax, name in zip(rank_axes, var_names):
        ax.set_title(f"{name} ranks (R-hat {float(rhat[name]):.3f}, ESS {float(ess[name]):.0f})", fontsize=9)
    return fig


def target_ranks(adata: AnnData, key: str = "scotgm", *, figsize=(6.0, 3.2)) -> Figure:
    """Rank of the target gene among all genes, for perturbations whose label is a measured gene."""
    summary = _summary(adata, key)
    ranks = summary["target_rank"] if "target_rank" in summary else pd.Series(dtype=float)
    items = sorted((str(p), int(r)) for p, r in ranks.items() if np.isfinite(r))
    fig, ax = _new_figure(figsize)
    if items:
        names, ranks = zip(*items)
        ax.bar(range(len(ranks)), np.asarray(ranks) - 0.5, color=_DOWN, bottom=0.5)
        for j, r in enumerate(ranks):
            ax.text(j, r * 1.04, str(r), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(ranks)), names, rotation=60, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_ylim(0.5, max(max(ranks) * 2.0, 20))
        ax.axhline(10.5, color="k", lw=0.5, ls="--")
    ax.set_ylabel("target rank (1 = top)")
    ax.set_title("Which gene was knocked down", fontsize=10)
    return fig


def screen_summary(adata: AnnData, key: str = "scotgm", *, figsize=(6.4, 3.2)) -> Figure:
    """One point per analysed perturbation: guide cells against the fraction called perturbed."""
    summary = _summary(adata, key)
    fig, ax = _new_figure(figsize)
    n = summary["n_guide"].to_numpy(float)
    f = summary["fraction_perturbed"].to_numpy(float)
    ax.scatter(n, f, s=10, color=_DOWN, alpha=0.7)
    ax.set_xscale("log")
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("guide cells analysed")
    ax.set_ylabel("fraction called perturbed")
    n_skipped = len(_uns_skipped(adata, key))
    ax.set_title(f"{len(summary)} perturbations analysed, {n_skipped} skipped", fontsize=10)
    return fig


def calibration_qq(result, *, figsize=(4.4, 4.2)) -> Figure:
    """QQ plot of the null p-values of :func:`scotgm_pp.tl.calibration_check`, one line per method:
    observed against expected ``-log10 p`` (on the diagonal when calibrated), with the 95% band
    of uniform order statistics."""
    from scipy import stats

    fig, ax = _new_figure(figsize)
    top = 0.0
    for (method, p), color in zip(result.pvalues.items(), [_DOWN, _UP, _GREY, "#4daf4a", "#984ea3"]):
        p = np.sort(np.clip(np.asarray(p, float)[np.isfinite(p)], 1e-300, 1.0))
        if not p.size:
            continue
        n = p.size
        expected = -np.log10((np.arange(1, n + 1) - 0.5) / n)
        ax.plot(expected, -np.log10(p), ".", ms=2.5, color=color, label=f"{method} ({n} tests)")
        top = max(top, float(expected[0]), float(-np.log10(p[0])))
    if top:
        n = max(len(v) for v in result.pvalues.values())
        k = np.arange(1, n + 1)
        lo = -np.log10(stats.beta.ppf(0.975, k, n - k + 1))
        hi = -np.log10(stats.beta.ppf(0.025, k, n - k + 1))
        ex = -np.log10((k - 0.5) / n)
        ax.fill_between(ex, lo, hi, color="0.85", lw=0)
        ax.plot([0, top], [0, top], color="k", lw=0.6)
    ax.set_xlabel("expected -log10 p")
    ax.set_ylabel("observed -log10 p")
    ax.set_title("Null pseudo-perturbations (control cells)", fontsize=10)
    ax.legend(fontsize=7, frameon=False, loc="upper left")
    return fig


def _uns_skipped(adata: AnnData, key: str) -> pd.DataFrame:
    from .tl._response import _uns

    return _uns(adata, key)["skipped"]


def figure_perturbations(adata: AnnData, key: str = "scotgm", *, named=None, top: int = 0) -> list[str]:
    """The perturbations that get their own figures: those ``named`` (that were analysed), then the
    ``top`` with the largest fraction of perturbed guide cells."""
    summary = _summary(adata, key)
    chosen = [str(p) for p in (named or []) if str(p) in summary.index]
    if top:
        order = summary["fraction_perturbed"].sort_values(ascending=False, kind="stable").index
        chosen += [str(p) for p in order if str(p) not in chosen][: int(top)]
    return chosen


def save_run_figures(
    adata: AnnData,
    key: str = "scotgm",
    out_dir: str | Path = "figures",
    *,
    perturbations=None,
    top: int = 0,
    de_genes: dict | None = None,
    observed: bool = True,
    dpi: int = 110,
) -> list[Path]:
    """Write the figures of a run as PNGs; return their paths.

    Screen-level figures always: ``screen_summary.png`` (:func:`screen_summary`) and, when any
    perturbation's label is a measured gene, ``target_ranks.png``. Per-perturbation figures only
    for the perturbations named in ``perturbations`` and the ``top`` ones with the largest
    fraction of perturbed cells (:func:`figure_perturbations`): ``<key>_distribution.png``
    (:func:`perturbation_distribution`), ``<key>_confusion.png`` (:func:`confusion_matrix`) and,
    when the label is a measured gene and ``observed`` (raw counts in ``adata.X``),
    ``<key>_predicted_vs_observed.png``. ``<key>`` is the perturbation's safe key
    (``responses.obs["key"]``), so labels such as ``"A/B"`` never become paths.

    Parameters
    ----------
    de_genes
        ``{perturbation: {gene: +1/-1}}`` known responders to highlight (e.g. a simulation's truth).
    """
    from .tl._predict import observed_response, predict_response

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def save(fig: Figure, name: str) -> None:
        path = out / name
        fig.savefig(path, dpi=dpi)
        written.append(path)

    summary = _summary(adata, key)
    save(screen_summary(adata, key), "screen_summary.png")
    if "target_rank" in summary and summary["target_rank"].notna().any():
        save(target_ranks(adata, key), "target_ranks.png")
    for pert in figure_perturbations(adata, key, named=perturbations, top=top):
        tag = summary.loc[pert, "key"]
        save(perturbation_distribution(adata, pert, key, de_genes=(de_genes or {}).get(pert)),
             f"{tag}_distribution.png")
        save(confusion_matrix(adata, pert, key), f"{tag}_confusion.png")
        genes = set(np.asarray(_record(adata, pert, key)["genes"]).astype(str))
        if observed and adata.X is not None and pert in genes:
            try:
                obs = observed_response(adata, pert, key=key)
                pred = predict_response(adata, pert, key=key, n_draws=0)
            except (KeyError, ValueError):
                continue
            save(predicted_vs_observed(adata, pert, key, prediction=pred, observed=obs),
                 f"{tag}_predicted_vs_observed.png")
    return written

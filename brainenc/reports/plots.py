"""Report figures (matplotlib, Agg).  Each function returns a Figure; the caller saves it.

Colours: one fixed colour per model label across every figure of a report,
so a model is recognisable from figure to figure.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import numpy as np
import pandas as pd

from brainenc.metrics.roi import roi_order

ALL = "all"


def new_figure(nrows: int = 1, ncols: int = 1, figsize=(6, 4), layout="constrained", **subplot_kw):
    """A pyplot-free Figure and its axes array (nrows, ncols).

    Why: Figure objects made without pyplot need no backend switch (no global
    state) and are freed with the last reference, so a long report leaks nothing.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout=layout)
    axes = fig.subplots(nrows, ncols, squeeze=False, subplot_kw=subplot_kw or None)
    return fig, axes


def model_colours(labels: list[str]) -> dict[str, tuple]:
    """Label -> RGBA colour (tab10, cycling)."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return {lab: cmap(i % 10) for i, lab in enumerate(labels)}


def roi_bars(summary: pd.DataFrame, dataset: str, colours: dict, metric: str = "median_pearson",
             order: Sequence[str] = ()):
    """Per-ROI bars of ``metric`` with its bootstrap CI, models side by side.

    Parameters
    ----------
    summary : roi_summary() frame (label, dataset, subject, roi, <metric>, <metric>_ci_low/high)
    dataset : one panel per subject of this dataset (pooled "all" first when present).
    order : the ROIs' atlas order (:func:`brainenc.results.roi_order`); ROIs left to right in it
    """
    d = summary[summary["dataset"] == dataset]
    subjects = sorted(s for s in d["subject"].unique() if s != ALL)
    if ALL in set(d["subject"]):
        subjects = [ALL] + subjects
    labels = [lab for lab in colours if (d["label"] == lab).any()]
    rois = roi_order(d["roi"], order)
    ncol = min(3, len(subjects))
    nrow = int(np.ceil(len(subjects) / ncol))
    width = max(4.5, 0.45 * len(rois) * max(1, len(labels)) ** 0.5 + 1.5)
    fig, axes = new_figure(nrow, ncol, figsize=(width * ncol, 3.2 * nrow + 0.6))
    bw = 0.8 / max(1, len(labels))
    x = np.arange(len(rois))
    for k, subject in enumerate(subjects):
        ax = axes[k // ncol, k % ncol]
        ds = d[d["subject"] == subject].set_index(["label", "roi"])
        for i, lab in enumerate(labels):
            rows = [ds.loc[(lab, r)] if (lab, r) in ds.index else None for r in rois]
            y = np.array([np.nan if r is None else r[metric] for r in rows], dtype=float)
            lo = np.array([np.nan if r is None else r[f"{metric}_ci_low"] for r in rows], dtype=float)
            hi = np.array([np.nan if r is None else r[f"{metric}_ci_high"] for r in rows], dtype=float)
            # errorbar wants non-negative distances; a missing CI is drawn without a bar.
            err = np.vstack([np.nan_to_num(y - lo, nan=0.0), np.nan_to_num(hi - y, nan=0.0)]).clip(0)
            ax.bar(x + (i - (len(labels) - 1) / 2) * bw, y, bw, color=colours[lab], label=lab,
                   yerr=err, capsize=2, error_kw={"elinewidth": 0.8})
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xticks(x, rois, rotation=45, ha="right", fontsize=8)
        ax.set_title(f"{dataset} — subject {subject}" + (" (pooled)" if subject == ALL else ""),
                     fontsize=10)
        ax.set_ylabel(metric.replace("_", " "), fontsize=8)
        ax.tick_params(axis="y", labelsize=8)
    for k in range(len(subjects), nrow * ncol):
        axes[k // ncol, k % ncol].set_visible(False)
    handles, names = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncol=min(4, len(names)), fontsize=8)
    return fig


def pair_scatter(df: pd.DataFrame, a: str, b: str, dataset: str, max_points: int = 20000,
                 seed: int = 0, order: Sequence[str] = ()):
    """Per-voxel Pearson of model ``a`` (x) vs ``b`` (y) on matched voxels, coloured by ROI.

    Parameters
    ----------
    df : concatenated voxel rows (label, dataset, subject, voxel, roi, pearson).
    max_points : voxels drawn at most (seeded subsample); all are matched first.
    order : the ROIs' atlas order (colours and legend follow it)
    """
    import matplotlib

    key = ["subject", "voxel"]
    d = df[df["dataset"] == dataset]
    m = d.loc[d["label"] == a, key + ["roi", "pearson"]].merge(
        d.loc[d["label"] == b, key + ["pearson"]], on=key, suffixes=("_a", "_b"))
    m = m[np.isfinite(m["pearson_a"]) & np.isfinite(m["pearson_b"])]
    if len(m) > max_points:
        m = m.sample(max_points, random_state=seed)
    fig, axes = new_figure(figsize=(5.6, 5))
    ax = axes[0, 0]
    rois = roi_order(m["roi"], order)
    cmap = matplotlib.colormaps["tab20"]
    for i, roi in enumerate(rois):
        g = m[m["roi"] == roi]
        ax.scatter(g["pearson_a"], g["pearson_b"], s=5, alpha=0.6, color=cmap(i % 20), label=roi,
                   linewidths=0)
    lim = [min(m["pearson_a"].min(), m["pearson_b"].min(), 0), max(m["pearson_a"].max(), m["pearson_b"].max(), 0.1)]
    ax.plot(lim, lim, "k--", lw=0.7)
    ax.set_xlabel(f"Pearson r — {a}")
    ax.set_ylabel(f"Pearson r — {b}")
    ax.set_title(f"{dataset}: per-voxel r ({len(m)} voxels)", fontsize=10)
    ax.legend(fontsize=7, markerscale=2, loc="upper left", frameon=False)
    return fig


def score_histograms(df: pd.DataFrame, dataset: str, colours: dict):
    """Step histograms of per-voxel Pearson r and noise-normalised score, models overlaid."""
    d = df[df["dataset"] == dataset]
    fig, axes = new_figure(1, 2, figsize=(10, 3.4))
    axes = axes[0]
    for ax, col, xlabel in ((axes[0], "pearson", "Pearson r"),
                            (axes[1], "normalised", "noise-normalised score (%)")):
        v_all = d[col].to_numpy(dtype=float)
        v_all = v_all[np.isfinite(v_all)]
        if v_all.size == 0:
            ax.text(0.5, 0.5, f"no finite '{col}' values", ha="center", va="center",
                    transform=ax.transAxes)
            continue
        # Normalised scores explode where the noise ceiling is tiny; clip the axis, not the data.
        lo, hi = np.percentile(v_all, [0.5, 99.5]) if col == "normalised" else (v_all.min(), v_all.max())
        if hi <= lo:
            hi = lo + 1e-3
        bins = np.linspace(lo, hi, 50)
        for lab, colour in colours.items():
            v = d.loc[d["label"] == lab, col].to_numpy(dtype=float)
            v = v[np.isfinite(v)]
            if v.size:
                ax.hist(np.clip(v, lo, hi), bins=bins, histtype="step", color=colour, label=lab, lw=1.2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("voxels")
    axes[0].legend(fontsize=8, frameon=False)
    fig.suptitle(f"{dataset}: per-voxel score distributions (all subjects)", fontsize=10)
    return fig


def grid_table(summary: pd.DataFrame, metric: str, runs: Optional[list] = None,
               order: Sequence[str] = ()) -> pd.DataFrame:
    """``metric`` as a run x (model, ROI) table: the layout of a sweep (runs = backbones).

    Parameters
    ----------
    summary : roi_summary() rows of one dataset and subject (run, model, roi, <metric>)
    runs : row order (e.g. the order the runs were given; a sweep's backbone order); default the
        order of first appearance in ``summary``
    order : the ROIs' atlas order (:func:`brainenc.results.roi_order`)
    Returns
    -------
    DataFrame indexed by run, columns a (model, roi) MultiIndex, ROIs in
    atlas order (:func:`~brainenc.metrics.roi.roi_order`) without "none"; missing cells (a failed sweep cell) stay NaN.
    """
    d = summary[summary["roi"] != "none"]
    present = list(dict.fromkeys(d["run"]))
    runs = [r for r in runs or [] if r in present] + [r for r in present if r not in (runs or [])]
    models = list(dict.fromkeys(d["model"]))
    rois = [r for r in roi_order(d["roi"], order) if r != "none"]
    t = d.pivot_table(index="run", columns=["model", "roi"], values=metric, aggfunc="first", dropna=False)
    cols = pd.MultiIndex.from_product([models, rois], names=["model", "roi"])
    return t.reindex(index=runs, columns=cols)


def grid_heatmap(table: pd.DataFrame, metric_name: str):
    """Heat map of :func:`grid_table`: one panel per model, runs down, ROIs across, values written
    in the cells, one colour scale for all panels so models compare by colour."""
    models = list(dict.fromkeys(table.columns.get_level_values(0)))
    rois = list(dict.fromkeys(table.columns.get_level_values(1)))
    vals = table.to_numpy(dtype=np.float64)
    finite = vals[np.isfinite(vals)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    fig, axes = new_figure(1, len(models), figsize=(0.55 * len(rois) * len(models) + 2.5,
                                                  0.45 * len(table) + 1.6))
    im = None
    for ax, model in zip(axes[0], models):
        v = table[model].reindex(columns=rois).to_numpy(dtype=np.float64)
        im = ax.imshow(np.ma.masked_invalid(v), cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
        for (i, j), x in np.ndenumerate(v):
            ax.text(j, i, "–" if not np.isfinite(x) else f"{x:.2f}", ha="center", va="center",
                    fontsize=7, color="w" if np.isfinite(x) and x < (vmin + vmax) / 2 else "k")
        ax.set_xticks(range(len(rois)), rois, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(table)), table.index if ax is axes[0][0] else [""] * len(table), fontsize=8)
        ax.set_title(model, fontsize=9)
    fig.colorbar(im, ax=list(axes[0]), shrink=0.8, label=metric_name)
    return fig

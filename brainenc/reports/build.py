"""Assemble a comparison report from run directories.

Output layout (``OUT``)::

    report.md            Markdown, figures linked from figures/
    report.html          self-contained (figures inlined as base64 PNG, inline CSS)
    tables/runs.csv      one row per model label: run, model, backbone, seed, wall time, path
    tables/roi_summary.csv   per label x dataset x subject x ROI (see tables.roi_summary)
    tables/paired.csv        per model pair x dataset x subject x ROI (see tables.paired_comparisons)
    tables/retrieval.csv     retrieval top-1/top-5 from summary.json (header only if none)
    tables/grid_<dataset>.csv  runs x (model, ROI) median r / oracle, when the runs form a grid
                             (a sweep: several backbone runs of the same encoders); with a heat map
    figures/*.png        the figures of the report
"""

from __future__ import annotations

import json
import traceback
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from brainenc.ioutil import atomic_write
from brainenc.metrics.roi import roi_order
from brainenc.results import Run, read_run
from brainenc.results import roi_order as atlas_order

from . import html as render
from . import plots, tables
from .insilico import insilico_blocks
from .tables import ALL, ReportInputError

#: Columns of paired comparisons shown in the report (tables/paired.csv has them all).
SHOWN_PAIRED = ["model_a", "model_b", "roi", "n_pairs", "median_diff", "win_frac_a", "wilcoxon_p"]


def _ci_text(v: float, lo: float, hi: float) -> str:
    if not np.isfinite(v):
        return "–"
    return f"{v:.3f}" if not (np.isfinite(lo) and np.isfinite(hi)) else f"{v:.3f} [{lo:.3f}, {hi:.3f}]"


def _pct(v: float) -> str:
    return "–" if not np.isfinite(v) else f"{100 * v:.0f}%"


def roi_pivot(cells: pd.DataFrame, labels: list[str], order=()) -> pd.DataFrame:
    """Display table for one (dataset, subject): one row per ROI, a column block per model.

    Parameters
    ----------
    cells : roi_summary rows of one dataset and subject.
    order : the ROIs' atlas order (rows follow it; :func:`~brainenc.metrics.roi.roi_order`)
    Returns
    -------
    DataFrame of strings: roi, n, then per label "<label> r [95% CI]", "<label> norm %"
    (median noise-normalised score) and "<label> sig" (fraction of voxels with r > 0).
    """
    rows = []
    for roi in roi_order(cells["roi"], order):
        c = cells[cells["roi"] == roi].set_index("label")
        row = {"roi": roi, "n": int(c["n_voxels"].max())}
        for lab in labels:
            if lab not in c.index:
                continue
            x = c.loc[lab]
            row[f"{lab} r [95% CI]"] = _ci_text(x["median_pearson"], x["median_pearson_ci_low"],
                                               x["median_pearson_ci_high"])
            row[f"{lab} norm %"] = "–" if not np.isfinite(x["median_normalised"]) else f"{x['median_normalised']:.1f}"
            row[f"{lab} sig"] = _pct(x["frac_sig"])
        rows.append(row)
    return pd.DataFrame(rows)


def retrieval_pivot(ret: pd.DataFrame) -> pd.DataFrame:
    """Display table: one row per dataset/subject; top-1/top-5 per model, then chance levels."""
    rows = []
    for key, g in ret.groupby("key", sort=True):
        n = g["n_images"].iloc[0]
        row = {"dataset/subject": key, "n_images": int(n) if np.isfinite(n) else "–"}
        for r in g.itertuples():
            row[f"{r.label} top-1"] = r.top1
            row[f"{r.label} top-5"] = r.top5
        row["chance top-1"] = g["chance_top1"].iloc[0]
        row["chance top-5"] = g["chance_top5"].iloc[0]
        rows.append(row)
    return pd.DataFrame(rows)


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    atomic_write(path, df.to_csv(index=False))


def _save_figure(fig, out: Path, name: str) -> str:
    """Save ``fig`` as figures/<name>.png; return the path relative to ``out``."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    rel = f"figures/{name}.png"
    atomic_write(out / rel, buf.getvalue())
    return rel


def _slug(*parts: object) -> str:
    text = "_".join(str(p) for p in parts)
    return "".join(c if c.isalnum() or c in "-." else "_" for c in text)


def roi_mismatch_notes(df: pd.DataFrame) -> list[str]:
    """Notes for voxels whose ROI label differs between models (paired stats use model A's)."""
    notes = []
    per_voxel = df.groupby(["dataset", "subject", "voxel"])["roi"].nunique()
    bad = per_voxel[per_voxel > 1]
    if len(bad):
        ds, sub, vox = bad.index[0]
        notes.append(f"{len(bad)} voxels carry different ROI labels in different runs (e.g. "
                     f"{ds}/{sub} voxel {vox}); paired comparisons use the first model's label.")
    return notes


def build_report(run_dirs, out, *, threshold_p: float = 0.05, n_boot: int = 1000, seed: int = 0,
                 brainmaps: bool = True, figures: bool = True, max_pairs: int = 6, max_brainmaps: int = 12,
                 title: str = "brainenc comparison report") -> Path:
    """Build the report for ``run_dirs`` into directory ``out``.

    Parameters
    ----------
    run_dirs : sequence of run directories, each holding results/voxels.csv (+ summary.json), or
        of :class:`~brainenc.results.Run` already read (a sweep renames its cells' runs so)
    out : output directory (created; existing report files are replaced)
    threshold_p : one-sided p threshold for "voxel significantly > 0" (and FDR q)
    n_boot : bootstrap resamples for the CIs of medians (0 disables CIs)
    seed : bootstrap / subsampling seed; the same inputs and seed give identical tables
    brainmaps : draw brain maps (nilearn); failures become notes either way
    figures : draw any figures at all (False: tables and text only, much faster)
    max_pairs : model pairs drawn as scatter plots per dataset (the table has all pairs)
    max_brainmaps : brain-map figures at most (one per dataset x subject)

    Returns
    -------
    Path of report.html.

    Raises
    ------
    ReportInputError for unusable inputs (missing file/column, duplicate rows).
    """
    given = [r if isinstance(r, Run) else Path(r) for r in run_dirs]
    if not given:
        raise ReportInputError("no run directories given; expected at least one RUN_DIR")
    paths = [r.path if isinstance(r, Run) else r for r in given]
    if len({p.resolve() for p in paths}) != len(paths):
        raise ReportInputError(f"the same run directory was given twice: {[str(p) for p in paths]}")
    out = Path(out)

    runs = tables.assign_labels([r if isinstance(r, Run) else read_run(r) for r in given])
    notes = tables.attach_n_test(runs)
    df = tables.concat_runs(runs)
    notes += roi_mismatch_notes(df)
    labels = list(dict.fromkeys(df["label"]))  # run-directory order, as given
    colours = plots.model_colours(labels)

    runs_df = tables.runs_table(runs)
    order = atlas_order(runs)  # ROIs as the stores' atlases number them
    summary = tables.roi_summary(df, threshold_p=threshold_p, n_boot=n_boot, seed=seed, order=order)
    paired = tables.paired_comparisons(df, order)
    retrieval = tables.retrieval_table(runs)
    for name, t in (("runs", runs_df), ("roi_summary", summary), ("paired", paired),
                    ("retrieval", retrieval)):
        _write_csv(t, out / "tables" / f"{name}.csv")

    blocks: list = [
        ("p", f"{len(labels)} model(s) from {len(runs)} run(s). Scores are per-voxel Pearson r on "
              "the test set and the noise-normalised score 100·r²/(NC/100) in percent. "
              "Medians carry 95% percentile bootstrap CIs over voxels "
              f"({n_boot} resamples, seed {seed}). A voxel is significant when the one-sided "
              f"test of r > 0 at n = test images gives p < {threshold_p}; frac_sig_fdr applies "
              "Benjamini-Hochberg over each model's voxels of one subject. See docs/reports.md."),
        ("table", runs_df.drop(columns=["path"]), "Runs"),
    ]
    if notes:
        blocks.append(("notes", list(notes)))
    if not retrieval.empty:
        blocks += [("h", 2, "Retrieval"),
                   ("table", retrieval_pivot(retrieval),
                    "Image retrieval from predicted responses (fraction correct; tables/retrieval.csv)")]

    blocks += embedding_blocks(runs, out, figures)
    blocks += insilico_blocks(runs)

    map_budget = max_brainmaps
    for dataset in sorted(df["dataset"].unique()):
        dnotes: list[str] = []
        dd = df[df["dataset"] == dataset]
        ds = summary[summary["dataset"] == dataset]
        dp = paired[paired["dataset"] == dataset]
        subjects = sorted(dd["subject"].unique())
        top = ALL if len(subjects) > 1 else subjects[0]
        blocks.append(("h", 2, f"Dataset {dataset}"))
        dlabels = [lab for lab in labels if (dd["label"] == lab).any()]
        blocks.append(("table", roi_pivot(ds[ds["subject"] == top], dlabels, order),
                       f"Per-ROI median Pearson r [95% bootstrap CI], median noise-normalised score, "
                       f"fraction of voxels with r > 0 (p < {threshold_p}); subject {top}"
                       + (" (voxels of all subjects pooled)" if top == ALL else "")))
        if not dp.empty:
            blocks.append(("table", dp[dp["subject"] == top][SHOWN_PAIRED],
                           f"Paired per-voxel comparisons (A − B), subject {top}"))

        def figure(make, name, caption):
            # A figure that fails becomes a note: the numbers in the tables still stand.
            if not figures:
                return
            try:
                fig = make()
            except Exception as exc:  # noqa: BLE001 - any plotting failure degrades to a note
                dnotes.append(f"figure '{caption}' skipped: {type(exc).__name__}: {exc}")
                return
            blocks.append(("figure", _save_figure(fig, out, name), caption))

        figure(lambda: plots.roi_bars(summary, dataset, colours, "median_pearson", order),
               _slug("bars", dataset, "pearson"), f"{dataset}: median Pearson r per ROI with bootstrap CI")
        if np.isfinite(ds["median_normalised"]).any():
            figure(lambda: plots.roi_bars(summary, dataset, colours, "median_normalised", order),
                   _slug("bars", dataset, "normalised"),
                   f"{dataset}: median noise-normalised score (%) per ROI with bootstrap CI")
        figure(lambda: plots.score_histograms(dd, dataset, colours), _slug("hist", dataset),
               f"{dataset}: distributions of per-voxel scores")
        grid_blocks(blocks, ds[ds["subject"] == top], out, dataset, top, figure, list(dict.fromkeys(dd["run"])),
                    order)
        pairs = [(a, b) for i, a in enumerate(labels) for b in labels[i + 1:]
                 if (dd["label"] == a).any() and (dd["label"] == b).any()]
        if len(pairs) > max_pairs:
            dnotes.append(f"{len(pairs)} model pairs; scatter plots drawn for the first {max_pairs} "
                          "(tables/paired.csv has all)")
        for a, b in pairs[:max_pairs]:
            figure(lambda a=a, b=b: plots.pair_scatter(dd, a, b, dataset, seed=seed, order=order),
                   _slug("scatter", dataset, a, "vs", b), f"{dataset}: per-voxel r, {a} vs {b}")

        if brainmaps and figures:
            blocks.append(("h", 3, "Brain maps (per-voxel Pearson r)"))
            vmax = _shared_vmax(dd["pearson"].to_numpy(dtype=np.float64))
            for subject in subjects:
                if map_budget <= 0:
                    dnotes.append(f"brain map for subject {subject} skipped (max_brainmaps={max_brainmaps})")
                    continue
                map_budget -= 1
                _brainmap_block(blocks, dnotes, dd[dd["subject"] == subject], labels, out,
                                dataset, subject, vmax)

        if len(subjects) > 1:
            detail = []
            for subject in subjects:
                detail.append(("table", roi_pivot(ds[ds["subject"] == subject], dlabels, order),
                               f"Per-ROI scores, subject {subject}"))
                if not dp.empty:
                    detail.append(("table", dp[dp["subject"] == subject][SHOWN_PAIRED],
                                   f"Paired comparisons, subject {subject}"))
            blocks.append(("details", f"{dataset}: per-subject tables", detail))
        if dnotes:
            blocks.append(("notes", dnotes))

    atomic_write(out / "report.md", render.render_markdown(title, blocks))
    html_path = out / "report.html"
    atomic_write(html_path, render.render_html(title, blocks, out))
    return html_path


def grid_blocks(blocks: list, summary: pd.DataFrame, out: Path, dataset: str, subject: str, figure,
                runs: list, order=()) -> None:
    """A run x model table and heat map when the runs form a grid (a sweep: one run name per
    backbone, the same encoders in several runs); written to ``tables/grid_<dataset>.csv``, rows in
    ``runs`` order (the order the run directories were given).

    The score is the median r / oracle where the dataset has an oracle (simulated), else the
    median Pearson r.
    """
    if summary["run"].nunique() < 2 or not summary.groupby("model")["run"].nunique().gt(1).any():
        return
    metric, name = (("median_frac_oracle", "median r / oracle")
                    if np.isfinite(summary["median_frac_oracle"].to_numpy(dtype=np.float64)).any()
                    else ("median_pearson", "median Pearson r"))
    table = plots.grid_table(summary, metric, runs, order)
    flat = table.copy()
    flat.columns = [f"{m} {r}" for m, r in flat.columns]
    _write_csv(flat.reset_index(), out / "tables" / f"grid_{_slug(dataset)}.csv")
    blocks.append(("table", flat.reset_index().round(3),
                   f"{name} per ROI: runs x models (subject {subject}; – = no result)"))
    figure(lambda: plots.grid_heatmap(table, name), _slug("grid", dataset),
           f"{dataset}: {name} per ROI, runs x models")


def embedding_blocks(runs, out: Path, figures: bool = True) -> list:
    """An "Embeddings" section for runs clustered by ``python -m brainenc.analysis.embeddings``.

    Per run with ``results/clusters.json``: the pooled ARI against the true voxel types (of the
    written clusters, and of the clustering without the position control), the fraction of
    embedding-space nearest neighbours in the same ROI, the supervised reference (types read by a
    classifier from the embeddings and from the measured responses; empty for files written
    before it existed), and the run's ``results/embeddings_2d.png`` (copied into figures/). Runs
    without them add nothing.
    """
    rows, figs = [], []
    for r in runs:
        res = r.path / "results"
        if not (res / "clusters.json").exists():
            continue
        c = json.loads((res / "clusters.json").read_text())
        pooled = (c.get("ari") or {}).get("pooled", {})
        info = c.get("type_information") or {}
        rows.append({"run": r.name, "clusters": c.get("n_clusters"), "method": c.get("method"),
                     "control": c.get("control", "none"),
                     "ARI (all voxels)": pooled.get("ari"), "ARI (signal voxels)": pooled.get("ari_signal"),
                     "ARI uncontrolled": ((c.get("uncontrolled") or {}).get("ari") or {}).get("ari"),
                     "NN same ROI": (c.get("nn_same_roi") or {}).get("fraction"),
                     **{f"ARI supervised, {src}": ((info.get(src) or {}).get("pooled") or {}).get("ari")
                        for src in ("embeddings", "responses")}})
        png = res / "embeddings_2d.png"
        if figures and png.exists():
            rel = f"figures/{_slug('embeddings', r.name)}.png"
            atomic_write(out / rel, png.read_bytes())
            figs.append(("figure", rel, f"{r.name}: voxel embeddings in 2-D (PCA, t-SNE), coloured by ROI"))
    if not rows:
        return []
    return [("h", 2, "Embeddings"),
            ("table", pd.DataFrame(rows), "Clusters of the voxel embeddings vs the true voxel types "
             "(adjusted Rand index), the fraction of each voxel's 10 nearest embedding-space "
             "neighbours in its ROI, and the ARI a classifier trained on the true types reaches, "
             "out of fold, from the embeddings and from the measured responses: what the "
             "representation and the data hold (results/clusters.json)"), *figs]


def _shared_vmax(values: np.ndarray) -> float:
    """Colour limit shared by every model of a dataset so maps compare: 99th pct of |r|."""
    v = np.abs(values[np.isfinite(values)])
    if v.size == 0:
        return 1.0
    q = float(np.percentile(v, 99))
    return q if q > 0 else 1.0


def _brainmap_block(blocks, notes, dsub: pd.DataFrame, labels, out, dataset, subject, vmax) -> None:
    """Append one brain-map figure for (dataset, subject), or a note saying why not."""
    caption = f"{dataset} subject {subject}: per-voxel Pearson r"
    try:
        from .brainmaps import brainmap_figure

        with warnings.catch_warnings():
            # numpy's masked-array chatter from inside nilearn's colour bar: not actionable.
            warnings.filterwarnings("ignore", message=".*converting a masked element to nan")
            fig, how = brainmap_figure(dsub, labels, "pearson", vmax=vmax)
            rel = _save_figure(fig, out, _slug("brainmap", dataset, subject))
    except Exception as exc:  # noqa: BLE001 - a map failure must never kill the report
        last = traceback.extract_tb(exc.__traceback__)[-1]
        notes.append(f"brain map for {dataset} subject {subject} skipped: "
                     f"{type(exc).__name__}: {exc} (at {Path(last.filename).name}:{last.lineno})")
        return
    blocks.append(("figure", rel, caption + ("; " + "; ".join(how) if how else "")))

"""The report's per-ROI and paired comparison tables, derived from runs read by
:func:`brainenc.results.read_run`.

Everything here works on the tidy per-voxel table every run writes
(``RUN_DIR/results/voxels.csv``, schema in :mod:`brainenc.results`) plus the small
``results/summary.json``; nothing reads model checkpoints or the data store.  The statistics
(p-values, FDR, bootstrap, Wilcoxon) live in :mod:`brainenc.metrics.stats`.

Vocabulary used in the output tables
------------------------------------
label
    The model label used in comparisons: the ``model`` column of voxels.csv,
    or ``"<model> [<run>]"`` when two runs share a model name.
group
    One (dataset, subject, roi) cell.  ``subject == "all"`` pools the voxels
    of every subject of a dataset; ``roi == "all"`` pools every ROI
    (including unlabelled voxels, ``roi == "none"``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from brainenc.metrics.roi import frac_oracle, roi_order
from brainenc.metrics.stats import bh_reject, bootstrap_median_ci, pearson_p_one_sided, stable_seed, wilcoxon_or_nan
from brainenc.results import ResultsError, Run

#: The report's input is a set of results tables: one error class for both
ReportInputError = ResultsError
ALL = "all"


def assign_labels(runs: list[Run]) -> list[Run]:
    """Add a ``label`` column: the model name, or "model [run]" when a model name repeats.

    Labels must be unique per (run, model) pair; a remaining clash (same model
    and run name in two directories) is an input error.
    """
    pairs = []
    for r in runs:
        for run_name, model in r.voxels[["run", "model"]].drop_duplicates().itertuples(index=False):
            pairs.append((run_name, model, r.path))
    counts: dict[str, int] = {}
    for _, model, _ in pairs:
        counts[model] = counts.get(model, 0) + 1
    seen: dict[str, Path] = {}
    for r in runs:
        def label(row_run: str, row_model: str) -> str:
            return row_model if counts[row_model] == 1 else f"{row_model} [{row_run}]"
        r.voxels["label"] = [label(a, b) for a, b in zip(r.voxels["run"], r.voxels["model"])]
        for lab in r.voxels["label"].unique():
            if lab in seen and seen[lab] != r.path:
                raise ReportInputError(
                    f"{r.path / 'results' / 'voxels.csv'}: model label {lab!r} also appears in "
                    f"{seen[lab] / 'results' / 'voxels.csv'}; expected distinct (run, model) pairs"
                )
            seen[lab] = r.path
    return runs


def attach_n_test(runs: list[Run]) -> list[str]:
    """Make sure every row has an ``n_test`` value (number of test images) if one is known.

    Source order: the optional ``n_test`` column of voxels.csv; else summary.json
    ``n_test_images`` (an int, or a dict keyed by "dataset/subject"); else NaN.

    Returns
    -------
    notes : list of str
        One note per run without any test-set size (significance is skipped there).
    """
    notes = []
    for r in runs:
        df = r.voxels
        if "n_test" not in df.columns:
            df["n_test"] = np.nan
        src = r.summary.get("n_test_images")
        if df["n_test"].isna().any() and src is not None:
            if isinstance(src, dict):
                keys = df["dataset"] + "/" + df["subject"]
                fill = pd.to_numeric(keys.map(src), errors="coerce")
            else:
                fill = pd.Series(float(src), index=df.index)
            df["n_test"] = df["n_test"].fillna(fill)
        if df["n_test"].isna().all():
            notes.append(
                f"{r.name}: no test-set size (no 'n_test' column in voxels.csv and no "
                "'n_test_images' in summary.json); significance fractions are left empty."
            )
    return notes


def concat_runs(runs: list[Run]) -> pd.DataFrame:
    """All runs' voxel rows in one frame (n_rows_total, n_columns)."""
    return pd.concat([r.voxels for r in runs], ignore_index=True, sort=False)


def _finite(a: pd.Series) -> np.ndarray:
    v = a.to_numpy(dtype=np.float64)
    return v[np.isfinite(v)]


def _groups(df: pd.DataFrame, order: Sequence[str] = ()):
    """Yield (dataset, subject, roi, rows) for every cell incl. pooled "all" cells, ROIs in
    ``order`` (the store's atlas order, :func:`~brainenc.metrics.roi.roi_order`).

    ``subject == "all"`` is only produced when a dataset has more than one subject.
    """
    for dataset, dd in df.groupby("dataset", sort=True):
        subjects = sorted(dd["subject"].unique())
        subject_sets = [(s, dd[dd["subject"] == s]) for s in subjects]
        if len(subjects) > 1:
            subject_sets.append((ALL, dd))
        for subject, ds in subject_sets:
            by_roi = dict(list(ds.groupby("roi", sort=False)))
            for roi in roi_order(by_roi, order):
                yield dataset, subject, roi, by_roi[roi]
            yield dataset, subject, ALL, ds


def roi_summary(df: pd.DataFrame, *, threshold_p: float = 0.05, n_boot: int = 1000,
                seed: int = 0, ci_level: float = 0.95, order: Sequence[str] = ()) -> pd.DataFrame:
    """Per model label, dataset, subject and ROI summary of per-voxel scores.

    Parameters
    ----------
    df : DataFrame (n_rows, ...) concatenated voxel tables with ``label`` and ``n_test``.
    order : the ROIs' atlas order (:func:`brainenc.results.roi_order`); rows follow it, other
        ROIs alphabetically after it.

    Returns
    -------
    DataFrame, one row per (label, dataset, subject, roi) with columns
        label, run, model, backbone, seed, dataset, subject, roi,
        n_voxels (rows), n_valid (finite pearson), n_nan,
        median_pearson, median_pearson_ci_low, median_pearson_ci_high, mean_pearson,
        median_normalised, median_normalised_ci_low, median_normalised_ci_high,
        median_noise_ceiling, median_oracle, median_frac_oracle (median of r / oracle
        over voxels with oracle > 0.1, simbrain: the share of the attainable r reached),
        n_test (median over voxels), frac_sig (fraction of valid voxels with
        one-sided p < threshold_p), frac_sig_fdr (same after Benjamini-Hochberg
        over all voxels of the run's (dataset, subject)).
    """
    df = df.copy()
    df["_p"] = pearson_p_one_sided(df["pearson"].to_numpy(), df["n_test"].to_numpy())
    # FDR family = every voxel of one model on one subject: the natural "whole brain" claim.
    df["_fdr"] = False
    for _, idx in df.groupby(["label", "dataset", "subject"]).groups.items():
        df.loc[idx, "_fdr"] = bh_reject(df.loc[idx, "_p"].to_numpy(), threshold_p)
    rows = []
    for label, dl in df.groupby("label", sort=True):
        meta = dl.iloc[0]
        for dataset, subject, roi, g in _groups(dl, order):
            r = _finite(g["pearson"])
            nrm = _finite(g["normalised"])
            p = g["_p"].to_numpy()
            valid_p = np.isfinite(p)
            rng = np.random.default_rng(stable_seed(seed, label, dataset, subject, roi, "pearson"))
            lo, hi = bootstrap_median_ci(r, n_boot, rng, ci_level)
            rng = np.random.default_rng(stable_seed(seed, label, dataset, subject, roi, "normalised"))
            nlo, nhi = bootstrap_median_ci(nrm, n_boot, rng, ci_level)
            ntest = _finite(g["n_test"])
            rows.append({
                "label": label, "run": meta["run"], "model": meta["model"],
                "backbone": meta["backbone"], "seed": meta["seed"],
                "dataset": dataset, "subject": subject, "roi": roi,
                "n_voxels": len(g), "n_valid": r.size, "n_nan": len(g) - r.size,
                "median_pearson": np.median(r) if r.size else np.nan,
                "median_pearson_ci_low": lo, "median_pearson_ci_high": hi,
                "mean_pearson": r.mean() if r.size else np.nan,
                "median_normalised": np.median(nrm) if nrm.size else np.nan,
                "median_normalised_ci_low": nlo, "median_normalised_ci_high": nhi,
                "median_noise_ceiling": _nanmedian(g["noise_ceiling"]),
                "median_oracle": _nanmedian(g["oracle"]),
                "median_frac_oracle": _nanmedian(pd.Series(frac_oracle(g["pearson"], g["oracle"]))),
                "n_test": np.median(ntest) if ntest.size else np.nan,
                # Denominator: voxels with a defined p (finite r and n); NaN voxels are
                # counted in n_nan instead so a model is not rewarded for them.
                "frac_sig": (p[valid_p] < threshold_p).mean() if valid_p.any() else np.nan,
                "frac_sig_fdr": g["_fdr"].to_numpy()[valid_p].mean() if valid_p.any() else np.nan,
            })
    return pd.DataFrame(rows)


def _nanmedian(s: pd.Series) -> float:
    v = _finite(s)
    return float(np.median(v)) if v.size else math.nan


def paired_comparisons(df: pd.DataFrame, order: Sequence[str] = ()) -> pd.DataFrame:
    """Per-voxel paired comparisons of every pair of model labels (A before B in run order),
    ROIs in ``order`` (as :func:`roi_summary`).

    Voxels are matched on (dataset, subject, voxel); the ROI is taken from the
    first model of the pair.  Only voxels with finite Pearson in both models count.

    Returns
    -------
    DataFrame, one row per (model_a, model_b, dataset, subject, roi) with columns
        model_a, model_b, dataset, subject, roi, n_pairs,
        median_a, median_b, median_diff (median of per-voxel r_a - r_b),
        mean_diff, win_frac_a (fraction with r_a > r_b, ties count one half),
        wilcoxon_stat, wilcoxon_p (two-sided scipy.stats.wilcoxon on r_a - r_b,
        zero_method="wilcox"; NaN when every difference is zero or n_pairs == 0).
    """
    # Order of first appearance = order of the run directories on the command line,
    # so "A - B" follows the order the user chose (e.g. new model first, baseline last).
    labels = list(dict.fromkeys(df["label"]))
    key = ["dataset", "subject", "voxel"]
    rows = []
    pairs = [(a, b) for i, a in enumerate(labels) for b in labels[i + 1:]]
    for a, b in pairs:
        da = df.loc[df["label"] == a, key + ["roi", "pearson"]]
        db = df.loc[df["label"] == b, key + ["pearson"]]
        m = da.merge(db, on=key, suffixes=("_a", "_b"))
        m = m[np.isfinite(m["pearson_a"]) & np.isfinite(m["pearson_b"])]
        if m.empty:
            continue
        for dataset, subject, roi, g in _groups(m, order):
            ra = g["pearson_a"].to_numpy(dtype=np.float64)
            rb = g["pearson_b"].to_numpy(dtype=np.float64)
            d = ra - rb
            stat, p = wilcoxon_or_nan(d)
            rows.append({
                "model_a": a, "model_b": b, "dataset": dataset, "subject": subject, "roi": roi,
                "n_pairs": d.size, "median_a": np.median(ra), "median_b": np.median(rb),
                "median_diff": np.median(d), "mean_diff": d.mean(),
                "win_frac_a": (np.sum(d > 0) + 0.5 * np.sum(d == 0)) / d.size,
                "wilcoxon_stat": stat, "wilcoxon_p": p,
            })
    return pd.DataFrame(rows, columns=[
        "model_a", "model_b", "dataset", "subject", "roi", "n_pairs", "median_a", "median_b",
        "median_diff", "mean_diff", "win_frac_a", "wilcoxon_stat", "wilcoxon_p"])


def retrieval_table(runs: list[Run]) -> pd.DataFrame:
    """Retrieval scores from summary.json, one row per (label, dataset/subject).

    Columns: label, run, key, dataset, subject, top1, top5, chance_top1, chance_top5, n_images.
    Empty frame when no run reports retrieval.
    """
    rows = []
    for r in runs:
        ret = r.summary.get("retrieval") or {}
        if not isinstance(ret, dict):
            raise ReportInputError(
                f"{r.path / 'results' / 'summary.json'}: 'retrieval' must be an object keyed by "
                f"'<dataset>/<subject>', got {type(ret).__name__}")
        labels = r.voxels["label"].unique()
        # summary.json is per run; the run's label is unambiguous when it holds one model.
        label = labels[0] if len(labels) == 1 else r.name
        for key, vals in ret.items():
            dataset, _, subject = str(key).partition("/")
            row = {"label": label, "run": r.name, "key": key, "dataset": dataset, "subject": subject}
            for f in ("top1", "top5", "chance_top1", "chance_top5", "n_images"):
                row[f] = vals.get(f, math.nan) if isinstance(vals, dict) else math.nan
            rows.append(row)
    return pd.DataFrame(rows, columns=["label", "run", "key", "dataset", "subject", "top1", "top5",
                                       "chance_top1", "chance_top5", "n_images"])


def runs_table(runs: list[Run]) -> pd.DataFrame:
    """One row per (run, model label): where it came from and what it holds."""
    rows = []
    for r in runs:
        for label, g in r.voxels.groupby("label", sort=True):
            rows.append({
                "label": label, "run": g["run"].iloc[0], "model": g["model"].iloc[0],
                "backbone": g["backbone"].iloc[0], "seed": g["seed"].iloc[0],
                "wall_time_s": r.summary.get("wall_time_s", math.nan),
                "datasets": ", ".join(sorted(g["dataset"].unique())),
                "n_dataset_subjects": g[["dataset", "subject"]].drop_duplicates().shape[0],
                "n_voxels": len(g), "path": str(r.path),
            })
    return pd.DataFrame(rows)

"""A compact per-ROI comparison of runs, printed to the terminal (``brainenc compare RUN...``).

For the full report with intervals, tests and figures use ``brainenc report``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from brainenc.metrics.roi import frac_oracle, roi_summary
from brainenc.results import ResultsError, read_results

VALUES = ("pearson", "normalised", "oracle", "frac_oracle")


def roi_table(tables: list[pd.DataFrame], by: tuple[str, ...] = ("roi",)) -> pd.DataFrame:
    """Median Pearson, noise-normalised score and oracle fraction per model and ROI.

    Returns a frame indexed by ``by`` with one column block per model:
    ``pearson`` (median r), ``normalised`` (median % of the noise ceiling), ``oracle`` (median
    oracle r, simbrain), ``frac_oracle`` (median of r / oracle over voxels with oracle > 0.1,
    :func:`~brainenc.metrics.roi.frac_oracle`) and ``n_voxels``; the medians are
    :func:`~brainenc.metrics.roi.roi_summary`'s.
    """
    df = pd.concat(tables, ignore_index=True)
    df["frac_oracle"] = frac_oracle(df["pearson"], df["oracle"])
    df["label"] = df["model"].astype(str)
    if df.groupby("label")["run"].nunique().max() > 1:
        df["label"] = df["model"].astype(str) + ":" + df["run"].astype(str)
    keys = ["label", *by]
    long = roi_summary(df, value_cols=VALUES, by=keys)
    agg = long.pivot(index=keys, columns="metric", values="median")[list(VALUES)]
    sizes = long[long["metric"] == VALUES[0]].set_index(keys)
    agg["n_voxels"] = sizes["count"] + sizes["n_nan"]
    agg.columns.name = None
    return agg.unstack("label").swaplevel(axis=1).sort_index(axis=1, level=0, sort_remaining=False)
def format_table(table: pd.DataFrame) -> str:
    with pd.option_context("display.width", 200, "display.max_columns", 50, "display.precision", 3):
        return table.to_string(float_format=lambda v: f"{v:.3f}")


def main_compare(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="brainenc compare", description=(
        "Print median Pearson, noise-normalised score and oracle fraction per ROI for run directories."))
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--by", default="roi", help="comma-separated grouping columns (default: roi)")
    a = ap.parse_args(argv)
    tables = [read_results(r) for r in a.runs]
    by = tuple(a.by.split(","))
    for r, t in zip(a.runs, tables):
        missing = [c for c in by if c not in t.columns]
        if missing:
            raise ResultsError(f"{r / 'results' / 'voxels.csv'}: no column {missing} to group by "
                               f"(--by); columns are {list(t.columns)}")
    table = roi_table(tables, by)
    print(format_table(table))
    return 0

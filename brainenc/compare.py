"""A compact per-ROI comparison of runs, printed to the terminal (``brainenc compare RUN...``).

By default one metric (median Pearson r), ROIs down in the store's atlas order, models across, so
the table of four runs fits a 100-column terminal; ``--metric`` picks others (several give one
table each), ``--wide`` prints every metric of every model side by side.
For the full report with intervals, tests and figures use ``brainenc report``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from brainenc.metrics.roi import frac_oracle, roi_order, roi_summary
from brainenc.results import ResultsError, read_run
from brainenc.results import roi_order as atlas_order

VALUES = ("pearson", "normalised", "oracle", "frac_oracle")
METRICS = (*VALUES, "n_voxels")
#: What each metric is, printed above its table
METRIC_TITLES = {
    "pearson": "median Pearson r",
    "normalised": "median noise-normalised score (% of the noise ceiling)",
    "oracle": "median oracle r (simbrain: the best any model can do)",
    "frac_oracle": "median r / oracle r (voxels with oracle r > 0.1)",
    "n_voxels": "voxels",
}
#: Columns of the default table: wider tables wrap into blocks of at most this width
WIDTH = 100


def roi_table(tables: list[pd.DataFrame], by: tuple[str, ...] = ("roi",), order: Sequence[str] = ()) -> pd.DataFrame:
    """Median Pearson, noise-normalised score and oracle fraction per model and ROI.

    Returns a frame indexed by ``by`` with one column block per model:
    ``pearson`` (median r), ``normalised`` (median % of the noise ceiling), ``oracle`` (median
    oracle r, simbrain), ``frac_oracle`` (median of r / oracle over voxels with oracle > 0.1,
    :func:`~brainenc.metrics.roi.frac_oracle`) and ``n_voxels``; the medians are
    :func:`~brainenc.metrics.roi.roi_summary`'s. With ``by == ("roi",)`` the rows follow
    ``order`` (the stores' atlas order, :func:`brainenc.results.roi_order`), then other ROIs
    alphabetically, then ``none``.
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
    labels = list(dict.fromkeys(df["label"]))  # the order the runs were given
    table = agg.unstack("label").swaplevel(axis=1)
    table = table.reindex(columns=pd.MultiIndex.from_product([labels, [*VALUES, "n_voxels"]]))
    if tuple(by) == ("roi",):
        table = table.reindex(roi_order(table.index, order))
    return table


def _uniform(table: pd.DataFrame, metric: str) -> pd.Series | None:
    """The ``metric`` column when every model has the same value in every row (the voxel count
    or the oracle of one dataset's voxels), else None."""
    block = table.xs(metric, axis=1, level=1).to_numpy(dtype=np.float64)
    first = block[:, :1]
    same = np.isclose(block, first, equal_nan=True).all()
    return pd.Series(first[:, 0], index=table.index) if same else None


def metric_table(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One metric of :func:`roi_table`: one column per model, preceded by the voxel count ``n``
    (and, for Pearson r, the ``oracle`` r) when they are the same for every model."""
    out = table.xs(metric, axis=1, level=1).copy()
    out.columns = [str(c) for c in out.columns]
    ref = {}
    n = _uniform(table, "n_voxels")
    if n is not None and metric != "n_voxels":
        ref["n"] = n.astype("Int64")
    if metric == "pearson":
        oracle = _uniform(table, "oracle")
        if oracle is not None and np.isfinite(oracle.to_numpy()).any():
            ref["oracle"] = oracle
    if metric == "n_voxels":
        out = out.astype("Int64")
    return pd.concat([pd.DataFrame(ref, index=out.index), out], axis=1) if ref else out


def format_table(table: pd.DataFrame, width: int = WIDTH) -> str:
    """``table`` as text, numbers to 3 decimals; columns wrap into blocks of at most ``width``."""
    with pd.option_context("display.max_columns", None, "display.precision", 3):
        return table.to_string(float_format=lambda v: f"{v:.3f}", na_rep="–", line_width=width)


def main_compare(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="brainenc compare", description=(
        "Print a per-ROI table comparing run directories: ROIs down (in the store's atlas order), "
        "models across, one metric (default: median Pearson r)."))
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--by", default="roi", help="comma-separated grouping columns (default: roi)")
    ap.add_argument("--metric", default="pearson",
                    help=f"comma-separated metrics among {', '.join(METRICS)}, one table each "
                         "(default: pearson)")
    ap.add_argument("--wide", action="store_true",
                    help="every metric of every model side by side in one wide table")
    a = ap.parse_args(argv)
    metrics = [m.strip() for m in a.metric.split(",") if m.strip()]
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        ap.error(f"--metric: {', '.join(unknown) or 'nothing'} given; expected one or more of {', '.join(METRICS)}")
    runs = [read_run(r) for r in a.runs]
    by = tuple(a.by.split(","))
    for r, run in zip(a.runs, runs):
        missing = [c for c in by if c not in run.voxels.columns]
        if missing:
            raise ResultsError(f"{r / 'results' / 'voxels.csv'}: no column {missing} to group by "
                               f"(--by); columns are {list(run.voxels.columns)}")
    table = roi_table([r.voxels for r in runs], by, atlas_order(runs))
    if a.wide:
        print(format_table(table, width=10_000))
        return 0
    for i, metric in enumerate(metrics):
        print(("\n" if i else "") + f"{METRIC_TITLES[metric]}:")
        print(format_table(metric_table(table, metric)))
    return 0

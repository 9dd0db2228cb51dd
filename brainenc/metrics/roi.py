"""Summaries of a per-voxel results table by ROI (or any grouping): the one per-ROI aggregation
(``brainenc compare`` prints it; the report adds intervals and tests on the same groups)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

__all__ = ["ORACLE_MIN", "frac_oracle", "merge_orders", "roi_order", "roi_summary"]


def roi_summary(
    df: pd.DataFrame,
    value_cols: Sequence[str] = ("pearson",),
    by: Sequence[str] = ("model", "dataset", "subject", "roi"),
) -> pd.DataFrame:
    """NaN-aware median / mean / count of per-voxel values within groups.

    Parameters
    ----------
    df : DataFrame (n_rows, ...)
        Tidy per-voxel table, one row per (run, voxel[, roi]) with the ``by`` and ``value_cols``
        columns.
    value_cols : sequence of str
        Numeric columns to summarise (e.g. ``"pearson"``, ``"normalised_score"``).
    by : sequence of str
        Grouping columns. Rows whose group label is missing form their own group, so voxels
        outside every ROI are reported, not silently dropped.

    Returns
    -------
    summary : DataFrame (n_groups * len(value_cols), len(by) + 5)
        Long (tidy) format, columns ``[*by, "metric", "median", "mean", "count", "n_nan"]``.
        ``median`` and ``mean`` ignore NaN; ``count`` is the number of non-NaN values and
        ``n_nan`` the number of NaN ones (so ``count + n_nan`` is the group size).
    """
    by, value_cols = list(by), list(value_cols)
    missing = [c for c in by + value_cols if c not in df.columns]
    if missing:
        raise ValueError(f"roi_summary: column(s) {missing} not in the table (columns: {list(df.columns)})")
    if not value_cols:
        raise ValueError("roi_summary: value_cols must name at least one column")

    long = df[by + value_cols].melt(id_vars=by, value_vars=value_cols, var_name="metric")
    long["value"] = pd.to_numeric(long["value"], errors="raise").astype("float64")
    grouped = long.groupby(by + ["metric"], dropna=False, observed=True, sort=True)["value"]
    out = grouped.agg(median="median", mean="mean", count="count", size="size").reset_index()
    out["n_nan"] = out.pop("size") - out["count"]
    return out[by + ["metric", "median", "mean", "count", "n_nan"]]


#: Below this oracle r the ratio r / oracle is noise (voxels with almost no signal to predict)
ORACLE_MIN = 0.1


def frac_oracle(pearson, oracle) -> np.ndarray:
    """The share of the attainable correlation a model reached: r / oracle r per voxel where the
    oracle exceeds :data:`ORACLE_MIN`, else NaN.  ``pearson``, ``oracle``: (n_voxels,) -> float64
    (n_voxels,)."""
    r = np.asarray(pearson, dtype=np.float64)
    o = np.asarray(oracle, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(o > ORACLE_MIN, r / o, np.nan)


#: Group labels that are not ROIs of an atlas: unlabelled voxels, and every voxel pooled
UNLABELLED, POOLED = "none", "all"


def roi_order(rois: Iterable, atlas_order: Sequence[str] = ()) -> list[str]:
    """The ROIs of ``rois`` in display order: first those of ``atlas_order`` (the store's atlas
    order, e.g. V1, V2, V3, hV4, FFA, PPA), then any other ROI alphabetically, then ``"none"``
    (unlabelled voxels), then ``"all"`` (pooled).  Each ROI once."""
    present = list(dict.fromkeys(str(r) for r in rois))
    special = (UNLABELLED, POOLED)
    known = [r for r in dict.fromkeys(atlas_order) if r in present and r not in special]
    others = sorted(r for r in present if r not in known and r not in special)
    return known + others + [r for r in special if r in present]


def merge_orders(orders: Iterable[Sequence[str]]) -> list[str]:
    """One ROI order from several (one per dataset/subject or run): each name where it first
    appears, so subjects sharing an atlas keep its order."""
    return list(dict.fromkeys(str(r) for order in orders for r in order))

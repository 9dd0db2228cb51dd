"""The per-voxel results table every run writes: its schema, its writer and its reader.

Reports, comparisons, sweeps and the AFO summary read runs only through :func:`read_run` /
:func:`read_results`, which check the schema below and keep identifiers as strings.

``<run_dir>/results/voxels.csv`` — one row per voxel of each tested (dataset, subject):

    run, model, backbone, seed, dataset, subject, voxel, roi, roi_<atlas>..., x, y, z, space,
    pearson, noise_ceiling (%), normalised (% of the noise ceiling, 100 r^2 / (NC/100)),
    oracle (simbrain only), n_test, n_repeats, [flat_x, flat_y], [extra columns]

``<run_dir>/results/summary.json`` — run, model, backbone, seed, wall_time_s, retrieval, pairs,
n_test_images and roi_order (per dataset/subject, the ROIs of the ``roi`` column in the store's
atlas order).
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

import h5py
import numpy as np
import pandas as pd

from brainenc.ioutil import atomic_path, atomic_write
from brainenc.metrics.noise_ceiling import noise_ceiling, normalised_score
from brainenc.metrics.roi import merge_orders


#: Columns voxels.csv must have, with what each holds (used in error messages).
REQUIRED_COLUMNS: dict[str, str] = {
    "run": "run name (str)",
    "model": "model name (str)",
    "backbone": "backbone name (str)",
    "seed": "integer seed",
    "dataset": "dataset name (str)",
    "subject": "subject id (str, e.g. \"01\" or \"subj01\")",
    "voxel": "integer voxel index within the subject",
    "roi": 'ROI name from the primary atlas ("none" if unlabelled)',
    "x": "x coordinate in mm",
    "y": "y coordinate in mm",
    "z": "z coordinate in mm",
    "space": 'coordinate space, e.g. "MNI152", "func1pt8mm", "fsaverage", "simbrain-flat"',
    "pearson": "per-voxel Pearson r on the test set (float, NaN allowed)",
    "noise_ceiling": "noise ceiling in percent (float, NaN allowed)",
    "normalised": "noise-normalised score in percent (float, NaN allowed)",
    "oracle": "simbrain oracle Pearson (float; NaN for real data)",
}
NUMERIC_COLUMNS = ("voxel", "x", "y", "z", "pearson", "noise_ceiling", "normalised", "oracle")
#: Identifier columns, read as strings whatever they look like (subject "01" stays "01").
TEXT_COLUMNS = ("run", "model", "backbone", "dataset", "subject", "roi", "space")


class ResultsError(ValueError):
    """A run's results table (or summary) is missing or malformed; the message names the file,
    the field and what was expected.  Reports and comparisons raise it for their inputs too."""

    input_error = True  # the CLI prints it without a traceback


def pair_table(pair, pearson: np.ndarray, extra: Optional[Mapping[str, np.ndarray]] = None) -> pd.DataFrame:
    """Per-voxel rows for one :class:`~brainenc.data.datamodule.PairData`; ``pearson`` (n_voxels,)."""
    info = pair.info
    test = pair.split.test
    reps = pair.n_repeats(test)
    # NSD formula with n = repeats averaged; for unequal repeat counts use the mean of 1/n,
    # which is what the variance of the averaged noise depends on
    n_eff = 1.0 / np.mean(1.0 / reps)
    df = pd.DataFrame({"dataset": info.dataset, "subject": info.subject,
                       "voxel": np.arange(info.n_voxels)})
    atlases = list(info.rois)
    df["roi"] = info.rois[atlases[0]].names() if atlases else "none"
    for a in atlases[1:]:
        df[f"roi_{a}"] = info.rois[a].names()
    df[["x", "y", "z"]] = info.coords
    df["space"] = info.space
    df["pearson"] = pearson
    if info.ncsnr is not None:
        nc = noise_ceiling(info.ncsnr.astype(np.float64), n_eff)
        df["noise_ceiling"] = nc
        df["normalised"] = normalised_score(pearson, nc)
    else:
        df["noise_ceiling"] = np.nan
        df["normalised"] = np.nan
    df["oracle"] = np.nan
    if info.has_truth:
        from brainenc.data.simbrain import oracle_ceiling

        df["oracle"] = oracle_ceiling(pair.store, info.subject, test)
        with h5py.File(info.path, "r") as f:
            if "truth/flat_xy" in f:
                df[["flat_x", "flat_y"]] = f["truth/flat_xy"][:]
    df["n_test"] = len(test)
    df["n_repeats"] = n_eff
    for k, v in (extra or {}).items():
        df[k] = v
    return df


def write_results(run_dir: str | os.PathLike, datamodule, pearson: Mapping[str, np.ndarray],
                  retrieval: Mapping[str, dict], meta: Mapping,
                  extra: Optional[Mapping[str, Mapping[str, np.ndarray]]] = None) -> Path:
    """Write ``results/voxels.csv`` and ``results/summary.json`` atomically; return the results dir."""
    out = Path(run_dir) / "results"
    out.mkdir(parents=True, exist_ok=True)
    run = meta.get("run") or Path(run_dir).name
    seed = meta.get("seed", int(os.environ.get("PL_GLOBAL_SEED", -1)))
    tables = []
    for key, r in pearson.items():
        df = pair_table(datamodule.pair(key), r, (extra or {}).get(key))
        df.insert(0, "seed", seed)
        df.insert(0, "backbone", meta.get("backbone", ""))
        df.insert(0, "model", meta.get("model", ""))
        df.insert(0, "run", run)
        tables.append(df)
    table = pd.concat(tables, ignore_index=True)
    with atomic_path(out / "voxels.csv") as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    summary = {"run": run, "model": meta.get("model", ""), "backbone": meta.get("backbone", ""),
               "seed": seed, "wall_time_s": float(meta.get("wall_time_s", float("nan"))),
               "pairs": sorted(pearson), "retrieval": {k: _plain(v) for k, v in retrieval.items()},
               "n_test_images": {k: int(len(datamodule.pair(k).split.test)) for k in pearson},
               # the primary atlas's ROIs in its label order, so tables and figures list them as
               # the store numbers them (V1, V2, ...) instead of alphabetically
               "roi_order": {k: _primary_roi_order(datamodule.pair(k).info) for k in pearson}}
    atomic_write(out / "summary.json", json.dumps(summary, indent=2))
    return out


def _primary_roi_order(info) -> list[str]:
    """The ROI names of the atlas that fills the ``roi`` column (the first), in label order."""
    atlases = list(info.rois)
    return info.rois[atlases[0]].order() if atlases else []


def _plain(d: Mapping) -> dict:
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in d.items()}


@dataclass
class Run:
    """One tested run directory: its per-voxel table and its summary (what a report, a
    comparison or a sweep consumes).

    Attributes
    ----------
    path : Path
        The run directory.
    voxels : DataFrame (n_rows, n_columns)
        voxels.csv, identifiers (:data:`TEXT_COLUMNS`) as str; the report adds ``label``.
    summary : dict
        results/summary.json ({} if absent).
    """

    path: Path
    voxels: pd.DataFrame
    summary: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.summary.get("run") or self.voxels["run"].iloc[0])

    @property
    def roi_order(self) -> list[str]:
        """The store's atlas order of the run's ROIs (summary.json ``roi_order``, one list per
        dataset/subject, merged); empty for a table written without it (then ROIs are listed
        alphabetically)."""
        orders = self.summary.get("roi_order")
        if not isinstance(orders, dict):
            return []
        return merge_orders(o for o in orders.values() if isinstance(o, list))


def roi_order(runs: list["Run"]) -> list[str]:
    """The atlas order of several runs' ROIs (:attr:`Run.roi_order`, merged in run order)."""
    return merge_orders(r.roi_order for r in runs)


# --------------------------------------------------------------------------- loading


def read_run(run_dir: str | Path) -> Run:
    """Read and validate ``RUN_DIR/results/voxels.csv`` (+ summary.json if present).

    Raises
    ------
    ResultsError
        Missing file, missing column, non-numeric numeric column, or duplicate
        (run, model, dataset, subject, voxel) rows.
    """
    run_dir = Path(run_dir)
    path = run_dir / "results" / "voxels.csv"
    if not path.is_file():
        raise ResultsError(
            f"{path}: file not found; expected the run's per-voxel table "
            f"(RUN_DIR/results/voxels.csv with columns {', '.join(REQUIRED_COLUMNS)})"
        )
    try:
        df = pd.read_csv(path, dtype=dict.fromkeys(TEXT_COLUMNS, str), keep_default_na=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ResultsError(f"{path}: could not be parsed as CSV ({exc})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        expected = "; ".join(f"'{c}' ({REQUIRED_COLUMNS[c]})" for c in missing)
        raise ResultsError(f"{path}: missing column(s) {expected}; found columns {list(df.columns)}")
    if df.empty:
        raise ResultsError(f"{path}: has a header but no rows; expected one row per voxel")
    for col in NUMERIC_COLUMNS + tuple(c for c in ("n_test", "flat_x", "flat_y") if c in df.columns):
        if not pd.api.types.is_numeric_dtype(df[col]):
            bad = pd.to_numeric(df[col], errors="coerce").isna() & df[col].notna()
            example = df.loc[bad, col].iloc[0]
            raise ResultsError(
                f"{path}: column '{col}' must be numeric; row {int(bad.idxmax()) + 2} holds {example!r}"
            )
    # A row with fewer fields than the header (a truncated write, a hand edit) would otherwise
    # be padded with NaN by pandas and silently drop out of medians.
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        width = len(next(reader))
        for lineno, row in enumerate(reader, start=2):
            if row and len(row) != width:
                raise ResultsError(f"{path}: line {lineno} has {len(row)} fields; expected {width} "
                                       "(one per column of the header)")
    for col in ("pearson", "noise_ceiling", "normalised", "oracle", "x", "y", "z"):
        vals = df[col].to_numpy(dtype=np.float64)
        if np.isinf(vals).any():
            raise ResultsError(f"{path}: column '{col}' holds Inf in row "
                                   f"{int(np.flatnonzero(np.isinf(vals))[0]) + 2}; expected finite numbers or NaN")
    for col in ("pearson", "oracle"):
        vals = df[col].to_numpy(dtype=np.float64)
        out = np.abs(vals) > 1 + 1e-6
        if out.any():
            raise ResultsError(f"{path}: column '{col}' holds {vals[out][0]} in row "
                                   f"{int(np.flatnonzero(out)[0]) + 2}; expected a correlation in [-1, 1] or NaN")
    # A missing ROI label is the same thing as an unlabelled voxel.
    df["roi"] = df["roi"].fillna("none")
    df["subject"] = df["subject"].astype(str)
    key = ["run", "model", "dataset", "subject", "voxel"]
    dup = df.duplicated(key)
    if dup.any():
        row = df.loc[dup].iloc[0]
        raise ResultsError(
            f"{path}: duplicate rows for {dict(row[key])}; expected one row per "
            "(run, model, dataset, subject, voxel)"
        )
    summary: dict = {}
    spath = run_dir / "results" / "summary.json"
    if spath.is_file():
        try:
            summary = json.loads(spath.read_text())
        except json.JSONDecodeError as exc:
            raise ResultsError(f"{spath}: not valid JSON ({exc})") from None
        if not isinstance(summary, dict):
            raise ResultsError(f"{spath}: expected a JSON object, got {type(summary).__name__}")
    return Run(path=run_dir, voxels=df, summary=summary)


def read_results(run_dir: str | os.PathLike) -> pd.DataFrame:
    """A run's validated per-voxel table (:func:`read_run`), identifiers as strings."""
    return read_run(run_dir).voxels


def add_column(run_dir: str | os.PathLike, column: str, values: Mapping[str, np.ndarray]) -> pd.DataFrame:
    """Set integer ``column`` (e.g. cluster labels) of a run's per-voxel table from
    {"dataset/subject": (n_voxels,)} and rewrite the table atomically; returns the new table.

    Voxels are matched by (dataset, subject, voxel); rows of pairs not in ``values`` stay empty
    (a nullable integer column). Identifiers keep their text (subject "01" stays "01").
    """
    path = Path(run_dir) / "results" / "voxels.csv"
    df = read_results(run_dir)
    col = np.full(len(df), np.nan)
    keys = (df["dataset"].astype(str) + "/" + df["subject"].astype(str)).to_numpy()
    for key, v in values.items():
        rows = np.flatnonzero(keys == key)
        vox = df["voxel"].to_numpy()[rows].astype(np.int64)
        v = np.asarray(v)
        if len(rows) and vox.max() >= len(v):
            raise ResultsError(f"{path}: {key} has voxel {vox.max()} but {len(v)} values for '{column}'")
        col[rows] = v[vox]
    df[column] = pd.Series(col).round().astype("Int64")
    with atomic_path(path) as tmp:  # full float precision: the other columns come back as they were
        df.to_csv(tmp, index=False)
    return df


def pearson_summary(run_dir: str | os.PathLike) -> tuple[float, int]:
    """(median Pearson r, number of rows) of a run's table, reading only the ``pearson`` column;
    (NaN, 0) when the table is missing or unreadable (a sweep's status line must not fail)."""
    try:
        r = pd.read_csv(Path(run_dir) / "results" / "voxels.csv", usecols=["pearson"])["pearson"]
    except (ValueError, OSError, pd.errors.ParserError, pd.errors.EmptyDataError):
        return math.nan, 0
    return float(r.median()), int(len(r))

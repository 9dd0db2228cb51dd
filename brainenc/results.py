"""The per-voxel results table every run writes (reports and sweeps read only these files).

``<run_dir>/results/voxels.csv`` — one row per voxel of each tested (dataset, subject):

    run, model, backbone, seed, dataset, subject, voxel, roi, roi_<atlas>..., x, y, z, space,
    pearson, noise_ceiling (%), normalised (% of the noise ceiling, 100 r^2 / (NC/100)),
    oracle (simbrain only), n_test, n_repeats, [flat_x, flat_y], [extra columns]

``<run_dir>/results/summary.json`` — run, model, backbone, seed, wall_time_s, retrieval, pairs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Optional

import h5py
import numpy as np
import pandas as pd

from brainenc.ioutil import atomic_path, atomic_write
from brainenc.metrics.noise_ceiling import noise_ceiling, normalised_score


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
               "n_test_images": {k: int(len(datamodule.pair(k).split.test)) for k in pearson}}
    atomic_write(out / "summary.json", json.dumps(summary, indent=2))
    return out


def _plain(d: Mapping) -> dict:
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in d.items()}


def read_results(run_dir: str | os.PathLike) -> pd.DataFrame:
    """Read and validate a run's per-voxel table (the same checks as ``brainenc report``:
    required columns, numbers, no Inf, one row per voxel, no short rows)."""
    from brainenc.reports.tables import load_run

    p = Path(run_dir) / "results" / "voxels.csv"
    if not p.exists():
        raise FileNotFoundError(f"{p}: no per-voxel results table; run `brainenc test` for this run first")
    return load_run(run_dir).voxels

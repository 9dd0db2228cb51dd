"""Which backbone level each ROI reads: a retinotopic readout's level weights, averaged per ROI.

Every voxel of :class:`~brainenc.models.retinotopic.RetinotopicReadout` carries softmax weights
over the backbone's levels (with several grid sizes, over (size, level) pairs, size-major; the
sizes of one level are summed here). Along a visual hierarchy the mean level should rise from V1
to the category areas. Command line (one table per run; ``--out`` also writes them as CSV)::

    python -m brainenc.analysis.levels runs/quickstart/retinotopic [RUN ...] --out levels.csv
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd


def level_weights(readout, pair: str) -> np.ndarray:
    """Level weights (n_voxels, L) of ``pair``, one column per backbone level, rows summing to 1."""
    levels = readout.voxel_params(pair)[1].detach().cpu().numpy().astype(np.float64)
    n_backbone = len(readout.spec.shapes)
    # (V, sizes * L) size-major -> (V, sizes, L) -> summed over sizes
    return levels.reshape(len(levels), -1, n_backbone).sum(axis=1)


def level_profile(readout, pairs: Sequence) -> pd.DataFrame:
    """Mean level weights per ROI of every pair the readout knows.

    Parameters
    ----------
    readout : a :class:`~brainenc.models.retinotopic.RetinotopicReadout`
    pairs : :class:`~brainenc.data.datamodule.PairData` (ROIs from the first atlas of each subject)

    Returns
    -------
    DataFrame, one row per (pair, roi) and one per pair with roi "all": ``pair, roi, n_voxels,
    level_0 .. level_{L-1}`` (mean weight) and ``mean_level`` (sum_l l * weight, averaged).
    """
    rows = []
    for p in pairs:
        if p.key not in readout.voxel_counts:
            continue
        w = level_weights(readout, p.key)
        atlas = next(iter(p.info.rois.values()), None)
        labels = (atlas.values.astype(np.int64) if atlas is not None else np.zeros(len(w), np.int64))
        names = dict(atlas.labels) if atlas is not None else {}
        groups = [(names.get(int(v), str(v)), labels == v) for v in sorted(set(labels.tolist())) if v != 0]
        groups.append(("all", np.ones(len(w), bool)))
        for roi, m in groups:
            mean = w[m].mean(axis=0)
            rows.append({"pair": p.key, "roi": roi, "n_voxels": int(m.sum()),
                         **{f"level_{i}": float(x) for i, x in enumerate(mean)},
                         "mean_level": float((w[m] @ np.arange(w.shape[1])).mean())})
    return pd.DataFrame(rows)


def main(argv: Optional[list[str]] = None) -> int:
    from brainenc.analysis.prf import load_tested_run
    from brainenc.models.retinotopic import RetinotopicReadout

    ap = argparse.ArgumentParser(prog="python -m brainenc.analysis.levels", description=(
        "Mean level weights per ROI of tested retinotopic runs: which backbone level each ROI reads."))
    ap.add_argument("runs", nargs="+", type=Path, help="run directories (with results/config.yaml and checkpoints/)")
    ap.add_argument("--out", type=Path, default=None, help="also write all tables into this CSV (column 'run')")
    a = ap.parse_args(argv)
    frames = []
    for run in a.runs:
        model, dm = load_tested_run(run)
        if not isinstance(model.readout, RetinotopicReadout):
            raise SystemExit(f"{run}: readout is {type(model.readout).__name__}; expected a RetinotopicReadout")
        df = level_profile(model.readout, dm.pairs)
        df.insert(0, "run", str(run))
        frames.append(df)
        print(f"== {run}\n{df.drop(columns='run').to_string(index=False, float_format='%.3f')}")
    if a.out:
        from brainenc.ioutil import atomic_path

        with atomic_path(a.out) as tmp:
            pd.concat(frames, ignore_index=True).to_csv(tmp, index=False, float_format="%.6g")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The per-voxel results table: the typed reader keeps identifiers as written, and the one ROI
aggregation gives the medians `brainenc compare` prints."""

import math

import numpy as np
import pandas as pd
import pytest

from brainenc.compare import roi_table
from brainenc.results import REQUIRED_COLUMNS, ResultsError, pearson_summary, read_results, read_run


def _write(run, subjects=("01", "02"), rois=("1", "V1", ""), n=6, model="m"):
    rng = np.random.default_rng(0)
    rows = []
    for s in subjects:
        for v in range(n):
            rows.append({"run": "007", "model": model, "backbone": "test_vit", "seed": 0, "dataset": "nsd",
                         "subject": s, "voxel": v, "roi": rois[v % len(rois)], "x": 1.0, "y": 2.0, "z": 3.0,
                         "space": "func1pt8mm", "pearson": rng.uniform(-0.2, 0.8), "noise_ceiling": 50.0,
                         "normalised": np.nan, "oracle": 0.5 if v % 2 else 0.05})
    (run / "results").mkdir(parents=True)
    pd.DataFrame(rows).to_csv(run / "results" / "voxels.csv", index=False)
    return pd.DataFrame(rows)


def test_identifiers_stay_as_written(tmp_path):
    _write(tmp_path / "run")
    df = read_results(tmp_path / "run")
    assert set(REQUIRED_COLUMNS) <= set(df.columns)
    assert sorted(df["subject"].unique()) == ["01", "02"]  # not 1 and 2
    assert df["run"].iloc[0] == "007" and sorted(df["roi"].unique()) == ["1", "V1", "none"]
    assert read_run(tmp_path / "run").summary == {}


def test_a_missing_table_names_the_file(tmp_path):
    with pytest.raises(ResultsError, match=r"run/results/voxels.csv: file not found"):
        read_results(tmp_path / "run")
    median, n = pearson_summary(tmp_path / "run")
    assert math.isnan(median) and n == 0


def test_roi_table_is_the_median_per_model_and_roi(tmp_path):
    a, b = _write(tmp_path / "a", model="a"), _write(tmp_path / "b", model="b")
    table = roi_table([read_results(tmp_path / "a"), read_results(tmp_path / "b")])
    truth = a.assign(roi=a["roi"].replace("", "none"))
    for roi, g in truth.groupby("roi"):
        assert table.loc[roi, ("a", "pearson")] == pytest.approx(g["pearson"].median())
        assert table.loc[roi, ("a", "n_voxels")] == len(g)
        frac = np.where(g["oracle"] > 0.1, g["pearson"] / g["oracle"], np.nan)
        assert table.loc[roi, ("a", "frac_oracle")] == pytest.approx(np.nanmedian(frac), nan_ok=True)
    assert list(table.columns.get_level_values(0).unique()) == ["a", "b"]
    assert np.isnan(table[("b", "normalised")]).all()
    assert pearson_summary(tmp_path / "b") == (pytest.approx(b["pearson"].median()), len(b))

"""Merging the per-rank prediction files of a DDP `brainenc predict` (real HDF5 and CSV files)."""

from __future__ import annotations

import h5py
import numpy as np
import pandas as pd

from brainenc.data.store import RoiAtlas
from brainenc.lit.predictions import PredictionWriter, merge_rank_files


def _write(out, rank: int, stimuli: list[int], pred: np.ndarray, rois: dict) -> None:
    w = PredictionWriter(out, f".rank{rank}", {"model": "m"}, rois)
    ids = [f"img{s}" for s in stimuli]
    w.add("d/s1", np.array(stimuli), ids, pred[stimuli], ["face" if s % 2 else "noface" for s in stimuli])
    if rank == 1:
        w.skip([("broken.png", "cannot identify image file")])
    w.close()


def test_rank_files_merge_into_one_sorted_file_without_repeats(tmp_path):
    rng = np.random.default_rng(0)
    pred = rng.standard_normal((9, 5)).astype(np.float32)
    rois = {"d/s1": {"a": RoiAtlas(np.array([1, 1, 2, 2, 0]), {1: "V1", 2: "FFA"})}}
    # rank 0 holds even stimuli, rank 1 odd ones, and stimulus 0 again (a padded sample)
    _write(tmp_path, 0, [0, 2, 4, 6, 8], pred, rois)
    _write(tmp_path, 1, [0, 1, 3, 5, 7], pred, rois)
    written = merge_rank_files(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d__s1.h5", "roi_means.csv", "skipped.txt"]
    assert sorted(p.name for p in written) == ["d__s1.h5", "roi_means.csv", "skipped.txt"]
    with h5py.File(tmp_path / "d__s1.h5") as f:
        assert list(f["stimulus"][()]) == list(range(9))
        assert [s.decode() for s in f["stimulus_id"]] == [f"img{i}" for i in range(9)]
        assert [s.decode() for s in f["category"]][:2] == ["noface", "face"]
        np.testing.assert_array_equal(f["pred"][()], pred)
        assert f.attrs["model"] == "m" and f.attrs["n_skipped"] == 1
    means = pd.read_csv(tmp_path / "roi_means.csv")
    assert len(means) == 9 * 2 and not means.duplicated(["image", "roi"]).any()
    ffa = means[(means.image == "img3") & (means.roi == "FFA")]["mean"].item()
    assert abs(ffa - pred[3, 2:4].mean()) < 1e-5
    assert (tmp_path / "skipped.txt").read_text() == "broken.png\tcannot identify image file\n"


def test_merge_in_small_blocks_equals_one_block(tmp_path):
    pred = np.arange(60, dtype=np.float32).reshape(20, 3)
    for rank, rows in enumerate([list(range(0, 20, 3)), [r for r in range(20) if r % 3]]):
        w = PredictionWriter(tmp_path, f".rank{rank}")
        w.add("d/s1", np.array(rows), [str(r) for r in rows], pred[rows])
        w.close()
    merge_rank_files(tmp_path, 2, block=4)
    with h5py.File(tmp_path / "d__s1.h5") as f:
        np.testing.assert_array_equal(f["pred"][()], pred)
    assert not (tmp_path / "roi_means.csv").exists()

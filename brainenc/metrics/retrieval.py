"""Image identification from predicted brain responses."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

__all__ = ["identification_accuracy", "pattern_correlations"]


def pattern_correlations(measured, predicted) -> np.ndarray:
    """Correlate every measured response pattern with every predicted one, across voxels.

    Parameters
    ----------
    measured, predicted : array (n_images, n_voxels)
        Row ``i`` of both belongs to image ``i``. Voxels (columns) holding any non-finite value
        in either array are dropped for all images, so every pair is scored on the same voxels.

    Returns
    -------
    corr : ndarray float64 (n_images, n_images)
        ``corr[i, j]`` = Pearson r between measured image ``i`` and predicted image ``j``; NaN
        for a row that is constant over the kept voxels.
    """
    m = np.asarray(measured, dtype=np.float64)
    p = np.asarray(predicted, dtype=np.float64)
    if m.ndim != 2 or m.shape != p.shape:
        raise ValueError(
            "measured and predicted must both be (n_images, n_voxels) with the same shape, "
            f"got {m.shape} and {p.shape}"
        )
    # an image whose measured pattern is missing entirely (every repeat a NaN volume) says
    # nothing about any voxel: let it not veto every voxel; its own row stays NaN (a miss)
    rows = np.isfinite(m).any(axis=1)
    keep = np.isfinite(m[rows]).all(axis=0) & np.isfinite(p[rows]).all(axis=0)
    if keep.sum() < 2:
        raise ValueError(
            f"identification needs >= 2 voxels finite in every image; {int(keep.sum())} of "
            f"{m.shape[1]} are"
        )
    m, p = m[:, keep], p[:, keep]

    def unit_rows(a: np.ndarray) -> np.ndarray:
        a = a - a.mean(axis=1, keepdims=True)
        norm = np.linalg.norm(a, axis=1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(norm > 0, a / norm, np.nan)

    return np.clip(unit_rows(m) @ unit_rows(p).T, -1.0, 1.0)


def identification_accuracy(measured, predicted, k: Iterable[int] = (1, 5)) -> dict:
    """Top-k identification of each measured response among all predictions.

    For each measured image ``i``, the predictions of all images are ranked by their
    correlation with it (:func:`pattern_correlations`). Image ``i`` is identified at ``k`` when
    fewer than ``k`` *other* predictions score at least as high as its own:
    ``#{j != i : corr[i, j] >= corr[i, i]} < k``. Ties therefore count against the image
    (pessimistic), so identical predictions cannot score above chance. A NaN own score is a
    miss; NaN scores of other images never outrank it.

    Parameters
    ----------
    measured, predicted : array (n_images, n_voxels)
        Measured (e.g. repeat-averaged test) and predicted responses, rows aligned.
    k : iterable of int
        Ranks to report, each >= 1. ``k >= n_images`` is allowed and gives accuracy 1.

    Returns
    -------
    result : dict
        ``top{k}``: fraction of images identified at ``k``. ``chance_top{k}``:
        ``min(k, n_images) / n_images``, the expected value for unrelated predictions.
        ``n_images``: int.
    """
    ks = [int(v) for v in k]
    if any(v < 1 for v in ks):
        raise ValueError(f"every k must be >= 1, got {ks}")
    corr = pattern_correlations(measured, predicted)
    n = corr.shape[0]
    own = np.diag(corr)
    # NaN >= x is False, so NaN competitors never count; a NaN own score is handled below.
    beats = (corr >= own[:, None]).sum(axis=1) - 1  # minus the image itself
    beats = np.where(np.isnan(own), n, beats)
    out: dict = {}
    for v in ks:
        out[f"top{v}"] = float(np.mean(beats < v))
        out[f"chance_top{v}"] = min(v, n) / n
    out["n_images"] = n
    return out

"""Noise ceilings from repeated trials (NSD convention, Allen et al. 2022) and scores normalised
by them (Algonauts 2023 convention).

Quantities
----------
* ``ncsnr``: noise-ceiling signal-to-noise ratio, signal sd / noise sd of single trials.
* ``NC`` (percent): the share of variance of an ``n``-trial average that the stimulus can
  explain, ``NC = 100 * ncsnr**2 / (ncsnr**2 + 1 / n)``.
* ``ceiling_r = sqrt(NC / 100)``: the same ceiling in correlation units, the best Pearson r a
  perfect model can expect against the noisy ``n``-trial average.
* normalised score: ``100 * r**2 / (NC / 100)``, the percent of the explainable variance that a
  model explains.
"""

from __future__ import annotations

import numpy as np

__all__ = ["noise_ceiling", "estimate_ncsnr", "normalised_score", "ceiling_r"]


def noise_ceiling(ncsnr, n_repeats) -> np.ndarray:
    """Noise ceiling in percent: ``100 * ncsnr**2 / (ncsnr**2 + 1 / n_repeats)``.

    Parameters
    ----------
    ncsnr : array-like (n_voxels,) or scalar
        Single-trial signal sd / noise sd; must be >= 0 where not NaN. NaN gives NaN.
    n_repeats : int, or array-like (n_voxels,)
        Number of trials averaged in the data being predicted (e.g. 3 for NSD test images,
        or the per-voxel / per-image average count).

    Returns
    -------
    nc : ndarray float64, broadcast shape of the inputs
        Percent in [0, 100].
    """
    snr = np.asarray(ncsnr, dtype=np.float64)
    n = np.asarray(n_repeats, dtype=np.float64)
    if np.any(snr < 0):  # NaN compares False, so NaN passes through.
        raise ValueError("ncsnr must be >= 0 (it is a ratio of standard deviations)")
    if not np.all(np.isfinite(n) & (n > 0)):
        raise ValueError(f"n_repeats must be finite and > 0, got {n_repeats!r}")
    s2 = snr**2
    with np.errstate(invalid="ignore"):
        # Written as s2 / (s2 + 1/n) so ncsnr = inf gives 100 rather than inf / inf.
        nc = 100.0 * np.where(np.isinf(s2), 1.0, s2 / (s2 + 1.0 / n))
    return np.asarray(nc, dtype=np.float64)


def ceiling_r(nc_percent) -> np.ndarray:
    """Noise ceiling in correlation units: ``sqrt(nc_percent / 100)``.

    Parameters
    ----------
    nc_percent : array-like (n_voxels,) or scalar
        Noise ceiling in percent. Negative or NaN gives NaN.

    Returns
    -------
    r_max : ndarray float64, same shape
    """
    nc = np.asarray(nc_percent, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return np.where(nc >= 0, np.sqrt(np.abs(nc) / 100.0), np.nan)


def normalised_score(pearson, nc_percent) -> np.ndarray:
    """Percent of the noise ceiling explained: ``100 * pearson**2 / (nc_percent / 100)``.

    This is the Algonauts 2023 "noise-normalised encoding accuracy". ``r**2`` is the variance
    of the measured (``n``-trial averaged) data explained by the prediction. Dividing by the
    explainable fraction ``NC / 100`` gives 100 for a model as good as the noise allows. The sign
    of ``r`` is lost (a negative r scores like a positive one; report r alongside), and
    noise can push single voxels above 100. Never clip them: clipping would bias averages.

    Parameters
    ----------
    pearson : array-like (n_voxels,)
        Pearson r between prediction and the measured data the ceiling refers to.
    nc_percent : array-like (n_voxels,)
        Noise ceiling in percent for the same data (same number of averaged repeats).

    Returns
    -------
    score : ndarray float64 (n_voxels,)
        NaN where ``nc_percent`` is NaN or <= 0, or ``pearson`` is NaN.
    """
    r = np.asarray(pearson, dtype=np.float64)
    nc = np.asarray(nc_percent, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        score = 100.0 * r**2 / (nc / 100.0)
    return np.where(nc > 0, score, np.nan)


def estimate_ncsnr(responses, trial_stimulus, zscore: bool = True) -> np.ndarray:
    """Estimate each voxel's ncsnr from repeated single trials (NSD recipe).

    1. Optionally z-score every voxel over all trials (ddof=1, as MATLAB's ``zscore`` in the
       NSD code), which makes the total variance 1.
    2. Noise variance = mean, over stimuli shown at least twice, of the unbiased (ddof=1)
       variance across that stimulus's trials. Every such stimulus weighs the same.
    3. Signal variance = max(0, total variance - noise variance), where total variance is the
       ddof=1 variance over all trials.
    4. ``ncsnr = sqrt(signal variance) / sqrt(noise variance)``.

    Stimuli seen once still count towards the total variance (and the z-scoring) but not the
    noise. NSD z-scores per session; do that before calling with ``zscore=False`` if needed.

    Parameters
    ----------
    responses : array (n_trials, n_voxels)
        Single-trial responses, any real dtype (computed in float64).
    trial_stimulus : array (n_trials,)
        Integer stimulus id of each trial; equal ids are repeats.
    zscore : bool
        Z-score each voxel first (default True).

    Returns
    -------
    ncsnr : ndarray float64 (n_voxels,)
        NaN for a voxel with non-finite responses or with no variance at all; inf when the
        noise variance is exactly 0 but the signal variance is not.

    Raises
    ------
    ValueError
        If the shapes disagree, or no stimulus in ``trial_stimulus`` has >= 2 trials.
    """
    y = np.asarray(responses, dtype=np.float64)
    stim = np.asarray(trial_stimulus)
    if y.ndim != 2:
        raise ValueError(f"responses must be (n_trials, n_voxels), got shape {y.shape}")
    if stim.shape != (y.shape[0],):
        raise ValueError(
            f"trial_stimulus must have shape (n_trials,) = ({y.shape[0]},) to match responses, "
            f"got {stim.shape}"
        )
    if not np.issubdtype(stim.dtype, np.integer):
        raise ValueError(f"trial_stimulus must hold integer stimulus ids, got dtype {stim.dtype}")

    _, inverse, counts = np.unique(stim, return_inverse=True, return_counts=True)
    repeated = counts >= 2
    if not repeated.any():
        raise ValueError(
            "trial_stimulus has no stimulus with >= 2 trials, so the noise variance cannot be "
            f"estimated ({stim.size} trials, all of distinct stimuli)"
        )

    with np.errstate(invalid="ignore", divide="ignore"):
        if zscore:
            y = (y - y.mean(axis=0)) / y.std(axis=0, ddof=1)
        total_var = y.var(axis=0, ddof=1)

        # Keep trials of repeated stimuli, sorted so each stimulus is a contiguous block; then
        # reduceat gives per-stimulus sums without a Python loop over stimuli.
        keep = repeated[inverse]
        order = np.argsort(inverse[keep], kind="stable")
        groups = inverse[keep][order]
        yk = y[keep][order]
        starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]])
        n_per = counts[groups[starts]].astype(np.float64)[:, None]
        means = np.add.reduceat(yk, starts, axis=0) / n_per
        # Two-pass (deviations from each stimulus mean) for a variance free of cancellation.
        dev2 = (yk - np.repeat(means, counts[groups[starts]], axis=0)) ** 2
        var_within = np.add.reduceat(dev2, starts, axis=0) / (n_per - 1)
        noise_var = var_within.mean(axis=0)

        signal_var = np.maximum(total_var - noise_var, 0.0)
        ncsnr = np.sqrt(signal_var) / np.sqrt(noise_var)
    return np.where(np.isfinite(total_var) & (total_var > 0), ncsnr, np.nan)

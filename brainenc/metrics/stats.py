"""Statistics over per-voxel scores: significance of a correlation, false discovery rate,
bootstrap intervals of a median and the paired Wilcoxon test (used by the report's tables)."""

from __future__ import annotations

import math
import zlib

import numpy as np
from scipy import stats

__all__ = ["bh_reject", "bootstrap_median_ci", "pearson_p_one_sided", "stable_seed", "wilcoxon_or_nan"]


def pearson_p_one_sided(r: np.ndarray, n: np.ndarray) -> np.ndarray:
    """One-sided p-value of H1: rho > 0 for sample correlations.

    Uses t = r * sqrt((n - 2) / (1 - r^2)) with n - 2 degrees of freedom, the
    exact null distribution of r for bivariate normal data.

    Parameters
    ----------
    r : array (n_voxels,)
    n : array (n_voxels,)  number of test images per voxel
    Returns
    -------
    p : array (n_voxels,), NaN where r or n is NaN or n < 3.
    """
    r = np.asarray(r, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        rc = np.clip(r, -1.0, 1.0)
        t = rc * np.sqrt((n - 2.0) / (1.0 - rc**2))
        p = stats.t.sf(t, n - 2.0)
    p = np.where(rc >= 1.0, 0.0, np.where(rc <= -1.0, 1.0, p))
    p[~np.isfinite(r) | ~np.isfinite(n) | (n < 3)] = np.nan
    return p


def bh_reject(p: np.ndarray, alpha: float) -> np.ndarray:
    """Benjamini-Hochberg FDR rejections over the finite entries of ``p`` (NaN -> False)."""
    p = np.asarray(p, dtype=np.float64)
    out = np.zeros(p.shape, dtype=bool)
    ok = np.isfinite(p)
    if ok.any():
        q = stats.false_discovery_control(p[ok], method="bh")
        out[ok] = q <= alpha
    return out


def stable_seed(seed: int, *key: object) -> int:
    """A seed derived from ``seed`` and a group key, independent of group order.

    Why: each cell's bootstrap must not change when another run is added to
    the report, so the generator is keyed by the cell, not by iteration order.
    """
    text = "\x1f".join(map(str, key)).encode()
    return (int(seed) * 1_000_003 + zlib.crc32(text)) % (2**63)


def bootstrap_median_ci(values: np.ndarray, n_boot: int, rng: np.random.Generator,
                        level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the median over voxels.

    Parameters
    ----------
    values : array (n_voxels,) finite values (NaNs must be removed by the caller)
    n_boot : number of resamples (0 -> no CI)
    Returns
    -------
    (low, high) : floats, NaN when there are no values or n_boot == 0.
    """
    # Sorting once lets each resample's median be read off the order statistics of
    # its *indices* (x sorted => order of x[idx] = order of idx): partitioning int32
    # indices is ~2x faster than gathering floats and calling np.median, same result.
    xs = np.sort(np.asarray(values, dtype=np.float64))
    n = xs.size
    if n == 0 or n_boot <= 0:
        return (math.nan, math.nan)
    k = n // 2
    meds = np.empty(n_boot)
    # Resample in blocks so memory stays ~ 8M indices whatever the voxel count.
    block = max(1, min(n_boot, 8_000_000 // n))
    for start in range(0, n_boot, block):
        stop = min(n_boot, start + block)
        idx = rng.integers(0, n, size=(stop - start, n), dtype=np.int32 if n < 2**31 else np.int64)
        if n % 2:
            meds[start:stop] = xs[np.partition(idx, k, axis=1)[:, k]]
        else:
            part = np.partition(idx, (k - 1, k), axis=1)
            meds[start:stop] = 0.5 * (xs[part[:, k - 1]] + xs[part[:, k]])
    a = (1.0 - level) / 2.0
    lo, hi = np.percentile(meds, [100 * a, 100 * (1 - a)])
    return (float(lo), float(hi))


def wilcoxon_or_nan(d: np.ndarray) -> tuple[float, float]:
    """scipy.stats.wilcoxon(d) (two-sided, zero_method="wilcox"), or (NaN, NaN) if undefined."""
    if d.size == 0 or not np.any(d != 0):
        return (math.nan, math.nan)
    res = stats.wilcoxon(d, zero_method="wilcox", alternative="two-sided")
    return (float(res.statistic), float(res.pvalue))

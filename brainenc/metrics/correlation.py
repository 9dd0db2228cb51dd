"""Per-voxel Pearson correlation: a numpy reference, a one-shot torch version and a
streaming, DDP-safe ``torchmetrics.Metric``.

NaN conventions
---------------
* :func:`pearson_np` is the strict reference: a column that contains any non-finite value
  (NaN or +-inf) gives NaN, as ``scipy.stats.pearsonr`` would.
* :func:`pearson_torch` and :class:`VoxelPearson` drop pairs instead: a non-finite value in
  ``pred`` or ``target`` at ``(i, v)`` removes image ``i`` for voxel ``v`` only, so one
  missing beta does not erase a voxel. Rows excluded by ``mask`` are removed for every voxel.

All three return NaN for a voxel with fewer than two valid pairs or with zero variance in
``pred`` or ``target``. Zero variance is decided exactly (largest valid value == smallest), not
by a tolerance on a computed variance, which rounding can leave slightly above zero.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["pearson_columns", "pearson_np", "pearson_torch", "VoxelPearson"]


def pearson_np(pred: np.ndarray, target: np.ndarray, axis: int = 0) -> np.ndarray:
    """Pearson correlation of matching columns, in float64 (reference implementation).

    Parameters
    ----------
    pred, target : array (n_images, n_voxels)
        Same shape. Any real dtype; computed in float64.
    axis : int
        Axis along which samples lie (default 0: rows are images, one r per column).

    Returns
    -------
    r : ndarray float64, shape of the inputs with ``axis`` removed, e.g. (n_voxels,)
        NaN where a column holds a non-finite value, has fewer than 2 samples, or is constant
        in ``pred`` or ``target``.
    """
    x = np.asarray(pred, dtype=np.float64)
    y = np.asarray(target, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"pred and target must have the same shape, got {x.shape} and {y.shape}")
    x = np.moveaxis(x, axis, 0)
    y = np.moveaxis(y, axis, 0)
    if x.shape[0] < 2:
        return np.full(x.shape[1:], np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        # Two-pass (centre, then multiply) so large offsets cost no precision.
        xc = x - x.mean(axis=0)
        yc = y - y.mean(axis=0)
        r = (xc * yc).sum(axis=0) / np.sqrt((xc * xc).sum(axis=0) * (yc * yc).sum(axis=0))
    r = np.clip(r, -1.0, 1.0)
    bad = ~(np.isfinite(x).all(axis=0) & np.isfinite(y).all(axis=0))
    bad |= (np.ptp(x, axis=0) == 0) | (np.ptp(y, axis=0) == 0)
    r = np.where(bad, np.nan, r)
    return np.asarray(r, dtype=np.float64)


def pearson_columns(a: np.ndarray, b: np.ndarray, block: int = 2048) -> np.ndarray:
    """Column-wise Pearson r of two (n, v) arrays in float64; NaN for constant columns.

    The wide-array variant of :func:`pearson_np` (simbrain's oracle over every voxel): it works on
    blocks of ``block`` columns so temporaries stay small, and counts a column whose variance is
    zero to rounding as constant.
    """
    out = np.empty(a.shape[1])
    for c in range(0, a.shape[1], block):
        x = a[:, c:c + block].astype(np.float64)
        y = b[:, c:c + block].astype(np.float64)
        x -= x.mean(0)
        y -= y.mean(0)
        sxx, syy = (x * x).sum(0), (y * y).sum(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            r = (x * y).sum(0) / np.sqrt(sxx * syy)
        # constant columns (exactly, or to rounding) have no defined correlation
        r[(sxx <= 1e-24 * len(x)) | (syy <= 1e-24 * len(y))] = np.nan
        out[c:c + block] = r
    return out


def _valid_pairs(pred: Tensor, target: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Check shapes, cast to float64 and return ``(x, y, valid)``, invalid entries zeroed.

    ``valid`` : bool (n_images, n_voxels), True where both values are finite and the row is kept.
    """
    if pred.ndim != 2 or pred.shape != target.shape:
        raise ValueError(
            "pred and target must both be (n_images, n_voxels) with the same shape, "
            f"got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    x = pred.detach().to(torch.float64)
    y = target.detach().to(torch.float64)
    valid = torch.isfinite(x) & torch.isfinite(y)
    if mask is not None:
        if mask.dtype != torch.bool or mask.shape != (x.shape[0],):
            raise ValueError(
                f"mask must be a bool tensor of shape (n_images,) = ({x.shape[0]},), "
                f"got dtype {mask.dtype} and shape {tuple(mask.shape)}"
            )
        valid &= mask.to(valid.device)[:, None]
    # Zero (not NaN) at invalid entries so they add nothing to the sums.
    x = torch.where(valid, x, torch.zeros((), dtype=x.dtype, device=x.device))
    y = torch.where(valid, y, torch.zeros((), dtype=y.dtype, device=y.device))
    return x, y, valid


def _range(v: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Per-column (min, max) over valid entries; (+inf, -inf) for a column with none."""
    inf = torch.tensor(float("inf"), dtype=v.dtype, device=v.device)
    return torch.where(valid, v, inf).amin(dim=0), torch.where(valid, v, -inf).amax(dim=0)


def _finish(r: Tensor, n: Tensor, constant: Tensor) -> Tensor:
    """Clip to [-1, 1] and set NaN where a voxel has < 2 pairs or a constant side."""
    r = r.clamp(-1.0, 1.0)
    return torch.where((n < 2) | constant | ~torch.isfinite(r), torch.full_like(r, float("nan")), r)


def pearson_torch(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-voxel Pearson correlation of a whole matrix at once, in float64.

    Same NaN rules as :class:`VoxelPearson` (non-finite pairs dropped per voxel), but computed
    two-pass (centred) because all the data are at hand.

    Parameters
    ----------
    pred, target : Tensor (n_images, n_voxels)
        Any float dtype.
    mask : bool Tensor (n_images,), optional
        False rows are ignored (e.g. padded or duplicated samples).

    Returns
    -------
    r : Tensor (n_voxels,) float64
        NaN where a voxel has fewer than 2 valid pairs or zero variance on either side.
    """
    x, y, valid = _valid_pairs(pred, target, mask)
    n = valid.sum(dim=0).to(torch.float64)
    zero = torch.zeros((), dtype=torch.float64, device=x.device)
    xc = torch.where(valid, x - x.sum(0) / n.clamp(min=1), zero)
    yc = torch.where(valid, y - y.sum(0) / n.clamp(min=1), zero)
    r = (xc * yc).sum(0) / torch.sqrt((xc * xc).sum(0) * (yc * yc).sum(0))
    xmin, xmax = _range(x, valid)
    ymin, ymax = _range(y, valid)
    return _finish(r, n, (xmin >= xmax) | (ymin >= ymax))


class VoxelPearson(Metric):
    """Streaming per-voxel Pearson correlation, exact under DDP.

    States (all float64, shape (n_voxels,)) are running sums over valid pairs: ``n`` (the
    per-voxel pair count), ``sum_x``, ``sum_y``, ``sum_xx``, ``sum_yy``, ``sum_xy`` reduced across
    processes with ``"sum"``, plus ``min_x``/``max_x``/``min_y``/``max_y`` reduced with
    ``"min"``/``"max"`` to detect constant voxels exactly. Sums and extrema are order-free, so
    any split of the images over batches and ranks gives the same result up to rounding, and
    padded or duplicated rows are excluded with ``mask`` rather than double-counted.

    ``x`` is ``pred``, ``y`` is ``target``. A non-finite value in either at ``(i, v)`` drops that
    pair for voxel ``v`` only.

    Precision
    ---------
    Raw (unshifted) float64 sums are used. A shift taken from the data would differ between
    ranks and could not be summed by torchmetrics. The cancellation in
    ``sum_xx - sum_x**2 / n`` costs a relative error of roughly ``1e-16 * (mean / sd)**2`` per
    accumulated term: about 1e-10 for mean 1000 and sd 1. That is on the order of float32's own
    rounding of such inputs (``6e-8 * mean / sd``, squared). The store holds float16/float32
    responses, so the sums are never the limiting factor. Data with
    ``mean / sd`` beyond ~1e5 in float64 should be centred first.

    Parameters
    ----------
    n_voxels : int
        Number of voxels (columns) every update must have.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    _SUMS = ("n", "sum_x", "sum_y", "sum_xx", "sum_yy", "sum_xy")

    def __init__(self, n_voxels: int, **kwargs) -> None:
        super().__init__(**kwargs)
        if int(n_voxels) < 1:
            raise ValueError(f"n_voxels must be a positive integer, got {n_voxels}")
        self.n_voxels = int(n_voxels)
        for name in self._SUMS:
            self.add_state(name, torch.zeros(self.n_voxels, dtype=torch.float64), dist_reduce_fx="sum")
        inf = torch.full((self.n_voxels,), float("inf"), dtype=torch.float64)
        self.add_state("min_x", inf.clone(), dist_reduce_fx="min")
        self.add_state("min_y", inf.clone(), dist_reduce_fx="min")
        self.add_state("max_x", -inf.clone(), dist_reduce_fx="max")
        self.add_state("max_y", -inf.clone(), dist_reduce_fx="max")

    def update(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> None:
        """Add a batch.

        Parameters
        ----------
        pred, target : Tensor (n_images, n_voxels)
            Any float dtype; promoted to float64 before accumulating.
        mask : bool Tensor (n_images,), optional
            False rows are ignored for all voxels (padded or duplicated samples).
        """
        if pred.ndim != 2 or pred.shape[1] != self.n_voxels:
            raise ValueError(
                f"VoxelPearson(n_voxels={self.n_voxels}) expects pred of shape "
                f"(n_images, {self.n_voxels}), got {tuple(pred.shape)}"
            )
        x, y, valid = _valid_pairs(pred, target, mask)
        self.n += valid.sum(dim=0, dtype=torch.float64)
        self.sum_x += x.sum(0)
        self.sum_y += y.sum(0)
        self.sum_xx += (x * x).sum(0)
        self.sum_yy += (y * y).sum(0)
        self.sum_xy += (x * y).sum(0)
        xmin, xmax = _range(x, valid)
        ymin, ymax = _range(y, valid)
        self.min_x = torch.minimum(self.min_x, xmin)
        self.max_x = torch.maximum(self.max_x, xmax)
        self.min_y = torch.minimum(self.min_y, ymin)
        self.max_y = torch.maximum(self.max_y, ymax)

    def compute(self) -> Tensor:
        """Return r, Tensor (n_voxels,) float64; NaN where < 2 valid pairs or zero variance."""
        n = self.n
        n_safe = n.clamp(min=1)
        cxx = self.sum_xx - self.sum_x * self.sum_x / n_safe
        cyy = self.sum_yy - self.sum_y * self.sum_y / n_safe
        cxy = self.sum_xy - self.sum_x * self.sum_y / n_safe
        # Rounding can leave a tiny non-positive variance for a near-constant voxel: NaN, not noise.
        degenerate = (cxx <= 0) | (cyy <= 0) | (self.min_x >= self.max_x) | (self.min_y >= self.max_y)
        r = cxy / torch.sqrt(cxx.clamp(min=0) * cyy.clamp(min=0))
        return _finish(r, n, degenerate)

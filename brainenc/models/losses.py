"""Per-voxel losses.  Each averages over voxels so that every voxel weighs the same.

All take ``pred, target : Tensor (batch, n_voxels)`` and ignore NaN targets (voxels that a
dataset leaves undefined on some images, e.g. vim-1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _valid(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    mask = torch.isfinite(target)
    if bool(mask.all()):
        return pred, target, mask
    return torch.where(mask, pred, 0.0), torch.where(mask, target, 0.0), mask


def _per_voxel_mean(err: Tensor, mask: Tensor) -> Tensor:
    """Mean over the batch per voxel, then over voxels: (batch, n_voxels) -> scalar."""
    n = mask.sum(0).clamp_min(1)
    return ((err * mask).sum(0) / n).mean()


class VoxelLoss(nn.Module):
    """Base class: ``forward(pred, target) -> scalar``."""


class MSELoss(VoxelLoss):
    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        pred, target, mask = _valid(pred, target)
        return _per_voxel_mean((pred - target) ** 2, mask)


class SmoothL1Loss(VoxelLoss):
    """SmoothL1 per voxel: quadratic for errors below ``beta``, linear above (Huber's loss / beta).

    With responses z-scored per voxel, ``beta = 1`` (the default, and brainenc's retinotopic
    configs) is a Huber loss at one response sd: ~90 % of least squares' efficiency under Gaussian
    trial noise, and outlier trials pull linearly, not quadratically.  The Memory Encoding Model
    used ``beta = 0.01``, which is L1 for any realistic error: its fits vary ~pi/2 times as much
    as least squares' (tests/unit/test_losses.py), which cost the retinotopic readout 0.001-0.013
    of the oracle per ROI on simbrain's presets (docs/results.md).
    """

    def __init__(self, beta: float = 1.0):
        super().__init__()
        self.beta = beta

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        pred, target, mask = _valid(pred, target)
        return _per_voxel_mean(F.smooth_l1_loss(pred, target, beta=self.beta, reduction="none"), mask)


class MSECosineLoss(VoxelLoss):
    """``mse - lam * cosine``; the cosine is taken per image across the (sampled) voxels.

    The cosine term rewards getting the *pattern* across voxels right, which MSE alone weighs
    weakly when responses are noisy (crowd-of-brains recipe, lam = 0.1).
    """

    def __init__(self, lam: float = 0.1):
        super().__init__()
        self.lam = lam

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        pred, target, mask = _valid(pred, target)
        mse = _per_voxel_mean((pred - target) ** 2, mask)
        cos = F.cosine_similarity(pred, target, dim=1, eps=1e-8).mean()
        return mse - self.lam * cos

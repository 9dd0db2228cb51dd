"""Reading a feature map at voxels' receptive fields: bilinear points or Gaussian fields.

One place decides how a map is sampled.  :func:`sample_at` is ``grid_sample`` (bilinear, border
padding, ``align_corners=False``); :func:`bilinear_matrix` and :func:`gaussian_matrix` give the
same reads as dense (V, pixels) matrices, which on small (pooled) maps are much cheaper to train
than ``grid_sample``'s scattered backward; :func:`sampled_dot` picks the cheapest way to compute
every voxel's readout of a map.  Positions are in ``grid_sample`` units (x right, y down, the
image spanning [-1, 1]; see :mod:`brainenc.models.retinotopic`).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def sample_at(fmap: Tensor, pos: Tensor) -> Tensor:
    """Bilinearly sample ``fmap`` at voxel positions.

    Parameters
    ----------
    fmap : Tensor (B, C, H, W)
    pos : Tensor (V, 2) or (B, V, 2), grid_sample units (x right, y down, align_corners=False)

    Returns
    -------
    Tensor (B, C, V)
    """
    if pos.ndim == 2:
        pos = pos.unsqueeze(0).expand(fmap.shape[0], -1, -1)
    grid = pos.unsqueeze(1).to(fmap.dtype)  # (B, 1, V, 2)
    # border padding: a position on the image's edge reads the edge pixels rather than
    # blending them with zeros outside the image
    out = F.grid_sample(fmap, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.squeeze(2)


def bilinear_matrix(pos: Tensor, h: int, w: int) -> Tensor:
    """The weights :func:`sample_at` gives every pixel, as a dense matrix.

    ``sample_at(fmap, pos)[b, c, v] == (fmap.flatten(2) @ bilinear_matrix(pos, H, W).t())[b, c, v]``
    (same border clamping and ``align_corners=False`` pixel centres; differentiable in ``pos``).

    Parameters
    ----------
    pos : Tensor (V, 2), grid units (x right, y down)
    h, w : the map's height and width

    Returns
    -------
    Tensor (V, h * w), row-major pixels; every row sums to 1 with at most 4 non-zeros
    """
    x = (((pos[:, 0] + 1) * w - 1) / 2).clamp(0, w - 1)  # pixel coordinates, border-clamped
    y = (((pos[:, 1] + 1) * h - 1) / 2).clamp(0, h - 1)
    wx = (1 - (x[:, None] - torch.arange(w, dtype=pos.dtype, device=pos.device)).abs()).clamp_min(0)
    wy = (1 - (y[:, None] - torch.arange(h, dtype=pos.dtype, device=pos.device)).abs()).clamp_min(0)
    return (wy[:, :, None] * wx[:, None, :]).flatten(1)


def gaussian_matrix(pos: Tensor, sigma: Tensor, h: int, w: int) -> Tensor:
    """Every voxel's Gaussian receptive field over the pixels of an ``h x w`` map.

    The weight of pixel (i, j) is ``exp(-((cx_j - px)^2 / sx^2 + (cy_i - py)^2 / sy^2) / 2)``,
    normalised to sum to 1 over the map's pixels (so a field hanging off the image averages what
    is on it), with pixel centres ``cx_j = (2j + 1) / w - 1`` as in :func:`sample_at` and
    ``sx^2 = sigma^2 + (1 / w)^2`` (half a pixel pitch added in quadrature: a map's pixel already
    integrates over its own width, and the field stays smooth in ``pos`` however small ``sigma``).

    Parameters
    ----------
    pos : Tensor (V, 2), grid units (x right, y down)
    sigma : Tensor (V,), the field's standard deviation in grid units (the image is 2 wide)
    h, w : the map's height and width

    Returns
    -------
    Tensor (V, h * w), row-major pixels, rows summing to 1
    """
    cx = (2 * torch.arange(w, dtype=pos.dtype, device=pos.device) + 1) / w - 1
    cy = (2 * torch.arange(h, dtype=pos.dtype, device=pos.device) + 1) / h - 1
    s2 = sigma.to(pos.dtype)[:, None] ** 2
    wx = torch.softmax(-(cx - pos[:, :1]) ** 2 / (2 * (s2 + 1.0 / w ** 2)), dim=1)  # (V, w)
    wy = torch.softmax(-(cy - pos[:, 1:]) ** 2 / (2 * (s2 + 1.0 / h ** 2)), dim=1)  # (V, h)
    return (wy[:, :, None] * wx[:, None, :]).flatten(1)


def point_matrix(pos: Tensor, sigma: Optional[Tensor], h: int, w: int, dtype: torch.dtype = torch.float32,
                 memo: Optional[dict] = None) -> Tensor:
    """(V, h * w): :func:`bilinear_matrix` for point fields (``sigma`` None), else :func:`gaussian_matrix`.

    ``memo`` (a dict owned by one forward pass) keeps each map size's matrix: the levels of a
    pyramid pooled to a grid share one size, and the matrix need not be rebuilt for each.
    """
    key = (h, w, dtype)
    if memo is not None and key in memo:
        return memo[key]
    p = pos.to(dtype)
    m = bilinear_matrix(p, h, w) if sigma is None else gaussian_matrix(p, sigma, h, w)
    if memo is not None:
        memo[key] = m
    return m


def sample_points(fmap: Tensor, pos: Tensor, sigma: Optional[Tensor] = None, memo: Optional[dict] = None) -> Tensor:
    """The map read at every voxel's field: (B, C, H, W) -> (B, C, V).

    A point (``sigma`` None) is sampled bilinearly (:func:`sample_at`); a Gaussian field of
    standard deviation ``sigma`` (V,) averages the pixels under it (:func:`gaussian_matrix`).
    """
    if sigma is None:
        return sample_at(fmap, pos)
    return fmap.flatten(2) @ point_matrix(pos, sigma, *fmap.shape[-2:], fmap.dtype, memo).t()


# Maps of up to this many pixels (or up to batch-size pixels) are sampled through bilinear_matrix,
# larger ones with grid_sample: a matmul over the pixels beats grid_sample's scattered backward on
# pooled maps (8 x 8, 4 x 4) and loses on native ones (measured with benchmarks/retinotopic_readout.py)
DENSE_MAX_PIXELS = 64


def sampled_dot(fmap: Tensor, pos: Tensor, readout: Tensor, sigma: Optional[Tensor] = None,
                memo: Optional[dict] = None) -> Tensor:
    """Every voxel's readout weights dotted with the map sampled at its position.

    ``out[b, v] = readout[v] . sample_points(fmap, pos, sigma)[b, :, v]``, computed the cheapest way for
    the map's size: grid_sample for large maps; for small ones a dense bilinear matrix, either
    sampling first (a (B, C, V) intermediate) or, while ``pixels <= B``, folding the readout into
    the matrix (a (V, C * pixels) intermediate no larger than (B, C, V)) so that one matmul does
    it all -- the fastest by far: 3-16x faster than grid_sample at evaluation batch sizes.

    Parameters
    ----------
    fmap : Tensor (B, C, H, W)
    pos : Tensor (V, 2), grid units
    readout : Tensor (V, C)
    sigma : Tensor (V,) or None: Gaussian fields of this size instead of points (see
        :func:`sample_points`; always through the dense matrix)
    memo : see :func:`point_matrix`

    Returns
    -------
    Tensor (B, V)
    """
    b, c, h, w = fmap.shape
    if sigma is None and h * w > max(b, DENSE_MAX_PIXELS):
        return dot_channels(sample_at(fmap, pos), readout)
    m = point_matrix(pos, sigma, h, w, fmap.dtype, memo)  # (V, P)
    if h * w <= b:
        return fmap.flatten(1) @ (readout[:, :, None] * m[:, None, :]).flatten(1).t()
    return dot_channels(fmap.flatten(2) @ m.t(), readout)


def dot_channels(feat: Tensor, readout: Tensor) -> Tensor:
    """``out[b, v] = readout[v] . feat[b, :, v]`` for feat (B, C, V) and readout (V, C) -> (B, V).

    The readout is made contiguous in (C, V) order first: a broadcast multiply over a transposed
    view runs at half the speed, forward and backward.
    """
    return (feat * readout.t().contiguous()).sum(dim=1)

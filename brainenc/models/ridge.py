"""Readout of the ridge baseline: per-level grid pooling, optional reduction, standardised linear map.

The ridge module (:class:`~brainenc.lit.ridge_module.RidgeModule`) fits the weights in closed form;
this module holds the architecture that turns a feature pyramid into the regressors, so training
(collecting the regressors), evaluation and prediction run the same code.

Per level ``l`` with map (B, C_l, H_l, W_l):

1. **grid pooling**: ``adaptive_avg_pool2d`` to a k_l x k_l grid, flattened channel-major to
   (B, C_l * k_l^2); k_l = 1 is the global mean (exactly ``Features.pooled()``). A ViT's class
   token (C_l) is appended to its level. A level smaller than k_l keeps its own H_l x W_l grid
   (pooling "up" would only duplicate cells).
2. **reduction** (optional, per level so that every level stays one band for banded ridge):
   ``"pca"`` projects onto principal components fitted on the training images only (the ridge
   module fits them and writes ``proj_l`` / ``center_l``), ``"random"`` onto a seeded Gaussian
   random projection (scikit-learn ``GaussianRandomProjection``), fixed at construction.
3. the levels are concatenated, standardised by a parameter-free BatchNorm whose statistics the
   ridge module sets from the training rows, and read out by one linear map per (dataset, subject).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbones import Features
from .readout import FeatureSpec, Readout, pair_slot, per_voxel_linear

REDUCTIONS = (None, "pca", "random")


def level_grids(spec: FeatureSpec, grid: Union[int, Sequence[int]]) -> list[int]:
    """Effective k_l per level: ``grid`` (an int for every level, or one per level) capped at the
    level's min(H_l, W_l)."""
    ks = [int(grid)] * len(spec.shapes) if isinstance(grid, (int, np.integer)) else [int(k) for k in grid]
    if len(ks) != len(spec.shapes):
        raise ValueError(f"ridge grid: expected one k per backbone level ({len(spec.shapes)} levels, shapes "
                         f"{list(spec.shapes)}) or a single int, got {list(grid)}")
    if any(k < 1 for k in ks):
        raise ValueError(f"ridge grid: every k must be >= 1, got {ks}")
    return [min(k, h, w) for k, (_, h, w) in zip(ks, spec.shapes)]


def grid_pool(features: Features, grids: Sequence[int]) -> list[Tensor]:
    """Per-level grid-pooled features.

    Parameters
    ----------
    features : maps[l] (B, C_l, H_l, W_l), optional cls[l] (B, C_l)
    grids : k_l per level

    Returns
    -------
    list of Tensor (B, C_l * k_l^2 [+ C_l for a class token]); for k_l = 1 the spatial mean, the
    same numbers as the corresponding block of ``features.pooled()``.
    """
    out = []
    for level, (fmap, k) in enumerate(zip(features.maps, grids)):
        # k = 1 uses the very op of Features.pooled(), so the pooled baseline is reproduced bit for bit
        z = fmap.mean(dim=(2, 3)) if k == 1 else F.adaptive_avg_pool2d(fmap, k).flatten(1)
        if features.cls is not None:
            z = torch.cat([z, features.cls[level]], dim=1)
        out.append(z)
    return out


class RidgeReadout(Readout):
    """Grid-pooled, optionally reduced, standardised features -> per-voxel linear map.

    Parameters
    ----------
    grid : k (all levels) or one k per level; 1 = global average pooling (the pooled baseline)
    reduce : None, "pca" or "random" (per level; see the module docstring)
    n_components : output width per level of the reduction; a level already at most this wide is
        left as it is
    seed : seed of the random projection

    Attributes
    ----------
    grids : effective k_l per level
    level_dims : width of level l after grid pooling (C_l k_l^2, + C_l for a class token)
    band_dims : width of level l after the reduction (the ridge bands)
    dim : sum of ``band_dims``
    """

    def __init__(self, voxel_counts: dict[str, int], spec: FeatureSpec, grid: Union[int, Sequence[int]] = 1,
                 reduce: Optional[str] = None, n_components: int = 512, seed: int = 0):
        super().__init__(voxel_counts, spec)
        if reduce not in REDUCTIONS:
            raise ValueError(f"ridge reduce: expected one of {list(REDUCTIONS)}, got {reduce!r}")
        if reduce is not None and int(n_components) < 1:
            raise ValueError(f"ridge n_components: expected a positive int, got {n_components!r}")
        self.grids = level_grids(spec, grid)
        self.reduce = reduce
        self.level_dims = [c * k * k + (c if spec.has_cls else 0) for (c, _, _), k in zip(spec.shapes, self.grids)]
        self.reduced = [reduce is not None and d > int(n_components) for d in self.level_dims]
        self.band_dims = [int(n_components) if r else d for r, d in zip(self.reduced, self.level_dims)]
        self.dim = sum(self.band_dims)
        gen = np.random.RandomState(seed)
        for level, (r, d_in, d_out) in enumerate(zip(self.reduced, self.level_dims, self.band_dims)):
            if not r:
                continue
            if reduce == "random":
                from sklearn.random_projection import GaussianRandomProjection

                rp = GaussianRandomProjection(n_components=d_out, random_state=gen.randint(2**31 - 1))
                proj = torch.as_tensor(rp.fit(np.zeros((1, d_in), dtype=np.float32)).components_.T,
                                       dtype=torch.float32)
            else:  # "pca": filled by the ridge module from the training images
                proj = torch.zeros(d_in, d_out)
            # (B, d_in) -> (B, d_out) = (z - center) @ proj; center stays 0 for the random projection
            self.register_buffer(f"proj_{level}", proj)
            self.register_buffer(f"center_{level}", torch.zeros(d_in))
        self.norm = nn.BatchNorm1d(self.dim, affine=False)
        self.weight = nn.ParameterDict({pair_slot(k): nn.Parameter(torch.zeros(n, self.dim))
                                        for k, n in self.voxel_counts.items()})
        self.bias = nn.ParameterDict({pair_slot(k): nn.Parameter(torch.zeros(n))
                                      for k, n in self.voxel_counts.items()})

    def bands(self, features: Features, reduce_pca: bool = True) -> list[Tensor]:
        """Per-level regressors before standardisation: list of (B, band_dims[l]).

        With ``reduce_pca=False`` PCA levels come back unreduced (B, level_dims[l]): what the ridge
        module collects before it has fitted the components.
        """
        out = []
        for level, z in enumerate(grid_pool(features, self.grids)):
            if self.reduced[level] and (self.reduce == "random" or reduce_pca):
                z = (z - getattr(self, f"center_{level}")) @ getattr(self, f"proj_{level}")
            out.append(z)
        return out

    def embed(self, features: Features) -> Tensor:
        """Standardised regressors (B, dim)."""
        return self.norm(torch.cat(self.bands(features), dim=1))

    def forward(self, features: Features, pair: str, voxels: Optional[Tensor] = None) -> Tensor:
        """Predicted responses (B, V) of ``pair`` (V = len(voxels), or every voxel)."""
        return per_voxel_linear(self.embed(features), self.weight, self.bias, pair, voxels)

    def voxel_weights(self, pair: str) -> Tensor:
        return self.weight[pair_slot(pair)].detach()

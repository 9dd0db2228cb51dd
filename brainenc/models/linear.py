"""Linear readout: pooled multi-layer features -> per-voxel linear map (the simplest encoder)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .backbones import Features
from .readout import FeatureSpec, Readout, pair_slot, per_voxel_linear


class LinearReadout(Readout):
    """``y_v = w_v . z + b_v`` with ``z`` the standardised, pooled feature vector.

    Pooled features from different levels differ in scale by orders of magnitude, so they go
    through a parameter-free BatchNorm first; weights are then on one footing and weight decay
    treats all levels alike.

    Parameters
    ----------
    dropout : dropout on the pooled features during training
    """

    def __init__(self, voxel_counts: dict[str, int], spec: FeatureSpec, dropout: float = 0.0):
        super().__init__(voxel_counts, spec)
        self.dim = spec.pooled_dim
        self.norm = nn.BatchNorm1d(self.dim, affine=False)
        self.dropout = nn.Dropout(dropout)
        self.weight = nn.ParameterDict({pair_slot(k): nn.Parameter(torch.zeros(n, self.dim))
                                        for k, n in self.voxel_counts.items()})
        self.bias = nn.ParameterDict({pair_slot(k): nn.Parameter(torch.zeros(n))
                                      for k, n in self.voxel_counts.items()})

    def embed(self, features: Features) -> Tensor:
        """Standardised pooled features (B, D)."""
        return self.norm(features.pooled())

    def forward(self, features: Features, pair: str, voxels: Optional[Tensor] = None) -> Tensor:
        return per_voxel_linear(self.dropout(self.embed(features)), self.weight, self.bias, pair, voxels)

    def voxel_weights(self, pair: str) -> Tensor:
        return self.weight[pair_slot(pair)].detach()

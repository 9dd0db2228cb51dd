"""The readout interface shared by every encoder family.

A readout maps a backbone's feature pyramid to the voxels of one (dataset, subject) pair.  The
LightningModule builds it by calling a factory with the data's voxel counts and the backbone's
feature shapes, so one YAML ``class_path`` chooses the family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor, nn

from .backbones import Features



@dataclass(frozen=True)
class FeatureSpec:
    """What a readout needs to know about the backbone's output.

    shapes : per level (C, H, W) at the configured image size
    pooled_dim : width of ``Features.pooled()`` (sum C_l, doubled for ViTs with class tokens)
    has_cls : whether ``Features.cls`` holds class tokens
    """

    shapes: tuple
    pooled_dim: int
    has_cls: bool = False

    @classmethod
    def of(cls, backbone) -> "FeatureSpec":
        shapes = tuple(tuple(s) for s in backbone.feature_shapes())
        return cls(shapes, int(backbone.pooled_dim), int(backbone.pooled_dim) != sum(c for c, _, _ in shapes))


def pair_slot(key: str) -> str:
    """Module-dict-safe name for a "dataset/subject" key."""
    return key.replace("/", "__").replace(".", "_")


class Readout(nn.Module):
    """Base class.

    Parameters
    ----------
    voxel_counts : {"dataset/subject": n_voxels}
    spec : the backbone's feature shapes (see :class:`FeatureSpec`)
    """

    def __init__(self, voxel_counts: dict[str, int], spec: FeatureSpec):
        super().__init__()
        self.voxel_counts = dict(voxel_counts)
        self.spec = spec

    def forward(self, features: Features, pair: str, voxels: Optional[Tensor] = None) -> Tensor:
        """Predict responses.

        Parameters
        ----------
        features : pyramid of a batch of B images
        pair : "dataset/subject"
        voxels : int64 (V,) subset of the pair's voxels, or None for all

        Returns
        -------
        Tensor (B, V) or (B, n_voxels)
        """
        raise NotImplementedError

    def prepare(self, features: Features):
        """Work that depends on the images but not on the voxels, done once per image batch.

        :meth:`forward` accepts the result in place of ``features``, so evaluation in voxel
        chunks does this work once instead of once per chunk. The default has nothing to share
        and returns ``features`` unchanged.
        """
        return features

    def set_voxel_info(self, pair: str, coords: np.ndarray) -> None:
        """Receive the pair's voxel coordinates float32 (n_voxels, 3) in mm (used by some families)."""

    def regularization(self) -> Tensor:
        """Extra loss term added to the training loss (default 0)."""
        return torch.zeros(())

    def voxel_weights(self, pair: str) -> Optional[Tensor]:
        """Per-voxel readout weights (n_voxels, D) for clustering into model-defined ROIs, if any."""
        return None


ReadoutFactory = Callable[[dict, FeatureSpec], Readout]


def per_voxel_linear(z: Tensor, weight: nn.ParameterDict, bias: nn.ParameterDict, pair: str,
                     voxels: Optional[Tensor] = None) -> Tensor:
    """``z @ W.T + b`` with the pair's per-voxel weights W (n_voxels, D) and biases b (n_voxels,).

    z : Tensor (B, D); voxels : int64 (V,) subset, or None for every voxel.  Returns (B, V).
    """
    w, b = weight[pair_slot(pair)], bias[pair_slot(pair)]
    if voxels is not None:
        w, b = w[voxels], b[voxels]
    return torch.addmm(b, z, w.t())

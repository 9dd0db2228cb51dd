"""ExpertsModule: AFO stage 2 — every ROI expert of every partition trained in one LightningModule.

The experts share the backbone, so one forward pass of it (or one read of the feature cache)
feeds them all, and :class:`~brainenc.models.experts.ExpertsReadout` evaluates them together;
that is much cheaper than one run per ROI.  With ``expert_adapters=True`` and a LoRA backbone,
every expert instead gets its own adapter, so an ROI can specialise the backbone (one backbone
pass per expert and step: costly, and only for backbones LoRA can adapt, e.g. ViTs).

Each partition's stitched prediction is fitted to the measured responses on its own (the loss is
averaged over partitions), so the experts stay independent models; validation and testing score
the ensemble (the mean over partitions), which is what the dark-knowledge targets are made of.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from brainenc.features.cache import FeatureCache
from brainenc.models.backbones import Backbone, Features
from brainenc.models.losses import VoxelLoss
from brainenc.models.readout import ReadoutFactory
from brainenc.models.experts import ExpertFeatures, ExpertsReadout
from .encoder_module import EncoderModule


class ExpertsModule(EncoderModule):
    """An :class:`EncoderModule` whose readout is an :class:`~brainenc.models.experts.ExpertsReadout`.

    Parameters
    ----------
    expert_adapters : give every expert its own LoRA adapter of the backbone (the backbone must
        have ``trainable='lora'``; the images must be loaded, as there is no feature cache)
    other parameters : as :class:`EncoderModule`
    """

    def __init__(self, backbone: Backbone, readout: ReadoutFactory, voxel_counts: Optional[dict[str, int]] = None,
                 loss: Optional[VoxelLoss] = None, lr: float = 3e-3, weight_decay: float = 1e-4,
                 backbone_lr: float = 1e-4, warmup_fraction: float = 0.05, voxels_per_step: Optional[int] = None,
                 eval_voxel_chunk: Optional[int] = None, model_name: str = "afo-experts",
                 feature_cache: Optional[FeatureCache] = None, expert_adapters: bool = False,
                 lr_scale: Optional[dict[str, float]] = None):
        super().__init__(backbone, readout, voxel_counts=voxel_counts, loss=loss, lr=lr,
                         weight_decay=weight_decay, backbone_lr=backbone_lr, warmup_fraction=warmup_fraction,
                         voxels_per_step=voxels_per_step, eval_voxel_chunk=eval_voxel_chunk,
                         model_name=model_name, feature_cache=feature_cache, lr_scale=lr_scale)
        if not isinstance(self.readout, ExpertsReadout):
            raise TypeError(f"ExpertsModule needs an ExpertsReadout, got {type(self.readout).__name__}")
        self.expert_adapters = bool(expert_adapters)
        if self.expert_adapters:
            self.backbone.set_lora_adapters(len(self.readout.experts))

    def features(self, batch: dict) -> Features | ExpertFeatures:
        if not self.expert_adapters:
            return super().features(batch)
        images = batch.get("images")
        if images is None:
            raise ValueError("ExpertsModule(expert_adapters=True) runs the backbone once per expert and needs "
                             "the images: set data.load_images: true")

        def compute(e: int) -> Features:
            with self.backbone.adapter(e):
                return self.backbone(images)

        return ExpertFeatures(compute, len(images))

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        readout = self.readout
        pair = batch["pair"]
        feats = self.features(batch)
        voxels, target = self.sample_voxels(batch["responses"])
        pred = readout.forward_partitions(feats, pair, voxels)  # (B, P, V)
        b, p, v = pred.shape
        # partition-major flattening on both sides: every (partition, voxel) is one output of the
        # per-voxel loss, so each partition's experts get the gradient of their own fit
        pred, target = self.whitened(pair, pred, target[:, None].expand(-1, p, -1), voxels)
        loss = self.loss_fn(pred.reshape(b, p * v), target.reshape(b, p * v)) + readout.regularization()
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        return loss

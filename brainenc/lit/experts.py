"""ExpertsModule: AFO stage 2 — every ROI expert of every partition trained in one LightningModule.

The experts share the (frozen or LoRA) backbone, so one forward pass of the backbone feeds them
all; that is much cheaper than one run per ROI.  Each partition's stitched prediction is fitted to
the measured responses on its own (the loss is averaged over partitions), so the experts stay
independent models; validation and testing score the ensemble (the mean over partitions), which
is what the dark-knowledge targets are made of.
"""

from __future__ import annotations

from torch import Tensor

from brainenc.models.retinotopic import ExpertsReadout
from .encoder_module import EncoderModule


class ExpertsModule(EncoderModule):
    """An :class:`EncoderModule` whose readout is an :class:`~brainenc.models.retinotopic.ExpertsReadout`.

    Takes the same arguments as :class:`EncoderModule`.
    """

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        readout = self.readout
        if not isinstance(readout, ExpertsReadout):
            raise TypeError(f"ExpertsModule needs an ExpertsReadout, got {type(readout).__name__}")
        pair = batch["pair"]
        feats = self.features(batch)
        voxels, target = self.sample_voxels(batch["responses"])
        pred = readout.forward_partitions(feats, pair, voxels)  # (B, P, V)
        b, p, v = pred.shape
        # partition-major flattening on both sides: every (partition, voxel) is one output of the
        # per-voxel loss, so each partition's experts get the gradient of their own fit
        loss = self.loss_fn(pred.reshape(b, p * v), target.repeat(1, p)) + readout.regularization()
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        return loss




"""DistillModule: AFO stage 4 — a student distilled from the experts' dark-knowledge targets.

``loss = w(e) * loss(pred, measured) + (1 - w(e)) * loss(pred, dark)`` with ``w`` rising
linearly from 0 at epoch 0 to 1 at epoch ``ramp_epochs`` (then 1): the student first learns the
experts' smooth, noise-free predictions and ends on the measured responses.  The default loss is
per-voxel SmoothL1 (:class:`~brainenc.models.losses.SmoothL1Loss`, beta 1) averaged over voxels, so
every voxel weighs the same; ``brainenc afo`` passes the base config's loss when it names one.

Dark targets file (HDF5, written by ``brainenc afo``'s ``dark`` stage)::

    /pairs/<pair slot>/stimulus   int64 (n,)            rows of the pair's stimuli.h5
    /pairs/<pair slot>/pred       float32 (n, n_voxels) stitched, partition-averaged predictions
    /extra                        optional unlabelled images; attr ``stores``: JSON list of store dirs
    /extra/source                 int64 (M,)            index into ``stores``
    /extra/row                    int64 (M,)            row of that store's stimuli.h5
    /extra/pred/<pair slot>       float32 (M, n_voxels) their predictions
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import h5py
import numpy as np
import torch
from torch import Tensor

from brainenc.features.cache import FeatureCache
from brainenc.models.backbones import Backbone
from brainenc.models.losses import SmoothL1Loss, VoxelLoss
from brainenc.models.readout import ReadoutFactory, pair_slot
from .encoder_module import EncoderModule


def gt_weight(epoch: int, ramp_epochs: int) -> float:
    """Weight of the measured-response loss at ``epoch``: 0 at epoch 0, 1 from ``ramp_epochs`` on, linear."""
    if ramp_epochs <= 0:
        return 1.0
    return float(min(1.0, max(0.0, epoch / ramp_epochs)))


class DistillModule(EncoderModule):
    """:class:`EncoderModule` trained on a blend of measured and dark-knowledge targets.

    Parameters
    ----------
    dark_targets : path of the dark-targets HDF5 file
    ramp_epochs : epochs over which ``w`` rises from 0 to 1 (None = ``max_epochs - 1``, so the
        last epoch is pure ground truth)
    extra_per_step : unlabelled images (from ``/extra``) added to each training step, fitted to
        their dark targets only, with weight ``1 - w(e)`` (0 = none); their features come from the
        feature cache like the labelled images' (one store per step)
    init_from : a checkpoint of a model with the same backbone and readout (e.g. the AFO
        whole-brain model) whose weights the student starts from; None = fresh initialisation
    other parameters : as :class:`EncoderModule` (loss defaults to :class:`SmoothL1Loss`)
    """

    def __init__(self, backbone: Backbone, readout: ReadoutFactory, dark_targets: str,
                 voxel_counts: Optional[dict[str, int]] = None, loss: Optional[VoxelLoss] = None,
                 ramp_epochs: Optional[int] = None, extra_per_step: int = 0,
                 lr: float = 3e-3, weight_decay: float = 1e-4, backbone_lr: float = 1e-4,
                 warmup_fraction: float = 0.05, voxels_per_step: Optional[int] = None,
                 eval_voxel_chunk: Optional[int] = None, model_name: str = "afo-student",
                 feature_cache: Optional[FeatureCache] = None, init_from: Optional[str] = None,
                 lr_scale: Optional[dict[str, float]] = None):
        super().__init__(backbone, readout, voxel_counts=voxel_counts,
                         loss=loss if loss is not None else SmoothL1Loss(), lr=lr,
                         weight_decay=weight_decay, backbone_lr=backbone_lr, warmup_fraction=warmup_fraction,
                         voxels_per_step=voxels_per_step, eval_voxel_chunk=eval_voxel_chunk,
                         model_name=model_name, feature_cache=feature_cache, lr_scale=lr_scale)
        if init_from:
            self.load_weights(init_from)
        self._dark: dict[str, tuple[Tensor, Tensor]] = {}  # pair -> (row lookup (n_rows,), pred (n, V))
        self._extra_stores: list = []
        self._extra_source: Optional[Tensor] = None  # (M,) index into _extra_stores
        self._extra_row: Optional[Tensor] = None  # (M,) row of that store's stimuli.h5
        self._extra_pred: dict[str, Tensor] = {}

    def load_weights(self, path: str) -> None:
        """Copy the backbone and readout weights of checkpoint ``path`` (shapes must match)."""
        from .checkpoint import load_state_dict

        state = load_state_dict(path, "the init_from checkpoint of the student")
        own = self.state_dict()
        keep = {k: v for k, v in state.items() if k.startswith(("backbone.", "readout."))}
        bad = sorted(k for k, v in keep.items() if k not in own or own[k].shape != v.shape)
        missing = sorted(k for k in own if k.startswith("readout.") and k not in keep)
        if bad or missing or not keep:
            raise ValueError(f"{path}: field 'state_dict': expected the student's backbone and readout tensors; "
                             f"unknown or mis-shaped {bad[:5]}, missing {missing[:5]}")
        self.load_state_dict(keep, strict=False)

    # ------------------------------------------------------------------ targets
    def load_dark_targets(self, path: Optional[str] = None) -> None:
        """Read the dark targets into memory (float32 CPU tensors; a few hundred MB at most for NSD-sized runs)."""
        path = Path(path or self.hparams.dark_targets)
        if not path.is_file():
            raise FileNotFoundError(f"dark targets file not found: {path} (run the AFO 'dark' stage first)")
        with h5py.File(path, "r") as f:
            for key, n in self.voxel_counts.items():
                g = f.get(f"pairs/{pair_slot(key)}")
                if g is None:
                    raise ValueError(f"{path}: field 'pairs/{pair_slot(key)}': expected dark targets for {key}")
                stim, pred = g["stimulus"][()].astype(np.int64), g["pred"][()].astype(np.float32)
                if pred.shape != (len(stim), n):
                    raise ValueError(f"{path}: field 'pairs/{pair_slot(key)}/pred': expected shape "
                                     f"({len(stim)}, {n}), found {pred.shape}")
                lookup = np.full(int(stim.max()) + 1 if len(stim) else 0, -1, dtype=np.int64)
                lookup[stim] = np.arange(len(stim))
                self._dark[key] = (torch.from_numpy(lookup), torch.from_numpy(pred))
            if "extra" in f:
                from brainenc.data.store import Store

                g = f["extra"]
                self._extra_stores = [Store(p, validate=False) for p in json.loads(g.attrs["stores"])]
                self._extra_source = torch.from_numpy(g["source"][()].astype(np.int64))
                self._extra_row = torch.from_numpy(g["row"][()].astype(np.int64))
                self._extra_pred = {k: torch.from_numpy(g[f"pred/{pair_slot(k)}"][()].astype(np.float32))
                                    for k in self.voxel_counts if f"pred/{pair_slot(k)}" in g}

    def dark_for(self, pair: str, stimulus: Tensor) -> Tensor:
        """Dark targets (B, n_voxels) of the batch's stimulus rows ``stimulus`` (B,)."""
        if pair not in self._dark:
            self.load_dark_targets()
        lookup, pred = self._dark[pair]
        rows = stimulus.cpu()
        idx = torch.where(rows < len(lookup), lookup[rows.clamp_max(max(len(lookup) - 1, 0))], -1)
        if bool((idx < 0).any()):
            missing = rows[idx < 0][:5].tolist()
            raise KeyError(f"{self.hparams.dark_targets}: no dark targets for {pair} stimulus rows {missing}")
        return pred[idx]

    def extra_loss(self, pair: str, m: int, voxels: Optional[Tensor]) -> Tensor:
        """Loss of ``m`` random extra images of one extra store against their dark targets."""
        j = int(self._extra_source[torch.randint(len(self._extra_source), (1,))])
        pool = torch.nonzero(self._extra_source == j).squeeze(1)
        sel = pool[torch.randperm(len(pool))[:m]].sort().values
        feats = self.features_of_rows(self._extra_stores[j], self._extra_row[sel])
        x_dark = self._extra_pred[pair][sel].to(self.device)
        if voxels is not None:
            x_dark = x_dark[:, voxels]
        return self.loss_fn(self.readout(feats, pair, voxels), x_dark)

    def ramp(self) -> int:
        r = self.hparams.ramp_epochs
        if r is None:
            r = max(0, int(self.trainer.max_epochs or 1) - 1)
        return int(r)

    # ------------------------------------------------------------------ training
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit":
            self.load_dark_targets()

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        pair, target = batch["pair"], batch["responses"]
        dark = self.dark_for(pair, batch["stimulus"]).to(target.device)
        feats = self.features(batch)
        voxels, target = self.sample_voxels(target)
        if voxels is not None:
            dark = dark[:, voxels]
        pred = self.readout(feats, pair, voxels)
        w = gt_weight(self.current_epoch, self.ramp())
        # the scanned responses carry the trial noise (whitened if so configured); the teachers' do not
        gt_loss, dark_loss = self.loss_fn(*self.whitened(pair, pred, target, voxels)), self.loss_fn(pred, dark)
        loss = w * gt_loss + (1 - w) * dark_loss + self.readout.regularization()
        m = self.hparams.extra_per_step
        if m and self._extra_source is not None and pair in self._extra_pred and w < 1:
            loss = loss + (1 - w) * self.extra_loss(pair, m, voxels)
        bs = len(target)
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/gt_loss", gt_loss, batch_size=bs)
        self.log("train/dark_loss", dark_loss, batch_size=bs)
        self.log("train/gt_weight", w, batch_size=bs)
        return loss

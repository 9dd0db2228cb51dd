"""Ridge baseline: closed-form fit of the linear readout with himalaya (per-voxel alpha by CV).

It is an :class:`EncoderModule` whose "training" epoch only collects pooled frozen features;
the solve happens once, after the first epoch, and writes the weights into the same
:class:`~brainenc.models.linear.LinearReadout` the gradient-trained linear encoder uses, so
validation, testing and the results table are shared code.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
import torch

from brainenc.features.cache import FeatureCache
from brainenc.models.backbones import Backbone
from brainenc.models.linear import LinearReadout
from brainenc.models.readout import pair_slot
from .encoder_module import EncoderModule, _object_args


def _linear(voxel_counts, spec):
    return LinearReadout(voxel_counts, spec)


class RidgeModule(EncoderModule):
    """Pooled frozen features -> himalaya ``RidgeCV`` per (dataset, subject).

    Parameters
    ----------
    alphas : candidate regularisation strengths (one is chosen per voxel by cross-validation)
    cv : number of cross-validation folds
    """

    def __init__(self, backbone: Backbone, voxel_counts: Optional[dict[str, int]] = None,
                 alphas: Sequence[float] = tuple(np.logspace(-1, 7, 17).tolist()), cv: int = 5,
                 model_name: str = "ridge", feature_cache: Optional[FeatureCache] = None):
        if not backbone.frozen:
            raise ValueError("RidgeModule: backbone.trainable must be 'frozen' (ridge fits fixed features)")
        super().__init__(backbone, _linear, voxel_counts=voxel_counts, model_name=model_name,
                         feature_cache=feature_cache)
        self.save_hyperparameters(ignore=[k for k in _object_args() if k == "backbone"])
        self.alphas, self.cv = list(alphas), cv
        self.automatic_optimization = False
        self._store: dict[str, tuple[list, list]] = {}
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and self.trainer.world_size > 1:
            raise RuntimeError("RidgeModule fits in closed form on one process; run it without DDP "
                               "(--trainer.devices=1); the gradient-trained encoders scale out instead")

    def training_step(self, batch: dict, batch_idx: int) -> None:
        if bool(self.fitted):
            return None
        with torch.no_grad():
            z = self.features(batch).pooled().double().cpu()
        xs, ys = self._store.setdefault(batch["pair"], ([], []))
        xs.append(z)
        ys.append(batch["responses"].double().cpu())
        return None

    def configure_optimizers(self):
        return None

    def on_validation_epoch_start(self) -> None:
        self._solve()

    def on_train_epoch_end(self) -> None:
        self._solve()

    def on_fit_end(self) -> None:
        # a closed-form fit takes no optimiser step, and ModelCheckpoint saves only after steps:
        # write the configured checkpoint files ourselves so `brainenc test --ckpt_path` works
        for cb in self.trainer.checkpoint_callbacks:
            if cb.dirpath is None or cb.best_model_path:
                continue
            names = [f"{cb.filename or 'best'}{cb.FILE_EXTENSION}"]
            if cb.save_last:
                names.append(f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}")
            for name in names:
                self.trainer.save_checkpoint(os.path.join(cb.dirpath, name))

    def _solve(self) -> None:
        if bool(self.fitted) or not self._store:
            return
        from himalaya.ridge import RidgeCV

        readout: LinearReadout = self.readout
        xs_all = torch.cat([torch.cat(xs) for xs, _ in self._store.values()])
        mean, var = xs_all.mean(0), xs_all.var(0, unbiased=False)
        # the readout's parameter-free BatchNorm standardises with these statistics at eval time
        readout.norm.running_mean.copy_(mean.float())
        readout.norm.running_var.copy_(var.float())
        sd = (var + readout.norm.eps).sqrt()
        for key, (xs, ys) in self._store.items():
            x = ((torch.cat(xs) - mean) / sd).numpy()
            y = torch.cat(ys).numpy()
            y = np.where(np.isfinite(y), y, np.nanmean(y, axis=0, keepdims=True))
            y = np.nan_to_num(y)  # voxels with no finite value at all
            model = RidgeCV(alphas=np.asarray(self.alphas), cv=self.cv, fit_intercept=True)
            model.fit(x, y)
            coef = torch.as_tensor(np.asarray(model.coef_), dtype=torch.float32)  # (D, n_voxels)
            readout.weight[pair_slot(key)].data.copy_(coef.t())
            readout.bias[pair_slot(key)].data.copy_(torch.as_tensor(np.asarray(model.intercept_),
                                                                   dtype=torch.float32))
        self._store.clear()
        self.fitted.fill_(True)

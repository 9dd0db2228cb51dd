"""Profile a short ``brainenc fit`` of the quickstart linear config (cProfile) and print the top.

    .venv/bin/python benchmarks/profile_quickstart.py [--batches 20] [--epochs 2] [--cache] [-- extra CLI args]

Runs ``brainenc fit -c experiments/quickstart/linear.yaml`` in this process with
``limit_train_batches``/``limit_val_batches`` set to ``--batches``, loggers and checkpoints off,
into a temporary run directory, under cProfile; prints the functions with the largest own time
and a grouped breakdown (backbone, readout/optimiser, data loading, Lightning overhead).
``--cache`` adds a fresh FeatureCache (the fix for the largest waste: the frozen backbone
recomputing the same images every epoch). ``--store`` points at an existing quickstart store
(default: the config's, simulated if missing).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import shutil
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GROUPS = {
    # builtins have no file: match their names (conv2d, batch_norm, hardtanh = ReLU6 of lite0)
    "backbone (timm modules, conv/bn/activation kernels)": (
        "timm/", "torch.conv2d", "torch.batch_norm", "hardtanh", "backbones.py"),
    "data loading (h5py reads, resize, repeat averaging)": (
        "h5py/", "datamodule.py", "upsample_bilinear2d", "of 'numpy.ufunc' objects", "numpy/"),
    "feature cache": ("features/cache.py",),
    "readout + optimiser": ("linear.py", "torch.addmm", "optim/", "autograd"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--cache", action="store_true")
    ap.add_argument("--store", default=None)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("extra", nargs="*")
    args = ap.parse_args()

    from brainenc.cli import main as brainenc_main

    tmp = Path(tempfile.mkdtemp(prefix="prof_qs_"))
    argv = ["fit", "-c", str(REPO / "experiments/quickstart/linear.yaml"), f"--trainer.default_root_dir={tmp}",
            f"--trainer.max_epochs={args.epochs}", f"--trainer.limit_train_batches={args.batches}",
            f"--trainer.limit_val_batches={args.batches}", "--trainer.logger=false",
            "--trainer.enable_checkpointing=false", "--trainer.callbacks=[]", "--trainer.enable_progress_bar=false"]
    if args.store:
        argv.append(f"--data.stores=[{args.store}]")
    if args.cache:
        argv += ["--model.init_args.feature_cache=brainenc.features.cache.FeatureCache",
                 f"--model.init_args.feature_cache.init_args.root={tmp / 'cache'}"]
    argv += args.extra
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    try:
        prof.runcall(brainenc_main, argv)
    finally:
        wall = time.perf_counter() - t0
        shutil.rmtree(tmp, ignore_errors=True)
    st = pstats.Stats(prof)
    total = sum(v[2] for v in st.stats.values())  # own time over all functions
    print(f"wall {wall:.1f} s, profiled own time {total:.1f} s, {args.epochs} epochs x {args.batches} "
          f"train + {args.batches} val batches, cache={'on' if args.cache else 'off'}")
    groups = {g: 0.0 for g in GROUPS}
    for (file, _, func), v in st.stats.items():
        where = f"{file}:{func}"
        for g, pats in GROUPS.items():
            if any(p in where for p in pats):
                groups[g] += v[2]
                break
    for g, t in groups.items():
        print(f"  {g:50} {t:7.1f} s own time ({100 * t / total:4.1f}%)")
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(args.top)
    print(buf.getvalue())


if __name__ == "__main__":
    main()

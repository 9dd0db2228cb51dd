"""Benchmark: peak memory of ``brainenc predict --data.predict_images`` against the number of images.

    .venv/bin/python benchmarks/predict_memory.py [--sizes 1000 10000 100000] [--kind npy|folder]

A tiny linear encoder (experiments/smoke/linear.yaml: timm's test_efficientnet, random weights,
32 px) is fitted for a few batches on the tiny simbrain (both in a temporary directory); then, for
each size N, N random 32-px images (a memory-mapped .npy, or a folder of PNGs with ``--kind
folder``) are predicted for every subject of the run in a fresh process whose peak resident
memory (ru_maxrss) is printed with the size of the files written.  Predictions are streamed into
the HDF5 files batch by batch, so the peak should not grow with N beyond the list of image names
(a folder) — while the files do.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CHILD = """
import resource, sys
from brainenc.cli import main
main(sys.argv[1:])
print("MAXRSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def make_images(kind: str, n: int, root: Path) -> Path:
    rng = np.random.default_rng(n)
    if kind == "npy":
        path = root / f"images_{n}.npy"
        arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, 32, 32, 3))
        for a in range(0, n, 10000):  # written in blocks: the benchmark itself stays small too
            arr[a:a + 10000] = rng.integers(0, 256, (min(10000, n - a), 32, 32, 3), dtype=np.uint8)
        arr.flush()
        return path
    from PIL import Image

    path = root / f"folder_{n}"
    for i in range(n):
        sub = path / f"cat{i % 2}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(sub / f"{i:06d}.png")
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--kind", choices=["npy", "folder"], default="npy")
    args = ap.parse_args()
    from brainenc.data.simbrain import simulate

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        brain = simulate(preset="tiny", out=tmp / "sim", seed=0)
        run = tmp / "run"
        common = ["-c", str(REPO / "experiments/smoke/linear.yaml"), f"--data.stores=[{brain['simbrain7t']}]",
                  "--data.simulate=null", f"--trainer.default_root_dir={run}", "--trainer.logger=false",
                  "--trainer.enable_progress_bar=false", "--data.eval_batch_size=256"]
        subprocess.run([sys.executable, "-m", "brainenc.cli", "fit", *common, "--trainer.max_epochs=1",
                        "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1"],
                       check=True, capture_output=True)
        print(f"{'kind':<7} {'images':>8} {'peak RSS MB':>12} {'files MB':>9} {'seconds':>8}")
        for n in args.sizes:
            src = make_images(args.kind, n, tmp)
            t0 = time.time()
            res = subprocess.run([sys.executable, "-c", CHILD, "predict", *common,
                                  f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}", f"--data.predict_images={src}"],
                                 check=True, capture_output=True, text=True)
            rss = int(next(line.split()[1] for line in res.stdout.splitlines() if line.startswith("MAXRSS_KB")))
            size = sum(p.stat().st_size for p in (run / "predictions").iterdir()) / 2**20
            print(f"{args.kind:<7} {n:>8} {rss / 1024:>12.0f} {size:>9.1f} {time.time() - t0:>8.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

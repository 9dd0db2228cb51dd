"""Benchmark: simulate the nsd-scale simbrain preset and print wall time and peak memory.

    .venv/bin/python benchmarks/simbrain_nsd_scale.py [--out DIR] [--seed 0]

Without ``--out`` the store goes to a temporary directory that is removed afterwards.  Peak RSS
comes from ``resource.getrusage`` (Linux reports kilobytes).  The point of the figure: memory is
bounded by chunk sizes, far below the 30,000 x 15,000 trial matrix (0.9 GB as float16).
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="keep the store here (default: temp dir)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    t0 = time.perf_counter()
    from brainenc.data.simbrain import oracle_ceiling, planned_shapes, simulate
    from brainenc.data.store import Store

    t_import = time.perf_counter() - t0
    out = args.out or Path(tempfile.mkdtemp(prefix="simbrain_nsd_"))
    try:
        t1 = time.perf_counter()
        paths = simulate(preset="nsd-scale", out=out, seed=args.seed, overwrite=True)
        wall = time.perf_counter() - t1
        rss_sim = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        store = Store(paths["simbrain7t"])
        info = store.subject("subj01")
        t2 = time.perf_counter()
        oc = oracle_ceiling(store, "subj01", (store.split == 1).nonzero()[0])
        t_oracle = time.perf_counter() - t2
        size = sum(p.stat().st_size for p in paths["simbrain7t"].iterdir())
        import numpy as np

        print(f"planned:      {planned_shapes('nsd-scale')['simbrain7t']['subjects']}")
        print(f"written:      {info.n_trials} trials x {info.n_voxels} voxels, "
              f"{store.n_stimuli} images {store.image_size}")
        print(f"import:       {t_import:.1f} s")
        print(f"simulate:     {wall:.1f} s wall")
        print(f"peak RSS:     {rss_sim / 1024:.0f} MB (after simulate)")
        print(f"oracle:       {t_oracle:.1f} s, median {np.nanmedian(oc):.3f} over signal voxels")
        print(f"store size:   {size / 2**30:.2f} GiB")
        print(f"peak RSS end: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    finally:
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()

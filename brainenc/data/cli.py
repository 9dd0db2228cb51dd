"""``brainenc simulate`` and ``brainenc validate-store``."""

from __future__ import annotations

import argparse

from .store import Store, StoreError


def main_simulate(argv: list[str]) -> int:
    from .simbrain import PRESETS, simulate

    ap = argparse.ArgumentParser(prog="brainenc simulate", description=(
        "Write the simulated brain (simbrain): a 7T-like and a 3T-like dataset, each a canonical "
        "store with ground truth (true receptive fields, voxel types, noise-free responses)."))
    ap.add_argument("--preset", default="quickstart", choices=sorted(PRESETS))
    ap.add_argument("--out", default=None, help="output directory (default data/simbrain-<preset>)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overwrite", action="store_true", help="replace stores made with other parameters")
    a = ap.parse_args(argv)
    out = a.out or f"data/simbrain-{a.preset}"
    paths = simulate(preset=a.preset, out=out, seed=a.seed, overwrite=a.overwrite)
    for name, path in paths.items():
        print(f"{name}: {Store(path)}")
    return 0


def main_validate_store(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="brainenc validate-store",
                                 description="Validate canonical stores (deep: scan responses for all-NaN voxels).")
    ap.add_argument("stores", nargs="+")
    ap.add_argument("--shallow", action="store_true", help="skip the scan of the response matrices")
    a = ap.parse_args(argv)
    bad = 0
    for root in a.stores:
        try:
            store = Store(root)
            scans = store.validate(deep=not a.shallow)
        except StoreError as e:
            print(f"INVALID {e}")
            bad += 1
            continue
        print(f"ok {store}")
        for s in store.subjects:
            i = store.subject(s)
            print(f"   {s}: {i.n_trials} trials x {i.n_voxels} voxels, atlases {list(i.rois)}, "
                  f"ncsnr {'yes' if i.ncsnr is not None else 'no'}, truth {'yes' if i.has_truth else 'no'}")
            scan = scans.get(s)
            if scan and scan["nonfinite_values"]:
                # accepted, as fit accepts them: missing values are left out of repeat averages,
                # losses and metrics
                print(f"   {s}: note: {scan['nonfinite_values']} NaN/Inf values treated as missing "
                      f"({scan['dropped_trials']} trials with no finite value are dropped)")
    return 1 if bad else 0

"""Write small synthetic run directories that follow the voxels.csv contract.

Used by the report tests and handy for trying ``brainenc report`` without
training anything.  The numbers are random but shaped like real results:
ROI-dependent Pearson, noise ceilings, NaN voxels (constant measured
responses give NaN for every model) and a model that is better on average.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

SPACES = {
    "simbrain": "simbrain-flat",
    "mnidata": "MNI152",
    "nativedata": "func1pt8mm",
    "surfdata": "fsaverage",
}
ROIS = ["V1", "V2", "V3", "hV4", "FFA", "none"]


def _voxel_layout(dataset: str, n_voxels: int, rng: np.random.Generator) -> pd.DataFrame:
    """ROI, coordinates (and flat/vertex/hemi where the space has them) for one subject."""
    roi = rng.choice(ROIS, size=n_voxels, p=[0.22, 0.2, 0.18, 0.14, 0.1, 0.16])
    hemi = rng.choice(["lh", "rh"], size=n_voxels)
    side = np.where(hemi == "lh", -1.0, 1.0)
    out = pd.DataFrame({"roi": roi, "hemi": hemi})
    space = SPACES[dataset]
    if space == "MNI152":
        # occipital cortex, 2 mm grid
        out["x"] = side * rng.integers(4, 30, n_voxels) * 2.0
        out["y"] = -rng.integers(30, 50, n_voxels) * 2.0
        out["z"] = rng.integers(-8, 8, n_voxels) * 2.0
    elif space == "func1pt8mm":
        ijk = rng.integers(0, 20, size=(n_voxels, 3))
        out[["x", "y", "z"]] = ijk * 1.8 + np.array([-20.0, -90.0, -10.0])
    elif space == "fsaverage":
        from nilearn import datasets

        fs = datasets.load_fsaverage("fsaverage5")
        vert = rng.choice(10242, size=n_voxels, replace=False)
        xyz = np.empty((n_voxels, 3))
        for h, name in (("lh", "left"), ("rh", "right")):
            m = hemi == h
            xyz[m] = fs["pial"].parts[name].coordinates[vert[m]]
        out[["x", "y", "z"]] = xyz
    else:
        out["x"] = side * rng.uniform(5, 40, n_voxels)
        out["y"] = rng.uniform(-60, 0, n_voxels)
        out["z"] = 0.0
        out["flat_x"] = rng.uniform(0, 60, n_voxels)
        out["flat_y"] = rng.uniform(0, 40, n_voxels)
    return out


def write_demo_runs(root: str | Path, *, models=("afo", "universal", "ridge"),
                    datasets=("simbrain",), subjects=("01", "02"), n_voxels: int = 200,
                    n_test: int = 50, n_test_in: str = "column", retrieval: bool = True,
                    seed: int = 0) -> list[Path]:
    """Write one run directory per model under ``root``.

    Parameters
    ----------
    models : model names, one run each ("run_<i>_<model>")
    datasets : keys of SPACES
    n_test_in : "column" (n_test column), "summary" (summary.json n_test_images) or "none"

    Returns
    -------
    list of run directories.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    layouts = {(d, s): _voxel_layout(d, n_voxels, rng) for d in datasets for s in subjects}
    # Shared per-voxel "true predictability" so models are paired like real ones.
    base = {k: rng.beta(2, 5, n_voxels) for k in layouts}
    nc = {k: 100 * rng.uniform(0.1, 0.9, n_voxels) for k in layouts}
    dead = {k: rng.random(n_voxels) < 0.03 for k in layouts}  # constant measured responses
    run_dirs = []
    for i, model in enumerate(models):
        run = f"run_{i}_{model}"
        rows = []
        for (dataset, subject), lay in layouts.items():
            k = (dataset, subject)
            r = np.clip(base[k] * (1.0 - 0.15 * i) + rng.normal(0, 0.05, n_voxels), -0.3, 0.95)
            r[dead[k]] = np.nan
            if i == len(models) - 1:
                r[rng.random(n_voxels) < 0.02] = np.nan  # constant predictions of one model
            df = lay.copy()
            df.insert(0, "voxel", np.arange(n_voxels))
            df["run"], df["model"], df["backbone"], df["seed"] = run, model, "test_vit", i
            df["dataset"], df["subject"], df["space"] = dataset, subject, SPACES[dataset]
            df["pearson"] = r
            df["noise_ceiling"] = nc[k]
            df["normalised"] = 100 * r**2 / (nc[k] / 100)
            df["oracle"] = np.sqrt(nc[k] / 100) if dataset == "simbrain" else np.nan
            if n_test_in == "column":
                df["n_test"] = n_test
            rows.append(df)
        table = pd.concat(rows, ignore_index=True)
        d = root / run
        (d / "results").mkdir(parents=True, exist_ok=True)
        table.to_csv(d / "results" / "voxels.csv", index=False)
        summary = {"run": run, "model": model, "backbone": "test_vit", "seed": i, "wall_time_s": 1.0 + i,
                   # as `brainenc test` writes it: the atlas's ROIs by label value, not alphabetical
                   "roi_order": {f"{dataset}/{subject}": [r for r in ROIS if r != "none"]
                                 for dataset in datasets for subject in subjects}}
        if n_test_in == "summary":
            summary["n_test_images"] = n_test
        if retrieval:
            summary["retrieval"] = {
                f"{dataset}/{subject}": {"top1": 0.5 - 0.1 * i, "top5": 0.8 - 0.1 * i,
                                         "chance_top1": 1 / n_test, "chance_top5": 5 / n_test,
                                         "n_images": n_test}
                for dataset in datasets for subject in subjects}
        (d / "results" / "summary.json").write_text(json.dumps(summary, indent=1))
        (d / "config.yaml").write_text(f"model: {model}\n")
        run_dirs.append(d)
    return run_dirs

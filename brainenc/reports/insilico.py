"""The report's "In-silico selectivity" section: which encoder reproduces category selectivity.

Read from each run's ``insilico/rois.csv`` (written by ``brainenc insilico``); runs without it add
nothing.  Two tables: per run and category, how well the in-silico map (per-voxel Cohen's d of the
category against the rest, on images nobody scanned) matches the measured one and, on simbrain,
the true one (Pearson r over voxels); per ROI, the d' of the ROI-mean predicted response and the
category's share of the ROI's top-k images, one column block per run.
"""

from __future__ import annotations

import pandas as pd


def insilico_blocks(runs) -> list:
    tables = []
    for r in runs:
        path = r.path / "insilico" / "rois.csv"
        if path.exists():
            t = pd.read_csv(path, keep_default_na=False, na_values=[""])
            t["run"] = r.name
            tables.append(t)
    if not tables:
        return []
    df = pd.concat(tables, ignore_index=True)
    order = list(dict.fromkeys(df["run"]))  # the order the runs were given
    top = next((c for c in df.columns if c.startswith("top") and c.endswith("_frac")), None)
    blocks: list = [("h", 2, "In-silico selectivity"),
                    ("p", "Predictions of each run for an image folder with category subfolders "
                          "(brainenc insilico). d = per-voxel Cohen's d of a category against the other "
                          "images; d' = the same for the ROI-mean response; "
                          f"{top or 'top-k'} = the category's share of the ROI's most-preferred images. "
                          "r measured / r true = correlation over voxels of the in-silico d map with the "
                          "d map of the measured test responses / of simbrain's noise-free responses; "
                          "auc_true_type = how well d separates the voxels simbrain made of the category's "
                          "type (face) from the rest.")]
    whole = df[df["atlas"] == "all"]
    cols = [c for c in ("r_measured", "r_true", "auc_true_type") if c in whole.columns]
    if cols:
        t = whole.pivot_table(index=["dataset", "subject", "category"], columns="run", values=cols,
                              aggfunc="first")
        t = t.reindex(columns=[(v, r) for v in cols for r in order if (v, r) in t.columns])
        t.columns = [f"{run} {v}" for v, run in t.columns]
        blocks.append(("table", t.reset_index().round(3),
                       "Whole-brain agreement of the in-silico category map with the measured / true map"))
    rois = df[~df["atlas"].isin(["all", "cluster"])]
    values = ["roi_dprime"] + ([top] if top else [])
    t = rois.pivot_table(index=["dataset", "subject", "category", "roi"], columns="run", values=values,
                         aggfunc="first")
    t = t.reindex(columns=[(v, r) for v in values for r in order if (v, r) in t.columns])
    t.columns = [f"{run} {'d′' if v == 'roi_dprime' else v}" for v, run in t.columns]
    blocks.append(("table", t.reset_index().round(2), "Per ROI: d' of the ROI-mean prediction and the category's "
                   "share of the ROI's most-preferred images, per run"))
    return blocks

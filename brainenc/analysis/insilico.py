"""In-silico experiments: what trained encoders predict for images nobody scanned.

``brainenc insilico RUN [RUN ...] --images DIR [--out OUT]`` takes an image folder whose
first-level subfolders are categories (``face/``, ``noface/``, ...), makes sure every run has
predicted it (``brainenc predict --data.predict_images=DIR``, run when missing) and writes

    <run>/insilico/voxels.csv       per voxel and category: Cohen's d and Welch t of the category
                                    against the rest; beside them, where the store has labelled
                                    measured responses (simbrain's ``labels/face``), the same
                                    contrast on the measured test responses, and on simbrain the
                                    contrast of the noise-free true responses and the true voxel type
    <run>/insilico/rois.csv         per ROI (every atlas, and the embedding clusters of a universal
                                    run clustered by ``brainenc cluster``) and category: d' of the
                                    ROI-mean response, fraction of the category among the ROI's
                                    top-k and bottom-k images, median voxel d, correlation of the
                                    in-silico map with the measured and the true one, and on
                                    simbrain the AUC of d for the voxels of the category's true type
    <run>/insilico/top_<pair>_<atlas>_<roi>.png   montages: top-k and bottom-k images per ROI
    <run>/insilico/summary.json     the above per run, read by ``brainenc report``
    OUT/insilico.csv, OUT/map_<pair>_<category>.png   the runs side by side (maps: in silico per
                                    run, measured, true)

Contrast of category c (n_c images) against the rest (n_r), per voxel, predictions x::

    d = (mean_c - mean_r) / s_pooled,  s_pooled^2 = ((n_c-1) var_c + (n_r-1) var_r) / (n_c + n_r - 2)
    t = (mean_c - mean_r) / sqrt(var_c / n_c + var_r / n_r)                  (Welch)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Optional

import h5py
import numpy as np
import pandas as pd

from brainenc.data.store import SPLIT_TEST, Store, StoreError
from brainenc.ioutil import atomic_path, atomic_write


def contrast(x: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cohen's d and Welch t of rows ``mask`` against the other rows, per column.

    x : (n, V) responses; mask : bool (n,) with at least two rows on each side.
    Returns d (V,), t (V,) (NaN where both groups are constant)."""
    x = np.asarray(x, np.float64)
    a, b = x[mask], x[~mask]
    na, nb = len(a), len(b)
    if na < 2 or nb < 2:
        raise ValueError(f"a contrast needs two images on each side, found {na} and {nb}")
    ma, mb = a.mean(0), b.mean(0)
    va, vb = a.var(0, ddof=1), b.var(0, ddof=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        d = (ma - mb) / np.sqrt(((na - 1) * va + (nb - 1) * vb) / (na + nb - 2))
        t = (ma - mb) / np.sqrt(va / na + vb / nb)
    return d, t


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or np.std(a[ok]) == 0 or np.std(b[ok]) == 0:
        return float("nan")
    return float(np.corrcoef(a[ok], b[ok])[0, 1])


def _auc(score: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``score`` for ``positive`` voxels (ties count half); NaN
    without both classes."""
    from scipy.stats import rankdata

    ok = np.isfinite(score)
    s, y = score[ok], positive[ok]
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    return float((rankdata(s)[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


# ----------------------------------------------------------------------------- predictions
def _config(run: Path) -> Path:
    config = run / "results" / "config.yaml"
    if not config.exists():
        raise StoreError(config, "<file>", "the run's resolved config (test the run first: brainenc test, "
                         "or fit --test_after_fit=true)", "missing")
    return config


def _predictions_of(run: Path, images: Path) -> dict[str, Path]:
    """{pair: predictions file} when every file of ``run/predictions`` was made for ``images``."""
    files = sorted((run / "predictions").glob("*__*.h5"))
    found = {}
    for p in files:
        with h5py.File(p, "r") as f:
            if str(f.attrs.get("source", "")) != str(images.resolve()) or "category" not in f:
                return {}
            found[str(f.attrs["pair"])] = p
    return found


def ensure_predictions(run: Path, images: Path, predict: bool = True) -> dict[str, Path]:
    """The run's prediction files for ``images``; runs ``brainenc predict`` when they are missing
    or were made for other images (unless ``predict`` is False: then that is an error)."""
    found = _predictions_of(run, images)
    if found:
        return found
    if not predict:
        raise StoreError(run / "predictions", "attrs/source", f"predictions of {images} (brainenc predict -c "
                         f"{_config(run)} --data.predict_images={images})", "none")
    from brainenc.rundir import RunDir

    ckpt = RunDir(run).require_checkpoint()
    cmd = [sys.executable, "-m", "brainenc.cli", "predict", "-c", str(_config(run)), f"--ckpt_path={ckpt}",
           f"--data.predict_images={images}", f"--trainer.default_root_dir={run}",
           "--trainer.enable_progress_bar=false", "--trainer.logger=false", "--trainer.devices=1"]
    print("$ brainenc " + " ".join(cmd[3:]), flush=True)
    subprocess.run(cmd, check=True)
    found = _predictions_of(run, images)
    if not found:
        raise StoreError(run / "predictions", "attrs/source", f"predictions of {images}", "none after predicting")
    return found


def read_predictions(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        return {"pred": f["pred"][()], "ids": f["stimulus_id"][()].astype(str),
                "category": f["category"][()].astype(str), "model": str(f.attrs.get("model", ""))}


# ----------------------------------------------------------------------------- measured and true maps
def _test_rows(store: Store) -> np.ndarray:
    return np.flatnonzero(store.split == SPLIT_TEST) if store.split is not None else np.arange(store.n_stimuli)


def measured_contrasts(store: Store, subject: str, categories: list[str]) -> dict[str, dict]:
    """For each category with a label ``labels/<category>`` in the store (or ``no<label>``: the
    images without it, e.g. ``noface``): {"measured_d": (V,),
    "n": images} from the repeat-averaged measured responses of the test images, and on simbrain
    ``true_d`` (noise-free responses of the same images) and ``true_type`` (names, (V,))."""
    labels = {}
    for c in categories:
        if c in store.stimulus_labels:
            labels[c] = np.asarray(store.stimulus_labels[c]) > 0
        elif c.startswith("no") and c[2:] in store.stimulus_labels:  # "noface": images without the label
            labels[c] = ~(np.asarray(store.stimulus_labels[c[2:]]) > 0)
    if not labels:
        return {}
    info = store.subject(subject)
    rows = _test_rows(store)
    seen = np.isin(rows, info.trial_stimulus)
    rows = rows[seen]
    out: dict[str, dict] = {}
    with h5py.File(info.path, "r") as f:
        order = np.argsort(info.trial_stimulus, kind="stable")
        ts = info.trial_stimulus[order]
        sums = np.zeros((len(rows), info.n_voxels))
        counts = np.zeros((len(rows), info.n_voxels))
        for i, r in enumerate(rows):
            trials = np.sort(order[np.searchsorted(ts, r, "left"):np.searchsorted(ts, r, "right")])
            block = f["responses"][trials].astype(np.float64)
            ok = np.isfinite(block)
            sums[i], counts[i] = np.where(ok, block, 0).sum(0), ok.sum(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            measured = sums / counts
        truth = f["truth/responses"][np.sort(rows)] if "truth/responses" in f else None
        vtype = None
        if "truth/voxel_type" in f:
            import yaml

            names = yaml.safe_load(f["truth/voxel_type"].attrs.get("labels", "{}")) or {}
            vtype = np.array([names.get(int(v), str(v)) for v in f["truth/voxel_type"][()]], dtype=object)
    for c, lab in labels.items():
        mask = lab[rows]
        if mask.sum() < 2 or (~mask).sum() < 2:
            continue
        entry = {"measured_d": contrast(measured, mask)[0], "n": int(len(rows))}
        if truth is not None:
            entry["true_d"] = contrast(truth, mask)[0]  # rows were read sorted; rows is sorted already
        if vtype is not None:
            entry["true_type"] = vtype
        out[c] = entry
    return out


# ----------------------------------------------------------------------------- one run
def _groups(info, clusters: Optional[np.ndarray]) -> list[tuple[str, str, np.ndarray]]:
    """(atlas, roi, voxel mask) for every labelled ROI of every atlas, and every embedding cluster."""
    out = []
    for atlas, a in sorted(info.rois.items()):
        for value, name in sorted(a.labels.items()):
            m = np.asarray(a.values) == value
            if value and m.any():
                out.append((atlas, str(name), m))
    if clusters is not None:
        for k in sorted(set(clusters[np.isfinite(clusters)].astype(int))):
            out.append(("cluster", f"cluster {k}", clusters == k))
    return out


def _read_clusters(run: Path, pair: str, n: int) -> Optional[np.ndarray]:
    table = run / "results" / "voxels.csv"
    if not table.exists():
        return None
    from brainenc.results import read_results

    df = read_results(run)
    if "cluster" not in df.columns:
        return None
    dataset, subject = pair.split("/", 1)
    d = df[(df["dataset"].astype(str) == dataset) & (df["subject"].astype(str) == subject)]
    out = np.full(n, np.nan)
    out[d["voxel"].to_numpy(int)] = pd.to_numeric(d["cluster"], errors="coerce").to_numpy(float)
    return out


def _stores_of(run: Path) -> dict[str, Store]:
    import yaml

    cfg = yaml.safe_load(_config(run).read_text()) or {}
    stores = {}
    for s in (cfg.get("data") or {}).get("stores") or []:
        st = Store(s, validate=False)
        stores[st.name] = st
    return stores


def analyse_run(run: Path, images: Path, top_k: int = 20, predict: bool = True, montages: bool = True) -> dict:
    """In-silico contrasts of one run (files in ``run/insilico``); returns the summary dict."""
    run = Path(run)
    files = ensure_predictions(run, images, predict)
    stores = _stores_of(run)
    out_dir = run / "insilico"
    voxel_rows, roi_rows = [], []
    for pair, path in sorted(files.items()):
        p = read_predictions(path)
        cats = sorted(set(p["category"]) - {""})
        if len(cats) < 2:
            raise StoreError(images, "<subfolders>", "images in at least two category subfolders "
                             "(e.g. face/ and noface/)", f"categories {cats}")
        dataset, subject = pair.split("/", 1)
        store = stores.get(dataset)
        info = store.subject(subject) if store is not None else None
        measured = measured_contrasts(store, subject, cats) if store is not None else {}
        clusters = _read_clusters(run, pair, p["pred"].shape[1])
        groups = _groups(info, clusters) if info is not None else []
        roi_of = np.full(p["pred"].shape[1], "", dtype=object)
        for atlas, roi, m in groups:
            if atlas != "cluster":
                roi_of[m & (roi_of == "")] = roi
        for c in cats:
            mask = p["category"] == c
            d, t = contrast(p["pred"], mask)
            ms = measured.get(c, {})
            vox = pd.DataFrame({"run": run.name, "model": p["model"], "dataset": dataset, "subject": subject,
                                "voxel": np.arange(len(d)), "roi": roi_of, "category": c, "d": d, "t": t})
            for k in ("measured_d", "true_d", "true_type"):
                if k in ms:
                    vox[k] = ms[k]
            voxel_rows.append(vox)
            for atlas, roi, m in [("all", "all", np.ones(len(d), bool)), *groups]:
                mean = p["pred"][:, m].mean(1)
                rd, rt = contrast(mean[:, None], mask)
                order = np.argsort(-mean, kind="stable")
                k = min(top_k, len(order))
                row = {"run": run.name, "model": p["model"], "dataset": dataset, "subject": subject,
                       "atlas": atlas, "roi": roi, "category": c, "n_voxels": int(m.sum()),
                       "n_images": int(len(mask)), "n_category": int(mask.sum()),
                       "roi_dprime": float(rd[0]), "roi_t": float(rt[0]),
                       f"top{top_k}_frac": float(mask[order[:k]].mean()),
                       f"bottom{top_k}_frac": float(mask[order[::-1][:k]].mean()),
                       "median_voxel_d": float(np.nanmedian(d[m])),
                       "frac_voxels_t_gt_3": float(np.mean(t[m] > 3))}
                if "measured_d" in ms:
                    row["r_measured"] = _corr(d[m], ms["measured_d"][m])
                    row["median_measured_d"] = float(np.nanmedian(ms["measured_d"][m]))
                if "true_d" in ms:
                    row["r_true"] = _corr(d[m], ms["true_d"][m])
                if "true_type" in ms and c in set(ms["true_type"]):
                    # how well the in-silico d separates the voxels simbrain made of this type
                    row["auc_true_type"] = _auc(d[m], ms["true_type"][m] == c)
                roi_rows.append(row)
            if montages and c == cats[0]:
                for atlas, roi, m in groups:
                    mean = p["pred"][:, m].mean(1)
                    _montage(images, p["ids"], p["category"], mean, top_k,
                             out_dir / f"top_{pair.replace('/', '__')}_{_slug(atlas)}_{_slug(roi)}.png",
                             f"{run.name} {pair} {atlas} {roi}")
    voxels = pd.concat(voxel_rows, ignore_index=True)
    rois = pd.DataFrame(roi_rows)
    for name, df in (("voxels.csv", voxels), ("rois.csv", rois)):
        with atomic_path(out_dir / name) as tmp:
            df.to_csv(tmp, index=False)
    summary = {"run": str(run), "images": str(images.resolve()), "top_k": top_k,
               "rois": json.loads(rois.to_json(orient="records"))}
    atomic_write(out_dir / "summary.json", json.dumps(summary, indent=1))
    return {"voxels": voxels, "rois": rois, "summary": summary}


def _slug(s: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in str(s))


def _thumb(images: Path, image_id: str, size: int = 64) -> np.ndarray:
    from PIL import Image

    from brainenc.data.images import square_input

    with Image.open(images / image_id) as im:
        x = square_input(np.asarray(im.convert("RGB")), size)[0]
    return (x.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


def _montage(images: Path, ids, cats, score: np.ndarray, k: int, path: Path, title: str) -> None:
    """Two rows of thumbnails: the k images with the highest ROI-mean prediction, then the k lowest."""
    from brainenc.reports.plots import new_figure

    order = np.argsort(-score, kind="stable")
    k = min(k, len(order))
    cols = min(k, 10)
    blocks = [("most", order[:k]), ("least", order[::-1][:k])]
    n_rows = sum(-(-len(b) // cols) for _, b in blocks)
    fig, axes = new_figure(n_rows, cols, figsize=(1.3 * cols, 1.5 * n_rows))
    r = 0
    for name, idx in blocks:
        for j, i in enumerate(idx):
            ax = axes[r + j // cols, j % cols]
            ax.imshow(_thumb(images, ids[i]))
            ax.set_title(f"{cats[i]} {score[i]:.2f}", fontsize=6)
        r += -(-len(idx) // cols)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{title}: {k} most (top) and least preferred images", fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    import matplotlib.pyplot as plt

    plt.close(fig)


# ----------------------------------------------------------------------------- several runs
def map_figure(voxels: pd.DataFrame, coords: pd.DataFrame, pair: str, category: str):
    """Flat map (simbrain's flat_x/flat_y, else x/y) of d: one panel per run, then measured and true."""
    from brainenc.reports.plots import new_figure

    dataset, subject = pair.split("/", 1)
    v = voxels[(voxels["dataset"] == dataset) & (voxels["subject"].astype(str) == subject)
               & (voxels["category"] == category)]
    panels = [(f"{r} (in silico)", v[v["run"] == r]["d"].to_numpy()) for r in dict.fromkeys(v["run"])]
    first = v[v["run"] == v["run"].iloc[0]]
    for col, name in (("measured_d", "measured (test images)"), ("true_d", "true (noise-free)")):
        if col in first and first[col].notna().any():
            panels.append((name, first[col].to_numpy()))
    c = coords.set_index("voxel").loc[first["voxel"].to_numpy()]
    xcol, ycol = ("flat_x", "flat_y") if {"flat_x", "flat_y"} <= set(c.columns) and c["flat_x"].notna().all() \
        else ("x", "y")
    vmax = float(np.nanpercentile(np.abs(np.concatenate([p for _, p in panels])), 99)) or 1.0
    fig, axes = new_figure(1, len(panels), figsize=(3.6 * len(panels) + 0.8, 3.4))
    sc = None
    for ax, (name, val) in zip(axes[0], panels):
        sc = ax.scatter(c[xcol], c[ycol], c=val, s=7, cmap="RdBu_r", vmin=-vmax, vmax=vmax, linewidths=0)
        ax.set_title(name, fontsize=8)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(sc, ax=axes[0].tolist(), shrink=0.8, label=f"Cohen's d, {category} vs rest")
    fig.suptitle(f"{pair}: {category} selectivity ({xcol}, {ycol})", fontsize=9)
    return fig


def run_insilico(runs: list[Path], images: Path, out: Path, top_k: int = 20, predict: bool = True,
                 figures: bool = True) -> pd.DataFrame:
    """Analyse every run, then write the side-by-side table and maps into ``out``."""
    images = Path(images)
    if not images.is_dir():
        raise StoreError(images, "--images", "a folder of images in category subfolders", "no such folder")
    results = [analyse_run(Path(r), images, top_k, predict, montages=figures) for r in runs]
    rois = pd.concat([r["rois"] for r in results], ignore_index=True)
    with atomic_path(Path(out) / "insilico.csv") as tmp:
        rois.to_csv(tmp, index=False)
    if figures:
        from brainenc.results import read_results

        voxels = pd.concat([r["voxels"] for r in results], ignore_index=True)
        coords = read_results(runs[0]) if (Path(runs[0]) / "results" / "voxels.csv").exists() else None
        for (dataset, subject), _ in voxels.groupby(["dataset", "subject"]):
            if coords is None:
                break
            cc = coords[(coords["dataset"].astype(str) == dataset) & (coords["subject"].astype(str) == subject)]
            if cc.empty:
                continue
            for category in sorted(voxels["category"].unique()):
                fig = map_figure(voxels, cc, f"{dataset}/{subject}", category)
                with atomic_path(Path(out) / f"map_{dataset}__{subject}_{_slug(category)}.png") as tmp:
                    fig.savefig(tmp, dpi=110, format="png")
                import matplotlib.pyplot as plt

                plt.close(fig)
    return rois


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="brainenc insilico", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="tested run directories")
    ap.add_argument("--images", type=Path, required=True, help="image folder with one subfolder per category")
    ap.add_argument("--out", type=Path, default=Path("runs/insilico"), help="side-by-side table and maps")
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--no-predict", action="store_true", help="use existing predictions only")
    ap.add_argument("--no-figures", action="store_true")
    args = ap.parse_args(argv)
    rois = run_insilico(args.runs, args.images, args.out, args.top_k, not args.no_predict, not args.no_figures)
    k = f"top{args.top_k}_frac"
    cols = ["run", "dataset", "subject", "atlas", "roi", "category", "roi_dprime", k]
    cols += [c for c in ("r_measured", "r_true") if c in rois.columns]
    with pd.option_context("display.width", 160, "display.max_rows", 200):
        print(rois[rois["atlas"] != "cluster"][cols].round(3).to_string(index=False))
    print(f"\n{args.out / 'insilico.csv'}; per run: <run>/insilico/")
    return 0

"""AFO stage 4: the experts' dark-knowledge targets for the student.

For every training image (and extra unlabelled images) the experts' stitched predictions are
averaged over partitions and written to ``dark_targets.h5``; an expert that does not beat the
whole-brain model on validation images inside its ROI gives way to it (:func:`expert_check`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import h5py
import numpy as np

from brainenc.ioutil import atomic_path, atomic_write
from brainenc.models.readout import pair_slot

from .stages import load_trained, log, stage_done

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def extra_stores(sources: list[str], root: Path, image_size: int) -> list:
    """Stores whose images serve as extra, unlabelled dark-knowledge images.

    ``sources`` are canonical store directories (their stimuli are used, e.g. another dataset's
    or another subject's images) or folders of PNG/JPG images; the folders' images are written,
    centre-cropped and resized to ``image_size`` as an importer writes any image
    (:func:`brainenc.data.images.to_rgb_square`), into one subject-less store ``root/extra_images`` (atomically), so
    every extra image is a (store, row) whose frozen features the feature cache can hold.
    """
    from brainenc.data.store import MANIFEST, Store, StimuliWriter, write_manifest

    stores, files, at = [], [], None
    for src in sources:
        p = Path(src)
        if (p / MANIFEST).exists():
            stores.append(Store(p, validate=False))
        elif p.is_dir():
            at = len(stores) if at is None else at  # the folders' store takes the first folder's place
            found = sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ValueError(f"{p}: expected PNG/JPG images for extra dark-knowledge targets, found none")
            files += found
        else:
            raise FileNotFoundError(f"extra images: {p} is neither a store (manifest.yaml) nor a folder of images")
    if files:
        from brainenc.data.importers.source_files import load_image_file

        out = root / "extra_images"
        if not (out / MANIFEST).exists():
            w = StimuliWriter(out / "stimuli.h5", len(files), (image_size, image_size), visual_angle_deg=8.4,
                              attrs={"source": "afo extra images"})
            with w:
                for q in files:
                    w.write(load_image_file(q, image_size)[None], [f"extra-{q.name}"])
            write_manifest(out, {"dataset": "afo-extra", "subjects": [], "source": "image folders",
                                 "files": [str(q) for q in files]})
        stores.insert(at, Store(out, validate=False))
    return stores


def predict_rows(model, pairs: list[str], store, rows: np.ndarray, batch_size: int,
                 partitions: bool = False) -> dict[str, np.ndarray]:
    """Predictions of every pair's voxels for sorted stimulus rows of ``store``; each batch's
    features are read once for all ``pairs``.

    Returns {pair: float32 (n, n_voxels)}, or (n, P, n_voxels) per partition of an experts model
    with ``partitions=True``.
    """
    import torch

    outs: dict[str, list] = {k: [] for k in pairs}
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            feats = model.features_of_rows(store, rows[i:i + batch_size])
            for k in pairs:
                pred = model.readout.forward_partitions(feats, k) if partitions else model.predict_all(feats, k)
                outs[k].append(pred.float().cpu())
    return {k: torch.cat(v).numpy() for k, v in outs.items()}


def predict_extras(model, pairs: list[str], extras: list, batch_size: int,
                   partitions: bool = False) -> dict[str, np.ndarray]:
    """:func:`predict_rows` over every stimulus of every extra store, concatenated in store order
    ({} without extras)."""
    per = [predict_rows(model, pairs, s, np.arange(s.n_stimuli), batch_size, partitions)
           for s in extras]
    return {k: np.concatenate([d[k] for d in per]) for k in pairs} if per else {}


def expert_check(val_pred: np.ndarray, whole_pred: np.ndarray, target: np.ndarray, labels: np.ndarray,
                 names: list[str]) -> tuple[np.ndarray, list[dict]]:
    """Which experts of one partition beat the whole-brain model inside their ROI, on validation images.

    Parameters
    ----------
    val_pred, whole_pred, target : (n_val, n_voxels) the partition's stitched experts, the
        whole-brain model, the measured responses
    labels : (n_voxels,) ROI index of each voxel in this partition; names : ROI names

    Returns
    -------
    keep : bool (n_voxels,), True where the voxel's expert wins (its median r over the ROI's
        voxels exceeds the whole-brain model's), and rows ``{"roi", "n_voxels", "r_expert",
        "r_whole", "wins"}`` per ROI for the report
    """
    from brainenc.metrics.correlation import pearson_np

    r_e, r_w = pearson_np(val_pred, target), pearson_np(whole_pred, target)
    keep = np.zeros(len(labels), bool)
    rows = []
    for r, name in enumerate(names):
        sel = labels == r
        if not sel.any():
            continue
        me, mw = float(np.nanmedian(r_e[sel])), float(np.nanmedian(r_w[sel]))
        wins = bool(me > mw)
        keep[sel] = wins
        rows.append({"roi": name, "n_voxels": int(sel.sum()), "r_expert": round(me, 4), "r_whole": round(mw, 4),
                     "wins": wins})
    return keep, rows


def run_dark(root: Path, expert_runs: list[tuple[Path, int]], settings: dict, cli_args: list[str],
             whole: Optional[Path] = None) -> Path:
    """Stitched, partition-averaged expert predictions for every training image -> ``dark_targets.h5``.

    ``expert_runs``: (run dir, number of partitions it holds).  With ``whole`` (the whole-brain
    stage) and ``settings["check_experts"]`` (default true), every expert is first scored against
    the whole-brain model on the validation images inside its ROI; where it does not beat it, its
    voxels take the whole-brain prediction instead (reported in ``experts_vs_whole.json``), so the
    targets are never worse than the model being distilled.  Extra unlabelled images
    (``settings["extra_images"]``: store dirs or image folders, see :func:`extra_stores`) get
    targets too.
    """
    from brainenc.data.store import Store

    out = root / "dark_targets.h5"
    if stage_done(root) and out.exists():
        log("dark: finished, skipped")
        return out
    root.mkdir(parents=True, exist_ok=True)
    bs = int(settings.get("batch_size", 128))
    check = bool(settings.get("check_experts", True)) and whole is not None
    whole_model = load_trained(whole, cli_args)[0] if check else None
    acc: dict[str, np.ndarray] = {}
    extra_acc: dict[str, np.ndarray] = {}
    rows_of: dict[str, np.ndarray] = {}
    report: list[dict] = []
    extras: Optional[list] = None
    whole_memo: dict = {}

    def whole_pred(tag: str, key: str, compute):
        """The whole-brain model's predictions, computed once per (what, pair) over all runs."""
        if (tag, key) not in whole_memo:
            whole_memo[(tag, key)] = compute(whole_model)
        return whole_memo[(tag, key)]

    total = 0
    for run, _ in expert_runs:
        model, dm = load_trained(run, cli_args)
        if extras is None:
            extras = extra_stores(list(settings.get("extra_images") or []), root, model.backbone.image_size)
        names = model.readout.partition_names
        total += len(names)
        x_pred = predict_extras(model, [p.key for p in dm.pairs], extras, bs, partitions=True)
        for p in dm.pairs:
            rows = np.sort(p.split.train)
            rows_of[p.key] = rows
            pred = predict_rows(model, [p.key], p.store, rows, bs, partitions=True)[p.key]  # (n, P, V)
            xp = x_pred.get(p.key)  # (M, P, V) or None
            if check:
                val = np.sort(p.split.val)
                v_pred = predict_rows(model, [p.key], p.store, val, bs, partitions=True)[p.key]
                v_whole = whole_pred("val", p.key, lambda m: predict_rows(m, [p.key], p.store, val, bs)[p.key])
                target = _responses(dm, p, val)
                for i, part in enumerate(names):
                    lab = model.readout.labels(part, p.key)
                    keep, table = expert_check(v_pred[:, i], v_whole, target, lab, model.readout.roi_names[part])
                    report += [{"partition": part, "pair": p.key, **row} for row in table]
                    if keep.all():
                        continue  # the whole-brain predictions are needed only where an expert lost
                    pred[:, i] = np.where(keep, pred[:, i], whole_pred(
                        "train", p.key, lambda m: predict_rows(m, [p.key], p.store, rows, bs)[p.key]))
                    if xp is not None:
                        xp[:, i] = np.where(keep, xp[:, i], whole_pred(
                            "extra", p.key, lambda m: predict_extras(m, [p.key], extras, bs)[p.key]))
            acc[p.key] = acc.get(p.key, 0) + pred.sum(axis=1)
            if xp is not None:
                extra_acc[p.key] = extra_acc.get(p.key, 0) + xp.sum(axis=1)
        log(f"dark: predicted with {run}")
    if report:
        atomic_write(root / "experts_vs_whole.json", json.dumps(report, indent=1))
        wins = sum(r["wins"] for r in report)
        log(f"dark: {wins} of {len(report)} experts beat the whole-brain model on validation images inside "
             "their ROI; the others' voxels take the whole-brain prediction (experts_vs_whole.json)")
    with atomic_path(out) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["expert_runs"] = json.dumps([str(r) for r, _ in expert_runs])
            f.attrs["n_partitions"] = total
            for key, pred in acc.items():
                g = f.create_group(f"pairs/{pair_slot(key)}")
                g.attrs["pair"] = key
                g.create_dataset("stimulus", data=rows_of[key].astype(np.int64))
                g.create_dataset("pred", data=(pred / total).astype(np.float32), chunks=True)
            if extras:
                g = f.create_group("extra")
                g.attrs["stores"] = json.dumps([str(Path(s.root).resolve()) for s in extras])
                g.create_dataset("source", data=np.concatenate([np.full(s.n_stimuli, j) for j, s in enumerate(extras)]))
                g.create_dataset("row", data=np.concatenate([np.arange(s.n_stimuli) for s in extras]))
                for key, pred in extra_acc.items():
                    g.create_dataset(f"pred/{pair_slot(key)}", data=(pred / total).astype(np.float32))
    atomic_write(root / "DONE", "ok\n")
    n_extra = sum(s.n_stimuli for s in extras or [])
    log(f"dark: targets for {sum(len(v) for v in rows_of.values())} (pair, image) rows"
         f" and {n_extra} extra images -> {out}")
    return out


def _responses(dm, pair, rows: np.ndarray) -> np.ndarray:
    """Repeat-averaged measured responses (n, n_voxels) of ``pair`` for sorted stimulus ``rows``."""
    from brainenc.data.datamodule import PairBatchDataset

    ds = PairBatchDataset(dm.pairs, dm.hparams.image_size, "stimuli", load_images=False)
    index = [q.key for q in dm.pairs].index(pair.key)
    return ds[(index, rows)]["responses"].numpy()

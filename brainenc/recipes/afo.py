"""``brainenc afo -c recipe.yaml``: the All-for-One recipe as one resumable command.

Stages, each in its own directory under the recipe's ``out``:

1. ``whole``      whole-brain retinotopic model over every subject (``brainenc fit`` + ``test``);
2. ``partitions`` atlas ROIs, k-means ROIs of the whole-brain readout weights, random ROIs
                  (``partitions.h5``; see :mod:`brainenc.recipes.partitions`);
3. ``experts``    one small retinotopic expert per ROI of every partition, trained together on the
                  shared backbone (:class:`~brainenc.lit.experts.ExpertsModule`); tested as the
                  partition-averaged ensemble.  ``--only-expert PARTITION`` trains one partition in
                  ``experts-<PARTITION>/`` so a cluster can run partitions in parallel;
4. ``dark``       the experts' stitched predictions, averaged over partitions, for the training
                  images (and extra unlabelled images) -> ``dark_targets.h5``;
5. ``student``    one whole-brain model distilled from measured + dark targets
                  (:class:`~brainenc.lit.distill.DistillModule`).

``fit``/``test`` stages are ``python -m brainenc.cli fit|test`` subprocesses (exactly what a user
would type, with isolated state); their configs are written to ``<stage>/stage.yaml``.  A stage
is finished when ``<stage>/results/voxels.csv`` or ``<stage>/DONE`` exists and is then skipped;
an interrupted fit resumes from ``<stage>/checkpoints/last.ckpt``.

Recipe YAML::

    base: experiments/quickstart/retinotopic.yaml   # a fit config (path, or the config inline)
    out: runs/afo/quickstart
    cli_args: ["--trainer.enable_progress_bar=false"]   # appended to every fit/test command
    partitions: {atlases: [simbrain], kmeans: [8], n_random: 2, random_k: 8, seed: 0}
    stages:
      whole: {max_epochs: 4}
      experts: {max_epochs: 4, expert: {width: 16}, separate: false, init: scratch}   # or init: whole
      dark: {batch_size: 128, extra_images: [], check_experts: true}   # store dirs or folders of PNG/JPG
      student: {max_epochs: 6, ramp_epochs: 4, extra_per_step: 0, init: scratch}   # or init: whole
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import h5py
import numpy as np
import yaml

from brainenc.ioutil import atomic_path, atomic_write
from brainenc.models.readout import pair_slot
from brainenc.rundir import RunDir, fit_then_test

STAGES = ("whole", "partitions", "experts", "dark", "student")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
STAGE_CONFIG = "stage.yaml"


def _log(msg: str) -> None:
    print(f"[afo] {msg}", flush=True)


# ----------------------------------------------------------------------------- configs
def load_recipe(path: str | Path) -> dict:
    """The recipe as plain dicts; ``base`` is loaded (not resolved: ``${...}`` stay for the CLI)."""
    path = Path(path)
    recipe = yaml.safe_load(path.read_text()) or {}
    base = recipe.get("base")
    if base is None:
        raise ValueError(f"{path}: field 'base': expected a fit config (a path or an inline mapping)")
    if isinstance(base, str):
        bp = Path(base)
        if not bp.is_file():
            raise FileNotFoundError(f"{path}: field 'base': config file {bp} not found")
        recipe["base"] = yaml.safe_load(bp.read_text())
    if "out" not in recipe:
        raise ValueError(f"{path}: field 'out': expected the recipe's output directory")
    recipe.setdefault("stages", {})
    recipe.setdefault("partitions", {})
    recipe.setdefault("cli_args", [])
    return recipe


def stage_config(base: dict, root: Path, max_epochs: Optional[int] = None, model_class: Optional[str] = None,
                 readout: Optional[dict] = None, init_args: Optional[dict] = None) -> dict:
    """A copy of the base fit config with the stage's directory, epochs, model class and readout."""
    cfg = copy.deepcopy(base)
    trainer = cfg.setdefault("trainer", {})
    trainer["default_root_dir"] = str(root)
    if max_epochs is not None:
        trainer["max_epochs"] = int(max_epochs)
    model = cfg.setdefault("model", {})
    if model_class:
        model["class_path"] = model_class
    args = model.setdefault("init_args", {})
    if readout is not None:
        args["readout"] = readout
    args.update(init_args or {})
    return cfg


# ----------------------------------------------------------------------------- running stages
def stage_done(root: Path) -> bool:
    return (root / "results" / "voxels.csv").exists() or (root / "DONE").exists()


def _cli(args: list[str]) -> None:
    cmd = [sys.executable, "-m", "brainenc.cli", *args]
    _log("$ brainenc " + " ".join(args))
    from brainenc.subprocs import die_with_parent

    subprocess.run(cmd, check=True, preexec_fn=die_with_parent())  # the stage dies with the recipe


def run_fit_test(root: Path, cfg: dict, cli_args: list[str]) -> None:
    """Fit and test one stage with :func:`~brainenc.rundir.fit_then_test` (resuming from
    ``last.ckpt`` when present); skip it when finished."""
    if stage_done(root):
        _log(f"{root.name}: finished, skipped")
        return
    # not "config.yaml": LightningCLI saves its own resolved config under that name in the run dir
    config = root / STAGE_CONFIG
    atomic_write(config, yaml.safe_dump(cfg, sort_keys=False))

    def fit(resume: Optional[Path]) -> None:
        # fit and test in one process (one start-up); a test that failed after a finished fit is
        # re-run on its own by fit_then_test on the next call
        args = ["fit", "-c", str(config), *cli_args, "--test_after_fit=true"]
        if resume is not None:
            _log(f"{root.name}: resuming from {resume}")
            args += ["--ckpt_path", str(resume)]
        _cli(args)

    def test(ckpt: Path) -> None:
        _cli(["test", "-c", str(config), "--ckpt_path", str(ckpt), *cli_args])

    fit_then_test(RunDir(root), fit, test)


def load_trained(root: Path, cli_args: list[str] = ()):
    """The stage's model with the weights of its checkpoint (best, else last; eval mode), and its
    datamodule."""
    from brainenc import cli

    return cli.load_trained(root, root / STAGE_CONFIG, cli_args)


# ----------------------------------------------------------------------------- stage 2
def run_partitions(root: Path, whole: Path, settings: dict, cli_args: list[str]) -> Path:
    from brainenc.models.partition_file import write_partitions

    from .partitions import build_partitions, readout_weights_from_checkpoint

    out = root / "partitions.h5"
    if stage_done(root) and out.exists():
        _log("partitions: finished, skipped")
        return out
    from brainenc.cli import instantiate

    _, dm = instantiate(whole / STAGE_CONFIG, cli_args)
    kmeans = list(settings.get("kmeans", [8]))
    weights = readout_weights_from_checkpoint(RunDir(whole).require_checkpoint(), [p.key for p in dm.pairs]) if kmeans else None
    parts = build_partitions(dm.pairs, weights, atlases=tuple(settings.get("atlases", ["simbrain"])),
                             kmeans=kmeans, n_random=int(settings.get("n_random", 2)),
                             random_k=int(settings.get("random_k", 8)), seed=int(settings.get("seed", 0)))
    write_partitions(out, parts)
    summary = {name: {"rois": names, "voxels_per_roi": np.bincount(np.concatenate(list(lab.values())),
                                                                   minlength=len(names)).tolist()}
               for name, (names, lab) in parts.items()}
    atomic_write(root / "partitions.json", json.dumps(summary, indent=2))
    atomic_write(root / "DONE", "ok\n")
    _log(f"partitions: {', '.join(f'{k} ({len(v[0])} ROIs)' for k, v in parts.items())} -> {out}")
    return out


# ----------------------------------------------------------------------------- stage 4
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
        _log("dark: finished, skipped")
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
        _log(f"dark: predicted with {run}")
    if report:
        atomic_write(root / "experts_vs_whole.json", json.dumps(report, indent=1))
        wins = sum(r["wins"] for r in report)
        _log(f"dark: {wins} of {len(report)} experts beat the whole-brain model on validation images inside "
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
    _log(f"dark: targets for {sum(len(v) for v in rows_of.values())} (pair, image) rows"
         f" and {n_extra} extra images -> {out}")
    return out


def _responses(dm, pair, rows: np.ndarray) -> np.ndarray:
    """Repeat-averaged measured responses (n, n_voxels) of ``pair`` for sorted stimulus ``rows``."""
    from brainenc.data.datamodule import PairBatchDataset

    ds = PairBatchDataset(dm.pairs, dm.hparams.image_size, "stimuli", load_images=False)
    index = [q.key for q in dm.pairs].index(pair.key)
    return ds[(index, rows)]["responses"].numpy()


# ----------------------------------------------------------------------------- the recipe
class AFORecipe:
    """The five stages over one recipe dict (see the module docstring for its fields)."""

    def __init__(self, recipe: dict):
        self.recipe = recipe
        self.base = recipe["base"]
        self.out = Path(recipe["out"])
        self.stages = recipe["stages"]
        self.cli_args = [str(a) for a in recipe.get("cli_args", [])]

    def dir(self, stage: str) -> Path:
        return self.out / stage

    def _epochs(self, stage: str) -> Optional[int]:
        return (self.stages.get(stage) or {}).get("max_epochs")

    def whole(self) -> None:
        cfg = stage_config(self.base, self.dir("whole"), self._epochs("whole"),
                           init_args={"model_name": "afo-whole"})
        run_fit_test(self.dir("whole"), cfg, self.cli_args)

    def partitions(self) -> Path:
        return run_partitions(self.dir("partitions"), self.dir("whole"), self.recipe["partitions"], self.cli_args)

    def _experts_cfg(self, root: Path, only: Optional[list[str]]) -> dict:
        s = self.stages.get("experts") or {}
        expert, init_from = dict(s.get("expert") or {}), None
        init = s.get("init", "scratch")
        if init == "whole":
            # warm start: every expert is the whole-brain readout restricted to its ROI, so it has
            # the whole-brain model's architecture; `expert` may only change training-time options
            base_readout = ((self.base.get("model") or {}).get("init_args") or {}).get("readout") or {}
            expert = {**dict(base_readout.get("init_args") or {}), **expert}
            init_from = str(RunDir(self.dir("whole")).require_checkpoint().resolve())
        elif init != "scratch":
            raise ValueError(f"recipe field 'stages.experts.init': expected 'scratch' or 'whole', got {init!r}")
        readout = {"class_path": "brainenc.models.experts.ExpertsReadout",
                   "init_args": {"partitions": str((self.dir("partitions") / "partitions.h5").resolve()),
                                 "only": only, "expert": expert, "init_from": init_from}}
        extra = {"model_name": "afo-experts", **dict(s.get("init_args") or {})}
        return stage_config(self.base, root, s.get("max_epochs"), "brainenc.lit.experts.ExpertsModule",
                            readout, extra)

    def partition_names(self) -> list[str]:
        from brainenc.models.partition_file import read_partitions

        return list(read_partitions(self.dir("partitions") / "partitions.h5"))

    def expert_runs(self) -> list[tuple[Path, int]]:
        names = self.partition_names()
        if (self.stages.get("experts") or {}).get("separate"):
            return [(self.out / f"experts-{p}", 1) for p in names]
        return [(self.dir("experts"), len(names))]

    def experts(self, only: Optional[str] = None) -> None:
        names = self.partition_names()
        if only is not None:
            if only not in names:
                raise ValueError(f"--only-expert {only!r}: no such partition; have {names}")
            root = self.out / f"experts-{only}"
            run_fit_test(root, self._experts_cfg(root, [only]), self.cli_args)
            return
        for root, _ in self.expert_runs():
            part = None if root == self.dir("experts") else [root.name[len("experts-"):]]
            run_fit_test(root, self._experts_cfg(root, part), self.cli_args)

    def dark(self) -> Path:
        return run_dark(self.dir("dark"), self.expert_runs(), self.stages.get("dark") or {}, self.cli_args,
                        whole=self.dir("whole"))

    def student(self) -> None:
        s = self.stages.get("student") or {}
        args = {"model_name": "afo-student",
                "dark_targets": str((self.dir("dark") / "dark_targets.h5").resolve()),
                "ramp_epochs": s.get("ramp_epochs"), "extra_per_step": int(s.get("extra_per_step", 0)),
                **dict(s.get("init_args") or {})}
        if "loss" not in args:  # the recipe's per-voxel SmoothL1, unless the stage says otherwise
            args["loss"] = {"class_path": "brainenc.models.losses.SmoothL1Loss", "init_args": {"beta": 0.01}}
        init = s.get("init", "scratch")
        if init == "whole":  # start from the whole-brain model (same base config, same shapes)
            args["init_from"] = str(RunDir(self.dir("whole")).require_checkpoint().resolve())
        elif init != "scratch":
            raise ValueError(f"recipe field 'stages.student.init': expected 'scratch' or 'whole', got {init!r}")
        cfg = stage_config(self.base, self.dir("student"), s.get("max_epochs"),
                           "brainenc.lit.distill.DistillModule", init_args=args)
        run_fit_test(self.dir("student"), cfg, self.cli_args)

    def run(self, only_stage: Optional[str] = None, only_expert: Optional[str] = None) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        if only_expert is not None:
            self.experts(only_expert)
            return
        for stage in STAGES:
            if only_stage is None or only_stage == stage:
                t = time.time()
                getattr(self, stage)()
                _log(f"stage {stage}: {time.time() - t:.0f} s")
        _log(f"done in {time.time() - t0:.0f} s; compare with: brainenc compare "
             + " ".join(str(r) for r, _ in [(self.dir('whole'), 0), *self.expert_runs(), (self.dir('student'), 0)]))


def summarise(recipe: "AFORecipe", stage: str = "student") -> dict:
    """Figures for docs: per-ROI median r/oracle per stage, student vs whole-brain (Wilcoxon), and
    recovery of the true pRF centres by the ``stage`` model's learned positions (V1-V3 voxels).

    Writes ``<out>/summary.json`` and returns it.
    """
    from scipy.stats import wilcoxon

    from brainenc.compare import roi_table
    from brainenc.results import read_results

    out: dict = {}
    runs = {s: recipe.dir(s) for s in ("whole", "student")}
    runs.update({r.name: r for r, _ in recipe.expert_runs()})
    tables = [read_results(r) for r in runs.values() if RunDir(r).tested()]
    table = roi_table(tables)
    out["roi_frac_oracle"] = {str(k): v for k, v in table.xs("frac_oracle", axis=1, level=1).round(4).to_dict().items()}
    if all(RunDir(runs[s]).tested() for s in ("whole", "student")):
        keys = ["dataset", "subject", "voxel"]
        m = read_results(runs["whole"]).merge(read_results(runs["student"]), on=keys, suffixes=("_w", "_s"))
        m = m[np.isfinite(m["pearson_w"]) & np.isfinite(m["pearson_s"])]
        out["student_vs_whole"] = {}
        # all voxels, then only those with a signal to predict (simbrain's oracle r > 0.1)
        for name, sel in (("all", np.ones(len(m), bool)), ("signal", (m["oracle_w"] > 0.1).to_numpy())):
            d = m[sel]
            if len(d) < 10:
                continue
            stat = wilcoxon(d["pearson_s"], d["pearson_w"], alternative="greater")
            out["student_vs_whole"][name] = {
                "n_voxels": int(len(d)), "median_diff": float((d["pearson_s"] - d["pearson_w"]).median()),
                "frac_student_better": float((d["pearson_s"] > d["pearson_w"]).mean()),
                "wilcoxon_p_greater": float(stat.pvalue)}
    from brainenc.analysis.prf import prf_recovery

    model, dm = load_trained(recipe.dir(stage), recipe.cli_args)
    pos = prf_recovery(model.readout, dm.pairs) if hasattr(model.readout, "positions_deg") else {}
    out["positions_V1_V3"] = pos
    if pos:
        from brainenc.analysis.prf import prf_figure

        first = next(p for p in dm.pairs if p.key in pos)
        prf_figure(model.readout, first).savefig(recipe.out / f"prf_{stage}.png", dpi=100)
    check = recipe.dir("dark") / "experts_vs_whole.json"
    if check.exists():
        rows = json.loads(check.read_text())
        out["experts_beat_whole"] = {"wins": sum(r["wins"] for r in rows), "experts": len(rows),
                                     "losers": [f"{r['partition']}/{r['roi']} ({r['pair']})"
                                                for r in rows if not r["wins"]]}
    atomic_write(recipe.out / "summary.json", json.dumps(out, indent=2))
    _log("summary -> " + str(recipe.out / "summary.json"))
    print(json.dumps(out, indent=2))
    return out


def main_afo(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="brainenc afo", description=(
        "Run the All-for-One recipe: whole-brain model, partitions, ROI experts, dark-knowledge "
        "targets, distilled student. Finished stages are skipped; interrupted fits resume."))
    ap.add_argument("-c", "--config", required=True, type=Path, help="recipe YAML (see experiments/afo/)")
    ap.add_argument("--out", default=None, help="override the recipe's output directory")
    ap.add_argument("--only-stage", choices=STAGES, default=None, help="run only this stage")
    ap.add_argument("--only-expert", default=None, metavar="PARTITION",
                    help="train only this partition's experts (in <out>/experts-PARTITION; set "
                         "stages.experts.separate: true so the dark stage uses the per-partition runs)")
    ap.add_argument("--summary", action="store_true",
                    help="after the stages, write <out>/summary.json: per-ROI r/oracle, student vs whole "
                         "(Wilcoxon), pRF-centre recovery (simbrain truth)")
    a = ap.parse_args(argv)
    recipe = load_recipe(a.config)
    if a.out:
        recipe["out"] = a.out
    r = AFORecipe(recipe)
    r.run(a.only_stage, a.only_expert)
    if a.summary:
        summarise(r)
    return 0


if __name__ == "__main__":
    sys.exit(main_afo(sys.argv[1:]))

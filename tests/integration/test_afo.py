"""The All-for-One recipe end to end on the tiny simbrain: every stage runs, re-runs skip, and an
interrupted stage resumes from its last checkpoint.

Stages are real ``python -m brainenc.cli fit/test`` subprocesses (a few batches each), so this
file is dominated by process start-up; one subject keeps it small.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from brainenc.data.store import Store
from brainenc.recipes.afo import STAGES, AFORecipe, load_recipe

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def afo(tmp_path_factory, tiny_brain):
    tmp = tmp_path_factory.mktemp("afo")
    paths = tiny_brain  # the session's tiny simbrain, read only
    extra = tmp / "extra"
    extra.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(extra / f"img{i}.png")
    recipe = load_recipe(ROOT / "experiments/smoke/afo.yaml")
    recipe["base"]["data"]["stores"] = [str(paths["simbrain7t"])]
    recipe["out"] = str(tmp / "run")
    recipe["cli_args"] = [*recipe["cli_args"], "--data.subjects=[subj01]", "--trainer.logger=false"]
    # extra dark-knowledge images: a folder of photos and another dataset's stimuli
    recipe["stages"]["dark"]["extra_images"] = [str(extra), str(paths["simbrain3t"])]
    AFORecipe(copy.deepcopy(recipe)).run()
    return recipe, Path(recipe["out"]), Store(paths["simbrain7t"])


def test_every_stage_runs_and_writes_its_outputs(afo):
    recipe, out, store = afo
    for stage in ("whole", "experts", "student"):
        df = pd.read_csv(out / stage / "results" / "voxels.csv")
        assert set(df["subject"]) == {"subj01"} and len(df) == store.subject("subj01").n_voxels
        assert df["model"].iloc[0] == f"afo-{stage}"
    parts = yaml.safe_load((out / "partitions" / "partitions.json").read_text())
    assert set(parts) == {"atlas_simbrain", "kmeans3", "random0"}
    for p in parts.values():
        assert sum(p["voxels_per_roi"]) == store.subject("subj01").n_voxels


def test_dark_targets_cover_the_training_images_and_extras(afo):
    recipe, out, store = afo
    from brainenc.data.datamodule import BrainDataModule

    dm = BrainDataModule([str(store.root)], subjects=["subj01"], image_size=32)
    dm.setup()
    pair = dm.pairs[0]
    n_vox = pair.info.n_voxels
    with h5py.File(out / "dark" / "dark_targets.h5", "r") as f:
        g = f["pairs/simbrain7t__subj01"]
        np.testing.assert_array_equal(g["stimulus"][()], np.sort(pair.split.train))
        assert g["pred"].shape == (len(pair.split.train), n_vox)
        assert np.isfinite(g["pred"][()]).all() and g["pred"][()].std() > 0
        n3t = Store(Path(store.root).parent / "simbrain3t").n_stimuli
        stores = [Path(p) for p in json.loads(f["extra"].attrs["stores"])]
        assert [p.name for p in stores] == ["extra_images", "simbrain3t"]
        np.testing.assert_array_equal(f["extra/source"][()], np.r_[np.zeros(3), np.ones(n3t)])
        np.testing.assert_array_equal(f["extra/row"][()], np.r_[np.arange(3), np.arange(n3t)])
        x = f["extra/pred/simbrain7t__subj01"][()]
        assert x.shape == (3 + n3t, n_vox) and np.isfinite(x).all() and x.std() > 0
        assert f.attrs["n_partitions"] == 3
    # the folder's photos became a subject-less store (so the feature cache can hold them)
    folder = Store(stores[0])
    assert folder.n_stimuli == 3 and folder.subjects == []
    # every expert was checked against the whole-brain model inside its ROI
    report = json.loads((out / "dark" / "experts_vs_whole.json").read_text())
    parts = yaml.safe_load((out / "partitions" / "partitions.json").read_text())
    assert {r["partition"] for r in report} == set(parts)
    for r in report:
        assert set(r) >= {"roi", "n_voxels", "r_expert", "r_whole", "wins"}
        assert r["wins"] == (r["r_expert"] > r["r_whole"])
    cfg = yaml.safe_load((out / "student" / "stage.yaml").read_text())
    assert cfg["model"]["class_path"] == "brainenc.lit.distill.DistillModule"
    # the experts were warm-started from the whole-brain model, with its architecture
    ecfg = yaml.safe_load((out / "experts" / "stage.yaml").read_text())["model"]["init_args"]["readout"]
    assert ecfg["init_args"]["init_from"].endswith("whole/checkpoints/best.ckpt")
    base = recipe["base"]["model"]["init_args"]["readout"]["init_args"]
    assert {k: ecfg["init_args"]["expert"][k] for k in base} == base
    assert cfg["model"]["init_args"]["dark_targets"].endswith("dark/dark_targets.h5")


def test_summary_reports_student_vs_whole_expert_checks_and_prf_recovery(afo):
    from brainenc.recipes.afo import summarise

    recipe, out, store = afo
    doc = summarise(AFORecipe(copy.deepcopy(recipe)))
    n = store.subject("subj01").n_voxels
    allv = doc["student_vs_whole"]["all"]
    assert allv["n_voxels"] == n and 0 <= allv["frac_student_better"] <= 1
    assert 0 < allv["wilcoxon_p_greater"] <= 1
    assert doc["student_vs_whole"]["signal"]["n_voxels"] < n
    checked = json.loads((out / "dark" / "experts_vs_whole.json").read_text())
    assert doc["experts_beat_whole"]["experts"] == len(checked)
    assert doc["experts_beat_whole"]["wins"] + len(doc["experts_beat_whole"]["losers"]) == len(checked)
    prf = doc["positions_V1_V3"]["simbrain7t/subj01"]
    assert prf["n"] > 0 and -1 <= prf["r_x"] <= 1
    assert (out / "prf_student.png").stat().st_size > 10_000
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(doc))


def test_rerun_skips_finished_stages(afo, capsys):
    recipe, out, _ = afo
    mtimes = {s: (out / s / "results" / "voxels.csv").stat().st_mtime for s in ("whole", "experts", "student")}
    capsys.readouterr()
    AFORecipe(copy.deepcopy(recipe)).run()
    log = capsys.readouterr().out
    for stage in STAGES:
        assert f"{stage}: finished, skipped" in log
    assert "$ brainenc" not in log
    for s, t in mtimes.items():
        assert (out / s / "results" / "voxels.csv").stat().st_mtime == t


def test_interrupted_stage_resumes_from_last_checkpoint(afo, capsys):
    recipe, out, _ = afo
    whole = out / "whole"
    last = whole / "checkpoints" / "last.ckpt"
    first = torch.load(last, map_location="cpu", weights_only=False)
    assert first["epoch"] == 0  # max_epochs 1
    # an interruption after the first epoch: checkpoint present, no results, no fit marker
    (whole / "results" / "voxels.csv").unlink()
    (whole / "run_state.json").unlink()
    r = copy.deepcopy(recipe)
    r["stages"]["whole"]["max_epochs"] = 2
    capsys.readouterr()
    AFORecipe(r).run(only_stage="whole")
    log = capsys.readouterr().out
    assert "whole: resuming from" in log and "--ckpt_path" in log
    second = torch.load(last, map_location="cpu", weights_only=False)
    assert second["epoch"] == 1
    # continued, not restarted: exactly one more epoch of (limit_train_batches=3) steps
    assert second["global_step"] == first["global_step"] + 3
    assert (whole / "results" / "voxels.csv").exists()


@pytest.mark.slow
def test_experts_launched_separately_feed_the_dark_stage(afo, tmp_path):
    """A cluster runs one process per partition (`--only-expert P` with `separate: true`); the
    dark stage then stitches and averages the per-partition runs."""
    import shutil

    recipe, out, store = afo
    rec = copy.deepcopy(recipe)
    rec["out"] = str(tmp_path / "run")
    rec["stages"]["experts"]["separate"] = True
    rec["stages"]["dark"]["extra_images"] = []
    for stage in ("whole", "partitions"):  # reuse the finished stages
        shutil.copytree(out / stage, tmp_path / "run" / stage)
    r = AFORecipe(rec)
    names = r.partition_names()
    assert len(names) == 3
    for name in names:  # what each array task runs
        r.run(only_expert=name)
    for name in names:
        results = pd.read_csv(tmp_path / "run" / f"experts-{name}" / "results" / "voxels.csv")
        assert len(results) == store.subject("subj01").n_voxels
    with pytest.raises(ValueError, match=r"--only-expert.*expected a partition of .*partitions.h5.*found .nope."):
        r.run(only_expert="nope")
    r.dark()
    with h5py.File(tmp_path / "run" / "dark" / "dark_targets.h5", "r") as f:
        joint = h5py.File(out / "dark" / "dark_targets.h5", "r")
        assert f.attrs["n_partitions"] == 3
        assert f["pairs/simbrain7t__subj01/pred"].shape == joint["pairs/simbrain7t__subj01/pred"].shape
        np.testing.assert_array_equal(f["pairs/simbrain7t__subj01/stimulus"][()],
                                      joint["pairs/simbrain7t__subj01/stimulus"][()])
        joint.close()


@pytest.mark.slow
def test_experts_with_their_own_lora_adapters_run_and_feed_the_dark_stage(afo, tmp_path):
    """`stages.experts.init_args.expert_adapters` with a LoRA ViT: one adapter per expert."""
    import shutil

    recipe, out, store = afo
    rec = copy.deepcopy(recipe)
    rec["out"] = str(tmp_path / "run")
    rec["stages"]["dark"]["extra_images"] = []
    # another backbone than the whole-brain model's, so the experts cannot copy it: cold start
    rec["stages"]["experts"]["init"] = "scratch"
    rec["stages"]["experts"]["expert"] = {"width": 4, "hidden": 16, "n_freq": 3}
    rec["stages"]["experts"]["init_args"] = {
        "expert_adapters": True,
        "backbone": {"class_path": "brainenc.models.backbones.Backbone",
                     "init_args": {"name": "test_vit", "trainable": "lora"}}}  # image size: the data's
    for stage in ("whole", "partitions"):  # reuse the finished stages
        shutil.copytree(out / stage, tmp_path / "run" / stage)
    r = AFORecipe(rec)
    r.run(only_stage="experts")
    r.run(only_stage="dark")
    experts = tmp_path / "run" / "experts"
    results = pd.read_csv(experts / "results" / "voxels.csv")
    assert len(results) == store.subject("subj01").n_voxels and results["pearson"].notna().all()
    state = torch.load(experts / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    n_experts = len({k.split(".")[2] for k in state if k.startswith("readout.experts.")})
    lora_a = [v for k, v in state.items() if k.endswith(".lora_A")]
    assert lora_a and all(v.shape[0] == n_experts for v in lora_a)
    with h5py.File(tmp_path / "run" / "dark" / "dark_targets.h5", "r") as f:
        assert np.isfinite(f["pairs/simbrain7t__subj01/pred"][()]).all()

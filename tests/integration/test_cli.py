"""The CLI end to end on the tiny simbrain: fit, test, results table, compare; help and print_config."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from brainenc.cli import main
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SMOKE = REPO / "experiments" / "smoke"


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in ("fit", "test", "simulate", "prepare", "report", "sweep", "afo", "transfer", "insilico",
                "algonauts-submission"):
        assert f"  {cmd}" in out
    # predict is not limited to the stores' test images: the help says how to give it new ones
    assert "--data.predict_images" in next(line for line in out.splitlines() if line.startswith("  predict"))


def test_print_config_resolves_interpolation(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as e:  # the parser prints the config and exits
        main(["fit", "--print_config", "-c", str(REPO / "experiments/quickstart/linear.yaml")])
    assert e.value.code in (0, None)
    cfg = yaml.safe_load(capsys.readouterr().out)
    # the backbone's image size is linked from the data: one value, printed once
    assert cfg["data"]["image_size"] == 224
    assert "image_size" not in cfg["model"]["init_args"]["backbone"]["init_args"]
    assert cfg["trainer"]["callbacks"][0]["init_args"]["dirpath"] == "runs/quickstart/linear/checkpoints"


def test_image_size_is_linked_from_data_to_backbone(tiny_brain, tmp_path):
    from brainenc.cli import build_cli
    from tests.helpers import smoke_fit_args

    cli = build_cli(smoke_fit_args(tiny_brain, tmp_path / "run", "--data.image_size=40"), run=False,
                    save_config_callback=None)
    assert cli.datamodule.hparams.image_size == 40 and cli.model.backbone.image_size == 40
    # and the checkpoint's hyperparameters hold it, so load_from_checkpoint rebuilds the same backbone
    assert cli.model.hparams["backbone"]["init_args"]["image_size"] == 40


@pytest.mark.parametrize("where", ["config", "flag"])
def test_backbone_image_size_cannot_be_given(tiny_brain, tmp_path, where):
    """A linked argument given as well would be silently dropped by jsonargparse: refuse it."""
    from brainenc.errors import ConfigError
    from tests.helpers import smoke_fit_args

    if where == "config":
        cfg = yaml.safe_load((SMOKE / "linear.yaml").read_text())
        cfg["model"]["init_args"]["backbone"]["init_args"]["image_size"] = "${data.image_size}"
        (tmp_path / "old.yaml").write_text(yaml.safe_dump(cfg))
        extra, match = ["-c", str(tmp_path / "old.yaml")], r"old.yaml: model.init_args.backbone.init_args.image_size'"
    else:
        extra, match = ["--model.init_args.backbone.init_args.image_size=48"], r"linked from data.image_size.*'48'"
    with pytest.raises(ConfigError, match=match):
        main(["fit", *smoke_fit_args(tiny_brain, tmp_path / "run", *extra)])
    assert not (tmp_path / "run").exists()


def _fit_test(config, tmp_path, brain, run, extra=()):
    """``fit --test_after_fit`` (its results kept in ``results-one-process/``), then ``test`` of
    the best checkpoint in a new process, whose ``results/`` is returned: one fit serves the tests
    of both ways to test a run."""
    import shutil

    stores = f"[{brain['simbrain7t']},{brain['simbrain3t']}]"
    common = ["-c", str(config), f"--data.stores={stores}", "--data.simulate=null",
              f"--trainer.default_root_dir={tmp_path / run}", *extra]
    main(["fit", *common, "--test_after_fit=true"])
    shutil.copytree(tmp_path / run / "results", tmp_path / run / "results-one-process")
    ckpt = tmp_path / run / "checkpoints" / "best.ckpt"
    assert ckpt.exists()
    main(["test", *common, f"--ckpt_path={ckpt}"])
    return tmp_path / run / "results"


@pytest.fixture(scope="module")
def runs(tiny_brain, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    return {"linear": _fit_test(SMOKE / "linear.yaml", tmp, tiny_brain, "linear"),
            "ridge": _fit_test(SMOKE / "ridge.yaml", tmp, tiny_brain, "ridge")}


def test_a_tested_run_is_rebuilt_from_its_saved_config_with_its_best_weights(runs):
    """The config `brainenc test` saved (with its own ckpt_path/verbose) rebuilds the model; the
    weights are the run's best checkpoint (best before last: rundir.find_checkpoint)."""
    import torch

    from brainenc.cli import load_trained
    from brainenc.lit.checkpoint import load_state_dict

    run = runs["linear"].parent  # the fixture gives the results directory
    saved = yaml.safe_load((run / "results" / "config.yaml").read_text())
    assert "ckpt_path" in saved
    model, dm = load_trained(run, run / "results" / "config.yaml")
    assert model.backbone.image_size == dm.hparams.image_size == saved["data"]["image_size"]
    best = load_state_dict(run / "checkpoints" / "best.ckpt")
    assert all(torch.equal(v, best[k]) for k, v in model.state_dict().items() if k in best)
    assert not model.training


def test_a_config_saved_before_the_image_size_link_still_rebuilds_its_run(runs, tmp_path):
    """Runs saved before data.image_size was linked repeat it in the backbone: the same value
    is accepted (the link gives it anyway), a different one is refused with the field named."""
    from brainenc.cli import instantiate
    from brainenc.errors import ConfigError

    run = runs["linear"].parent
    saved = yaml.safe_load((run / "results" / "config.yaml").read_text())
    size = saved["data"]["image_size"]
    saved["model"]["init_args"]["backbone"]["init_args"]["image_size"] = size
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(saved))
    model, dm = instantiate(tmp_path / "old.yaml")
    assert model.backbone.image_size == dm.hparams.image_size == size
    saved["model"]["init_args"]["backbone"]["init_args"]["image_size"] = size + 8
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(ConfigError, match="image_size"):
        instantiate(tmp_path / "other.yaml")


@pytest.mark.parametrize("model", ["linear", "ridge"])
def test_fit_test_writes_results_for_every_voxel(runs, tiny_brain, model):
    from brainenc.data.store import Store

    res = runs[model]
    df = pd.read_csv(res / "voxels.csv")
    expected = sum(Store(p).subject(s).n_voxels for p in tiny_brain.values() for s in Store(p).subjects)
    assert len(df) == expected
    assert set(df["model"]) == {model} and set(df["backbone"]) == {"test_efficientnet"}
    assert set(df["dataset"]) == {"simbrain7t", "simbrain3t"}
    summary = json.loads((res / "summary.json").read_text())
    assert len(summary["retrieval"]) == 4
    for r in summary["retrieval"].values():
        assert 0 <= r["top1"] <= r["top5"] <= 1 and r["chance_top1"] == pytest.approx(1 / r["n_images"])
    cfg = yaml.safe_load((res / "config.yaml").read_text())
    assert cfg["model"]["init_args"]["model_name"] == model
    # ground truth is known: voxels with signal must beat pure-noise voxels
    signal = df[df["roi"].isin(["V1", "V2", "V3", "hV4", "PPA"])]["pearson"].median()
    noise = df[df["roi"] == "none"]["pearson"].median()
    assert signal > noise + 0.1
    # the noise ceiling follows the NSD formula from the stored ncsnr and the three test repeats
    assert (df["n_repeats"] == 3).all()
    ok = df["noise_ceiling"].notna()
    assert ok.any() and (df.loc[ok, "noise_ceiling"].between(0, 100)).all()


@pytest.mark.parametrize("model", ["linear", "ridge"])
def test_fit_with_test_after_fit_equals_fit_then_test(runs, model):
    """One process (`fit --test_after_fit=true`) tests the same best checkpoint as `test` later."""
    one_process = runs[model].parent / "results-one-process"
    one = pd.read_csv(one_process / "voxels.csv")
    two = pd.read_csv(runs[model] / "voxels.csv")
    np.testing.assert_allclose(one["pearson"], two["pearson"], atol=1e-6)
    cfg = yaml.safe_load((one_process / "config.yaml").read_text())
    assert cfg["test_after_fit"] is True and cfg["model"]["init_args"]["model_name"] == model


def test_ridge_chooses_alphas_and_beats_gradient_linear_on_tiny(runs):
    lin = pd.read_csv(runs["linear"] / "voxels.csv")
    rid = pd.read_csv(runs["ridge"] / "voxels.csv")
    assert np.isfinite(rid["pearson"]).mean() > 0.9
    # both are linear maps on the same pooled features; the closed form with CV should not lose
    # to two epochs of SGD by much on any dataset
    for ds in ("simbrain7t", "simbrain3t"):
        assert rid[rid.dataset == ds]["pearson"].median() > lin[lin.dataset == ds]["pearson"].median() - 0.1


def test_compare_prints_roi_table(runs, capsys):
    assert main(["compare", str(runs["linear"].parent), str(runs["ridge"].parent), "--metric", "pearson,frac_oracle"]) == 0
    out = capsys.readouterr().out
    assert "linear" in out and "ridge" in out and "V1" in out and "median r / oracle r" in out
    # the ROIs of a fitted run in simbrain's atlas order, not alphabetically
    rois = [line.split()[0] for line in out.split("\n\n")[0].splitlines()[3:]]
    assert rois[:6] == ["V1", "V2", "V3", "hV4", "FFA", "PPA"], out


def test_validate_store_command(tiny_brain, capsys):
    assert main(["validate-store", str(tiny_brain["simbrain7t"])]) == 0
    assert "subj01" in capsys.readouterr().out


def test_predict_writes_one_file_per_pair(runs, tiny_brain):
    import h5py

    run = runs["linear"].parent
    stores = f"[{tiny_brain['simbrain7t']},{tiny_brain['simbrain3t']}]"
    main(["predict", "-c", str(SMOKE / "linear.yaml"), f"--data.stores={stores}", "--data.simulate=null",
          f"--trainer.default_root_dir={run}", f"--ckpt_path={run / 'checkpoints' / 'best.ckpt'}"])
    files = sorted((run / "predictions").glob("*.h5"))
    assert [f.stem for f in files] == sorted(["simbrain7t__subj01", "simbrain7t__subj02",
                                              "simbrain3t__subj01", "simbrain3t__subj02"])
    test = pd.read_csv(runs["linear"] / "voxels.csv")
    with h5py.File(files[0]) as f:
        # the test images of simbrain3t/subj01, each once, with their ids
        assert f["pred"].shape[0] == len(f["stimulus"]) == len(set(f["stimulus"][:].tolist())) > 0
        assert all(i.decode().startswith("sim-") for i in f["stimulus_id"][:])
        assert np.isfinite(f["pred"][:]).all()
        assert f["pred"].shape[1] == int(((test.dataset == "simbrain3t") & (test.subject == "subj01")).sum())


FIT_CONFIGS = sorted(str(p.relative_to(REPO)) for d in ("smoke", "quickstart", "universal")
                     for p in (REPO / "experiments" / d).glob("*.yaml")
                     if p.name not in ("afo.yaml", "holdout.yaml", "probe.yaml", "real.yaml"))
OVERLAYS = [("experiments/universal/quickstart_crowd.yaml", f"experiments/universal/{o}.yaml")
            for o in ("holdout", "probe", "real")] + [
    ("experiments/smoke/linear.yaml", str(p.relative_to(REPO))) for p in sorted((REPO / "experiments/ddp").glob("*.yaml"))]


@pytest.mark.parametrize("configs", [(c,) for c in FIT_CONFIGS] + OVERLAYS, ids=lambda c: "+".join(c))
def test_every_experiment_config_parses(configs, capsys, monkeypatch):
    """Every shipped fit config (and overlay) resolves: a broken class path, key or interpolation fails here."""
    monkeypatch.chdir(REPO)
    args = ["fit", "--print_config"]
    for c in configs:
        args += ["-c", c]
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code in (0, None)
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["model"]["class_path"].startswith("brainenc.lit.")
    assert cfg["data"]["stores"] and cfg["trainer"]["default_root_dir"]


@pytest.mark.parametrize("recipe", sorted(str(p.relative_to(REPO)) for p in (REPO / "experiments").rglob("afo*.yaml"))
                         + sorted(str(p.relative_to(REPO)) for p in (REPO / "experiments/afo").glob("*.yaml")))
def test_every_afo_recipe_loads(recipe):
    from brainenc.recipes.afo import load_recipe

    r = load_recipe(REPO / recipe)
    assert r["base"]["model"]["init_args"]["readout"]["class_path"].endswith("RetinotopicReadout")
    assert set(r["stages"]) <= {"whole", "experts", "dark", "student"}


def test_spatial_banded_pca_ridge_round_trips_through_the_cli(tiny_brain, tmp_path):
    """The spatial options parse from the command line, their fitted PCA components travel in the
    checkpoint (`test --ckpt_path` rebuilds the readout from hparams), and `test` reproduces the
    in-process test of `fit --test_after_fit`."""
    import torch

    extra = ["--model.init_args.grid=2", "--model.init_args.reduce=pca", "--model.init_args.n_components=8",
             "--model.init_args.banded=true", "--model.init_args.banded_iter=5"]
    res = _fit_test(SMOKE / "ridge.yaml", tmp_path, tiny_brain, "spatial", extra)
    ckpt = torch.load(tmp_path / "spatial" / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    proj = ckpt["state_dict"]["readout.proj_0"]
    assert proj.shape == (24 * 4, 8) and proj.abs().sum() > 0  # fitted, not the zero placeholder
    df = pd.read_csv(res / "voxels.csv")
    signal = df[df["roi"].isin(["V1", "V2", "V3", "hV4", "PPA"])]["pearson"].median()
    assert signal > df[df["roi"] == "none"]["pearson"].median() + 0.1
    one = pd.read_csv(tmp_path / "spatial" / "results-one-process" / "voxels.csv")
    np.testing.assert_allclose(one["pearson"], df["pearson"], atol=1e-6)


def test_cache_fill_precomputes_every_stimulus_at_the_linked_image_size(tiny_brain, tmp_path, monkeypatch, capsys):
    import h5py

    from tests.helpers import smoke_fit_args

    monkeypatch.setenv("BRAINENC_CACHE", str(tmp_path / "cache"))
    assert main(["cache", "fill", *smoke_fit_args(tiny_brain, tmp_path / "run", "--data.image_size=24")]) == 0
    files = sorted((tmp_path / "cache" / "features").glob("*.h5"))
    assert len(files) == 1 and "_24px_" in files[0].name
    with h5py.File(files[0], "r") as f:
        assert f["filled"][:].all() and f.attrs["image_size"] == 24
    assert str(files[0]) in capsys.readouterr().out
    assert main(["cache"]) == 2 and "usage: brainenc cache fill" in capsys.readouterr().out

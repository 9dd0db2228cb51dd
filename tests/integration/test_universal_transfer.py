"""Universal encoder end to end on the tiny simbrain: crowd fit/test on both datasets,
transfer to a held-out subject (base weights bit-identical), embedding clusters with ARI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from brainenc.cli import main as brainenc

CFG = str(Path(__file__).resolve().parents[2] / "experiments" / "smoke" / "universal.yaml")
HELD_OUT = "simbrain7t/subj02"
BASE_PAIRS = ["simbrain7t/subj01", "simbrain3t/subj01", "simbrain3t/subj02"]
FAST = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


@pytest.fixture(scope="module")
def stores(tiny_brain):
    return [str(tiny_brain["simbrain7t"]), str(tiny_brain["simbrain3t"])]


def _fit_test(stores, run: Path, subjects=None) -> Path:
    args = ["-c", CFG, "--data.stores", json.dumps(stores), "--trainer.default_root_dir", str(run), *FAST]
    if subjects:
        args += ["--data.subjects", json.dumps(subjects)]
    assert brainenc(["fit", *args]) == 0
    ckpt = run / "checkpoints" / "last.ckpt"
    assert ckpt.exists()
    assert brainenc(["test", *args, "--ckpt_path", str(ckpt)]) == 0
    return ckpt


@pytest.fixture(scope="module")
def crowd(stores, tmp_path_factory):
    """A crowd run on both tiny datasets, one 7T-like subject held out for transfer."""
    run = tmp_path_factory.mktemp("crowd")
    return run, _fit_test(stores, run, BASE_PAIRS)


def test_crowd_fit_test_writes_all_pairs_and_clusters(crowd):
    from brainenc.analysis.embeddings import cluster_run

    run, _ = crowd
    df = pd.read_csv(run / "results" / "voxels.csv")
    pairs = set(df["dataset"] + "/" + df["subject"])
    assert pairs == set(BASE_PAIRS)
    assert len(df) == 480 + 360 + 300 and df["pearson"].notna().all()
    summary = json.loads((run / "results" / "summary.json").read_text())
    assert set(summary["retrieval"]) == pairs

    res = cluster_run(run, n_clusters=7)
    df2 = pd.read_csv(run / "results" / "voxels.csv")
    assert len(df2) == len(df) and df2["cluster"].between(0, 6).all()
    np.testing.assert_array_equal(df2["pearson"], df["pearson"])
    assert set(res["ari"]) == pairs | {"pooled"} and -1 <= res["ari"]["pooled"]["ari"] <= 1
    saved = json.loads((run / "results" / "clusters.json").read_text())
    assert saved["n_clusters"] == 7 and saved["control"] == "position"
    # both clusterings are scored; the written one is the position-controlled clustering
    assert saved["position_controlled"]["ari"]["ari"] == pytest.approx(res["ari"]["pooled"]["ari"])
    assert -1 <= saved["uncontrolled"]["ari"]["ari"] <= 1
    # the supervised reference reads the true types from embeddings and from measured responses;
    # the tiny store's responses carry its types well above chance
    info = saved["type_information"]
    assert set(info["embeddings"]) == set(info["responses"]) == pairs | {"pooled"}
    assert info["responses"]["pooled"]["ari"] > 0.2


def test_embedding_probe_logs_position_controlled_scores_during_fit(stores, tmp_path):
    """The probe overlay scores the embeddings after each validation, the position-controlled
    clustering (the analysis' default) included, from the model's own receptive-field centres."""
    probe = str(Path(CFG).parents[1] / "universal" / "probe.yaml")
    run = tmp_path / "probe"
    assert brainenc(["fit", "-c", CFG, "-c", probe, "--data.stores", json.dumps(stores),
                     "--trainer.default_root_dir", str(run), *FAST]) == 0
    metrics = pd.concat(pd.read_csv(f) for f in run.glob("logs/*/metrics.csv"))
    for name, lo in (("embed/ari", -1), ("embed/ari_position_controlled", -1),
                     ("embed/nn_same_roi", 0), ("embed/nn_same_roi_position_controlled", 0)):
        v = metrics[name].dropna()
        assert len(v) == 1 and lo <= v.iloc[0] <= 1, name


def test_transfer_trains_only_new_embeddings(stores, crowd, tmp_path, caplog):
    import warnings

    from brainenc.recipes.transfer import load_base, transfer

    _, ckpt = crowd
    reference = {k: v.clone() for k, v in load_base(ckpt).state_dict().items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary, model = transfer(ckpt, stores, HELD_OUT, tmp_path, n_images=40, init="coords", epochs=1,
                                  batch_size=16, limit_val_batches=1, return_model=True)
    # the console of `brainenc fit`: no Lightning tip, _pytree deprecation or eval-mode warning
    # about the base it freezes on purpose
    noise = [str(w.message) for w in caught if any(n in str(w.message) for n in ("LeafSpec", "eval mode"))]
    assert not noise and "Tip:" not in caplog.text, noise
    state = model.state_dict()
    base_keys = [k for k in reference if k.startswith(("backbone.", "readout."))]
    assert len(base_keys) > 20
    for k in base_keys:  # bit-identical, buffers included
        assert torch.equal(state[k], reference[k]), k
    new = model.readout.new_embedding["simbrain7t__subj02"]
    assert new.shape == (400, 32)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["readout.new_embedding.simbrain7t__subj02"]
    saved = torch.load(tmp_path / "transfer" / "embeddings.pt", weights_only=True)[HELD_OUT]
    assert torch.equal(saved, new.detach())
    assert summary["n_train_images"] == 40 and summary["base_unchanged"]
    # the new rows live at the base table's scale: by default they train at the base's rate
    assert summary["lr"] == pytest.approx(load_base(ckpt).lr) and model.lr == summary["lr"]
    df = pd.read_csv(tmp_path / "results" / "voxels.csv")
    assert set(df["dataset"] + "/" + df["subject"]) == {HELD_OUT} and len(df) == 400


def test_transfer_cli_refuses_a_pair_of_the_base(stores, crowd, tmp_path):
    run, _ = crowd
    with pytest.raises(ValueError, match="already in the base model"):
        brainenc(["transfer", "--base", str(run), "--store", stores[1], "--subject", "simbrain3t/subj01",
                  "--out", str(tmp_path)])


def test_transfer_to_a_pair_of_the_base_is_one_line_on_the_command_line(stores, crowd, tmp_path, capsys):
    from brainenc.cli import console_main

    run, _ = crowd
    rc = console_main(["transfer", "--base", str(run), "--store", stores[1], "--subject", "simbrain3t/subj01",
                       "--out", str(tmp_path / "t")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("brainenc: error: transfer: --subject 'simbrain3t/subj01' is "
                                          "already in the base model"), err
    assert "choose another subject" in err[-1] and not (tmp_path / "t" / "results").exists()

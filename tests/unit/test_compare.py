"""``brainenc compare``: one narrow table by default (fits 100 columns for four runs), ROIs in
the store's atlas order; ``--metric`` and ``--wide`` for the rest."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from brainenc.cli import main

#: simbrain's atlas (label value -> name): alphabetical order would put FFA and PPA first
ATLAS = ["V1", "V2", "V3", "hV4", "FFA", "PPA"]


def _run(root, model, seed, with_order=True):
    """A tested run directory of one subject: 60 voxels over the atlas's ROIs plus unlabelled ones."""
    rng = np.random.default_rng(seed)
    rois = [*ATLAS, "none"]
    n = 70
    oracle = rng.uniform(0.3, 0.9, n)
    df = pd.DataFrame({
        "run": model, "model": model, "backbone": "test_efficientnet", "seed": 0, "dataset": "simbrain7t",
        "subject": "subj01", "voxel": np.arange(n), "roi": [rois[i % len(rois)] for i in range(n)],
        "x": 0.0, "y": 0.0, "z": 0.0, "space": "simbrain-flat", "pearson": oracle * rng.uniform(0.5, 1, n),
        "noise_ceiling": 50.0, "normalised": 40.0, "oracle": oracle})
    df["oracle"] = np.random.default_rng(0).uniform(0.3, 0.9, n)  # the same voxels' oracle in every run
    run = root / model
    (run / "results").mkdir(parents=True)
    df.to_csv(run / "results" / "voxels.csv", index=False)
    summary = {"run": model, "model": model}
    if with_order:
        summary["roi_order"] = {"simbrain7t/subj01": ATLAS}
    (run / "results" / "summary.json").write_text(json.dumps(summary))
    return run, df


MODELS = ["ridge_spatial", "afo-whole", "afo-student", "universal_with_a_long_name"]


def _rows(out: str) -> list[str]:
    return [line.split()[0] for line in out.splitlines()[3:] if line.strip()]


def test_compare_of_four_runs_fits_100_columns_with_rois_in_atlas_order(tmp_path, capsys):
    runs = [_run(tmp_path, m, i) for i, m in enumerate(MODELS)]
    assert main(["compare", *[str(r) for r, _ in runs]]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert max(map(len, lines)) <= 100, out
    assert lines[0] == "median Pearson r:"
    header = lines[1].split()
    assert header == ["n", "oracle", *MODELS]  # models in the order given
    assert _rows(out) == [*ATLAS, "none"]  # not FFA, PPA, V1, ...
    v1 = runs[1][1][runs[1][1]["roi"] == "V1"]
    assert f"{v1['pearson'].median():.3f}" in next(line for line in lines if line.startswith("V1"))


def test_compare_metric_and_wide(tmp_path, capsys):
    runs = [str(_run(tmp_path, m, i)[0]) for i, m in enumerate(MODELS)]
    assert main(["compare", *runs, "--metric", "frac_oracle,n_voxels"]) == 0
    out = capsys.readouterr().out
    assert "median r / oracle r" in out and "\nvoxels:" in out and max(map(len, out.splitlines())) <= 100
    assert main(["compare", *runs, "--wide"]) == 0
    wide = capsys.readouterr().out
    assert max(map(len, wide.splitlines())) > 100  # every metric of every model on one line
    for col in ("pearson", "normalised", "oracle", "frac_oracle", "n_voxels"):
        assert col in wide
    with pytest.raises(SystemExit):
        main(["compare", *runs, "--metric", "spearman"])
    assert "expected one or more of pearson" in capsys.readouterr().err


def test_rois_fall_back_to_alphabetical_without_an_atlas_order(tmp_path, capsys):
    run, _ = _run(tmp_path, "old", 0, with_order=False)
    assert main(["compare", str(run)]) == 0
    assert _rows(capsys.readouterr().out) == ["FFA", "PPA", "V1", "V2", "V3", "hV4", "none"]


def test_the_quickstart_runs_compare_in_its_own_process_and_times_it(tmp_path, capsys, monkeypatch):
    """A step that trains nothing needs no child (no second start-up); its time is recorded; bad
    input ends the quickstart with the one-line message and exit code 2, not a traceback."""
    from brainenc import quickstart

    monkeypatch.setattr(quickstart, "STEPS", [])
    runs = [str(_run(tmp_path, m, i)[0]) for i, m in enumerate(MODELS[:2])]
    quickstart.brainenc("compare", *runs, "--metric", "pearson,frac_oracle")
    out = capsys.readouterr().out
    assert "$ brainenc compare" in out and "median Pearson r:" in out and "median r / oracle r" in out
    assert [name for name, _ in quickstart.STEPS] == ["compare"]
    with pytest.raises(SystemExit) as e:
        quickstart.brainenc("compare", str(tmp_path / "missing"))
    assert e.value.code == 2 and "voxels.csv: file not found" in capsys.readouterr().err

"""``brainenc sweep`` on the tiny simbrain: dry run, print-commands, a real small grid with a
failing cell, resuming, ``--cell K``.

The real grid is (test_efficientnet, no_such_timm_model, test_resnet) x ridge, one epoch: the
broken backbone sits between two good ones, so the test sees a cell finish *after* a failure.
Every cell is two `python -m brainenc.cli` processes, so the run tests share one sweep directory
(module fixture) and spawn as few processes as the checks allow.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest
import yaml

from brainenc.sweep import SweepError, load_sweep, main_sweep

REPO = Path(__file__).resolve().parents[2]
SMOKE_SWEEP = REPO / "experiments" / "sweeps" / "smoke.yaml"


def _sweep_file(tmp: Path, brain: dict, backbones: list, encoders=("ridge",), name="sweep.yaml") -> Path:
    """smoke.yaml pointed at the session's tiny stores, with absolute config paths."""
    cfg = yaml.safe_load(SMOKE_SWEEP.read_text())
    cfg["out"] = str(tmp / "out")
    cfg["backbones"] = backbones
    cfg["encoders"] = [{"name": e, "config": str(REPO / "experiments" / "smoke" / f"{e}.yaml")} for e in encoders]
    cfg["datasets"] = [{"name": "tiny7t", "stores": [str(brain["simbrain7t"])], "simulate": None}]
    path = tmp / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# --------------------------------------------------------------------------- no processes


def test_dry_run_lists_cells_and_commands(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)  # the checked-in sweep names configs relative to the repository
    assert main_sweep(["-c", str(SMOKE_SWEEP), "--out", str(tmp_path / "o"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    expected = [f"simbrain-tiny/{e}/{b}/seed0" for e in ("ridge", "linear") for b in ("test_efficientnet", "test_resnet")]
    ids = [line.split()[1] for line in out.splitlines() if line.startswith("[")]
    assert ids == expected
    fits = [line for line in out.splitlines() if line.strip().startswith("fit:")]
    tests = [line for line in out.splitlines() if line.strip().startswith("test:")]
    assert len(fits) == len(tests) == 4
    for cell_id, fit, test in zip(expected, fits, tests):
        run_dir = tmp_path / "o" / cell_id
        assert " -m brainenc.cli fit -c experiments/smoke/" in fit
        assert f"-c {run_dir}/sweep_cell.yaml" in fit
        assert f"--trainer.default_root_dir={run_dir}" in fit and "--seed_everything=0" in fit
        assert "--trainer.max_epochs=1" in fit  # the sweep's overrides reach every cell
        assert f"--ckpt_path={run_dir}/checkpoints/best.ckpt" in test and " test " in test
    assert not (tmp_path / "o").exists()  # a dry run writes nothing


def test_print_commands_one_line_per_cell(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    assert main_sweep(["-c", str(SMOKE_SWEEP), "--out", str(tmp_path / "o"), "--print-commands"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4
    for line in lines:
        fit, test = line.split(" && ")
        assert " fit " in fit and " test " in test
    # the second -c of each line exists, so the lines run as printed (e.g. in a job array)
    overlay = yaml.safe_load((tmp_path / "o/simbrain-tiny/linear/test_resnet/seed0/sweep_cell.yaml").read_text())
    backbone = overlay["model"]["init_args"]["backbone"]["init_args"]
    assert backbone["name"] == "test_resnet" and backbone["weights"] is None
    assert overlay["data"] == {"stores": ["data/simbrain-tiny/simbrain7t"], "simulate": "tiny"}


def test_bad_sweep_files_name_the_field(tmp_path, tiny_brain):
    path = _sweep_file(tmp_path, tiny_brain, ["test_vit", "test_vit"])
    with pytest.raises(SweepError, match="backbones.*more than once.*label"):
        load_sweep(path)
    cfg = yaml.safe_load(path.read_text())
    cfg["seed"] = [1]
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SweepError, match=r"unknown top-level key\(s\) \['seed'\]"):
        load_sweep(path)
    assert main_sweep(["-c", str(path), "--dry-run"]) == 2


def test_interpolation_and_set(tmp_path, tiny_brain):
    path = _sweep_file(tmp_path, tiny_brain, [{"name": "test_vit", "label": "vit"}])
    cfg = yaml.safe_load(path.read_text())
    cfg["vars"] = {"root": str(tmp_path / "r")}
    cfg["out"] = "${vars.root}/sweep"
    path.write_text(yaml.safe_dump(cfg))
    sweep = load_sweep(path, sets=["seeds=[3, 4]", "vars.root=" + str(tmp_path / "elsewhere")])
    assert [c.run_dir for c in sweep.cells] == [tmp_path / "elsewhere/sweep/tiny7t/ridge/vit/seed3",
                                                tmp_path / "elsewhere/sweep/tiny7t/ridge/vit/seed4"]


def test_resume_decisions(tmp_path, tiny_brain, monkeypatch):
    """Which commands a cell runs, given what an earlier attempt left (no processes)."""
    import brainenc.sweep as sw

    sweep = load_sweep(_sweep_file(tmp_path, tiny_brain, ["test_efficientnet"]))
    cell = sweep.cells[0]
    calls = []

    def fake_step(step, argv, c):
        calls.append((step, [a for a in argv if a.startswith("--ckpt_path")]))
        if step == "test":
            c.voxels.parent.mkdir(parents=True, exist_ok=True)
            c.voxels.write_text("pearson\n0.5\n0.1\n")
        return 0, c.run_dir / "o", c.run_dir / "e"

    def ckpt(name):  # a complete file as far as resuming checks (a zip archive, as torch.save writes)
        import zipfile

        with zipfile.ZipFile(cell.ckpt_dir / name, "w") as z:
            z.writestr("data.pkl", b"x")

    monkeypatch.setattr(sw, "_run_step", fake_step)
    cell.ckpt_dir.mkdir(parents=True)
    ckpt("last.ckpt")
    state = sw.run_cell(sweep, cell)  # interrupted fit: resume it from last.ckpt
    assert calls == [("fit", [f"--ckpt_path={cell.ckpt_dir / 'last.ckpt'}"]),
                     ("test", [f"--ckpt_path={cell.ckpt_dir / 'last.ckpt'}"])]
    assert state["status"] == "done" and state["last_action"] == "resumed"
    assert state["median_pearson"] == pytest.approx(0.3)

    calls.clear()
    assert sw.run_cell(sweep, cell)["last_action"] == "skipped" and calls == []

    calls.clear()
    cell.voxels.unlink()  # fit finished but the test never wrote results: test only
    ckpt("best.ckpt")
    sw.run_cell(sweep, cell)
    assert calls == [("test", [f"--ckpt_path={cell.ckpt_dir / 'best.ckpt'}"])]


# --------------------------------------------------------------------------- real cells


# the tests below spawn real `brainenc fit`/`test` processes (about 2 CPU-minutes in all)
@pytest.fixture(scope="module")
def swept(tiny_brain, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    path = _sweep_file(tmp, tiny_brain, ["test_efficientnet", "no_such_timm_model", "test_resnet"])
    rc = main_sweep(["-c", str(path)])
    return {"path": path, "out": tmp / "out", "rc": rc, "sweep": load_sweep(path)}


def _status(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "sweep_status.csv").set_index("cell")


@pytest.mark.slow
def test_grid_runs_every_cell_and_records_the_failure(swept, tiny_brain):
    from brainenc.data.store import Store

    out, cells = swept["out"], swept["sweep"].cells
    assert swept["rc"] == 1  # a failed cell makes the sweep's exit code say so
    status = _status(out)
    assert list(status["status"]) == ["done", "failed", "done"]
    assert list(status["attempts"]) == [1, 1, 1]
    assert (status.loc[[0, 2], "wall_time_s"] > 0).all()
    assert status.loc[[0, 2], "median_pearson"].between(-1, 1).all()
    assert "no_such_timm_model" in status.loc[1, "error"]

    failed = cells[1].run_dir / "FAILED"
    text = failed.read_text()
    assert "step: fit" in text and str(cells[1].run_dir / "sweep_logs" / "fit.err") in text
    assert "no_such_timm_model" in text  # the stderr tail carries the actual error
    assert not cells[1].voxels.exists()

    n_voxels = sum(Store(tiny_brain["simbrain7t"]).subject(s).n_voxels
                   for s in Store(tiny_brain["simbrain7t"]).subjects)
    table = pd.read_csv(out / "all_voxels.csv")
    assert table.groupby("sweep_cell").size().to_dict() == {0: n_voxels, 2: n_voxels}
    assert set(table["sweep_backbone"]) == {"test_efficientnet", "test_resnet"}
    assert set(table["backbone"]) == {"test_efficientnet", "test_resnet"}  # the runs' own column agrees
    assert set(table["run"]) == {cells[0].id, cells[2].id}
    for c in (cells[0], cells[2]):
        per_cell = pd.read_csv(c.voxels)
        assert table.loc[table["sweep_cell"] == c.index, "pearson"].to_numpy() == pytest.approx(per_cell["pearson"])
        assert json.loads((c.run_dir / "results" / "summary.json").read_text())["seed"] == 0

    runs = pd.read_csv(out / "report" / "tables" / "runs.csv")
    assert sorted(runs["label"]) == ["ridge [test_efficientnet]", "ridge [test_resnet]"]
    assert set(runs["path"]) == {str(cells[0].run_dir), str(cells[2].run_dir)}
    assert (out / "report" / "report.html").exists()


@pytest.mark.slow
def test_rerun_skips_finished_cells(swept):
    out, cells = swept["out"], swept["sweep"].cells
    before = {c.index: c.voxels.stat().st_mtime_ns for c in (cells[0], cells[2])}
    assert main_sweep(["-c", str(swept["path"]), "--no-report"]) == 1  # the broken cell fails again
    status = _status(out)
    assert list(status["last_action"]) == ["skipped", "ran", "skipped"]
    assert list(status["attempts"]) == [1, 2, 1]  # only the failed cell was tried again
    assert {c.index: c.voxels.stat().st_mtime_ns for c in (cells[0], cells[2])} == before


@pytest.mark.slow
def test_cell_k_runs_only_that_cell(swept):
    out, cells = swept["out"], swept["sweep"].cells
    attempts = _status(out)["attempts"].to_dict()
    table_mtime = os.stat(out / "all_voxels.csv").st_mtime_ns
    assert main_sweep(["-c", str(swept["path"]), "--cell", "1"]) == 1
    after = _status(out)["attempts"].to_dict()
    assert after == {**attempts, 1: attempts[1] + 1}
    assert os.stat(out / "all_voxels.csv").st_mtime_ns == table_mtime  # array tasks leave collecting alone
    assert main_sweep(["-c", str(swept["path"]), "--cell", "3"]) == 2  # out of range


@pytest.mark.slow
def test_report_failure_keeps_the_table(swept, monkeypatch):
    import brainenc.reports as reports

    def broken(*a, **k):
        raise RuntimeError("report exploded")

    monkeypatch.setattr(reports, "build_report", broken)
    (swept["out"] / "all_voxels.csv").unlink()
    assert main_sweep(["-c", str(swept["path"]), "--collect-only"]) == 1
    assert len(pd.read_csv(swept["out"] / "all_voxels.csv")) > 0

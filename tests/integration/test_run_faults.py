"""Faults around a run folder: two commands at once, SIGTERM, a kill between checkpoint writes,
a validation that stops improving, an earlier run's results, an empty fit, a read-only folder
and a full disk.  Each ends in a one-line error or in correct behaviour, with an exit status a
script can trust (non-zero when no results were written)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from brainenc.cli import main
from brainenc.rundir import RunFolderError

from tests.helpers import REPO, console as _console, hang_config, smoke_fit_args as _args

LINUX_ROOT = sys.platform.startswith("linux") and hasattr(os, "geteuid") and os.geteuid() == 0


def _env():
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "OMP_NUM_THREADS": "1"}


def _popen(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "brainenc.cli", *args], cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(flag: Path, proc: subprocess.Popen, timeout: float = 300) -> int:
    deadline = time.time() + timeout
    while not flag.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert flag.exists(), f"the fit never reached its hang point:\n{proc.stdout.read()[-3000:] if proc.poll() is not None else ''}"
    return int(flag.read_text())


def _hung_fit(tiny_brain, tmp_path, run: Path, kind: str, at: int, *extra) -> tuple[subprocess.Popen, Path]:
    flag = tmp_path / f"{run.name}.pid"
    key = "epoch" if kind == "HangAtEpoch" else "step"
    config = hang_config(tmp_path, {"class_path": f"tests.helpers.{kind}", "init_args": {key: at, "flag": str(flag)}})
    args = _args(tiny_brain, run, *extra)
    args[1] = str(config)
    proc = _popen("fit", *args)
    _wait_for(flag, proc)
    return proc, flag


def _epoch(ckpt: Path) -> tuple[int, int]:
    c = torch.load(ckpt, map_location="cpu", weights_only=True)
    return c["epoch"], c["global_step"]


@contextlib.contextmanager
def _mount(path: Path, options: str):
    """A small tmpfs at ``path`` (Linux, root only): a real read-only or full file system."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


# ----------------------------------------------------------------------------- one command per folder


def test_two_fits_into_one_folder_the_second_is_refused_and_a_killed_holder_is_taken_over(tiny_brain, tmp_path, capsys):
    run = tmp_path / "run"
    first, _ = _hung_fit(tiny_brain, tmp_path, run, "HangAtEpoch", 1, "--trainer.max_epochs=2")
    try:
        lock = yaml.safe_load((run / "run.lock").read_text())
        assert lock["pid"] == first.pid and "fit" in lock["command"]
        with pytest.raises(RunFolderError, match=rf"{run}: is being written by another brainenc command \(pid {first.pid}"):
            main(["fit", *_args(tiny_brain, run)])
        rc, last = _console(capsys, "test", *_args(tiny_brain, run), f"--ckpt_path={run}/checkpoints/last.ckpt")
        assert rc == 2 and "is being written by another brainenc command" in last
        assert not (run / "results").exists()
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    # the lock of the killed fit is stale: the resume takes it over, finishes and releases it
    capsys.readouterr()
    assert main(["fit", *_args(tiny_brain, run, "--trainer.max_epochs=2", f"--ckpt_path={run}/checkpoints/last.ckpt",
                               "--test_after_fit=true")]) == 0
    assert f"taking over the lock of pid {first.pid}" in capsys.readouterr().err
    assert (run / "results" / "voxels.csv").exists() and not (run / "run.lock").exists()


def test_a_fit_beside_an_earlier_runs_results_is_refused(tiny_brain, tmp_path):
    run = tmp_path / "run"
    (run / "results").mkdir(parents=True)
    (run / "results" / "voxels.csv").write_text("dataset,subject,voxel,pearson\n")
    with pytest.raises(RunFolderError, match=r"results: holds the results of an earlier run \(voxels.csv\).*Move or delete"):
        main(["fit", *_args(tiny_brain, run)])
    assert not (run / "checkpoints").exists()


def test_max_epochs_zero_is_refused_not_an_untrained_test(tiny_brain, tmp_path, capsys):
    run = tmp_path / "run"
    rc, last = _console(capsys, "fit", *_args(tiny_brain, run, "--trainer.max_epochs=0", "--test_after_fit=true"))
    assert rc == 2 and last.startswith("brainenc: error: option 'trainer.max_epochs': expected a positive value")
    assert not (run / "results").exists()


# ----------------------------------------------------------------------------- last.ckpt and SIGTERM


def test_last_ckpt_is_written_at_every_epoch_end_even_when_validation_does_not_improve(tiny_brain, tmp_path):
    # mode: min on a correlation that rises: only epoch 0 is a "best"; Lightning 2.6 then writes
    # last.ckpt only with it. Killed at the start of epoch 2, the run must resume from epoch 1.
    cfg = yaml.safe_load((REPO / "experiments/smoke/linear.yaml").read_text())
    cfg["trainer"]["callbacks"][0]["init_args"]["mode"] = "min"
    base = tmp_path / "min.yaml"
    base.write_text(yaml.safe_dump(cfg))
    run, flag = tmp_path / "run", tmp_path / "run.pid"
    config = hang_config(tmp_path, {"class_path": "tests.helpers.HangAtEpoch", "init_args": {"epoch": 2, "flag": str(flag)}}, base)
    args = _args(tiny_brain, run, "--trainer.max_epochs=3")
    args[1] = str(config)
    proc = _popen("fit", *args)
    try:
        _wait_for(flag, proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert _epoch(run / "checkpoints" / "best.ckpt")[0] == 0
    assert _epoch(run / "checkpoints" / "last.ckpt")[0] == 1  # the latest epoch, not the best's


def test_sigterm_during_fit_exits_non_zero_and_saves_a_checkpoint_to_resume(tiny_brain, tmp_path, capsys):
    run = tmp_path / "run"
    proc, _ = _hung_fit(tiny_brain, tmp_path, run, "WaitAtStep", 25, "--trainer.max_epochs=2", "--test_after_fit=true")
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 143, out[-3000:]
    assert "brainenc: stopped by SIGTERM" in out and "--ckpt_path" in out and "Traceback" not in out
    assert not (run / "results").exists() and not (run / "run.lock").exists()
    # where it stopped, mid-epoch: the step in flight (25) finished, then the loop stopped
    assert _epoch(run / "checkpoints" / "last.ckpt") == (1, 26)
    # `fit && test` in a shell stops; the resume finishes the run
    sh = subprocess.run(["sh", "-c", "exit 143 && touch tested"], cwd=tmp_path)
    assert sh.returncode != 0 and not (tmp_path / "tested").exists()
    capsys.readouterr()
    assert main(["fit", *_args(tiny_brain, run, "--trainer.max_epochs=2", "--test_after_fit=true",
                                f"--ckpt_path={run}/checkpoints/last.ckpt")]) == 0
    # the console says where it resumed (1-based epoch, as the epoch lines count)
    assert f"(resumed from {run}/checkpoints/last.ckpt: epoch 2, step 26)" in capsys.readouterr().out
    assert _epoch(run / "checkpoints" / "last.ckpt")[0] == 1 and (run / "results" / "voxels.csv").exists()


def test_a_stage_killed_between_its_two_checkpoint_writes_resumes(tiny_brain, tmp_path):
    """The first epoch writes best.ckpt, then last.ckpt: a kill in between left only best.ckpt,
    and every rerun of the recipe failed (a fresh fit refused beside it). Also a truncated
    last.ckpt (a kill during the write) is set aside instead of failing every rerun."""
    from brainenc.recipes.stages import run_fit_test

    cfg = yaml.safe_load((REPO / "experiments/smoke/linear.yaml").read_text())
    cli = ["--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
           f"--data.stores=[{tiny_brain['simbrain7t']}]", "--data.simulate=null"]
    stage = tmp_path / "whole"
    cfg["trainer"]["default_root_dir"] = str(stage)
    cfg["trainer"]["max_epochs"] = 1
    run_fit_test(stage, cfg, cli)
    ckpts = stage / "checkpoints"
    assert _epoch(ckpts / "best.ckpt") == _epoch(ckpts / "last.ckpt") == (0, 18)
    # rewind to "killed between the two writes of epoch 0", then ask for 2 epochs
    for p in ("results", "run_state.json"):
        shutil.rmtree(stage / p) if (stage / p).is_dir() else (stage / p).unlink()
    (ckpts / "last.ckpt").unlink()
    cfg["trainer"]["max_epochs"] = 2
    run_fit_test(stage, cfg, cli)
    assert _epoch(ckpts / "last.ckpt") == (1, 36) and (stage / "results" / "voxels.csv").exists()
    # a truncated last.ckpt: set aside (kept), the fit resumes from best.ckpt
    for p in ("results", "run_state.json"):
        shutil.rmtree(stage / p) if (stage / p).is_dir() else (stage / p).unlink()
    data = (ckpts / "last.ckpt").read_bytes()
    (ckpts / "last.ckpt").write_bytes(data[: len(data) // 2])
    cfg["trainer"]["max_epochs"] = 3
    run_fit_test(stage, cfg, cli)
    assert (ckpts / "last.ckpt.incomplete").stat().st_size == len(data) // 2
    assert _epoch(ckpts / "last.ckpt")[0] == 2 and (stage / "results" / "voxels.csv").exists()


# ----------------------------------------------------------------------------- unwritable folders


@pytest.mark.skipif(not LINUX_ROOT, reason="mounts a tmpfs (Linux, root)")
def test_read_only_output_folders_are_one_line(tiny_brain, tmp_path, capsys):
    ro = tmp_path / "ro"
    with _mount(ro, "ro,size=1m"):
        rc, last = _console(capsys, "fit", *_args(tiny_brain, ro / "run"))
        assert rc == 1 and last == (f"brainenc: error: {ro}/run: cannot write: read-only file system: "
                                    "choose an output folder on a writable disk")
        fitted = tmp_path / "fitted"
        assert _console(capsys, "fit", *_args(tiny_brain, fitted))[0] == 0
        rc, last = _console(capsys, "test", *_args(tiny_brain, ro / "t"), f"--ckpt_path={fitted}/checkpoints/best.ckpt")
        assert rc == 1 and last.startswith(f"brainenc: error: {ro}/t: cannot write: read-only")
        assert _console(capsys, "test", *_args(tiny_brain, fitted), f"--ckpt_path={fitted}/checkpoints/best.ckpt")[0] == 0
        rc, last = _console(capsys, "report", str(fitted), "--out", str(ro / "report"))
        assert rc == 1 and last.startswith(f"brainenc: error: {ro}/report")
        assert "cannot write: read-only file system" in last


@pytest.mark.skipif(not LINUX_ROOT, reason="mounts a tmpfs (Linux, root)")
def test_disk_full_during_fit_is_one_line_and_leaves_no_truncated_checkpoint(tiny_brain, tmp_path, capsys):
    full = tmp_path / "full"
    with _mount(full, "size=3m"):  # a checkpoint of the smoke model is 2.2 MB: the second fails
        rc, last = _console(capsys, "fit", *_args(tiny_brain, full / "run", "--trainer.max_epochs=2"))
        assert rc == 1 and last.startswith(f"brainenc: error: {full}/run/checkpoints/")
        assert "ckpt: cannot write: no space left on the device: free space" in last
        ckpts = sorted((full / "run" / "checkpoints").iterdir())
        assert ckpts, "the first checkpoint fits on the disk"
        from brainenc.rundir import checkpoint_complete

        assert all(checkpoint_complete(p) for p in ckpts), [(p.name, p.stat().st_size) for p in ckpts]
        assert not list((full / "run" / "checkpoints").glob(".*.tmp"))

"""Run folders hold one fit; stage children die with their parent; bad resume checkpoints are
clear errors (issue 11, item 5)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from brainenc.cli import main
from brainenc.rundir import RunFolderError

from tests.helpers import REPO, smoke_fit_args as _args
from tests.helpers import SMOKE_LINEAR as SMOKE


@pytest.fixture(scope="module")
def fitted(tiny_brain, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "linear"
    main(["fit", *_args(tiny_brain, run)])
    return run


def _env():
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "OMP_NUM_THREADS": "1"}


def test_refit_into_a_used_run_folder_is_refused(tiny_brain, fitted):
    before = sorted(p.name for p in (fitted / "checkpoints").iterdir())
    with pytest.raises(RunFolderError, match=rf"holds the checkpoints of an earlier fit.*--ckpt_path={fitted}/checkpoints/last.ckpt"):
        main(["fit", *_args(tiny_brain, fitted)])
    assert sorted(p.name for p in (fitted / "checkpoints").iterdir()) == before == ["best.ckpt", "last.ckpt"]
    # the command line prints the message, not a traceback, and exits 2
    r = subprocess.run([sys.executable, "-m", "brainenc.cli", "fit", *_args(tiny_brain, fitted)],
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "brainenc: error:" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("cut", ["empty", "truncated"])
def test_resume_from_a_broken_last_ckpt_is_a_clear_error(tiny_brain, fitted, tmp_path, cut):
    from brainenc.lit.checkpoint import CheckpointError

    import shutil

    run = Path(shutil.copytree(fitted, tmp_path / "run"))
    last = run / "checkpoints" / "last.ckpt"
    data = last.read_bytes()
    last.write_bytes(b"" if cut == "empty" else data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{last}: field '--ckpt_path'.*(empty or truncated)"):
        main(["fit", *_args(tiny_brain, run, f"--ckpt_path={last}")])


def test_resume_from_another_folders_checkpoint_is_refused(tiny_brain, fitted, tmp_path):
    import shutil

    run = Path(shutil.copytree(fitted, tmp_path / "run"))
    with pytest.raises(RunFolderError, match="would mix two fits"):
        main(["fit", *_args(tiny_brain, run, f"--ckpt_path={fitted / 'checkpoints' / 'last.ckpt'}")])


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie has exited; only its parent entry remains


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_afo_stage_child_dies_with_its_parent(tiny_brain, tmp_path):
    cfg = yaml.safe_load(SMOKE.read_text())
    flag = tmp_path / "child.pid"
    cfg["trainer"]["callbacks"].append({"class_path": "tests.helpers.HangAtEpoch",
                                        "init_args": {"epoch": 0, "flag": str(flag)}})
    config = tmp_path / "stage.yaml"
    config.write_text(yaml.safe_dump(cfg))
    fit = ["fit", *_args(tiny_brain, tmp_path / "stage")]
    fit[2] = str(config)
    # the recipe's own launcher, in a parent process that the test then kills
    launch = f"from brainenc.recipes.stages import brainenc_command; brainenc_command({fit!r})"
    parent = subprocess.Popen([sys.executable, "-c", launch],
                              cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    child = None
    try:
        deadline = time.time() + 300
        while not flag.exists() and parent.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert flag.exists(), "the stage fit never started"
        child = int(flag.read_text())
        assert _alive(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        deadline = time.time() + 20
        while _alive(child) and time.time() < deadline:
            time.sleep(0.05)
        assert not _alive(child), "the stage's fit outlived the recipe that launched it"
    finally:
        if parent.poll() is None:
            parent.kill()
        if child is not None and _alive(child):
            os.kill(child, signal.SIGKILL)

"""The run directory: one checkpoint order everywhere, and the resumable fit-then-test."""

import json

import pytest

from brainenc.rundir import RunDir, find_checkpoint, fit_then_test, next_step, read_state


def _ckpt(run: RunDir, *names: str) -> None:
    """Complete checkpoint files as far as the run directory checks (a zip archive)."""
    import zipfile

    run.checkpoints.mkdir(parents=True, exist_ok=True)
    for n in names:
        with zipfile.ZipFile(run.checkpoints / n, "w") as z:
            z.writestr("data.pkl", b"x")


def test_checkpoint_order_is_best_then_last_and_resume_uses_last(tmp_path):
    run = RunDir(tmp_path / "run")
    assert run.checkpoint() is None and run.resume_checkpoint() is None
    with pytest.raises(FileNotFoundError, match="no best.ckpt or last.ckpt"):
        run.require_checkpoint()
    _ckpt(run, "last.ckpt")
    assert run.checkpoint() == run.checkpoints / "last.ckpt"
    _ckpt(run, "best.ckpt")
    assert run.checkpoint() == find_checkpoint(run.checkpoints) == run.checkpoints / "best.ckpt"
    assert run.resume_checkpoint() == run.checkpoints / "last.ckpt"


def _recorder(run: RunDir, calls: list, fail_fit: bool = False):
    def fit(resume):
        calls.append(("fit", resume and resume.name))
        if fail_fit:
            raise RuntimeError("fit crashed")
        _ckpt(run, "best.ckpt", "last.ckpt")

    def test(ckpt):
        calls.append(("test", ckpt.name))
        run.voxels.parent.mkdir(parents=True, exist_ok=True)
        run.voxels.write_text("pearson\n0.5\n")

    return fit, test


def test_fit_then_test_resumes_what_an_earlier_attempt_left(tmp_path):
    run, calls = RunDir(tmp_path / "run"), []
    _ckpt(run, "last.ckpt")  # a fit killed after its first epoch
    with pytest.raises(RuntimeError, match="fit crashed"):
        fit_then_test(run, *_recorder(run, calls, fail_fit=True))
    assert calls == [("fit", "last.ckpt")] and not read_state(run.root / "run_state.json").get("fit_done")

    calls.clear()
    assert fit_then_test(run, *_recorder(run, calls)) == "resume"
    assert calls == [("fit", "last.ckpt"), ("test", "best.ckpt")]
    assert json.loads((run.root / "run_state.json").read_text())["fit_done"] is True

    calls.clear()
    assert fit_then_test(run, *_recorder(run, calls)) == "done" and calls == []

    run.voxels.unlink()  # the fit finished, the test never wrote its table: test only
    assert next_step(run) == "test"
    assert fit_then_test(run, *_recorder(run, calls)) == "test" and calls == [("test", "best.ckpt")]


def test_fresh_fit_starts_without_a_checkpoint(tmp_path):
    run, calls = RunDir(tmp_path / "run"), []
    assert next_step(run) == "fit"
    fit_then_test(run, *_recorder(run, calls))
    assert calls == [("fit", None), ("test", "best.ckpt")]


def test_a_broken_state_file_counts_as_no_state(tmp_path):
    (tmp_path / "run_state.json").write_text('{"fit_done": tr')
    assert read_state(tmp_path / "run_state.json") == {}


def test_resume_falls_back_to_best_and_sets_incomplete_checkpoints_aside(tmp_path):
    run, calls = RunDir(tmp_path / "run"), []
    _ckpt(run, "best.ckpt")  # killed between the first epoch's best.ckpt and last.ckpt
    assert next_step(run) == "resume" and run.resume_checkpoint() == run.checkpoints / "best.ckpt"
    (run.checkpoints / "last.ckpt").write_bytes(b"PK\x03\x04 cut short")  # a write cut short
    assert run.resume_checkpoint() == run.checkpoints / "best.ckpt"
    fit_then_test(run, *_recorder(run, calls))
    assert calls[0] == ("fit", "best.ckpt")
    assert (run.checkpoints / "last.ckpt.incomplete").read_bytes() == b"PK\x03\x04 cut short"

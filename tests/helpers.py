"""Test instruments that run inside `brainenc` subprocesses (importable as ``tests.helpers``)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import lightning as L


class HangAtEpoch(L.Callback):
    """Write this process' id to ``flag`` and sleep when epoch ``epoch`` starts: a stand-in for a
    long run that the test then kills at a known point (after the previous epoch's checkpoint).
    Draws no random numbers and changes nothing about training."""

    def __init__(self, epoch: int, flag: str):
        self.epoch, self.flag = int(epoch), flag

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            tmp = Path(self.flag + ".tmp")
            tmp.write_text(str(os.getpid()))
            os.replace(tmp, self.flag)  # the test reads a complete pid
            time.sleep(600)


class HangAtStep(HangAtEpoch):
    """Like :class:`HangAtEpoch`, at the start of optimizer step ``step`` (mid-epoch)."""

    def __init__(self, step: int, flag: str):
        super().__init__(-1, flag)
        self.step = int(step)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            self.epoch = trainer.current_epoch
            self.on_train_epoch_start(trainer, pl_module)


REPO = Path(__file__).resolve().parents[1]
SMOKE_LINEAR = REPO / "experiments" / "smoke" / "linear.yaml"


def smoke_fit_args(brain, run, *extra) -> list[str]:
    """``brainenc fit``/``test`` arguments: the smoke linear config on ``brain``'s 7T store, one
    epoch into ``run``, no logger or progress bar, then ``extra``."""
    return ["-c", str(SMOKE_LINEAR), f"--data.stores=[{brain['simbrain7t']}]", "--data.simulate=null",
            f"--trainer.default_root_dir={run}", "--trainer.max_epochs=1", "--trainer.logger=false",
            "--trainer.enable_progress_bar=false", *extra]


class WaitAtStep(L.Callback):
    """Write this process' id to ``flag`` at the start of optimizer step ``step`` and wait there,
    in short sleeps, until Lightning has received a SIGTERM (then the fit loop stops at its next
    check).  A stand-in for a long run that a scheduler preempts."""

    def __init__(self, step: int, flag: str):
        self.step, self.flag = int(step), flag

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and not trainer.received_sigterm:
            tmp = Path(self.flag + ".tmp")
            tmp.write_text(str(os.getpid()))
            os.replace(tmp, self.flag)
            deadline = time.time() + 600
            while not trainer.received_sigterm and time.time() < deadline:
                time.sleep(0.05)


def hang_config(tmp_path: Path, callback: dict, base: Path = None) -> Path:
    """A copy of the smoke linear config (or ``base``) with ``callback`` added to its trainer."""
    import yaml

    cfg = yaml.safe_load(Path(base or SMOKE_LINEAR).read_text())
    cfg["trainer"]["callbacks"].append(callback)
    config = tmp_path / "hang.yaml"
    config.write_text(yaml.safe_dump(cfg))
    return config


class Payload:
    """Unpickling this calls open(path, "w"), i.e. creates a file: stands for any code a crafted
    pickle could run (the no-code-execution tests check that the file never appears)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def console(capsys, *argv) -> tuple[int, str]:
    """``brainenc ARGV`` in this process through the console entry point (errors as one line): its
    exit status and the last line it printed to stderr.  A child start-up less than a subprocess,
    for faults that need no signal."""
    from brainenc.cli import console_main

    capsys.readouterr()
    rc = console_main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err[-1] if err else ""

"""One stage of a recipe: a run directory brought to results by ordinary ``brainenc`` commands.

A fit/test stage writes its config to ``<stage>/stage.yaml`` and runs ``brainenc fit
--test_after_fit`` (then ``brainenc test`` if that did not finish) through
:func:`brainenc.rundir.fit_then_test`, so it resumes from ``last.ckpt`` after an interruption.
A stage is finished when ``<stage>/results/voxels.csv`` or ``<stage>/DONE`` exists.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Optional

import yaml

from brainenc.ioutil import atomic_write
from brainenc.rundir import RunDir, fit_then_test

STAGE_CONFIG = "stage.yaml"


def log(msg: str) -> None:
    print(f"[afo] {msg}", flush=True)


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


def stage_done(root: Path) -> bool:
    """True when the stage left its results table or its ``DONE`` marker."""
    return (root / "results" / "voxels.csv").exists() or (root / "DONE").exists()


class StageFailed(RuntimeError):
    """A stage's ``brainenc`` child failed; its own messages are above (printed as one line)."""

    input_error = True


def brainenc_command(args: list[str]) -> None:
    """Run ``brainenc ARGS`` in a child process that dies with the recipe; :class:`StageFailed`
    when it fails."""
    import signal

    cmd = [sys.executable, "-m", "brainenc.cli", *args]
    log("$ brainenc " + " ".join(args))
    from brainenc.subprocs import die_with_parent

    rc = subprocess.run(cmd, preexec_fn=die_with_parent()).returncode  # the stage dies with the recipe
    if rc != 0:
        how = (f"was killed by {signal.Signals(-rc).name}" if rc < 0 and -rc in signal.valid_signals()
               else f"failed with exit status {rc}")
        raise StageFailed(f"`brainenc {' '.join(args)}` {how} (its messages are above). Fix the cause and "
                          "rerun the recipe: finished stages are skipped and an interrupted fit resumes "
                          "from its checkpoint")


def run_fit_test(root: Path, cfg: dict, cli_args: list[str]) -> None:
    """Fit and test one stage with :func:`~brainenc.rundir.fit_then_test` (resuming from
    ``last.ckpt`` when present); skip it when finished."""
    if stage_done(root):
        log(f"{root.name}: finished, skipped")
        return
    # not "config.yaml": LightningCLI saves its own resolved config under that name in the run dir
    config = root / STAGE_CONFIG
    atomic_write(config, yaml.safe_dump(cfg, sort_keys=False))

    def fit(resume: Optional[Path]) -> None:
        # fit and test in one process (one start-up); a test that failed after a finished fit is
        # re-run on its own by fit_then_test on the next call
        args = ["fit", "-c", str(config), *cli_args, "--test_after_fit=true"]
        if resume is not None:
            log(f"{root.name}: resuming from {resume}")
            args += ["--ckpt_path", str(resume)]
        brainenc_command(args)

    def test(ckpt: Path) -> None:
        brainenc_command(["test", "-c", str(config), "--ckpt_path", str(ckpt), *cli_args])

    fit_then_test(RunDir(root), fit, test)


def load_trained(root: Path, cli_args: list[str] = ()):
    """The stage's model with the weights of its checkpoint (best, else last; eval mode), and its
    datamodule."""
    from brainenc import cli

    return cli.load_trained(root, root / STAGE_CONFIG, cli_args)

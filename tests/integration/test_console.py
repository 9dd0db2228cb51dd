"""The quickstart talks to its user: one line per epoch without a progress bar, and only the
warnings that mean something."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


#: What Lightning and torch print that says nothing to a brainenc user (the CLI drops exactly these)
NOISE = ("Tip: For seamless", "litlogger", "litmodels", "LeafSpec", "_pytree", "args parameter",
         "in eval mode at the start of training", "Seed set to", "GPU available", "TPU available",
         "Loading `train_dataloader`", "Restoring states", "Loaded model weights", "Test metric")


def test_fit_prints_one_line_per_epoch_and_no_noise(tiny_brain, tmp_path):
    """A ``brainenc fit`` child, as the recipes start them: one line per epoch, the test's
    results, and none of Lightning's tips, its ``args`` notice, torch's ``_pytree`` deprecation or
    the eval-mode warning about a frozen backbone."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONWARNINGS", None)  # every warning shown, as for a user
    proc = subprocess.run(
        [sys.executable, "-m", "brainenc.cli", "fit", "-c", str(REPO / "experiments/smoke/linear.yaml"),
         f"--data.stores=[{tiny_brain['simbrain7t']}]", "--data.simulate=null",
         f"--trainer.default_root_dir={tmp_path / 'lin'}", "--trainer.enable_progress_bar=false",
         "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1", "--test_after_fit=true"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    lines = re.findall(r"^\[lin\] epoch (\d)/2  val median r -?\d\.\d{3}  [\d.]+s/epoch  ~\dm\d\ds left$", out, re.M)
    assert lines == ["1", "2"], out[-2000:]
    # where the rest of the time went: start-up (imports, data, model) and the test loop
    assert re.search(r"^\[lin\] started in \d+\.\ds$", out, re.M)
    assert re.search(r"^\[lin\] tested in \d+\.\ds: test median r -?\d\.\d{3}$", out, re.M), out[-2000:]
    assert (tmp_path / "lin" / "results" / "voxels.csv").is_file()
    assert not [n for n in NOISE if n in out], out[-4000:]


def test_quiet_lightning_is_scoped():
    """The filters end with the command: a warning raised afterwards in the same process is shown."""
    from brainenc.lit.progress import quiet_lightning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_lightning():
            warnings.warn("LightningCLI's args parameter is intended to run from within Python", UserWarning)
        warnings.warn("LightningCLI's args parameter is intended to run from within Python", UserWarning)
    assert len(caught) == 1


def test_eval_mode_check_still_reports_modules_outside_a_frozen_backbone():
    from brainenc.lit.progress import EvalModeCheck

    module = torch.nn.Module()
    module.backbone = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    module.backbone.frozen = True
    module.readout = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout())
    module.train()
    module.backbone.eval()  # expected: not reported
    trainer = types.SimpleNamespace(is_global_zero=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        EvalModeCheck().on_train_start(trainer, module)
    module.readout[1].eval()  # a real mistake: reported
    with pytest.warns(UserWarning, match=r"1 module\(s\) outside a frozen backbone.*readout.1"):
        EvalModeCheck().on_train_start(trainer, module)


def test_a_ridge_fit_prints_none_of_lightnings_notices(tiny_brain, tmp_path, capfd):
    """The closed-form ridge has no optimiser and saves its own checkpoint: neither is worth a
    notice, and a small training set's logging interval is not either."""
    from brainenc.cli import console_main

    env_warnings = os.environ.pop("PYTHONWARNINGS", None)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")  # every warning raised once, as for a user
            rc = console_main(["fit", "-c", str(REPO / "experiments/smoke/ridge.yaml"),
                               f"--data.stores=[{tiny_brain['simbrain7t']}]", "--data.simulate=null",
                               f"--trainer.default_root_dir={tmp_path / 'ridge'}", "--trainer.logger=false",
                               "--trainer.enable_progress_bar=false", "--test_after_fit=true"])
    finally:
        if env_warnings is not None:
            os.environ["PYTHONWARNINGS"] = env_warnings
    out, err = capfd.readouterr()
    err += "".join(f"{w.category.__name__}: {w.message}\n" for w in caught)
    assert rc == 0, (out + err)[-3000:]
    assert re.search(r"^\[ridge\] tested in \d+\.\ds: test median r -?\d\.\d{3}$", out, re.M), out[-2000:]
    noise = NOISE + ("configure_optimizers", "smaller than the logging interval", "`weights_only` was not set")
    assert not [n for n in noise if n in out + err], (out + err)[-4000:]

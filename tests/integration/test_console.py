"""The quickstart talks to its user: one line per epoch without a progress bar, and only the
warnings that mean something (issue 11, quickstart items)."""

from __future__ import annotations

import re
import types
import warnings
from pathlib import Path

import pytest
import torch

from brainenc.cli import main

REPO = Path(__file__).resolve().parents[2]


def test_fit_prints_one_line_per_epoch_and_no_expected_warnings(tiny_brain, tmp_path, capsys):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(["fit", "-c", str(REPO / "experiments/smoke/linear.yaml"), f"--data.stores=[{tiny_brain['simbrain7t']}]",
              "--data.simulate=null", f"--trainer.default_root_dir={tmp_path / 'lin'}", "--trainer.logger=false",
              "--trainer.enable_progress_bar=false"])
    out = capsys.readouterr().out
    lines = re.findall(r"^\[lin\] epoch (\d)/2  val median r -?\d\.\d{3}  [\d.]+s/epoch  ~\dm\d\ds left$", out, re.M)
    assert lines == ["1", "2"], out[-2000:]
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "eval mode" in m or "args parameter" in m], messages


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

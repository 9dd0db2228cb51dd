"""Checkpoints given to the Lightning commands and to transfer are read as data.

A user's ``--ckpt_path`` (an explicit file or Lightning's ``last`` shortcut) and a transfer base
are crafted to create ``canary`` if unpickled; ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` is set,
which makes torch unpickle wherever a caller leaves ``weights_only`` unset (as Lightning does).
"""

from __future__ import annotations

import shutil

import pytest
import torch

from brainenc.cli import main
from brainenc.lit.checkpoint import CheckpointError
from tests.helpers import Payload, smoke_fit_args




@pytest.fixture(scope="module")
def fitted(tiny_brain, tmp_path_factory):
    run = tmp_path_factory.mktemp("evil") / "run"
    main(["fit", *smoke_fit_args(tiny_brain, run)])
    return run


def _poison(src, dst, canary):
    """``src`` with an object in its hyperparameters that opens ``canary`` when unpickled."""
    ckpt = torch.load(src, map_location="cpu", weights_only=True)
    ckpt["hyper_parameters"]["evil"] = Payload(canary)
    torch.save(ckpt, dst)
    return dst


def test_ckpt_path_with_an_object_is_refused_by_every_command(fitted, tiny_brain, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    canary = tmp_path / "canary"
    evil = _poison(fitted / "checkpoints" / "last.ckpt", tmp_path / "evil.ckpt", canary)
    for command in ("test", "validate", "predict"):
        with pytest.raises(CheckpointError, match=r"evil.ckpt: field 'hyper_parameters'.*never unpickles"):
            main([command, *smoke_fit_args(tiny_brain, tmp_path / command), f"--ckpt_path={evil}"])
    assert not canary.exists()


def test_resume_from_last_shortcut_never_unpickles(fitted, tiny_brain, tmp_path, monkeypatch):
    """``--ckpt_path=last`` skips the CLI's own check; Lightning then reads the file, and without
    ``weights_only=True`` forced by brainenc the environment variable would make it unpickle."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    canary = tmp_path / "canary"
    run = tmp_path / "run"
    shutil.copytree(fitted, run)
    _poison(run / "checkpoints" / "last.ckpt", run / "checkpoints" / "last.ckpt", canary)
    with pytest.raises(CheckpointError, match="never unpickles"):
        main(["fit", *smoke_fit_args(tiny_brain, run, "--trainer.max_epochs=2"), "--ckpt_path=last"])
    assert not canary.exists()


def test_weights_only_false_is_refused(fitted, tiny_brain, tmp_path):
    from brainenc.errors import ConfigError

    with pytest.raises(ConfigError, match="weights_only"):
        main(["test", *smoke_fit_args(tiny_brain, tmp_path / "t"), f"--ckpt_path={fitted / 'checkpoints/last.ckpt'}",
              "--weights_only=false"])


def test_transfer_base_with_an_object_is_refused(fitted, tmp_path, monkeypatch):
    from brainenc.recipes.transfer import load_base

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    canary = tmp_path / "canary"
    evil = _poison(fitted / "checkpoints" / "last.ckpt", tmp_path / "base.ckpt", canary)
    with pytest.raises(CheckpointError, match="base.ckpt: field '<pickle>'"):
        load_base(evil)
    assert not canary.exists()

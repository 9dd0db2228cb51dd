"""Resume is exact: a `brainenc fit` killed with SIGKILL and resumed from last.ckpt ends with the
same weights, bit for bit, as an uninterrupted fit (issue 11, item 3)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[2]
EPOCHS = 3
STEP_EVERY = 7


def _config(tmp_path: Path, brain: dict, hang: dict | None) -> Path:
    cfg = yaml.safe_load((REPO / "experiments/smoke/linear.yaml").read_text())
    cfg["trainer"]["max_epochs"] = EPOCHS
    cfg["trainer"]["logger"] = False
    cfg["trainer"]["enable_progress_bar"] = False
    cfg["data"]["stores"] = [str(brain["simbrain7t"])]
    cfg["data"]["simulate"] = None
    # checkpoints in the middle of epochs too (18 steps per epoch): steps/step=7.ckpt, 14, 21, ...
    cfg["trainer"]["callbacks"].append({
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"dirpath": "${trainer.default_root_dir}/steps", "filename": "{step}",
                      "every_n_train_steps": STEP_EVERY, "save_top_k": -1}})
    if hang:
        kind = "HangAtStep" if "step" in hang else "HangAtEpoch"
        cfg["trainer"]["callbacks"].append({"class_path": f"tests.helpers.{kind}", "init_args": hang})
    path = tmp_path / f"config{'_hang' if hang else ''}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _fit(config: Path, root: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "brainenc.cli", "fit", "-c", str(config),
                             f"--trainer.default_root_dir={root}", *extra],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def runs(tiny_brain, tmp_path_factory) -> dict[str, Path]:
    """An uninterrupted fit, and one killed with SIGKILL at step 25 (3 batches into epoch 1's
    18; end-of-epoch-0 last.ckpt and mid-epoch steps/step=21.ckpt exist by then)."""
    tmp = tmp_path_factory.mktemp("resume")
    ref = _fit(_config(tmp, tiny_brain, None), tmp / "ref")
    flag = tmp / "hung"
    cut = _fit(_config(tmp, tiny_brain, {"step": 25, "flag": str(flag)}), tmp / "cut")
    deadline = time.time() + 300
    while not flag.exists() and cut.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert flag.exists(), cut.communicate()[0][-3000:]
    cut.send_signal(signal.SIGKILL)
    cut.communicate(timeout=60)
    out = ref.communicate(timeout=300)[0]
    assert ref.returncode == 0, out[-3000:]
    return {"ref": tmp / "ref", "cut": tmp / "cut", "tmp": tmp}


@pytest.mark.parametrize("where", ["epoch_end", "mid_epoch"])
def test_sigkill_then_resume_equals_uninterrupted_fit(tiny_brain, runs, tmp_path, where):
    import shutil

    # each case resumes its own copy of the killed run's folder; a copied (or moved) folder must
    # resume in place: best.ckpt and last.ckpt, not best-v1.ckpt beside them
    cut_root = Path(shutil.copytree(runs["cut"], tmp_path / "cut"))
    if where == "epoch_end":
        ckpt = cut_root / "checkpoints" / "last.ckpt"
        assert torch.load(ckpt, map_location="cpu", weights_only=True)["epoch"] == 0
    else:
        ckpt = cut_root / "steps" / "step=21.ckpt"
        assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] == 21

    resumed = _fit(_config(runs["tmp"], tiny_brain, None), cut_root, f"--ckpt_path={ckpt}")
    out = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, out[-3000:]
    assert "not resumable" not in out  # Lightning's warning for loaders that cannot resume mid-epoch

    reference = runs["ref"]
    a = _weights(reference / "checkpoints" / "last.ckpt")
    b = _weights(cut_root / "checkpoints" / "last.ckpt")
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"resumed weights differ from the uninterrupted run in {differ[:5]}"
    # one fit per folder: the resumed run kept writing best.ckpt, never best-v1.ckpt
    assert sorted(p.name for p in (cut_root / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    key = "readout.weight.simbrain7t__subj01"
    assert torch.equal(_weights(reference / "checkpoints" / "best.ckpt")[key],
                       _weights(cut_root / "checkpoints" / "best.ckpt")[key])


def test_sampler_order_follows_the_epoch_set_after_the_iterator_exists():
    """What Lightning does on resume: create the iterator, then set_epoch, then read."""
    import numpy as np

    from brainenc.data.sampling import PairBatchSampler

    units = [np.arange(40)]
    fresh = PairBatchSampler(units, 8, shuffle=True, seed=0)
    fresh.set_epoch(3)
    expected = [rows.tolist() for _, rows in fresh]
    s = PairBatchSampler(units, 8, shuffle=True, seed=0)
    it = iter(s)
    s.set_epoch(3)
    assert [rows.tolist() for _, rows in it] == expected
    assert expected != [rows.tolist() for _, rows in PairBatchSampler(units, 8, shuffle=True, seed=0)]

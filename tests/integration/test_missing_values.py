"""NaN robustness: one NaN volume does not lose the test, and `validate-store` and fit accept and
refuse the same stores (issue 11, item 4)."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from brainenc.cli import main
from brainenc.data.datamodule import BrainDataModule
from brainenc.data.store import Store, StoreError

REPO = Path(__file__).resolve().parents[2]


def _copy(brain, tmp_path) -> Path:
    return Path(shutil.copytree(brain["simbrain7t"], tmp_path / "simbrain7t"))


def _rewrite_responses(path: Path, fn) -> None:
    """Replace ``responses`` by ``fn(float32 array)``, stored as float32 (keeps values float16 can't)."""
    with h5py.File(path, "r+") as f:
        r = fn(f["responses"][()].astype(np.float32))
        del f["responses"]
        f.create_dataset("responses", data=r, chunks=(max(1, min(8, len(r))), r.shape[1]))


def _test_trials(root: Path, subject="subj01"):
    store = Store(root)
    info = store.subject(subject)
    test_stim = np.flatnonzero(store.split == 1)
    return info, test_stim, [np.flatnonzero(info.trial_stimulus == s) for s in test_stim]


def test_one_nan_volume_is_left_out_of_the_average(tiny_brain, tmp_path):
    root = _copy(tiny_brain, tmp_path)
    info, test_stim, reps = _test_trials(root)
    with h5py.File(info.path, "r") as f:
        clean = f["responses"][()].astype(np.float64)
    nan_row, inf_row = reps[0][0], reps[1][1]
    _rewrite_responses(info.path, lambda r: (r.__setitem__(nan_row, np.nan), r.__setitem__((inf_row, 3), np.inf), r)[-1])

    dm = BrainDataModule(stores=[str(root)], image_size=32, subjects=["subj01"], load_images=False)
    dm.setup("test")
    with pytest.warns(UserWarning, match=r"simbrain7t/subj01: \d+ NaN/Inf response values in the test trials.*1 trials"):
        loader = dm.test_dataloader()
    got = {int(s): row for b in loader for s, row in zip(b["stimulus"], b["responses"].numpy())}
    expected0 = clean[reps[0][1:]].mean(0)  # the two finite repeats
    np.testing.assert_allclose(got[test_stim[0]], expected0, rtol=1e-5, atol=1e-6)
    keep = [r for r in reps[1]]
    e1 = clean[keep].mean(0)
    e1[3] = clean[[r for r in keep if r != inf_row], 3].mean()
    np.testing.assert_allclose(got[test_stim[1]], e1, rtol=1e-5, atol=1e-6)
    assert all(np.isfinite(v).all() for v in got.values())


def test_fit_and_test_write_results_despite_a_nan_volume(tiny_brain, tmp_path, capsys):
    root = _copy(tiny_brain, tmp_path)
    info, _, reps = _test_trials(root)
    # every repeat of one test image is a NaN volume: that image has no data at all
    _rewrite_responses(info.path, lambda r: (r.__setitem__(reps[0], np.nan), r)[-1])
    run = tmp_path / "run"
    main(["fit", "-c", str(REPO / "experiments/smoke/linear.yaml"), f"--data.stores=[{root}]",
          "--data.simulate=null", f"--trainer.default_root_dir={run}", "--trainer.max_epochs=1",
          "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--test_after_fit=true"])
    df = pd.read_csv(run / "results" / "voxels.csv")
    assert len(df) == sum(Store(root).subject(s).n_voxels for s in ("subj01", "subj02"))
    assert df["pearson"].notna().mean() > 0.95
    assert main(["validate-store", str(root)]) == 0
    out = capsys.readouterr().out
    assert "ok Store(" in out and f"subj01: note: {3 * info.n_voxels} NaN/Inf values treated as missing (3 trials" in out


def _zero_trials(root):
    with h5py.File(root / "subj01.h5", "r+") as f:
        nv = f["responses"].shape[1]
        for k in ("responses", "trial_stimulus", "trial_session"):
            del f[k]
        f.create_dataset("responses", (0, nv), "float32")
        f.create_dataset("trial_stimulus", (0,), "int64")


def _ncsnr(value):
    def go(root):
        with h5py.File(root / "subj01.h5", "r+") as f:
            f["voxels/ncsnr"][2] = value
    return go


def _absurd(root):
    _rewrite_responses(root / "subj01.h5", lambda r: r * 1e7)


def _nan_volume(root):
    _rewrite_responses(root / "subj01.h5", lambda r: (r.__setitem__(5, np.nan), r)[-1])


def _inf_value(root):
    _rewrite_responses(root / "subj01.h5", lambda r: (r.__setitem__((7, 1), -np.inf), r)[-1])


def _nan_test_voxel(root):
    info, _, reps = _test_trials(root)
    _rewrite_responses(info.path, lambda r: (r.__setitem__((np.concatenate(reps), 4), np.nan), r)[-1])


CASES = {  # corruption -> accepted by both (True) or refused by both (False)
    "nan volume": (_nan_volume, True, None),
    "inf value": (_inf_value, True, None),
    "negative ncsnr": (_ncsnr(-0.5), False, "voxels/ncsnr"),
    "infinite ncsnr": (_ncsnr(np.inf), False, "voxels/ncsnr"),
    "zero trials": (_zero_trials, False, "responses"),
    "absurd scale": (_absurd, False, r"\|values\| <= 100000"),
    "voxel never finite in the test trials": (_nan_test_voxel, False, "finite response of every voxel"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_validate_store_and_fit_agree(tiny_brain, tmp_path, case, capsys):
    corrupt, accepted, match = CASES[case]
    root = _copy(tiny_brain, tmp_path)
    corrupt(root)
    code = main(["validate-store", str(root)])
    out = capsys.readouterr().out

    def fit_reads_everything():
        dm = BrainDataModule(stores=[str(root)], image_size=32, load_images=False)
        dm.setup("fit")
        for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
            for _ in loader:
                pass

    if accepted:
        assert code == 0 and "NaN/Inf values treated as missing" in out, out
        fit_reads_everything()
    else:
        assert code == 1 and "INVALID" in out and "subj01.h5" in out, out
        with pytest.raises(StoreError, match=match):
            fit_reads_everything()

"""A real 2-process CPU DDP run (gloo) of ``brainenc fit`` then ``brainenc test``.

The checkpoint trained under DDP is tested with 1 and with 2 processes: the per-voxel Pearson
(results/voxels.csv) and the retrieval numbers (results/summary.json) must agree, i.e. the
evaluation sharding neither drops nor double-counts test images and the metrics synchronise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[2]
DDP = REPO / "experiments" / "ddp" / "cpu_2proc.yaml"
# linear runs in the default suite; the other two (minutes of process start-up each) run in CI's
# slow pass (`make test-slow`)
ENCODERS = ["linear", pytest.param("universal", marks=pytest.mark.slow),
            pytest.param("retinotopic", marks=pytest.mark.slow)]

pytestmark = pytest.mark.ddp


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from brainenc.data.simbrain import simulate

    return simulate(preset="tiny", out=tmp_path_factory.mktemp("simbrain"), seed=0)["simbrain7t"]


def brainenc(*args: str, cwd: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    # the `brainenc` script next to this interpreter; Lightning relaunches this same command line
    # for rank 1, so it must be a runnable script, not `python -c`
    exe = Path(sys.executable).with_name("brainenc")
    proc = subprocess.run([str(exe), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"brainenc {' '.join(args)} failed:\n{proc.stderr[-4000:]}"


def results(run: Path) -> tuple[pd.DataFrame, dict]:
    df = pd.read_csv(run / "results" / "voxels.csv")
    summary = json.loads((run / "results" / "summary.json").read_text())
    return df.sort_values(["dataset", "subject", "voxel"]).reset_index(drop=True), summary


@pytest.mark.parametrize("encoder", ENCODERS)
def test_fit_ddp_then_test_matches_single_process(encoder, tiny, tmp_path):
    config = REPO / "experiments" / "smoke" / f"{encoder}.yaml"
    common = ["-c", str(config), f"--data.stores=[{tiny}]", "--data.simulate=null",
              "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    fit_dir = tmp_path / "fit"
    brainenc("fit", *common, "-c", str(DDP), f"--trainer.default_root_dir={fit_dir}", "--trainer.max_epochs=1",
             "--trainer.limit_train_batches=6",
             cwd=tmp_path)
    ckpt = fit_dir / "checkpoints" / "last.ckpt"
    assert ckpt.exists(), sorted(p.name for p in fit_dir.rglob("*"))

    one, two = tmp_path / "test1", tmp_path / "test2"
    brainenc("test", *common, f"--ckpt_path={ckpt}", f"--trainer.default_root_dir={one}",
             "--trainer.devices=1", cwd=tmp_path)
    brainenc("test", *common, "-c", str(DDP), f"--ckpt_path={ckpt}", f"--trainer.default_root_dir={two}",
             cwd=tmp_path)

    (df1, s1), (df2, s2) = results(one), results(two)
    assert len(df1) == len(df2) > 0
    assert (df1[["dataset", "subject", "voxel"]].values == df2[["dataset", "subject", "voxel"]].values).all()
    r1, r2 = df1["pearson"].to_numpy(), df2["pearson"].to_numpy()
    assert np.isfinite(r1).mean() > 0.9  # a trained model, not all-NaN tables agreeing trivially
    np.testing.assert_allclose(r2, r1, atol=1e-5, rtol=0, equal_nan=True)
    assert json.dumps(s1["retrieval"], sort_keys=True) == json.dumps(s2["retrieval"], sort_keys=True) or \
        _close(s1["retrieval"], s2["retrieval"])


def _close(a, b, tol: float = 1e-6) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], tol) for k in a)
    if isinstance(a, (int, float)):
        return abs(a - b) <= tol
    return a == b


@pytest.mark.slow  # ~60 s of process start-up on 2 cores
def test_readme_plain_ddp_example_fits(tiny, tmp_path):
    """README: `--trainer.strategy=ddp --trainer.devices=2` (plain DDP, no overlay). Each batch
    comes from one pair, so the other pairs' readout weights get no gradient; the CLI turns on
    DDP's search for unused parameters, which plain `ddp` leaves off (it used to raise)."""
    run = tmp_path / "fit"
    brainenc("fit", "-c", str(REPO / "experiments" / "smoke" / "linear.yaml"), f"--data.stores=[{tiny}]",
             "--data.simulate=null", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
             "--trainer.logger=false", "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.max_epochs=1",
             "--trainer.limit_train_batches=4", f"--trainer.default_root_dir={run}", "--test_after_fit=true",
             cwd=tmp_path)
    assert (run / "checkpoints" / "last.ckpt").exists() and (run / "results" / "voxels.csv").exists()
    assert not (run / "run.lock").exists()


@pytest.mark.slow  # three brainenc start-ups, one of them two processes
def test_predict_images_under_ddp_writes_the_single_process_files(tiny, tmp_path):
    """`brainenc predict --data.predict_images` with 2 processes: each rank predicts its share and
    rank 0 merges them into the files one process writes (same rows, order, ids, values, ROI
    means), with no per-rank file left behind."""
    import h5py
    from PIL import Image

    images = tmp_path / "imgs"
    rng = np.random.default_rng(3)
    for i in range(7):  # odd: the ranks get different numbers of images
        cat = images / ("face" if i % 2 else "noface")
        cat.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(cat / f"{i}.png")
    common = ["-c", str(REPO / "experiments" / "smoke" / "linear.yaml"), f"--data.stores=[{tiny}]",
              "--data.simulate=null", "--trainer.enable_progress_bar=false", "--trainer.logger=false",
              "--data.eval_batch_size=2"]
    run = tmp_path / "fit"
    brainenc("fit", *common, f"--trainer.default_root_dir={run}", "--trainer.max_epochs=1",
             "--trainer.limit_train_batches=4", cwd=tmp_path)
    ckpt = f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"
    one, two = tmp_path / "one", tmp_path / "two"
    brainenc("predict", *common, ckpt, f"--data.predict_images={images}", f"--trainer.default_root_dir={one}",
             "--trainer.devices=1", cwd=tmp_path)
    brainenc("predict", *common, "-c", str(DDP), ckpt, f"--data.predict_images={images}",
             f"--trainer.default_root_dir={two}", cwd=tmp_path)
    files1 = sorted(p.name for p in (one / "predictions").iterdir())
    assert sorted(p.name for p in (two / "predictions").iterdir()) == files1 and not [f for f in files1 if ".rank" in f]
    for name in (f for f in files1 if f.endswith(".h5")):
        with h5py.File(one / "predictions" / name) as a, h5py.File(two / "predictions" / name) as b:
            assert a["pred"].shape == b["pred"].shape == (7, a["pred"].shape[1])
            for field in ("stimulus", "stimulus_id", "category"):
                assert list(a[field][()]) == list(b[field][()]), field
            np.testing.assert_allclose(b["pred"][()], a["pred"][()], rtol=1e-5, atol=1e-6)
    m1, m2 = (pd.read_csv(d / "predictions" / "roi_means.csv").sort_values(["image", "atlas", "roi"])
              .reset_index(drop=True) for d in (one, two))
    assert len(m1) == len(m2) > 0 and (m1.drop(columns="mean") == m2.drop(columns="mean")).all().all()
    np.testing.assert_allclose(m2["mean"], m1["mean"], rtol=1e-4, atol=1e-6)

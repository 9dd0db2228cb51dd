"""Every importer's output trains: `brainenc prepare` on a miniature real-layout source, then a
tiny `brainenc fit` + `test` of the ridge baseline on the prepared store."""

from __future__ import annotations

import pandas as pd
import pytest

from brainenc.cli import main
from brainenc.data.store import Store
from tests.fixtures.stores import (algonauts_prepared, bold5000_prepared, god_prepared,  # noqa: F401
                                   nsd_prepared, things_prepared, vim1_prepared)
from pathlib import Path

SMOKE = Path(__file__).resolve().parents[2] / "experiments" / "smoke" / "ridge.yaml"


@pytest.mark.parametrize("name", ["nsd", "algonauts", "bold5000", "god", "things", "vim1"])
def test_prepared_store_fits_and_tests(name, request, tmp_path):
    store_path = request.getfixturevalue(f"{name}_prepared")[0]
    store = Store(store_path)
    run = tmp_path / "run"
    common = ["-c", str(SMOKE), f"--data.stores=[{store_path}]", "--data.simulate=null",
              "--data.image_size=32", "--data.batch_size=8", "--data.val_fraction=0.2", "--data.test_fraction=0.4",
              "--model.init_args.cv=2", f"--trainer.default_root_dir={run}",
              "--trainer.enable_progress_bar=false"]
    main(["fit", *common])
    main(["test", *common, f"--ckpt_path={run / 'checkpoints' / 'best.ckpt'}"])
    df = pd.read_csv(run / "results" / "voxels.csv")
    expected = sum(store.subject(s).n_voxels for s in store.subjects)
    assert len(df) == expected and set(df["dataset"]) == {store.name}
    assert df["pearson"].notna().any()

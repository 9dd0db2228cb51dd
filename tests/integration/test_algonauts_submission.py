"""Algonauts 2023 submission files: a real tiny model trained on a store prepared from the
miniature challenge source, exported, and checked against the source's own image and vertex order."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from brainenc.cli import load_trained, main
from brainenc.data.importers import prepare
from brainenc.data.store import Store, StoreError
from brainenc.export.algonauts import challenge_layout
from tests.fixtures.stores import algonauts_prepared  # noqa: F401

SMOKE = Path(__file__).resolve().parents[2] / "experiments" / "smoke" / "ridge.yaml"


def test_submission_round_trip(algonauts_prepared, tmp_path):  # noqa: F811
    store_path, fx = algonauts_prepared
    store = Store(store_path)
    for s in fx.subjects:  # what the importer recorded is the source's order
        with h5py.File(store.subject(s).path) as f:
            rows = f["challenge/test_stimulus"][()]
            names = [n.decode() for n in f["challenge/test_name"][()]]
        assert [store.stimulus_ids[r] for r in rows] == [f"nsd-{i:05d}" for i in fx.test_ids[s]]
        assert names == [f"test-{i + 1:04d}_nsd-{n:05d}.png" for i, n in enumerate(fx.test_ids[s])]
    run = tmp_path / "run"
    main(["fit", "-c", str(SMOKE), f"--data.stores=[{store_path}]", "--data.simulate=null", "--data.image_size=32",
          "--data.batch_size=8", "--data.val_fraction=0.2", "--data.test_fraction=0.4", "--model.init_args.cv=2",
          f"--trainer.default_root_dir={run}", "--trainer.enable_progress_bar=false", "--trainer.logger=false",
          "--test_after_fit=true"])
    out = tmp_path / "submission"
    assert main(["algonauts-submission", str(run), "--out", str(out)]) == 0
    model, _ = load_trained(run, run / "results" / "config.yaml")
    for s in fx.subjects:
        # expected, from the fixture's own lists: its test images in order, its vertices per hemisphere
        rows = np.array([list(store.stimulus_ids).index(f"nsd-{i:05d}") for i in fx.test_ids[s]])
        with torch.no_grad():
            order = np.argsort(rows)
            pred = model.predict_all(model.features_of_rows(store, torch.from_numpy(rows[order])), f"{store.name}/{s}")
        full = np.empty((len(rows), pred.shape[1]), np.float32)
        full[order] = pred.numpy()
        hemi, vertex = fx.fs_index[s]
        for h_i, h in enumerate(("lh", "rh")):
            got = np.load(out / s / f"{h}_pred_test.npy", allow_pickle=False)
            assert got.dtype == np.float32 and got.shape == (len(fx.test_ids[s]), int((hemi == h_i).sum()))
            # columns: the hemisphere's challenge vertices in increasing fsaverage order
            cols = np.flatnonzero(hemi == h_i)[np.argsort(vertex[hemi == h_i], kind="stable")]
            np.testing.assert_allclose(got, full[:, cols], rtol=1e-5, atol=1e-6)


def test_submission_refuses_an_roi_subset(algonauts_prepared, tmp_path):  # noqa: F811
    _, fx = algonauts_prepared
    out = prepare("algonauts2023", fx.root, tmp_path / "v1", subjects=["subj01"], roi="prf-visualrois:V1v,V1d",
                  checksum="none")
    with pytest.raises(StoreError, match="every challenge vertex"):
        challenge_layout(Store(out).subject("subj01").path)

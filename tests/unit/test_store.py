"""Canonical store: round trip, atomicity, and one clear error per kind of malformed file."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from brainenc.data.store import (RoiAtlas, Store, StoreError, StimuliWriter, SubjectWriter, write_manifest)


def make_store(root, n_stim=12, n_trials=20, n_vox=7, seed=0, dtype="float32"):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n_stim, 8, 8, 3), dtype=np.uint8)
    ids = [f"img-{i:03d}" for i in range(n_stim)]
    with StimuliWriter(root / "stimuli.h5", n_stim, (8, 8), visual_angle_deg=8.4) as w:
        w.write(images[:5], ids[:5])
        w.write(images[5:], ids[5:])
        split = np.zeros(n_stim, dtype=np.uint8)
        split[:3] = 1
        w.write_array("split", split)
    responses = rng.standard_normal((n_trials, n_vox)).astype(np.float32)
    ts = rng.integers(0, n_stim, n_trials)
    coords = rng.standard_normal((n_vox, 3)).astype(np.float32)
    rois = {"visual": RoiAtlas(np.arange(n_vox) % 3, {1: "V1", 2: "V2"})}
    with SubjectWriter(root / "subj01.h5", dataset="toy", subject="subj01", n_trials=n_trials, n_voxels=n_vox,
                       coords=coords, space="toy-mm", field_strength_tesla=7.0, units="z", rois=rois,
                       ncsnr=np.ones(n_vox), dtype=dtype, rows_per_chunk=4) as w:
        w.write_trials(responses[:8], ts[:8], np.zeros(8))
        w.write_trials(responses[8:], ts[8:], np.ones(n_trials - 8))
    write_manifest(root, {"dataset": "toy", "subjects": ["subj01"], "source": "test"})
    return images, ids, responses, ts, coords


def test_round_trip(tmp_path):
    images, ids, responses, ts, coords = make_store(tmp_path)
    store = Store(tmp_path)
    store.validate(deep=True)
    assert store.name == "toy" and store.subjects == ["subj01"]
    assert list(store.stimulus_ids) == ids and store.image_size == (8, 8)
    assert store.split.tolist()[:4] == [1, 1, 1, 0]
    info = store.subject("subj01")
    assert (info.n_trials, info.n_voxels) == responses.shape
    np.testing.assert_array_equal(info.trial_stimulus, ts)
    np.testing.assert_array_equal(info.coords, coords)
    assert info.rois["visual"].names().tolist()[:3] == ["none", "V1", "V2"]
    with h5py.File(info.path) as f:
        np.testing.assert_array_equal(f["responses"][:], responses)
        np.testing.assert_array_equal(f["images"][:] if "images" in f else images, images)
    with h5py.File(store.stimuli_path) as f:
        np.testing.assert_array_equal(f["images"][:], images)
        assert f["images"].chunks == (1, 8, 8, 3)  # one image per chunk: a batch reads only its images


def test_interrupted_writer_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with SubjectWriter(tmp_path / "subj01.h5", dataset="toy", subject="subj01", n_trials=4, n_voxels=2,
                           coords=np.zeros((2, 3)), space="s", field_strength_tesla=3, units="z") as w:
            w.write_trials(np.zeros((2, 2)), [0, 1])
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_incomplete_writer_refuses_to_close(tmp_path):
    w = SubjectWriter(tmp_path / "subj01.h5", dataset="toy", subject="subj01", n_trials=4, n_voxels=2,
                      coords=np.zeros((2, 3)), space="s", field_strength_tesla=3, units="z")
    w.write_trials(np.zeros((3, 2)), [0, 1, 2])
    with pytest.raises(StoreError, match="4 trials written"):
        w.close()
    assert not (tmp_path / "subj01.h5").exists()


def _corrupt(path, name, data):
    with h5py.File(path, "a") as f:
        del f[name]
        f.create_dataset(name, data=data)


@pytest.mark.parametrize("case, field, expected", [
    ("no_manifest", "<file>", "manifest"),
    ("no_responses", "responses", "float16/float32"),
    ("int_responses", "responses", "float16/float32"),
    ("stimulus_out_of_range", "trial_stimulus", "row indices in [0, 12)"),
    ("coords_mismatch", "voxels/coords", "shape (7, 3)"),
    ("roi_mismatch", "voxels/rois/visual", "shape (7,)"),
    ("images_dtype", "images", "uint8"),
    ("bad_split", "split", "values in"),
    ("unknown_subject", "subjects", "one of ['subj01']"),
])
def test_validation_errors_name_file_field_expected(tmp_path, case, field, expected):
    make_store(tmp_path)
    subj, stim = tmp_path / "subj01.h5", tmp_path / "stimuli.h5"
    target = subj
    if case == "no_manifest":
        (tmp_path / "manifest.yaml").unlink()
        target = tmp_path / "manifest.yaml"
    elif case == "no_responses":
        with h5py.File(subj, "a") as f:
            del f["responses"]
    elif case == "int_responses":
        _corrupt(subj, "responses", np.zeros((20, 7), dtype=np.int16))
    elif case == "stimulus_out_of_range":
        _corrupt(subj, "trial_stimulus", np.full(20, 12, dtype=np.int64))
    elif case == "coords_mismatch":
        _corrupt(subj, "voxels/coords", np.zeros((6, 3), dtype=np.float32))
    elif case == "roi_mismatch":
        _corrupt(subj, "voxels/rois/visual", np.zeros(5, dtype=np.int16))
    elif case == "images_dtype":
        _corrupt(stim, "images", np.zeros((12, 8, 8, 3), dtype=np.float32))
        target = stim
    elif case == "bad_split":
        _corrupt(stim, "split", np.full(12, 7, dtype=np.uint8))
        target = stim
    with pytest.raises(StoreError) as e:
        store = Store(tmp_path)
        if case == "unknown_subject":
            target = tmp_path / "manifest.yaml"
            store.subject("subj09")
    err = e.value
    assert err.field == field
    assert expected in err.expected
    assert str(target) in str(err)


def test_all_nan_voxel_is_reported_by_deep_check(tmp_path):
    make_store(tmp_path)
    with h5py.File(tmp_path / "subj01.h5", "a") as f:
        r = f["responses"][:]
        r[:, 4] = np.nan
        f["responses"][:] = r
    store = Store(tmp_path)  # shallow checks pass
    with pytest.raises(StoreError, match=r"1 all-NaN columns, first \[4\]"):
        store.validate(deep=True)


def test_float16_responses_round_trip(tmp_path):
    _, _, responses, _, _ = make_store(tmp_path, dtype="float16")
    with h5py.File(tmp_path / "subj01.h5") as f:
        assert f["responses"].dtype == np.float16
        np.testing.assert_allclose(f["responses"][:], responses, atol=2e-3)


def test_a_manifest_listing_subjects_as_a_mapping_opens(tmp_path):
    """A third-party writer may record per-subject information under ``subjects``: the names are
    the mapping's keys, in the file's order, and are still checked as plain names."""
    import yaml

    make_store(tmp_path)
    manifest = tmp_path / "manifest.yaml"
    data = yaml.safe_load(manifest.read_text())
    data["subjects"] = {"subj01": {"sessions": 40, "scanner": "7T"}}
    manifest.write_text(yaml.safe_dump(data, sort_keys=False))
    store = Store(tmp_path)
    assert store.subjects == ["subj01"] and store.subject("subj01").n_voxels == 7

    data["subjects"] = {"../subj01": {"sessions": 40}}
    manifest.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(StoreError, match="plain name") as e:
        Store(tmp_path)
    assert e.value.field == "subjects" and str(manifest) in str(e.value)

    data["subjects"] = "subj01"
    manifest.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(StoreError, match="a list of subject names, or a mapping") as e:
        Store(tmp_path)

"""Algonauts 2023, BOLD5000, GOD, THINGS-fMRI and vim-1 importers on miniature real-layout sources."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

# tests/unit is not a package: make the repository root importable for tests.fixtures.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from brainenc.data.importers import main_prepare, prepare  # noqa: E402
from brainenc.data.importers.algonauts import ncsnr_to_nc, noise_normalized_score  # noqa: E402
from brainenc.data.importers.base import SourceError  # noqa: E402
from brainenc.data.importers.god import label_to_name  # noqa: E402
from brainenc.data.store import SPLIT_TEST, Store, StoreError  # noqa: E402
from tests.fixtures.algonauts import write_algonauts  # noqa: E402
from tests.fixtures.bold5000 import write_bold5000  # noqa: E402
from tests.fixtures.god import write_god  # noqa: E402
from tests.fixtures.stores import (algonauts_prepared, bold5000_prepared, god_prepared,  # noqa: E402,F401
                                   things_prepared, vim1_prepared)
from tests.fixtures.things import ROI_COLUMNS, write_things  # noqa: E402
from tests.fixtures.vim1 import GRID, write_vim1  # noqa: E402


def _h5(path, *names):
    with h5py.File(path, "r") as f:
        return [f[n][:] for n in names]


def _ids(store, subject):
    return list(store.stimulus_ids[store.subject(subject).trial_stimulus])


def _image(store, sid):
    row = list(store.stimulus_ids).index(sid)
    with h5py.File(store.stimuli_path, "r") as f:
        return f["images"][row]


def _copy(src, dst):
    shutil.copytree(src, dst)
    return Path(dst)


# ----------------------------------------------------------------------------- Algonauts 2023


def test_algonauts_values_coords_rois_split(algonauts_prepared):
    out, fx = algonauts_prepared
    store = Store(out)
    store.validate()
    for subject in fx.subjects:
        info = store.subject(subject)
        r, hemi, vertex = _h5(info.path, "responses", "voxels/hemi", "voxels/vertex")
        np.testing.assert_allclose(r, fx.fmri[subject], rtol=1e-6)
        assert _ids(store, subject) == [f"nsd-{i:05d}" for i in fx.train_ids[subject]]
        np.testing.assert_array_equal(hemi, fx.fs_index[subject][0])
        np.testing.assert_array_equal(vertex, fx.fs_index[subject][1])
        mesh = np.where(hemi[:, None] == 0, fx.mesh["lh"][vertex], fx.mesh["rh"][vertex])
        np.testing.assert_allclose(info.coords, mesh, atol=1e-4)
        vis = info.rois["prf-visualrois"]
        np.testing.assert_array_equal(vis.values, fx.rois[subject]["prf-visualrois"])
        assert vis.labels[1] == "V1v" and 0 not in vis.labels and info.rois["floc-faces"].labels[2] == "FFA-1"
    train = set().union(*map(set, fx.train_ids.values()))
    test = set().union(*map(set, fx.test_ids.values())) - train
    got_test = {int(s[4:]) for s, sp in zip(store.stimulus_ids, store.split) if sp == SPLIT_TEST}
    assert got_test == test and len(test) > 0
    # PNG at the stored size: pixels copied exactly
    from PIL import Image

    sid = f"nsd-{fx.train_ids['subj01'][0]:05d}"
    png = next((fx.root / "subj01/training_split/training_images").glob(f"train-0001_{sid}.png"))
    np.testing.assert_array_equal(_image(store, sid), np.asarray(Image.open(png).convert("RGB")))


def test_algonauts_roi_selection_and_errors(algonauts_prepared, tmp_path):
    _, fx = algonauts_prepared
    out = prepare("algonauts2023", fx.root, tmp_path / "v1", subjects=["subj01"], roi="prf-visualrois:V1v,V1d",
                  image_size=12, checksum="none")
    info = Store(out).subject("subj01")
    assert info.n_voxels == int(np.isin(fx.rois["subj01"]["prf-visualrois"], [1, 2]).sum())
    with pytest.raises(StoreError, match="roi"):
        prepare("algonauts2023", fx.root, tmp_path / "e1", roi="kastner", checksum="none")
    with pytest.raises(SourceError, match="subjects"):
        prepare("algonauts2023", fx.root, tmp_path / "e2", subjects=["subj09"], checksum="none")
    root = _copy(fx.root, tmp_path / "src")
    next((root / "subj02/training_split/training_images").glob("train-0002_*.png")).unlink()
    with pytest.raises(SourceError, match=r"training_images: field 'images'.*missing: train-0002"):
        prepare("algonauts2023", root, tmp_path / "e3", subjects=["subj02"], checksum="none")
    shutil.rmtree(root / "fsaverage")
    with pytest.raises(SourceError, match="fsaverage"):
        prepare("algonauts2023", root, tmp_path / "e4", subjects=["subj01"], checksum="none")


def test_algonauts_score_helpers():
    r = np.array([0.5, 0.2, np.nan, 0.3])
    nc = np.array([50.0, 20.0, 30.0, 0.0])  # percent; the NC = 0 vertex is left out
    assert noise_normalized_score(r, nc) == pytest.approx(np.mean([100 * 0.25 / 0.5, 100 * 0.04 / 0.2]))
    np.testing.assert_allclose(ncsnr_to_nc(np.array([1.0]), 3), [75.0])


# ----------------------------------------------------------------------------- BOLD5000


def test_bold5000_values_split_rois(bold5000_prepared):
    out, fx = bold5000_prepared
    store = Store(out)
    store.validate()
    subject, csi = "subj01", fx.subjects[0]
    info = store.subject(subject)
    r, ijk, sess = _h5(info.path, "responses", "voxels/ijk", "trial_session")
    expected_ijk = np.argwhere(fx.brain[csi] & (fx.roi[csi] > 0))
    np.testing.assert_array_equal(ijk, expected_ijk)
    i, j, k = ijk.T
    np.testing.assert_allclose(r, fx.betas[csi][:, i, j, k], rtol=1e-6)
    assert _ids(store, subject) == [f"bold5000-{Path(n).stem}" for n in fx.names[csi]]
    np.testing.assert_array_equal(sess, np.repeat([1, 2], fx.session_trials))
    np.testing.assert_allclose(info.coords, ijk @ fx.affine[:3, :3].T + fx.affine[:3, 3], atol=1e-4)
    np.testing.assert_array_equal(info.rois["bold5000-rois"].values, fx.roi[csi][i, j, k])
    assert info.rois["bold5000-rois"].labels[4] == "PPA"
    assert set(np.unique(info.rois["hemisphere"].values)) == {1, 2}
    test = {s for s, sp in zip(store.stimulus_ids, store.split) if sp == SPLIT_TEST}
    assert test == {f"bold5000-{Path(n).stem}" for n in fx.repeated}
    assert info.field_strength_tesla == 3.0


def test_bold5000_zscore_and_errors(bold5000_prepared, tmp_path):
    _, fx = bold5000_prepared
    out = prepare("bold5000", fx.root, tmp_path / "z", sessions=2, roi="all", image_size=12, checksum="none")
    info = Store(out).subject("subj01")
    assert info.n_voxels == int(fx.brain["CSI1"].sum())
    (r,) = _h5(info.path, "responses")
    np.testing.assert_allclose(r[:8].mean(0), 0, atol=1e-5)
    with pytest.raises(SourceError, match="ses-03"):
        prepare("bold5000", fx.root, tmp_path / "e1", sessions=3, checksum="none")
    root = _copy(fx.root, tmp_path / "src")
    names = (root / "CSI1_imgnames.txt").read_text().splitlines()
    (root / "CSI1_imgnames.txt").write_text("\n".join(names[:-3]) + "\n")
    with pytest.raises(SourceError, match="imgnames.txt"):
        prepare("bold5000", root, tmp_path / "e2", sessions=2, checksum="none")


# ----------------------------------------------------------------------------- GOD


def test_god_values_split_coords(god_prepared):
    out, fx = god_prepared
    store = Store(out)
    store.validate()
    for n, subject in enumerate(fx.subjects, start=1):
        info = store.subject(f"subj{n:02d}")
        vc = fx.rois[subject]["VC"]
        (r,) = _h5(info.path, "responses")
        np.testing.assert_allclose(r, fx.data[subject][:, vc], rtol=1e-6)  # imagery dropped
        assert _ids(store, info.subject) == [f"god-{s}" for s in fx.labels[subject]]
        np.testing.assert_allclose(info.coords, fx.xyz[subject][vc], atol=1e-4)
        np.testing.assert_array_equal(info.rois["V1"].values, fx.rois[subject]["V1"][vc])
        assert info.rois["FFA"].labels == {1: "FFA"}
    test = {s for s, sp in zip(store.stimulus_ids, store.split) if sp == SPLIT_TEST}
    assert test == {f"god-{s}" for s in fx.test}
    assert label_to_name(1518878.005958) == "n01518878_5958"


def test_god_legacy_names_and_errors(tmp_path):
    fx = write_god(tmp_path / "src", subjects=("Subject3",), legacy_names=True)
    out = prepare("god", fx.root, tmp_path / "o", roi="V1", image_size=12, checksum="none")
    info = Store(out).subject("subj03")
    assert info.n_voxels == int(fx.rois["Subject3"]["V1"].sum())
    with pytest.raises(SourceError, match="Subject1"):
        prepare("god", fx.root, tmp_path / "e1", subjects=["1"], checksum="none")
    next((fx.root / "images/test").glob("*.JPEG")).unlink()
    with pytest.raises(SourceError, match="image file for every stimulus_id.*allow-missing images"):
        prepare("god", fx.root, tmp_path / "e2", checksum="none")
    with h5py.File(fx.root / "Subject3.h5", "a") as f:
        del f["metaData/value"]
        f["metaData"].create_dataset("value", data=np.zeros((3, 3)))
    with pytest.raises(SourceError, match="metaData/value"):
        prepare("god", fx.root, tmp_path / "e3", checksum="none")


# ----------------------------------------------------------------------------- THINGS-fMRI


def test_things_values_split_rois(things_prepared):
    out, fx = things_prepared
    store = Store(out)
    store.validate()
    info = store.subject("subj01")
    df, vox = fx.trials["sub-01"], fx.voxels["sub-01"]
    sel = (vox[ROI_COLUMNS].to_numpy() > 0).any(1)  # default 'any': every ROI column is in an atlas
    (r, sess) = _h5(info.path, "responses", "trial_session")
    np.testing.assert_allclose(r, fx.betas["sub-01"][sel].T, rtol=1e-6)  # trial column t = CSV row t
    assert _ids(store, "subj01") == [f"things-{Path(s).stem}" for s in df.stimulus]
    np.testing.assert_array_equal(sess, df.session)
    np.testing.assert_allclose(info.coords, vox[["voxel_x", "voxel_y", "voxel_z"]].to_numpy()[sel] * 2.0)
    cat = info.rois["category-rois"]
    ffa = [k for k, v in cat.labels.items() if v == "FFA"][0]
    np.testing.assert_array_equal(cat.values == ffa, ((vox.lFFA + vox.rFFA) > 0).to_numpy()[sel])
    test = {s for s, sp in zip(store.stimulus_ids, store.split) if sp == SPLIT_TEST}
    assert test == {"things-banana_13s", "things-dog_14n"}


def test_things_errors(things_prepared, tmp_path):
    _, fx = things_prepared
    root = _copy(fx.root, tmp_path / "src")
    df = fx.trials["sub-01"]
    df.iloc[:-1].to_csv(root / "betas_csv/sub-01_StimulusMetadata.csv", index=False)
    with pytest.raises(SourceError, match="trial columns"):
        prepare("things-fmri", root, tmp_path / "e1", checksum="none")
    with pytest.raises(SourceError, match="roi"):
        prepare("things-fmri", fx.root, tmp_path / "e2", roi="MT", checksum="none")


# ----------------------------------------------------------------------------- vim-1


def test_vim1_values_nan_voxels_coords(vim1_prepared):
    out, fx = vim1_prepared
    store = Store(out)
    store.validate()
    for n, s in enumerate(("S1", "S2"), start=1):
        info = store.subject(f"subj{n:02d}")
        (r, src_idx) = _h5(info.path, "responses", "voxels/source_index")
        resp = np.concatenate([fx.trn[s], fx.val[s]], axis=1).T
        sel = np.isfinite(resp).all(0) & (fx.roi[s] > 0)
        np.testing.assert_array_equal(src_idx, np.flatnonzero(sel))
        assert not sel[3] and not sel[5]  # all-NaN and one-NaN voxels dropped
        np.testing.assert_allclose(r, resp[:, sel], rtol=1e-6)
        ijk = np.stack(np.unravel_index(fx.idx[s][sel] - 1, GRID, order="F"), 1)
        np.testing.assert_allclose(info.coords, ijk * [2.0, 2.0, 2.5], atol=1e-5)
        np.testing.assert_array_equal(info.rois["vim1-rois"].values, fx.roi[s][sel])
    assert (store.split == SPLIT_TEST).sum() == fx.stim_val.shape[0]
    assert store.stimulus_ids[0] == "vim1-trn-0000"


def test_vim1_images_drop_all_and_errors(vim1_prepared, tmp_path):
    _, fx = vim1_prepared
    out = prepare("vim-1", fx.root, tmp_path / "o", subjects=["S1"], roi="all", nan_voxels="keep",
                  image_size=128, checksum="none")
    store = Store(out)
    assert store.subject("subj01").n_voxels == fx.trn["S1"].shape[0] - 1  # only the all-NaN voxel
    img = _image(store, "vim1-val-001")
    want = np.clip(np.round((fx.stim_val[1] + 0.5) * 255), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(img, np.repeat(want[..., None], 3, axis=2))
    root = tmp_path / "bad"
    write_vim1(root)
    with h5py.File(root / "EstimatedResponses.mat", "a") as f:
        del f["dataValS1"]
        f.create_dataset("dataValS1", data=np.zeros((4, 7), np.float32))
    with pytest.raises(SourceError, match="dataValS1"):
        prepare("vim-1", root, tmp_path / "e1", subjects=["S1"], checksum="none")
    with pytest.raises(SourceError, match="nan_voxels"):
        prepare("vim-1", root, tmp_path / "e2", nan_voxels="some", checksum="none")


# ----------------------------------------------------------------------------- CLI for every dataset


@pytest.mark.parametrize("name, writer, extra", [
    ("algonauts2023", write_algonauts, []),
    ("bold5000", write_bold5000, ["-o", "sessions=2"]),
    ("god", write_god, []),
    ("things-fmri", write_things, []),
    ("vim-1", write_vim1, []),
])
def test_main_prepare_each_dataset(tmp_path, name, writer, extra):
    fx = writer(tmp_path / "src")
    rc = main_prepare([name, "--source", str(fx.root), "--out", str(tmp_path / "store"), "--image-size", "16",
                       "--quiet", *extra])
    assert rc == 0
    store = Store(tmp_path / "store")
    store.validate()
    assert store.image_size == (16, 16)
    files = store.manifest["source_files"]
    assert files and all(v["checksum"].startswith("sha256:") for v in files.values())

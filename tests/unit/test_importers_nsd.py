"""NSD importer on a miniature NSD in the real layout (tests/fixtures/nsd.py)."""

from __future__ import annotations

import sys
from pathlib import Path

# tests/unit is not a package: make the repository root importable for tests.fixtures.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import h5py
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402

from brainenc.data.importers import IMPORTERS, main_prepare, prepare
from brainenc.data.importers.base import SourceError
from brainenc.data.store import SPLIT_TEST, Store, StoreError
from tests.fixtures.nsd import ATLAS_LABELS, OTHER_ATLAS_LABELS, TRIALS, write_nsd


@pytest.fixture(scope="module")
def nsd_source(tmp_path_factory):
    return write_nsd(tmp_path_factory.mktemp("nsd_src"), fmt="both", surface=True)


@pytest.fixture(scope="module")
def nsd_store(nsd_source, tmp_path_factory):
    """Prepared NSD store (raw percent signal change, no z-scoring): returns its path."""
    out = tmp_path_factory.mktemp("nsd_store") / "nsd"
    return prepare("nsd", nsd_source.root, out, image_size=12, sessions=2, zscore=False)


def _read(store_path, subject):
    with h5py.File(store_path / f"{subject}.h5", "r") as f:
        return {k: f[k][:] for k in ("responses", "trial_stimulus", "trial_session", "voxels/ijk",
                                     "voxels/coords")}


def test_registry_has_every_dataset():
    assert set(IMPORTERS) == {"nsd", "algonauts2023", "bold5000", "god", "things-fmri", "vim-1"}


def test_responses_land_at_the_right_trials_and_voxels(nsd_source, nsd_store):
    store = Store(nsd_store)
    store.validate()
    assert store.subjects == ["subj01", "subj02"]
    for subject in store.subjects:
        d = _read(nsd_store, subject)
        i, j, k = d["voxels/ijk"].T
        expected = nsd_source.betas[subject][:, i, j, k] / 300.0
        np.testing.assert_allclose(d["responses"], expected, rtol=1e-6, atol=1e-6)
        # trial -> stimulus: masterordering -> subjectim (1-based) -> nsd-<0-based 73k>
        ids = store.stimulus_ids[d["trial_stimulus"]]
        assert list(ids) == [f"nsd-{x:05d}" for x in nsd_source.trial_73k[subject]]
        np.testing.assert_array_equal(d["trial_session"], np.repeat([1, 2], TRIALS))
        # selected voxels are exactly nsdgeneral == 1, in C order over (X, Y, Z)
        np.testing.assert_array_equal(d["voxels/ijk"], np.argwhere(nsd_source.rois[subject]["nsdgeneral"] == 1))


def test_coords_rois_ncsnr(nsd_source, nsd_store):
    store = Store(nsd_store)
    info = store.subject("subj01")
    ijk = _read(nsd_store, "subj01")["voxels/ijk"]
    mm = ijk @ nsd_source.affine[:3, :3].T + nsd_source.affine[:3, 3]
    np.testing.assert_allclose(info.coords, mm, atol=1e-4)
    i, j, k = ijk.T
    np.testing.assert_allclose(info.ncsnr, nsd_source.ncsnr["subj01"][i, j, k], rtol=1e-6)
    vis = info.rois["prf-visualrois"]
    np.testing.assert_array_equal(vis.values, nsd_source.rois["subj01"]["prf-visualrois"][i, j, k])
    assert vis.labels[1] == "V1v" and vis.labels[7] == "hV4"
    assert set(info.rois) == {"nsdgeneral", *ATLAS_LABELS, *OTHER_ATLAS_LABELS}  # every atlas of the manifest
    assert info.rois["floc-faces"].labels[2] == "FFA-1"
    assert info.field_strength_tesla == 7.0 and "func1pt8mm" in info.space


def test_split_and_stimuli(nsd_source, nsd_store):
    store = Store(nsd_store)
    nums = np.array([int(s.split("-")[1]) for s in store.stimulus_ids])
    seen = np.unique(np.concatenate([nsd_source.trial_73k[s] for s in nsd_source.subjects]))
    np.testing.assert_array_equal(nums, seen)
    np.testing.assert_array_equal(store.split == SPLIT_TEST, np.isin(nums, nsd_source.shared))
    assert store.visual_angle_deg == 8.4
    with h5py.File(store.stimuli_path, "r") as f:
        np.testing.assert_array_equal(f["images"][:], nsd_source.images[nums])  # same size: exact copy
        np.testing.assert_array_equal(f["labels/coco_id"][:], 1000 + nums)
    # repeats of a stimulus never straddle the split: split is per stimulus by construction
    m = store.manifest
    assert m["split"]["rule"] == "shared1000" and m["split"]["n_test"] == len(nsd_source.shared)


def test_manifest_records_source_files(nsd_store):
    m = yaml.safe_load((nsd_store / "manifest.yaml").read_text())
    files = m["source_files"]
    for key in ("nsddata/experiments/nsd/nsd_expdesign.mat", "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5",
                "nsddata_betas/ppdata/subj02/func1pt8mm/betas_fithrf_GLMdenoise_RR/betas_session02.hdf5",
                "nsddata/ppdata/subj01/func1pt8mm/roi/nsdgeneral.nii.gz",
                "nsddata/freesurfer/subj01/label/prf-visualrois.mgz.ctab"):
        assert files[key]["checksum"].startswith("sha256:") and files[key]["size"] > 0
    assert "Allen" in m["citation"] and m["dataset"] == "nsd"


def test_zscore_per_session_and_nifti_equals_hdf5(nsd_source, nsd_store, tmp_path):
    out = prepare("nsd", nsd_source.root, tmp_path / "z", image_size=12, sessions=2, format="nifti",
                  subjects=["subj01"], checksum="none")
    z = _read(out, "subj01")["responses"].astype(np.float64)
    raw = _read(nsd_store, "subj01")["responses"].astype(np.float64)
    for s in range(2):
        sl = slice(s * TRIALS, (s + 1) * TRIALS)
        np.testing.assert_allclose(z[sl].mean(0), 0, atol=1e-5)
        np.testing.assert_allclose(z[sl].std(0), 1, atol=1e-4)
        expect = (raw[sl] - raw[sl].mean(0)) / raw[sl].std(0)
        np.testing.assert_allclose(z[sl], expect, atol=1e-4)
    assert Store(out).subject("subj01").units.startswith("z-score")


def test_roi_label_selection_and_image_resize(nsd_source, tmp_path):
    out = prepare("nsd", nsd_source.root, tmp_path / "v1", subjects=["1"], roi="prf-visualrois:V1v,V1d",
                  image_size=8, sessions=1, checksum="none")
    store = Store(out)
    info = store.subject("subj01")
    assert info.n_trials == TRIALS and store.image_size == (8, 8)
    vis = nsd_source.rois["subj01"]["prf-visualrois"]
    assert info.n_voxels == int(np.isin(vis, [1, 2]).sum())
    assert set(np.unique(info.rois["prf-visualrois"].values)) <= {1, 2}


def test_fsaverage_surface_path(nsd_source, tmp_path):
    out = prepare("nsd", nsd_source.root, tmp_path / "fs", subjects=["subj01"], image_size=12, sessions=2,
                  space="fsaverage", zscore=False, checksum="none")
    store = Store(out)
    store.validate()
    info = store.subject("subj01")
    with h5py.File(info.path, "r") as f:
        hemi, vertex, r = f["voxels/hemi"][:], f["voxels/vertex"][:], f["responses"][:]
    n = nsd_source.n_vertices
    col = hemi.astype(int) * n + vertex
    np.testing.assert_allclose(r, nsd_source.surface_betas["subj01"][:, col], rtol=1e-6)
    keep = np.arange(n) % 3 != 0  # fixture's nsdgeneral on each hemisphere
    assert info.n_voxels == 2 * keep.sum()
    assert info.space.startswith("fsaverage")


def test_main_prepare_cli_and_env_default(nsd_source, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BRAINENC_DATA", str(nsd_source.root.parent))
    # $BRAINENC_DATA/<name>: symlink the fixture under the dataset's name
    (nsd_source.root.parent / "nsd").symlink_to(nsd_source.root, target_is_directory=True)
    rc = main_prepare(["nsd", "--out", str(tmp_path / "cli"), "--subjects", "subj02", "--image-size", "12",
                       "-o", "sessions=1", "-o", "zscore=false", "--checksum", "none", "--quiet"])
    assert rc == 0
    store = Store(tmp_path / "cli")
    assert store.subjects == ["subj02"] and store.subject("subj02").n_trials == TRIALS
    rc = main_prepare(["nsd", "--source", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")])
    assert rc == 2 and "nowhere" in capsys.readouterr().err


def test_resume_after_interruption(nsd_source, tmp_path, monkeypatch):
    out = tmp_path / "resume"
    from brainenc.data.importers import nsd as nsd_mod

    real = nsd_mod.NSDImporter._read_volume_session
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # subj02, first session
            raise KeyboardInterrupt("simulated interruption")
        return real(*a, **k)

    monkeypatch.setattr(nsd_mod.NSDImporter, "_read_volume_session", staticmethod(flaky))
    with pytest.raises(KeyboardInterrupt):
        prepare("nsd", nsd_source.root, out, image_size=12, sessions=2, checksum="none")
    assert not (out / "manifest.yaml").exists() and not list(out.glob(".*.tmp"))
    with pytest.raises(StoreError):
        Store(out)
    assert (out / "subj01.h5").exists() and not (out / "subj02.h5").exists()
    monkeypatch.setattr(nsd_mod.NSDImporter, "_read_volume_session", staticmethod(real))
    mtime = (out / "subj01.h5").stat().st_mtime_ns
    logs = []
    prepare("nsd", nsd_source.root, out, image_size=12, sessions=2, checksum="none", log=logs.append)
    assert (out / "subj01.h5").stat().st_mtime_ns == mtime  # kept, not rewritten
    assert any("subj01: complete, kept" in m for m in logs)
    Store(out).validate()
    # different options -> the stale file is rewritten, not trusted
    logs.clear()
    prepare("nsd", nsd_source.root, out, image_size=12, sessions=1, checksum="none", log=logs.append)
    assert Store(out).subject("subj01").n_trials == TRIALS
    # restart wipes and redoes everything
    logs.clear()
    prepare("nsd", nsd_source.root, out, image_size=12, sessions=1, checksum="none", restart=True,
            log=logs.append)
    assert not any("kept" in m for m in logs)


# ----------------------------------------------------------------------------- errors


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst, symlinks=True)
    return dst


@pytest.mark.parametrize("kwargs, match", [
    ({"subjects": ["subj09"]}, "subjects"),
    ({"roi": "nope"}, "roi"),
    ({"roi": "prf-visualrois:V9"}, "V9"),
    ({"sessions": 3}, r"betas_session03.hdf5: field 'sessions'.*missing: session03"),
    ({"sessions": 41}, "options/sessions"),
    ({"space": "mni"}, "options/space"),
    ({"bogus_option": 1}, "options"),
])
def test_bad_arguments_raise_store_errors(nsd_source, tmp_path, kwargs, match):
    args = {"image_size": 12, "sessions": 2, "checksum": "none", **kwargs}
    with pytest.raises(StoreError, match=match):
        prepare("nsd", nsd_source.root, tmp_path / "bad", **args)
    assert not (tmp_path / "bad" / "manifest.yaml").exists()


def test_wrong_root(tmp_path):
    with pytest.raises(SourceError, match="root of the nsd dataset"):
        prepare("nsd", tmp_path / "missing", tmp_path / "o")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="subjects"):
        prepare("nsd", tmp_path / "empty", tmp_path / "o")


def test_malformed_files(nsd_source, tmp_path):
    root = _copy(nsd_source.root, tmp_path / "src")
    f5 = root / "nsddata_betas/ppdata/subj01/func1pt8mm/betas_fithrf_GLMdenoise_RR/betas_session02.hdf5"
    good = f5.read_bytes()
    with h5py.File(f5, "w") as f:  # wrong shape
        f.create_dataset("betas", data=np.zeros((750, 5, 7, 5), np.int16))
    with pytest.raises(SourceError, match=r"betas_session02.hdf5.*betas.*shape"):
        prepare("nsd", root, tmp_path / "o1", subjects=["subj01"], sessions=2, checksum="none")
    with h5py.File(f5, "w") as f:  # wrong dtype
        f.create_dataset("betas", data=np.zeros((750, 5, 7, 6), np.float64))
    with pytest.raises(SourceError, match="int16"):
        prepare("nsd", root, tmp_path / "o2", subjects=["subj01"], sessions=2, checksum="none")
    assert not (tmp_path / "o2" / "subj01.h5").exists()  # aborted writer leaves nothing
    f5.write_bytes(good)
    with h5py.File(root / "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5", "a") as f:
        del f["imgBrick"]
        f.create_dataset("imgBrick", data=np.zeros((3, 4, 4, 3), np.uint8))
    with pytest.raises(SourceError, match="imgBrick"):
        prepare("nsd", root, tmp_path / "o3", subjects=["subj01"], sessions=2, checksum="none")
    (root / "nsddata/experiments/nsd/nsd_expdesign.mat").unlink()
    with pytest.raises(SourceError, match="nsd_expdesign.mat"):
        prepare("nsd", root, tmp_path / "o4", subjects=["subj01"], sessions=2, checksum="none")


def test_fewer_sessions_than_the_design_hints_the_option(nsd_source, tmp_path):
    """A partial download (2 of the manifest's sessions) says how to import what is there."""
    with pytest.raises(SourceError, match=r"betas_session03.hdf5: field 'sessions'.*sessions 1..2 are present: "
                                          r"import them with -o sessions=2.*missing: session03 \(and 37 more\)"):
        prepare("nsd", nsd_source.root, tmp_path / "o", image_size=12, checksum="none")
    assert not (tmp_path / "o").exists()

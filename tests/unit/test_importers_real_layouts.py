"""Importers on miniature copies written the way the datasets' authors write their files.

GOD BData with ``stimulus_id`` (current release) and ``Label`` (older files); THINGS-fMRI frames
written by ``pandas.to_hdf(format='fixed')`` with integer trial columns (pickled labels, never
unpickled); BOLD5000 masks with the release's irregular names in ``sub-CSIn/`` folders; vim-1
``Stimuli.mat`` as MATLAB v5.  Nothing missing is silent (error, or ``--allow-missing`` and a
record in the manifest), ``--dry-run`` writes nothing, and every layout error is one line.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402

from brainenc.data.importers import dry_run, main_prepare, prepare  # noqa: E402
from brainenc.data.importers.base import SourceError  # noqa: E402
from brainenc.data.store import SPLIT_TEST, Store  # noqa: E402
from tests.fixtures.algonauts import write_algonauts  # noqa: E402
from tests.fixtures.bold5000 import write_bold5000  # noqa: E402
from tests.fixtures.god import write_god  # noqa: E402
from tests.fixtures.nsd import write_nsd  # noqa: E402
from tests.fixtures.things import ROI_COLUMNS, write_response_data, write_things  # noqa: E402
from tests.fixtures.vim1 import write_vim1  # noqa: E402

FAST = {"image_size": 12, "checksum": "none"}


def _h5(path, *names):
    with h5py.File(path, "r") as f:
        return [f[n][:] for n in names]


def _ids(store, subject):
    return list(store.stimulus_ids[store.subject(subject).trial_stimulus])


def _report(out):
    return yaml.safe_load((Path(out) / "manifest.yaml").read_text())["import_report"]


def _tree(root):
    """{relative path: (size, mtime_ns)} of every file under ``root``."""
    root = Path(root)
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def _cli_error(capsys, argv) -> str:
    """Run ``brainenc prepare argv``; assert exit 2 and a one-line error; return that line."""
    assert main_prepare(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("brainenc prepare: error: "), err
    assert "Traceback" not in err
    return err


# ----------------------------------------------------------------------------- GOD


@pytest.mark.parametrize("label_key", ["stimulus_id", "Label"])
def test_god_both_label_keys_import_exactly(tmp_path, label_key):
    fx = write_god(tmp_path / "src", label_key=label_key)
    with h5py.File(fx.root / "Subject1.h5", "r") as f:  # the layout bdpy writes
        assert {"dataset", "metadata", "header", "vmap"} <= set(f) and label_key in f["vmap"]
        assert [k.decode() for k in f["metadata/key"][:]][4] == label_key
    store = Store(prepare("god", fx.root, tmp_path / "o", roi="VC", **FAST))
    store.validate()
    for n, subject in enumerate(fx.subjects, start=1):
        info = store.subject(f"subj{n:02d}")
        vc = fx.rois[subject]["VC"]
        (r,) = _h5(info.path, "responses")
        np.testing.assert_allclose(r, fx.data[subject][:, vc], rtol=1e-6)
        assert _ids(store, info.subject) == [f"god-{s}" for s in fx.labels[subject]]
        assert info.n_voxels == int(vc.sum())
        np.testing.assert_array_equal(info.rois["V1"].values, fx.rois[subject]["V1"][vc])
    assert {s for s, sp in zip(store.stimulus_ids, store.split) if sp == SPLIT_TEST} == {f"god-{s}" for s in fx.test}


def test_god_without_label_key_is_one_line_naming_file_and_field(tmp_path, capsys):
    fx = write_god(tmp_path / "src", subjects=("Subject1",))
    with h5py.File(fx.root / "Subject1.h5", "a") as f:
        keys = [k.decode() for k in f["metadata/key"][:]]
        keys[keys.index("stimulus_id")] = "image_index"
        del f["metadata/key"]
        f["metadata"].create_dataset("key", data=np.array(keys, dtype=h5py.string_dtype()))
    err = _cli_error(capsys, ["god", "--source", str(fx.root), "--out", str(tmp_path / "o")])
    assert "Subject1.h5: field 'metadata/stimulus_id'" in err and "Label" in err


@pytest.mark.parametrize("with_session", [False, True])
def test_god_dry_run_reports_runs_as_runs_and_sessions_when_present(tmp_path, capsys, with_session):
    fx = write_god(tmp_path / "src", subjects=("Subject1",), with_session=with_session)
    assert main_prepare(["god", "--source", str(fx.root), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    # 11 perception samples, three per run: runs 1-4 (imagery samples of run 4-5 are not imported)
    s = dry_run("god", fx.root, log=None)["subjects"]["subj01"]
    assert s["runs"] == [1, 2, 3, 4]
    if with_session:
        assert s["sessions"] == [1, 2] and "sessions 2 (1-2), runs 4 (1-4), 11 trials" in printed
    else:
        assert s["sessions"] is None and "sessions -, runs 4 (1-4), 11 trials" in printed
    store = Store(prepare("god", fx.root, tmp_path / "o", **FAST))
    info = store.subject("subj01")
    with h5py.File(info.path, "r") as f:
        assert f.attrs["trial_session_is"] == ("session" if with_session else "run")
    expect = np.where(fx.dtype["Subject1"] == 1, 1, 2) if with_session else np.arange(11) // 3 + 1
    np.testing.assert_array_equal(info.trial_session, expect)


# ----------------------------------------------------------------------------- THINGS-fMRI


def test_things_pandas_frame_is_read_from_its_blocks_without_unpickling(tmp_path, monkeypatch):
    import pickle

    fx = write_things(tmp_path / "src")
    rpath = fx.root / "betas_csv/sub-01_ResponseData.h5"
    with h5py.File(rpath, "r") as f:  # what pandas wrote: pickled mixed labels, int voxel_id block
        g = f["ResponseData"]
        assert g["axis0"].dtype.kind == "O" and g["block0_items"].dtype.kind == "O"
        assert g["block1_items"][()].tolist() == [b"voxel_id"] and g["block1_values"].dtype.kind == "i"

    def refuse(*a, **k):
        raise AssertionError("the importer unpickled something")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    store = Store(prepare("things-fmri", fx.root, tmp_path / "o", roi="all", **FAST))
    monkeypatch.undo()
    store.validate()
    info = store.subject("subj01")
    df = fx.trials["sub-01"]
    (r, sess) = _h5(info.path, "responses", "trial_session")
    np.testing.assert_array_equal(r, fx.betas["sub-01"].T)  # trial column t = StimulusMetadata row t
    assert _ids(store, "subj01") == [f"things-{Path(s).stem}" for s in df.stimulus]
    np.testing.assert_array_equal(sess, df.session)
    assert info.n_voxels == len(fx.voxels["sub-01"])
    # pandas itself reads the same frame back: the fixture is the authors' format
    import pandas as pd

    back = pd.read_hdf(rpath, "ResponseData")
    assert list(back.columns[:3]) == ["voxel_id", 0, 1]
    np.testing.assert_array_equal(back.drop(columns=["voxel_id"]).to_numpy().T, r)


def test_things_roi_voxel_counts_and_missing_roi_column(tmp_path):
    fx = write_things(tmp_path / "src")
    vox = fx.voxels["sub-01"]
    store = Store(prepare("things-fmri", fx.root, tmp_path / "o", **FAST))
    info = store.subject("subj01")
    assert info.n_voxels == int((vox[ROI_COLUMNS].to_numpy() > 0).any(1).sum())
    ffa = [k for k, v in info.rois["category-rois"].labels.items() if v == "FFA"][0]
    sel = (vox[ROI_COLUMNS].to_numpy() > 0).any(1)
    assert int((info.rois["category-rois"].values == ffa).sum()) == int(((vox.lFFA + vox.rFFA) > 0)[sel].sum())
    vox.drop(columns=["rRSC"]).to_csv(fx.root / "betas_csv/sub-01_VoxelMetadata.csv", index=False)
    with pytest.raises(SourceError, match=r"VoxelMetadata.csv: field 'rois'.*missing: rRSC"):
        prepare("things-fmri", fx.root, tmp_path / "e", **FAST)
    out = prepare("things-fmri", fx.root, tmp_path / "o2", allow_missing=["rois"], **FAST)
    assert _report(out)["subj01"]["missing_roi_masks"] == ["rRSC"]


def test_things_unexpected_layouts_are_one_line_errors(tmp_path, capsys):
    import pandas as pd

    fx = write_things(tmp_path / "src")
    rpath = fx.root / "betas_csv/sub-01_ResponseData.h5"
    argv = ["things-fmri", "--source", str(fx.root), "--out", str(tmp_path / "o")]
    # PyTables 'table' format instead of 'fixed'
    df = pd.DataFrame(fx.betas["sub-01"], columns=[f"t{i}" for i in range(fx.betas["sub-01"].shape[1])])
    df.insert(0, "voxel_id", np.arange(len(df)))
    df.to_hdf(rpath, key="ResponseData", format="table", mode="w")
    assert "field 'ResponseData/pandas_type'" in _cli_error(capsys, argv)
    # voxel rows in another order than VoxelMetadata.csv
    write_response_data(rpath, fx.betas["sub-01"], np.arange(len(df))[::-1])
    err = _cli_error(capsys, argv)
    assert "sub-01_ResponseData.h5: field 'voxel_id'" in err and "another order" in err
    # not HDF5 at all
    rpath.write_text("voxel_id,0,1\n")
    assert "sub-01_ResponseData.h5: field '<file>'" in _cli_error(capsys, argv)


# ----------------------------------------------------------------------------- BOLD5000


def test_bold5000_release_mask_names_keep_every_roi_voxel(tmp_path):
    fx = write_bold5000(tmp_path / "src", subjects=("CSI1", "CSI2", "CSI3"))
    assert (fx.root / "sub-CSI2/sub-CSI2_mask-RHRRSC.nii.gz").exists()
    assert (fx.root / "sub-CSI3/sub-CSI3_mask-LHLO.nii.gz").exists()
    assert not (fx.root / "sub-CSI2/sub-CSI2_mask-RHRSC.nii.gz").exists()
    out = prepare("bold5000", fx.root, tmp_path / "o", sessions=2, zscore=False, **FAST)
    store = Store(out)
    store.validate()
    for n, csi in enumerate(fx.subjects, start=1):
        info = store.subject(f"subj{n:02d}")
        (r, ijk) = _h5(info.path, "responses", "voxels/ijk")
        want = np.argwhere(fx.brain[csi] & (fx.roi[csi] > 0))
        np.testing.assert_array_equal(ijk, want)  # all of LOC and right RSC are there
        i, j, k = ijk.T
        np.testing.assert_array_equal(info.rois["bold5000-rois"].values, fx.roi[csi][i, j, k])
        np.testing.assert_allclose(r, fx.betas[csi][:, i, j, k], rtol=1e-6)
        assert _ids(store, f"subj{n:02d}") == [f"bold5000-{Path(x).stem}" for x in fx.names[csi]]
    assert _report(out) == {}  # nothing missing, nothing dropped


def test_bold5000_missing_mask_is_an_error_unless_allowed(tmp_path, capsys):
    fx = write_bold5000(tmp_path / "src", subjects=("CSI2",))
    (fx.root / "sub-CSI2/sub-CSI2_mask-RHRRSC.nii.gz").unlink()
    err = _cli_error(capsys, ["bold5000", "--source", str(fx.root), "--out", str(tmp_path / "e"),
                              "-o", "sessions=2"])
    assert "sub-CSI2_mask-RHRSC.nii.gz: field 'rois'" in err and "missing: RHRSC" in err
    assert "--allow-missing rois" in err and not (tmp_path / "e" / "manifest.yaml").exists()
    assert main_prepare(["bold5000", "--source", str(fx.root), "--out", str(tmp_path / "o"), "-o", "sessions=2",
                         "--allow-missing", "rois", "--image-size", "12", "--checksum", "none"]) == 0
    printed = capsys.readouterr().out
    assert "missing_roi_masks: 1 (RHRSC)" in printed
    store = Store(tmp_path / "o")
    assert store.manifest["import_report"]["subj02"]["missing_roi_masks"] == ["RHRSC"]  # CSI2 = subj02
    assert store.manifest["allow_missing"] == ["rois"]
    right_rsc = (fx.roi["CSI2"] == 5) & fx.brain["CSI2"]
    right_rsc[: fx.shape[0] // 2] = False
    assert store.subject("subj02").n_voxels == int((fx.brain["CSI2"] & (fx.roi["CSI2"] > 0)).sum() - right_rsc.sum())


def test_bold5000_nan_betas_counted_reported_and_handled(tmp_path, capsys):
    fx = write_bold5000(tmp_path / "src", nan_voxels=3)
    inside = np.argwhere(fx.brain["CSI1"] & (fx.roi["CSI1"] > 0))
    out = prepare("bold5000", fx.root, tmp_path / "drop", sessions=2, zscore=False, **FAST)
    rep = _report(out)["subj01"]
    assert rep["nan_voxels"] == 3 and rep["nan_voxels_dropped"] == 3
    assert sum(rep["nan_voxels_dropped_per_roi"].values()) == 3
    (r, ijk) = _h5(Store(out).subject("subj01").path, "responses", "voxels/ijk")
    np.testing.assert_array_equal(ijk, inside[3:])
    assert np.isfinite(r).all()
    # keep: NaN stays a missing value; no voxel is NaN in every trial here, so none is dropped
    out = prepare("bold5000", fx.root, tmp_path / "keep", sessions=2, nan_voxels="keep", **FAST)
    (r,) = _h5(Store(out).subject("subj01").path, "responses")
    assert r.shape[1] == len(inside) and int(np.isnan(r).any(0).sum()) == 3
    assert _report(out)["subj01"]["nan_voxels_dropped"] == 0
    err = _cli_error(capsys, ["bold5000", "--source", str(fx.root), "--out", str(tmp_path / "e"),
                              "-o", "sessions=2", "-o", "nan_voxels=error"])
    assert "ses-01.nii.gz: field 'betas'" in err and "NaN in 3 voxels" in err


def test_bold5000_missing_sessions_and_images(tmp_path):
    fx = write_bold5000(tmp_path / "src")
    root = Path(shutil.copytree(fx.root, tmp_path / "a"))
    (root / "CSI1_GLMbetas-TYPED-FITHRF-GLMDENOISE-RR_ses-02.nii.gz").unlink()
    with pytest.raises(SourceError, match=r"ses-02.nii.gz: field 'sessions'.*missing: ses-02"):
        prepare("bold5000", root, tmp_path / "e1", sessions=2, **FAST)
    out = prepare("bold5000", root, tmp_path / "o1", sessions=2, allow_missing=["sessions"], zscore=False, **FAST)
    info = Store(out).subject("subj01")
    assert info.n_trials == fx.session_trials[0] and _report(out)["subj01"]["missing_sessions"] == ["ses-02"]
    # a gap before a present session cannot be skipped: the trial-image list would shift
    root = Path(shutil.copytree(fx.root, tmp_path / "b"))
    (root / "CSI1_GLMbetas-TYPED-FITHRF-GLMDENOISE-RR_ses-01.nii.gz").unlink()
    with pytest.raises(SourceError, match="ses-01.nii.gz.*sessions after it exist"):
        prepare("bold5000", root, tmp_path / "e2", sessions=2, allow_missing=["sessions"], **FAST)
    # a missing image: error naming it, or its trials dropped and recorded
    root = Path(shutil.copytree(fx.root, tmp_path / "c"))
    gone = next(n for n in fx.names["CSI1"] if n not in fx.repeated)
    next((root / "stimuli").rglob(gone)).unlink()
    with pytest.raises(SourceError, match=f"field 'images'.*missing: {gone}"):
        prepare("bold5000", root, tmp_path / "e3", sessions=2, **FAST)
    out = prepare("bold5000", root, tmp_path / "o3", sessions=2, zscore=False, allow_missing=["images"], **FAST)
    store = Store(out)
    store.validate()
    shown = [n != gone for n in fx.names["CSI1"]]
    assert _ids(store, "subj01") == [f"bold5000-{Path(n).stem}" for n in fx.names["CSI1"] if n != gone]
    (r, ijk) = _h5(store.subject("subj01").path, "responses", "voxels/ijk")
    i, j, k = ijk.T
    np.testing.assert_allclose(r, fx.betas["CSI1"][shown][:, i, j, k], rtol=1e-6)
    rep = _report(out)
    assert rep["stimuli"]["missing_images"] == [gone] and rep["subj01"]["trials_dropped_missing_image"] == 1
    # a resumed import keeps every file and still records what was left out
    lines = []
    prepare("bold5000", root, tmp_path / "o3", sessions=2, zscore=False, allow_missing=["images"], log=lines.append,
            **FAST)
    assert any("complete, kept" in x for x in lines) and _report(out) == rep


# ----------------------------------------------------------------------------- vim-1


def test_vim1_stimuli_are_matlab_v5_and_import_exactly(tmp_path):
    fx = write_vim1(tmp_path / "src")
    assert not h5py.is_hdf5(fx.root / "Stimuli.mat") and h5py.is_hdf5(fx.root / "EstimatedResponses.mat")
    store = Store(prepare("vim-1", fx.root, tmp_path / "o", subjects=["S1"], image_size=128, checksum="none"))
    with h5py.File(store.stimuli_path, "r") as f:
        img = f["images"][len(fx.stim_trn) + 2]
    want = np.round((fx.stim_val[2] + 0.5) * 255).astype(np.uint8)
    np.testing.assert_array_equal(img, np.repeat(want[..., None], 3, axis=2))


def test_vim1_stimulus_range_is_never_clipped_silently(tmp_path, capsys):
    fx = write_vim1(tmp_path / "src", stim_range=(-0.6, 0.55))
    err = _cli_error(capsys, ["vim-1", "--source", str(fx.root), "--out", str(tmp_path / "e")])
    assert "Stimuli.mat: field 'stimTrn/stimVal'" in err and "range -0.6" in err and "stim_scale" in err
    out = prepare("vim-1", fx.root, tmp_path / "mm", subjects=["S1"], stim_scale="minmax", image_size=128,
                  checksum="none")
    allv = np.concatenate([fx.stim_trn, fx.stim_val])
    lo, hi = allv.min(), allv.max()
    with h5py.File(Store(out).stimuli_path, "r") as f:
        img = f["images"][0][..., 0]
    np.testing.assert_array_equal(img, np.round((fx.stim_trn[0] - lo) / (hi - lo) * 255).astype(np.uint8))
    out = prepare("vim-1", fx.root, tmp_path / "clip", subjects=["S1"], stim_scale="clip", **FAST)
    clipped = int(((allv < -0.5) | (allv > 0.5)).sum())
    assert clipped > 0 and _report(out)["stimuli"]["stimulus_values_clipped"] == clipped


# ----------------------------------------------------------------------------- NSD


def test_nsd_missing_sessions_atlases_and_images(tmp_path, capsys):
    fx = write_nsd(tmp_path / "src", subjects=("subj01",), n_sessions=3)
    bdir = fx.root / "nsddata_betas/ppdata/subj01/func1pt8mm/betas_fithrf_GLMdenoise_RR"
    (bdir / "betas_session02.hdf5").unlink()  # a gap: NSD sessions are independent
    (fx.root / "nsddata/ppdata/subj01/func1pt8mm/roi/floc-words.nii.gz").unlink()
    args = ["nsd", "--source", str(fx.root), "-o", "sessions=3"]
    err = _cli_error(capsys, [*args, "--out", str(tmp_path / "e")])
    assert "betas_session02.hdf5: field 'sessions'" in err and "missing: session02" in err
    assert not (tmp_path / "e").exists()
    # the dry run lists both at once
    assert main_prepare([*args, "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "missing_sessions: 1 (session02)" in printed and "missing_roi_masks: 1 (floc-words)" in printed
    assert "sessions 2 (1,3), 1500 trials" in printed and "--allow-missing rois sessions" in printed
    with pytest.raises(SourceError, match=r"floc-words.nii.gz: field 'rois'.*missing: floc-words"):
        prepare("nsd", fx.root, tmp_path / "e", sessions=3, allow_missing=["sessions"], **FAST)
    out = prepare("nsd", fx.root, tmp_path / "o", sessions=3, zscore=False, allow_missing=["sessions", "rois"], **FAST)
    store = Store(out)
    info = store.subject("subj01")
    assert "floc-words" not in info.rois and len(info.rois) == 7
    keep = np.r_[0:750, 1500:2250]
    np.testing.assert_array_equal(info.trial_session, np.repeat([1, 3], 750))
    assert _ids(store, "subj01") == [f"nsd-{x:05d}" for x in fx.trial_73k["subj01"][keep]]
    (r, ijk) = _h5(info.path, "responses", "voxels/ijk")
    i, j, k = ijk.T
    np.testing.assert_allclose(r, fx.betas["subj01"][keep][:, i, j, k] / 300.0, rtol=1e-6)
    assert _report(out) == {"subj01": {"missing_sessions": ["session02"], "missing_roi_masks": ["floc-words"]}}
    # the atlas that selects the voxels can never be left out
    (fx.root / "nsddata/ppdata/subj01/func1pt8mm/roi/nsdgeneral.nii.gz").unlink()
    with pytest.raises(SourceError, match=r"nsdgeneral.nii.gz: field '<file>'.*selects the voxels"):
        prepare("nsd", fx.root, tmp_path / "e2", sessions=3, allow_missing=["sessions", "rois"], **FAST)


def test_nsd_images_past_the_end_of_a_cut_brick(tmp_path):
    fx = write_nsd(tmp_path / "src", subjects=("subj01",), n_sessions=1)
    seen = np.unique(fx.trial_73k["subj01"])
    last = int(seen.max())
    brick = fx.root / "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5"
    with h5py.File(brick, "a") as f:  # a download cut before the last image shown
        del f["imgBrick"]
        f.create_dataset("imgBrick", data=fx.images[:last])
    with pytest.raises(SourceError, match=rf"nsd_stimuli.hdf5: field 'images'.*missing: nsd-{last:05d}$"):
        prepare("nsd", fx.root, tmp_path / "e", sessions=1, **FAST)
    out = prepare("nsd", fx.root, tmp_path / "o", sessions=1, zscore=False, allow_missing=["images"], **FAST)
    store = Store(out)
    shown = fx.trial_73k["subj01"] != last
    assert _ids(store, "subj01") == [f"nsd-{x:05d}" for x in fx.trial_73k["subj01"][shown]]
    (r, ijk) = _h5(store.subject("subj01").path, "responses", "voxels/ijk")
    i, j, k = ijk.T
    np.testing.assert_allclose(r, fx.betas["subj01"][shown][:, i, j, k] / 300.0, rtol=1e-6)
    rep = _report(out)
    assert rep["stimuli"] == {"missing_images": [f"nsd-{last:05d}"]}
    assert rep["subj01"] == {"trials_dropped_missing_image": int((~shown).sum())}


def test_nsd_fsaverage_atlas_with_one_hemisphere_is_not_silent(tmp_path, capsys):
    fx = write_nsd(tmp_path / "src", subjects=("subj01",), n_sessions=1, surface=True)
    (fx.root / "nsddata/freesurfer/fsaverage/label/rh.floc-faces.mgz").unlink()
    args = ["nsd", "--source", str(fx.root), "-o", "space=fsaverage", "-o", "sessions=1"]
    err = _cli_error(capsys, [*args, "--out", str(tmp_path / "e")])
    assert "rh.floc-faces.mgz: field 'rois'" in err and "missing: rh.floc-faces" in err
    s = dry_run("nsd", fx.root, space="fsaverage", sessions=1, log=None)
    assert s["subjects"]["subj01"]["missing_roi_masks"] == ["rh.floc-faces"] and s["would_fail"] == ["rois"]
    out = prepare("nsd", fx.root, tmp_path / "o", space="fsaverage", sessions=1, allow_missing=["rois"], **FAST)
    info = Store(out).subject("subj01")
    assert "floc-faces" not in info.rois and "prf-visualrois" in info.rois  # left out whole, not half
    assert _report(out)["subj01"]["missing_roi_masks"] == ["rh.floc-faces"]


# ----------------------------------------------------------------------------- Algonauts 2023


def test_algonauts_atlas_with_one_hemisphere_and_missing_image_are_not_silent(tmp_path, capsys):
    fx = write_algonauts(tmp_path / "src", subjects=("subj01",))
    masks = fx.root / "subj01/roi_masks"
    (masks / "rh.floc-faces_challenge_space.npy").unlink()  # used to vanish without a word
    (masks / "mapping_streams.npy").unlink()
    gone = next((fx.root / "subj01/training_split/training_images").glob("train-0003_*.png"))
    gone.unlink()
    args = ["algonauts2023", "--source", str(fx.root)]
    err = _cli_error(capsys, [*args, "--out", str(tmp_path / "e")])
    assert "training_images: field 'images'" in err and "missing: train-0003" in err
    err = _cli_error(capsys, [*args, "--out", str(tmp_path / "e"), "--allow-missing", "images"])
    assert "rh.floc-faces_challenge_space.npy: field 'rois'" in err and "missing: rh.floc-faces" in err
    assert not (tmp_path / "e").exists()
    # the dry run lists both at once, and where each label table comes from
    assert main_prepare([*args, "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "missing_roi_masks: 1 (rh.floc-faces)" in printed and "missing_images: 1 (train-0003)" in printed
    assert "streams (source manifest)" in printed and "prf-visualrois (mapping_prf-visualrois.npy)" in printed
    assert "--allow-missing images rois" in printed and "found roi_files: 10" in printed
    out = prepare("algonauts2023", fx.root, tmp_path / "o", allow_missing=["rois", "images"], **FAST)
    store = Store(out)
    info = store.subject("subj01")
    assert "floc-faces" not in info.rois and len(info.rois) == 5  # left out whole, not one hemisphere
    assert info.rois["streams"].labels[1] == "early"
    kept = [i for i in range(len(fx.train_ids["subj01"])) if i != 2]
    (r,) = _h5(info.path, "responses")
    np.testing.assert_allclose(r, fx.fmri["subj01"][kept], rtol=1e-6)
    assert _ids(store, "subj01") == [f"nsd-{fx.train_ids['subj01'][i]:05d}" for i in kept]
    assert _report(out) == {"subj01": {"missing_images": ["train-0003"], "trials_dropped_missing_image": 1,
                                       "missing_roi_masks": ["rh.floc-faces"]}}


# ----------------------------------------------------------------------------- dry run


WRITERS = {
    "nsd": (lambda root: write_nsd(root, subjects=("subj01",)), ["-o", "sessions=2"]),
    "algonauts2023": (lambda root: write_algonauts(root, subjects=("subj01",)), []),
    "bold5000": (lambda root: write_bold5000(root, subjects=("CSI2",)), ["-o", "sessions=2"]),
    "god": (lambda root: write_god(root, subjects=("Subject1",)), []),
    "things-fmri": (write_things, []),
    "vim-1": (write_vim1, []),
}


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys, name):
    writer, extra = WRITERS[name]
    fx = writer(tmp_path / "src")
    before = _tree(tmp_path)
    rc = main_prepare([name, "--source", str(fx.root), "--out", str(tmp_path / "store"), "--dry-run", *extra])
    assert rc == 0
    assert _tree(tmp_path) == before and not (tmp_path / "store").exists()  # nothing written, not even --out
    printed = capsys.readouterr().out
    assert "dry run" in printed and "voxels per ROI" in printed
    assert "train" in printed and "test images" in printed and "images:" in printed
    # the summary matches what the import then writes
    summary = dry_run(name, fx.root, log=None, **{k: v for k, v in (e.split("=") for e in extra[1::2])})
    out = prepare(name, fx.root, tmp_path / "store", **FAST,
                  **{k: int(v) for k, v in (e.split("=") for e in extra[1::2])})
    store = Store(out)
    subject = next(iter(summary["subjects"]))
    assert f"  {subject} (" in printed
    info = store.subject(subject)
    s = summary["subjects"][subject]
    assert (s["n_trials"], s["n_voxels"]) == (info.n_trials, info.n_voxels)
    assert summary["split"]["n_test"] == int((store.split == SPLIT_TEST).sum())
    for atlas, counts in s["voxels_per_roi"].items():
        for label, n in counts.items():
            value = [v for v, nm in info.rois[atlas].labels.items() if nm == label][0]
            assert n == int((info.rois[atlas].values == value).sum())


def test_dry_run_lists_missing_masks_and_images_instead_of_failing(tmp_path, capsys):
    fx = write_bold5000(tmp_path / "src", subjects=("CSI3",))
    (fx.root / "sub-CSI3/sub-CSI3_mask-LHLO.nii.gz").unlink()
    next((fx.root / "stimuli").rglob(fx.names["CSI3"][0])).unlink()
    before = _tree(tmp_path)
    assert main_prepare(["bold5000", "--source", str(fx.root), "--dry-run", "-o", "sessions=2"]) == 0
    printed = capsys.readouterr().out
    assert _tree(tmp_path) == before
    assert "1 missing" in printed and fx.names["CSI3"][0] in printed
    assert "missing_roi_masks: 1 (LHLOC)" in printed and "found roi_masks: 9" in printed
    assert "--allow-missing images rois" in printed
    s = dry_run("bold5000", fx.root, sessions=2, allow_missing=["rois", "images"], log=None)
    assert s["would_fail"] == [] and s["subjects"]["subj03"]["missing_roi_masks"] == ["LHLOC"]


def test_dry_run_into_a_closed_pipe_exits_quietly(tmp_path, monkeypatch, capsys):
    """``brainenc prepare ... --dry-run | head``: the reader stops early; the command stops without
    a traceback, with the status a shell gives a command stopped by SIGPIPE (141)."""
    import io

    from brainenc.cli import console_main

    fx = write_god(tmp_path / "src", subjects=("Subject1",))
    r, w = os.pipe()
    os.close(r)  # the reader is gone before the first line
    out = io.TextIOWrapper(io.FileIO(w, "w"), write_through=True)
    monkeypatch.setattr(sys, "stdout", out)
    assert console_main(["prepare", "god", "--source", str(fx.root), "--dry-run"]) == 141
    out.write("after\n")  # stdout now points at /dev/null: nothing more can fail at exit
    out.flush()
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.slow
def test_dry_run_piped_into_head_has_no_traceback(tmp_path):
    import shlex
    import subprocess

    fx = write_god(tmp_path / "src", subjects=("Subject1",))
    cmd = [sys.executable, "-m", "brainenc.cli", "prepare", "god", "--source", str(fx.root), "--dry-run"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    p.stdout.close()  # the reader is gone before the command prints its first line
    err = p.stderr.read().decode()
    p.stderr.close()
    assert p.wait(timeout=300) == 141 and err == ""  # no traceback, no 'Exception ignored' at exit
    sh = subprocess.run(["bash", "-c", shlex.join(cmd) + " | head -n 1"], capture_output=True, text=True,
                        env=env, timeout=300)
    assert sh.stdout.startswith("[god] dry run:") and sh.stderr == ""


def test_allow_missing_kind_is_checked(tmp_path):
    fx = write_vim1(tmp_path / "src")
    with pytest.raises(SourceError, match="--allow-missing.*voxels"):
        prepare("vim-1", fx.root, tmp_path / "o", allow_missing=["voxels"], **FAST)
    assert os.listdir(tmp_path) == ["src"]


def test_corrupt_source_files_are_one_line_errors(tmp_path, capsys):
    fx = write_bold5000(tmp_path / "b")
    (fx.root / "CSI1_brainmask.nii.gz").write_bytes(b"\x1f\x8b not a nifti")
    err = _cli_error(capsys, ["bold5000", "--source", str(fx.root), "--out", str(tmp_path / "o"), "-o", "sessions=2"])
    assert "CSI1_brainmask.nii.gz: field '<file>'" in err
    fx = write_things(tmp_path / "t")
    (fx.root / "betas_csv/sub-01_StimulusMetadata.csv").write_text("session,run\n1,1\n")
    err = _cli_error(capsys, ["things-fmri", "--source", str(fx.root), "--out", str(tmp_path / "o")])
    assert "sub-01_StimulusMetadata.csv: field 'trial_type'" in err
    fx = write_vim1(tmp_path / "v")
    (fx.root / "Stimuli.mat").write_bytes(b"MATLAB 5.0 MAT-file garbage")
    err = _cli_error(capsys, ["vim-1", "--source", str(fx.root), "--out", str(tmp_path / "o")])
    assert "Stimuli.mat: field '<file>'" in err

"""``brainenc predict --data.predict_images``: real tiny models of every family, trained for a few
batches on the tiny simbrain, predicting images nobody scanned (a folder, .npy/.h5 arrays, a
store's stimuli.h5); the files' shapes, order, ids and values; bad images; in-silico contrasts."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from brainenc.cli import load_trained, main
from brainenc.data.importers.source_files import SourceError
from brainenc.data.store import Store
from tests.integration.test_afo import afo  # noqa: F401  (the AFO smoke recipe, for its stages)

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "experiments" / "smoke"
QUIET = ["--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.max_epochs=1",
         "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", "--data.simulate=null"]


def _fit(family: str, brain: dict, run: Path) -> list[str]:
    stores = [brain["simbrain7t"], brain["simbrain3t"]] if family == "universal" else [brain["simbrain7t"]]
    args = ["-c", str(SMOKE / f"{family}.yaml"), f"--data.stores=[{','.join(map(str, stores))}]",
            f"--trainer.default_root_dir={run}", *QUIET]
    main(["fit", *args, "--test_after_fit=true"])
    return args


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A folder with two category subfolders and a file at the top (32 px, the model's size),
    and the same pixels as an .npy array in the folder's sorted order."""
    root = tmp_path_factory.mktemp("imgs") / "imgs"
    rng = np.random.default_rng(1)
    names = ["face/b.png", "face/a.png", "noface/sub/c.png", "noface/d.png", "noface/e.png", "top.png"]
    pixels = {}
    for n in names:
        (root / n).parent.mkdir(parents=True, exist_ok=True)
        pixels[n] = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels[n]).save(root / n)
    (root / ".hidden.png").write_bytes(b"not listed")
    (root / "notes.txt").write_text("not an image")
    order = sorted(names)
    return root, order, np.stack([pixels[n] for n in order])


@pytest.fixture(scope="module")
def trained(tiny_brain, tmp_path_factory):
    runs = {}
    for family in ("linear", "ridge", "retinotopic", "universal"):
        run = tmp_path_factory.mktemp(family) / "run"
        runs[family] = (run, _fit(family, tiny_brain, run))
    return runs


def _read(run: Path, pair: str) -> dict:
    with h5py.File(run / "predictions" / f"{pair.replace('/', '__')}.h5", "r") as f:
        return {k: f[k][()] for k in f} | {"attrs": dict(f.attrs)}


def _expected(run: Path, pixels: np.ndarray, pair: str) -> np.ndarray:
    """The model's own forward pass on the pixels (already at the model's 32 px)."""
    model, _ = load_trained(run, run / "results" / "config.yaml")
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        return model.predict_all(model.backbone(x), pair).numpy()


@pytest.mark.parametrize("family", ["linear", "ridge", "retinotopic", "universal"])
def test_every_family_predicts_a_folder(family, trained, images, tiny_brain):
    run, args = trained[family]
    root, order, pixels = images
    main(["predict", *args, f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}", f"--data.predict_images={root}"])
    pairs = [f"simbrain7t/{s}" for s in Store(tiny_brain["simbrain7t"]).subjects]
    if family == "universal":
        pairs += [f"simbrain3t/{s}" for s in Store(tiny_brain["simbrain3t"]).subjects]
    written = sorted(p.name for p in (run / "predictions").glob("*.h5"))
    assert written == sorted(f"{p.replace('/', '__')}.h5" for p in pairs)
    for pair in pairs:
        got = _read(run, pair)
        n_vox = Store(tiny_brain[pair.split("/")[0]]).subject(pair.split("/")[1]).n_voxels
        assert got["pred"].shape == (len(order), n_vox) and got["pred"].dtype == np.float32
        assert [s.decode() for s in got["stimulus_id"]] == order  # sorted relative paths
        assert [c.decode() for c in got["category"]] == ["face", "face", "noface", "noface", "noface", ""]
        assert got["stimulus"].tolist() == list(range(len(order)))
        assert got["attrs"]["source"] == str(root.resolve())
    np.testing.assert_allclose(_read(run, pairs[0])["pred"], _expected(run, pixels, pairs[0]), rtol=1e-4, atol=1e-5)
    roi = pd.read_csv(run / "predictions" / "roi_means.csv", keep_default_na=False)
    assert list(roi.columns) == ["image", "category", "dataset", "subject", "atlas", "roi", "mean"]
    one = roi[(roi["subject"] == pairs[0].split("/")[1]) & (roi["dataset"] == "simbrain7t")
              & (roi["image"] == order[0]) & (roi["roi"] == "V1")]
    info = Store(tiny_brain["simbrain7t"]).subject(pairs[0].split("/")[1])
    v1 = info.rois["simbrain"].values == next(k for k, v in info.rois["simbrain"].labels.items() if v == "V1")
    assert len(one) == 1 and one["mean"].iloc[0] == pytest.approx(_read(run, pairs[0])["pred"][0, v1].mean(), rel=1e-4)


def test_arrays_and_store_stimuli(trained, images, tiny_brain, tmp_path):
    run, args = trained["linear"]
    root, order, pixels = images
    ckpt = f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"
    pair = "simbrain7t/" + Store(tiny_brain["simbrain7t"]).subjects[0]
    main(["predict", *args, ckpt, f"--data.predict_images={root}"])
    folder = _read(run, pair)["pred"]
    # .npy: the same pixels in the same order give the same predictions; ids are row numbers
    np.save(tmp_path / "x.npy", pixels)
    main(["predict", *args, ckpt, f"--data.predict_images={tmp_path / 'x.npy'}", "--data.eval_batch_size=4"])
    got = _read(run, pair)
    np.testing.assert_allclose(got["pred"], folder, rtol=1e-5, atol=1e-6)
    assert [s.decode() for s in got["stimulus_id"]] == [str(i) for i in range(len(order))]
    assert not (run / "predictions" / "skipped.txt").exists()
    # .h5 with its own ids
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f["images"] = pixels
        f.create_dataset("stimulus_id", data=[f"img{i}" for i in range(len(order))], dtype=h5py.string_dtype())
    main(["predict", *args, ckpt, f"--data.predict_images={tmp_path / 'x.h5'}"])
    got = _read(run, pair)
    np.testing.assert_allclose(got["pred"], folder, rtol=1e-5, atol=1e-6)
    assert got["stimulus_id"][2].decode() == "img2"
    # a store's stimuli.h5: every stimulus, ids of the store; its test rows match `brainenc predict`
    store = Store(tiny_brain["simbrain7t"])
    main(["predict", *args, ckpt, f"--data.predict_images={store.stimuli_path}"])
    every = _read(run, pair)
    assert every["pred"].shape[0] == store.n_stimuli
    assert [s.decode() for s in every["stimulus_id"]] == list(store.stimulus_ids)
    main(["predict", *args, ckpt])  # the test images of the stores, as before
    test = _read(run, pair)
    np.testing.assert_allclose(test["pred"], every["pred"][test["stimulus"]], rtol=1e-4, atol=1e-5)
    assert not (run / "predictions" / "roi_means.csv").exists()  # the old table no longer matched


def test_bad_images(trained, images, tmp_path):
    run, args = trained["linear"]
    root, order, _ = images
    bad = tmp_path / "bad"
    (bad / "x").mkdir(parents=True)
    for n in order:
        (bad / n).parent.mkdir(parents=True, exist_ok=True)
        (bad / n).write_bytes((root / n).read_bytes())
    (bad / "x" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    ckpt = f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"
    with pytest.raises(SourceError, match=r"broken\.jpg.*readable image"):
        main(["predict", *args, ckpt, f"--data.predict_images={bad}"])
    main(["predict", *args, ckpt, f"--data.predict_images={bad}", "--data.predict_skip_unreadable=true"])
    pair = sorted((run / "predictions").glob("*.h5"))[0]
    with h5py.File(pair) as f:
        assert [s.decode() for s in f["stimulus_id"]] == order and f.attrs["n_skipped"] == 1
    assert (run / "predictions" / "skipped.txt").read_text().startswith("x/broken.jpg\t")
    for what, path in (("an empty folder", tmp_path / "empty"), ("a pickle", tmp_path / "obj.npy"),
                       ("a wrong shape", tmp_path / "grey.npy"), ("no such file", tmp_path / "nope.npy")):
        if what == "an empty folder":
            path.mkdir()
        elif what == "a pickle":
            np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
        elif what == "a wrong shape":
            np.save(path, np.zeros((2, 8, 8), np.uint8))
        with pytest.raises(SourceError, match=str(path.name)):
            main(["predict", *args, ckpt, f"--data.predict_images={path}"])


def test_insilico_contrasts(trained, images, tmp_path):
    from brainenc.analysis.insilico import contrast, run_insilico

    run, _ = trained["linear"]
    root, order, _ = images
    rois = run_insilico([run], root, tmp_path / "out", top_k=2)
    pair_file = sorted((run / "predictions").glob("simbrain7t__*.h5"))[0]
    with h5py.File(pair_file) as f:
        pred, cats = f["pred"][()], f["category"][()].astype(str)
    face = cats == "face"
    d, t = contrast(pred, face)
    a, b = pred[face].astype(np.float64), pred[~face].astype(np.float64)
    sp = np.sqrt(((len(a) - 1) * a.var(0, ddof=1) + (len(b) - 1) * b.var(0, ddof=1)) / (len(a) + len(b) - 2))
    np.testing.assert_allclose(d, (a.mean(0) - b.mean(0)) / sp, rtol=1e-10)
    from scipy.stats import ttest_ind

    np.testing.assert_allclose(t, ttest_ind(a, b, equal_var=False).statistic, rtol=1e-8)
    vox = pd.read_csv(run / "insilico" / "voxels.csv")
    # simbrain labels its images: the measured and true contrasts sit beside the in-silico one
    assert {"d", "t", "measured_d", "true_d", "true_type"} <= set(vox.columns)
    subject = pair_file.stem.split("__")[1]
    mine = vox[(vox["subject"] == subject) & (vox["category"] == "face") & (vox["dataset"] == "simbrain7t")]
    np.testing.assert_allclose(mine["d"].to_numpy(), d, rtol=1e-6)
    ffa = rois[(rois["roi"] == "FFA") & (rois["category"] == "face") & (rois["subject"] == subject)]
    assert len(ffa) == 1 and np.isfinite(ffa[["roi_dprime", "r_measured", "r_true"]].to_numpy()).all()
    assert (run / "insilico" / f"top_simbrain7t__{subject}_simbrain_FFA.png").exists()
    assert (tmp_path / "out" / f"map_simbrain7t__{subject}_face.png").exists()
    allv = rois[(rois["atlas"] == "all") & (rois["category"] == "face") & (rois["subject"] == subject)]
    assert 0 <= allv["auc_true_type"].iloc[0] <= 1
    noface = rois[(rois["atlas"] == "all") & (rois["category"] == "noface") & (rois["subject"] == subject)]
    assert np.isfinite(noface["r_measured"].iloc[0])  # "noface" = the images without labels/face
    # a run whose results table has embedding clusters: contrasts and montages per cluster too
    from brainenc.analysis.insilico import analyse_run
    from brainenc.results import add_column, read_results

    df = read_results(run)
    add_column(run, "cluster", {f"{d}/{s}": np.arange(int(((df.dataset == d) & (df.subject == s)).sum())) % 3
                                for d, s in df[["dataset", "subject"]].drop_duplicates().itertuples(index=False)})
    clus = analyse_run(run, root, top_k=2)["rois"]
    clus = clus[(clus["atlas"] == "cluster") & (clus["subject"] == subject) & (clus["dataset"] == "simbrain7t")]
    assert sorted(set(clus["roi"])) == ["cluster 0", "cluster 1", "cluster 2"]
    assert (run / "insilico" / f"top_simbrain7t__{subject}_cluster_cluster-0.png").exists()
    from brainenc.reports.build import build_report

    build_report([run], tmp_path / "report", n_boot=0, figures=False)
    md = (tmp_path / "report" / "report.md").read_text()
    section = md.split("## In-silico selectivity")[1]
    assert f"{run.name} r_true" in section and f"{run.name} d′" in section


@pytest.mark.slow  # runs the whole AFO smoke recipe again (test_afo's fixture, in this module)
@pytest.mark.parametrize("stage", ["experts", "student"])
def test_afo_experts_and_student_predict_a_folder(stage, afo, images):  # noqa: F811
    from brainenc.rundir import RunDir

    _, out, store = afo
    root, order, pixels = images
    run = out / stage
    main(["predict", "-c", str(run / "results" / "config.yaml"), f"--ckpt_path={RunDir(run).require_checkpoint()}",
          f"--data.predict_images={root}", f"--trainer.default_root_dir={run}", "--trainer.logger=false",
          "--trainer.enable_progress_bar=false"])
    got = _read(run, "simbrain7t/subj01")
    assert got["pred"].shape == (len(order), store.subject("subj01").n_voxels)
    assert [s.decode() for s in got["stimulus_id"]] == order
    np.testing.assert_allclose(got["pred"], _expected(run, pixels, "simbrain7t/subj01"), rtol=1e-4, atol=1e-5)

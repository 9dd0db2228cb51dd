"""simbrain: stores are valid, deterministic and carry the ground truth they promise."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import yaml
from scipy.spatial import cKDTree

from brainenc.data.simbrain import PRESETS, oracle_ceiling, planned_shapes, simulate
from brainenc.metrics.correlation import pearson_columns
from brainenc.data.store import Store

ROIS = {1: "V1", 2: "V2", 3: "V3", 4: "hV4", 5: "FFA", 6: "PPA"}


@pytest.fixture(scope="session")
def tiny(tiny_brain):
    """The session's tiny simbrain (tests/conftest.py: preset tiny, seed 0), its folder and stores."""
    out = tiny_brain["simbrain7t"].parent
    return out, tiny_brain, {k: Store(p) for k, p in tiny_brain.items()}


def _h5_arrays(path):
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


def _truth(info, name):
    with h5py.File(info.path, "r") as f:
        return f[f"truth/{name}"][()]


def _test_means(store, subject):
    """Repeat-averaged measured responses of the test stimuli: (n_test, n_voxels), plus repeats."""
    info = store.subject(subject)
    with h5py.File(info.path, "r") as f:
        resp = f["responses"][()].astype(np.float64)
    test_rows = np.flatnonzero(store.split == 1)
    reps = np.stack([resp[info.trial_stimulus == r] for r in test_rows])  # (n_test, 3, n_vox)
    return test_rows, reps


# ----------------------------------------------------------------------------- structure


def test_paths_and_stores_validate(tiny):
    out, paths, stores = tiny
    assert paths == {"simbrain7t": out / "simbrain7t", "simbrain3t": out / "simbrain3t"}
    plan = planned_shapes("tiny")
    for name, st in stores.items():
        st.validate(deep=True)
        assert st.subjects == ["subj01", "subj02"]
        assert st.image_size == (32, 32) and st.visual_angle_deg == pytest.approx(8.4)
        assert st.n_stimuli == plan[name]["n_stimuli"]
        m = st.manifest
        for key in ("dataset", "subjects", "source", "preset", "seed", "generator", "split_rule",
                    "field_strength_tesla", "citation"):
            assert key in m, key
        assert (m["source"], m["preset"], m["seed"]) == ("simbrain", "tiny", 0)
        for s in st.subjects:
            info = st.subject(s)
            assert (info.n_trials, info.n_voxels) == plan[name]["subjects"][s]
            assert info.units == "z" and info.has_truth
            assert info.rois["simbrain"].labels == ROIS
            assert set(np.unique(info.rois["simbrain"].values)) == {0, 1, 2, 3, 4, 5, 6}
            assert info.trial_session is not None and (info.trial_session >= 0).all()
            with h5py.File(info.path, "r") as f:
                assert f["responses"].dtype == np.float32
                assert f["truth/responses"].shape == (st.n_stimuli, info.n_voxels)
                for k in ("prf_x_deg", "prf_y_deg", "prf_sigma_deg", "voxel_type", "signal_sd",
                          "noise_sd", "flat_xy", "hemisphere"):
                    assert f[f"truth/{k}"].shape[0] == info.n_voxels, k
                assert yaml.safe_load(f["truth/voxel_type"].attrs["labels"])[0] == "noise"
            # about 10% noise voxels, as planned
            assert (info.rois["simbrain"].values == 0).mean() == pytest.approx(0.10, abs=0.01)


def test_labels_are_plausible(tiny):
    _, _, stores = tiny
    lab = stores["simbrain7t"].stimulus_labels
    n = stores["simbrain7t"].n_stimuli
    assert 0.15 < lab["face"].mean() < 0.45  # ~30% faces (binomial, n=180)
    fb = lab["face_box"][lab["face"] == 1]
    assert (fb >= 0).all() and (fb <= 1).all() and (fb[:, 2] > fb[:, 0]).all() and (fb[:, 3] > fb[:, 1]).all()
    assert not lab["face_box"][lab["face"] == 0].any()
    sc = lab["scene"]
    assert sc.shape == (n,) and ((sc == 0) | ((sc > 0.1) & (sc <= 1))).all() and (sc > 0).mean() > 0.15


def test_test_images_have_three_repeats_and_train_at_least_one(tiny):
    _, _, stores = tiny
    for st in stores.values():
        for s in st.subjects:
            counts = np.bincount(st.subject(s).trial_stimulus, minlength=st.n_stimuli)
            assert (counts[st.split == 1] == 3).all()
            assert (counts[st.split == 0] >= 1).all()


def test_shared_images_keep_id_split_and_pixels(tiny):
    _, _, stores = tiny
    a, b = stores["simbrain7t"], stores["simbrain3t"]
    ida = {s: i for i, s in enumerate(a.stimulus_ids)}
    shared = [(ida[s], j) for j, s in enumerate(b.stimulus_ids) if s in ida]
    assert len(shared) >= PRESETS["tiny"].n_test + 20  # the whole test set plus shared train images
    ia, ib = map(np.array, zip(*shared))
    assert (a.split[ia] == b.split[ib]).all()
    assert set(a.stimulus_ids[a.split == 1]) == set(b.stimulus_ids[b.split == 1])
    with h5py.File(a.stimuli_path) as fa, h5py.File(b.stimuli_path) as fb:
        assert np.array_equal(fa["images"][np.sort(ia)], fb["images"][ib[np.argsort(ia)]])
    assert all(s.startswith("sim-") for s in a.stimulus_ids)


# ----------------------------------------------------------------------------- determinism


def test_same_seed_bit_identical_other_seed_differs(tiny, tmp_path):
    out, _, stores = tiny
    simulate(preset="tiny", out=tmp_path / "same", seed=0)
    simulate(preset="tiny", out=tmp_path / "other", seed=1)
    for name, st in stores.items():
        for fname in ["stimuli.h5"] + [f"{s}.h5" for s in st.subjects]:
            ref = _h5_arrays(out / name / fname)
            same = _h5_arrays(tmp_path / "same" / name / fname)
            assert ref.keys() == same.keys()
            for k in ref:
                assert np.array_equal(ref[k], same[k], equal_nan=ref[k].dtype.kind == "f"), (name, fname, k)
        other = _h5_arrays(tmp_path / "other" / name / "stimuli.h5")
        assert not np.array_equal(_h5_arrays(out / name / "stimuli.h5")["images"], other["images"])
        o1 = _h5_arrays(tmp_path / "other" / name / "subj01.h5")["responses"]
        r1 = _h5_arrays(out / name / "subj01.h5")["responses"]
        assert o1.shape != r1.shape or not np.array_equal(o1, r1)


def test_simulate_is_idempotent_and_guards_other_params(tiny):
    out, paths, _ = tiny
    mtimes = {p: (p / "subj01.h5").stat().st_mtime_ns for p in paths.values()}
    assert simulate(preset="tiny", out=out, seed=0) == paths
    assert {p: (p / "subj01.h5").stat().st_mtime_ns for p in paths.values()} == mtimes
    with pytest.raises(FileExistsError, match="overwrite=True"):
        simulate(preset="tiny", out=out, seed=5)
    with pytest.raises(ValueError, match="unknown simbrain preset"):
        simulate(preset="huge", out=out)


# ----------------------------------------------------------------------------- ground truth


def test_oracle_ceiling_matches_theory(tiny):
    """corr(truth, mean of 3 repeats) should be ncsnr / sqrt(ncsnr^2 + 1/3) up to sampling error.

    With 30 test images the sample correlation scatters by roughly (1 - rho^2) / sqrt(27) (0.05
    for 7T-like voxels at rho ~ 0.85, 0.12 for 3T-like at rho ~ 0.55), and the truth's variance
    over only 30 images also varies, so median absolute differences of ~0.04 (7T) and ~0.09
    (3T) are expected; tolerances sit above that and well below the effect sizes.
    """
    _, _, stores = tiny
    tol = {"simbrain7t": 0.07, "simbrain3t": 0.14}
    for name, st in stores.items():
        diffs, oc_all, th_all = [], [], []
        for s in st.subjects:
            info = st.subject(s)
            oc = oracle_ceiling(st, s, np.flatnonzero(st.split == 1))
            nc = info.ncsnr.astype(np.float64)
            th = np.sqrt(nc ** 2 / (nc ** 2 + 1 / 3))
            sig = info.rois["simbrain"].values > 0
            assert np.isfinite(oc[sig]).all()
            diffs.append(oc[sig] - th[sig]); oc_all.append(oc[sig]); th_all.append(th[sig])  # noqa: E702
        d = np.concatenate(diffs)
        assert np.median(np.abs(d)) < tol[name], (name, np.median(np.abs(d)))
        assert abs(np.median(d)) < tol[name] / 2
        assert np.corrcoef(np.concatenate(oc_all), np.concatenate(th_all))[0, 1] > 0.6


def test_oracle_ceiling_agrees_with_direct_computation(tiny):
    _, _, stores = tiny
    st = stores["simbrain7t"]
    rows, reps = _test_means(st, "subj02")
    truth = _truth(st.subject("subj02"), "responses")[rows]
    means = reps.mean(1)
    oc = oracle_ceiling(st, "subj02", rows[::-1])  # order of rows does not matter
    ok = truth.std(0) > 0
    direct = [np.corrcoef(truth[:, v], means[:, v])[0, 1] for v in np.flatnonzero(ok)]
    np.testing.assert_allclose(oc[ok], direct, atol=1e-6)
    assert np.isnan(oc[~ok]).all()
    with pytest.raises(ValueError, match="never shown"):
        oracle_ceiling(st, "subj01", np.array([0, 10**6]))


def test_pearson_columns_matches_numpy_and_flags_constant_columns():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(25, 300))
    b = 0.5 * a + rng.normal(size=a.shape)
    a[:, 4] = 0.0
    b[:, 9] = 1.25
    r = pearson_columns(a.astype(np.float32), b, block=64)
    ref = np.array([np.corrcoef(a[:, i], b[:, i])[0, 1] if i not in (4, 9) else np.nan for i in range(300)])
    np.testing.assert_allclose(r, ref, atol=1e-6)  # float32 input, float64 arithmetic
    assert np.isnan(r[[4, 9]]).all()


def test_noise_voxels_have_no_signal(tiny):
    _, _, stores = tiny
    st = stores["simbrain7t"]
    for s in st.subjects:
        info = st.subject(s)
        noise = info.rois["simbrain"].values == 0
        assert (info.ncsnr[noise] == 0).all() and (_truth(info, "voxel_type")[noise] == 0).all()
        assert (_truth(info, "responses")[:, noise] == 0).all()
        assert np.isnan(oracle_ceiling(st, s, np.flatnonzero(st.split == 1))[noise]).all()
        # measured reliability: one repeat against the mean of the other two, ~0 for noise
        _, reps = _test_means(st, s)
        a, b = reps[:, 0], reps[:, 1:].mean(1)
        a, b = a - a.mean(0), b - b.mean(0)
        rel = (a * b).sum(0) / np.sqrt((a * a).sum(0) * (b * b).sum(0))
        assert abs(np.median(rel[noise])) < 0.1
        assert np.median(rel[~noise]) > np.median(rel[noise]) + 0.2


def test_prf_size_grows_with_eccentricity_in_hierarchy_order(tiny):
    _, _, stores = tiny
    st = stores["simbrain7t"]
    for s in st.subjects:
        info = st.subject(s)
        roi = info.rois["simbrain"].values
        x, y, sig = (_truth(info, k) for k in ("prf_x_deg", "prf_y_deg", "prf_sigma_deg"))
        ecc = np.hypot(x, y)
        slopes = []
        for r in (1, 2, 3, 4):
            m = roi == r
            slope, icpt = np.polyfit(ecc[m], sig[m], 1)
            assert slope > 0 and icpt > 0
            slopes.append(slope)
        assert slopes == sorted(slopes), slopes
        # category voxels have large pRFs; FFA foveal, PPA peripheral
        assert np.median(sig[roi == 5]) > np.median(sig[roi == 4])
        assert np.median(ecc[roi == 5]) < 2 < np.median(ecc[roi == 6])
        assert np.isnan(sig[roi == 0]).all() and np.isfinite(sig[roi > 0]).all()
        # log-polar magnification: more V1 voxels per square degree near the fovea
        v1 = roi == 1
        dens_fovea = (v1 & (ecc < 1.5)).sum() / (np.pi * 1.5 ** 2)
        dens_periph = (v1 & (ecc > 3) & (ecc < 5)).sum() / (np.pi * (25 - 9))
        assert dens_fovea > 2 * dens_periph
        # each hemisphere sees the contralateral field; left hemisphere (0) at flat x < 0
        hemi = _truth(info, "hemisphere")
        ret = (roi >= 1) & (roi <= 4)
        # (pRF scatter puts a few vertical-meridian voxels just across it, as in real maps)
        assert (x[ret & (hemi == 0)] > 0).mean() > 0.95 and (x[ret & (hemi == 1)] < 0).mean() > 0.95
        assert (_truth(info, "flat_xy")[hemi == 0, 0] < 0).all()


def test_3d_neighbours_have_neighbouring_prfs(tiny):
    _, _, stores = tiny
    st = stores["simbrain7t"]
    rng = np.random.default_rng(0)
    for s in st.subjects:
        info = st.subject(s)
        ret = np.flatnonzero((info.rois["simbrain"].values >= 1) & (info.rois["simbrain"].values <= 4))
        xy = np.stack([_truth(info, "prf_x_deg"), _truth(info, "prf_y_deg")], 1)[ret]
        _, nn = cKDTree(info.coords[ret]).query(info.coords[ret], k=2)
        d_nn = np.linalg.norm(xy - xy[nn[:, 1]], axis=1)
        d_rand = np.linalg.norm(xy - xy[rng.permutation(len(ret))], axis=1)
        # the tiny grid is coarse (~2.5 mm, ~1 deg per step in the periphery), hence 0.5
        assert np.median(d_nn) < 0.5 * np.median(d_rand), (np.median(d_nn), np.median(d_rand))


def test_category_voxels_follow_their_category(tiny):
    _, _, stores = tiny
    st = stores["simbrain7t"]
    lab = st.stimulus_labels
    info = st.subject("subj01")
    roi = info.rois["simbrain"].values
    truth = _truth(info, "responses")

    def mean_r(code, label):
        return np.mean([np.corrcoef(truth[:, v], label)[0, 1] for v in np.flatnonzero(roi == code)])

    assert mean_r(5, lab["face"]) > 0.5 and mean_r(5, lab["face"]) > mean_r(1, lab["face"]) + 0.3
    assert mean_r(6, lab["scene"]) > 0.5 and mean_r(6, lab["scene"]) > mean_r(5, lab["scene"]) + 0.3
    # the non-face control patch (same oval, same tones) does not drive face voxels
    plain = (lab["face"] == 0)
    ffa = truth[:, roi == 5].mean(1)
    assert abs(ffa[plain & (lab["nonface"] == 1)].mean() - ffa[plain & (lab["nonface"] == 0)].mean()) < \
        0.5 * (ffa[lab["face"] == 1].mean() - ffa[plain].mean())


def test_signal_and_noise_scales(tiny):
    _, _, stores = tiny
    med = {}
    for name, st in stores.items():
        ncs = []
        for s in st.subjects:
            info = st.subject(s)
            ssd, nsd = _truth(info, "signal_sd"), _truth(info, "noise_sd")
            np.testing.assert_allclose(ssd ** 2 + nsd ** 2, 1, rtol=1e-5)
            sig = info.ncsnr > 0
            np.testing.assert_allclose(ssd[sig] / nsd[sig], info.ncsnr[sig], rtol=1e-4)
            # the noise-free responses have exactly the stated signal sd over all stimuli
            np.testing.assert_allclose(_truth(info, "responses").std(0), ssd, rtol=1e-3, atol=1e-5)
            ncs.append(info.ncsnr[sig])
        med[name] = np.median(np.concatenate(ncs))
    assert 0.6 < med["simbrain7t"] < 1.6 and 0.2 < med["simbrain3t"] < 0.5
    assert med["simbrain7t"] > 2 * med["simbrain3t"]


# ----------------------------------------------------------------------------- presets


def test_nsd_scale_plan_without_running_it():
    plan = planned_shapes("nsd-scale")
    assert list(plan) == ["simbrain7t"]
    (n_trials, n_voxels), = plan["simbrain7t"]["subjects"].values()
    assert n_trials == 30_000 and n_voxels == 15_000
    assert plan["simbrain7t"]["n_stimuli"] == 10_000 and plan["simbrain7t"]["n_test"] == 1000
    assert PRESETS["nsd-scale"].datasets[0].dtype == "float16"
    q = planned_shapes("quickstart")
    assert len(q["simbrain7t"]["subjects"]) == 3 and len(q["simbrain3t"]["subjects"]) == 2
    assert all(2000 <= v <= 3000 for _, v in q["simbrain7t"]["subjects"].values())


# ----------------------------------------------------------------------------- other assumptions


@pytest.fixture(scope="session")
def alt_tiny(tmp_path_factory):
    """The tiny-sized preset with every alternative assumption switched on."""
    out = tmp_path_factory.mktemp("simbrain_alt")
    paths = simulate(preset="alt-tiny", out=out, seed=0)
    return Store(paths["simbrain7t"])


def _residuals(info):
    """Measured minus noise-free responses, trial by trial: (n_trials, n_voxels), and sessions."""
    with h5py.File(info.path, "r") as f:
        resp = f["responses"][()].astype(np.float64)
        truth = f["truth/responses"][()].astype(np.float64)
    return resp - truth[info.trial_stimulus], info.trial_session


def test_default_assumptions_change_nothing_and_bad_ones_are_refused():
    from dataclasses import replace

    from brainenc.data.simbrain import Assumptions

    assert PRESETS["tiny"].assumptions == Assumptions() == replace(Assumptions(), surround_gain=0.0)
    for bad in ({"surround_gain": 1.0}, {"surround_ratio": 0.8}, {"css_scale": 0},
                {"shared_noise": 0.6, "drift_noise": 0.5}, {"e_max_deg": 0.5}):
        with pytest.raises(ValueError, match=next(iter(bad)).split("_")[0]):
            Assumptions(**bad)


def test_alt_presets_plan_subjects_of_different_sizes_and_fewer_images():
    for name in ("alt-dog", "alt-offscreen", "alt-noise", "alt-few", "alt-category", "alt-independent"):
        plan = planned_shapes(name)
        assert list(plan) == ["simbrain7t"]
        sizes = [v for _, v in plan["simbrain7t"]["subjects"].values()]
        assert len(sizes) == 3 and len(set(sizes)) == 3, (name, sizes)
    assert PRESETS["alt-few"].datasets[0].n_train < PRESETS["alt-dog"].datasets[0].n_train / 2
    assert max(planned_shapes("alt-independent")["simbrain7t"]["subjects"].values())[1] <= 700


def test_alt_store_records_its_assumptions_and_keeps_the_noise_budget(alt_tiny):
    st = alt_tiny
    st.validate(deep=True)
    asm = st.manifest["generator"]["preset"]["assumptions"]
    assert asm["surround_gain"] == 0.45 and asm["shared_noise"] == 0.3 and asm["e_max_deg"] == 7.5
    info = st.subject("subj01")
    roi = info.rois["simbrain"].values
    # compressive exponents scaled by css_scale
    css = _truth(info, "css_exponent")
    assert css[roi == 1] == pytest.approx(0.55 * 0.7) and css[roi == 4] == pytest.approx(0.30 * 0.7)
    # the structured noise is part of the noise budget: per-voxel residual sd stays noise_sd
    res, sess = _residuals(info)
    nsd = _truth(info, "noise_sd")
    ratio = res.std(0) / nsd
    assert 0.85 < np.median(ratio) < 1.15, np.median(ratio)


def test_alt_noise_is_correlated_across_voxels_and_drifts_within_sessions(alt_tiny, tiny):
    def stats(info):
        res, sess = _residuals(info)
        sig = info.ncsnr > 0
        c = np.corrcoef(res[:, sig].T)
        mean_corr = c[np.triu_indices_from(c, 1)].mean()
        # lag-1 autocorrelation in presentation order, within sessions
        same = sess[1:] == sess[:-1]
        a, b = res[1:][same], res[:-1][same]
        lag1 = np.median([np.corrcoef(a[:, v], b[:, v])[0, 1] for v in range(res.shape[1])])
        return mean_corr, lag1

    alt_corr, alt_lag = stats(alt_tiny.subject("subj01"))
    base_corr, base_lag = stats(tiny[2]["simbrain7t"].subject("subj01"))
    assert abs(base_corr) < 0.03 and abs(base_lag) < 0.02, (base_corr, base_lag)
    assert alt_corr > 0.2, alt_corr
    assert alt_lag > 0.05, alt_lag  # drift: 20% of the noise variance, ~5 sessions of 60 trials


def test_alt_centres_leave_the_screen_and_category_rfs_are_large_and_off_centre(alt_tiny, tiny):
    def geometry(info):
        roi = info.rois["simbrain"].values
        x, y, sig = (_truth(info, k) for k in ("prf_x_deg", "prf_y_deg", "prf_sigma_deg"))
        ev = (roi >= 1) & (roi <= 3)
        off = (np.maximum(np.abs(x), np.abs(y)) > 8.4 / 2)[ev].mean()
        ecc = np.hypot(x, y)
        return off, np.median(ecc[roi == 5]), np.median(sig[roi == 5])

    off, ffa_ecc, ffa_sig = geometry(alt_tiny.subject("subj01"))
    off0, ffa_ecc0, ffa_sig0 = geometry(tiny[2]["simbrain7t"].subject("subj01"))
    assert off > off0 + 0.05, (off, off0)
    assert ffa_ecc > ffa_ecc0 + 1.0 and ffa_ecc > 2.0
    assert ffa_sig > 1.4 * ffa_sig0


def test_surround_suppresses_large_stimuli_relative_to_small_ones(tiny):
    """A difference-of-Gaussians pRF answers a full-screen field less, relative to a patch on its
    centre, than the Gaussian pRF with the same centre."""
    from brainenc.data.simbrain.cortex import RETINOTOPIC
    from brainenc.data.simbrain.responses import N_ORI, VoxelModel, pool_size
    from brainenc.data.simbrain.cortex import build_cortex, sample_map

    rng = np.random.default_rng(0)
    vt = build_cortex(sample_map(rng), 400, PRESETS["tiny"].fractions, rng, 1.0, 0.4, 8.4)
    size, a = 32, 8.4
    ref = np.ones(len(RETINOTOPIC))
    plain = VoxelModel(vt, size, a, ref)
    dog = VoxelModel(vt, size, a, ref, surround_ratio=2.5, surround_gain=0.45)
    v1 = np.flatnonzero((vt.roi == 1) & (np.hypot(vt.prf_x, vt.prf_y) < 2))[:20]
    p = pool_size(size, 0)
    cx = np.linspace(-a / 2, a / 2, p + 1)
    centres = (cx[:-1] + cx[1:]) / 2
    gx, gy = np.meshgrid(centres, -centres)  # y up, rows top to bottom
    feats_full, feats_patch = [], []
    for b in range(len(RETINOTOPIC)):
        pb = pool_size(size, b)
        feats_full.append(np.ones((len(v1), N_ORI, pb * pb), np.float32))
        feats_patch.append(np.zeros((len(v1), N_ORI, pb * pb), np.float32))
    cell = a / p
    for i, v in enumerate(v1):  # image i: energy only in a patch on voxel v's centre
        near = np.hypot(gx - vt.prf_x[v], gy - vt.prf_y[v]) < 1.5 * vt.prf_sigma[v] + cell
        feats_patch[0][i, :, near.ravel()] = 1
    labels = {"face": np.zeros(len(v1)), "face_box": np.zeros((len(v1), 4)), "scene": np.zeros(len(v1)),
              "scene_box": np.zeros((len(v1), 4))}
    idx = np.arange(len(v1))
    ratio_plain = plain.raw(feats_full, labels)[idx, v1] / plain.raw(feats_patch, labels)[idx, v1]
    ratio_dog = dog.raw(feats_full, labels)[idx, v1] / dog.raw(feats_patch, labels)[idx, v1]
    # a Gaussian pRF sums: the full field drives it at least as much as the patch; the surround
    # turns that around (the ratio is of compressed responses, drive ** 0.55)
    assert (ratio_plain >= 1).all() and (ratio_dog < 0.92).all(), (ratio_dog, ratio_plain)

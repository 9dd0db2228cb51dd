"""The retinotopic readout recovers simbrain's true receptive-field centres.

simbrain's voxels sum oriented contrast energy inside their pRF, so a fixed, simple feature map
(local gradient energy of the image, at two scales) is enough for the readout's learned positions
to find them; the test then checks :mod:`brainenc.analysis.prf` against a bound that random
positions cannot meet.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from brainenc.analysis.prf import EARLY_VISUAL, prf_figure, prf_recovery, recovery_stats, true_centres
from brainenc.data.datamodule import BrainDataModule
from brainenc.models.backbones import Features
from brainenc.models.readout import FeatureSpec
from brainenc.models.retinotopic import RetinotopicReadout


def _energy_pyramid(images: torch.Tensor) -> list[torch.Tensor]:
    """(N, 3, S, S) in [0, 1] -> gradient energy maps (N, 2, S, S) and (N, 2, S/2, S/2)."""
    g = images.mean(1, keepdim=True)
    dx = F.pad(g[..., :, 1:] - g[..., :, :-1], (0, 1, 0, 0))
    dy = F.pad(g[..., 1:, :] - g[..., :-1, :], (0, 0, 0, 1))
    e = torch.cat([dx ** 2, dy ** 2], 1).sqrt()
    return [e, F.avg_pool2d(e, 2)]


@pytest.fixture(scope="module")
def tiny(tiny_brain):
    dm = BrainDataModule([str(tiny_brain["simbrain7t"])], subjects=["subj01"], image_size=32)
    dm.setup()
    return dm


def test_recovery_stats_on_known_points():
    rng = np.random.default_rng(0)
    true = rng.uniform(-4, 4, (200, 2))
    s = recovery_stats(true + 0.1, true)
    assert s["r_x"] == pytest.approx(1.0) and s["median_dist_deg"] == pytest.approx(0.1 * np.sqrt(2))
    shuffled = recovery_stats(true[rng.permutation(200)], true)
    assert abs(shuffled["r_x"]) < 0.2 and abs(shuffled["r_y"]) < 0.2


def test_visible_centres_are_the_on_screen_centre_of_mass():
    from brainenc.analysis.prf import visible_centres

    half = 4.2
    xy = np.array([[0.0, 0.0], [1.0, -2.0], [5.0, 0.0], [4.2, 6.0], [30.0, 0.0]])
    sigma = np.array([0.5, 0.3, 1.0, 2.0, 0.5])
    got = visible_centres(xy, sigma, half)
    # small pRFs well inside keep their centre
    assert np.allclose(got[:2], xy[:2], atol=1e-6)
    # numerically: centre of mass of the Gaussian on a fine grid of the screen
    g = np.linspace(-half, half, 4001)
    for i in (2, 3):
        for axis in (0, 1):
            w = np.exp(-0.5 * ((g - xy[i, axis]) / sigma[i]) ** 2)
            assert got[i, axis] == pytest.approx((w * g).sum() / w.sum(), abs=2e-3)
    # off the screen: inside the screen, pulled in from the true centre
    assert (np.abs(got[2:4]) <= half).all() and got[2, 0] < xy[2, 0]
    # a pRF with no mass on the screen is clipped to the edge
    assert np.allclose(got[4], [half, 0.0])


def test_learned_positions_recover_true_centres(tiny, tmp_path):
    torch.manual_seed(0)
    pair = tiny.pairs[0]
    with h5py.File(pair.store.stimuli_path, "r") as f:
        images = torch.from_numpy(f["images"][()]).permute(0, 3, 1, 2).float() / 255
    maps = _energy_pyramid(images)
    train = np.sort(pair.split.train)
    from brainenc.data.datamodule import PairBatchDataset

    y = PairBatchDataset(tiny.pairs, 32, "stimuli", load_images=False)[(0, train)]["responses"]
    # the voxels with a pRF: the early visual areas
    true, vt, labels = true_centres(pair.info.path)
    spec = FeatureSpec(tuple((m.shape[1], m.shape[2], m.shape[3]) for m in maps), 4)
    readout = RetinotopicReadout({pair.key: pair.info.n_voxels}, spec, width=4, hidden=32, grid=8,
                                 selector_init="zero", global_term=False)
    readout.set_voxel_info(pair.key, pair.info.coords)
    before = prf_recovery(readout, [pair])[pair.key]
    opt = torch.optim.Adam(readout.parameters(), lr=1e-2)
    for step in range(250):
        idx = torch.as_tensor(np.random.default_rng(step).choice(len(train), 32, replace=False))
        feats = Features([m[train][idx] for m in maps])
        pred = readout(feats, pair.key)
        loss = ((pred - y[idx]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    readout.eval()
    got = prf_recovery(readout, [pair], EARLY_VISUAL)[pair.key]
    assert got["n"] == int(np.isin(vt, [1, 2, 3]).sum()) > 100
    # every voxel starts at the centre: no correlation with the truth before training
    assert np.isnan(before["r_x"]) or abs(before["r_x"]) < 0.2
    assert got["r_x"] > 0.8 and got["r_y"] > 0.8, got
    assert got["median_dist_deg"] < 1.5, got
    # centres off the screen cannot be reached: the on-screen subset is smaller and fits better
    assert 0 < got["n_on_screen"] < got["n"] and got["median_dist_deg_on_screen"] < got["median_dist_deg"]
    # scored against the visible centres, every voxel counts and the fit is closer than to the raw truth
    assert got["n_visible"] == got["n"] and got["median_dist_deg_visible"] < got["median_dist_deg"]
    assert got["off_screen_fraction"] == pytest.approx(1 - got["n_on_screen"] / got["n"])
    fig = prf_figure(readout, pair)
    fig.savefig(tmp_path / "prf.png")
    assert (tmp_path / "prf.png").stat().st_size > 10_000


def test_level_profile_sums_grid_sizes_per_backbone_level(tiny):
    from brainenc.analysis.levels import level_profile

    pair = tiny.pairs[0]
    spec = FeatureSpec(((2, 32, 32), (2, 16, 16)), 4)
    readout = RetinotopicReadout({pair.key: pair.info.n_voxels}, spec, width=4, hidden=8, grid=[8, 4],
                                 selector_init="zero")
    readout.set_voxel_info(pair.key, pair.info.coords)
    logits = torch.tensor([2.0, 0.0, 1.0, -1.0])  # (size 8: level 0, level 1), (size 4: level 0, level 1)
    with torch.no_grad():
        readout.layer_mlp[next(iter(readout.layer_mlp))][-1].bias.copy_(logits)
    p = torch.softmax(logits, 0).numpy()
    df = level_profile(readout, [pair])
    atlas = next(iter(pair.info.rois.values()))
    named = {atlas.labels[v]: int((atlas.values == v).sum()) for v in set(atlas.values.tolist()) if v != 0}
    assert dict(zip(df["roi"], df["n_voxels"])) == {**named, "all": pair.info.n_voxels}
    assert np.allclose(df["level_0"], p[0] + p[2]) and np.allclose(df["level_1"], p[1] + p[3])
    assert np.allclose(df["mean_level"], p[1] + p[3])


def test_gaussian_field_sizes_are_scored_by_rank_against_the_true_sizes(tiny):
    """A readout whose learned sizes are a monotone function of the true pRF sizes scores a rank
    correlation of 1 on the on-screen voxels; a point readout reports no size at all."""
    pair = tiny.pairs[0]
    _, vt, _, sigma = true_centres(pair.info.path, with_sigma=True)
    spec = FeatureSpec(((2, 8, 8),), 2)
    point = RetinotopicReadout({pair.key: pair.info.n_voxels}, spec, width=2, hidden=8)
    point.set_voxel_info(pair.key, pair.info.coords)
    assert "size_r_on_screen" not in prf_recovery(point, [pair])[pair.key]
    gauss = RetinotopicReadout({pair.key: pair.info.n_voxels}, spec, width=2, hidden=8, rf="gaussian",
                               positions="free")
    gauss.set_voxel_info(pair.key, pair.info.coords)
    with torch.no_grad():  # softplus^-1 of 0.05 * sigma^2: monotone in the true size
        target = torch.as_tensor(0.05 * sigma ** 2 + 1e-3, dtype=torch.float32)
        gauss.free_size[pair.key.replace("/", "__")].copy_(target + torch.log(-torch.expm1(-target)))
    got = prf_recovery(gauss, [pair])[pair.key]
    assert got["size_r_on_screen"] == pytest.approx(1.0, abs=1e-6)
    with torch.no_grad():  # shuffled sizes: no rank agreement
        perm = torch.randperm(len(target), generator=torch.Generator().manual_seed(0))
        gauss.free_size[pair.key.replace("/", "__")].copy_((target + torch.log(-torch.expm1(-target)))[perm])
    assert abs(prf_recovery(gauss, [pair])[pair.key]["size_r_on_screen"]) < 0.2

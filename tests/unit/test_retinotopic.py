"""Retinotopic readout, ROI experts, partitions, distillation schedule and LoRA under training."""

from __future__ import annotations

import math

import h5py
import numpy as np
import pytest
import torch

from brainenc.lit.distill import DistillModule, gt_weight
from brainenc.lit.encoder_module import EncoderModule
from brainenc.models.backbones import Backbone, Features
from brainenc.models.readout import FeatureSpec
from brainenc.lit.experts import ExpertsModule
from brainenc.models.experts import ExpertFeatures, ExpertsReadout
from brainenc.models.fields import bilinear_matrix, gaussian_matrix, sample_at, sample_points, sampled_dot
from brainenc.models.retinotopic import RetinotopicReadout, fourier_encode, normalise_coords, normalise_levels, read_level
from brainenc.models.partition_file import read_partitions, write_partitions
from brainenc.recipes.partitions import kmeans_partition, random_partition

SHAPES = ((6, 8, 8), (10, 4, 4))
PAIR = "sim/subj01"


def _feats(b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Features([torch.randn(b, c, h, w, generator=g) for c, h, w in SHAPES])


def _spec():
    return FeatureSpec(SHAPES, sum(c for c, _, _ in SHAPES))


def _coords(n, seed=0):
    return np.random.default_rng(seed).uniform(0, 40, (n, 3)).astype(np.float32)


def _pixel_centre(i, j, h, w):
    return (2 * j + 1) / w - 1, (2 * i + 1) / h - 1


# ----------------------------------------------------------------------------- sampling
def test_grid_sample_at_pixel_centres_equals_indexing():
    fmap = torch.randn(2, 5, 6, 9)
    rng = np.random.default_rng(1)
    ij = [(int(rng.integers(6)), int(rng.integers(9))) for _ in range(20)] + [(0, 0), (5, 8), (0, 8), (5, 0)]
    pos = torch.tensor([_pixel_centre(i, j, 6, 9) for i, j in ij], dtype=torch.float32)
    out = sample_at(fmap, pos)
    assert out.shape == (2, 5, len(ij))
    ref = torch.stack([fmap[:, :, i, j] for i, j in ij], dim=2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("h,w", [(4, 4), (8, 8), (7, 5), (1, 3)])
def test_bilinear_matrix_equals_grid_sample_with_gradients(h, w):
    g = torch.Generator().manual_seed(h * 10 + w)
    fmap = torch.randn(3, 4, h, w, generator=g, requires_grad=True)
    pos = (torch.rand(50, 2, generator=g) * 2.6 - 1.3).requires_grad_(True)  # some off the image (border)
    m = bilinear_matrix(pos, h, w)
    assert m.shape == (50, h * w)
    torch.testing.assert_close(m.sum(1), torch.ones(50))
    assert int((m > 0).sum(1).max()) <= 4
    got, want = fmap.flatten(2) @ m.t(), sample_at(fmap, pos)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    wt = torch.randn(want.shape, generator=g)
    for a, b in zip(torch.autograd.grad((got * wt).sum(), [fmap, pos]),
                    torch.autograd.grad((want * wt).sum(), [fmap, pos])):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


# batch x pixels picking each strategy: readout folded into the matrix (pixels <= batch), dense
# sampling (batch < pixels <= 64), grid_sample (larger maps)
@pytest.mark.parametrize("b,h,w", [(16, 4, 4), (4, 8, 8), (2, 12, 10), (40, 6, 6)])
def test_sampled_dot_equals_sample_then_dot_in_every_strategy(b, h, w):
    g = torch.Generator().manual_seed(b + h)
    fmap = torch.randn(b, 5, h, w, generator=g, requires_grad=True)
    pos = (torch.rand(30, 2, generator=g) * 2.2 - 1.1).requires_grad_(True)
    readout = torch.randn(30, 5, generator=g, requires_grad=True)
    got = sampled_dot(fmap, pos, readout)
    want = torch.einsum("bcv,vc->bv", sample_at(fmap, pos), readout)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    wt = torch.randn(want.shape, generator=g)
    for a, b_ in zip(torch.autograd.grad((got * wt).sum(), [fmap, pos, readout]),
                     torch.autograd.grad((want * wt).sum(), [fmap, pos, readout])):
        torch.testing.assert_close(a, b_, atol=1e-4, rtol=1e-4)


def test_gaussian_field_weights_pixels_by_distance_and_narrows_to_the_nearest_pixels():
    h = w = 8
    pos = torch.tensor([_pixel_centre(2, 5, h, w), _pixel_centre(0, 0, h, w), (1.6, -1.4)])
    m = gaussian_matrix(pos, torch.tensor([0.3, 1e-4, 0.1]), h, w)
    torch.testing.assert_close(m.sum(1), torch.ones(3))
    grid = m.view(3, h, w)
    # centred on pixel (2, 5): the largest weight there, falling off with distance, symmetric
    assert int(grid[0].argmax()) == 2 * w + 5
    assert grid[0, 2, 4] == pytest.approx(float(grid[0, 2, 6]), rel=1e-5) and grid[0, 2, 3] < grid[0, 2, 4]
    # a tiny field is the pixel it sits on plus what half a pixel pitch adds: neighbours get
    # exp(-2) of the centre's weight per axis
    assert float(grid[1, 0, 1] / grid[1, 0, 0]) == pytest.approx(math.exp(-2), rel=1e-3)
    # a field off the image's corner reads the nearest corner pixel most
    assert int(grid[2].argmax()) == 0 * w + (w - 1)
    # readout through the matrix == sample_points; gradients reach position and size
    fmap = torch.randn(2, 3, h, w)
    sig = torch.tensor([0.3, 0.05, 0.1], requires_grad=True)
    pos = pos.clone().requires_grad_(True)
    out = sample_points(fmap, pos, sig)
    torch.testing.assert_close(out, fmap.flatten(2) @ gaussian_matrix(pos, sig, h, w).t())
    gp, gs = torch.autograd.grad(out.pow(2).sum(), [pos, sig])
    assert gp.abs().sum() > 0 and gs.abs().sum() > 0


def test_gaussian_readout_starts_at_its_size_copies_into_experts_and_trains():
    torch.manual_seed(0)  # the MLPs' initialisation: the outcome must not depend on test order
    n = 12
    r = RetinotopicReadout({PAIR: n}, _spec(), width=4, hidden=8, rf="gaussian", rf_size_init=0.2,
                           selector_init="zero")
    r.set_voxel_info(PAIR, _coords(n))
    torch.testing.assert_close(r.rf_sizes(PAIR), torch.full((n,), 0.2))
    assert RetinotopicReadout({PAIR: n}, _spec()).rf_sizes(PAIR) is None
    feats = _feats()
    # the prediction uses the Gaussian field: the same readout read at points differs
    point = RetinotopicReadout({PAIR: n}, _spec(), width=4, hidden=8, selector_init="zero")
    point.load_state_dict(r.state_dict(), strict=False)
    r.eval(), point.eval()
    assert not torch.allclose(r(feats, PAIR), point(feats, PAIR), atol=1e-4)
    # a subset readout copied from it predicts the same columns
    idx = torch.tensor([1, 4, 7])
    sub = RetinotopicReadout({PAIR: 3}, _spec(), width=4, hidden=8, rf="gaussian")
    sub.set_voxel_info(PAIR, _coords(n)[idx.numpy()], frame=_coords(n))
    sub.copy_from(r, {PAIR: idx})
    torch.testing.assert_close(sub.eval()(feats, PAIR), r(feats, PAIR)[:, idx], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="rf"):
        point.copy_from(r, {PAIR: torch.arange(n)})
    # sizes are trained: one optimiser step moves them
    r.train()
    opt = torch.optim.SGD(r.parameters(), lr=0.5)
    before = r.rf_sizes(PAIR).detach().clone()
    (r(feats, PAIR) - 3).pow(2).mean().backward()
    assert float(r.size_mlp[PAIR.replace("/", "__")][-1].bias.grad.abs()) > 0
    opt.step()
    assert (r.rf_sizes(PAIR) - before).abs().max() > 1e-6
    with pytest.raises(ValueError, match="rf must be"):
        RetinotopicReadout({PAIR: n}, _spec(), rf="disc")


def test_adapter_is_a_shared_nonlinear_map_between_the_levels_and_the_bottleneck():
    n = 9
    r = RetinotopicReadout({PAIR: n}, _spec(), width=4, hidden=8, adapter=7).eval()
    r.set_voxel_info(PAIR, _coords(n))
    assert [a[0].out_channels for a in r.adapter] == [7, 7] and r.bottleneck[0].in_channels == SHAPES[0][0]
    feats = _feats()
    lin = RetinotopicReadout({PAIR: n}, _spec(), width=4, hidden=8).eval()
    lin.set_voxel_info(PAIR, _coords(n))
    lin.load_state_dict(r.state_dict(), strict=False)
    # the residual's output layer starts at zero: at first exactly the linear readout
    torch.testing.assert_close(r(feats, PAIR), lin(feats, PAIR))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for a in r.adapter:
            a[-1].weight.copy_(torch.randn(a[-1].weight.shape, generator=g))
    pos, levels, mix, w, b, _ = r.point_params(PAIR)
    maps = [m + a[2](torch.nn.functional.gelu(a[0](m))) for m, a in zip(normalise_levels(feats, r.norm), r.adapter)]
    from brainenc.models.retinotopic import predict_points
    want = predict_points(maps, r.bottleneck_weights(), pos, levels, mix, w, b, dropout=r.dropout)
    torch.testing.assert_close(r(feats, PAIR), want)
    # no longer affine in the features: an affine readout gives equal steps r(3x) - r(2x) == r(2x) - r(x)
    # (level norms frozen in eval mode)
    def steps(readout):
        a, b_, c = (readout(Features([k * m for m in feats.maps]), PAIR) for k in (1, 2, 3))
        return c - b_, b_ - a
    torch.testing.assert_close(*steps(lin), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(*steps(r), atol=1e-3)
    with pytest.raises(ValueError, match="adapter"):
        RetinotopicReadout({PAIR: n}, _spec(), adapter=-1)


def test_position_convention_y_points_down_and_degrees_point_up():
    # a map whose top row is 1 and the rest 0: a position in the top half (py < 0) reads it
    fmap = torch.zeros(1, 1, 4, 4)
    fmap[:, :, 0] = 1.0
    top, bottom = _pixel_centre(0, 2, 4, 4), _pixel_centre(3, 2, 4, 4)
    out = sample_at(fmap, torch.tensor([top, bottom]))
    assert out[0, 0].tolist() == [1.0, 0.0]
    # and positions_deg turns the top of the image into positive y degrees (simbrain: y up)
    r = RetinotopicReadout({PAIR: 2}, _spec(), positions="free")
    with torch.no_grad():
        r.free_pos[PAIR.replace("/", "__")].copy_(torch.atanh(torch.tensor([[0.5, -0.5], [-0.25, 0.75]])))
    deg = r.positions_deg(PAIR, 8.4)
    torch.testing.assert_close(deg, torch.tensor([[2.1, 2.1], [-1.05, -3.15]]))


def test_readout_matches_a_direct_reference_at_pixel_centres():
    """Free positions on pixel centres: the prediction equals an indexing-based computation."""
    n = 7
    r = RetinotopicReadout({PAIR: n}, _spec(), positions="free", width=4).eval()
    rng = np.random.default_rng(2)
    ij = [(int(rng.integers(8)), int(rng.integers(8))) for _ in range(n)]
    # level-0 centres at even pixels are exactly on level-1 pixel edges, not centres; check level 0 only
    pos = torch.tensor([_pixel_centre(i, j, 8, 8) for i, j in ij])
    with torch.no_grad():
        r.free_pos[PAIR.replace("/", "__")].copy_(torch.atanh(pos))
    r.set_voxel_info(PAIR, _coords(n))
    feats = _feats()
    pred = r(feats, PAIR)
    pos_, levels, mix = r.voxel_params(PAIR)
    maps = [conv(m) for m, conv in zip(normalise_levels(feats, r.norm), r.bottleneck)]
    local0 = torch.stack([maps[0][:, :, i, j] for i, j in ij], dim=2)
    local1 = sample_at(maps[1], pos_)
    local = local0 * levels[:, 0] + local1 * levels[:, 1]
    pooled = torch.stack([m.mean(dim=(2, 3)) for m in maps], dim=2)
    glob = pooled @ levels.t()
    feat = torch.cat([local * mix, glob * (1 - mix)], dim=1)
    ref = torch.einsum("bcv,vc->bv", feat, r.weight[PAIR.replace("/", "__")]) + r.bias[PAIR.replace("/", "__")]
    torch.testing.assert_close(pred, ref, atol=1e-5, rtol=1e-5)


def test_voxel_subsets_equal_columns_of_the_full_prediction():
    n = 30
    r = RetinotopicReadout({PAIR: n, "sim/subj02": 12}, _spec(), width=8).eval()
    r.set_voxel_info(PAIR, _coords(n))
    r.set_voxel_info("sim/subj02", _coords(12, 1))
    feats = _feats()
    full = r(feats, PAIR)
    sub = torch.tensor([29, 3, 3, 17, 0])
    torch.testing.assert_close(r(feats, PAIR, sub), full[:, sub])
    assert r(feats, "sim/subj02").shape == (3, 12)


def test_missing_coords_is_a_clear_error():
    r = RetinotopicReadout({PAIR: 5}, _spec())
    with pytest.raises(RuntimeError, match="set_voxel_info"):
        r(_feats(), PAIR)


def test_coords_are_normalised_isotropically_and_saved():
    c = np.array([[0, 0, 0], [10, 2, 1], [4, 1, 0.5]], dtype=np.float32)
    z = normalise_coords(c)
    assert np.abs(z).max() == pytest.approx(1.0)
    # one scale for every axis: ratios of extents are kept
    assert np.ptp(z[:, 0]) / np.ptp(z[:, 1]) == pytest.approx(5.0)
    r = RetinotopicReadout({PAIR: 3}, _spec())
    r.set_voxel_info(PAIR, c)
    r2 = RetinotopicReadout({PAIR: 3}, _spec())
    r2.load_state_dict(r.state_dict())
    r2.eval(), r.eval()
    torch.testing.assert_close(r2(_feats(), PAIR), r(_feats(), PAIR))
    enc = fourier_encode(torch.from_numpy(z), 3)
    assert enc.shape == (3, 3 + 18)


def test_layer_entropy_regulariser_and_jitter():
    n = 20
    r = RetinotopicReadout({PAIR: n}, _spec(), layer_entropy=0.5, jitter=0.05)
    r.set_voxel_info(PAIR, _coords(n))
    feats = _feats()
    r.train()
    a, b = r(feats, PAIR), r(feats, PAIR)
    assert not torch.allclose(a, b)  # jitter (and BatchNorm batch stats are the same) -> differs
    reg = r.regularization()
    # two levels: entropy at most log 2; near-uniform softmax at init -> close to it
    assert 0.5 * 0.5 * math.log(2) < float(reg.detach()) <= 0.5 * math.log(2) + 1e-6
    reg.backward()
    grad = r.layer_mlp[PAIR.replace("/", "__")][-1].weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert float(r.regularization()) == 0.0  # consumed; no stale term
    r.eval()
    torch.testing.assert_close(r(feats, PAIR), r(feats, PAIR))
    assert float(r.regularization()) == 0.0


def test_positions_receive_gradients_and_can_be_learned():
    """Free positions move to the pixel whose feature the target is (the sampling is differentiable)."""
    torch.manual_seed(0)
    fmap = torch.zeros(64, 1, 8, 8)
    # a smooth random field per image; the target is its value at pixel (2, 5)
    fmap[:] = torch.nn.functional.interpolate(torch.randn(64, 1, 4, 4), size=(8, 8), mode="bilinear")
    target = fmap[:, 0, 2, 5]
    pos = torch.zeros(1, 2, requires_grad=True)
    opt = torch.optim.Adam([pos], lr=0.05)
    for _ in range(150):
        opt.zero_grad()
        loss = ((sample_at(fmap, torch.tanh(pos))[:, 0, 0] - target) ** 2).mean()
        loss.backward()
        opt.step()
    got = torch.tanh(pos).detach()[0]
    want = torch.tensor(_pixel_centre(2, 5, 8, 8))
    assert torch.allclose(got, want, atol=0.1), (got, want)


@pytest.mark.parametrize("n_points", [3, 400])  # few voxels: sample first; many: project first
@pytest.mark.parametrize("dropout", [False, True])  # dropout materialises the features; else folded
def test_read_level_equals_project_then_sample(n_points, dropout):
    g = torch.Generator().manual_seed(2)
    b, c, width, h, w = 2, 5, 4, 3, 3
    fmap = torch.randn(b, c, h, w, generator=g)
    weight = torch.randn(width, c, generator=g).requires_grad_(True)
    bias = torch.randn(width, generator=g).requires_grad_(True)
    pos = (torch.rand(n_points, 2, generator=g) * 2.4 - 1.2).requires_grad_(True)  # some outside the image
    readout = torch.randn(n_points, width, generator=g).requires_grad_(True)
    # dropout with p -> 0 in training mode takes the explicit path and must give the same numbers
    drop = torch.nn.Dropout(1e-12 if dropout else 0.0).train()
    local, pooled = read_level(fmap, weight, bias, pos, readout, drop)
    proj = torch.nn.functional.conv2d(fmap, weight[:, :, None, None], bias)
    ref_local = (sample_at(proj, pos) * readout.t()).sum(1)
    ref_pooled = proj.mean(dim=(2, 3))
    torch.testing.assert_close(local, ref_local, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(pooled, ref_pooled, atol=1e-5, rtol=1e-5)
    wt = torch.randn_like(local)
    got = torch.autograd.grad((local * wt).sum() + pooled.sum(), [weight, bias, pos, readout])
    want = torch.autograd.grad((ref_local * wt).sum() + ref_pooled.sum(), [weight, bias, pos, readout])
    for a, b_ in zip(got, want):
        torch.testing.assert_close(a, b_, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- experts
def _partition_file(tmp_path, n):
    rng = np.random.default_rng(0)
    parts = {"atlas": (["A", "B", "none"], {PAIR: rng.integers(0, 3, n)}),
             "random0": (["r0", "r1"], {PAIR: rng.integers(0, 2, n)})}
    return write_partitions(tmp_path / "partitions.h5", parts), parts


def test_partitions_roundtrip_and_builders(tmp_path):
    path, parts = _partition_file(tmp_path, 25)
    back = read_partitions(path)
    assert list(back) == ["atlas", "random0"]
    assert back["atlas"][0] == ["A", "B", "none"]
    np.testing.assert_array_equal(back["atlas"][1][PAIR], parts["atlas"][1][PAIR])
    w = {PAIR: np.r_[np.zeros((10, 4)), np.ones((15, 4)) * 5] + np.random.default_rng(0).normal(0, .1, (25, 4))}
    names, lab = kmeans_partition(w, 2)
    assert len(set(lab[PAIR][:10])) == 1 and len(set(lab[PAIR][10:])) == 1 and lab[PAIR][0] != lab[PAIR][-1]
    c = _coords(50)
    names, lab = random_partition({PAIR: c}, 4, seed=1)
    assert names == ["r0", "r1", "r2", "r3"] and set(lab[PAIR]) == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="labels outside"):
        write_partitions(tmp_path / "bad.h5", {"x": (["a"], {PAIR: np.array([0, 1])})})


def test_experts_stitch_each_roi_prediction_onto_its_voxels(tmp_path):
    n = 25
    path, parts = _partition_file(tmp_path, n)
    ex = ExpertsReadout({PAIR: n}, _spec(), str(path), expert={"width": 4, "hidden": 8}).eval()
    coords = _coords(n)
    ex.set_voxel_info(PAIR, coords)
    feats = _feats()
    per = ex.forward_partitions(feats, PAIR)
    normed = Features([norm(m) for m, norm in zip(feats.maps, ex.norm)])
    assert per.shape == (3, 2, n)
    for p_i, (pname, (names, labels)) in enumerate(parts.items()):
        lab = labels[PAIR]
        for r in range(len(names)):
            idx = np.flatnonzero(lab == r)
            expert = ex.experts[ex.expert_name(pname, r)]
            assert expert.voxel_counts == {PAIR: len(idx)}
            # the expert saw only its ROI's coordinates
            own = getattr(expert, f"coords_{PAIR.replace('/', '__')}")
            np.testing.assert_allclose(own.numpy(), normalise_coords(coords[idx]), atol=1e-6)
            # experts share the ensemble's normalisation; alone on the normalised maps each gives
            # exactly its columns of the batched computation
            torch.testing.assert_close(per[:, p_i, idx], expert(normed, PAIR), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ex(feats, PAIR), per.mean(1))
    sub = torch.tensor([4, 0, 24, 7])
    torch.testing.assert_close(ex.forward_partitions(feats, PAIR, sub), per[:, :, sub])
    only = ExpertsReadout({PAIR: n}, _spec(), str(path), only=["random0"])
    assert only.partition_names == ["random0"] and len(only.experts) == 2


def test_experts_on_per_expert_features_equal_the_shared_path(tmp_path):
    n = 25
    path, _ = _partition_file(tmp_path, n)
    ex = ExpertsReadout({PAIR: n}, _spec(), str(path), expert={"width": 4, "hidden": 8}).eval()
    ex.set_voxel_info(PAIR, _coords(n))
    feats = _feats()
    sub = torch.tensor([4, 0, 24, 7, 11])
    for voxels in (None, sub):
        shared = ex.forward_partitions(feats, PAIR, voxels)
        each = ex.forward_partitions(ExpertFeatures(lambda e: feats, len(feats)), PAIR, voxels)
        torch.testing.assert_close(shared, each, atol=1e-5, rtol=1e-5)


def test_per_expert_lora_adapters_route_each_expert_to_its_own_adapter(tmp_path):
    torch.manual_seed(0)
    n = 12
    path, parts = _partition_file(tmp_path, n)
    bb = _bb("test_vit", "lora")
    m = ExpertsModule(bb, lambda vc, spec: ExpertsReadout(vc, spec, str(path), expert={"width": 4, "hidden": 8}),
                      voxel_counts={PAIR: n}, expert_adapters=True)
    ex = m.readout
    layer = bb.net.get_submodule(bb.lora_modules[0])
    assert layer.n_adapters == len(ex.experts) == 5
    ex.set_voxel_info(PAIR, _coords(n))
    base = {k: v.clone() for k, v in bb.state_dict().items() if "lora_" not in k}
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    batch = {"images": torch.rand(4, 3, 32, 32), "responses": torch.randn(4, n), "pair": PAIR,
             "stimulus": torch.arange(4)}
    m.train()
    for step in range(3):
        opt.zero_grad()
        m.training_step(batch, step).backward()
        opt.step()
    after = bb.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base.items()), "frozen backbone weights changed"
    # every expert trained its own adapter, and they differ
    b_ = layer.lora_B.detach()
    assert all(b_[k].abs().sum() > 0 for k in range(5)) and not torch.allclose(b_[0], b_[1])
    # changing one expert's adapter changes only that expert's voxels of its partition
    m.eval()
    with torch.no_grad():
        before = ex.forward_partitions(m.features(batch), PAIR)
        k = ex._index[ex.expert_name("atlas", 1)]
        for name in bb.lora_modules:
            bb.net.get_submodule(name).lora_B[k] += 0.5
        changed = ex.forward_partitions(m.features(batch), PAIR)
    mine = np.flatnonzero(parts["atlas"][1][PAIR] == 1)
    diff = (changed - before).abs().amax(0)  # (P, V)
    assert diff[0, mine].min() > 0
    others = np.setdiff1d(np.arange(n), mine)
    assert float(diff[0, others].max()) == 0.0 and float(diff[1].max()) == 0.0
    with pytest.raises(ValueError, match="load_images"):
        m.features({**batch, "images": None})


# ----------------------------------------------------------------------------- distillation
def test_gt_weight_schedule():
    assert gt_weight(0, 4) == 0.0
    assert gt_weight(4, 4) == 1.0
    assert gt_weight(9, 4) == 1.0
    ws = [gt_weight(e, 4) for e in range(5)]
    np.testing.assert_allclose(np.diff(ws), 0.25)
    assert gt_weight(0, 0) == 1.0


def _bb(name="test_efficientnet", trainable="frozen"):
    return Backbone(name, image_size=32, trainable=trainable)


def test_distill_looks_up_dark_targets_by_stimulus_row(tmp_path):
    n = 6
    f = tmp_path / "dark.h5"
    stim = np.array([3, 10, 7])
    pred = np.arange(3 * n, dtype=np.float32).reshape(3, n)
    with h5py.File(f, "w") as h:
        h.create_dataset("pairs/sim__subj01/stimulus", data=stim)
        h.create_dataset("pairs/sim__subj01/pred", data=pred)
    m = DistillModule(_bb(), lambda vc, spec: RetinotopicReadout(vc, spec), dark_targets=str(f),
                      voxel_counts={PAIR: n})
    assert m.hparams.dark_targets == str(f) and m.hparams.model_name == "afo-student"
    got = m.dark_for(PAIR, torch.tensor([7, 3, 7, 10]))
    np.testing.assert_array_equal(got.numpy(), pred[[2, 0, 2, 1]])
    with pytest.raises(KeyError, match="stimulus rows \\[4\\]"):
        m.dark_for(PAIR, torch.tensor([3, 4]))


def test_lora_training_leaves_frozen_weights_bit_identical():
    torch.manual_seed(0)
    n = 10
    bb = _bb("test_vit", "lora")
    m = EncoderModule(bb, lambda vc, spec: RetinotopicReadout(vc, spec, width=4), voxel_counts={PAIR: n})
    m.readout.set_voxel_info(PAIR, _coords(n))
    base = {k: v.clone() for k, v in m.backbone.state_dict().items() if "lora_" not in k}
    lora = {k: v.clone() for k, v in m.backbone.state_dict().items() if "lora_" in k}
    assert lora, "LoRA adapters were not applied"
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    m.train()
    for step in range(3):
        batch = {"images": torch.rand(4, 3, 32, 32), "responses": torch.randn(4, n), "pair": PAIR,
                 "stimulus": torch.arange(4)}
        opt.zero_grad()
        m.training_step(batch, step).backward()
        opt.step()
    after = m.backbone.state_dict()
    for k, v in base.items():
        assert torch.equal(after[k], v), f"frozen weight {k} changed"
    assert any(not torch.equal(after[k], v) for k, v in lora.items()), "LoRA adapters did not train"


def test_student_starts_from_a_checkpoint_of_the_whole_brain_model(tmp_path):
    n = 8
    f = tmp_path / "dark.h5"
    with h5py.File(f, "w") as h:
        h.create_dataset("pairs/sim__subj01/stimulus", data=np.arange(3))
        h.create_dataset("pairs/sim__subj01/pred", data=np.zeros((3, n), np.float32))
    whole = EncoderModule(_bb(), lambda vc, spec: RetinotopicReadout(vc, spec, width=4), voxel_counts={PAIR: n})
    with torch.no_grad():
        for p in whole.readout.parameters():
            p.add_(torch.randn_like(p))
    torch.save({"state_dict": whole.state_dict()}, tmp_path / "whole.ckpt")
    student = DistillModule(_bb(), lambda vc, spec: RetinotopicReadout(vc, spec, width=4), dark_targets=str(f),
                            voxel_counts={PAIR: n}, init_from=str(tmp_path / "whole.ckpt"))
    for k, v in whole.readout.state_dict().items():
        assert torch.equal(student.readout.state_dict()[k], v), k
    fresh = DistillModule(_bb(), lambda vc, spec: RetinotopicReadout(vc, spec, width=4), dark_targets=str(f),
                          voxel_counts={PAIR: n})
    assert not torch.equal(fresh.readout.state_dict()[f"weight.{PAIR.replace('/', '__')}"],
                           whole.readout.state_dict()[f"weight.{PAIR.replace('/', '__')}"])
    with pytest.raises(ValueError, match="field 'state_dict'.*mis-shaped"):
        DistillModule(_bb(), lambda vc, spec: RetinotopicReadout(vc, spec, width=6), dark_targets=str(f),
                      voxel_counts={PAIR: n}, init_from=str(tmp_path / "whole.ckpt"))


# ----------------------------------------------------------------------------- FactorTopy-style options
# point fields; Gaussian fields read through a shared nonlinear adapter (copied into the experts'
# shared adapter)
@pytest.mark.parametrize("extra", [{}, {"rf": "gaussian", "adapter": 5}])
def test_warm_started_experts_predict_exactly_the_whole_brain_model(tmp_path, extra):
    n = 30
    path, _ = _partition_file(tmp_path, n)
    kw = {"width": 4, "hidden": 8, "grid": 2, "selector_init": "zero", **extra}
    whole = RetinotopicReadout({PAIR: n}, _spec(), **kw)
    coords = _coords(n)
    whole.set_voxel_info(PAIR, coords)
    # move every parameter away from its initialisation, and give BatchNorm non-trivial statistics
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for prm in whole.parameters():
            prm.add_(0.3 * torch.randn(prm.shape, generator=g))
    whole.train()
    whole(_feats(b=8, seed=3), PAIR)
    whole.eval()
    ckpt = tmp_path / "whole.ckpt"
    torch.save({"state_dict": {f"readout.{k}": v for k, v in whole.state_dict().items()}}, ckpt)
    cold = ExpertsReadout({PAIR: n}, _spec(), str(path), expert=kw).eval()
    warm = ExpertsReadout({PAIR: n}, _spec(), str(path), expert=kw, init_from=str(ckpt)).eval()
    for ex in (cold, warm):
        ex.set_voxel_info(PAIR, coords)
    feats = _feats()
    want = whole(feats, PAIR)
    per = warm.forward_partitions(feats, PAIR)
    for p_i in range(per.shape[1]):  # every partition on its own equals the whole-brain model
        torch.testing.assert_close(per[:, p_i], want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(cold(feats, PAIR), want, atol=1e-3)
    other = RetinotopicReadout({PAIR: n}, _spec(), width=6, hidden=8)
    torch.save({"state_dict": {f"readout.{k}": v for k, v in other.state_dict().items()}}, ckpt)
    with pytest.raises(ValueError, match="whole-brain RetinotopicReadout"):
        ExpertsReadout({PAIR: n}, _spec(), str(path), expert=kw, init_from=str(ckpt))


def test_grid_pools_maps_by_area_before_sampling():
    feats = _feats()
    norms = torch.nn.ModuleList([torch.nn.Identity(), torch.nn.Identity()])
    pooled = normalise_levels(feats, norms, grid=2)
    # 8x8 -> 2x2: each cell is the mean of a 4x4 block; the 4x4 level -> 2x2 likewise
    torch.testing.assert_close(pooled[0][:, :, 1, 0], feats.maps[0][:, :, 4:, :4].mean(dim=(2, 3)))
    torch.testing.assert_close(pooled[1][:, :, 0, 1], feats.maps[1][:, :, :2, 2:].mean(dim=(2, 3)))
    # a map already at or below the grid is left alone
    assert normalise_levels(feats, norms, grid=16)[0] is not None
    torch.testing.assert_close(normalise_levels(feats, norms, grid=16)[1], feats.maps[1])


def test_zero_selector_init_starts_at_the_centre_with_uniform_levels_and_even_mix():
    n = 12
    r = RetinotopicReadout({PAIR: n}, _spec(), selector_init="zero")
    r.set_voxel_info(PAIR, _coords(n))
    pos, levels, mix = r.voxel_params(PAIR)
    assert torch.equal(pos, torch.zeros(n, 2))
    torch.testing.assert_close(levels, torch.full((n, 2), 0.5))
    torch.testing.assert_close(mix, torch.full((n,), 0.5))
    default = RetinotopicReadout({PAIR: n}, _spec())
    default.set_voxel_info(PAIR, _coords(n))
    assert not torch.allclose(default.voxel_params(PAIR)[1], torch.full((n, 2), 0.5), atol=1e-4)


def test_selector_prior_equals_a_direct_computation_and_fades_linearly():
    n, steps = 15, 4
    r = RetinotopicReadout({PAIR: n}, _spec(), selector_prior=0.2, selector_prior_steps=steps)
    r.set_voxel_info(PAIR, _coords(n))
    g = torch.Generator().manual_seed(0)  # not the global RNG: the outcome must not depend on test order
    with torch.no_grad():  # non-uniform selectors, so the prior is not at its minimum
        for prm in [*r.layer_mlp.parameters(), *r.mix_mlp.parameters()]:
            prm.add_(0.3 * torch.randn(prm.shape, generator=g))
    r.train()
    feats = _feats()
    got = []
    for step in range(steps + 1):
        r(feats, PAIR)
        _, levels, mix = (t.detach() for t in r.voxel_params(PAIR))
        p = levels.numpy().astype(np.float64)
        assert p.min() > 1e-6
        direct = (p * np.log(p)).sum(1).mean() / np.log(2) + ((mix.numpy() - 0.5) ** 2).mean()
        got.append(float(r.regularization().detach()))
        assert got[-1] == pytest.approx(0.2 * max(0.0, 1 - step / steps) * direct, rel=1e-5, abs=1e-7)
    assert got[-1] == 0.0 and int(r.prior_step) == steps + 1
    # the step counter is in the state dict, so a resumed fit continues the fade
    assert "prior_step" in r.state_dict()


def test_shared_readout_uses_one_vector_for_local_and_global_terms():
    n = 10
    r = RetinotopicReadout({PAIR: n}, _spec(), width=4, hidden=8, shared_readout=True).eval()
    r.set_voxel_info(PAIR, _coords(n))
    assert r.weight[PAIR.replace("/", "__")].shape == (n, 4)
    feats = _feats()
    pos, levels, mix, w, b, _ = r.point_params(PAIR)
    maps = normalise_levels(feats, r.norm)
    local = torch.zeros(3, 4, n)
    glob = torch.zeros(3, 4, n)
    for l, (m, conv) in enumerate(zip(maps, r.bottleneck)):
        proj = conv(m)
        local += sample_at(proj, pos) * levels[:, l]
        glob += proj.mean(dim=(2, 3))[:, :, None] * levels[:, l]
    want = ((mix * local + (1 - mix) * glob) * w.t()).sum(1) + b
    torch.testing.assert_close(r(feats, PAIR), want, atol=1e-5, rtol=1e-5)


def test_several_grid_sizes_let_the_level_weights_choose_a_scale():
    n = 9
    multi = RetinotopicReadout({PAIR: n}, _spec(), width=4, hidden=8, grid=[4, 2], selector_init="zero").eval()
    single = RetinotopicReadout({PAIR: n}, _spec(), width=4, hidden=8, grid=2, selector_init="zero").eval()
    assert multi.n_levels == 4 and single.n_levels == 2
    maps = normalise_levels(_feats(), torch.nn.ModuleList([torch.nn.Identity()] * 2), grid=[4, 2])
    assert [tuple(m.shape[-2:]) for m in maps] == [(4, 4), (4, 4), (2, 2), (2, 2)]  # size-major
    slot = PAIR.replace("/", "__")
    with torch.no_grad():
        # everything else equal; all level weight on level 0 at 2 x 2 (map 2 of the multi readout)
        single.load_state_dict({k: v for k, v in multi.state_dict().items() if "layer_mlp" not in k}, strict=False)
        multi.layer_mlp[slot][-1].bias.copy_(torch.tensor([-30.0, -30.0, 30.0, -30.0]))
        single.layer_mlp[slot][-1].bias.copy_(torch.tensor([30.0, -30.0]))
        multi.weight[slot].normal_()
        single.weight[slot].copy_(multi.weight[slot])
    coords = _coords(n)
    multi.set_voxel_info(PAIR, coords)
    single.set_voxel_info(PAIR, coords)
    feats = _feats()
    torch.testing.assert_close(multi(feats, PAIR), single(feats, PAIR), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="grid must be"):
        RetinotopicReadout({PAIR: n}, _spec(), grid=[8, 0])

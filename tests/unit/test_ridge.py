"""The ridge baseline's regressors and solve: grid pooling, per-level PCA / random projection,
banded ridge, and the pooled (k = 1) baseline kept exactly as it was."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from brainenc.lit.ridge_module import RidgeModule
from brainenc.models.backbones import Backbone, Features
from brainenc.models.linear import LinearReadout
from brainenc.models.readout import FeatureSpec, pair_slot
from brainenc.models.ridge import RidgeReadout, grid_pool, level_grids

PAIR = "sim/subj01"


def _features(cls: bool = False, seed: int = 0) -> Features:
    g = torch.Generator().manual_seed(seed)
    maps = [torch.randn(5, c, h, h, generator=g) for c, h in [(3, 12), (4, 7), (6, 3)]]
    return Features(maps, [torch.randn(5, m.shape[1], generator=g) for m in maps] if cls else None)


def _spec(f: Features) -> FeatureSpec:
    shapes = tuple(tuple(m.shape[1:]) for m in f.maps)
    return FeatureSpec(shapes, sum(s[0] for s in shapes) * (2 if f.cls else 1), f.cls is not None)


def test_grid_pool_equals_adaptive_avg_pool2d_of_the_maps():
    f = _features()
    grids = level_grids(_spec(f), 4)
    assert grids == [4, 4, 3]  # the 3x3 level keeps its own grid
    got = grid_pool(f, grids)
    for z, m, k in zip(got, f.maps, grids):
        torch.testing.assert_close(z, F.adaptive_avg_pool2d(m, k).reshape(len(m), -1))
    # the layout is channel-major: level 0, channel 1, cell (0, 0) of 4x4 on a 12x12 map = mean of 3x3 pixels
    torch.testing.assert_close(got[0][:, 1 * 16 + 0], f.maps[0][:, 1, :3, :3].mean(dim=(1, 2)))
    # per-level k, and k = 1 is Features.pooled() bit for bit (class tokens after each level's mean)
    assert [z.shape[1] for z in grid_pool(f, level_grids(_spec(f), [2, 1, 3]))] == [12, 4, 54]
    fc = _features(cls=True)
    assert torch.equal(torch.cat(grid_pool(fc, [1, 1, 1]), dim=1), fc.pooled())
    with pytest.raises(ValueError, match="one k per backbone level"):
        level_grids(_spec(f), [2, 2])


def _batches(backbone: Backbone, n: int, n_voxels: int, seed: int = 0, batch: int = 50):
    """Random images with responses linear in the backbone's pooled features plus noise."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, 32, 32, generator=g)
    z = backbone(images).pooled()
    w = torch.randn(z.shape[1], n_voxels, generator=g)
    y = (z - z.mean(0)) / z.std(0) @ w / z.shape[1] ** 0.5 + 0.5 * torch.randn(n, n_voxels, generator=g)
    return [{"pair": PAIR, "images": images[i:i + batch], "responses": y[i:i + batch]} for i in range(0, n, batch)]


def test_grid_1_reproduces_the_pooled_ridge_exactly():
    """The default (grid=1, no reduction, not banded) gives the same weights and predictions as the
    pooled ridge before spatial options existed (its solve replayed here on LinearReadout)."""
    from himalaya.ridge import RidgeCV

    torch.manual_seed(0)
    backbone = Backbone("test_efficientnet", image_size=32)
    module = RidgeModule(backbone, voxel_counts={PAIR: 7})
    batches = _batches(backbone, 200, 7)
    for b in batches:
        module.training_step(b, 0)
    module._solve()

    # the previous implementation, step by step
    x = torch.cat([backbone(b["images"]).pooled().double() for b in batches])
    y = torch.cat([b["responses"].double() for b in batches]).numpy()
    mean, var = x.mean(0), x.var(0, unbiased=False)
    old = LinearReadout({PAIR: 7}, FeatureSpec.of(backbone)).eval()
    old.norm.running_mean.copy_(mean.float())
    old.norm.running_var.copy_(var.float())
    ridge = RidgeCV(alphas=np.asarray(module.alphas), cv=5, fit_intercept=True)
    ridge.fit(((x - mean) / (var + old.norm.eps).sqrt()).numpy(), y)
    old.weight[pair_slot(PAIR)].data.copy_(torch.as_tensor(np.asarray(ridge.coef_), dtype=torch.float32).t())
    old.bias[pair_slot(PAIR)].data.copy_(torch.as_tensor(np.asarray(ridge.intercept_), dtype=torch.float32))

    module.eval()
    assert torch.equal(module.readout.norm.running_mean, old.norm.running_mean)
    assert torch.equal(module.readout.weight[pair_slot(PAIR)], old.weight[pair_slot(PAIR)])
    test = backbone(torch.rand(9, 3, 32, 32))
    assert torch.equal(module.readout(test, PAIR), old(test, PAIR))


def test_pca_is_fitted_on_training_images_only(tiny_brain, tmp_path):
    """Validation and test images get features 1e4 times larger than training images: had they
    reached the PCA (or the standardisation), its centre and components would be theirs."""
    from sklearn.decomposition import PCA

    from brainenc.data.datamodule import BrainDataModule

    dm = BrainDataModule(stores=[str(tiny_brain["simbrain7t"])], image_size=32, batch_size=16, eval_batch_size=64)
    dm.setup("fit")
    torch.manual_seed(0)
    module = RidgeModule(Backbone("test_efficientnet", image_size=32), voxel_counts=dm.voxel_counts,
                         grid=2, reduce="pca", n_components=6)
    seen: list[Features] = []
    plain = module.features

    def features(batch):
        f = plain(batch)
        if module.trainer.training:
            seen.append(f)
            return f
        return f._apply(lambda t: 1e4 * (t + 1))  # extreme outside training

    module.features = features
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.fit(module, dm)
    trainer.test(module, dm)

    readout: RidgeReadout = module.readout
    assert readout.reduced == [True, True, True, True]  # widths 96, 128, 192, 64 -> 6 each
    train = Features.cat(seen)
    blocks = grid_pool(train, readout.grids)
    for level, z in enumerate(blocks):
        ref = PCA(n_components=6, svd_solver="randomized", random_state=0).fit(z.numpy())
        center, proj = getattr(readout, f"center_{level}"), getattr(readout, f"proj_{level}")
        np.testing.assert_allclose(center.numpy(), ref.mean_, rtol=1e-5, atol=1e-6)
        # components are defined up to sign
        np.testing.assert_allclose(np.abs(proj.numpy()), np.abs(ref.components_.T), atol=1e-4)
    reduced = torch.cat(readout.bands(train), dim=1)
    torch.testing.assert_close(readout.norm.running_mean, reduced.mean(0), rtol=1e-4, atol=1e-4)


def test_random_projection_is_seeded_and_applied_before_the_solve():
    spec = FeatureSpec(((24, 8, 8), (32, 4, 4)), 56)
    a = RidgeReadout({PAIR: 3}, spec, grid=4, reduce="random", n_components=50, seed=1)
    b = RidgeReadout({PAIR: 3}, spec, grid=4, reduce="random", n_components=50, seed=1)
    c = RidgeReadout({PAIR: 3}, spec, grid=4, reduce="random", n_components=50, seed=2)
    assert a.band_dims == [50, 50] and a.level_dims == [384, 512]
    assert torch.equal(a.proj_0, b.proj_0) and not torch.equal(a.proj_0, c.proj_0)
    f = Features([torch.randn(4, 24, 8, 8), torch.randn(4, 32, 4, 4)])
    # training rows are collected already projected (never the 896-wide pooled rows)
    assert [z.shape[1] for z in a.bands(f, reduce_pca=False)] == [50, 50]
    torch.testing.assert_close(a.bands(f)[0], grid_pool(f, [4, 4])[0] @ a.proj_0)
    with pytest.raises(ValueError, match="reduce: expected one of"):
        RidgeReadout({PAIR: 3}, spec, reduce="svd")


def test_banded_ridge_gives_the_noise_band_a_much_larger_alpha():
    """Level 0 carries the signal, levels 1-3 are pure noise: himalaya's banded ridge (through the
    module's solve) must regularise the noise bands far more than the signal band."""
    torch.manual_seed(0)
    module = RidgeModule(Backbone("test_efficientnet", image_size=32), voxel_counts={PAIR: 20}, banded=True,
                         banded_iter=30, alphas=np.logspace(-2, 5, 15).tolist())
    dims = module.readout.band_dims
    assert dims == [24, 32, 48, 64]
    rng = np.random.default_rng(0)
    n = 400
    x = rng.standard_normal((n, sum(dims))).astype(np.float32)
    w = rng.standard_normal((dims[0], 20))
    y = x[:, :dims[0]] @ w / np.sqrt(dims[0]) + 0.3 * rng.standard_normal((n, 20))
    for i in range(0, n, 100):
        module.collect(PAIR, torch.from_numpy(x[i:i + 100]), torch.from_numpy(y[i:i + 100]).float())
    module._solve()
    band_alpha = module.fit_info[PAIR]["band_alpha"]  # (4, 20)
    assert band_alpha.shape == (4, 20)
    signal, noise = np.median(band_alpha[0]), np.median(band_alpha[1:], axis=1)
    assert (noise > 100 * signal).all(), (signal, noise)
    # and the fit is good on new rows
    xt = rng.standard_normal((200, sum(dims))).astype(np.float32)
    yt = xt[:, :dims[0]] @ w / np.sqrt(dims[0])
    module.eval()
    bn = module.readout.norm
    z = (torch.from_numpy(xt) - bn.running_mean) / (bn.running_var + bn.eps).sqrt()
    pred = (z @ module.readout.weight[pair_slot(PAIR)].detach().t() + module.readout.bias[pair_slot(PAIR)]).detach().numpy()
    r = [np.corrcoef(pred[:, v], yt[:, v])[0, 1] for v in range(20)]
    assert np.median(r) > 0.9


@pytest.mark.parametrize("banded", [False, True])
def test_dual_solve_of_wide_problems_equals_the_primal_ridge(banded):
    """More regressors than rows switches to himalaya's kernel solvers; the primal coefficients
    they give back must be those of the primal solvers (same folds, alphas and search seed)."""
    from himalaya.ridge import BandedRidgeCV, RidgeCV

    torch.manual_seed(0)
    module = RidgeModule(Backbone("test_efficientnet", image_size=32), voxel_counts={PAIR: 3}, banded=banded,
                         banded_iter=5, alphas=np.logspace(-1, 4, 6).tolist())
    rng = np.random.default_rng(1)
    x = rng.standard_normal((60, 168))  # 168 = 24 + 32 + 48 + 64 regressors > 60 rows
    y = x[:, :24] @ rng.standard_normal((24, 3)) + rng.standard_normal((60, 3))
    groups = np.repeat(np.arange(4), module.readout.band_dims)
    coef, intercept, _ = module._fit(x, y, groups, np.float64, {})
    if banded:
        ref = BandedRidgeCV(groups=groups, cv=5, fit_intercept=True, random_state=0,
                            solver_params=dict(alphas=np.logspace(-1, 4, 6), n_iter=5, progress_bar=False)).fit(x, y)
    else:
        ref = RidgeCV(alphas=np.logspace(-1, 4, 6), cv=5, fit_intercept=True).fit(x, y)
    np.testing.assert_allclose(coef, ref.coef_, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(intercept, ref.intercept_, rtol=1e-6, atol=1e-8)

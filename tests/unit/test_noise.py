"""Shared-noise factors and the whitened loss (brainenc.data.noise, EncoderModule(noise_whitening))."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from brainenc.data.noise import estimate_noise_factors, noise_residuals, whiten, whiten_torch


def _noise(rng, n, v, k=0, shared=0.0):
    """(n, v) noise with per-voxel sds in [0.5, 2]; ``shared`` of each voxel's variance from k factors."""
    sd = rng.uniform(0.5, 2.0, v)
    z = rng.standard_normal((n, v)) * np.sqrt(1 - shared)
    basis = None
    if k:
        load = rng.standard_normal((v, k))
        load /= np.linalg.norm(load, axis=1, keepdims=True)
        z += rng.standard_normal((n, k)) @ load.T * np.sqrt(shared)
        basis = np.linalg.qr(load)[0]
    return z * sd, sd, basis


def test_independent_heteroscedastic_noise_gives_no_factors():
    rng = np.random.default_rng(0)
    res, sd, _ = _noise(rng, 300, 800)
    f = estimate_noise_factors(res)
    assert f.k == 0
    assert f.shared_fraction() == 0.0
    np.testing.assert_allclose(f.sd, sd, rtol=0.15)


def test_planted_factors_are_found_with_their_share_of_the_variance():
    rng = np.random.default_rng(1)
    res, _, basis = _noise(rng, 400, 1000, k=3, shared=0.4)
    f = estimate_noise_factors(res)
    assert f.k == 3
    # the found directions span the planted ones: all principal angles small
    cos = np.linalg.svd(basis.T @ f.vectors, compute_uv=False)
    assert cos.min() > 0.95, cos
    assert abs(f.shared_fraction() - 0.4) < 0.05, f.shared_fraction()
    assert (f.shrink() > 0.5).all() and (f.shrink() < 1).all()


def test_residuals_of_repeats_have_the_noise_variance_and_drop_singletons():
    rng = np.random.default_rng(2)
    signal = rng.standard_normal((500, 50)) * 3
    trials = np.concatenate([signal, signal]) + rng.standard_normal((1000, 50))  # every image twice, noise sd 1
    groups = [np.array([i, i + 500]) for i in range(500)] + [np.array([7])]
    res = noise_residuals(trials, groups)
    assert res.shape == (500, 50)  # one residual per image of two trials; the singleton adds none
    assert abs(res.var() - 1.0) < 0.05  # the image signal is gone, the noise variance kept


def test_whitening_shrinks_shared_directions_and_keeps_the_rest():
    rng = np.random.default_rng(3)
    res, _, _ = _noise(rng, 400, 600, k=2, shared=0.5)
    f = estimate_noise_factors(res)
    vectors, shrink, sd = whiten_torch(f)
    z_dir = torch.from_numpy(f.vectors[:, 0])
    # along a factor (in standardised units) the residual is scaled by sqrt(s2 / lambda) ...
    along = whiten((z_dir * sd)[None], vectors, shrink, sd)[0] / sd
    np.testing.assert_allclose(float(along @ z_dir), np.sqrt(f.s2 / f.variances[0]), rtol=1e-4)
    # ... and a direction orthogonal to every factor is left alone
    other = torch.randn(600)
    other = other - vectors @ (vectors.t() @ other)
    out = whiten((other * sd)[None], vectors, shrink, sd)[0]
    torch.testing.assert_close(out, other * sd, atol=1e-4, rtol=1e-4)
    # a subset of voxels (the universal encoder's voxels per step) whitens by least squares on its rows
    r = torch.from_numpy(res[:5].astype(np.float32))
    full = whiten(r, vectors, shrink, sd)
    all_rows = torch.arange(600)
    torch.testing.assert_close(whiten(r[:, all_rows], vectors[all_rows], shrink, sd[all_rows]), full)
    sub = torch.randperm(600)[:400]
    part = whiten(r[:, sub], vectors[sub], shrink, sd[sub])
    assert part.shape == (5, 400) and torch.isfinite(part).all()
    # it removes the shared factors' share from the subset too: its residual variance drops
    assert part.var() < r[:, sub].var()


def test_no_factors_means_the_loss_is_unchanged():
    f = estimate_noise_factors(np.random.default_rng(4).standard_normal((100, 300)))
    vectors, shrink, sd = whiten_torch(f)
    r = torch.randn(4, 300)
    assert whiten(r, vectors, shrink, sd) is r


@pytest.mark.parametrize("n", [0, 1])
def test_too_few_residuals_give_no_factors(n):
    f = estimate_noise_factors(np.ones((n, 20)))
    assert f.k == 0 and f.n_residuals == n


@pytest.fixture(scope="module")
def noisy_brain(tmp_path_factory):
    """A small simbrain whose noise is half shared across voxels, every training image shown twice."""
    from brainenc.data.simbrain import simulate
    from brainenc.data.simbrain.presets import Assumptions, DatasetSpec, Preset

    spec = DatasetSpec("simbrain7t", 7.0, (300,), 120, 0, 2, 0.0, 3, ncsnr_median=1.0, ncsnr_log_sd=0.45,
                       trials_per_session=60)
    preset = Preset("noisy-test", image_size=32, n_test=30, datasets=(spec,),
                    assumptions=Assumptions(shared_noise=0.5))
    return simulate(preset, tmp_path_factory.mktemp("noisy"), seed=0)["simbrain7t"]


def _module(store, **kw):
    import lightning as L

    from brainenc.data.datamodule import BrainDataModule
    from brainenc.lit.encoder_module import EncoderModule
    from brainenc.models.backbones import Backbone
    from brainenc.models.linear import LinearReadout

    L.seed_everything(0, verbose=False)
    dm = BrainDataModule(stores=[str(store)], subjects=["subj01"], image_size=32, batch_size=16, eval_batch_size=64)
    model = EncoderModule(Backbone("test_efficientnet", image_size=32), LinearReadout, voxel_counts=dm.voxel_counts,
                          **kw)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    return model, dm, trainer


def test_encoder_finds_shared_noise_and_trains_on_the_whitened_loss(noisy_brain, tiny_brain):
    model, dm, trainer = _module(noisy_brain, noise_whitening=True, voxels_per_step=200)
    trainer.fit(model, dm)
    key = "simbrain7t/subj01"
    vectors, shrink, sd = model.noise_factors[key]
    assert vectors.shape[0] == 300 and 1 <= vectors.shape[1] <= 8  # simbrain draws 4 shared factors
    assert (shrink > 0.5).all()
    assert np.isfinite(trainer.callback_metrics["val/pearson_median"].item())
    # the whitened comparison differs from the plain one exactly where the noise is shared
    pred, target = torch.zeros(4, 300), torch.randn(4, 300)
    wp, wt = model.whitened(key, pred, target)
    assert not torch.allclose(wt, target)
    along = vectors[:, 0] * sd  # a residual along the strongest shared direction ...
    _, out = model.whitened(key, torch.zeros(1, 300), along[None])
    assert float(((out[0] / sd) @ vectors[:, 0])) < 0.5 * float(((along / sd) @ vectors[:, 0]))  # ... shrinks
    # a missing response stays without influence
    target[0, 5] = float("nan")
    wp, wt = model.whitened(key, pred, target)
    assert torch.isfinite(wt).all()
    # independent noise (the tiny brain): no factors, the loss is the plain one
    plain, dm2, _ = _module(tiny_brain["simbrain7t"], noise_whitening=True)
    dm2.setup("fit")
    plain.estimate_noise(dm2.pairs)
    assert plain.noise_factors[key][0].shape[1] == 0
    p, t = torch.randn(2, plain.voxel_counts[key]), torch.randn(2, plain.voxel_counts[key])
    assert plain.whitened(key, p, t)[1] is t


def test_whitening_acts_on_the_last_axis_of_any_batch_shape():
    """The AFO experts whiten (B, partitions, V) predictions against targets expanded alike."""
    rng = np.random.default_rng(5)
    res, _, _ = _noise(rng, 300, 200, k=2, shared=0.5)
    vectors, shrink, sd = whiten_torch(estimate_noise_factors(res))
    assert vectors.shape[1] >= 1
    r = torch.randn(4, 3, 200)
    out = whiten(r, vectors, shrink, sd)
    for p in range(3):
        torch.testing.assert_close(out[:, p], whiten(r[:, p], vectors, shrink, sd))

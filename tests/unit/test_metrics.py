"""Tests of brainenc.metrics against scipy / brute-force references."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import pearsonr

from brainenc.metrics import (
    VoxelPearson,
    ceiling_r,
    estimate_ncsnr,
    identification_accuracy,
    noise_ceiling,
    normalised_score,
    pattern_correlations,
    pearson_np,
    pearson_torch,
    roi_summary,
)

# --------------------------------------------------------------------------- helpers


def correlated(rng, n_images, n_voxels, offset=0.0, scale=1.0):
    """pred/target pairs whose true r varies across voxels from ~0 to ~0.95."""
    x = rng.normal(size=(n_images, n_voxels))
    weight = np.linspace(0.0, 3.0, n_voxels)
    y = weight * x + rng.normal(size=(n_images, n_voxels))
    return offset + scale * x, offset + scale * y


def scipy_pairwise(x, y):
    """scipy r per column on the pairs where both values are finite; NaN if undefined."""
    out = np.full(x.shape[1], np.nan)
    for v in range(x.shape[1]):
        ok = np.isfinite(x[:, v]) & np.isfinite(y[:, v])
        xs, ys = x[ok, v], y[ok, v]
        if ok.sum() >= 2 and np.ptp(xs) > 0 and np.ptp(ys) > 0:
            out[v] = pearsonr(xs, ys)[0]
    return out


def feed(metric, x, y, sizes, mask=None, dtype=torch.float64):
    start = 0
    for s in sizes:
        sl = slice(start, start + s)
        m = None if mask is None else torch.as_tensor(mask[sl])
        metric.update(torch.as_tensor(x[sl], dtype=dtype), torch.as_tensor(y[sl], dtype=dtype), mask=m)
        start += s
    assert start == len(x), "batch sizes must cover all rows"
    return metric.compute()


UNEVEN = [1, 13, 30, 2, 51]  # sums to 97


# --------------------------------------------------------------------------- VoxelPearson


@pytest.fixture
def messy():
    """97 images x 40 voxels with constant, NaN-holed and nearly-empty voxels."""
    rng = np.random.default_rng(0)
    x, y = correlated(rng, 97, 40)
    x[:, 0] = 0.1  # constant prediction (0.1 is inexact in binary: rounding must not hide it)
    y[:, 1] = 1000.1  # constant target
    x[:, 2] = 1 / 3
    y[:, 2] = 1 / 3
    for v in range(5, 15):  # scattered NaNs in either array: r from the remaining pairs
        holes = rng.choice(97, size=rng.integers(1, 30), replace=False)
        (x if v % 2 else y)[holes, v] = np.nan
    y[1:, 15] = np.nan  # only one valid pair -> NaN
    x[:, 16] = np.nan  # no valid pair -> NaN
    x[:50, 17] = np.nan  # the valid pairs all lie in the last batches
    y[3, 18] = np.inf  # +-inf is dropped like NaN
    x[4, 18] = -np.inf
    y[:, 19] = 5.0  # constant on the valid pairs only once NaNs are removed:
    y[::2, 19] = np.nan
    x[1::2, 19] = np.nan  # ... here no pair is valid at all
    y[:60, 20] = 2.0  # constant on its valid pairs
    y[60:, 20] = np.nan
    return x, y


def test_voxel_pearson_matches_scipy_on_messy_data_in_uneven_batches(messy):
    x, y = messy
    expected = scipy_pairwise(x, y)
    got = feed(VoxelPearson(40), x, y, UNEVEN)
    assert got.dtype == torch.float64 and got.shape == (40,)
    np.testing.assert_array_equal(np.isnan(got.numpy()), np.isnan(expected))
    for v in (0, 1, 2, 15, 16, 19, 20):
        assert np.isnan(got[v]), v
    # The NaN-holed voxels really are computed (not just NaN'd away).
    assert np.isfinite(got[5:15].numpy()).all() and np.isfinite(got[17:19].numpy()).all()
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-12, equal_nan=True)


def test_batching_does_not_matter(messy):
    x, y = messy
    one = feed(VoxelPearson(40), x, y, [97])
    many = feed(VoxelPearson(40), x, y, [1] * 97)
    np.testing.assert_allclose(one.numpy(), many.numpy(), rtol=0, atol=1e-12, equal_nan=True)


def test_pearson_torch_same_rules_as_metric(messy):
    x, y = messy
    got = pearson_torch(torch.as_tensor(x), torch.as_tensor(y))
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), scipy_pairwise(x, y), rtol=0, atol=1e-12, equal_nan=True)


def test_mask_drops_rows_for_every_voxel():
    rng = np.random.default_rng(1)
    x, y = correlated(rng, 60, 12)
    # Rows to drop are wild outliers, so keeping them by mistake would change r a lot.
    drop = np.zeros(60, dtype=bool)
    drop[[0, 7, 33, 59]] = True
    x[drop] = 50.0
    y[drop] = -50.0
    got = feed(VoxelPearson(12), x, y, [25, 35], mask=~drop)
    expected = scipy_pairwise(x[~drop], y[~drop])
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-12)
    unmasked = feed(VoxelPearson(12), x, y, [25, 35])
    assert np.abs(unmasked.numpy() - expected).max() > 0.1
    masked_torch = pearson_torch(torch.as_tensor(x), torch.as_tensor(y), mask=torch.as_tensor(~drop))
    np.testing.assert_allclose(masked_torch.numpy(), expected, atol=1e-12)


def test_float16_inputs_accumulate_in_float64():
    rng = np.random.default_rng(2)
    x, y = correlated(rng, 500, 16)
    x16 = torch.as_tensor(x, dtype=torch.float16)
    y16 = torch.as_tensor(y, dtype=torch.float16)
    m = VoxelPearson(16)
    for sl in (slice(0, 123), slice(123, 500)):
        m.update(x16[sl], y16[sl])
    got = m.compute()
    assert got.dtype == torch.float64
    # Reference: scipy on exactly the float16 values the metric saw.
    expected = scipy_pairwise(x16.double().numpy(), y16.double().numpy())
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    ("offset", "dtype", "atol"),
    [
        (1000.0, torch.float64, 1e-9),  # the brief's case: error ~1e-16 * (mean/sd)^2 per term
        (1000.0, torch.float32, 1e-9),  # compared with scipy on the float32-rounded values
        (-2.5e4, torch.float64, 1e-6),  # (mean/sd)^2 = 6e8: still far under 1e-6
    ],
)
def test_large_offset_is_accurate(offset, dtype, atol):
    rng = np.random.default_rng(3)
    x, y = correlated(rng, 2000, 8, offset=offset)
    m = VoxelPearson(8)
    for chunk in np.array_split(np.arange(2000), 17):
        m.update(torch.as_tensor(x[chunk], dtype=dtype), torch.as_tensor(y[chunk], dtype=dtype))
    got = m.compute().numpy()
    seen_x = torch.as_tensor(x, dtype=dtype).double().numpy()
    seen_y = torch.as_tensor(y, dtype=dtype).double().numpy()
    expected = scipy_pairwise(seen_x, seen_y)
    assert np.isfinite(expected).all()
    np.testing.assert_allclose(got, expected, rtol=0, atol=atol)


@pytest.mark.parametrize("value", [0.1, 1 / 3, 1000.1, -7.3e5])
def test_constant_voxel_is_nan_despite_rounding(value):
    """A constant that is inexact in binary, accumulated over many batches, must give NaN.

    sum_xx - sum_x**2/n rounds to a tiny nonzero number here; the exact min == max check
    catches it.
    """
    rng = np.random.default_rng(4)
    x = np.full((300, 2), value)
    x[:, 1] += rng.normal(size=300)  # voxel 1 is a control that must stay finite
    y = rng.normal(size=(300, 2))
    got = feed(VoxelPearson(2), x, y, [7] * 40 + [20])
    assert np.isnan(got[0])
    assert np.isfinite(got[1])
    got_t = feed(VoxelPearson(2), y, x, [7] * 40 + [20])  # constant target instead
    assert np.isnan(got_t[0])


def test_merge_state_equals_single_pass(messy):
    """Summing states (what DDP does) equals one metric that saw everything."""
    x, y = messy
    a, b = VoxelPearson(40), VoxelPearson(40)
    a.update(torch.as_tensor(x[:40]), torch.as_tensor(y[:40]))
    b.update(torch.as_tensor(x[40:]), torch.as_tensor(y[40:]))
    a.merge_state(b)
    np.testing.assert_allclose(a.compute().numpy(), scipy_pairwise(x, y), atol=1e-12, equal_nan=True)


def test_forward_returns_batch_value_and_accumulates():
    rng = np.random.default_rng(5)
    x, y = (torch.as_tensor(a) for a in correlated(rng, 80, 6))
    m = VoxelPearson(6)
    batch_val = m(x[:30], y[:30])
    np.testing.assert_allclose(batch_val.numpy(), pearson_np(x[:30].numpy(), y[:30].numpy()), atol=1e-12)
    m(x[30:], y[30:])
    np.testing.assert_allclose(m.compute().numpy(), pearson_np(x.numpy(), y.numpy()), atol=1e-12)
    m.reset()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert torch.isnan(m.compute()).all()  # no data after reset


def test_voxel_pearson_rejects_bad_shapes():
    m = VoxelPearson(5)
    with pytest.raises(ValueError, match="n_voxels=5"):
        m.update(torch.zeros(3, 4), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="same shape"):
        m.update(torch.zeros(3, 5), torch.zeros(4, 5))
    with pytest.raises(ValueError, match="mask"):
        m.update(torch.zeros(3, 5), torch.zeros(3, 5), mask=torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        m.update(torch.zeros(3, 5), torch.zeros(3, 5), mask=torch.ones(3))
    with pytest.raises(ValueError, match="n_voxels"):
        VoxelPearson(0)


# --------------------------------------------------------------------------- pearson_np


def test_pearson_np_matches_scipy_and_is_strict_about_nan():
    rng = np.random.default_rng(6)
    x, y = correlated(rng, 50, 10, offset=300.0)
    x[:, 0] = 2.0
    y[5, 1] = np.nan  # strict reference: any NaN in a column -> NaN
    expected = [np.nan, np.nan] + [pearsonr(x[:, v], y[:, v])[0] for v in range(2, 10)]
    got = pearson_np(x, y)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12, equal_nan=True)
    np.testing.assert_allclose(pearson_np(x.T, y.T, axis=1), got, atol=0, equal_nan=True)
    assert np.isnan(pearson_np(x[:1], y[:1])).all()


# --------------------------------------------------------------------------- noise ceiling


def test_noise_ceiling_known_values():
    # ncsnr = 1, n = 3: signal var 1, noise var of the 3-trial mean 1/3 -> 1 / (1 + 1/3) = 75 %.
    assert noise_ceiling(1.0, 3) == pytest.approx(75.0)
    # ncsnr = 0.5, n = 1: 0.25 / (0.25 + 1) = 20 %.
    assert noise_ceiling(0.5, 1) == pytest.approx(20.0)
    got = noise_ceiling([0.0, np.nan, np.inf, 2.0], np.array([3, 3, 3, 4]))
    np.testing.assert_allclose(got, [0.0, np.nan, 100.0, 100 * 4 / (4 + 0.25)], equal_nan=True)
    # More repeats averaged -> higher ceiling, never above 100.
    per_n = noise_ceiling(0.3, np.arange(1, 20))
    assert np.all(np.diff(per_n) > 0) and per_n.max() < 100
    with pytest.raises(ValueError, match="ncsnr"):
        noise_ceiling(-0.1, 3)
    with pytest.raises(ValueError, match="n_repeats"):
        noise_ceiling(1.0, 0)


def test_ceiling_is_what_a_perfect_model_reaches():
    """Simulate: correlating the true signal with the n-trial mean gives r**2 ~ NC/100."""
    rng = np.random.default_rng(7)
    ncsnr, n, n_images = 0.6, 3, 200_000
    signal = ncsnr * rng.normal(size=n_images)  # noise sd is 1 per trial
    measured = signal + rng.normal(size=(n, n_images)).mean(axis=0)
    r = pearsonr(signal, measured)[0]
    nc = noise_ceiling(ncsnr, n)
    assert r == pytest.approx(ceiling_r(nc), abs=0.005)
    assert normalised_score(r, nc) == pytest.approx(100.0, abs=1.5)


def test_ceiling_r_and_normalised_score():
    assert ceiling_r(75.0) == pytest.approx(np.sqrt(0.75))
    assert np.isnan(ceiling_r(-1.0)) and np.isnan(ceiling_r(np.nan))
    # r = 0.5 against NC = 50 %: r^2 = 0.25 of variance, half of the 0.5 explainable -> 50 %.
    got = normalised_score([0.5, -0.5, 0.5, 0.5, np.nan, 0.9], [50.0, 50.0, 0.0, np.nan, 50.0, 40.0])
    np.testing.assert_allclose(got, [50.0, 50.0, np.nan, np.nan, np.nan, 100 * 0.81 / 0.4], equal_nan=True)
    assert got[-1] > 100  # noise may push a voxel over the ceiling; it is not clipped


def brute_force_ncsnr(y, stim):
    """Loop version of the NSD recipe (with z-scoring), for checking the vectorised one."""
    y = (y - y.mean(0)) / y.std(0, ddof=1)
    variances = [y[stim == s].var(0, ddof=1) for s in np.unique(stim) if (stim == s).sum() >= 2]
    noise = np.mean(variances, axis=0)
    return np.sqrt(np.maximum(y.var(0, ddof=1) - noise, 0)) / np.sqrt(noise)


def simulate_repeats(rng, true_ncsnr, repeats_per_stim, offset=0.0, scale=1.0):
    n_stim = len(repeats_per_stim)
    signal = rng.normal(size=(n_stim, len(true_ncsnr))) * true_ncsnr
    stim = np.repeat(np.arange(n_stim), repeats_per_stim)
    order = rng.permutation(len(stim))  # trials are not grouped by stimulus in real data
    stim = stim[order] * 7 + 100  # ids need not be contiguous
    trials = signal[(stim - 100) // 7] + rng.normal(size=(len(stim), len(true_ncsnr)))
    return offset + scale * trials, stim


def test_estimate_ncsnr_recovers_known_value():
    rng = np.random.default_rng(8)
    true = np.array([0.0, 0.25, 0.5, 1.0, 2.0])
    y, stim = simulate_repeats(rng, true, np.full(3000, 3), offset=40.0, scale=3.0)
    got = estimate_ncsnr(y, stim)
    assert got.shape == (5,) and got.dtype == np.float64
    # With 3000 stimuli x 3 the sampling sd of each estimate is ~0.01-0.04 (largest at ncsnr 2).
    np.testing.assert_allclose(got[1:], true[1:], rtol=0.06)
    assert got[0] < 0.06  # pure noise: signal variance ~0, clipped at 0 when negative
    # The ratio does not depend on units, with or without z-scoring.
    np.testing.assert_allclose(estimate_ncsnr(y, stim, zscore=False), got, rtol=1e-10)


def test_estimate_ncsnr_ragged_repeats_match_brute_force():
    rng = np.random.default_rng(9)
    true = np.array([0.3, 0.8, 1.5])
    reps = rng.integers(1, 5, size=400)  # 1..4 repeats; single-shown stimuli give no noise info
    y, stim = simulate_repeats(rng, true, reps)
    np.testing.assert_allclose(estimate_ncsnr(y, stim), brute_force_ncsnr(y, stim), rtol=1e-10)


def test_estimate_ncsnr_degenerate_voxels_and_errors():
    rng = np.random.default_rng(10)
    y, stim = simulate_repeats(rng, np.array([1.0, 1.0, 1.0]), np.full(50, 2))
    y[:, 1] = 4.0  # constant voxel
    y[3, 2] = np.nan
    got = estimate_ncsnr(y, stim)
    assert np.isfinite(got[0]) and np.isnan(got[1]) and np.isnan(got[2])
    with pytest.raises(ValueError, match="trial_stimulus"):
        estimate_ncsnr(rng.normal(size=(6, 2)), np.arange(6))
    with pytest.raises(ValueError, match="trial_stimulus"):
        estimate_ncsnr(rng.normal(size=(6, 2)), np.arange(5))
    with pytest.raises(ValueError, match="responses"):
        estimate_ncsnr(rng.normal(size=6), np.zeros(6, dtype=int))


# --------------------------------------------------------------------------- retrieval


def brute_force_identification(measured, predicted, k):
    n = len(measured)
    corr = np.array([[np.corrcoef(measured[i], predicted[j])[0, 1] for j in range(n)] for i in range(n)])
    hits = []
    for i in range(n):
        better_or_equal = sum(1 for j in range(n) if j != i and corr[i, j] >= corr[i, i])
        hits.append(better_or_equal < k)
    return float(np.mean(hits)), corr


def test_identification_matches_brute_force():
    rng = np.random.default_rng(11)
    measured = rng.normal(size=(40, 30))
    predicted = measured + rng.normal(scale=2.5, size=measured.shape)  # partly identifiable
    got = identification_accuracy(measured, predicted, k=(1, 3, 5))
    for k in (1, 3, 5):
        expected, corr = brute_force_identification(measured, predicted, k)
        assert got[f"top{k}"] == pytest.approx(expected)
        assert got[f"chance_top{k}"] == pytest.approx(k / 40)
    assert got["n_images"] == 40
    assert 0 < got["top1"] < got["top5"] < 1  # the case is not trivially 0 or 1
    np.testing.assert_allclose(pattern_correlations(measured, predicted), corr, atol=1e-12)


def test_identification_perfect_random_and_ties():
    rng = np.random.default_rng(12)
    measured = rng.normal(size=(20, 50))
    perfect = identification_accuracy(measured, 3 * measured + 1, k=(1,))
    assert perfect["top1"] == 1.0
    # Two images with identical responses and predictions: each ties with the other, so the
    # pessimistic rule misses both at top-1 but finds both at top-2.
    dup = measured.copy()
    dup[1] = dup[0]
    tied = identification_accuracy(dup, dup, k=(1, 2))
    assert tied["top1"] == pytest.approx(18 / 20)
    assert tied["top2"] == 1.0
    # Unrelated predictions score at chance on average.
    top5 = [
        identification_accuracy(rng.normal(size=(100, 40)), rng.normal(size=(100, 40)), k=(5,))["top5"]
        for _ in range(20)
    ]
    assert np.mean(top5) == pytest.approx(0.05, abs=0.02)


def test_identification_drops_nan_voxels_and_caps_k():
    rng = np.random.default_rng(13)
    measured = rng.normal(size=(15, 30))
    predicted = measured + rng.normal(scale=2.0, size=measured.shape)
    clean = identification_accuracy(measured[:, 2:], predicted[:, 2:], k=(1, 2))
    holed_m, holed_p = measured.copy(), predicted.copy()
    holed_m[4, 0] = np.nan
    holed_p[9, 1] = np.nan
    assert identification_accuracy(holed_m, holed_p, k=(1, 2)) == clean
    big = identification_accuracy(measured, predicted, k=(50,))
    assert big["top50"] == 1.0 and big["chance_top50"] == 1.0
    with pytest.raises(ValueError, match="k"):
        identification_accuracy(measured, predicted, k=(0,))
    with pytest.raises(ValueError, match="same shape"):
        identification_accuracy(measured, predicted[:, :5])


# --------------------------------------------------------------------------- ROI summary


def test_roi_summary_nan_aware():
    df = pd.DataFrame(
        {
            "model": ["m"] * 7,
            "dataset": ["d"] * 7,
            "subject": ["subj01"] * 7,
            "roi": ["V1", "V1", "V1", "V2", "V2", None, None],
            "pearson": [0.1, 0.5, np.nan, 0.2, 0.4, 0.3, np.nan],
            "normalised_score": [10.0, 30.0, 20.0, np.nan, np.nan, 5.0, 7.0],
        }
    )
    out = roi_summary(df, value_cols=("pearson", "normalised_score"))
    assert list(out.columns) == ["model", "dataset", "subject", "roi", "metric", "median", "mean", "count", "n_nan"]
    assert len(out) == 6  # 3 ROI groups (missing label kept) x 2 metrics
    row = out[(out.roi == "V1") & (out.metric == "pearson")].iloc[0]
    assert (row["median"], row["mean"], row["count"], row["n_nan"]) == pytest.approx((0.3, 0.3, 2, 1))
    row = out[(out.roi == "V2") & (out.metric == "normalised_score")].iloc[0]
    assert np.isnan(row["median"]) and row["count"] == 0 and row["n_nan"] == 2
    row = out[out.roi.isna() & (out.metric == "normalised_score")].iloc[0]
    assert row["median"] == pytest.approx(6.0) and row["count"] == 2
    assert int((out["count"] + out["n_nan"]).sum()) == 14  # every value accounted for
    with pytest.raises(ValueError, match="seed"):
        roi_summary(df, by=("seed",))

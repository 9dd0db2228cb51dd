"""BrainDataModule: stimulus splits, repeat averaging, per-pair batches, sharding across ranks."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from brainenc.data.datamodule import BrainDataModule
from brainenc.data.sampling import PairBatchSampler
from brainenc.data.splits import limit_train, split_stimuli


@pytest.fixture(scope="module")
def dm(tiny_brain):
    dm = BrainDataModule(stores=[str(tiny_brain["simbrain7t"]), str(tiny_brain["simbrain3t"])],
                         image_size=40, batch_size=8, eval_batch_size=16)
    dm.setup("fit")
    return dm


def test_no_image_in_two_splits_across_subjects_and_datasets(dm):
    assert len(dm.pairs) == 4
    by_id = {}
    for p in dm.pairs:
        ids = p.store.stimulus_ids
        parts = {name: set(ids[p.split.of(name)]) for name in ("train", "val", "test")}
        assert not parts["train"] & parts["val"] and not parts["train"] & parts["test"]
        assert not parts["val"] & parts["test"]
        assert all(len(v) for v in parts.values())
        for name, s in parts.items():
            for i in s:  # a stimulus shared between subjects/datasets keeps its split
                assert by_id.setdefault(i, name) == name
    shared = [i for i, _ in by_id.items()]
    assert len(shared) < sum(len(p.store.stimulus_ids) for p in dm.pairs)


def test_eval_batches_average_repeats(dm):
    pair = dm.pairs[0]
    batch = next(iter(dm.test_dataloader()))
    assert batch["pair"] == pair.key
    assert batch["images"].shape[1:] == (3, 40, 40)
    assert 0.0 <= batch["images"].min() and batch["images"].max() <= 1.0
    with h5py.File(pair.info.path) as f:
        r = f["responses"][:]
    for row, stim in enumerate(batch["stimulus"].tolist()):
        trials = np.flatnonzero(pair.info.trial_stimulus == stim)
        assert len(trials) == 3  # test images are shown three times
        np.testing.assert_allclose(batch["responses"][row].numpy(), r[trials].mean(0), rtol=1e-5, atol=1e-6)


def test_train_batches_single_pair_and_cover_every_image_once(dm):
    seen = {p.key: [] for p in dm.pairs}
    for batch in dm.train_dataloader():
        assert batch["responses"].shape == (len(batch["stimulus"]), dm.voxel_counts[batch["pair"]])
        seen[batch["pair"]] += batch["stimulus"].tolist()
    for p in dm.pairs:
        assert sorted(seen[p.key]) == sorted(p.split.train.tolist())


def test_trial_unit_yields_single_trials(tiny_brain):
    dm = BrainDataModule(stores=[str(tiny_brain["simbrain7t"])], image_size=32, batch_size=8, train_unit="trials")
    dm.setup("fit")
    n = sum(len(b["stimulus"]) for b in dm.train_dataloader())
    expect = sum(int(np.isin(p.info.trial_stimulus, p.split.train).sum()) for p in dm.pairs)
    assert n == expect


def test_images_match_the_store(dm):
    pair = dm.pairs[1]
    batch = next(iter(dm.val_dataloader()))
    dm_same = BrainDataModule(stores=[str(pair.store.root)], image_size=pair.store.image_size[0])
    dm_same.setup()
    b = next(iter(dm_same.val_dataloader()))
    with h5py.File(pair.store.stimuli_path) as f:
        raw = f["images"][b["stimulus"][0].item()]
    np.testing.assert_allclose(b["images"][0].permute(1, 2, 0).numpy(), raw / 255.0, atol=1e-6)
    assert batch["images"].dtype == torch.float32


def test_sampler_shards_without_duplicates_for_eval_and_pads_for_training():
    units = [np.arange(10), np.arange(100, 103)]
    full = PairBatchSampler(units, batch_size=4, shuffle=False, pad=False)
    ranks = []
    for r in range(2):
        s = PairBatchSampler(units, batch_size=4, shuffle=False, pad=False)
        s.num_replicas, s.rank = 2, r
        ranks.append(list(s))
    got = sorted(int(x) for b in ranks[0] + ranks[1] for x in b[1])
    want = sorted(int(x) for b in full for x in b[1])
    assert got == want  # eval: each image exactly once over ranks
    for r in ranks:  # every rank sees every pair, so metric states line up
        assert {p for p, _ in r} == {0, 1}
    train = []
    for r in range(2):
        s = PairBatchSampler(units, batch_size=4, shuffle=True, seed=3, pad=True)
        s.num_replicas, s.rank = 2, r
        train.append(len(s))
    assert train[0] == train[1]  # DDP needs equal step counts


def test_sampler_reshuffles_by_epoch_and_weights_pairs():
    s = PairBatchSampler([np.arange(64), np.arange(64)], batch_size=8, shuffle=True, seed=0)
    first = [b[1].tolist() for b in s]
    s.set_epoch(1)
    assert [b[1].tolist() for b in s] != first
    w = PairBatchSampler([np.arange(64), np.arange(64)], batch_size=8, shuffle=True, weights=[3.0, 1.0])
    pairs = [p for p, _ in w]
    assert pairs.count(0) == 3 * pairs.count(1)


def test_split_rules_and_nested_limits():
    ids = np.array([f"s{i}" for i in range(400)], dtype=object)
    a = split_stimuli(np.arange(400), ids, None, val_fraction=0.1, test_fraction=0.2)
    assert abs(len(a.test) / 400 - 0.2) < 0.06 and abs(len(a.val) / 320 - 0.1) < 0.05
    small, large = limit_train(a, ids, 20), limit_train(a, ids, 60)
    assert len(small.train) == 20 and set(small.train) <= set(large.train)
    store_split = np.zeros(400, dtype=np.uint8)
    store_split[:50] = 1
    b = split_stimuli(np.arange(400), ids, store_split)
    assert b.test.tolist() == list(range(50))


def test_missing_store_without_simulate_is_a_clear_error(tmp_path):
    from brainenc.data.store import StoreError

    dm = BrainDataModule(stores=[str(tmp_path / "nowhere")])
    with pytest.raises(StoreError, match="nowhere"):
        dm.setup()


def test_sampling_weights_by_dataset_and_pair_and_their_checks(tiny_brain):
    """A dataset's weight applies to its subjects, a pair's own weight overrides it; a weight
    that is not a finite number >= 0 is refused; a name matching no pair is reported, not
    silently dropped."""
    from brainenc.errors import ConfigError

    stores = [str(tiny_brain["simbrain7t"]), str(tiny_brain["simbrain3t"])]
    dm = BrainDataModule(stores=stores, sampling_weights={"simbrain3t": 2.0, "simbrain3t/subj02": 0.5})
    dm.setup("fit")
    got = dict(zip([p.key for p in dm.pairs], dm._weights()))
    assert got == {"simbrain7t/subj01": 1.0, "simbrain7t/subj02": 1.0,
                   "simbrain3t/subj01": 2.0, "simbrain3t/subj02": 0.5}
    for bad in (-1.0, float("nan"), "2"):
        with pytest.raises(ConfigError, match="sampling_weights"):
            BrainDataModule(stores=stores, sampling_weights={"simbrain3t": bad})
    typo = BrainDataModule(stores=stores, sampling_weights={"simbrian3t": 2.0})
    typo.setup("fit")
    with pytest.warns(UserWarning, match="simbrian3t"):
        assert typo._weights() == [1.0] * len(typo.pairs)

"""Feature cache integrity: rows overwritten after filling are detected, and every cache error
names the cache file (issue 11, item 5)."""

from __future__ import annotations

import h5py
import pytest
import torch

from brainenc.data.store import Store
from brainenc.features.cache import CacheError, FeatureCache
from brainenc.models.backbones import Backbone


def _filled(tiny_brain, tmp_path):
    store = Store(tiny_brain["simbrain7t"])
    torch.manual_seed(0)
    bb = Backbone("test_efficientnet", image_size=32)
    cache = FeatureCache(root=str(tmp_path / "cache"))
    path = cache.fill(bb, store, 32, batch_size=64)
    return store, bb, cache, path


@pytest.mark.parametrize("complete", [True, False])
def test_rows_overwritten_after_filling_are_an_error(tiny_brain, tmp_path, complete):
    store, bb, cache, path = _filled(tiny_brain, tmp_path)
    rows = torch.tensor([3, 4, 9])
    before = cache.lookup(bb, store, rows, image_size=32).as_tensors()
    cache.close()
    with h5py.File(path, "r+") as f:
        level = sorted(k for k in f if k.startswith("map_"))[0]
        f[level][4] = f[level][4] * 0.5 + 1  # another process / a bug writes over a trusted row
        if not complete:
            f["filled"][100] = False  # the file still changes: the locked read path
    fresh = FeatureCache(root=str(tmp_path / "cache"))
    with pytest.raises(CacheError, match=rf"{path}: field 'row_crc32': rows \[4\]"):
        fresh.lookup(bb, store, rows, image_size=32)
    # untouched rows still read, equal to what was stored
    ok = fresh.lookup(bb, store, torch.tensor([3, 9]), image_size=32).as_tensors()
    for k in before:
        assert torch.equal(ok[k], before[k][[0, 2]])


def test_unreadable_cache_file_is_named(tiny_brain, tmp_path):
    store, bb, cache, path = _filled(tiny_brain, tmp_path)
    cache.close()
    path.write_bytes(path.read_bytes()[:1000])  # truncated
    with pytest.raises(CacheError, match=rf"feature cache {path}: expected a readable HDF5"):
        FeatureCache(root=str(tmp_path / "cache")).lookup(bb, store, torch.tensor([0]), image_size=32)

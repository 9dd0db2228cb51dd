"""FeatureCache: hits equal the backbone, misses computed once, keys, concurrency, crash safety,
and training with the cache matches training without it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from brainenc.data.images import read_images
from brainenc.data.store import Store
from brainenc.features.cache import FeatureCache
from brainenc.models.backbones import Backbone

# float16 keeps 11 significant bits: relative rounding <= 2^-11 ~ 4.9e-4 of each value
F16_RTOL = 2.0 ** -11
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(tiny_brain) -> Path:
    """The session's tiny 7T-like store (read only; a test that changes it works on a copy)."""
    return tiny_brain["simbrain7t"]


def make_backbone(seed: int = 0, **kw) -> Backbone:
    torch.manual_seed(seed)
    return Backbone("test_efficientnet", image_size=32, **kw)


def counting(backbone: Backbone) -> list[int]:
    """Record the batch size of every later backbone call."""
    calls: list[int] = []
    forward = backbone.forward

    def wrapped(images):
        calls.append(int(images.shape[0]))
        return forward(images)

    backbone.forward = wrapped
    return calls


def images_of(store: Store, rows, size: int = 32) -> torch.Tensor:
    uniq, inv = np.unique(np.asarray(rows), return_inverse=True)
    with h5py.File(store.stimuli_path, "r") as f:
        return read_images(f, uniq, size)[torch.as_tensor(inv.ravel())]


def reference(backbone: Backbone, store: Store, rows, size: int = 32):
    with torch.no_grad():
        return backbone(images_of(store, rows, size))


def assert_close_f16(got, ref) -> None:
    for a, b in zip(got.as_tensors().values(), ref.as_tensors().values()):
        assert a.dtype == torch.float32 and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=F16_RTOL, atol=1e-6)


def test_hit_equals_backbone_and_misses_run_once(tiny, tmp_path):
    store, bb = Store(tiny), make_backbone()
    rows, rows2 = [7, 3, 3, 12, 0], [3, 20, 21]  # unsorted, with a repeat: batch order is kept
    ref, ref2 = reference(bb, store, rows), reference(bb, store, rows2)
    cache = FeatureCache(root=str(tmp_path))
    calls = counting(bb)

    first = cache.lookup(bb, store, torch.tensor(rows), images_of(store, rows))
    assert calls == [4]  # four distinct stimuli, each computed once
    second = cache.lookup(bb, store, torch.tensor(rows), images_of(store, rows))
    assert calls == [4]  # all hits
    assert_close_f16(first, ref)
    for a, b in zip(first.maps, second.maps):
        assert torch.equal(a, b)  # a miss comes back exactly as it will later be read

    out = cache.lookup(bb, store, torch.tensor(rows2), images_of(store, rows2))
    assert calls == [4, 2]  # only the two new rows
    assert_close_f16(out, ref2)

    # another run (a fresh cache object on the same root) reuses every row
    FeatureCache(root=str(tmp_path)).lookup(bb, store, torch.tensor(rows), images_of(store, rows))
    assert calls == [4, 2]


def test_fill_then_lookup_has_no_backbone_calls(tiny, tmp_path):
    store, bb = Store(tiny), make_backbone()
    cache = FeatureCache(root=str(tmp_path), fill_batch_size=50)
    calls = counting(bb)
    path = cache.fill(bb, store, 32)
    assert sum(calls) == store.n_stimuli and max(calls) <= 50
    with h5py.File(path, "r") as f:
        assert f["filled"][:].all() and f["map_0"].dtype == np.float16
    rows = [1, 100, 179]
    bb.forward = Backbone.forward.__get__(bb)
    ref = reference(bb, store, rows)
    calls = counting(bb)
    assert_close_f16(cache.lookup(bb, store, torch.tensor(rows), images_of(store, rows)), ref)
    assert calls == []
    cache.fill(bb, store, 32)  # already complete: nothing to do
    assert calls == []


def test_keyed_by_backbone_size_dtype_and_stimuli(tiny, tmp_path):
    store, bb = Store(tiny), make_backbone(0)
    cache = FeatureCache(root=str(tmp_path / "cache"))
    base = cache.path_for(bb, store, 32)
    assert cache.path_for(make_backbone(0), store, 32) == base  # same weights, same file
    assert cache.path_for(make_backbone(1), store, 32) != base  # other random init
    assert cache.path_for(make_backbone(0, layers=[2, 3]), store, 32) != base
    assert cache.path_for(bb, store, 48) != base
    assert FeatureCache(root=str(tmp_path / "cache"), dtype="float32").path_for(bb, store, 32) != base

    # a copy of the store with one image changed gets a new file; an exact copy shares it
    copy = tmp_path / "copy"
    shutil.copytree(tiny, copy)
    assert FeatureCache(root=str(tmp_path / "cache")).path_for(bb, Store(copy), 32) == base
    with h5py.File(copy / "stimuli.h5", "r+") as f:
        f["images"][5] = 255 - f["images"][5]
    changed = FeatureCache(root=str(tmp_path / "cache")).path_for(bb, Store(copy), 32)
    assert changed != base
    # the checksum is remembered beside the cache and refreshed when the file changes
    assert len(list((tmp_path / "cache" / "checksums").glob("*.json"))) == 2
    assert FeatureCache(root=str(tmp_path / "cache")).path_for(bb, Store(copy), 32) == changed


def test_only_frozen_backbones(tiny, tmp_path):
    store = Store(tiny)
    bb = make_backbone(trainable="full")
    with pytest.raises(ValueError, match="frozen"):
        FeatureCache(root=str(tmp_path)).lookup(bb, store, torch.tensor([0]), images_of(store, [0]))


_CHILD = textwrap.dedent("""
    import os, sys, torch
    from brainenc.data.store import Store
    from brainenc.features import cache as C
    from brainenc.models.backbones import Backbone
    store_dir, root, mode = sys.argv[1:4]
    torch.manual_seed(0)
    bb = Backbone("test_efficientnet", image_size=32)
    if mode == "die":
        # die after a chunk's feature bytes are written, before its rows are flagged as filled
        orig_flush, n = C.h5py.File.flush, [0]
        def flush(self):
            orig_flush(self)
            n[0] += 1
            if n[0] == 3:  # 1st chunk: data flush, flags flush; 2nd chunk: data flush -> die
                os._exit(17)
        C.h5py.File.flush = flush
    C.FeatureCache(root=root, fill_batch_size=int(sys.argv[4])).fill(bb, Store(store_dir), 32)
""")


def _child(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _CHILD, *map(str, args)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_concurrent_fill_from_two_processes(tiny, tmp_path):
    store, bb = Store(tiny), make_backbone()
    procs = [_child(tiny, tmp_path, "fill", 16) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-2000:]
    cache = FeatureCache(root=str(tmp_path))
    path = cache.path_for(bb, store, 32)
    assert sorted(x.name for x in tmp_path.glob("*.h5")) == [path.name]
    assert not list(tmp_path.glob(".*.tmp"))
    with h5py.File(path, "r") as f:
        assert f["filled"][:].all()
    rows = np.arange(0, store.n_stimuli, 7)
    ref = reference(bb, store, rows)
    calls = counting(bb)
    assert_close_f16(cache.lookup(bb, store, torch.as_tensor(rows), images_of(store, rows)), ref)
    assert calls == []


def test_interrupted_fill_is_not_trusted(tiny, tmp_path):
    store, bb = Store(tiny), make_backbone()
    p = _child(tiny, tmp_path, "die", 40)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 17, err.decode()[-2000:]
    cache = FeatureCache(root=str(tmp_path))
    path = cache.path_for(bb, store, 32)
    with h5py.File(path, "r") as f:
        filled = f["filled"][:]
        assert filled.sum() == 40  # the first chunk; the second chunk's bytes are on disk, unflagged
        # a creator that died leaves only a temp file, which nothing reads and the next creator removes
    (tmp_path / f".{path.name}.999999.tmp").write_bytes(b"partial")

    second_chunk = np.flatnonzero(~filled)[:40]
    ref = reference(bb, store, second_chunk)
    calls = counting(bb)
    out = cache.lookup(bb, store, torch.as_tensor(second_chunk), images_of(store, second_chunk))
    assert calls == [40]  # recomputed, not trusted
    assert_close_f16(out, ref)
    cache.fill(bb, store, 32)
    with h5py.File(path, "r") as f:
        assert f["filled"][:].all()
    assert sum(calls) == store.n_stimuli - 40

    # creation after a crashed creator: the stale temp file is removed, the new file is valid
    other = FeatureCache(root=str(tmp_path / "again"))
    other_path = other.path_for(bb, store, 32)
    stale = other_path.parent / f".{other_path.name}.999999.tmp"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"partial")
    other.lookup(bb, store, torch.tensor([0]), images_of(store, [0]))
    assert not stale.exists() and other_path.exists()


def _train(store_dir: Path, root: Path, cache: FeatureCache | None) -> dict:
    import lightning as L

    from brainenc.data.datamodule import BrainDataModule
    from brainenc.lit.encoder_module import EncoderModule
    from brainenc.models.linear import LinearReadout

    L.seed_everything(0, verbose=False)
    dm = BrainDataModule(stores=[str(store_dir)], subjects=["subj01"], image_size=32, batch_size=16,
                         eval_batch_size=64)
    model = EncoderModule(make_backbone(), LinearReadout, voxel_counts=dm.voxel_counts, lr=3e-3,
                          feature_cache=cache)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        default_root_dir=str(root), deterministic=True)
    trainer.fit(model, dm)
    trainer.test(model, dm, verbose=False)
    return model.test_results


def test_training_with_and_without_cache(tiny, tmp_path):
    plain = _train(tiny, tmp_path / "plain", None)
    cache = FeatureCache(root=str(tmp_path / "cache"))
    cold = _train(tiny, tmp_path / "cold", cache)  # fills the cache during the first epoch
    warm = _train(tiny, tmp_path / "warm", FeatureCache(root=str(tmp_path / "cache")))  # all hits
    key = next(iter(plain["pearson"]))
    # cold and warm runs see bit-identical features (misses are rounded like hits)
    np.testing.assert_array_equal(cold["pearson"][key], warm["pearson"][key])
    # float16 features vs float32: per-voxel test Pearson within 2e-3, medians within 5e-4
    np.testing.assert_allclose(warm["pearson"][key], plain["pearson"][key], atol=2e-3)
    assert abs(np.nanmedian(warm["pearson"][key]) - np.nanmedian(plain["pearson"][key])) < 5e-4
    assert warm["retrieval"][key] == pytest.approx(plain["retrieval"][key], abs=0.05)


def test_lookup_without_images_reads_misses_from_the_store(tiny, tmp_path):
    store, bb = Store(tiny), make_backbone()
    rows = [9, 4, 4]
    ref = reference(bb, store, rows)
    calls = counting(bb)
    cache = FeatureCache(root=str(tmp_path))
    out = cache.lookup(bb, store, torch.tensor(rows), None, image_size=32)
    assert calls == [2]
    assert_close_f16(out, ref)
    with pytest.raises(ValueError, match="image_size"):
        cache.lookup(bb, store, torch.tensor(rows), None)

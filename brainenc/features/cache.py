"""On-disk cache of frozen-backbone features, one HDF5 file per (backbone, image size, stimuli).

A frozen backbone gives every stimulus the same features in every epoch, run and sweep cell, so
they are computed once and read back afterwards (float16 on disk, float32 out).

Layout of ``<root>/<backbone>_<S>px_<digest>.h5`` (``digest`` hashes the backbone's
:meth:`~brainenc.models.backbones.Backbone.cache_key`, the image size S, the sha256 of the
store's ``stimuli.h5`` and the storage dtype, so changing any of them selects another file)::

    map_<l>   float16 (n_stimuli, C_l, H_l, W_l)   one row per row of stimuli.h5
    cls_<l>   float16 (n_stimuli, C_l)             ViTs with a class token only
    filled    bool    (n_stimuli,)                 a row is trusted only when its flag is set
    row_crc32 uint32  (n_stimuli,)                 CRC-32 of a filled row's bytes (all levels, in
                                                   name order), checked on every read: a row
                                                   overwritten after filling is an error, not data
    attrs     backbone_key, image_size, stimuli_checksum, n_stimuli, format_version, ...

Concurrency and crash safety (several runs, sweep cells or DDP ranks on one cache)
-----------------------------------------------------------------------------------
* The file is created complete (every dataset allocated, contiguous, ``filled`` all False) under
  a temporary name and renamed into place, so a half-created file is never seen.
* After creation the HDF5 structure never changes: writes touch only the raw bytes of rows.
  Each writer computes its missing rows *without* any lock (the expensive part runs in parallel),
  then takes an exclusive ``flock`` on ``<file>.lock``, re-reads ``filled``, writes only rows still
  missing, flushes, and only then sets their flags. A process killed mid-write leaves rows whose
  flags are unset: later runs recompute them. ``flock`` locks die with their process, so a crash
  never leaves a stale lock.
* Readers hold a shared lock while the file may still change (open, read, close); once every
  flag is set the file is immutable and each process keeps one read handle open.

We chose one locked file over per-process temp files merged later: there is nothing to merge or
garbage-collect, every process benefits at once from rows others computed, and the lock is held
only for the few milliseconds of I/O per batch. (On Lustre, mount with ``-o flock``; on NFS,
Linux maps ``flock`` to POSIX locks served by lockd.)

Use from YAML::

    model:
      init_args:
        feature_cache:
          class_path: brainenc.features.cache.FeatureCache
          init_args: {root: .cache/brainenc/features}

and precompute a whole store up front with ``brainenc cache fill -c cfg.yaml`` (same ``-c`` files
and overrides as ``brainenc fit``; :func:`brainenc.cli.main_cache`) or :meth:`FeatureCache.fill`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import zlib
from pathlib import Path
from typing import Iterator, Optional, Union

import h5py
import numpy as np
import torch
from torch import Tensor

from brainenc.ioutil import atomic_path, atomic_write, ddp_world
from brainenc.models.backbones import Backbone, Features

__all__ = ["CacheError", "FeatureCache", "default_root"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: row_crc32
_DTYPES = {"float16": np.float16, "float32": np.float32}


class CacheError(ValueError):
    """A feature cache file is unreadable, belongs to another key, or was changed after filling.
    The message names the file."""

    input_error = True


def _row_crc(arrays: dict[str, np.ndarray], rows: Optional[np.ndarray] = None) -> np.ndarray:
    """CRC-32 of each row's stored bytes over every level in name order: uint32 (R,)."""
    names = sorted(arrays)
    n = len(next(iter(arrays.values()))) if arrays else 0
    idx = range(n) if rows is None else rows
    out = np.empty(len(idx), dtype=np.uint32)
    for j, i in enumerate(idx):
        crc = 0
        for k in names:
            crc = zlib.crc32(np.ascontiguousarray(arrays[k][i]).view(np.uint8), crc)
        out[j] = crc
    return out


def _h5(path: Path, mode: str) -> h5py.File:
    """Open a cache file; an unreadable one is a CacheError naming it."""
    try:
        return h5py.File(path, mode, locking=False)
    except OSError as e:
        raise CacheError(f"feature cache {path}: expected a readable HDF5 cache file ({e}); delete it "
                         "to rebuild the cache") from None


def default_root() -> Path:
    """``$BRAINENC_CACHE/features`` if set, else ``./.cache/brainenc/features`` (absolute)."""
    env = os.environ.get("BRAINENC_CACHE")
    base = Path(env) if env else Path.cwd() / ".cache" / "brainenc"
    return (base / "features").absolute()


@contextlib.contextmanager
def _flock(path: Path, exclusive: bool) -> Iterator[None]:
    """Hold a shared or exclusive ``flock`` on ``path`` (created if missing, never deleted:
    deleting a lock file lets two processes lock two different inodes)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


class _CacheFile:
    """One cache file: reads, locked writes and atomic creation (see the module docstring)."""

    def __init__(self, path: Path, attrs: dict, dtype: np.dtype):
        self.path = path
        self.lock = path.with_name(path.name + ".lock")
        self.attrs = attrs
        self.n = int(attrs["n_stimuli"])
        self.dtype = dtype
        self.complete = False
        self._reader: Optional[h5py.File] = None
        self._reader_pid: Optional[int] = None

    # -- reading ------------------------------------------------------------------------------------
    def _check(self, f: h5py.File) -> None:
        for k in ("backbone_key", "image_size", "stimuli_checksum", "n_stimuli"):
            if str(f.attrs.get(k)) != str(self.attrs[k]):
                raise CacheError(f"feature cache {self.path}: attribute '{k}' is {f.attrs.get(k)!r}, expected "
                                 f"{self.attrs[k]!r}; delete the file (it does not belong to this key)")
        for name, what in (("filled", "bool"), ("row_crc32", "uint32")):
            if name not in f or f[name].shape != (self.n,):
                raise CacheError(f"feature cache {self.path}: field '{name}': expected {what} ({self.n},); "
                                 "delete the file")

    def _verify(self, f: h5py.File, rows: np.ndarray, hit: np.ndarray, data: dict[str, np.ndarray]) -> None:
        """Raise CacheError if a trusted row's bytes no longer match the CRC written with them."""
        if not hit.any():
            return
        stored = _take(f["row_crc32"], rows)[hit]
        got = _row_crc(data, np.flatnonzero(hit))
        bad = rows[hit][got != stored]
        if len(bad):
            raise CacheError(f"feature cache {self.path}: field 'row_crc32': rows {bad[:5].tolist()} "
                             f"({len(bad)} in this batch) changed after they were filled (checksum "
                             "mismatch); delete the file to rebuild the cache")

    def _open_complete(self) -> h5py.File:
        # an immutable file: one handle per process, reopened after a fork (DataLoader, DDP spawn)
        if self._reader is None or self._reader_pid != os.getpid():
            self._reader, self._reader_pid = _h5(self.path, "r"), os.getpid()
            self._check(self._reader)
        return self._reader

    def filled(self) -> np.ndarray:
        """bool (n_stimuli,): rows that are trusted (all False when the file does not exist)."""
        if self.complete:
            return np.ones(self.n, dtype=bool)
        if not self.path.exists():
            return np.zeros(self.n, dtype=bool)
        with _flock(self.lock, exclusive=False), _h5(self.path, "r") as f:
            self._check(f)
            mask = f["filled"][:]
        self.complete = bool(mask.all())
        return mask

    def read(self, rows: np.ndarray) -> tuple[np.ndarray, Optional[dict[str, np.ndarray]]]:
        """Rows (sorted, unique) -> (hit bool (R,), {name: (R, ...)} or None when nothing is stored).

        Entries of rows that are not hits hold whatever bytes are on disk and must not be used."""
        if self.complete:
            f = self._open_complete()
            hit, data = np.ones(len(rows), dtype=bool), {k: _take(f[k], rows) for k in _levels(f)}
            self._verify(f, rows, hit, data)
            return hit, data
        if not self.path.exists():
            return np.zeros(len(rows), dtype=bool), None
        with _flock(self.lock, exclusive=False), _h5(self.path, "r") as f:
            self._check(f)
            mask = f["filled"][:]
            hit = mask[rows]
            data = {k: _take(f[k], rows) for k in _levels(f)} if hit.any() else None
            if data is not None:
                self._verify(f, rows, hit, data)
        self.complete = bool(mask.all())
        return hit, data

    # -- writing ------------------------------------------------------------------------------------
    def write(self, rows: np.ndarray, arrays: dict[str, np.ndarray]) -> None:
        """Store ``arrays`` {name: (R, ...)} for sorted unique ``rows``; rows already filled by
        another process are left alone (their bytes may be being read)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _flock(self.lock, exclusive=True):
            if not self.path.exists():
                self._create(arrays)
            with _h5(self.path, "r+") as f:
                self._check(f)
                if set(_levels(f)) != set(arrays) or any(f[k].shape[1:] != v.shape[1:] for k, v in arrays.items()):
                    raise CacheError(f"feature cache {self.path}: stored levels "
                                     f"{ {k: f[k].shape[1:] for k in _levels(f)} } differ from the backbone's "
                                     f"{ {k: v.shape[1:] for k, v in arrays.items()} }; delete the file")
                mask = f["filled"][:]
                new = ~mask[rows]
                if new.any():
                    sel = rows[new]
                    stored = {k: np.asarray(v[new], dtype=self.dtype) for k, v in arrays.items()}
                    for k, v in stored.items():
                        _put(f[k], sel, v)
                    _put(f["row_crc32"], sel, _row_crc(stored))
                    # data first, flags after: a crash in between leaves untrusted rows, never
                    # trusted garbage
                    f.flush()
                    mask[sel] = True
                    f["filled"][:] = mask
                    f.flush()
        self.complete = bool(mask.all())

    def _create(self, arrays: dict[str, np.ndarray]) -> None:
        """Create the full-size file atomically (caller holds the exclusive lock)."""
        for stale in self.path.parent.glob(f".{self.path.name}.*.tmp"):
            stale.unlink(missing_ok=True)  # left by a creator that died: only creators hold the lock
        with atomic_path(self.path) as tmp, h5py.File(tmp, "w", libver="earliest", locking=False) as f:
            for k, v in arrays.items():
                # contiguous and allocated now: later writes change raw bytes, never structure
                dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
                dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
                f.create_dataset(k, shape=(self.n, *v.shape[1:]), dtype=self.dtype, dcpl=dcpl)
            f.create_dataset("filled", data=np.zeros(self.n, dtype=bool))
            f.create_dataset("row_crc32", data=np.zeros(self.n, dtype=np.uint32))
            for k, v in self.attrs.items():
                f.attrs[k] = v

    def close(self) -> None:
        if self._reader is not None and self._reader_pid == os.getpid():
            with contextlib.suppress(Exception):
                self._reader.close()
        self._reader = None


def _levels(f: h5py.File) -> list[str]:
    return sorted(k for k in f if k.startswith(("map_", "cls_")))


def _take(ds: h5py.Dataset, rows: np.ndarray) -> np.ndarray:
    """``ds[rows]`` for sorted unique rows; one slice read when they are consecutive."""
    if len(rows) and rows[-1] - rows[0] + 1 == len(rows):
        return ds[int(rows[0]):int(rows[-1]) + 1]
    return ds[rows]


def _put(ds: h5py.Dataset, rows: np.ndarray, values: np.ndarray) -> None:
    if len(rows) and rows[-1] - rows[0] + 1 == len(rows):
        ds[int(rows[0]):int(rows[-1]) + 1] = values
    else:
        ds[rows] = values


class FeatureCache:
    """Disk cache of frozen-backbone features, shared by epochs, runs, sweep cells and DDP ranks.

    Parameters
    ----------
    root : directory of the cache files; None = ``$BRAINENC_CACHE/features`` or
        ``./.cache/brainenc/features`` (resolved to an absolute path when the cache is built)
    dtype : "float16" (default: half the disk and I/O; features come back within float16's
        relative rounding of 2^-11) or "float32" (exact)
    prefill : on the first lookup of a (backbone, store, size), compute every stimulus of the
        store before continuing (under DDP the ranks share the work), instead of filling batch by
        batch during the first epoch
    fill_batch_size : images per backbone call in :meth:`fill`

    Notes
    -----
    Holds no tensors; per process it remembers the stimuli checksums and keeps one read handle
    per completed file. Pickles without them (DDP spawn, checkpoint hparams).
    """

    def __init__(self, root: Optional[str] = None, dtype: str = "float16", prefill: bool = False,
                 fill_batch_size: int = 64):
        if dtype not in _DTYPES:
            raise ValueError(f"FeatureCache: dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        self.root = Path(root).absolute() if root is not None else default_root()
        self.dtype = dtype
        self.prefill = bool(prefill)
        self.fill_batch_size = int(fill_batch_size)
        self._init_state()

    def _init_state(self) -> None:
        self._files: dict[tuple, _CacheFile] = {}
        self._checksums: dict[tuple, str] = {}
        self._prefilled: set[Path] = set()

    def __getstate__(self) -> dict:
        return {"root": str(self.root), "dtype": self.dtype, "prefill": self.prefill,
                "fill_batch_size": self.fill_batch_size}

    def __setstate__(self, state: dict) -> None:
        self.root, self.dtype = Path(state["root"]), state["dtype"]
        self.prefill, self.fill_batch_size = state["prefill"], state["fill_batch_size"]
        self._init_state()

    def __repr__(self) -> str:
        return f"FeatureCache(root={str(self.root)!r}, dtype={self.dtype!r}, prefill={self.prefill})"

    # -- keys -------------------------------------------------------------------------------------
    def stimuli_checksum(self, store) -> str:
        """sha256 of ``store.stimuli_path``, computed once per file version.

        Remembered in ``<root>/checksums/<hash of the path>.json`` together with the file's size,
        mtime and inode; any change to those recomputes it (and so selects a new cache file).
        """
        p = Path(store.stimuli_path).resolve()
        st = p.stat()
        sig = [str(p), st.st_size, st.st_mtime_ns, st.st_ino]
        memo = tuple(sig)
        if memo in self._checksums:
            return self._checksums[memo]
        side = self.root / "checksums" / (hashlib.sha256(str(p).encode()).hexdigest()[:24] + ".json")
        checksum = None
        with contextlib.suppress(OSError, ValueError, KeyError):
            saved = json.loads(side.read_text())
            if saved["signature"] == sig:
                checksum = saved["checksum"]
        if checksum is None:
            from brainenc.data.store import file_checksum

            checksum = file_checksum(p)
            atomic_write(side, json.dumps({"signature": sig, "checksum": checksum}))
        self._checksums[memo] = checksum
        return checksum

    def path_for(self, backbone: Backbone, store, image_size: int) -> Path:
        """The cache file for ``backbone`` on ``store``'s stimuli resized to ``image_size``."""
        return self._file(backbone, store, image_size).path

    def _file(self, backbone: Backbone, store, image_size: int) -> _CacheFile:
        memo = (backbone.cache_key(), str(store.stimuli_path), int(image_size))
        cf = self._files.get(memo)
        if cf is None:
            attrs = {"backbone_key": backbone.cache_key(), "image_size": int(image_size),
                     "stimuli_checksum": self.stimuli_checksum(store), "n_stimuli": int(store.n_stimuli),
                     "dtype": self.dtype, "format_version": FORMAT_VERSION,
                     "store_root": str(Path(store.root).resolve())}
            ident = [FORMAT_VERSION, attrs["backbone_key"], attrs["image_size"], attrs["stimuli_checksum"],
                     self.dtype]
            digest = hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:24]
            name = re.sub(r"[^A-Za-z0-9_.-]+", "-", backbone.name)
            cf = _CacheFile(self.root / f"{name}_{int(image_size)}px_{digest}.h5", attrs, _DTYPES[self.dtype])
            self._files[memo] = cf
        return cf

    # -- computing ----------------------------------------------------------------------------------
    def _compute(self, backbone: Backbone, images: Tensor, path: Optional[Path] = None) -> dict[str, np.ndarray]:
        """Backbone features of ``images`` (B, 3, S, S) as {name: (B, ...)} in the storage dtype."""
        with torch.no_grad():
            feats = backbone(images)
        out = {}
        for k, t in feats.as_tensors().items():
            a = t.detach().float().cpu().numpy()
            if self.dtype == "float16" and np.abs(a).max(initial=0.0) > np.finfo(np.float16).max:
                raise CacheError(f"feature cache {path}: backbone {backbone.name!r} level {k} has values beyond "
                                 f"float16's range (max |x| = {np.abs(a).max():.3g}); use dtype='float32'")
            out[k] = a.astype(_DTYPES[self.dtype])
        return out

    def lookup(self, backbone: Backbone, store, stimulus: Tensor, images: Optional[Tensor] = None,
               image_size: Optional[int] = None, device: Union[str, torch.device, None] = None) -> Features:
        """Features of a batch, from the cache where present, from the backbone otherwise.

        Parameters
        ----------
        backbone : a frozen backbone
        store : the :class:`~brainenc.data.store.Store` whose stimuli.h5 rows ``stimulus`` indexes
        stimulus : int64 (B,) rows of ``store``'s stimuli.h5 (repeats allowed)
        images : float (B, 3, S, S), the same images, resized to S (only misses go through the
            backbone), or None: then misses are read from ``store``'s stimuli.h5 at ``image_size``,
            so a loader that skips images when features are cached saves their reading and resizing
        image_size : S when ``images`` is None
        device : where the features go when ``images`` is None (default: the backbone's device)

        Returns
        -------
        Features on ``images.device`` (or ``device``) in float32: ``maps[l]`` (B, C_l, H_l, W_l), ``cls[l]`` (B, C_l).
        Computed rows are rounded to the storage dtype too, so the result does not depend on
        whether a row was a hit or a miss.
        """
        if not backbone.frozen:
            raise ValueError("FeatureCache: only frozen backbones can be cached "
                             f"(backbone {backbone.name!r} is trainable={backbone.trainable!r})")
        if images is None:
            if image_size is None:
                raise ValueError("FeatureCache.lookup: give images (B, 3, S, S) or image_size")
            size = int(image_size)
            device = torch.device(device) if device is not None else next(backbone.parameters()).device
        else:
            if images.ndim != 4 or images.shape[-1] != images.shape[-2]:
                raise ValueError(f"FeatureCache.lookup: expected square images (B, 3, S, S), got {tuple(images.shape)}")
            size, device = int(images.shape[-1]), images.device
        cf = self._file(backbone, store, size)
        if self.prefill and not cf.complete and cf.path not in self._prefilled:
            self._prefilled.add(cf.path)
            self.fill(backbone, store, size)
        stim = stimulus.detach().cpu().numpy().astype(np.int64)
        if len(stim) and (stim.min() < 0 or stim.max() >= cf.n):
            raise CacheError(f"feature cache {cf.path}: stimulus rows must be in [0, {cf.n}) for {store.stimuli_path}, "
                             f"got {stim.min()}..{stim.max()}")
        rows, first, inv = np.unique(stim, return_index=True, return_inverse=True)
        hit, data = cf.read(rows)
        if not hit.all():
            miss = np.flatnonzero(~hit)
            if images is None:
                from brainenc.data.images import read_images

                with h5py.File(store.stimuli_path, "r") as f:
                    batch = read_images(f, rows[miss], size).to(next(backbone.parameters()).device)
            else:
                batch = images[torch.as_tensor(first[miss], device=images.device)]
            computed = self._compute(backbone, batch, cf.path)
            cf.write(rows[miss], computed)
            if data is None:
                data = {k: np.empty((len(rows), *v.shape[1:]), dtype=v.dtype) for k, v in computed.items()}
            for k, v in computed.items():
                data[k][miss] = v
        identity = len(rows) == len(stim) and bool((inv.ravel() == np.arange(len(stim))).all())
        out = {k: torch.from_numpy(v if identity else v[inv.ravel()]).to(device, torch.float32)
               for k, v in data.items()}
        return Features.from_tensors(out)

    def fill(self, backbone: Backbone, store, image_size: int, batch_size: Optional[int] = None) -> Path:
        """Compute every missing stimulus of ``store`` at ``image_size`` and return the file's path.

        Runs the backbone on its own device in batches of ``batch_size`` images read straight from
        stimuli.h5. Several processes may fill the same file at once; under DDP each rank starts
        at a different offset so the ranks mostly split the work, and every chunk re-checks
        ``filled`` first so finished rows are skipped.
        """
        from brainenc.data.images import read_images

        if not backbone.frozen:
            raise ValueError(f"FeatureCache.fill: backbone {backbone.name!r} is not frozen")
        cf = self._file(backbone, store, image_size)
        todo = np.flatnonzero(~cf.filled())
        if not len(todo):
            return cf.path
        bs = int(batch_size or self.fill_batch_size)
        chunks = [todo[i:i + bs] for i in range(0, len(todo), bs)]
        world, rank = ddp_world()
        start = len(chunks) * rank // world
        chunks = chunks[start:] + chunks[:start]
        device = next(backbone.parameters()).device
        log.info("feature cache: filling %d stimuli of %s into %s", len(todo), store.root, cf.path)
        with h5py.File(store.stimuli_path, "r") as f:
            for chunk in chunks:
                chunk = chunk[~cf.filled()[chunk]]
                if not len(chunk):
                    continue
                imgs = read_images(f, chunk, image_size).to(device)
                cf.write(chunk, self._compute(backbone, imgs, cf.path))
        return cf.path

    def close(self) -> None:
        """Close the read handles of completed files (they are reopened on demand)."""
        for cf in self._files.values():
            cf.close()

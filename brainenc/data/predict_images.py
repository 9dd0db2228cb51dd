"""Images nobody scanned, for ``brainenc predict --data.predict_images=PATH``.

``PATH`` is one of

* a folder of image files (PNG, JPEG, BMP, GIF, TIFF, WebP), searched recursively; an image's id
  is its path relative to the folder (POSIX separators) and its *category* the first-level
  subfolder it sits in ("" for files directly in the folder);
* a ``.npy`` (read without pickles, memory-mapped) or ``.h5`` array of images uint8 (N, H, W, 3);
  ids are the zero-padded row numbers (or the file's ``stimulus_id`` dataset when an ``.h5``
  has one of length N);
* a store's ``stimuli.h5`` (the folder holds ``manifest.yaml``): ids are the store's stimulus
  ids, and its rows are addressed as (store, row), so a frozen backbone's feature cache applies.

Images keep a stable order: sorted relative paths for a folder, rows for an array.  They become
model input by the rule of :mod:`brainenc.data.images` (centre crop at their own resolution, then
the same bilinear resize stored stimuli get).  Nothing is read until a batch asks for it, so a
folder of 100,000 images costs its list of names.

Batches (one dict per index batch)::

    images        float32 (b, 3, S, S) of the readable images (None with ``load_images=False``
                  for a store, whose features the cache then reads)
    stimulus      int64 (b,) positions in the source's order (rows of the store's stimuli.h5)
    stimulus_id   list of b ids;  category: list of b categories
    skipped       [(id, reason)] images of this batch that could not be read (only when skipping)
    store         the Store of a stimuli.h5 source, else None
    pair          None (every pair of the run is predicted from the same features)
    predict_images True
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from .images import read_images, square_input, to_input
from .importers.source_files import SourceError
from .store import MANIFEST, STIMULI, Store

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
EXPECTED = ("a folder of image files (" + "/".join(s[1:].upper() for s in IMAGE_SUFFIXES) + "), a .npy "
            "or .h5 array uint8 (N, H, W, 3), or a store's stimuli.h5")


@dataclass
class ImageSource:
    """The images of ``--data.predict_images``: ids, categories and how to read them."""

    path: Path
    kind: str  # "folder" | "npy" | "h5" | "store"
    ids: np.ndarray  # object (n,) str
    categories: np.ndarray  # object (n,) str
    files: list[Path] = field(default_factory=list)  # folder: one file per id
    dataset: str = "images"  # h5: the array's name
    store: Optional[Store] = None

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def open(cls, path: str | os.PathLike) -> "ImageSource":
        p = Path(path)
        if p.is_dir():
            if (p / MANIFEST).exists() and (p / STIMULI).exists():
                p = p / STIMULI  # a store directory: its stimuli
            else:
                return cls._folder(p)
        if not p.exists():
            raise SourceError(p, "data.predict_images", EXPECTED, "no such file or folder")
        if p.suffix.lower() == ".npy":
            return cls._npy(p)
        if p.suffix.lower() in (".h5", ".hdf5"):
            if (p.parent / MANIFEST).exists() and p.name == STIMULI:
                store = Store(p.parent, validate=False)
                n = store.n_stimuli
                return cls(p, "store", store.stimulus_ids.astype(object), np.full(n, "", object), store=store)
            return cls._h5(p)
        raise SourceError(p, "data.predict_images", EXPECTED, f"a {p.suffix or 'suffix-less'} file")

    @classmethod
    def _folder(cls, root: Path) -> "ImageSource":
        files = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # no hidden folders
            files += [Path(dirpath) / f for f in filenames
                      if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES]
        rel = sorted((f.relative_to(root).as_posix(), f) for f in files)
        if not rel:
            raise SourceError(root, "data.predict_images", EXPECTED, "a folder without image files")
        ids = np.array([r for r, _ in rel], dtype=object)
        cats = np.array([r.split("/")[0] if "/" in r else "" for r, _ in rel], dtype=object)
        return cls(root, "folder", ids, cats, files=[f for _, f in rel])

    @staticmethod
    def _check_array(p: Path, name: str, shape, dtype) -> None:
        if len(shape) != 4 or shape[-1] != 3 or np.dtype(dtype) != np.uint8 or shape[0] < 1:
            raise SourceError(p, name, "images uint8 (N, H, W, 3) with N >= 1", f"{np.dtype(dtype)} {tuple(shape)}")

    @classmethod
    def _npy(cls, p: Path) -> "ImageSource":
        try:
            arr = np.load(p, mmap_mode="r", allow_pickle=False)
        except ValueError as e:  # object arrays (pickles) are refused, never loaded
            raise SourceError(p, "<array>", "a numeric .npy array (no pickles)", str(e).splitlines()[0]) from None
        cls._check_array(p, "<array>", arr.shape, arr.dtype)
        return cls(p, "npy", _row_ids(arr.shape[0]), np.full(arr.shape[0], "", object))

    @classmethod
    def _h5(cls, p: Path) -> "ImageSource":
        try:
            f = h5py.File(p, "r")
        except OSError as e:
            raise SourceError(p, "<file>", "a readable HDF5 file", str(e)) from None
        with f:
            if "images" in f:
                name = "images"
            else:
                cands = [k for k, v in f.items() if isinstance(v, h5py.Dataset) and v.ndim == 4]
                if len(cands) != 1:
                    raise SourceError(p, "images", "a dataset 'images' (or exactly one 4-d dataset) uint8 "
                                      "(N, H, W, 3)", f"datasets {sorted(f)}")
                name = cands[0]
            ds = f[name]
            cls._check_array(p, name, ds.shape, ds.dtype)
            n = ds.shape[0]
            ids = _row_ids(n)
            if "stimulus_id" in f and f["stimulus_id"].shape == (n,):
                ids = np.array([s.decode() if isinstance(s, bytes) else str(s) for s in f["stimulus_id"][:]],
                               dtype=object)
                if len(set(ids)) != n:
                    raise SourceError(p, "stimulus_id", "unique ids, one per image", "repeated ids")
        return cls(p, "h5", ids, np.full(n, "", object), dataset=name)


def _row_ids(n: int) -> np.ndarray:
    """Zero-padded row numbers, so that sorting ids keeps the rows' order."""
    width = len(str(max(n - 1, 0)))
    return np.array([f"{i:0{width}d}" for i in range(n)], dtype=object)


class PredictImagesDataset(Dataset):
    """Reads whole batches of an :class:`ImageSource` given ``(0, positions)`` descriptors
    (a :class:`~brainenc.data.sampling.PairBatchSampler` over one unit: every position once,
    sorted, sharded across ranks without padding).

    skip_unreadable : an image file that cannot be decoded is left out and reported in the
        batch's ``skipped`` list, instead of stopping the prediction with a SourceError
    """

    def __init__(self, source: ImageSource, image_size: int, skip_unreadable: bool = False,
                 load_images: bool = True):
        self.source, self.image_size = source, int(image_size)
        self.skip_unreadable, self.load_images = bool(skip_unreadable), bool(load_images)
        self._pid, self._file = None, None

    def __len__(self) -> int:
        return len(self.source)

    def _h5(self) -> h5py.File:
        if self._pid != os.getpid():  # reopened after a fork (loader workers)
            self._pid, self._file = os.getpid(), h5py.File(self.source.path, "r")
        return self._file

    def __getitem__(self, desc: tuple[int, np.ndarray]) -> dict:
        _, pos = desc
        pos = np.asarray(pos, dtype=np.int64)
        src, size = self.source, self.image_size
        skipped: list[tuple[str, str]] = []
        if src.kind == "folder":
            from PIL import Image

            keep, images = [], []
            for i in pos:
                try:
                    with Image.open(src.files[i]) as im:
                        images.append(square_input(np.asarray(im.convert("RGB")), size))
                    keep.append(i)
                except (OSError, ValueError) as e:
                    if not self.skip_unreadable:
                        raise SourceError(src.files[i], "<image>", "a readable image file (or "
                                          "--data.predict_skip_unreadable=true to skip it)", str(e)) from None
                    skipped.append((str(src.ids[i]), str(e).splitlines()[0] if str(e) else type(e).__name__))
            pos = np.asarray(keep, dtype=np.int64)
            imgs = torch.cat(images) if images else torch.zeros(0, 3, size, size)
        elif src.kind == "store":
            imgs = read_images(self._h5(), pos, size) if self.load_images else None
        else:
            arr = np.load(src.path, mmap_mode="r") if src.kind == "npy" else self._h5()[src.dataset]
            block = np.asarray(arr[pos] if src.kind == "h5" else arr[pos.min():pos.max() + 1][pos - pos.min()])
            imgs = (to_input(block, size) if block.shape[1] == block.shape[2]
                    else torch.cat([square_input(a, size) for a in block]))
        return {"images": imgs, "stimulus": torch.from_numpy(pos),
                "stimulus_id": [str(s) for s in src.ids[pos]], "category": [str(c) for c in src.categories[pos]],
                "skipped": skipped, "store": src.store, "pair": None, "predict_images": True}


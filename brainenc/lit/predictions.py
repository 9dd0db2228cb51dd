"""``brainenc predict``'s output, streamed to disk batch by batch (bounded memory at any size).

* ``predictions/<dataset>__<subject>[.rankR].h5`` per pair::

      pred         float32 (n, n_voxels)
      stimulus     int64 (n,) rows of the pair's stimuli.h5 (test images) or positions in the
                   predicted source's order (``--data.predict_images``)
      stimulus_id  str (n,) the store's stimulus id, or the image's path relative to the folder
      category     str (n,) first-level subfolder of the image ("" when none; predict_images only)
      attrs: pair, model, source (what was predicted), n_skipped

  rows in increasing ``stimulus`` order (the loaders deliver sorted batches; anything else is
  put in order when the file is closed).  Under DDP every rank writes its own ``.rankR`` files;
  rank 0 then merges them (:func:`merge_rank_files`) into the same files a single process
  writes, and removes them.
* ``predictions/roi_means.csv`` (``--data.predict_images``): one tidy row per image, pair and ROI of
  every atlas: image, category, dataset, subject, atlas, roi, mean (the ROI's mean predicted
  response).
* ``predictions/skipped.txt``: unreadable images left out (``--data.predict_skip_unreadable``).

Every file is written under a temporary name and renamed when complete (``brainenc.ioutil``).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Optional

import h5py
import numpy as np

from brainenc.ioutil import tmp_name

ROI_MEANS = "roi_means.csv"
SKIPPED = "skipped.txt"


class RoiAverager:
    """ROI means of predictions: one (n_voxels, n_rois) averaging matrix per pair.

    ``rois`` : {atlas: RoiAtlas} of a pair (``SubjectInfo.rois``); label 0 (no ROI) is left out.
    """

    def __init__(self, rois: dict):
        self.names: list[tuple[str, str]] = []
        cols = []
        for atlas, a in sorted(rois.items()):
            for value, name in sorted(a.labels.items()):
                mask = np.asarray(a.values) == value
                if value == 0 or not mask.any():
                    continue
                self.names.append((atlas, str(name)))
                cols.append(mask / mask.sum())
        self.matrix = np.stack(cols, axis=1).astype(np.float32) if cols else None

    def means(self, pred: np.ndarray) -> np.ndarray:
        """pred (b, n_voxels) -> (b, n_rois), NaN-free voxels assumed (predictions are finite)."""
        return pred @ self.matrix


class PredictionWriter:
    """Streams predictions of any number of pairs into the files described in the module doc.

    Parameters
    ----------
    out_dir : ``<default_root_dir>/predictions``
    suffix : "" or ".rankR" (one set of files per rank under DDP)
    attrs : written into every .h5 (model name, source)
    rois : {pair: {atlas: RoiAtlas}} to write ``roi_means.csv`` (None = no table)
    """

    def __init__(self, out_dir: str | os.PathLike, suffix: str = "", attrs: Optional[dict] = None,
                 rois: Optional[dict[str, dict]] = None):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.suffix, self.attrs = suffix, dict(attrs or {})
        self.files: dict[str, h5py.File] = {}
        self.skipped: list[tuple[str, str]] = []
        self.n_rows = 0
        self.averagers = {k: RoiAverager(r) for k, r in (rois or {}).items()} if rois is not None else None
        self._csv = self._csv_writer = None
        if self.averagers is not None:
            self._csv = open(tmp_name(self.out_dir / f"roi_means{suffix}.csv"), "w", newline="")
            self._csv_writer = csv.writer(self._csv)
            self._csv_writer.writerow(["image", "category", "dataset", "subject", "atlas", "roi", "mean"])

    def path(self, pair: str) -> Path:
        return self.out_dir / f"{pair.replace('/', '__')}{self.suffix}.h5"

    def _open(self, pair: str, n_voxels: int) -> h5py.File:
        f = h5py.File(tmp_name(self.path(pair)), "w")
        rows = max(1, min(1024, (1 << 20) // (4 * max(n_voxels, 1))))  # ~1 MB chunks of whole rows
        f.create_dataset("pred", (0, n_voxels), maxshape=(None, n_voxels), dtype="float32", chunks=(rows, n_voxels))
        f.create_dataset("stimulus", (0,), maxshape=(None,), dtype="int64", chunks=(4096,))
        for name in ("stimulus_id", "category"):
            f.create_dataset(name, (0,), maxshape=(None,), dtype=h5py.string_dtype(), chunks=(4096,))
        f.attrs["pair"] = pair
        for k, v in self.attrs.items():
            f.attrs[k] = v
        self.files[pair] = f
        return f

    def add(self, pair: str, stimulus: np.ndarray, ids: list[str], pred: np.ndarray,
            categories: Optional[list[str]] = None) -> None:
        """Append rows: stimulus int (b,), ids (b,), pred float32 (b, n_voxels), categories (b,)."""
        pred = np.asarray(pred, dtype=np.float32)
        f = self.files.get(pair) or self._open(pair, pred.shape[1])
        n, b = f["pred"].shape[0], len(pred)
        if b == 0:
            return
        categories = list(categories) if categories is not None else [""] * b
        for name, values in (("pred", pred), ("stimulus", np.asarray(stimulus, np.int64)),
                             ("stimulus_id", list(ids)), ("category", categories)):
            f[name].resize(n + b, axis=0)
            f[name][n:n + b] = values
        self.n_rows += b
        if self.averagers is not None and pair in self.averagers and self.averagers[pair].matrix is not None:
            avg = self.averagers[pair]
            dataset, subject = pair.split("/", 1)
            means = avg.means(pred)
            rows = []
            for i in range(b):
                for j, (atlas, roi) in enumerate(avg.names):
                    rows.append((ids[i], categories[i], dataset, subject, atlas, roi, f"{means[i, j]:.6g}"))
            self._csv_writer.writerows(rows)

    def skip(self, items: list[tuple[str, str]]) -> None:
        self.skipped += list(items)

    def close(self) -> list[Path]:
        """Finish every file (rows in stimulus order) and rename them into place."""
        written = []
        for pair, f in self.files.items():
            stim = f["stimulus"][()]
            f.attrs["n_skipped"] = len(self.skipped)
            if len(stim) > 1 and (np.diff(stim) < 0).any():
                _sort_rows(f, np.argsort(stim, kind="stable"))
            f.close()
            os.replace(tmp_name(self.path(pair)), self.path(pair))
            written.append(self.path(pair))
        self.files = {}
        if self._csv is not None:
            self._csv.close()
            final = self.out_dir / f"roi_means{self.suffix}.csv"
            os.replace(self._csv.name, final)
            written.append(final)
            self._csv = None
        else:  # the table of an earlier prediction would no longer match the files just written
            (self.out_dir / f"roi_means{self.suffix}.csv").unlink(missing_ok=True)
        skipped = self.out_dir / f"skipped{self.suffix}.txt"
        if self.skipped:
            from brainenc.ioutil import atomic_write

            atomic_write(skipped, "".join(f"{i}\t{why}\n" for i, why in self.skipped))
            written.append(skipped)
        elif skipped.exists():
            skipped.unlink()  # from an earlier prediction: nothing was skipped this time
        return written

    def abort(self) -> None:
        """Remove the temporary files (an interrupted prediction leaves the old files in place)."""
        for pair, f in self.files.items():
            f.close()
            tmp_name(self.path(pair)).unlink(missing_ok=True)
        self.files = {}
        if self._csv is not None:
            self._csv.close()
            Path(self._csv.name).unlink(missing_ok=True)
            self._csv = None


def _sort_rows(f: h5py.File, order: np.ndarray, block: int = 4096) -> None:
    """Reorder every row dataset of ``f`` by ``order``, a block of rows at a time."""
    for name in ("pred", "stimulus", "stimulus_id", "category"):
        ds = f[name]
        tmp = f.create_dataset(f"_{name}", ds.shape, dtype=ds.dtype, chunks=ds.chunks)
        for a in range(0, len(order), block):
            idx = order[a:a + block]
            srt = np.argsort(idx)
            rows = ds[np.sort(idx)]  # h5py reads increasing indices
            out = np.empty_like(rows)
            out[srt] = rows
            tmp[a:a + len(idx)] = out
        del f[name]
        f.move(f"_{name}", name)


def merge_rank_files(out_dir: str | os.PathLike, world_size: int, block: int = 4096) -> list[Path]:
    """Merge the ``.rank0`` .. ``.rank{world_size-1}`` files of one DDP prediction into the files a
    single process writes: rows in ``stimulus`` order, each stimulus once (a distributed sampler may
    give a rank a repeated sample to even out the batches), the skipped images and ROI-mean rows of
    every rank.  Streams ``block`` rows at a time (bounded memory at any size); each output is
    written under a temporary name and renamed, then the rank files are removed.

    Returns the files written.
    """
    out_dir = Path(out_dir)
    suffixes = [f".rank{r}" for r in range(world_size)]
    written: list[Path] = []
    pairs = sorted({p.name[: -len(f"{suffixes[0]}.h5")] for p in out_dir.glob(f"*{suffixes[0]}.h5")})
    for stem in pairs:
        parts = [out_dir / f"{stem}{s}.h5" for s in suffixes]
        parts = [p for p in parts if p.exists()]
        final = out_dir / f"{stem}.h5"
        srcs = [h5py.File(p, "r") for p in parts]
        try:
            stim = [f["stimulus"][()] for f in srcs]
            which = np.concatenate([np.full(len(s_), i) for i, s_ in enumerate(stim)]).astype(np.int64)
            local = np.concatenate([np.arange(len(s_)) for s_ in stim]).astype(np.int64)
            allstim = np.concatenate(stim) if stim else np.zeros(0, np.int64)
            order = np.argsort(allstim, kind="stable")
            keep = order[np.r_[True, np.diff(allstim[order]) != 0]] if len(order) else order
            n_vox = srcs[0]["pred"].shape[1]
            with h5py.File(tmp_name(final), "w") as out:
                for k, v in srcs[0].attrs.items():
                    out.attrs[k] = v
                out.attrs["n_skipped"] = int(sum(int(f.attrs.get("n_skipped", 0)) for f in srcs))
                for name in ("pred", "stimulus", "stimulus_id", "category"):
                    ds = srcs[0][name]
                    out.create_dataset(name, (len(keep),) + ds.shape[1:], maxshape=(None,) + ds.shape[1:],
                                       dtype=ds.dtype, chunks=ds.chunks)
                for a in range(0, len(keep), block):
                    rows = keep[a:a + block]
                    for i, f in enumerate(srcs):
                        mine = np.flatnonzero(which[rows] == i)
                        if not len(mine):
                            continue
                        idx = local[rows[mine]]  # increasing: each rank's file is in stimulus order
                        for name in ("pred", "stimulus", "stimulus_id", "category"):
                            out[name][a + mine] = f[name][idx]
            os.replace(tmp_name(final), final)
        finally:
            for f in srcs:
                f.close()
        written.append(final)
        for p in parts:
            p.unlink()
    written += _merge_text(out_dir, "roi_means", ".csv", suffixes, header=True)
    written += _merge_text(out_dir, "skipped", ".txt", suffixes, header=False)
    return written


def _merge_text(out_dir: Path, stem: str, ext: str, suffixes: list[str], header: bool) -> list[Path]:
    """Concatenate the ranks' ``stem.rankR.ext`` files (one header; a line whose first field, the
    image, an earlier rank already wrote is a repeated sample and left out) into ``stem.ext``,
    streamed; remove them.  No rank file: any ``stem.ext`` of an earlier prediction goes too."""
    parts = [out_dir / f"{stem}{s}{ext}" for s in suffixes]
    parts = [p for p in parts if p.exists()]
    final = out_dir / f"{stem}{ext}"
    if not parts:
        final.unlink(missing_ok=True)
        return []
    sep = "," if ext == ".csv" else "\t"
    earlier: set[str] = set()
    with open(tmp_name(final), "w", newline="") as out:
        write = csv.writer(out).writerow if ext == ".csv" else (lambda row: out.write(sep.join(row) + "\n"))
        for i, p in enumerate(parts):
            mine: set[str] = set()
            with open(p, newline="") as f:
                if header:
                    first = f.readline()
                    if i == 0:
                        out.write(first)
                for row in (csv.reader(f, delimiter=sep) if ext == ".csv" else (ln.rstrip("\n").split(sep) for ln in f)):
                    if not row or row[0] in earlier:
                        continue
                    mine.add(row[0])
                    write(row)
            earlier |= mine
    os.replace(tmp_name(final), final)
    for p in parts:
        p.unlink()
    return [final]


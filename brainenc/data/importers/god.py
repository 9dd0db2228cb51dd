"""Generic Object Decoding (Horikawa & Kamitani 2017), 3T, Kamitani lab BData HDF5.

Source layout (see ``data_manifests/god.yaml``), as written by ``bdpy.BData.save``
(KamitaniLab/bdpy, ``bdpy/bdata/bdata.py``)::

    Subject{1..5}.h5     BData: 'dataset' float (n_samples, n_columns) and
                         'metadata/{key,description,value}' with value (n_keys, n_columns);
                         older files name them 'dataSet' / 'metaData'.  ('header' and 'vmap'
                         groups may be present and are not needed.)
    images/training/<wnid>_<num>.JPEG, images/test/<wnid>_<num>.JPEG

Metadata rows used: ``VoxelData`` (1 on voxel columns), ``DataType`` / ``stimulus_id`` / ``Run``
(1 on the column holding that per-sample value), ``voxel_x|y|z`` (mm, on voxel columns) and
``ROI_*`` (1 on the voxel columns of the ROI).  The image label key is ``stimulus_id`` in the
current ``.h5`` release (KamitaniLab/GenericObjectDecoding ``code/python``:
``dat.select('stimulus_id')``) and ``Label`` in older files; both are read.  ``DataType`` is
1 training perception, 2 test perception, 3 imagery; imagery samples (no image) are not imported.
The label encodes the image: ``1518878.005958`` -> ``n01518878_5958``.  Test-perception images
are test.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from brainenc.data.importers.base import Importer, StimulusPlan, SubjectPlan
from brainenc.data.importers.source_files import SourceError

#: metadata keys holding the image label, in the order they are tried (current release first)
LABEL_KEYS = ("stimulus_id", "Label")
from brainenc.data.store import RoiAtlas


def label_to_name(label: float) -> str:
    """GOD stimulus label (float) -> ImageNet file stem, e.g. 1518878.005958 -> 'n01518878_5958'."""
    wnid = int(np.floor(label))
    num = int(round((label - wnid) * 1e6))
    return f"n{wnid:08d}_{num}"


class BData:
    """Minimal reader of a BData HDF5 file: the data matrix plus per-column metadata."""

    def __init__(self, path: Path):
        self.path = path
        try:
            f = h5py.File(path, "r")
        except OSError as e:
            raise SourceError(path, "<file>", "a readable BData HDF5 file", str(e)) from None
        with f:
            dname = "dataset" if "dataset" in f else "dataSet" if "dataSet" in f else None
            mname = "metadata" if "metadata" in f else "metaData" if "metaData" in f else None
            if dname is None or mname is None:
                raise SourceError(path, "dataset/metadata", "BData groups 'dataset' and 'metadata' "
                                  "(or 'dataSet'/'metaData')", str(sorted(f.keys())))
            self.data = np.asarray(f[dname][()], np.float64)
            g = f[mname]
            for k in ("key", "value"):
                if k not in g:
                    raise SourceError(path, f"{mname}/{k}", "present", "missing")
            keys = [k.decode() if isinstance(k, bytes) else str(k) for k in np.asarray(g["key"][()]).ravel()]
            value = np.asarray(g["value"][()], np.float64)
        n_cols = self.data.shape[1] if self.data.ndim == 2 else -1
        # Files written from MATLAB hold both matrices transposed; put columns last again.
        if value.shape[0] != len(keys) and value.shape[1] == len(keys):
            value = value.T
        if self.data.ndim == 2 and value.shape[1] != n_cols and self.data.shape[0] == value.shape[1]:
            self.data = self.data.T
            n_cols = self.data.shape[1]
        if value.shape != (len(keys), n_cols):
            raise SourceError(path, f"{mname}/value", f"({len(keys)} keys, {n_cols} columns of dataset)",
                              str(value.shape))
        self.meta = dict(zip(keys, value))

    def label_key(self) -> str:
        """The metadata key of the per-sample image label (``stimulus_id`` or older ``Label``)."""
        for k in LABEL_KEYS:
            if k in self.meta:
                return k
        raise SourceError(self.path, "metadata/stimulus_id", "a metadata key 'stimulus_id' (or 'Label' in "
                          "older files) flagging the image-label column", "neither present")

    def meta_row(self, key: str) -> np.ndarray:
        if key not in self.meta:
            raise SourceError(self.path, f"metadata/{key}", "a metadata key", "missing")
        return self.meta[key]

    def column(self, key: str) -> np.ndarray:
        """The per-sample values of the column flagged by metadata ``key`` (n_samples,)."""
        cols = np.flatnonzero(self.meta_row(key) == 1)
        if len(cols) != 1:
            raise SourceError(self.path, f"metadata/{key}", "exactly one column flagged 1", str(len(cols)))
        return self.data[:, cols[0]]


class GODImporter(Importer):
    """Import GOD perception samples (training + test perception)."""

    name = "god"
    default_options = {}

    def present(self, subject):
        return self.path("bdata", subject=self.subject_table()[subject]["source"]).exists()

    def check(self, subjects):
        for s in subjects:
            self.need(self.path("bdata", subject=self.subject_table()[s]["source"]), f"BData file of {s}")
        atlas = str(self.roi).partition(":")[0]
        if self.roi not in ("all", "any") and atlas not in self.manifest["roi_atlases"]:
            raise SourceError(self.manifest["_path"], "roi",
                              f"'all', 'any' or one of {sorted(self.manifest['roi_atlases'])}", str(self.roi))

    def bdata(self, subject: str) -> BData:
        cache = self.__dict__.setdefault("_bdata", {})
        if subject not in cache:
            cache.clear()  # one subject in memory at a time
            cache[subject] = BData(self.path("bdata", subject=self.subject_table()[subject]["source"]))
        return cache[subject]

    def _index(self) -> dict[str, Path]:
        if not hasattr(self, "_img_index"):
            d = self.need(self.path("images"), "the GOD stimulus image folder")
            self._img_index = {p.stem: p for p in sorted(d.rglob("*")) if p.is_file()}
        return self._img_index

    def _samples(self, subject):
        b = self.bdata(subject)
        dtype = b.column("DataType")
        keep = np.isin(dtype, [1, 2])
        key = b.label_key()
        labels = b.column(key)[keep]
        if not np.isfinite(labels).all():
            raise SourceError(b.path, f"metadata/{key}", "an image label on every perception sample",
                              f"{int((~np.isfinite(labels)).sum())} NaN")
        return b, keep, dtype[keep], [label_to_name(x) for x in labels]

    def plan_stimuli(self, subjects):
        index = self._index()
        names, test = set(), set()
        for s in subjects:
            _, _, dtype, labels = self._samples(s)
            names.update(labels)
            test.update(n for n, d in zip(labels, dtype) if d == 2)
        report = {}
        ids, split, load = self.image_stimuli(index, names, test, self.path("images"), "stimulus_id", report)
        return StimulusPlan(ids=[f"god-{n}" for n in ids], split=split, load=load,
                            sources=[index[n] for n in ids], report=report)

    def plan_subject(self, subject, stimuli):
        b, keep0, dtype, labels = self._samples(subject)
        report = {}
        rows, shown = self.trial_rows(stimuli, [f"god-{n}" for n in labels], report)
        keep = keep0.copy()
        keep[np.flatnonzero(keep0)[~shown]] = False  # samples whose image is missing (allowed)
        vox = np.flatnonzero(b.meta_row("VoxelData") == 1)
        if len(vox) == 0:
            raise SourceError(b.path, "metadata/VoxelData", "voxel columns flagged 1", "none")
        coords = np.stack([b.meta_row(k)[vox] for k in ("voxel_x", "voxel_y", "voxel_z")], axis=1)
        full = {}
        absent = [f"ROI_{a}" for a in self.manifest["roi_atlases"] if f"ROI_{a}" not in b.meta]
        self.missing("rois", b.path, "a metadata row ROI_<name> for every ROI of the source manifest", absent,
                     report, "missing_roi_masks")
        for atlas in self.manifest["roi_atlases"]:
            key = f"ROI_{atlas}"
            if key in b.meta:
                full[atlas] = RoiAtlas((np.nan_to_num(b.meta[key][vox]) == 1).astype(np.int16), {1: atlas})
        sel = np.ones(len(vox), bool) if self.roi == "all" else self.parse_roi(full, b.path)
        if not sel.any():
            raise SourceError(b.path, "roi", f"voxels selected by '{self.roi}'", "none")
        cols = vox[sel]
        # GOD numbers runs (``Run``); some BData files also carry ``Session``.  A trial's store
        # session is the real session when the file has one, else its run (recorded in the
        # attrs), and the dry run reports each under its own name.
        run = b.column("Run")[keep].astype(np.int32) if "Run" in b.meta else None
        session = b.column("Session")[keep].astype(np.int32) if "Session" in b.meta else None
        data = b.data[keep][:, cols].astype(np.float32)
        src = self.subject_table()[subject]["source"]
        trial_session = session if session is not None else run
        session_is = "session" if session is not None else "run" if run is not None else "none"

        def write(w):
            w.write_trials(data, rows, trial_session)

        return SubjectPlan(subject=subject, source_subject=src, n_trials=len(rows),
                           coords=coords[sel].astype(np.float32), space=f"god {src} native (mm)",
                           units="BOLD (preprocessed, per-sample block average, as distributed)",
                           rois={a: RoiAtlas(r.values[sel], r.labels) for a, r in full.items()}, ncsnr=None,
                           sources=[b.path], write=write, attrs={"trial_session_is": session_is},
                           sessions=None if session is None else sorted(set(session.tolist())),
                           runs=None if run is None else sorted(set(run.tolist())),
                           inventory={"roi_rows": sorted(f"ROI_{a}" for a in full)}, report=report)

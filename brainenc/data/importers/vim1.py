"""vim-1 (Kay, Naselaris, Prenger & Gallant 2008), 4T, natural images, CRCNS.

Source layout (see ``data_manifests/vim-1.yaml``)::

    EstimatedResponses.mat   MATLAB v7.3 (HDF5): dataTrnS1 (n_voxels, 1750), dataValS1 (n_voxels, 120),
                             roiS1 (n_voxels, 1), voxIdxS1 (n_voxels, 1) and the same for S2.
                             h5py returns every array transposed (column-major storage); read_mat
                             transposes back to MATLAB's shapes.  Responses are averaged over
                             repeats (2 for training, 13 for validation) and contain NaNs.
    Stimuli.mat              stimTrn (1750, 128, 128), stimVal (120, 128, 128), greyscale

Voxel coordinates: voxIdx is a 1-based column-major linear index into the 64 x 64 x 18 functional
volume (2 x 2 x 2.5 mm voxels).  Validation images are test.  Voxels without a finite response
(by default: any NaN) are dropped, because downstream metrics cannot use them.
"""

from __future__ import annotations

import numpy as np

from brainenc.data.importers.base import Importer, StimulusPlan, SubjectPlan
from brainenc.data.importers.source_files import SourceError, read_mat
from brainenc.data.store import SPLIT_TEST, SPLIT_TRAIN, RoiAtlas


def stim_to_uint8(x: np.ndarray) -> np.ndarray:
    """vim-1 greyscale stimuli -> uint8.  Values centred on 0 (roughly -0.5..0.5) are shifted by
    0.5; values in [0, 1] are scaled by 255; anything else is clipped to 0..255."""
    x = np.asarray(x, np.float64)
    if x.min() < 0 and x.min() >= -0.5 - 1e-6 and x.max() <= 0.5 + 1e-6:
        x = x + 0.5
    if x.max() <= 1.0 + 1e-6:
        x = x * 255.0
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


class Vim1Importer(Importer):
    """Import vim-1 estimated responses.

    Options
    -------
    drop_nan : 'any' (default) drops voxels with any NaN, 'all' only voxels that are all NaN
    """

    name = "vim-1"
    default_options = {"drop_nan": "any"}

    def src(self, subject):
        return self.subject_table()[subject]["source"]

    def present(self, subject):
        return self.path("responses").exists()

    def check(self, subjects):
        self.need(self.path("responses"), "vim-1 EstimatedResponses.mat")
        self.need(self.path("stimuli"), "vim-1 Stimuli.mat")
        if self.options["drop_nan"] not in ("any", "all"):
            raise SourceError(self.manifest["_path"], "options/drop_nan", "'any' or 'all'",
                              str(self.options["drop_nan"]))
        atlas = str(self.roi).partition(":")[0]
        if self.roi not in ("all", "any") and atlas != "vim1-rois":
            raise SourceError(self.manifest["_path"], "roi", "'all', 'any' or 'vim1-rois[:NAMES]'", str(self.roi))

    def plan_stimuli(self, subjects):
        p = self.path("stimuli")
        m = read_mat(p, ["stimTrn", "stimVal"])
        trn, val = m["stimTrn"], m["stimVal"]
        for name, a, n in (("stimTrn", trn, 1750), ("stimVal", val, 120)):
            if a.ndim != 3 or a.shape[1:] != (128, 128):
                raise SourceError(p, name, f"({n}, 128, 128) greyscale images", str(a.shape))
        images = np.concatenate([trn, val])
        ids = [f"vim1-trn-{i:04d}" for i in range(len(trn))] + [f"vim1-val-{i:03d}" for i in range(len(val))]
        split = np.array([SPLIT_TRAIN] * len(trn) + [SPLIT_TEST] * len(val), np.uint8)
        # The whole set is one global range: convert all images with the same rule.
        u8 = stim_to_uint8(images)

        def load(rows):
            for r in rows:
                yield u8[r]

        self._n_trn, self._n_val = len(trn), len(val)
        return StimulusPlan(ids=ids, split=split, load=load, sources=[p])

    def plan_subject(self, subject, stimuli):
        src = self.src(subject)
        p = self.path("responses")
        names = [f"dataTrn{src}", f"dataVal{src}", f"roi{src}", f"voxIdx{src}"]
        m = read_mat(p, names)
        trn, val = m[names[0]].astype(np.float32), m[names[1]].astype(np.float32)
        roi, idx = m[names[2]].ravel().astype(np.int16), m[names[3]].ravel().astype(np.int64)
        n_vox = len(roi)
        n_trn, n_val = self._n_trn, self._n_val
        if trn.shape != (n_vox, n_trn):
            raise SourceError(p, names[0], f"({n_vox} voxels, {n_trn} images) in MATLAB order", str(trn.shape))
        if val.shape != (n_vox, n_val):
            raise SourceError(p, names[1], f"({n_vox} voxels, {n_val} images) in MATLAB order", str(val.shape))
        if idx.shape != (n_vox,):
            raise SourceError(p, names[3], f"({n_vox}, 1)", str(idx.shape))
        grid = tuple(self.manifest["grid"])
        if idx.min() < 1 or idx.max() > np.prod(grid):
            raise SourceError(p, names[3], f"1-based indices into a {grid} volume", f"{idx.min()}..{idx.max()}")
        resp = np.concatenate([trn, val], axis=1).T  # (n_images, n_voxels)
        finite = np.isfinite(resp)
        ok = finite.all(0) if self.options["drop_nan"] == "any" else finite.any(0)
        labels = {int(k): str(v) for k, v in self.manifest["roi_labels"].items()}
        full = {"vim1-rois": RoiAtlas(roi, labels)}
        sel = ok & (np.ones(n_vox, bool) if self.roi == "all" else self.parse_roi(full, p))
        if not sel.any():
            raise SourceError(p, names[0], f"voxels with finite responses selected by '{self.roi}'", "none")
        ijk = np.stack(np.unravel_index(idx[sel] - 1, grid, order="F"), axis=1)
        coords = (ijk * np.asarray(self.manifest["voxel_mm"], np.float64)).astype(np.float32)
        rows = np.arange(n_trn + n_val, dtype=np.int64)  # stimuli rows: training then validation
        data = resp[:, sel]

        def write(w):
            w.write_group("voxels", {"ijk": ijk.astype(np.int32), "source_index": np.flatnonzero(sel)})
            w.write_trials(data, rows)

        return SubjectPlan(subject=subject, source_subject=src, n_trials=len(rows), coords=coords,
                           space=f"vim-1 {src} functional grid {grid} (voxel index x {self.manifest['voxel_mm']} mm)",
                           units="z-scored response amplitude averaged over repeats", rois={"vim1-rois":
                           RoiAtlas(roi[sel], labels)}, ncsnr=None, sources=[p, self.path("stimuli")],
                           write=write, attrs={"n_dropped_nan_voxels": int((~ok).sum())})

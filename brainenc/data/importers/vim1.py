"""vim-1 (Kay, Naselaris, Prenger & Gallant 2008), 4T, natural images, CRCNS.

Source layout (see ``data_manifests/vim-1.yaml``; checked against the CRCNS vim-1 readme's
example code as used in lp3wv/crcns-vim1-lp3wv ``data/README.md``: ``tables.open_file`` for the
responses, ``scipy.io.loadmat`` for the stimuli)::

    EstimatedResponses.mat   MATLAB v7.3 (HDF5): dataTrnS1 (n_voxels, 1750), dataValS1 (n_voxels, 120),
                             roiS1 (n_voxels, 1), voxIdxS1 (n_voxels, 1) and the same for S2.
                             h5py returns every array transposed (column-major storage); read_mat
                             transposes back to MATLAB's shapes.  Responses are averaged over
                             repeats (2 for training, 13 for validation) and contain NaNs.
    Stimuli.mat              MATLAB v5 (read by scipy): stimTrn (1750, 128, 128), stimVal (120, 128, 128),
                             greyscale, centred on 0 (nominally -0.5..0.5)

Voxel coordinates: voxIdx is a 1-based column-major linear index into the 64 x 64 x 18 functional
volume (2 x 2 x 2.5 mm voxels).  Validation images are test.  Voxels with NaN responses are
handled by ``nan_voxels`` (default: dropped, counted and recorded).  Stimulus values are never
clipped silently: see :func:`stim_to_uint8`.
"""

from __future__ import annotations

import numpy as np

from brainenc.data.importers.base import Importer, StimulusPlan, SubjectPlan
from brainenc.data.importers.source_files import SourceError, nan_voxel_policy, read_mat
from brainenc.data.store import SPLIT_TEST, SPLIT_TRAIN, RoiAtlas

_TOL = 1e-6


def stim_to_uint8(x: np.ndarray, scale: str = "auto", path="Stimuli.mat", field: str = "stimTrn/stimVal"):
    """vim-1 greyscale stimuli -> uint8, one rule for the whole set.

    scale : 'auto' maps a range inside [-0.5, 0.5] by +0.5 then x255, inside [0, 1] by x255 and
            inside [0, 255] as is; any other range is an error naming it.  'minmax' rescales the
            set's own min..max linearly to 0..255 (no value is lost); 'clip' clips to
            [-0.5, 0.5] first (values outside are saturated, as the user asked).
    Returns (uint8 array, {"range": [min, max], "rule": ...}).
    """
    x = np.asarray(x, np.float64)
    lo, hi = float(np.nanmin(x)), float(np.nanmax(x))
    info = {"stimulus_value_range": [round(lo, 6), round(hi, 6)]}
    if not np.isfinite(x).all():
        raise SourceError(path, field, "finite stimulus values", f"{int((~np.isfinite(x)).sum())} NaN/inf")
    if scale == "minmax":
        y, rule = (x - lo) / max(hi - lo, 1e-12) * 255.0, "minmax: (x - min) / (max - min) x 255"
    elif scale == "clip":
        y, rule = (np.clip(x, -0.5, 0.5) + 0.5) * 255.0, "clip to [-0.5, 0.5], + 0.5, x 255"
        info["stimulus_values_clipped"] = int(((x < -0.5) | (x > 0.5)).sum())
    elif scale != "auto":
        raise SourceError(path, "options/stim_scale", "'auto', 'minmax' or 'clip'", str(scale))
    elif lo >= -0.5 - _TOL and hi <= 0.5 + _TOL and lo < 0:
        y, rule = (x + 0.5) * 255.0, "+ 0.5, x 255"
    elif lo >= -_TOL and hi <= 1.0 + _TOL:
        y, rule = x * 255.0, "x 255"
    elif lo >= -_TOL and hi <= 255.0 + _TOL:
        y, rule = x, "as is (0..255)"
    else:
        raise SourceError(path, field, "values within [-0.5, 0.5], [0, 1] or [0, 255] (or choose "
                          "-o stim_scale=minmax to rescale, -o stim_scale=clip to clip)", f"range {lo:.4g}..{hi:.4g}")
    info["stimulus_scaling"] = rule
    return np.clip(np.round(y), 0, 255).astype(np.uint8), info  # clip only absorbs rounding (<= 1e-6)


class Vim1Importer(Importer):
    """Import vim-1 estimated responses.

    Options
    -------
    nan_voxels : 'drop' (default) leaves out voxels with any NaN response, 'keep' keeps them (NaN =
                 missing) and leaves out only voxels with no finite response, 'error' refuses NaN
    stim_scale : 'auto' (default), 'minmax' or 'clip': how Stimuli.mat values become uint8
                 (see :func:`stim_to_uint8`; a range 'auto' does not know is an error)
    """

    name = "vim-1"
    default_options = {"nan_voxels": "drop", "stim_scale": "auto"}

    def src(self, subject):
        return self.subject_table()[subject]["source"]

    def present(self, subject):
        return self.path("responses").exists()

    def check(self, subjects):
        self.need(self.path("responses"), "vim-1 EstimatedResponses.mat")
        self.need(self.path("stimuli"), "vim-1 Stimuli.mat")
        if self.options["nan_voxels"] not in ("drop", "keep", "error"):
            raise SourceError(self.manifest["_path"], "options/nan_voxels", "'drop', 'keep' or 'error'",
                              str(self.options["nan_voxels"]))
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
        u8, info = stim_to_uint8(images, self.options["stim_scale"], p, "stimTrn/stimVal")

        def load(rows):
            for r in rows:
                yield u8[r]

        self._n_trn, self._n_val = len(trn), len(val)
        report = {k: v for k, v in info.items() if k == "stimulus_values_clipped" and v}
        return StimulusPlan(ids=ids, split=split, load=load, sources=[p], report=report)

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
        labels = {int(k): str(v) for k, v in self.manifest["roi_labels"].items()}
        full = {"vim1-rois": RoiAtlas(roi, labels)}
        cand = np.ones(n_vox, bool) if self.roi == "all" else self.parse_roi(full, p)
        report = {}
        # NaN voxels are counted among the selected voxels, so the report says what the selection lost
        ok = np.zeros(n_vox, bool)
        ok[cand] = nan_voxel_policy(np.isfinite(resp[:, cand]).sum(0), resp.shape[0], self.options["nan_voxels"],
                                    p, names[0], report, RoiAtlas(roi[cand], labels))
        sel = ok & cand
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
                           write=write, attrs={"n_dropped_nan_voxels": int(report.get("nan_voxels_dropped", 0))},
                           report=report)

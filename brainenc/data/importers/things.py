"""THINGS-fMRI (Hebart et al. 2023), 3T, single-trial responses in table format (``betas_csv``).

Source layout (see ``data_manifests/things-fmri.yaml``)::

    betas_csv/sub-0X_ResponseData.h5       pandas HDF5 ("fixed" format): rows = voxels, columns =
                                           'voxel_id' then one column per trial
    betas_csv/sub-0X_VoxelMetadata.csv     voxel_id, voxel_x|y|z (voxel indices), ROI columns (0/1)
    betas_csv/sub-0X_StimulusMetadata.csv  one row per trial, in the order of the trial columns:
                                           trial_type (train/test/catch), session, run, stimulus, concept
    images/<concept>/<stimulus>            THINGS object images

The pandas file is read with h5py (PyTables is not needed): a "fixed" frame stores its column
labels in ``axis0``, its index in ``axis1`` and each dtype block in ``blockN_items`` /
``blockN_values``.  Catch trials are not imported; ``test`` images (repeated 12 times) are test.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from brainenc.data.importers.base import Importer, StimulusPlan, SubjectPlan
from brainenc.data.importers.source_files import SourceError, image_folder_stimuli, iter_blocks
from brainenc.data.store import RoiAtlas


def _labels(ds) -> list:
    return [x.decode() if isinstance(x, bytes) else x.item() if hasattr(x, "item") else x for x in ds[()]]


class PandasFixedFrame:
    """Column-block access to a pandas ``to_hdf(format='fixed')`` DataFrame without PyTables."""

    def __init__(self, path: Path, key: str | None = None):
        self.path = path
        try:
            self.f = h5py.File(path, "r")
        except OSError as e:
            raise SourceError(path, "<file>", "a readable pandas HDF5 file", str(e)) from None
        frames = [k for k in self.f if isinstance(self.f[k], h5py.Group)
                  and self.f[k].attrs.get("pandas_type", b"") in (b"frame", "frame")]
        if key is None and frames:
            key = frames[0]
        if key not in self.f or "block0_values" not in self.f[key]:
            self.f.close()
            raise SourceError(path, key or "<frame>", "a pandas DataFrame in 'fixed' format "
                              "(axis0, axis1, blockN_items, blockN_values)", str(frames))
        g = self.f[key]
        self.columns = _labels(g["axis0"])
        self.n_rows = len(g["axis1"])
        self.blocks = []  # (items, dataset, transposed)
        i = 0
        while f"block{i}_values" in g:
            ds = g[f"block{i}_values"]
            items = _labels(g[f"block{i}_items"])
            transposed = bool(ds.attrs.get("transposed", ds.shape == (self.n_rows, len(items))))
            self.blocks.append((items, ds, transposed))
            i += 1

    def block_of(self, column) -> tuple[int, int]:
        for b, (items, _, _) in enumerate(self.blocks):
            if column in items:
                return b, items.index(column)
        raise SourceError(self.path, f"column {column!r}", "a column of the DataFrame", "missing")

    def read_columns(self, block: int, start: int, stop: int) -> np.ndarray:
        """Columns ``start:stop`` of dtype block ``block``: (n_rows, stop - start)."""
        _, ds, transposed = self.blocks[block]
        return ds[:, start:stop] if transposed else ds[start:stop, :].T

    def close(self):
        self.f.close()


class ThingsFmriImporter(Importer):
    """Import THINGS-fMRI single-trial responses.

    Options
    -------
    voxel_mm : edge of the functional voxels (2.0); coordinates are voxel indices x voxel_mm, in
               the subject's functional grid (the table format carries no affine)
    block_trials : trial columns read at a time (bounded memory)
    """

    name = "things-fmri"
    default_options = {"voxel_mm": 2.0, "block_trials": 64}

    def src(self, subject):
        return self.subject_table()[subject]["source"]

    def present(self, subject):
        return self.path("responses", subject=self.src(subject)).exists()

    def check(self, subjects):
        for s in subjects:
            for key in ("responses", "voxels", "stimulus_table"):
                self.need(self.path(key, subject=self.src(s)), f"THINGS-fMRI {key} file of {self.src(s)}")
        atlas = str(self.roi).partition(":")[0]
        if self.roi not in ("all", "any") and atlas not in self.manifest["roi_atlases"]:
            raise SourceError(self.manifest["_path"], "roi",
                              f"'all', 'any' or one of {sorted(self.manifest['roi_atlases'])}", str(self.roi))

    def trials(self, subject):
        import pandas as pd

        p = self.path("stimulus_table", subject=self.src(subject))
        df = pd.read_csv(p)
        for col in ("trial_type", "stimulus"):
            if col not in df.columns:
                raise SourceError(p, col, "a column of the stimulus metadata", "missing")
        return df

    def _index(self):
        if not hasattr(self, "_img_index"):
            d = self.need(self.path("images"), "the THINGS image folder")
            self._img_index = {p.name: p for p in sorted(d.rglob("*")) if p.is_file()}
        return self._img_index

    def plan_stimuli(self, subjects):
        index = self._index()
        names, test = set(), set()
        for s in subjects:
            df = self.trials(s)
            df = df[df.trial_type != "catch"]
            names.update(df.stimulus)
            test.update(df.stimulus[df.trial_type == "test"])
        ids, split, load = image_folder_stimuli(index, names, test, self.image_size, self.path("images"),
                                                "stimulus")

        return StimulusPlan(ids=[f"things-{Path(n).stem}" for n in ids], split=split, load=load,
                            sources=[index[n] for n in ids])

    def plan_subject(self, subject, stimuli):
        import pandas as pd

        src = self.src(subject)
        vpath, rpath = self.path("voxels", subject=src), self.path("responses", subject=src)
        vox = pd.read_csv(vpath)
        for col in ("voxel_x", "voxel_y", "voxel_z"):
            if col not in vox.columns:
                raise SourceError(vpath, col, "a column of the voxel metadata", "missing")
        full = {}
        for atlas, spec in self.manifest["roi_atlases"].items():
            values = np.zeros(len(vox), np.int16)
            labels = {}
            for value, (name, columns) in enumerate(spec["labels"].items(), start=1):
                present = [c for c in columns if c in vox.columns]
                if not present:
                    continue
                hit = (vox[present].fillna(0).to_numpy() > 0).any(axis=1)
                values[hit & (values == 0)] = value  # first label wins where ROIs overlap
                labels[value] = name
            if labels:
                full[atlas] = RoiAtlas(values, labels)
        sel = np.ones(len(vox), bool) if self.roi == "all" else self.parse_roi(full, vpath)
        if not sel.any():
            raise SourceError(vpath, "roi", f"voxels selected by '{self.roi}'", "none")
        ijk = vox[["voxel_x", "voxel_y", "voxel_z"]].to_numpy(np.float64)[sel]
        coords = (ijk * float(self.options["voxel_mm"])).astype(np.float32)

        df = self.trials(subject)
        frame = PandasFixedFrame(rpath)
        try:
            if frame.n_rows != len(vox):
                raise SourceError(rpath, "axis1", f"{len(vox)} voxel rows like {vpath.name}", str(frame.n_rows))
            # Trial columns: every column but voxel_id, in order; they follow the stimulus table rows.
            trial_cols = [c for c in frame.columns if c != "voxel_id"]
            if len(trial_cols) != len(df):
                raise SourceError(rpath, "axis0", f"{len(df)} trial columns (rows of the stimulus table)",
                                  str(len(trial_cols)))
            locs = [frame.block_of(c) for c in trial_cols]
        finally:
            frame.close()
        keep = np.flatnonzero(df.trial_type.to_numpy() != "catch")
        rows = np.array([stimuli.row[f"things-{Path(n).stem}"] for n in df.stimulus.to_numpy()[keep]], np.int64)
        session = df["session"].to_numpy(np.int32)[keep] if "session" in df.columns else None
        bt = int(self.options["block_trials"])

        def write(w):
            fr = PandasFixedFrame(rpath)
            try:
                for sl in iter_blocks(len(keep), bt):
                    want = [locs[t] for t in keep[sl]]
                    out = np.empty((len(want), int(sel.sum())), np.float32)
                    # read contiguous runs of item positions within one block at a time
                    b0 = {b for b, _ in want}
                    for b in b0:
                        pos = np.array([p for bb, p in want if bb == b])
                        where = np.array([i for i, (bb, _) in enumerate(want) if bb == b])
                        lo, hi = int(pos.min()), int(pos.max()) + 1
                        cols = fr.read_columns(b, lo, hi)  # (n_voxels_all, hi - lo)
                        out[where] = cols[sel][:, pos - lo].T
                    w.write_trials(out, rows[sl], None if session is None else session[sl])
            finally:
                fr.close()

        return SubjectPlan(subject=subject, source_subject=src, n_trials=len(keep), coords=coords,
                           space=f"things {src} functional grid (voxel index x {self.options['voxel_mm']} mm)",
                           units="single-trial betas as distributed", rois={a: RoiAtlas(r.values[sel], r.labels)
                                                                            for a, r in full.items()},
                           ncsnr=None, sources=[rpath, vpath, self.path("stimulus_table", subject=src)],
                           write=write, attrs={"voxel_ijk_from": "VoxelMetadata voxel_x/y/z"})

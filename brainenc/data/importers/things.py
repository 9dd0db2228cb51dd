"""THINGS-fMRI (Hebart et al. 2023), 3T, single-trial responses in table format (``betas_csv``).

Source layout (see ``data_manifests/things-fmri.yaml``), as the authors' loader reads it
(ViCCo-Group/THINGS-data, ``MRI/thingsmri/dataset.py`` ``ThingsmriLoader.load_responses`` and
``MRI/notebooks/fmri_usage.ipynb``)::

    betas_csv/sub-0X_ResponseData.h5       pandas ``to_hdf`` frame, "fixed" format, key
                                           'ResponseData': rows = voxels, columns = 'voxel_id'
                                           then the **integer** trial numbers 0..n_trials-1
    betas_csv/sub-0X_VoxelMetadata.csv     voxel_id, subject_id, voxel_x|y|z (voxel indices),
                                           reliability and pRF columns, ROI columns (0/1)
    betas_csv/sub-0X_StimulusMetadata.csv  one row per trial, row t = trial column t:
                                           trial_type (train/test), session, run, subject_id,
                                           trial_id, stimulus, concept
    images/<concept>/<stimulus>            THINGS object images

Reading the frame without pandas, PyTables or pickle: a "fixed" frame is an HDF5 group with
``axis0`` (column labels), ``axis1`` (row index) and, per dtype block, ``blockN_items`` (the block's
column labels) and ``blockN_values`` (its values).  With mixed labels ('voxel_id' and integers)
pandas stores ``axis0`` and the trial block's ``blockN_items`` as *pickled* object arrays; those
are never read.  The importer reads the values of the float block and the ``voxel_id`` column
from the integer block (whose items are plain strings); the trial order is the row order of
``StimulusMetadata.csv`` (pandas writes a block's columns in frame order).  Readable block labels
(all-integer or string labels) are checked against that order.  Catch trials, if a table has
any, are dropped and counted; ``test`` images (repeated 12 times) are test.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from brainenc.data.importers.base import Importer, StimulusPlan, SubjectPlan
from brainenc.data.importers.source_files import SourceError, iter_blocks
from brainenc.data.store import RoiAtlas

FRAME_KEY = "ResponseData"


def _plain_labels(ds) -> list | None:
    """Labels of a non-pickled items/axis dataset (strings or numbers); None if pickled/object."""
    if ds.dtype.kind not in "SUiuf" or ds.ndim != 1:
        return None  # PyTables VLArray of pickles (object labels): never unpickled
    return [x.decode() if isinstance(x, bytes) else x.item() for x in ds[()]]


class PandasFixedFrame:
    """The blocks of a pandas ``to_hdf(format='fixed')`` DataFrame, read with h5py only.

    blocks : list of (labels or None if pickled, dataset, transposed); a transposed dataset is
             (n_rows, n_items), otherwise (n_items, n_rows).
    """

    def __init__(self, path: Path, key: str = FRAME_KEY):
        self.path = path
        try:
            self.f = h5py.File(path, "r")
        except OSError as e:
            raise SourceError(path, "<file>", "a readable pandas HDF5 file", str(e)) from None
        try:
            self._open(key)
        except SourceError:
            self.f.close()
            raise

    def _open(self, key: str) -> None:
        f, path = self.f, self.path
        frames = [k for k in f if isinstance(f[k], h5py.Group)]
        if key not in f:
            if len(frames) != 1:
                raise SourceError(path, key, "the pandas frame 'ResponseData'", f"groups {frames}")
            key = frames[0]
        g = f[key]
        self.key = key
        kind = g.attrs.get("pandas_type", b"")
        kind = kind.decode() if isinstance(kind, bytes) else str(kind)
        if kind != "frame":
            what = ("a frame in 'table' format; re-save it with to_hdf(..., format='fixed')"
                    if kind.endswith("table") else repr(kind) or "no pandas_type attribute")
            raise SourceError(path, f"{key}/pandas_type", "'frame' (pandas fixed format)", what)
        nblocks = int(g.attrs.get("nblocks", 0))
        if nblocks < 1 or any(f"block{i}_values" not in g or f"block{i}_items" not in g for i in range(nblocks)):
            raise SourceError(path, f"{key}/block0_values", f"{nblocks or 'nblocks'} value/item datasets "
                              "(pandas fixed format)", str(sorted(g.keys())))
        self.n_rows = int(g["axis1"].shape[0]) if "axis1" in g else None
        self.blocks = []
        for i in range(nblocks):
            ds = g[f"block{i}_values"]
            if ds.ndim != 2:
                raise SourceError(path, f"{key}/block{i}_values", "a 2-D block", str(ds.shape))
            transposed = bool(ds.attrs.get("transposed", 1))
            n_rows = ds.shape[0] if transposed else ds.shape[1]
            if self.n_rows is None:
                self.n_rows = n_rows
            if n_rows != self.n_rows:
                raise SourceError(path, f"{key}/block{i}_values", f"{self.n_rows} rows like axis1", str(n_rows))
            self.blocks.append((_plain_labels(g[f"block{i}_items"]), ds, transposed))

    def n_items(self, block: int) -> int:
        _, ds, transposed = self.blocks[block]
        return ds.shape[1] if transposed else ds.shape[0]

    def column(self, name: str) -> np.ndarray:
        """A column stored in a block with plain (non-pickled) labels, e.g. 'voxel_id': (n_rows,)."""
        for b, (labels, _, _) in enumerate(self.blocks):
            if labels is not None and name in labels:
                return self.read_columns(b, labels.index(name), labels.index(name) + 1)[:, 0]
        raise SourceError(self.path, f"{self.key}/blockN_items", f"a column '{name}' in a block with "
                          "plain labels", "not found")

    def value_block(self, exclude: str) -> int:
        """The one floating-point block (the trial columns); the block holding ``exclude`` is not it."""
        cands = [b for b, (labels, ds, _) in enumerate(self.blocks)
                 if ds.dtype.kind == "f" and not (labels is not None and exclude in labels)]
        if len(cands) != 1:
            kinds = [f"block{b}: {ds.dtype}" for b, (_, ds, _) in enumerate(self.blocks)]
            raise SourceError(self.path, f"{self.key}/blockN_values", "exactly one float block of trial "
                              "columns (voxel_id in an integer block)", ", ".join(kinds))
        return cands[0]

    def read_columns(self, block: int, start: int, stop: int) -> np.ndarray:
        """Columns ``start:stop`` of dtype block ``block``: (n_rows, stop - start)."""
        _, ds, transposed = self.blocks[block]
        try:
            return ds[:, start:stop] if transposed else ds[start:stop, :].T
        except OSError as e:  # e.g. a compression filter h5py lacks, or a truncated download
            raise SourceError(self.path, ds.name.lstrip("/"), "readable values", str(e).splitlines()[0]) from None

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

    @staticmethod
    def _csv(path: Path, columns: tuple):
        """Read a metadata CSV; every problem is a one-line SourceError naming file and column."""
        import pandas as pd

        try:
            df = pd.read_csv(path)
        except (ValueError, OSError, pd.errors.ParserError) as e:
            raise SourceError(path, "<file>", "a readable CSV table", str(e).splitlines()[0]) from None
        for col in columns:
            if col not in df.columns:
                raise SourceError(path, col, "a column of this table", f"missing (columns: {list(df.columns)[:8]})")
        return df

    def trials(self, subject):
        """StimulusMetadata rows (one per trial column, in order)."""
        return self._csv(self.path("stimulus_table", subject=self.src(subject)), ("trial_type", "stimulus"))

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
        report = {}
        ids, split, load = self.image_stimuli(index, names, test, self.path("images"), "stimulus", report)
        return StimulusPlan(ids=[f"things-{Path(n).stem}" for n in ids], split=split, load=load,
                            sources=[index[n] for n in ids], report=report)

    def plan_subject(self, subject, stimuli):
        src = self.src(subject)
        vpath, rpath = self.path("voxels", subject=src), self.path("responses", subject=src)
        vox = self._csv(vpath, ("voxel_id", "voxel_x", "voxel_y", "voxel_z"))
        report = {}
        full = {}
        absent = sorted({c for spec in self.manifest["roi_atlases"].values() for cols in spec["labels"].values()
                         for c in cols if c not in vox.columns})
        self.missing("rois", vpath, "an ROI column for every ROI of the source manifest", absent, report,
                     "missing_roi_masks")
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
            voxel_id = frame.column("voxel_id")
            want_ids = vox["voxel_id"].to_numpy()
            if frame.n_rows != len(vox) or not np.array_equal(voxel_id, want_ids):
                raise SourceError(rpath, "voxel_id", f"the {len(vox)} voxel_id values of {vpath.name}, in order",
                                  f"{frame.n_rows} rows" + ("" if frame.n_rows != len(vox) else ", in another order"))
            vb = frame.value_block(exclude="voxel_id")
            labels = frame.blocks[vb][0]
            n_cols = frame.n_items(vb)
            if n_cols != len(df):
                raise SourceError(rpath, f"{frame.key}/block{vb}_values",
                                  f"{len(df)} trial columns (rows of {self.path('stimulus_table', subject=src).name})",
                                  str(n_cols))
            if labels is not None and [str(x) for x in labels] != [str(t) for t in range(n_cols)]:
                raise SourceError(rpath, f"{frame.key}/block{vb}_items", "trial columns 0..n-1 in order",
                                  f"{labels[:5]}...")
        finally:
            frame.close()
        trial_type = df.trial_type.to_numpy()
        keep = np.flatnonzero(trial_type != "catch")
        if len(keep) < len(df):
            report["catch_trials_dropped"] = int(len(df) - len(keep))
        rows, shown = self.trial_rows(stimuli, [f"things-{Path(n).stem}" for n in df.stimulus.to_numpy()[keep]],
                                      report)
        keep = keep[shown]
        session = df["session"].to_numpy(np.int32)[keep] if "session" in df.columns else None
        bt = int(self.options["block_trials"])

        def write(w):
            fr = PandasFixedFrame(rpath)
            try:
                for sl in iter_blocks(len(keep), bt):
                    cols = keep[sl]
                    lo, hi = int(cols.min()), int(cols.max()) + 1  # one contiguous read per block of trials
                    block = fr.read_columns(vb, lo, hi)  # (n_voxels_all, hi - lo)
                    w.write_trials(block[sel][:, cols - lo].T.astype(np.float32), rows[sl],
                                   None if session is None else session[sl])
            finally:
                fr.close()

        return SubjectPlan(subject=subject, source_subject=src, n_trials=len(keep), coords=coords,
                           space=f"things {src} functional grid (voxel index x {self.options['voxel_mm']} mm)",
                           units="single-trial betas as distributed", rois={a: RoiAtlas(r.values[sel], r.labels)
                                                                            for a, r in full.items()},
                           ncsnr=None, sources=[rpath, vpath, self.path("stimulus_table", subject=src)],
                           write=write, attrs={"voxel_ijk_from": "VoxelMetadata voxel_x/y/z",
                                               "trial_order_from": "StimulusMetadata.csv rows"},
                           sessions=None if session is None else sorted(set(session.tolist())),
                           inventory={"roi_columns": sorted({c for spec in self.manifest["roi_atlases"].values()
                                                             for cols in spec["labels"].values() for c in cols
                                                             if c in vox.columns})},
                           report=report)

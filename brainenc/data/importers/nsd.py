"""Natural Scenes Dataset (Allen et al. 2022), 7T, single-trial GLMsingle betas.

Source layout (relative to the NSD root, see ``data_manifests/nsd.yaml``)::

    nsddata/experiments/nsd/nsd_expdesign.mat          masterordering (1, 30000), subjectim (8, 10000),
                                                        sharedix (1, 1000); all 1-based
    nsddata/experiments/nsd/nsd_stim_info_merged.csv   per 73k image (nsdId 0-based, cocoId, ...)
    nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5        imgBrick uint8 (73000, 425, 425, 3), 0-based
    nsddata_betas/ppdata/subjXX/<space>/betas_fithrf_GLMdenoise_RR/
        betas_sessionNN.hdf5    'betas' int16 (750, Z, Y, X) = percent signal change x 300
        betas_sessionNN.nii.gz  the same as NIfTI (X, Y, Z, 750)
        ncsnr.nii.gz            (X, Y, Z) float
        {lh,rh}.betas_sessionNN.mgh / {lh,rh}.ncsnr.mgh   (fsaverage: (163842, 1, 1, 750))
    nsddata/ppdata/subjXX/<space>/roi/<atlas>.nii.gz    int (X, Y, Z); -1 outside brain, 0 unlabelled
    nsddata/freesurfer/subjXX/label/<atlas>.mgz.ctab     label tables
    nsddata/freesurfer/fsaverage/{label/<hemi>.<atlas>.mgz, surf/<hemi>.<surface>}

Trials: trial ``t`` (0-based over the subject's sessions, 750 per session) showed the 10k image
``masterordering[t]`` (1-based), i.e. the 73k image ``subjectim[subject, masterordering[t]-1]``
(1-based).  Store stimulus ids are ``nsd-%05d`` with the **0-based** 73k index (the row of
``imgBrick`` and ``nsdId`` in the stim-info CSV).  The shared1000 images (``sharedix``) are test.

Nothing missing is silent (:meth:`Importer.missing`): a session without betas, an ROI atlas of
the manifest without its file (both hemisphere files on fsaverage) and an image beyond the end of
``imgBrick`` are errors naming them unless ``--allow-missing sessions|rois|images``; then they are
left out (sessions are independent: each holds trials ``750*(s-1) .. 750*s`` of masterordering)
and recorded in the store manifest.  The atlas that selects the voxels (``--roi``) can never be
missing.
"""

from __future__ import annotations

import zlib

from pathlib import Path

import h5py
import numpy as np

from brainenc.data.importers.base import Importer, StimulusPlan, SubjectPlan
from brainenc.data.importers.source_files import (SourceError, affine_coords, iter_blocks, load_nifti, nifti_array,
                                                  read_mat, truncated_nifti, zscore_rows)
from brainenc.data.store import SPLIT_TEST, SPLIT_TRAIN, RoiAtlas

TRIALS_PER_SESSION = 750
N_73K = 73000


def read_ctab(path: Path) -> dict[int, str]:
    """FreeSurfer-style colour/label table: lines ``value name [r g b a]``; 0 (unknown) dropped."""
    labels = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) < 2 or parts[0].startswith("#"):
            continue
        try:
            value = int(parts[0])
        except ValueError:
            raise SourceError(path, "<line>", "'<int value> <name> ...'", line.strip()) from None
        if value > 0:
            labels[value] = parts[1]
    return labels


class NSDImporter(Importer):
    """Import NSD single-trial betas.

    Options
    -------
    space : 'func1pt8mm' (default), 'func1mm' or 'fsaverage'
    format : 'auto' (hdf5 if present, else NIfTI), 'hdf5' or 'nifti' (volume spaces only)
    zscore : z-score each voxel within each session (default True; NSD's recommended practice
             because beta scales drift between sessions)
    sessions : import only the first N sessions of each subject (default: all in the manifest)
    block_mb : size of the trial blocks read from a session file (bounded memory)
    surface : fsaverage surface for vertex coordinates ('white', 'pial', 'sphere', ...)
    """

    name = "nsd"
    default_options = {"space": "func1pt8mm", "format": "auto", "zscore": True, "sessions": None,
                       "block_mb": 64, "surface": "white"}

    # ---------------------------------------------------------------- helpers

    @property
    def space(self) -> str:
        s = self.options["space"]
        if s not in self.manifest["spaces"]:
            raise SourceError(self.manifest["_path"], "options/space", f"one of {list(self.manifest['spaces'])}", s)
        return s

    @property
    def surface(self) -> bool:
        return self.manifest["spaces"][self.space].get("kind") == "surface"

    def n_sessions(self, subject: str) -> int:
        full = int(self.subject_table()[subject]["sessions"])
        n = self.options["sessions"]
        if n is None:
            return full
        if not 1 <= int(n) <= full:
            raise SourceError(self.manifest["_path"], "options/sessions", f"1..{full} for {subject}", str(n))
        return int(n)

    def atlases(self) -> dict:
        return self.manifest["roi_atlases"]

    def session_file(self, subject: str, session: int) -> tuple[Path, str]:
        """(path, kind) of one session's betas; kind 'hdf5' | 'nifti'."""
        fmt = {"subject": subject, "space": self.space, "session": session}
        h5, nii = self.path("betas_hdf5", **fmt), self.path("betas_nifti", **fmt)
        want = self.options["format"]
        if want == "hdf5" or (want == "auto" and h5.exists()):
            return h5, "hdf5"
        if want in ("nifti", "auto"):
            if want == "auto" and not nii.exists():
                raise SourceError(h5, "<file>", f"betas of {subject} session {session} (.hdf5 or .nii.gz)",
                                  "missing")
            return nii, "nifti"
        raise SourceError(self.manifest["_path"], "options/format", "'auto', 'hdf5' or 'nifti'", str(want))

    def surface_files(self, subject: str, session: int) -> list[Path]:
        return [self.path("betas_mgh", subject=subject, session=session, hemi=h) for h in ("lh", "rh")]

    def _session_present(self, subject: str, session: int) -> bool:
        if self.surface:
            return all(p.exists() for p in self.surface_files(subject, session))
        fmt = {"subject": subject, "space": self.space, "session": session}
        files = {"hdf5": [self.path("betas_hdf5", **fmt)], "nifti": [self.path("betas_nifti", **fmt)]}
        files["auto"] = files["hdf5"] + files["nifti"]
        if self.options["format"] not in files:
            raise SourceError(self.manifest["_path"], "options/format", "'auto', 'hdf5' or 'nifti'",
                              str(self.options["format"]))
        return any(p.exists() for p in files[self.options["format"]])

    def sessions(self, subject: str, report: dict | None = None) -> list[int]:
        """Sessions to import (1-based).  A session without betas goes through :meth:`missing`
        (kind ``sessions``); NSD sessions are independent, so any of them may be left out."""
        wanted = list(range(1, self.n_sessions(subject) + 1))
        have = [s for s in wanted if self._session_present(subject, s)]
        absent = [s for s in wanted if s not in have]
        if absent:
            first = (self.surface_files(subject, absent[0])[0] if self.surface
                     else self.session_file_name(subject, absent[0]))
            # a partial download is common: say how to import the sessions that are here
            hint = (f"; sessions 1..{len(have)} are present: import them with -o sessions={len(have)}"
                    if have and have == wanted[:len(have)] and self.options["sessions"] is None else "")
            self.missing("sessions", first, f"betas of every session of {subject} (1..{wanted[-1]}){hint}",
                         [f"session{x:02d}" for x in absent], {} if report is None else report, "missing_sessions")
        if not have:
            raise SourceError(self.session_file_name(subject, 1), "<file>", f"betas of {subject}", "no session present")
        return have

    def session_file_name(self, subject: str, session: int) -> Path:
        """The file named in errors about a missing session (the HDF5 unless NIfTI was asked for)."""
        key = "betas_nifti" if self.options["format"] == "nifti" else "betas_hdf5"
        return self.path(key, subject=subject, space=self.space, session=session)

    # ---------------------------------------------------------------- checks

    def present(self, subject: str) -> bool:
        return (self.root / "nsddata_betas/ppdata" / subject).is_dir()

    def check(self, subjects: list[str]) -> None:
        self.need(self.path("expdesign"), "the NSD experimental design (nsd_expdesign.mat)")
        self.need(self.path("stimuli"), "the NSD images (nsd_stimuli.hdf5, dataset imgBrick)")
        atlas = str(self.roi).partition(":")[0]
        if atlas not in self.atlases():
            raise SourceError(self.manifest["_path"], "roi", f"an NSD ROI atlas among {sorted(self.atlases())}",
                              str(self.roi))
        for s in subjects:
            self.sessions(s)
            # the atlas that selects the voxels cannot be left out (--allow-missing rois or not)
            for hemi in (("lh", "rh") if self.surface else ("lh",)):
                self.need(self.roi_file(s, atlas, hemi), f"ROI atlas '{atlas}' of {s} (it selects the voxels: --roi)")

    def roi_file(self, subject: str, atlas: str, hemi: str = "lh") -> Path:
        if self.surface:
            return self.path("roi_fsaverage", atlas=atlas, hemi=hemi)
        return self.path("roi", subject=subject, space=self.space, atlas=atlas)

    # ---------------------------------------------------------------- design and stimuli

    def design(self) -> dict[str, np.ndarray]:
        """masterordering (30000,), subjectim (8, 10000), sharedix (1000,): int64, still 1-based."""
        if not hasattr(self, "_design"):
            p = self.path("expdesign")
            m = read_mat(p, ["masterordering", "subjectim", "sharedix"])
            mo = np.asarray(m["masterordering"]).astype(np.int64).ravel()
            si = np.asarray(m["subjectim"]).astype(np.int64)
            sh = np.asarray(m["sharedix"]).astype(np.int64).ravel()
            if si.ndim != 2 or si.shape[1] != 10000:
                raise SourceError(p, "subjectim", "(8, 10000) 73k ids", str(si.shape))
            if mo.min() < 1 or mo.max() > si.shape[1]:
                raise SourceError(p, "masterordering", f"1-based indices in 1..{si.shape[1]}",
                                  f"range {mo.min()}..{mo.max()}")
            for name, arr in (("subjectim", si), ("sharedix", sh)):
                if arr.min() < 1 or arr.max() > N_73K:
                    raise SourceError(p, name, f"1-based 73k ids in 1..{N_73K}", f"range {arr.min()}..{arr.max()}")
            self._design = {"masterordering": mo, "subjectim": si, "sharedix": sh}
        return self._design

    def subject_index(self, subject: str) -> int:
        return int(self.subject_table()[subject].get("index", int(subject[-2:]))) - 1

    def trial_73k(self, subject: str, sessions: list[int] | None = None) -> np.ndarray:
        """0-based 73k image index of each trial of ``sessions`` (default: 1..n_sessions), in
        session order, int64 (len(sessions) * 750,)."""
        d = self.design()
        if sessions is None:
            sessions = list(range(1, self.n_sessions(subject) + 1))
        n = max(sessions) * TRIALS_PER_SESSION
        if len(d["masterordering"]) < n:
            raise SourceError(self.path("expdesign"), "masterordering", f"at least {n} trials",
                              str(len(d["masterordering"])))
        row = self.subject_index(subject)
        if row >= d["subjectim"].shape[0]:
            raise SourceError(self.path("expdesign"), "subjectim", f"a row for {subject}",
                              f"{d['subjectim'].shape[0]} rows")
        t = np.concatenate([np.arange((x - 1) * TRIALS_PER_SESSION, x * TRIALS_PER_SESSION) for x in sessions])
        return d["subjectim"][row, d["masterordering"][t] - 1] - 1

    def plan_stimuli(self, subjects: list[str]) -> StimulusPlan:
        seen = np.unique(np.concatenate([self.trial_73k(s, self.sessions(s)) for s in subjects]))
        shared = self.design()["sharedix"] - 1
        path = self.path("stimuli")
        report: dict = {}
        with h5py.File(path, "r") as f:
            if "imgBrick" not in f:
                raise SourceError(path, "imgBrick", "uint8 (73000, H, W, 3)", "missing")
            ds = f["imgBrick"]
            if ds.ndim != 4 or ds.shape[-1] != 3 or ds.dtype != np.uint8:
                raise SourceError(path, "imgBrick", "uint8 (73000, H, W, 3)", f"{ds.dtype} {ds.shape}")
            # a brick that ends early (a cut download) lacks the images past its end
            absent = seen[seen >= ds.shape[0]]
            if len(absent) == len(seen):
                raise SourceError(path, "imgBrick", f"uint8 (>{seen.max()}, H, W, 3)", f"{ds.dtype} {ds.shape}")
            self.missing("images", path, f"imgBrick rows for every image shown (up to 73k id {seen.max()})",
                         [f"nsd-{i:05d}" for i in absent], report, "missing_images")
            seen = seen[seen < ds.shape[0]]
        split = np.where(np.isin(seen, shared), SPLIT_TEST, SPLIT_TRAIN).astype(np.uint8)

        def load(rows):
            # h5py fancy indexing wants increasing indices; rows follow sorted 73k ids, so they are.
            with h5py.File(path, "r") as f:
                ds = f["imgBrick"]
                idx = seen[np.asarray(rows)]
                for sl in iter_blocks(len(idx), 16):
                    yield from ds[idx[sl].tolist()]

        labels = {}
        info = self.path("stim_info")
        sources = [path, self.path("expdesign")]
        if info.exists():
            import pandas as pd

            df = pd.read_csv(info)
            if {"nsdId", "cocoId"} <= set(df.columns):
                coco = df.set_index("nsdId")["cocoId"].reindex(seen)
                labels["coco_id"] = coco.fillna(-1).to_numpy(np.int64)
            sources.append(info)
        return StimulusPlan(ids=[f"nsd-{i:05d}" for i in seen], split=split, load=load, sources=sources,
                            labels=labels, report=report)

    # ---------------------------------------------------------------- voxels

    def _label_table(self, subject: str, atlas: str) -> tuple[dict[int, str], list[Path]]:
        spec = self.atlases()[atlas]
        ctab = spec.get("ctab")
        if ctab:
            p = self.root / ctab.format(subject=subject if not self.surface else "fsaverage")
            if p.exists():
                return read_ctab(p), [p]
        return {int(k): str(v) for k, v in spec["labels"].items()}, []

    def _missing_atlases(self, subject: str, report: dict) -> set[str]:
        """Atlases of the manifest whose file is not there (on fsaverage: either hemisphere's),
        through :meth:`missing` (kind ``rois``; items ``atlas`` or ``hemi.atlas``).  An atlas
        lacking one hemisphere is left out whole: its labels would cover half the vertices."""
        hemis = ("lh", "rh") if self.surface else (None,)
        absent = [(atlas, h) for atlas in self.atlases() for h in hemis
                  if not self.roi_file(subject, atlas, h or "lh").exists()]
        if absent:
            atlas, h = absent[0]
            self.missing("rois", self.roi_file(subject, atlas, h or "lh"),
                         f"a file for every ROI atlas of the source manifest ({', '.join(self.atlases())})"
                         + (" and both hemispheres" if self.surface else ""),
                         [a if h is None else f"{h}.{a}" for a, h in absent], report, "missing_roi_masks")
        return {a for a, _ in absent}

    def _volume_atlases(self, subject: str, report: dict) -> tuple[dict[str, np.ndarray], np.ndarray, tuple,
                                                                   list[Path]]:
        """Full-volume atlases {name: int (X, Y, Z)}, affine, shape and files read."""
        import nibabel as nib

        vols, affine, shape, files = {}, None, None, []
        absent = self._missing_atlases(subject, report)
        for atlas in self.atlases():
            p = self.roi_file(subject, atlas)
            if atlas in absent:
                continue
            img = load_nifti(p)
            data = nifti_array(p)
            if data.ndim == 4 and data.shape[3] == 1:
                data = data[..., 0]
            if shape is None:
                affine, shape = img.affine, data.shape
            elif data.shape != shape:
                raise SourceError(p, "<volume>", f"shape {shape} like the other ROI volumes", str(data.shape))
            vols[atlas] = np.rint(data).astype(np.int16)
            files.append(p)
        return vols, affine, shape, files

    def _plan_volume(self, subject: str, report: dict):
        import nibabel as nib

        vols, affine, shape, files = self._volume_atlases(subject, report)
        full = {a: RoiAtlas(v.ravel(), self._label_table(subject, a)[0]) for a, v in vols.items()}
        for a in vols:
            files += self._label_table(subject, a)[1]
        mask = self.parse_roi(full, self.roi_file(subject, str(self.roi).partition(":")[0])).reshape(shape)
        ijk = np.argwhere(mask)  # C order over (X, Y, Z): the store's voxel order
        if len(ijk) == 0:
            raise SourceError(self.roi_file(subject, str(self.roi).partition(":")[0]), "roi",
                              f"at least one voxel selected by '{self.roi}'", "none")
        rois = {a: RoiAtlas(np.maximum(v[mask], 0).astype(np.int16), full[a].labels) for a, v in vols.items()}
        ncsnr = None
        npath = self.path("ncsnr", subject=subject, space=self.space)
        if npath.exists():
            nc = nifti_array(npath, np.float32)
            if nc.shape[:3] != shape:
                raise SourceError(npath, "<volume>", f"shape {shape} like the ROI volumes", str(nc.shape))
            ncsnr = nc.reshape(shape)[mask]
            files.append(npath)
        return ijk, affine_coords(affine, ijk), rois, ncsnr, shape, files

    def _plan_surface(self, subject: str, report: dict):
        import nibabel as nib
        from nibabel.freesurfer import read_geometry

        per_hemi, files = [], []
        absent = self._missing_atlases(subject, report)
        for hemi in ("lh", "rh"):
            surf = self.path("fsaverage_surface", hemi=hemi, surface=self.options["surface"])
            coords, _ = read_geometry(str(self.need(surf, "fsaverage surface (vertex coordinates)")))
            files.append(surf)
            atl = {}
            for atlas in self.atlases():
                p = self.roi_file(subject, atlas, hemi)
                if atlas not in absent:
                    v = np.rint(nifti_array(p).ravel()).astype(np.int16)
                    if len(v) != len(coords):
                        raise SourceError(p, "<surface>", f"{len(coords)} vertices like {surf.name}", str(len(v)))
                    atl[atlas] = v
                    files.append(p)
            per_hemi.append((hemi, coords, atl))
        full = {a: RoiAtlas(np.concatenate([h[2][a] for h in per_hemi]), self._label_table(subject, a)[0])
                for a in self.atlases() if a not in absent}
        for a in full:
            files += self._label_table(subject, a)[1]
        mask = self.parse_roi(full, self.roi_file(subject, str(self.roi).partition(":")[0]))
        coords = np.concatenate([h[1] for h in per_hemi]).astype(np.float32)[mask]
        hemi = np.concatenate([np.full(len(h[1]), i, np.int8) for i, h in enumerate(per_hemi)])[mask]
        vertex = np.concatenate([np.arange(len(h[1])) for h in per_hemi])[mask]
        rois = {a: RoiAtlas(np.maximum(r.values[mask], 0), r.labels) for a, r in full.items()}
        ncsnr = None
        nfiles = [self.path("ncsnr_mgh", subject=subject, hemi=h) for h in ("lh", "rh")]
        if all(p.exists() for p in nfiles):
            ncsnr = np.concatenate([nifti_array(p, np.float32).ravel() for p in nfiles])[mask]
            files += nfiles
        n_per_hemi = [len(h[1]) for h in per_hemi]
        return (hemi, vertex, n_per_hemi), coords, rois, ncsnr, mask, files

    # ---------------------------------------------------------------- subject

    def plan_subject(self, subject: str, stimuli: StimulusPlan) -> SubjectPlan:
        report: dict = {}
        sessions = self.sessions(subject, report)
        trial_73k = self.trial_73k(subject, sessions)
        # trials whose image is missing from imgBrick (allowed) are dropped and counted
        trial_stim, keep = self.trial_rows(stimuli, [f"nsd-{i:05d}" for i in trial_73k], report)
        zscore = bool(self.options["zscore"])
        units = "z-score within session" if zscore else "percent signal change"
        block_bytes = float(self.options["block_mb"]) * 2**20
        scale = float(self.manifest.get("beta_scale", 300))
        extra = {}

        if self.surface:
            (hemi, vertex, n_per_hemi), coords, rois, ncsnr, mask, files = self._plan_surface(subject, report)
            betas = {s: self.surface_files(subject, s) for s in sessions}
            extra = {"hemi": hemi, "vertex": vertex}
            space = f"fsaverage ({self.options['surface']} surface)"

            def read_session(sess: int) -> np.ndarray:
                return self._read_surface_session(betas[sess], mask, n_per_hemi, block_bytes, scale)
        else:
            ijk, coords, rois, ncsnr, shape, files = self._plan_volume(subject, report)
            extra = {"ijk": ijk.astype(np.int32)}
            space = f"nsd {subject} {self.space}"
            betas = {s: [self.session_file(subject, s)[0]] for s in sessions}

            def read_session(sess: int) -> np.ndarray:
                path, kind = self.session_file(subject, sess)
                return self._read_volume_session(path, kind, ijk, shape, block_bytes, scale)

        def write(w):
            w.write_group("voxels", extra)
            done = 0
            for n, sess in enumerate(sessions):
                # One session in memory at a time: (750, n_voxels) float32.  z-scoring uses all
                # of the session's trials, also those dropped for a missing image.
                x = read_session(sess)
                if zscore:
                    x = zscore_rows(x)
                k = keep[n * TRIALS_PER_SESSION:(n + 1) * TRIALS_PER_SESSION]
                rows = trial_stim[done:done + int(k.sum())]
                w.write_trials(x[k], rows, np.full(len(rows), sess, np.int32))
                done += len(rows)

        atlas_files = sorted({p.name for a in rois for p in ([self.roi_file(subject, a)] if not self.surface else
                              [self.roi_file(subject, a, h) for h in ("lh", "rh")])})
        inventory = {"roi_atlases": atlas_files,
                     "label_tables": [f"{a} ({'ctab' if self._label_table(subject, a)[1] else 'source manifest'})"
                                      for a in rois],
                     "ncsnr": [p.name for p in files if "ncsnr" in p.name]}  # optional: none is fine
        return SubjectPlan(subject=subject, source_subject=subject, n_trials=len(trial_stim),
                           coords=coords, space=space, units=units, rois=rois, ncsnr=ncsnr,
                           sources=files + [p for s in sessions for p in betas[s]], write=write,
                           attrs={"nsd_space": self.space, "n_sessions": len(sessions)},
                           sessions=sessions, inventory=inventory, report=report)

    # ---------------------------------------------------------------- session readers

    @staticmethod
    def _read_volume_session(path: Path, kind: str, ijk: np.ndarray, shape: tuple, block_bytes: float,
                             scale: float) -> np.ndarray:
        """Betas of the selected voxels, float32 (750, n_voxels) in percent signal change.

        Reads the file in blocks of trials so that memory is one block plus the output, never the
        whole (750, Z, Y, X) session.
        """
        i, j, k = ijk.T
        out = np.empty((TRIALS_PER_SESSION, len(ijk)), np.float32)
        block = max(1, int(block_bytes // (np.prod(shape) * 2)))
        if kind == "hdf5":
            try:
                f = h5py.File(path, "r")
            except OSError as e:
                raise SourceError(path, "<file>", "a readable HDF5 file", str(e)) from None
            with f:
                if "betas" not in f:
                    raise SourceError(path, "betas", "int16 (750, Z, Y, X)", "missing")
                ds = f["betas"]
                want = (TRIALS_PER_SESSION, *shape[::-1])
                if ds.shape != want:
                    raise SourceError(path, "betas", f"shape {want} (trials, Z, Y, X) matching the ROI volumes",
                                      str(ds.shape))
                if ds.dtype != np.int16:
                    raise SourceError(path, "betas", "dtype int16 (percent signal change x 300)", str(ds.dtype))
                for sl in iter_blocks(TRIALS_PER_SESSION, block):
                    # h5py reads C order (trials, Z, Y, X): index with (k, j, i).
                    out[sl] = ds[sl][:, k, j, i]
            out /= np.float32(scale)
            return out
        import nibabel as nib

        try:
            img = nib.load(path)
        except Exception as e:  # nibabel raises several types for a bad header
            raise SourceError(path, "<file>", "a readable NIfTI file", str(e)) from None
        want = (*shape, TRIALS_PER_SESSION)
        if tuple(img.shape) != want:
            raise SourceError(path, "<volume>", f"shape {want} (X, Y, Z, trials)", str(img.shape))
        raw_int = np.issubdtype(img.get_data_dtype(), np.integer)
        slope = img.dataobj.slope if hasattr(img.dataobj, "slope") else 1.0
        inter = img.dataobj.inter if hasattr(img.dataobj, "inter") else 0.0
        # Integer betas without header scaling are percent signal change x 300, like the HDF5 files;
        # if the header carries a scale factor, nibabel has already applied it.
        divide = scale if raw_int and slope in (1.0, None) and inter in (0.0, None) else 1.0
        try:
            for sl in iter_blocks(TRIALS_PER_SESSION, block):
                out[sl] = np.asarray(img.dataobj[..., sl])[i, j, k, :].T
        except (EOFError, OSError, ValueError, zlib.error) as e:  # a truncated file
            raise truncated_nifti(path, e) from None
        out /= np.float32(divide)
        return out

    @staticmethod
    def _read_surface_session(paths: list[Path], mask: np.ndarray, n_per_hemi: list[int], block_bytes: float,
                              scale: float) -> np.ndarray:
        """fsaverage betas of the selected vertices, float32 (750, n_vertices): lh then rh."""
        import nibabel as nib

        parts, start = [], 0
        for path, n in zip(paths, n_per_hemi):
            m = mask[start:start + n]
            start += n
            img = load_nifti(path)
            if img.shape[0] != n or img.shape[-1] != TRIALS_PER_SESSION or int(np.prod(img.shape[1:-1])) != 1:
                raise SourceError(path, "<surface>", f"shape ({n}, 1, 1, {TRIALS_PER_SESSION})", str(img.shape))
            raw_int = np.issubdtype(img.get_data_dtype(), np.integer)
            block = max(1, int(block_bytes // (n * 4)))
            out = np.empty((TRIALS_PER_SESSION, int(m.sum())), np.float32)
            try:
                for sl in iter_blocks(TRIALS_PER_SESSION, block):
                    blk = np.asarray(img.dataobj[..., sl]).reshape(n, -1)
                    out[sl] = blk[m].T
            except (EOFError, OSError, ValueError, zlib.error) as e:  # a truncated file
                raise truncated_nifti(path, e) from None
            out /= np.float32(scale if raw_int else 1.0)
            parts.append(out)
        return np.concatenate(parts, axis=1)

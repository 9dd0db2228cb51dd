"""BOLD5000 release 2.0 (Chang et al. 2019; GLMsingle betas), 3T.

Source layout (see ``data_manifests/bold5000.yaml``), as released and as read by
BonnerLab/bonner-libraries (``src/bonner/datasets/chang2019_bold5000/``)::

    CSIn_GLMbetas-TYPED-FITHRF-GLMDENOISE-RR_ses-NN.nii.gz   (X, Y, Z, n_trials_in_session), figshare
    CSIn_imgnames.txt          one image name per trial, all sessions in order        (release 2.0,
    CSIn_brainmask.nii.gz      (X, Y, Z) 0/1                                            flat files;
                                                                  a CSIn/ folder is also accepted)
    sub-CSIn/sub-CSIn_mask-{LH,RH}<ROI>.nii.gz   (X, Y, Z) 0/1, OpenNeuro ds001499 derivatives/spm
    stimuli/Presented_Stimuli/{COCO,ImageNet,Scene}/<image name>

The ROI mask files are named irregularly in the release: CSI2 has ``mask-LHLO``, ``mask-RHLO``
(LOC) and ``mask-RHRRSC`` (right RSC), CSI3 ``mask-LHLO``/``mask-RHLO``.  ``roi_file_names`` in the
manifest lists the spellings of each ROI; the first that exists is used and recorded.  A mask
found under no spelling is an error naming it, unless ``--allow-missing rois``; then it is left
out and recorded in the store manifest.

The image shown in each trial is given by ``imgnames.txt`` (line t = trial t).  Images presented
more than once (BOLD5000's repeated set) are test, all others train.  Betas that are NaN inside
the brain mask are counted in a first pass over the sessions and handled by ``nan_voxels``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from brainenc.data.importers.base import Importer, StimulusPlan, SubjectPlan
from brainenc.data.importers.source_files import (SourceError, affine_coords, load_nifti, nan_voxel_policy,
                                                  nifti_array, read_nifti_masked, zscore_rows)
from brainenc.data.store import SPLIT_TEST, SPLIT_TRAIN, RoiAtlas


def clean_name(name: str) -> str:
    """Image file name as on disk (BOLD5000 lists mark repeats with a ``rep_`` prefix)."""
    name = name.strip()
    return name[4:] if name.startswith("rep_") else name


class BOLD5000Importer(Importer):
    """Import BOLD5000 GLMsingle single-trial betas.

    Options
    -------
    zscore : z-score each voxel within each session (default True)
    sessions : import only the first N sessions (default: all of the manifest)
    block_mb : size of the volume blocks read at a time
    nan_voxels : brain-mask voxels with NaN betas: 'drop' (default; a voxel NaN in any trial is
                 left out), 'keep' (kept, NaN = missing value; voxels NaN in every trial are still
                 dropped) or 'error'.  Counts are printed and recorded in the store manifest.
    """

    name = "bold5000"
    default_options = {"zscore": True, "sessions": None, "block_mb": 64, "nan_voxels": "drop"}

    def present(self, subject):
        return self.path("imgnames", subject=self.source(subject)).exists()

    def source(self, subject: str) -> str:
        return self.subject_table()[subject]["source"]

    def n_sessions(self, subject: str) -> int:
        full = int(self.subject_table()[subject]["sessions"])
        n = self.options["sessions"]
        if n is not None and not 1 <= int(n) <= full:
            raise SourceError(self.manifest["_path"], "options/sessions", f"1..{full} for {subject}", str(n))
        return full if n is None else int(n)

    def sessions(self, subject: str, report: dict | None = None) -> list[int]:
        """Sessions to import.  Missing trailing sessions may be skipped (``--allow-missing
        sessions``); a gap before a present session cannot be, because imgnames.txt lists the
        trials of all sessions in order and the missing session's trial count is unknown."""
        src = self.source(subject)
        wanted = list(range(1, self.n_sessions(subject) + 1))
        have = [s for s in wanted if self.path("betas", subject=src, session=s).exists()]
        absent = [s for s in wanted if s not in have]
        if absent and have and max(have) > min(absent):
            p = self.path("betas", subject=src, session=min(absent))
            raise SourceError(p, "<file>", f"GLMsingle betas of {src} session {min(absent)} (sessions after it "
                              "exist; without it the trials of imgnames.txt cannot be matched)", "missing")
        self.missing("sessions", self.path("betas", subject=src, session=absent[0]) if absent else None,
                     f"GLMsingle betas of every session of {src} (1..{wanted[-1]})",
                     [f"ses-{s:02d}" for s in absent], report if report is not None else {}, "missing_sessions")
        if not have:
            raise SourceError(self.path("betas", subject=src, session=1), "<file>",
                              f"GLMsingle betas of {src}", "no session present")
        return have

    def check(self, subjects):
        atlas = str(self.roi).partition(":")[0]
        if self.roi not in ("all", "any") and atlas not in ("bold5000-rois", "hemisphere"):
            raise SourceError(self.manifest["_path"], "roi", "'all' (brain mask), 'any' or 'bold5000-rois[:NAMES]'",
                              str(self.roi))
        if self.options["nan_voxels"] not in ("drop", "keep", "error"):
            raise SourceError(self.manifest["_path"], "options/nan_voxels", "'drop', 'keep' or 'error'",
                              str(self.options["nan_voxels"]))
        for s in subjects:
            src = self.source(s)
            self.need(self.path("imgnames", subject=src), f"the trial image list of {src}")
            self.need(self.path("brainmask", subject=src), f"the brain mask of {src}")
            self.sessions(s)

    def trial_names(self, subject: str) -> list[str]:
        p = self.path("imgnames", subject=self.source(subject))
        return [clean_name(x) for x in p.read_text().splitlines() if x.strip()]

    def _stimulus_index(self) -> dict[str, Path]:
        if not hasattr(self, "_stim_index"):
            d = self.path("stimuli")
            self.need(d, "the BOLD5000 presented stimuli folder")
            self._stim_index = {p.name: p for p in sorted(d.rglob("*")) if p.is_file()}
        return self._stim_index

    def plan_stimuli(self, subjects):
        index = self._stimulus_index()
        counts: dict[str, int] = {}
        for s in subjects:
            for n in self.trial_names(s):
                counts[n] = counts.get(n, 0) + 1
        # Within one subject a repeated image is a test image; across subjects the (nearly)
        # same repeated set is shown, so "shown more than once to any subject" is the rule.
        rep = set()
        for s in subjects:
            seen = set()
            for n in self.trial_names(s):
                (rep.add(n) if n in seen else seen.add(n))
        report = {}
        names, split, load = self.image_stimuli(index, counts, rep, self.path("stimuli"),
                                                "image named in imgnames.txt", report)
        return StimulusPlan(ids=[f"bold5000-{Path(n).stem}" for n in names], split=split, load=load,
                            sources=[index[n] for n in names], report=report)

    def roi_masks(self, subject: str, report: dict) -> dict[tuple[str, str], Path]:
        """{(hemi, roi): mask file} under the spellings of ``roi_file_names``; missing ones via
        :meth:`missing` (error unless ``--allow-missing rois``)."""
        src = self.source(subject)
        spellings = self.manifest.get("roi_file_names", {})
        found, absent = {}, []
        for roi in self.manifest["roi_labels"].values():
            for hemi in ("LH", "RH"):
                cands = [self.path("roi", subject=src, hemi=hemi, roi=name) for name in spellings.get(roi, [roi])]
                hit = [p for p in cands if p.exists()]
                if hit:
                    found[(hemi, roi)] = hit[0]
                else:
                    absent.append((hemi, roi, cands[0]))
        if absent:
            where = absent[0][2]
            self.missing("rois", where, f"an ROI mask file for every ROI and hemisphere of {src} (spellings "
                         f"tried: {', '.join(spellings.get(absent[0][1], [absent[0][1]]))})",
                         [f"{h}{r}" for h, r, _ in absent], report, "missing_roi_masks")
        return found

    def plan_subject(self, subject, stimuli):
        src = self.source(subject)
        report: dict = {}
        mpath = self.path("brainmask", subject=src)
        mimg = load_nifti(mpath)
        brain = nifti_array(mpath) > 0
        shape, affine = brain.shape, mimg.affine
        files = [mpath, self.path("imgnames", subject=src)]
        roi_vol = np.zeros(shape, np.int16)
        hemi_vol = np.zeros(shape, np.int16)
        labels = {int(k): str(v) for k, v in self.manifest["roi_labels"].items()}
        value_of = {v: k for k, v in labels.items()}
        masks = self.roi_masks(subject, report)
        for (h, roi), p in masks.items():
            m = nifti_array(p) > 0
            if m.shape != shape:
                raise SourceError(p, "<volume>", f"shape {shape} like the brain mask", str(m.shape))
            roi_vol[m & (roi_vol == 0)] = value_of[roi]
            hemi_vol[m] = 1 if h == "LH" else 2
            files.append(p)
        outside = int(((roi_vol > 0) & ~brain).sum())
        if outside:
            report["roi_voxels_outside_brainmask"] = outside
        full = {"bold5000-rois": RoiAtlas(roi_vol[brain], labels),
                "hemisphere": RoiAtlas(hemi_vol[brain], {1: "LH", 2: "RH"})}
        sel_b = np.ones(int(brain.sum()), bool) if self.roi == "all" else self.parse_roi(full, mpath)
        ijk = np.argwhere(brain)[sel_b]
        if len(ijk) == 0:
            raise SourceError(mpath, "roi", f"voxels selected by '{self.roi}'", "none (are the ROI masks there?)")
        names = self.trial_names(subject)
        sessions = self.sessions(subject, report)
        betas = [self.path("betas", subject=src, session=s) for s in sessions]
        counts = []
        for p in betas:
            shp = load_nifti(p).shape
            if len(shp) != 4 or tuple(shp[:3]) != shape:
                raise SourceError(p, "<volume>", f"4-D shape {shape} x trials like the brain mask", str(shp))
            counts.append(int(shp[3]))
        all_sessions = len(sessions) == int(self.subject_table()[subject]["sessions"])
        if sum(counts) > len(names) or (all_sessions and sum(counts) != len(names)):
            raise SourceError(self.path("imgnames", subject=src), "<lines>",
                              f"one image name per trial of the betas files ({sum(counts)})", str(len(names)))
        n_trials = sum(counts)
        rows, shown = self.trial_rows(stimuli, [f"bold5000-{Path(n).stem}" for n in names[:n_trials]], report)
        zscore = bool(self.options["zscore"])
        block = float(self.options["block_mb"]) * 2**20
        scale = float(self.manifest.get("beta_scale", 1.0))

        if self.dry:  # counting NaN betas needs every value: left to the import
            keep_v = np.ones(len(ijk), bool)
            report["nan_voxels"] = "not scanned in a dry run"
        else:
            finite = np.zeros(len(ijk), np.int64)
            for p, n in zip(betas, counts):
                finite += np.isfinite(read_nifti_masked(p, ijk, shape, n, block, int_scale=scale)).sum(0)
            roi_sel = full["bold5000-rois"]
            keep_v = nan_voxel_policy(finite, n_trials, self.options["nan_voxels"], betas[0], "betas", report,
                                      RoiAtlas(roi_sel.values[sel_b], roi_sel.labels))
        ijk = ijk[keep_v]
        rois = {a: RoiAtlas(r.values[sel_b][keep_v], r.labels) for a, r in full.items()}
        session_of = np.repeat(np.array(sessions, np.int32), counts)

        def write(w):
            w.write_group("voxels", {"ijk": ijk.astype(np.int32)})
            start = 0
            for s, p, n in zip(sessions, betas, counts):
                x = read_nifti_masked(p, ijk, shape, n, block, int_scale=scale)
                if zscore:
                    x = zscore_rows(x)
                sl = shown[start:start + n]
                w.write_trials(x[sl], rows[int(shown[:start].sum()):int(shown[:start + n].sum())], session_of[start:start + n][sl])
                start += n

        return SubjectPlan(subject=subject, source_subject=src, n_trials=int(shown.sum()),
                           coords=affine_coords(affine, ijk), space=f"bold5000 {src} native (T1w-aligned EPI)",
                           units="z-score within session" if zscore else "percent signal change",
                           rois=rois, ncsnr=None, sources=files + betas, write=write, sessions=sessions,
                           inventory={"roi_masks": [f"{p.name}" for p in masks.values()]}, report=report)

"""BOLD5000 release 2.0 (Chang et al. 2019; GLMsingle betas), 3T.

Source layout (see ``data_manifests/bold5000.yaml``)::

    <CSIn>/CSIn_GLMbetas-TYPED-FITHRF-GLMDENOISE-RR_ses-NN.nii.gz   (X, Y, Z, n_trials_in_session)
    <CSIn>/CSIn_imgnames.txt          one image name per trial, all sessions in order
    <CSIn>/CSIn_brainmask.nii.gz      (X, Y, Z) 0/1
    ROIs/<CSIn>/sub-CSIn_mask-{LH,RH}{EarlyVis,LOC,OPA,PPA,RSC}.nii.gz   (X, Y, Z) 0/1
    stimuli/Presented_Stimuli/{COCO,ImageNet,Scene}/<image name>

The image shown in each trial is given by ``imgnames.txt`` (line t = trial t).  Images presented
more than once (BOLD5000's repeated set) are test, all others train.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from brainenc.data.importers.base import Importer, StimulusPlan, SubjectPlan
from brainenc.data.importers.source_files import (SourceError, affine_coords, load_image_file, load_nifti, nifti_array,
                                                  read_nifti_masked,
                                                  zscore_rows)
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
    """

    name = "bold5000"
    default_options = {"zscore": True, "sessions": None, "block_mb": 64}

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

    def check(self, subjects):
        atlas = str(self.roi).partition(":")[0]
        if self.roi not in ("all", "any") and atlas not in ("bold5000-rois", "hemisphere"):
            raise SourceError(self.manifest["_path"], "roi", "'all' (brain mask), 'any' or 'bold5000-rois[:NAMES]'",
                              str(self.roi))
        for s in subjects:
            src = self.source(s)
            self.need(self.path("imgnames", subject=src), f"the trial image list of {src}")
            self.need(self.path("brainmask", subject=src), f"the brain mask of {src}")
            for sess in range(1, self.n_sessions(s) + 1):
                self.need(self.path("betas", subject=src, session=sess), f"GLMsingle betas of {src} session {sess}")

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
        missing = [n for n in counts if n not in index]
        if missing:
            raise SourceError(self.path("stimuli"), "<image>", "every image named in imgnames.txt",
                              f"{len(missing)} missing, e.g. {missing[0]}")
        names = sorted(counts)
        # Within one subject a repeated image is a test image; across subjects the (nearly)
        # same repeated set is shown, so "shown more than once to any subject" is the rule.
        rep = set()
        for s in subjects:
            seen = set()
            for n in self.trial_names(s):
                (rep.add(n) if n in seen else seen.add(n))
        split = np.array([SPLIT_TEST if n in rep else SPLIT_TRAIN for n in names], np.uint8)

        def load(rows):
            for r in rows:
                yield load_image_file(index[names[r]], self.image_size)

        return StimulusPlan(ids=[f"bold5000-{Path(n).stem}" for n in names], split=split, load=load,
                            sources=[index[n] for n in names])

    def plan_subject(self, subject, stimuli):
        import nibabel as nib

        src = self.source(subject)
        mpath = self.path("brainmask", subject=src)
        mimg = load_nifti(mpath)
        brain = nifti_array(mpath) > 0
        shape, affine = brain.shape, mimg.affine
        files = [mpath, self.path("imgnames", subject=src)]
        roi_vol = np.zeros(shape, np.int16)
        hemi_vol = np.zeros(shape, np.int16)
        labels = {int(k): str(v) for k, v in self.manifest["roi_labels"].items()}
        for value, roi in labels.items():
            for h_i, h in enumerate(("LH", "RH"), start=1):
                p = self.path("roi", subject=src, hemi=h, roi=roi)
                if not p.exists():
                    continue
                m = nifti_array(p) > 0
                if m.shape != shape:
                    raise SourceError(p, "<volume>", f"shape {shape} like the brain mask", str(m.shape))
                roi_vol[m & (roi_vol == 0)] = value
                hemi_vol[m] = h_i
                files.append(p)
        full = {"bold5000-rois": RoiAtlas(roi_vol[brain], labels),
                "hemisphere": RoiAtlas(hemi_vol[brain], {1: "LH", 2: "RH"})}
        sel_b = np.ones(int(brain.sum()), bool) if self.roi == "all" else self.parse_roi(full, mpath)
        ijk = np.argwhere(brain)[sel_b]
        if len(ijk) == 0:
            raise SourceError(mpath, "roi", f"voxels selected by '{self.roi}'", "none (are the ROI masks there?)")
        rois = {a: RoiAtlas(r.values[sel_b], r.labels) for a, r in full.items()}
        names = self.trial_names(subject)
        n_sess = self.n_sessions(subject)
        betas = [self.path("betas", subject=src, session=s) for s in range(1, n_sess + 1)]
        counts = [int(load_nifti(p).shape[3]) if len(load_nifti(p).shape) == 4 else -1 for p in betas]
        full_counts_ok = n_sess < int(self.subject_table()[subject]["sessions"]) or sum(counts) == len(names)
        if not full_counts_ok or sum(counts) > len(names):
            raise SourceError(self.path("imgnames", subject=src), "<lines>",
                              f"one image name per trial of the betas files ({sum(counts)})", str(len(names)))
        n_trials = sum(counts)
        rows = np.array([stimuli.row[f"bold5000-{Path(n).stem}"] for n in names[:n_trials]], np.int64)
        zscore = bool(self.options["zscore"])
        block = float(self.options["block_mb"]) * 2**20
        scale = float(self.manifest.get("beta_scale", 1.0))

        def write(w):
            w.write_group("voxels", {"ijk": ijk.astype(np.int32)})
            start = 0
            for s, (p, n) in enumerate(zip(betas, counts), start=1):
                x = read_nifti_masked(p, ijk, shape, n, block, int_scale=scale)
                if zscore:
                    x = zscore_rows(x)
                w.write_trials(x, rows[start:start + n], np.full(n, s, np.int32))
                start += n

        return SubjectPlan(subject=subject, source_subject=src, n_trials=n_trials,
                           coords=affine_coords(affine, ijk), space=f"bold5000 {src} native (T1w-aligned EPI)",
                           units="z-score within session" if zscore else "percent signal change",
                           rois=rois, ncsnr=None, sources=files + betas, write=write)

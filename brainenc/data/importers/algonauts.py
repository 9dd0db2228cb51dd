"""Algonauts 2023 challenge data (NSD on fsaverage, challenge vertices only).

Source layout (per subject, see ``data_manifests/algonauts2023.yaml``)::

    subjXX/training_split/training_fmri/{lh,rh}_training_fmri.npy   float32 (n_train, n_hemi_vertices)
    subjXX/training_split/training_images/train-NNNN_nsd-XXXXX.png
    subjXX/test_split/test_images/test-NNNN_nsd-XXXXX.png           (no responses are released)
    subjXX/roi_masks/{lh,rh}.<atlas>_challenge_space.npy            int (n_hemi_vertices,)
    subjXX/roi_masks/mapping_<atlas>.npy                            pickled {value: name} (read without
                                                                    unpickling; a .json/.yaml beside it wins)
    subjXX/roi_masks/{lh,rh}.all-vertices_fsaverage_space.npy       (163842,) 0/1: challenge vertices

Training responses are already averaged over an image's repeats, so each image is one "trial".
The test images (no responses) are kept in ``stimuli.h5`` (split TEST unless another subject
trained on them), and each subject file records what a submission needs (``challenge/``):
``test_stimulus`` int64 (n_test,) = the stimulus row of ``test-0001``, ``test-0002``, ... in the
challenge's order, ``test_name`` the file names, attrs ``n_vertices`` = [lh, rh] challenge
vertices and ``roi`` = the ROI selection of the import ("all" = every challenge vertex);
``voxels/hemi`` and ``voxels/vertex`` keep each voxel's hemisphere and fsaverage vertex, so the
voxels of hemisphere h, in store order, are that hemisphere's challenge vertices in order
(``brainenc algonauts-submission`` writes the files).
Vertex coordinates come from a FreeSurfer ``fsaverage`` subject directory (``surf/<hemi>.white``),
indexed through the all-vertices masks.  The NSD ``nsd-XXXXX`` number is the 0-based 73k index
(``nsd_id_base`` in the manifest), so stores of NSD and Algonauts share stimulus ids.

Nothing missing is silent (:meth:`Importer.missing`): an ROI atlas of the manifest without both
hemisphere files, and a training row without its ``train-NNNN`` image, are errors naming them
unless ``--allow-missing rois|images``; then the atlas is left out whole (never one hemisphere of
it) or the row is dropped, and both are recorded in the store manifest.  Label tables missing
beside the masks come from the source manifest; the dry run says which were used.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from brainenc.data.importers.base import Importer, StimulusPlan, SubjectPlan
from brainenc.data.importers.source_files import SourceError, load_image_file, nifti_array
from brainenc.data.store import SPLIT_TEST, SPLIT_TRAIN, RoiAtlas

HEMIS = ("lh", "rh")
NAME_RE = re.compile(r"^(train|test)-(\d+)_nsd-(\d+)\.png$")


def noise_normalized_score(r: np.ndarray, noise_ceiling: np.ndarray) -> float:
    """Algonauts 2023 challenge score: mean over vertices of ``100 * r**2 / NC``.

    r : (n_vertices,) Pearson correlation of prediction and response
    noise_ceiling : (n_vertices,) NC as a fraction (0..1) or percent (values > 1 are divided by 100)
    Vertices with NC <= 0 are left out (their ratio is undefined); ratios are capped at 100.
    """
    r = np.asarray(r, np.float64)
    nc = np.asarray(noise_ceiling, np.float64)
    if np.nanmax(nc) > 1.0:
        nc = nc / 100.0
    ok = (nc > 0) & np.isfinite(r)
    return float(np.mean(np.minimum(100.0 * r[ok] ** 2 / nc[ok], 100.0))) if ok.any() else float("nan")


def ncsnr_to_nc(ncsnr: np.ndarray, n: int) -> np.ndarray:
    """NSD noise ceiling in percent: ``100 * ncsnr^2 / (ncsnr^2 + 1/n)`` for n averaged repeats."""
    s2 = np.asarray(ncsnr, np.float64) ** 2
    return 100.0 * s2 / (s2 + 1.0 / n)


# The only globals a np.save'd object array needs.  They are replaced by _Inert, so nothing from
# the file is ever called; anything else in the pickle is refused.
_NUMPY_RECONSTRUCT = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                      ("numpy", "ndarray"), ("numpy", "dtype")}


class _Inert:
    """Stand-in for numpy's array-rebuilding callables: records its arguments and state only."""

    def __init__(self, *args):
        self.args, self.state = args, None

    def __setstate__(self, state):
        self.state = state


def _numeric_scalar(dtype, data):
    """numpy's ``scalar(dtype, bytes)`` for plain numbers and strings only (np.int64 keys, np.str_ names)."""
    try:
        dt = np.dtype(str(dtype.args[0]))
        order = dtype.state[1] if isinstance(dtype.state, tuple) and len(dtype.state) > 1 else "="
        if dt.kind not in "iufbU" or not isinstance(data, bytes) or len(data) != dt.itemsize:
            raise ValueError
        return np.frombuffer(data, dt.newbyteorder(order))[0].item()
    except (AttributeError, TypeError, ValueError, IndexError):
        import pickle

        raise pickle.UnpicklingError("a numpy scalar that is not a plain number") from None


def _refusing_unpickler(fh, path: Path):
    import pickle

    class Refusing(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) in _NUMPY_RECONSTRUCT:
                return _Inert
            if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "scalar":
                return _numeric_scalar
            raise SourceError(path, "<pickle>", "a pickled {value: name} dict (brainenc does not "
                              "unpickle code or objects; provide mapping_<atlas>.json instead)",
                              f"a reference to {module}.{name}")

        def persistent_load(self, pid):
            raise SourceError(path, "<pickle>", "a self-contained {value: name} dict", "a persistent id")

    return Refusing(fh)


def read_label_mapping(path: Path) -> dict[int, str]:
    """ROI label table ``{value: name}`` from ``mapping_<atlas>.{npy,json,yaml}``.

    The challenge ships ``np.save`` of a Python dict, i.e. a pickle inside an ``.npy``.  It is
    read here without executing anything: the pickle may only rebuild a numpy object array (with
    inert stand-ins) around plain dicts, ints and strings.  JSON/YAML maps are read as data.
    """
    import yaml

    path = Path(path)
    if path.suffix in (".json", ".yaml", ".yml"):
        try:
            raw = yaml.safe_load(path.read_text())  # YAML is a superset of JSON
        except yaml.YAMLError as e:
            raise SourceError(path, "<file>", "a JSON/YAML {value: name} map", str(e).splitlines()[0]) from None
    else:
        raw = _read_npy_mapping(path)
    if not isinstance(raw, dict):
        raise SourceError(path, "<mapping>", "a {value: name} dict", type(raw).__name__)
    bad = [v for v in raw.values() if not isinstance(v, str)]
    if bad:
        raise SourceError(path, "<mapping>", "ROI names (strings) as values", type(bad[0]).__name__)
    try:
        return {int(k): v for k, v in raw.items()}
    except (TypeError, ValueError):
        raise SourceError(path, "<mapping>", "integer label values as keys", str(list(raw)[:5])) from None


def _read_npy_mapping(path: Path):
    fmt = np.lib.format
    with open(path, "rb") as fh:
        try:
            version = fmt.read_magic(fh)
            shape, _, dtype = (fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0)(fh)
        except ValueError as e:
            raise SourceError(path, "<file>", "a .npy file", str(e)) from None
        if dtype != np.dtype(object):
            raise SourceError(path, "<array>", "a saved {value: name} dict (object array)", f"dtype {dtype}")
        import pickle

        try:
            arr = _refusing_unpickler(fh, path).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, IndexError, TypeError) as e:
            raise SourceError(path, "<pickle>", "a pickled {value: name} dict", f"unreadable ({e})") from None
    items = arr.state[4] if isinstance(arr, _Inert) and isinstance(arr.state, tuple) and len(arr.state) == 5 else None
    if not isinstance(items, list) or len(items) != 1 or tuple(shape) != ():
        raise SourceError(path, "<array>", "a 0-d object array holding one dict", f"shape {shape}")
    return items[0]


class Algonauts2023Importer(Importer):
    """Import the Algonauts 2023 challenge data.

    Options
    -------
    fsaverage_dir : FreeSurfer fsaverage subject directory (default ``<root>/fsaverage``, then
                    ``$SUBJECTS_DIR/fsaverage``); vertex coordinates come from its surfaces
    surface : 'white' (default), 'pial', 'sphere', ...
    nsd_root : optional NSD root; if given, fsaverage ``{lh,rh}.ncsnr.mgh`` of the subject is
               imported as voxels/ncsnr (mapped to the challenge vertices)
    """

    name = "algonauts2023"
    default_options = {"fsaverage_dir": None, "surface": "white", "nsd_root": None}

    def present(self, subject: str) -> bool:
        return (self.root / subject).is_dir()

    def fsaverage_dir(self) -> Path:
        if self.options["fsaverage_dir"]:
            return Path(self.options["fsaverage_dir"])
        local = self.root / "fsaverage"
        if local.is_dir() or not os.environ.get("SUBJECTS_DIR"):
            return local
        return Path(os.environ["SUBJECTS_DIR"]) / "fsaverage"

    def check(self, subjects):
        for s in subjects:
            for h in HEMIS:
                self.need(self.path("fmri", subject=s, hemi=h), f"Algonauts training fMRI of {s} ({h})")
                self.need(self.path("all_vertices", subject=s, hemi=h), f"challenge-vertex mask of {s} ({h})")
            self.need(self.path("train_images", subject=s), f"training images of {s}")
        for h in HEMIS:
            self.need(self.fsaverage_dir() / "surf" / f"{h}.{self.options['surface']}",
                      "an fsaverage surface (set -o fsaverage_dir=... or $SUBJECTS_DIR)")
        atlas = str(self.roi).partition(":")[0]
        if self.roi not in ("all", "any") and atlas not in self.manifest["roi_atlases"]:
            raise SourceError(self.manifest["_path"], "roi",
                              f"'all', 'any' or an atlas among {sorted(self.manifest['roi_atlases'])}", str(self.roi))

    def _images(self, subject: str, split: str) -> list[tuple[int, int, Path]]:
        """[(index within split, 0-based nsd id, path)] sorted by index."""
        d = self.path("train_images" if split == "train" else "test_images", subject=subject)
        if not d.is_dir():
            return []
        out = []
        for p in d.iterdir():
            m = NAME_RE.match(p.name)
            if m and m.group(1) == split:
                out.append((int(m.group(2)), int(m.group(3)) - int(self.manifest.get("nsd_id_base", 0)), p))
        return sorted(out)

    def plan_stimuli(self, subjects):
        paths, train_ids, test_ids = {}, set(), set()
        for s in subjects:
            for split, bucket in (("train", train_ids), ("test", test_ids)):
                for _, nsd, p in self._images(s, split):
                    paths.setdefault(nsd, p)
                    bucket.add(nsd)
        if not train_ids:
            raise SourceError(self.path("train_images", subject=subjects[0]), "<directory>",
                              "train-NNNN_nsd-XXXXX.png images", "none")
        ids = sorted(paths)
        # An image with responses anywhere is train: test images have no released responses,
        # so calling a shared image "test" would only throw training data away.
        split = np.array([SPLIT_TRAIN if i in train_ids else SPLIT_TEST for i in ids], np.uint8)

        def load(rows):
            for r in rows:
                yield load_image_file(paths[ids[r]], self.image_size)

        return StimulusPlan(ids=[f"nsd-{i:05d}" for i in ids], split=split, load=load,
                            sources=[paths[i] for i in ids])

    def plan_subject(self, subject, stimuli):
        from nibabel.freesurfer import read_geometry

        report: dict = {}
        train, src_rows = self._training_rows(subject, report)
        absent = self._missing_roi_files(subject, report)
        files, fmri, coords, hemi_idx, vertex, atlases = [], [], [], [], [], {}
        for h_i, h in enumerate(HEMIS):
            p = self.path("fmri", subject=subject, hemi=h)
            arr = np.load(p, mmap_mode="r")
            if arr.ndim != 2 or arr.shape[0] != self._n_rows(subject):
                raise SourceError(p, "<array>", f"({self._n_rows(subject)} training rows like lh, n_vertices)",
                                  str(arr.shape))
            mpath = self.path("all_vertices", subject=subject, hemi=h)
            mask = np.load(mpath).astype(bool).ravel()
            fs_idx = np.flatnonzero(mask)
            if len(fs_idx) != arr.shape[1]:
                raise SourceError(mpath, "<array>", f"{arr.shape[1]} challenge vertices like {p.name}",
                                  str(len(fs_idx)))
            surf = self.fsaverage_dir() / "surf" / f"{h}.{self.options['surface']}"
            xyz, _ = read_geometry(str(surf))
            if len(xyz) != len(mask):
                raise SourceError(surf, "<surface>", f"{len(mask)} vertices like {mpath.name}", str(len(xyz)))
            coords.append(xyz[fs_idx])
            hemi_idx.append(np.full(len(fs_idx), h_i, np.int8))
            vertex.append(fs_idx)
            fmri.append(p)
            files += [p, mpath, surf]
            for atlas in self.manifest["roi_atlases"]:
                rp = self.path("roi", subject=subject, hemi=h, atlas=atlas)
                if atlas not in absent:
                    v = np.load(rp).ravel().astype(np.int16)
                    if len(v) != len(fs_idx):
                        raise SourceError(rp, "<array>", f"{len(fs_idx)} challenge vertices", str(len(v)))
                    atlases.setdefault(atlas, []).append(v)
                    files.append(rp)
        full, label_tables = {}, []
        for atlas, parts in atlases.items():
            mp = self.path("roi_mapping", subject=subject, atlas=atlas)
            labels = {int(k): str(v) for k, v in self.manifest["roi_atlases"][atlas]["labels"].items()}
            # a plain-text label map beside the .npy wins (no pickle involved at all)
            source = "source manifest"  # the challenge's tables, used when no mapping file is there
            for cand in (mp.with_suffix(".json"), mp.with_suffix(".yaml"), mp):
                if cand.exists():
                    labels = {k: v for k, v in read_label_mapping(cand).items() if k != 0}
                    files.append(cand)
                    source = cand.name
                    break
            label_tables.append(f"{atlas} ({source})")
            full[atlas] = RoiAtlas(np.concatenate(parts), labels)
        n_all = sum(len(v) for v in vertex)
        where = self.path("roi", subject=subject, hemi="lh", atlas=str(self.roi).partition(":")[0])
        sel = np.ones(n_all, bool) if self.roi == "all" else self.parse_roi(full, where)
        if len(sel) != n_all or not sel.any():
            raise SourceError(where, "roi", f"at least one challenge vertex selected by '{self.roi}'", "none")
        coords = np.concatenate(coords).astype(np.float32)[sel]
        rois = {a: RoiAtlas(np.maximum(r.values[sel], 0), r.labels) for a, r in full.items()}
        hemi_idx, vertex = np.concatenate(hemi_idx)[sel], np.concatenate(vertex)[sel]
        ncsnr = None
        if self.options["nsd_root"]:
            import nibabel as nib

            parts = []
            for h_i, h in enumerate(HEMIS):
                p = Path(self.options["nsd_root"]) / self.manifest["files"]["nsd_ncsnr"].format(subject=subject, hemi=h)
                self.need(p, f"NSD fsaverage ncsnr of {subject} (option nsd_root)")
                parts.append(nifti_array(p, np.float32).ravel()[vertex[hemi_idx == h_i]])
                files.append(p)
            ncsnr = np.concatenate(parts)
        rows = np.array([stimuli.row[f"nsd-{nsd:05d}"] for _, nsd, _ in train], np.int64)
        n_lh = int(np.load(fmri[0], mmap_mode="r").shape[1])
        sel_lh, sel_rh = sel[:n_lh], sel[n_lh:]
        test = self._images(subject, "test")
        if [i for i, _, _ in test] != list(range(1, len(test) + 1)):
            raise SourceError(self.path("test_images", subject=subject), "<directory>",
                              "test-0001 ... test-NNNN images without gaps", str([i for i, _, _ in test][:5]))
        test_rows = np.array([stimuli.row[f"nsd-{nsd:05d}"] for _, nsd, _ in test], np.int64)

        def write(w):
            w.write_group("voxels", {"hemi": hemi_idx, "vertex": vertex})
            w.write_group("challenge", {"test_stimulus": test_rows,
                                        "test_name": np.array([p.name for _, _, p in test], dtype=object).astype("S")},
                          attrs={"n_vertices": np.array([n_lh, len(sel) - n_lh], np.int64), "roi": str(self.roi),
                                 "description": "Algonauts 2023 test images in challenge order (stimulus rows) "
                                                "and challenge vertex counts per hemisphere (lh, rh)"})
            lh, rh = np.load(fmri[0], mmap_mode="r"), np.load(fmri[1], mmap_mode="r")
            for start in range(0, len(rows), 256):  # memory-mapped, so only a block is read
                sl = slice(start, start + 256)
                src = src_rows[sl]  # fMRI rows with an image (all, unless images were missing)
                block = np.concatenate([np.asarray(lh[src])[:, sel_lh], np.asarray(rh[src])[:, sel_rh]], axis=1)
                w.write_trials(block.astype(np.float32), rows[sl])

        return SubjectPlan(subject=subject, source_subject=subject, n_trials=len(rows), coords=coords,
                           space=f"fsaverage ({self.options['surface']} surface)",
                           units="z-scored betas averaged over repeats", rois=rois, ncsnr=ncsnr,
                           sources=files, write=write,
                           attrs={"responses_are": "per-image averages over repeats (one row per image)"},
                           inventory={"roi_files": sorted(p.name for p in files if "_challenge_space" in p.name),
                                      "label_tables": label_tables}, report=report)

    def _n_rows(self, subject: str) -> int:
        """Training rows (images) of ``subject``: the length of ``lh_training_fmri.npy``."""
        p = self.path("fmri", subject=subject, hemi="lh")
        arr = np.load(p, mmap_mode="r")
        if arr.ndim != 2:
            raise SourceError(p, "<array>", "(n_train_images, n_vertices)", str(arr.shape))
        return int(arr.shape[0])

    def _training_rows(self, subject: str, report: dict) -> tuple[list, np.ndarray]:
        """Training images and their fMRI rows: ([(index, nsd id, path)], int64 (n_found,)).

        Row ``i`` of the training fMRI is image ``train-{i+1:04d}``; an index without its image
        goes through :meth:`missing` (kind ``images``): an error, or that row left out and counted.
        """
        train, n = self._images(subject, "train"), self._n_rows(subject)
        idx = [i for i, _, _ in train]
        d = self.path("train_images", subject=subject)
        if len(set(idx)) != len(idx) or (idx and (min(idx) < 1 or max(idx) > n)):
            raise SourceError(d, "<directory>", f"one image per training row, train-0001..train-{n:04d}",
                              f"indices {min(idx)}..{max(idx)} ({len(idx)} images, {len(set(idx))} distinct)")
        absent = sorted(set(range(1, n + 1)) - set(idx))
        self.missing("images", d, f"an image for every row of the training fMRI (train-0001..train-{n:04d})",
                     [f"train-{i:04d}" for i in absent], report, "missing_images")
        if absent:
            report["trials_dropped_missing_image"] = len(absent)
        return train, np.array([i - 1 for i in idx], np.int64)

    def _missing_roi_files(self, subject: str, report: dict) -> set[str]:
        """Atlases of the manifest lacking a hemisphere's file, through :meth:`missing` (kind
        ``rois``, items ``hemi.atlas``); such an atlas is left out whole, never half of it."""
        atlases = self.manifest["roi_atlases"]
        absent = [(h, a) for a in atlases for h in HEMIS
                  if not self.path("roi", subject=subject, hemi=h, atlas=a).exists()]
        if absent:
            h, a = absent[0]
            self.missing("rois", self.path("roi", subject=subject, hemi=h, atlas=a),
                         f"both hemisphere files of every ROI atlas ({', '.join(atlases)})",
                         [f"{h}.{a}" for h, a in absent], report, "missing_roi_masks")
        return {a for _, a in absent}

"""The canonical store: one directory per dataset (see docs/datasets.md).

Layout::

    <root>/manifest.yaml     what was imported, from where, split rule, generator params
    <root>/stimuli.h5        images uint8 (N, H, W, 3), stimulus_id (N,), optional split (N,) uint8
    <root>/subjNN.h5         responses (n_trials, n_voxels), trial_stimulus, voxels/..., truth/...

Writers stream rows and write to a temporary name that is renamed only when every row has been
written, so an interrupted import never leaves a file that a later step trusts.  Readers validate
and turn every malformed file into a :class:`StoreError` naming the file, the field and what was
expected.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import h5py
import numpy as np
import yaml

from brainenc.ioutil import atomic_path, file_digest, tmp_name

STORE_FORMAT_VERSION = 1
SPLIT_TRAIN = 0
SPLIT_TEST = 1
MANIFEST = "manifest.yaml"
STIMULI = "stimuli.h5"


class StoreError(ValueError):
    """A store file is missing or malformed.

    The message always names the file, the field and what was expected.
    """

    input_error = True  # the CLI prints the message alone, without a traceback

    def __init__(self, path: str | os.PathLike, field: str, expected: str, found: str | None = None):
        self.path, self.field, self.expected, self.found = str(path), field, expected, found
        msg = f"{path}: field '{field}': expected {expected}"
        if found is not None:
            msg += f", found {found}"
        super().__init__(msg)


# ----------------------------------------------------------------------------- names

# Dataset and subject names become file names (``<root>/<subject>.h5``, results per pair), so a
# name read from a manifest must not be able to leave the directory: no separators, no "..".
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def check_name(value, path: str | os.PathLike, field: str) -> str:
    """Return ``value`` as a str if it is a safe dataset/subject name, else raise StoreError."""
    name = str(value)
    if not _SAFE_NAME.match(name) or ".." in name:
        raise StoreError(path, field, "a plain name (letters, digits, '_', '-', '.'; no path "
                         "separators or '..', at most 128 characters)", repr(name))
    return name


# ----------------------------------------------------------------------------- response values

#: Larger finite responses are not z-scores, percent signal change or betas: raw scanner
#: intensities, a wrong scale factor or garbage.  Validation and training both refuse them.
MAX_ABS_RESPONSE = 1e5


def check_scale(block: np.ndarray, path: str | os.PathLike, rows: np.ndarray | None = None) -> None:
    """Raise StoreError if a finite value of ``block`` (n_rows, n_voxels) exceeds
    :data:`MAX_ABS_RESPONSE`.  Non-finite values are missing data, not errors (see
    :func:`scan_responses`).  ``rows`` are the trial rows of ``block``, for the message."""
    with np.errstate(invalid="ignore"):
        big = np.isfinite(block) & (np.abs(block) > MAX_ABS_RESPONSE)
    if big.any():
        r, v = np.argwhere(big)[0]
        row = int(rows[r]) if rows is not None else int(r)
        raise StoreError(path, "responses", f"|values| <= {MAX_ABS_RESPONSE:g} (z-scores, percent signal "
                         "change or betas; rescale the source or fix the importer)",
                         f"{float(block[r, v]):.4g} at trial {row}, voxel {int(v)}")


def scan_responses(block: np.ndarray) -> tuple[int, int]:
    """Missing data in ``block`` (n_rows, n_voxels): (non-finite values, rows with no finite value).

    NaN and +-Inf are both missing: repeat averages use the finite trials only, losses and
    metrics drop the missing pairs.  A row with no finite value is a dropped trial.
    """
    ok = np.isfinite(block)
    return int(ok.size - ok.sum()), int((~ok.any(axis=1)).sum()) if block.shape[1] else 0


# ----------------------------------------------------------------------------- manifests


def write_yaml_atomic(path: str | os.PathLike, data: Mapping) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            yaml.safe_dump(_plain(data), f, sort_keys=False)


def _plain(obj):
    """Convert numpy scalars/arrays inside nested containers to plain Python for YAML."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def file_checksum(path: str | os.PathLike, algo: str = "sha256") -> str:
    """A file's checksum as manifests record it: ``"<algo>:<hex digest>"``."""
    return f"{algo}:{file_digest(path, algo)}"


# ----------------------------------------------------------------------------- writers


class _AtomicWriter:
    """Close renames the temporary file into place only when every row was written."""

    path: Path
    tmp: Path
    f: h5py.File
    written: int
    _expected: int
    _field: str

    def close(self) -> None:
        if self.written != self._expected:
            self.abort()
            raise StoreError(self.path, self._field, f"{self._expected} {self._unit} written", str(self.written))
        self.f.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.f.close()
        if self.tmp.exists():
            self.tmp.unlink()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        else:
            self.abort()


class StimuliWriter(_AtomicWriter):
    """Stream images into ``stimuli.h5`` (one image per chunk).

    Parameters
    ----------
    path : path of the final ``stimuli.h5``
    n_images : N, number of images that will be written
    image_size : (H, W)
    visual_angle_deg : the width of the image on the screen in degrees of visual angle
    """

    def __init__(self, path, n_images: int, image_size: tuple[int, int], visual_angle_deg: float,
                 attrs: Mapping | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = tmp_name(self.path)
        self.n_images = int(n_images)
        self.written, self._expected, self._field, self._unit = 0, self.n_images, "images", "images"
        h, w = image_size
        self.f = h5py.File(self.tmp, "w")
        self.images = self.f.create_dataset("images", (self.n_images, h, w, 3), dtype="uint8",
                                            chunks=(1, h, w, 3))
        self.ids = self.f.create_dataset("stimulus_id", (self.n_images,), dtype=h5py.string_dtype())
        self.f.attrs["visual_angle_deg"] = float(visual_angle_deg)
        self.f.attrs["format_version"] = STORE_FORMAT_VERSION
        for k, v in (attrs or {}).items():
            self.f.attrs[k] = v

    def write(self, images: np.ndarray, stimulus_ids: Sequence[str]) -> None:
        """Append ``images`` uint8 (n, H, W, 3) with their ids."""
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.shape[1:] != self.images.shape[1:]:
            raise StoreError(self.path, "images", f"uint8 {self.images.shape[1:]}",
                             f"{images.dtype} {images.shape[1:]}")
        n = len(images)
        if len(stimulus_ids) != n:
            raise StoreError(self.path, "stimulus_id", f"{n} ids", f"{len(stimulus_ids)}")
        if self.written + n > self.n_images:
            raise StoreError(self.path, "images", f"at most {self.n_images} images",
                             f"{self.written + n}")
        self.images[self.written:self.written + n] = images
        self.ids[self.written:self.written + n] = list(stimulus_ids)
        self.written += n

    def write_array(self, name: str, values: np.ndarray, attrs: Mapping | None = None) -> None:
        """Write a per-image array (first axis N), e.g. ``split`` or ``labels/face``."""
        values = np.asarray(values)
        if values.shape[0] != self.n_images:
            raise StoreError(self.path, name, f"first axis {self.n_images}", f"{values.shape}")
        ds = self.f.create_dataset(name, data=values)
        for k, v in (attrs or {}).items():
            ds.attrs[k] = v



@dataclass
class RoiAtlas:
    """One ROI atlas of a subject: ``values`` int16 (n_voxels,), ``labels`` {value: name}, 0 = none."""

    values: np.ndarray
    labels: dict[int, str]

    def order(self) -> list[str]:
        """The atlas's ROI names in the order of their label values (V1, V2, V3, hV4, ... as the
        atlas numbers them): the order tables and figures list ROIs in."""
        return [str(self.labels[k]) for k in sorted(self.labels) if int(k) != 0]

    def names(self) -> np.ndarray:
        """ROI name per voxel, ``"none"`` where unlabelled.  Returns (n_voxels,) object array."""
        lut = {0: "none", **{int(k): str(v) for k, v in self.labels.items()}}
        return np.array([lut.get(int(v), f"unknown:{int(v)}") for v in self.values], dtype=object)


class SubjectWriter(_AtomicWriter):
    """Stream single-trial responses of one subject into ``subjNN.h5``.

    Parameters
    ----------
    path : final path of ``subjNN.h5``
    n_trials, n_voxels : shape of ``responses``
    coords : float32 (n_voxels, 3), millimetres in ``space``
    rois : {atlas: RoiAtlas}
    ncsnr : float32 (n_voxels,) or None
    dtype : 'float32' or 'float16' for ``responses``
    """

    def __init__(self, path, *, dataset: str, subject: str, n_trials: int, n_voxels: int,
                 coords: np.ndarray, space: str, field_strength_tesla: float, units: str,
                 rois: Mapping[str, RoiAtlas] | None = None, ncsnr: np.ndarray | None = None,
                 dtype: str = "float32", rows_per_chunk: int = 8, attrs: Mapping | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = tmp_name(self.path)
        self.n_trials, self.n_voxels = int(n_trials), int(n_voxels)
        if np.dtype(dtype) not in (np.float16, np.float32):
            raise StoreError(self.path, "responses", "dtype float16 or float32", str(dtype))
        coords = np.asarray(coords, dtype=np.float32)
        if coords.shape != (self.n_voxels, 3):
            raise StoreError(self.path, "voxels/coords", f"shape ({n_voxels}, 3)", str(coords.shape))
        self.written, self._expected, self._field, self._unit = 0, self.n_trials, "responses", "trials"
        self.f = h5py.File(self.tmp, "w")
        self.responses = self.f.create_dataset(
            "responses", (self.n_trials, self.n_voxels), dtype=dtype,
            chunks=(max(1, min(rows_per_chunk, self.n_trials)), self.n_voxels))
        self.trial_stimulus = self.f.create_dataset("trial_stimulus", (self.n_trials,), dtype="int64")
        self.trial_session = self.f.create_dataset("trial_session", (self.n_trials,), dtype="int32",
                                                   fillvalue=-1)
        vox = self.f.create_group("voxels")
        vox.create_dataset("coords", data=coords).attrs["space"] = space
        if ncsnr is not None:
            ncsnr = np.asarray(ncsnr, dtype=np.float32)
            if ncsnr.shape != (self.n_voxels,):
                raise StoreError(self.path, "voxels/ncsnr", f"shape ({n_voxels},)", str(ncsnr.shape))
            vox.create_dataset("ncsnr", data=ncsnr)
        rg = vox.create_group("rois")
        for atlas, roi in (rois or {}).items():
            values = np.asarray(roi.values, dtype=np.int16)
            if values.shape != (self.n_voxels,):
                raise StoreError(self.path, f"voxels/rois/{atlas}", f"shape ({n_voxels},)",
                                 str(values.shape))
            ds = rg.create_dataset(atlas, data=values)
            ds.attrs["labels"] = yaml.safe_dump({int(k): str(v) for k, v in roi.labels.items()})
        a = self.f.attrs
        a["dataset"], a["subject"], a["space"], a["units"] = dataset, subject, space, units
        a["field_strength_tesla"] = float(field_strength_tesla)
        a["format_version"] = STORE_FORMAT_VERSION
        for k, v in (attrs or {}).items():
            a[k] = v

    def write_trials(self, responses: np.ndarray, trial_stimulus: np.ndarray,
                     trial_session: np.ndarray | None = None) -> None:
        """Append rows: ``responses`` (n, n_voxels), ``trial_stimulus`` int (n,)."""
        responses = np.asarray(responses)
        n = responses.shape[0]
        if responses.ndim != 2 or responses.shape[1] != self.n_voxels:
            raise StoreError(self.path, "responses", f"(n, {self.n_voxels})", str(responses.shape))
        if self.written + n > self.n_trials:
            raise StoreError(self.path, "responses", f"at most {self.n_trials} trials",
                             str(self.written + n))
        sl = slice(self.written, self.written + n)
        self.responses[sl] = responses.astype(self.responses.dtype, copy=False)
        self.trial_stimulus[sl] = np.asarray(trial_stimulus, dtype=np.int64)
        if trial_session is not None:
            self.trial_session[sl] = np.asarray(trial_session, dtype=np.int32)
        self.written += n

    def write_group(self, name: str, arrays: Mapping[str, np.ndarray],
                    attrs: Mapping | None = None) -> None:
        """Write extra arrays under ``name/`` (e.g. ``truth``)."""
        g = self.f.require_group(name)
        for k, v in arrays.items():
            g.create_dataset(k, data=np.asarray(v))
        for k, v in (attrs or {}).items():
            g.attrs[k] = v



def write_manifest(root: str | os.PathLike, manifest: Mapping) -> Path:
    """Write ``manifest.yaml`` atomically.  Write it *last*: a store without it is incomplete."""
    from brainenc import __version__

    data = {"format_version": STORE_FORMAT_VERSION, "brainenc_version": __version__, **manifest}
    path = Path(root) / MANIFEST
    write_yaml_atomic(path, data)
    return path


# ----------------------------------------------------------------------------- reader


@dataclass
class SubjectInfo:
    """Everything about one subject except the responses themselves (small, kept in memory)."""

    dataset: str
    subject: str
    path: Path
    n_trials: int
    n_voxels: int
    coords: np.ndarray  # float32 (n_voxels, 3)
    space: str
    field_strength_tesla: float
    units: str
    trial_stimulus: np.ndarray  # int64 (n_trials,)
    trial_session: np.ndarray | None
    ncsnr: np.ndarray | None  # float32 (n_voxels,)
    rois: dict[str, RoiAtlas] = field(default_factory=dict)
    has_truth: bool = False

    @property
    def key(self) -> str:
        return f"{self.dataset}/{self.subject}"


def _open_h5(path: Path, what: str) -> h5py.File:
    """Open ``path`` read-only, turning a missing or unreadable file into a StoreError."""
    if not path.exists():
        raise StoreError(path, "<file>", what, "missing")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise StoreError(path, "<file>", "a readable HDF5 file", str(e)) from None


def _roi_labels(ds: h5py.Dataset, path: Path, atlas: str) -> dict[int, str]:
    """The ``labels`` attribute of an ROI atlas: YAML {int value: name}."""
    field = f"voxels/rois/{atlas}/attrs/labels"
    raw = ds.attrs.get("labels", "{}")
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    try:
        labels = yaml.safe_load(raw) if isinstance(raw, str) else None
    except yaml.YAMLError as e:
        raise StoreError(path, field, "YAML {value: name}", str(e).splitlines()[0]) from None
    labels = {} if labels is None else labels
    if not isinstance(labels, dict):
        raise StoreError(path, field, "YAML {value: name}", f"{type(labels).__name__} {str(labels)[:60]!r}")
    try:
        out = {int(k): str(v) for k, v in labels.items()}
    except (TypeError, ValueError):
        raise StoreError(path, field, "integer values as keys", str(list(labels)[:5])) from None
    return out


def _need(f: h5py.File | h5py.Group, name: str, path: Path, what: str) -> h5py.Dataset:
    if name not in f:
        raise StoreError(path, name, what, "missing")
    obj = f[name]
    if not isinstance(obj, h5py.Dataset):
        raise StoreError(path, name, f"a dataset ({what})", "a group")
    return obj


class Store:
    """Read-only view of one canonical dataset directory.

    Small metadata (ids, coords, ROIs, trial tables) is read eagerly and validated on
    construction; response matrices are opened lazily by the caller (per worker) with
    :meth:`open_subject`.
    """

    def __init__(self, root: str | os.PathLike, validate: bool = True):
        self.root = Path(root)
        mpath = self.root / MANIFEST
        if not self.root.is_dir():
            raise StoreError(self.root, "<directory>", "a canonical store directory", "missing")
        if not mpath.exists():
            raise StoreError(mpath, "<file>", "a manifest (written last by a complete import)", "missing")
        try:
            self.manifest = yaml.safe_load(mpath.read_text()) or {}
        except yaml.YAMLError as e:
            raise StoreError(mpath, "<file>", "valid YAML", str(e).splitlines()[0]) from None
        if not isinstance(self.manifest, dict) or "dataset" not in self.manifest:
            raise StoreError(mpath, "dataset", "a dataset name", "missing")
        self.name = check_name(self.manifest["dataset"], mpath, "dataset")
        for s in self.subjects:
            check_name(s, mpath, "subjects")
        self._subjects: dict[str, SubjectInfo] = {}
        self._read_stimuli()
        if validate:
            for s in self.subjects:
                self.subject(s)

    # -- stimuli
    @property
    def stimuli_path(self) -> Path:
        return self.root / STIMULI

    def _read_stimuli(self) -> None:
        p = self.stimuli_path
        with _open_h5(p, "stimuli.h5") as f:
            img = _need(f, "images", p, "uint8 (N, H, W, 3)")
            if img.dtype != np.uint8 or img.ndim != 4 or img.shape[-1] != 3:
                raise StoreError(p, "images", "uint8 (N, H, W, 3)", f"{img.dtype} {img.shape}")
            self.n_stimuli, self.image_size = img.shape[0], tuple(img.shape[1:3])
            ids = _need(f, "stimulus_id", p, f"({self.n_stimuli},) strings")
            if ids.shape != (self.n_stimuli,):
                raise StoreError(p, "stimulus_id", f"shape ({self.n_stimuli},)", str(ids.shape))
            self.stimulus_ids = np.array([s.decode() if isinstance(s, bytes) else str(s) for s in ids[:]],
                                         dtype=object)
            uniq, counts = np.unique(self.stimulus_ids.astype(str), return_counts=True)
            if (counts > 1).any():
                dup = uniq[counts > 1]
                raise StoreError(p, "stimulus_id", "one row per stimulus (unique ids; splits and "
                                 "results are keyed by id)", f"{len(dup)} repeated, e.g. {dup[0]!r}")
            if "visual_angle_deg" not in f.attrs:
                raise StoreError(p, "attrs/visual_angle_deg", "a float (degrees)", "missing")
            self.visual_angle_deg = float(f.attrs["visual_angle_deg"])
            if "split" in f:
                split = f["split"][:]
                if split.shape != (self.n_stimuli,) or not np.isin(split, [SPLIT_TRAIN, SPLIT_TEST]).all():
                    raise StoreError(p, "split", f"({self.n_stimuli},) values in {{0 train, 1 test}}",
                                     f"{split.shape} values {np.unique(split)[:5]}")
                self.split = split.astype(np.uint8)
            else:
                self.split = None
            self.stimulus_labels = {k: f["labels"][k][:] for k in f["labels"]} if "labels" in f else {}

    # -- subjects
    @property
    def subjects(self) -> list[str]:
        """The subjects in the manifest's order: its ``subjects`` list, or the names of its
        ``subjects`` mapping (name -> anything a third-party writer records about the subject,
        ignored here); without either, the ``subj*.h5`` files present, sorted."""
        listed = self.manifest.get("subjects")
        if listed:
            if isinstance(listed, dict):
                listed = list(listed)
            if not isinstance(listed, list):
                raise StoreError(self.root / MANIFEST, "subjects",
                                 "a list of subject names, or a mapping subject name -> information",
                                 repr(listed)[:80])
            return [str(s) for s in listed]
        return sorted(p.stem for p in self.root.glob("subj*.h5"))

    def subject_path(self, subject: str) -> Path:
        return self.root / f"{subject}.h5"

    def subject(self, subject: str) -> SubjectInfo:
        """Validated metadata of ``subject`` (cached)."""
        if subject not in self._subjects:
            if subject not in self.subjects:
                raise StoreError(self.root / MANIFEST, "subjects", f"one of {self.subjects}", subject)
            self._subjects[subject] = self._read_subject(subject)
        return self._subjects[subject]

    def _read_subject(self, subject: str) -> SubjectInfo:
        p = self.subject_path(subject)
        with _open_h5(p, f"the responses of {subject}") as f:
            r = _need(f, "responses", p, "float16/float32 (n_trials, n_voxels)")
            if r.ndim != 2 or r.dtype not in (np.float16, np.float32):
                raise StoreError(p, "responses", "float16/float32 (n_trials, n_voxels)", f"{r.dtype} {r.shape}")
            n_trials, n_voxels = r.shape
            if n_trials == 0 or n_voxels == 0:
                raise StoreError(p, "responses", "at least one trial and one voxel", f"shape {r.shape}")
            ts = _need(f, "trial_stimulus", p, f"int ({n_trials},)")
            if ts.shape != (n_trials,) or not np.issubdtype(ts.dtype, np.integer):
                raise StoreError(p, "trial_stimulus", f"int ({n_trials},)", f"{ts.dtype} {ts.shape}")
            ts = ts[:].astype(np.int64)
            if n_trials and (ts.min() < 0 or ts.max() >= self.n_stimuli):
                bad = ts[(ts < 0) | (ts >= self.n_stimuli)][0]
                raise StoreError(p, "trial_stimulus", f"row indices in [0, {self.n_stimuli}) of stimuli.h5",
                                 f"{bad}")
            session = None
            if "trial_session" in f:
                session = f["trial_session"]
                if session.shape != (n_trials,) or not np.issubdtype(session.dtype, np.integer):
                    raise StoreError(p, "trial_session", f"int ({n_trials},), one session per trial",
                                     f"{session.dtype} {session.shape}")
                session = session[:]
            coords = _need(f, "voxels/coords", p, f"float32 ({n_voxels}, 3)")
            if coords.shape != (n_voxels, 3):
                raise StoreError(p, "voxels/coords", f"shape ({n_voxels}, 3) matching responses",
                                 str(coords.shape))
            space = str(coords.attrs.get("space", f.attrs.get("space", "unknown")))
            coords = coords[:].astype(np.float32)
            if not np.isfinite(coords).all():
                raise StoreError(p, "voxels/coords", "finite millimetre coordinates", "NaN/inf")
            ncsnr = None
            if "voxels/ncsnr" in f:
                ncsnr = f["voxels/ncsnr"][:].astype(np.float32)
                if ncsnr.shape != (n_voxels,):
                    raise StoreError(p, "voxels/ncsnr", f"shape ({n_voxels},)", str(ncsnr.shape))
                # NaN means unknown (no noise ceiling for that voxel); a negative or infinite
                # ncsnr would give a plausible-looking but wrong ceiling (it enters squared)
                wrong = np.isinf(ncsnr) | (ncsnr < 0)
                if wrong.any():
                    i = int(np.flatnonzero(wrong)[0])
                    raise StoreError(p, "voxels/ncsnr", "finite values >= 0 (NaN = unknown)",
                                     f"{int(wrong.sum())} others, e.g. {ncsnr[i]} at voxel {i}")
            rois = {}
            if "voxels/rois" in f:
                for atlas, ds in f["voxels/rois"].items():
                    if ds.shape != (n_voxels,):
                        raise StoreError(p, f"voxels/rois/{atlas}", f"shape ({n_voxels},)", str(ds.shape))
                    rois[atlas] = RoiAtlas(ds[:].astype(np.int16), _roi_labels(ds, p, atlas))
            for key in ("dataset", "subject"):
                if key not in f.attrs:
                    raise StoreError(p, f"attrs/{key}", "a string", "missing")
            return SubjectInfo(
                dataset=self.name, subject=subject, path=p, n_trials=n_trials, n_voxels=n_voxels,
                coords=coords, space=space, field_strength_tesla=float(f.attrs.get("field_strength_tesla", np.nan)),
                units=str(f.attrs.get("units", "")), trial_stimulus=ts, trial_session=session,
                ncsnr=ncsnr, rois=rois, has_truth="truth" in f)

    def check_responses(self, subject: str, rows_per_read: int = 2048) -> dict:
        """Deep check: scan responses in row chunks.

        Raises StoreError on voxels that are non-finite in every trial and on absurd values
        (:func:`check_scale`, the same check training applies to each batch).  Returns
        ``{"nonfinite_values": int, "dropped_trials": int}``: missing data that fit tolerates
        (left out of repeat averages, losses and metrics).
        """
        info = self.subject(subject)
        seen = np.zeros(info.n_voxels, dtype=bool)
        bad_values = dead_rows = 0
        with h5py.File(info.path, "r") as f:
            r = f["responses"]
            for start in range(0, info.n_trials, rows_per_read):
                block = r[start:start + rows_per_read]
                check_scale(block, info.path, np.arange(start, start + len(block)))
                seen |= np.isfinite(block).any(axis=0)
                nv, nr = scan_responses(block)
                bad_values, dead_rows = bad_values + nv, dead_rows + nr
        if info.n_trials and not seen.all():
            bad = np.flatnonzero(~seen)
            raise StoreError(info.path, "responses",
                             "at least one finite value per voxel column",
                             f"{len(bad)} all-NaN columns, first {bad[:5].tolist()}")
        if self.split is not None:  # fit needs every voxel scored on the test images, too
            test = np.flatnonzero(self.split[info.trial_stimulus] == SPLIT_TEST)
            seen = np.zeros(info.n_voxels, dtype=bool)
            with h5py.File(info.path, "r") as f:
                for a in range(0, len(test), rows_per_read):
                    seen |= np.isfinite(f["responses"][test[a:a + rows_per_read]]).any(axis=0)
            if len(test) and not seen.all():
                bad = np.flatnonzero(~seen)
                raise StoreError(info.path, "responses", "a finite response of every voxel among the "
                                 "test trials (drop empty voxels at import)",
                                 f"{len(bad)} voxels without one, first {bad[:5].tolist()}")
        return {"nonfinite_values": bad_values, "dropped_trials": dead_rows}

    def validate(self, deep: bool = True) -> dict[str, dict]:
        """Check every subject; with ``deep``, also scan the responses.  Returns
        {subject: :meth:`check_responses` summary} (empty when not deep)."""
        out = {}
        for s in self.subjects:
            self.subject(s)
            if deep:
                out[s] = self.check_responses(s)
        return out

    @staticmethod
    def open_subject(info: SubjectInfo) -> h5py.File:
        return h5py.File(info.path, "r")

    def __repr__(self) -> str:
        return f"Store({self.root}, dataset={self.name}, subjects={self.subjects}, n_stimuli={self.n_stimuli})"

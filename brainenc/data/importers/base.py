"""Shared machinery of the source-dataset importers.

An importer turns one source dataset (files as its authors distribute them) into the canonical
store of :mod:`brainenc.data.store`.  Everything dataset-specific lives in a subclass of
:class:`Importer`; this module does the parts every dataset shares:

* reading the source manifest ``data_manifests/<name>.yaml`` and resolving paths under the root;
* resolving subject names (``subj01``, ``1``, or the source's own name such as ``CSI1``);
* atomic, resumable orchestration: the store manifest is removed first and written last, so an
  interrupted run never leaves a store that validates; each subject file records a fingerprint
  of the import options, and a re-run skips subjects whose file is complete and matches;
* recording source files with sizes and checksums;
* streaming stimuli into ``stimuli.h5``, resized to a configurable square size.

Reading the source files themselves (images, MATLAB, NIfTI) is :mod:`.source_files`'s job.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import h5py
import numpy as np
import yaml

from brainenc.data.images import to_rgb_square
from brainenc.data.importers.source_files import SourceError
from brainenc.data.store import (MANIFEST, STIMULI, SPLIT_TEST, SPLIT_TRAIN, RoiAtlas, StimuliWriter,
                                 SubjectWriter, check_name, file_checksum, write_manifest)

ENV_DATA = "BRAINENC_DATA"
ENV_MANIFESTS = "BRAINENC_MANIFESTS"


# ----------------------------------------------------------------------------- source manifests


def manifests_dir() -> Path:
    """Directory holding ``<dataset>.yaml`` (``$BRAINENC_MANIFESTS`` or the repository's)."""
    env = os.environ.get(ENV_MANIFESTS)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "data_manifests"


def load_source_manifest(name: str, path: str | os.PathLike | None = None) -> dict:
    """Read and minimally check the source manifest of dataset ``name``."""
    p = Path(path) if path is not None else manifests_dir() / f"{name}.yaml"
    if not p.exists():
        raise SourceError(p, "<file>", f"the source manifest of dataset '{name}'", "missing")
    try:
        m = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise SourceError(p, "<file>", "valid YAML", str(e).splitlines()[0]) from None
    for key in ("name", "subjects", "files", "field_strength_tesla", "visual_angle_deg", "split",
                "citation"):
        if key not in m:
            raise SourceError(p, key, "present in every source manifest", "missing")
    if m["name"] != name:
        raise SourceError(p, "name", f"'{name}'", str(m["name"]))
    m["_path"] = str(p)
    return m


# ----------------------------------------------------------------------------- small helpers


def store_subject_name(number: int) -> str:
    """Canonical subject name in every store: ``subj01``, ``subj02``, ..."""
    return f"subj{int(number):02d}"


def fingerprint(obj) -> str:
    """Stable short hash of a JSON-able description of the import options."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- plan objects


@dataclass
class StimulusPlan:
    """Every stimulus of the store, in ``stimuli.h5`` row order.

    ids : (N,) store stimulus ids, e.g. ``nsd-00012``
    split : uint8 (N,) 0 train / 1 test
    load : callable(rows) -> iterator of uint8 (H, W, 3) images (any size, resized later) in the
           order of ``rows``; importers read their source in whatever batches suit its layout.
    sources : source files the images come from (recorded with checksums)
    """

    ids: list[str]
    split: np.ndarray
    load: Callable[[Sequence[int]], Iterable[np.ndarray]]
    sources: list[Path] = field(default_factory=list)
    labels: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self):
        self.row = {s: i for i, s in enumerate(self.ids)}
        if len(self.row) != len(self.ids):
            raise ValueError("duplicate stimulus ids in plan")


@dataclass
class SubjectPlan:
    """What one subject's file will hold; ``write`` streams the rows into a SubjectWriter."""

    subject: str               # store name, subjNN
    source_subject: str        # the source's own name (e.g. CSI1, Subject3, sub-01)
    n_trials: int
    coords: np.ndarray         # float32 (n_voxels, 3) mm
    space: str
    units: str
    rois: dict[str, RoiAtlas]
    ncsnr: np.ndarray | None
    sources: list[Path]
    write: Callable[[SubjectWriter], None]
    attrs: dict = field(default_factory=dict)

    @property
    def n_voxels(self) -> int:
        return int(len(self.coords))


# ----------------------------------------------------------------------------- base importer


class Importer:
    """Base class: subclasses set ``name`` and implement the four ``plan_*``/``check`` hooks.

    Parameters
    ----------
    source : dataset root (default ``$BRAINENC_DATA/<name>``)
    out : store directory to create or resume
    subjects : subset to import (store names ``subj01``, numbers, or source names); default all
    roi : voxel selection, ``atlas`` or ``atlas:label1,label2`` (dataset default if None)
    image_size : side of the square stored images (manifest default if None)
    checksum : 'sha256' (default) or 'none' (record sizes only; for very large sources)
    dtype : 'float32' or 'float16' responses
    restart : delete any previous (partial) store content instead of resuming
    options : dataset-specific keyword options (documented on each subclass)
    """

    name: str = ""
    #: dataset-specific options and their defaults; unknown options are an error
    default_options: dict = {}

    def __init__(self, source=None, out=None, subjects=None, roi=None, image_size=None,
                 checksum: str = "sha256", dtype: str = "float32", restart: bool = False,
                 manifest: str | os.PathLike | None = None, **options):
        self.manifest = load_source_manifest(self.name, manifest)
        if source is None:
            base = os.environ.get(ENV_DATA)
            if not base:
                raise SourceError(f"${ENV_DATA}/{self.name}", "--source",
                                  f"a dataset root (pass --source or set ${ENV_DATA})", "neither given")
            source = Path(base) / self.name
        self.root = Path(source).expanduser()
        if out is None:
            raise SourceError("<out>", "--out", "an output store directory", "missing")
        self.out = Path(out).expanduser()
        self.image_size = int(image_size or self.manifest.get("image_size", 224))
        if self.image_size < 8:
            raise SourceError(self.manifest["_path"], "image_size", "an integer >= 8", str(image_size))
        if checksum not in ("sha256", "none"):
            raise SourceError(self.manifest["_path"], "checksum", "'sha256' or 'none'", checksum)
        self.checksum = checksum
        self.dtype = dtype
        self.restart = restart
        unknown = set(options) - set(self.default_options)
        if unknown:
            raise SourceError(self.manifest["_path"], "options",
                              f"options among {sorted(self.default_options)}", str(sorted(unknown)))
        self.options = {**self.default_options, **self.manifest.get("options", {}), **options}
        self.roi = roi if roi is not None else self.manifest.get("default_roi")
        self._subject_request = subjects

    # ---------------------------------------------------------------- paths and subjects

    def path(self, key: str, **fmt) -> Path:
        """Absolute path of manifest file ``key`` (a template filled with ``fmt``)."""
        try:
            template = self.manifest["files"][key]
        except KeyError:
            raise SourceError(self.manifest["_path"], f"files/{key}", "a file template", "missing") from None
        return self.root / template.format(**fmt)

    def need(self, path: Path, what: str) -> Path:
        """Return ``path`` or raise a SourceError saying what it should have been."""
        if not path.exists():
            raise SourceError(path, "<file>", what, "missing")
        return path

    def check_root(self) -> None:
        if not self.root.is_dir():
            raise SourceError(self.root, "<directory>", f"the root of the {self.name} dataset", "missing")

    def subject_table(self) -> dict[str, dict]:
        """{store name: manifest entry}; entries carry at least ``source`` (the source's name)."""
        table = {}
        for key, entry in self.manifest["subjects"].items():
            key = check_name(key, self.manifest["_path"], "subjects")  # becomes <out>/<key>.h5
            table[str(key)] = dict(entry or {})
            table[str(key)].setdefault("source", str(key))
        return table

    def resolve_subjects(self) -> list[str]:
        table = self.subject_table()
        if not self._subject_request:
            # Default: every subject of the manifest whose files are on disk (partial downloads
            # are common); explicitly requested subjects must all be present.
            found = [s for s in table if self.present(s)]
            if not found:
                raise SourceError(self.root, "subjects", f"files of at least one of {list(table)}", "none")
            return found
        alias = {}
        for store_name, entry in table.items():
            num = int("".join(c for c in store_name if c.isdigit()) or -1)
            for a in (store_name, entry["source"], str(num), f"{num:02d}"):
                alias[a.lower()] = store_name
        out = []
        for s in self._subject_request:
            key = str(s).lower()
            if key not in alias:
                raise SourceError(self.manifest["_path"], "subjects",
                                  f"one of {list(table)} (or {[e['source'] for e in table.values()]})", str(s))
            if alias[key] not in out:
                out.append(alias[key])
        return out

    def parse_roi(self, atlases: Mapping[str, RoiAtlas], where: str | Path) -> np.ndarray:
        """Voxel selection from ``self.roi``: bool (n_voxels,) over the candidate voxels.

        ``atlas`` keeps voxels with any positive label, ``atlas:A,B`` only labels named A or B.
        """
        spec = self.roi
        n = len(next(iter(atlases.values())).values) if atlases else 0
        if spec == "all":  # every candidate voxel
            return np.ones(n, bool)
        if spec == "any":  # voxels labelled in at least one atlas
            return np.any([a.values > 0 for a in atlases.values()], axis=0) if atlases else np.zeros(0, bool)
        atlas, _, names = str(spec).partition(":")
        if atlas not in atlases:
            raise SourceError(where, "roi", f"an ROI atlas among {sorted(atlases)}", str(spec))
        a = atlases[atlas]
        if not names:
            return a.values > 0
        by_name = {v: k for k, v in a.labels.items()}
        keep = []
        for n in names.split(","):
            if n not in by_name:
                raise SourceError(where, "roi", f"labels of atlas '{atlas}' among {sorted(by_name)}", n)
            keep.append(by_name[n])
        return np.isin(a.values, keep)

    # ---------------------------------------------------------------- hooks

    def present(self, subject: str) -> bool:
        """Whether ``subject`` has files under the root (used to pick default subjects)."""
        return True

    def check(self, subjects: list[str]) -> None:
        """Raise SourceError for a wrong root or missing files before anything is written."""
        raise NotImplementedError

    def plan_stimuli(self, subjects: list[str]) -> StimulusPlan:
        raise NotImplementedError

    def plan_subject(self, subject: str, stimuli: StimulusPlan) -> SubjectPlan:
        raise NotImplementedError

    def split_description(self) -> dict:
        """The split rule as the source manifest describes it (``split``: prose and parameters),
        recorded in the store's manifest. The rule itself is coded in each importer's
        :meth:`plan_stimuli`, which sets every stimulus' split."""
        return dict(self.manifest["split"])

    # ---------------------------------------------------------------- orchestration

    def _source_record(self, paths: Iterable[Path], cache: dict) -> dict:
        rec = {}
        for p in paths:
            p = Path(p)
            try:
                rel = str(p.relative_to(self.root))
            except ValueError:
                rel = str(p)
            st = p.stat()
            old = cache.get(rel)
            if old and old.get("size") == st.st_size and old.get("mtime") == int(st.st_mtime) \
                    and (self.checksum == "none" or old.get("checksum")):
                rec[rel] = old
                continue
            entry = {"size": int(st.st_size), "mtime": int(st.st_mtime)}
            if self.checksum != "none":
                entry["checksum"] = file_checksum(p, self.checksum)
            rec[rel] = entry
        return rec

    def _options_record(self, subjects) -> dict:
        return {"dataset": self.name, "roi": self.roi, "image_size": self.image_size,
                "dtype": self.dtype, "options": self.options, "root": str(self.root.resolve())}

    @staticmethod
    def _complete(path: Path, fp: str) -> dict | None:
        """Source record of a finished file whose fingerprint matches, else None."""
        if not path.exists():
            return None
        try:
            with h5py.File(path, "r") as f:
                if f.attrs.get("import_fingerprint") != fp:
                    return None
                return yaml.safe_load(f.attrs.get("import_sources", "{}")) or {}
        except OSError:
            return None

    def _clean(self) -> None:
        """Make the store not validate (manifest removed first) and drop stale temp files."""
        (self.out / MANIFEST).unlink(missing_ok=True)
        for tmp in self.out.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        if self.restart:
            for p in [self.out / STIMULI, *self.out.glob("subj*.h5")]:
                p.unlink(missing_ok=True)

    def run(self, log: Callable[[str], None] | None = print) -> Path:
        """Import (or resume importing) the dataset; return the store directory."""
        log = log or (lambda _m: None)
        self.check_root()
        subjects = self.resolve_subjects()
        self.check(subjects)
        opts = self._options_record(subjects)
        # Plan everything (this is where options such as --roi labels are checked against the
        # source) before touching the output: a refused re-run must leave a valid store valid.
        stim = self.plan_stimuli(subjects)
        fp_stim = fingerprint({**opts, "stimulus_ids": stim.ids, "split": stim.split.tolist()})
        spath = self.out / STIMULI
        stim_done = None if self.restart else self._complete(spath, fp_stim)
        todo: dict[str, tuple[str, dict | None, SubjectPlan | None]] = {}
        for subject in subjects:
            fp = fingerprint({**opts, "subject": subject, "stimuli": fp_stim})
            done = None if self.restart else self._complete(self.out / f"{subject}.h5", fp)
            todo[subject] = (fp, done, None if done is not None else self.plan_subject(subject, stim))
        self.out.mkdir(parents=True, exist_ok=True)
        self._clean()
        sources: dict[str, dict] = {}

        # Stimuli: the fingerprint covers the exact id list, so adding subjects rewrites it.
        if stim_done is not None:
            log(f"[{self.name}] stimuli.h5 complete, kept ({len(stim.ids)} images)")
            sources.update(stim_done)
        else:
            log(f"[{self.name}] writing stimuli.h5 ({len(stim.ids)} images at {self.image_size} px)")
            rec = self._source_record(stim.sources, {})
            self._write_stimuli(spath, stim, fp_stim, rec)
            sources.update(rec)

        for subject, (fp, done, plan) in todo.items():
            path = self.out / f"{subject}.h5"
            if done is not None:
                log(f"[{self.name}] {subject}: complete, kept")
                sources.update(done)
                continue
            log(f"[{self.name}] {subject}: {plan.n_trials} trials x {plan.n_voxels} voxels")
            rec = self._source_record(plan.sources, {})
            attrs = {"source_subject": plan.source_subject, "import_fingerprint": fp,
                     "import_sources": yaml.safe_dump(rec), **plan.attrs}
            with SubjectWriter(path, dataset=self.name, subject=subject, n_trials=plan.n_trials,
                               n_voxels=plan.n_voxels, coords=plan.coords, space=plan.space,
                               field_strength_tesla=float(self.manifest["field_strength_tesla"]),
                               units=plan.units, rois=plan.rois, ncsnr=plan.ncsnr, dtype=self.dtype,
                               attrs=attrs) as w:
                plan.write(w)
            sources.update(rec)

        write_manifest(self.out, {
            "dataset": self.name,
            "title": self.manifest.get("title", self.name),
            "subjects": subjects,
            "source_root": str(self.root.resolve()),
            "source_manifest": self.manifest["_path"],
            "source_files": dict(sorted(sources.items())),
            "field_strength_tesla": float(self.manifest["field_strength_tesla"]),
            "visual_angle_deg": float(self.manifest["visual_angle_deg"]),
            "image_size": self.image_size,
            "roi_selection": self.roi,
            "options": self.options,
            "split": {**self.split_description(), "n_train": int((stim.split == SPLIT_TRAIN).sum()),
                      "n_test": int((stim.split == SPLIT_TEST).sum())},
            "citation": self.manifest["citation"],
        })
        log(f"[{self.name}] store written to {self.out}")
        return self.out

    def _write_stimuli(self, path: Path, stim: StimulusPlan, fp: str, rec: dict) -> None:
        n = len(stim.ids)
        attrs = {"dataset": self.name, "import_fingerprint": fp, "import_sources": yaml.safe_dump(rec)}
        with StimuliWriter(path, n, (self.image_size, self.image_size),
                           float(self.manifest["visual_angle_deg"]), attrs=attrs) as w:
            batch, ids = [], []
            for i, img in zip(range(n), stim.load(list(range(n)))):
                batch.append(to_rgb_square(img, self.image_size))
                ids.append(stim.ids[i])
                if len(batch) == 64:  # bounded memory: write in small batches
                    w.write(np.stack(batch), ids)
                    batch, ids = [], []
            if batch:
                w.write(np.stack(batch), ids)
            w.write_array("split", stim.split.astype(np.uint8),
                          attrs={"meaning": "0 train, 1 test", "rule": yaml.safe_dump(self.split_description())})
            for k, v in stim.labels.items():
                w.write_array(f"labels/{k}", v)

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
* streaming stimuli into ``stimuli.h5``, resized to a configurable square size;
* nothing missing is silent: :meth:`Importer.missing` turns a missing ROI mask, image or session
  into an error naming it unless the user allowed that kind (``--allow-missing rois``), and
  whatever was missing or dropped is printed and recorded under ``import_report`` in the store's
  manifest (and in each subject file, so a resumed import keeps it);
* ``--dry-run`` (:meth:`Importer.dry_run`): plan everything, print what would be imported
  (subjects, sessions, trials, images found/missing, ROI masks found/missing, voxels per ROI,
  split) and write nothing.

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
from brainenc.data.importers.source_files import SourceError, load_image_file
from brainenc.data.store import (MANIFEST, STIMULI, SPLIT_TEST, SPLIT_TRAIN, RoiAtlas, StimuliWriter,
                                 SubjectWriter, check_name, file_checksum, write_manifest)

ENV_DATA = "BRAINENC_DATA"
ENV_MANIFESTS = "BRAINENC_MANIFESTS"
#: kinds of missing source parts a user may explicitly accept (``--allow-missing``)
ALLOW_MISSING = ("rois", "images", "sessions")


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
    report : what was missing or dropped while planning (e.g. ``missing_images``), printed and
             recorded in the store manifest
    """

    ids: list[str]
    split: np.ndarray
    load: Callable[[Sequence[int]], Iterable[np.ndarray]]
    sources: list[Path] = field(default_factory=list)
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    report: dict = field(default_factory=dict)

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
    #: sessions imported (None: the source has no sessions, e.g. averaged responses)
    sessions: list[int] | None = None
    #: runs imported, for sources that number runs but not sessions (e.g. GOD's ``Run``); the
    #: dry run lists them as runs, never as sessions
    runs: list[int] | None = None
    #: what was found, for the dry run (e.g. ``{"roi_masks": [mask file names]}``)
    inventory: dict = field(default_factory=dict)
    #: what was missing or dropped (e.g. ``missing_roi_masks``, ``nan_voxels_dropped``)
    report: dict = field(default_factory=dict)

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
    allow_missing : kinds of missing source parts to accept instead of failing, among
                    :data:`ALLOW_MISSING` (``rois``, ``images``, ``sessions``); what is skipped is
                    still printed and recorded in the store manifest
    options : dataset-specific keyword options (documented on each subclass)
    """

    name: str = ""
    #: dataset-specific options and their defaults; unknown options are an error
    default_options: dict = {}

    def __init__(self, source=None, out=None, subjects=None, roi=None, image_size=None,
                 checksum: str = "sha256", dtype: str = "float32", restart: bool = False,
                 manifest: str | os.PathLike | None = None, allow_missing: Iterable[str] = (),
                 **options):
        self.manifest = load_source_manifest(self.name, manifest)
        if source is None:
            base = os.environ.get(ENV_DATA)
            if not base:
                raise SourceError(f"${ENV_DATA}/{self.name}", "--source",
                                  f"a dataset root (pass --source or set ${ENV_DATA})", "neither given")
            source = Path(base) / self.name
        self.root = Path(source).expanduser()
        self.out = None if out is None else Path(out).expanduser()  # None: dry run only
        self.allow_missing = set(allow_missing or ())
        bad = sorted(self.allow_missing - set(ALLOW_MISSING))
        if bad:
            raise SourceError("<command line>", "--allow-missing", f"kinds among {list(ALLOW_MISSING)}",
                              ", ".join(bad))
        self.dry = False  # set by dry_run(): plans skip value scans and list what is missing
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
        """Absolute path of manifest file ``key`` (a template filled with ``fmt``).

        A manifest entry may list several templates (the layouts a dataset is distributed in,
        e.g. flat figshare files or per-subject folders): the first that exists is used, else the
        first (so errors name the primary layout).
        """
        try:
            templates = self.manifest["files"][key]
        except KeyError:
            raise SourceError(self.manifest["_path"], f"files/{key}", "a file template", "missing") from None
        if isinstance(templates, str):
            return self.root / templates.format(**fmt)
        paths = [self.root / t.format(**fmt) for t in templates]
        return next((p for p in paths if p.exists()), paths[0])

    def missing(self, kind: str, where, what: str, items: Sequence[str], report: dict, key: str) -> None:
        """Handle source parts that are not there: ``items`` of ``kind`` (rois/images/sessions).

        Raises a SourceError naming ``where`` and the first missing item, unless the user allowed
        ``kind`` (``--allow-missing``) or this is a dry run; then the items are recorded in
        ``report[key]`` (printed and written to the store manifest) and the import goes on
        without them.
        """
        items = list(items)
        if not items:
            return
        if kind not in self.allow_missing and not self.dry:
            more = f" (and {len(items) - 1} more)" if len(items) > 1 else ""
            raise SourceError(where, kind, f"{what} (pass --allow-missing {kind} to import without it)",
                              f"missing: {items[0]}{more}")
        report.setdefault(key, []).extend(items)

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

    def image_stimuli(self, index: Mapping[str, Path], names, test, folder: Path, what: str,
                      report: dict) -> tuple[list[str], np.ndarray, Callable]:
        """Stimuli that are image files named by the trial tables (GOD, THINGS, BOLD5000).

        index : {name: image path}; names : every name the trials use; test : names of test
        stimuli.  Names without a file go through :meth:`missing` (kind ``images``): an error, or
        left out and recorded when allowed.  Returns (sorted names found, split uint8 (n,),
        load(rows) -> iterator of uint8 (S, S, 3)).
        """
        absent = sorted(n for n in names if n not in index)
        self.missing("images", folder, f"an image file for every {what}", absent, report, "missing_images")
        ids = sorted(n for n in names if n in index)
        split = np.array([SPLIT_TEST if n in test else SPLIT_TRAIN for n in ids], np.uint8)
        size = self.image_size

        def load(rows):
            for r in rows:
                yield load_image_file(index[ids[r]], size)

        return ids, split, load

    @staticmethod
    def trial_rows(stimuli: StimulusPlan, ids: Sequence[str], report: dict) -> tuple[np.ndarray, np.ndarray]:
        """Stimulus rows of trials showing ``ids``: (rows int64 (n_kept,), keep bool (n_trials,)).

        Trials whose image was left out (missing and allowed) are dropped; their number is
        recorded in ``report['trials_dropped_missing_image']``.
        """
        keep = np.array([i in stimuli.row for i in ids], bool)
        if not keep.all():
            report["trials_dropped_missing_image"] = int((~keep).sum())
        return np.array([stimuli.row[i] for i, k in zip(ids, keep) if k], np.int64), keep

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
                "dtype": self.dtype, "options": self.options, "root": str(self.root.resolve()),
                "allow_missing": sorted(self.allow_missing)}

    @staticmethod
    def _complete(path: Path, fp: str) -> tuple[dict, dict] | None:
        """(source record, import report) of a finished file whose fingerprint matches, else None."""
        if not path.exists():
            return None
        try:
            with h5py.File(path, "r") as f:
                if f.attrs.get("import_fingerprint") != fp:
                    return None
                return (yaml.safe_load(f.attrs.get("import_sources", "{}")) or {},
                        yaml.safe_load(f.attrs.get("import_report", "{}")) or {})
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

    def _plan(self) -> tuple[list[str], StimulusPlan]:
        """Check the source and plan the stimuli (shared by run and dry_run; writes nothing)."""
        self.check_root()
        subjects = self.resolve_subjects()
        self.check(subjects)
        return subjects, self.plan_stimuli(subjects)

    def run(self, log: Callable[[str], None] | None = print) -> Path:
        """Import (or resume importing) the dataset; return the store directory."""
        log = log or (lambda _m: None)
        if self.out is None:
            raise SourceError("<out>", "--out", "an output store directory", "missing")
        opts = self._options_record(None)
        # Plan everything (this is where options such as --roi labels are checked against the
        # source) before touching the output: a refused re-run must leave a valid store valid.
        subjects, stim = self._plan()
        fp_stim = fingerprint({**opts, "stimulus_ids": stim.ids, "split": stim.split.tolist()})
        spath = self.out / STIMULI
        stim_done = None if self.restart else self._complete(spath, fp_stim)
        todo: dict[str, tuple[str, tuple | None, SubjectPlan | None]] = {}
        for subject in subjects:
            fp = fingerprint({**opts, "subject": subject, "stimuli": fp_stim})
            done = None if self.restart else self._complete(self.out / f"{subject}.h5", fp)
            todo[subject] = (fp, done, None if done is not None else self.plan_subject(subject, stim))
        self.out.mkdir(parents=True, exist_ok=True)
        self._clean()
        sources: dict[str, dict] = {}
        report: dict[str, dict] = {}

        # Stimuli: the fingerprint covers the exact id list, so adding subjects rewrites it.
        if stim_done is not None:
            log(f"[{self.name}] stimuli.h5 complete, kept ({len(stim.ids)} images)")
            sources.update(stim_done[0])
            stim_report = stim_done[1]
        else:
            log(f"[{self.name}] writing stimuli.h5 ({len(stim.ids)} images at {self.image_size} px)")
            rec = self._source_record(stim.sources, {})
            self._write_stimuli(spath, stim, fp_stim, rec)
            sources.update(rec)
            stim_report = _plain(stim.report)
        if stim_report:
            report["stimuli"] = stim_report
            _log_report(log, self.name, "stimuli", stim_report)

        for subject, (fp, done, plan) in todo.items():
            path = self.out / f"{subject}.h5"
            if done is not None:
                log(f"[{self.name}] {subject}: complete, kept")
                sources.update(done[0])
                sub_report = done[1]
            else:
                log(f"[{self.name}] {subject}: {plan.n_trials} trials x {plan.n_voxels} voxels")
                rec = self._source_record(plan.sources, {})
                sub_report = _plain(plan.report)
                attrs = {"source_subject": plan.source_subject, "import_fingerprint": fp,
                         "import_sources": yaml.safe_dump(rec), "import_report": yaml.safe_dump(sub_report),
                         **plan.attrs}
                with SubjectWriter(path, dataset=self.name, subject=subject, n_trials=plan.n_trials,
                                   n_voxels=plan.n_voxels, coords=plan.coords, space=plan.space,
                                   field_strength_tesla=float(self.manifest["field_strength_tesla"]),
                                   units=plan.units, rois=plan.rois, ncsnr=plan.ncsnr, dtype=self.dtype,
                                   attrs=attrs) as w:
                    plan.write(w)
                sources.update(rec)
            if sub_report:
                report[subject] = sub_report
                _log_report(log, self.name, subject, sub_report)

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
            "allow_missing": sorted(self.allow_missing),
            # what was missing or dropped ({} = nothing): per subject and for the stimuli
            "import_report": report,
            "split": {**self.split_description(), "n_train": int((stim.split == SPLIT_TRAIN).sum()),
                      "n_test": int((stim.split == SPLIT_TEST).sum())},
            "citation": self.manifest["citation"],
        })
        log(f"[{self.name}] store written to {self.out}")
        return self.out

    def dry_run(self, log: Callable[[str], None] | None = print) -> dict:
        """Plan the whole import, print what it would hold and write nothing; return the summary.

        Missing ROI masks, images and sessions are listed instead of failing at the first one
        (the real import fails on them unless ``--allow-missing`` names their kind).  Scans
        that need every response value (e.g. counting NaN voxels) are left to the import.

        Returns ``{"dataset", "root", "subjects": {subj: {...}}, "stimuli": {...}, "split": {...},
        "would_fail": [...]}``; ``would_fail`` lists the missing kinds not allowed.
        """
        log = log or (lambda _m: None)
        self.dry = True
        subjects, stim = self._plan()
        split = {"n_train": int((stim.split == SPLIT_TRAIN).sum()), "n_test": int((stim.split == SPLIT_TEST).sum()),
                 "rule": self.split_description().get("rule")}
        summary = {"dataset": self.name, "root": str(self.root), "stimuli": {
            "n_images": len(stim.ids), **_plain(stim.report)}, "split": split, "subjects": {}}
        log(f"[{self.name}] dry run: {self.root} (nothing is written)")
        log(f"  images: {len(stim.ids)} found" + _missing_text(stim.report))
        log(f"  split ({split['rule']}): {split['n_train']} train, {split['n_test']} test images")
        for subject in subjects:
            plan = self.plan_subject(subject, stim)
            rois = {atlas: {name: int((a.values == value).sum()) for value, name in sorted(a.labels.items())}
                    for atlas, a in plan.rois.items()}
            info = {"source_subject": plan.source_subject, "sessions": plan.sessions,
                    **({} if plan.runs is None else {"runs": plan.runs}), "n_trials": plan.n_trials,
                    "n_voxels": plan.n_voxels, "voxels_per_roi": rois, "found": _plain(plan.inventory),
                    **_plain(plan.report)}
            summary["subjects"][subject] = info
            sess = "-" if plan.sessions is None else f"{len(plan.sessions)} ({_ranges(plan.sessions)})"
            if plan.runs is not None:
                sess += f", runs {len(plan.runs)} ({_ranges(plan.runs)})"
            log(f"  {subject} ({plan.source_subject}): sessions {sess}, {plan.n_trials} trials, "
                f"{plan.n_voxels} voxels selected by '{self.roi}'")
            for k, v in plan.inventory.items():
                log(f"    found {k}: {len(v)}" + (f" ({', '.join(map(str, v))})" if len(v) <= 12 else ""))
            for k, v in plan.report.items():
                log(f"    {k}: {_short(v)}")
            for atlas, counts in rois.items():
                log(f"    voxels per ROI, {atlas}: " + ", ".join(f"{n} {c}" for n, c in counts.items()))
        kinds = {"missing_images": "images", "missing_roi_masks": "rois", "missing_sessions": "sessions"}
        fail = sorted({kinds[k] for part in [summary["stimuli"], *summary["subjects"].values()]
                       for k in part if k in kinds} - self.allow_missing)
        summary["would_fail"] = fail
        if fail:
            log(f"  the import would stop on missing {', '.join(fail)} "
                f"(pass --allow-missing {' '.join(fail)} to import without them)")
        return summary

    def _write_stimuli(self, path: Path, stim: StimulusPlan, fp: str, rec: dict) -> None:
        n = len(stim.ids)
        attrs = {"dataset": self.name, "import_fingerprint": fp, "import_sources": yaml.safe_dump(rec),
                 "import_report": yaml.safe_dump(_plain(stim.report))}
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


# ----------------------------------------------------------------------------- report helpers


def _plain(obj):
    """numpy scalars/arrays -> plain Python, so reports can be YAML in the manifest."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _head(items, n: int = 8) -> str:
    return ", ".join(map(str, items[:n])) + (", ..." if len(items) > n else "")


def _short(v) -> str:
    """One-line rendering of a report value: '3 (a, b, c)' for lists, 'k v, ...' for dicts."""
    if isinstance(v, (list, tuple)):
        return f"{len(v)} ({_head(v)})"
    if isinstance(v, dict):
        return ", ".join(f"{k} {_short(x)}" for k, x in v.items())
    return str(v)


def _missing_text(report: dict) -> str:
    miss = report.get("missing_images")
    return f", {len(miss)} missing ({_head(miss)})" if miss else ", none missing"


def _ranges(values) -> str:
    values = sorted(int(v) for v in values)
    out, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            out.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ",".join(out)


def _log_report(log, name: str, scope: str, report: dict) -> None:
    for k, v in report.items():
        log(f"[{name}] {scope}: {k}: {_short(v)}")

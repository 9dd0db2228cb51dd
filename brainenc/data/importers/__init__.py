"""Importers: turn real source datasets into the canonical store (``brainenc prepare``).

Each dataset has an :class:`~brainenc.data.importers.base.Importer` subclass, driven by its
source manifest ``data_manifests/<name>.yaml``.  They are registered in :data:`IMPORTERS`, the
single place that maps a dataset name to its importer.

Python API::

    from brainenc.data.importers import prepare
    store_dir = prepare("nsd", "/data/nsd", "/stores/nsd", subjects=["subj01"], image_size=224)

Command line (dispatched by ``brainenc prepare``)::

    brainenc prepare nsd --source /data/nsd --out /stores/nsd --subjects subj01 subj02 --roi nsdgeneral
    brainenc prepare bold5000 --source /data/bold5000 --dry-run        # what would be imported; writes nothing
    brainenc prepare bold5000 --source /data/bold5000 --out /stores/b5k --allow-missing rois
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from brainenc.data.importers.algonauts import Algonauts2023Importer
from brainenc.data.importers.base import ALLOW_MISSING, ENV_DATA, Importer, SourceError
from brainenc.data.importers.bold5000 import BOLD5000Importer
from brainenc.data.importers.god import GODImporter
from brainenc.data.importers.nsd import NSDImporter
from brainenc.data.importers.things import ThingsFmriImporter
from brainenc.data.importers.vim1 import Vim1Importer
from brainenc.data.store import StoreError

#: dataset name (as in ``data_manifests/<name>.yaml``) -> importer class
IMPORTERS: dict[str, type[Importer]] = {
    "nsd": NSDImporter,
    "algonauts2023": Algonauts2023Importer,
    "bold5000": BOLD5000Importer,
    "god": GODImporter,
    "things-fmri": ThingsFmriImporter,
    "vim-1": Vim1Importer,
}

__all__ = ["IMPORTERS", "Importer", "SourceError", "prepare", "dry_run", "main_prepare"]


def get_importer(name: str) -> type[Importer]:
    try:
        return IMPORTERS[name]
    except KeyError:
        raise SourceError("<dataset>", "name", f"one of {sorted(IMPORTERS)}", name) from None


def prepare(name: str, source: str | os.PathLike | None, out: str | os.PathLike,
            subjects: list[str] | None = None, roi: str | None = None, image_size: int | None = None,
            log=None, **options) -> Path:
    """Import dataset ``name`` from ``source`` into the store directory ``out``; return ``out``.

    ``source`` None means ``$BRAINENC_DATA/<name>``.  ``options`` are passed to the importer
    (common: ``checksum='sha256'|'none'``, ``dtype``, ``restart``; dataset-specific ones are
    documented on each importer class, e.g. NSD's ``space``, ``zscore``, ``sessions``).
    Re-running resumes: subjects whose files are complete (same options) are kept.
    """
    importer = get_importer(name)(source=source, out=out, subjects=subjects, roi=roi,
                                  image_size=image_size, **options)
    return importer.run(log=log)


def dry_run(name: str, source: str | os.PathLike | None, subjects: list[str] | None = None,
            roi: str | None = None, log=None, **options) -> dict:
    """What ``prepare`` would import from ``source``, printed through ``log``; writes nothing.

    Returns the summary of :meth:`Importer.dry_run` (subjects, sessions, trials, images and ROI
    masks found/missing, voxels per ROI, split, and ``would_fail``).
    """
    importer = get_importer(name)(source=source, out=None, subjects=subjects, roi=roi, **options)
    return importer.dry_run(log=log)


def _parse_value(text: str):
    """``--option key=value`` values: YAML scalars (true, 3, 1.5, null) or strings."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="brainenc prepare",
        description="Convert a real fMRI dataset into a brainenc canonical store.")
    p.add_argument("name", choices=sorted(IMPORTERS), help="dataset (see data_manifests/)")
    p.add_argument("--source", default=None, help=f"dataset root (default ${ENV_DATA}/<name>)")
    p.add_argument("--out", default=None, help="store directory to create or resume (not needed with --dry-run)")
    p.add_argument("--subjects", nargs="+", default=None, help="subjects (subj01, 1, or source names)")
    p.add_argument("--roi", default=None, help="voxel selection: ATLAS or ATLAS:LABEL1,LABEL2")
    p.add_argument("--image-size", type=int, default=None, help="side of the stored square images")
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    p.add_argument("--checksum", choices=["sha256", "none"], default="sha256",
                   help="checksum source files (none: sizes only)")
    p.add_argument("--restart", action="store_true", help="discard a previous partial import")
    p.add_argument("--dry-run", action="store_true",
                   help="print what would be imported (subjects, sessions, trials, images and ROI masks "
                        "found/missing, voxels per ROI, split) and write nothing")
    p.add_argument("--allow-missing", nargs="+", default=[], choices=list(ALLOW_MISSING), metavar="KIND",
                   help=f"import without missing {', '.join(ALLOW_MISSING)} instead of failing; what is "
                        "left out is printed and recorded in the store manifest")
    p.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE",
                   help="dataset-specific option, e.g. -o space=func1mm -o zscore=false")
    p.add_argument("--quiet", action="store_true")
    return p


def main_prepare(argv: list[str]) -> int:
    """Entry point of ``brainenc prepare``; returns a process exit code (0 ok, 2 bad input)."""
    args = build_parser().parse_args(argv)
    options = {}
    for item in args.option:
        key, eq, value = item.partition("=")
        if not eq:
            print(f"brainenc prepare: --option expects KEY=VALUE, got '{item}'", file=sys.stderr)
            return 2
        options[key.replace("-", "_")] = _parse_value(value)
    try:
        if args.dry_run:
            dry_run(args.name, args.source, subjects=args.subjects, roi=args.roi,
                              allow_missing=args.allow_missing, log=print, **options)
            return 0
        if args.out is None:
            raise SourceError("<command line>", "--out", "an output store directory (or --dry-run)", "missing")
        out = prepare(args.name, args.source, args.out, subjects=args.subjects, roi=args.roi,
                      image_size=args.image_size, dtype=args.dtype, checksum=args.checksum,
                      restart=args.restart, allow_missing=args.allow_missing,
                      log=None if args.quiet else print, **options)
    except StoreError as e:
        print(f"brainenc prepare: error: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(out)
    return 0

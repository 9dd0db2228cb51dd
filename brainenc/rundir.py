"""A run directory: what a fit leaves behind and how the next command continues from it.

Layout (``--trainer.default_root_dir``)::

    checkpoints/best.ckpt      the monitored best (configs with a ModelCheckpoint ``monitor``)
    checkpoints/last.ckpt      the end of the latest epoch (``save_last: true``)
    results/voxels.csv         the per-voxel results table (brainenc.results), written by a test
    results/summary.json, results/config.yaml
    run_state.json             the resumable fit-then-test's state (``fit_done``), atomic
    run.lock                   held while a command writes the folder (pid, host, command)

Every command that picks a checkpoint asks this module, so the choice is made in one place:

* testing and analysing a run use :func:`find_checkpoint`: ``best.ckpt``, else ``last.ckpt``;
* resuming an interrupted fit uses :meth:`RunDir.resume_checkpoint`: ``last.ckpt`` (where the
  fit stopped, with its optimiser and sampler state), else ``best.ckpt`` when ``last.ckpt`` is
  missing or incomplete (a fit killed between the two writes of an epoch).

A run folder holds one fit (:func:`check_run_folder`), written by one command at a time
(:func:`lock_run_folder`); :func:`fit_then_test` is the resumable "fit, then test the chosen
checkpoint" that the AFO recipe, the sweep and the quickstart share.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from brainenc.ioutil import atomic_write

BEST, LAST = "best.ckpt", "last.ckpt"
STATE = "run_state.json"
LOCK = "run.lock"
#: suffix given to a checkpoint file found incomplete (kept for inspection, no longer a *.ckpt)
INCOMPLETE = ".incomplete"
#: --ckpt_path values Lightning resolves itself; they name no file to check
LIGHTNING_SHORTCUTS = ("last", "best", "hpc", "registry")


class RunFolderError(ValueError):
    """A fit would mix with another fit's checkpoints, or cannot resume from the one given."""

    input_error = True


def find_checkpoint(directory: str | Path) -> Optional[Path]:
    """The checkpoint to test or analyse in a checkpoint ``directory``: ``best.ckpt``, else
    ``last.ckpt``, else None."""
    for name in (BEST, LAST):
        if (Path(directory) / name).is_file():
            return Path(directory) / name
    return None


@dataclass(frozen=True)
class RunDir:
    """The files of one run directory ``root`` (see the module docstring)."""

    root: Path

    def __init__(self, root: str | Path):
        object.__setattr__(self, "root", Path(root))

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def voxels(self) -> Path:
        return self.root / "results" / "voxels.csv"

    def tested(self) -> bool:
        """True when the results table exists (a test finished)."""
        return self.voxels.exists()

    def checkpoint(self) -> Optional[Path]:
        """The checkpoint to test or analyse (:func:`find_checkpoint`), or None."""
        return find_checkpoint(self.checkpoints)

    def require_checkpoint(self) -> Path:
        """:meth:`checkpoint`, or FileNotFoundError naming the directory when there is none."""
        found = self.checkpoint()
        if found is None:
            raise FileNotFoundError(f"{self.checkpoints}: no {BEST} or {LAST} (did the fit of "
                                    f"{self.root} run?)")
        return found

    def resume_checkpoint(self) -> Optional[Path]:
        """The checkpoint an interrupted fit resumes from: ``last.ckpt`` when complete, else a
        complete ``best.ckpt`` (the first epoch's ``best.ckpt`` is written before its
        ``last.ckpt``: a kill in between leaves only it), else None."""
        for name in (LAST, BEST):
            if checkpoint_complete(self.checkpoints / name):
                return self.checkpoints / name
        return None

    def set_aside_incomplete(self) -> list[Path]:
        """Rename every incomplete ``*.ckpt`` (a write cut short by a kill or a full disk) to
        ``*.ckpt.incomplete``, so it is neither resumed from nor taken for an earlier fit's
        checkpoint; returns the new names.  Nothing is deleted."""
        moved = []
        if self.checkpoints.is_dir():
            for p in sorted(self.checkpoints.glob("*.ckpt")):
                if not checkpoint_complete(p):
                    os.replace(p, p.with_name(p.name + INCOMPLETE))
                    moved.append(p.with_name(p.name + INCOMPLETE))
        return moved


def checkpoint_complete(p: Path) -> bool:
    """True when ``p`` is a non-empty zip archive (torch.save writes the zip directory last, so a
    cut-short write fails this check)."""
    p = Path(p)
    return p.is_file() and p.stat().st_size > 0 and zipfile.is_zipfile(p)


# --------------------------------------------------------------------------- resumable fit, then test


def read_state(path: Path) -> dict:
    """A state file's content; {} when it is missing or unreadable (written by a killed process
    before writes were atomic)."""
    try:
        state = json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return state if isinstance(state, dict) else {}


def update_state(path: Path, **changes) -> dict:
    """Merge ``changes`` into the state file at ``path`` (atomically) and return the new state."""
    state = {**read_state(path), **changes, "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}
    atomic_write(path, json.dumps(state, indent=2))
    return state


def next_step(run: RunDir, state_path: Optional[Path] = None) -> str:
    """What :func:`fit_then_test` would do next: ``"done"`` (results exist), ``"test"`` (the
    fit finished and left a checkpoint), ``"resume"`` (a fit left a complete checkpoint to
    resume from, :meth:`RunDir.resume_checkpoint`) or ``"fit"``."""
    if run.tested():
        return "done"
    if read_state(state_path or run.root / STATE).get("fit_done") and run.checkpoint() is not None:
        return "test"
    return "resume" if run.resume_checkpoint() is not None else "fit"


def fit_then_test(run: RunDir, fit: Callable[[Optional[Path]], None],
                  test: Optional[Callable[[Path], None]], state_path: Optional[Path] = None) -> str:
    """Bring ``run`` to tested results, continuing whatever an earlier attempt left.

    ``fit(resume)`` trains (``resume``: ``last.ckpt`` or None for a fresh fit) and raises on
    failure; ``test(checkpoint)`` writes the results table from :meth:`RunDir.checkpoint`. A fit
    that tests in the same process (``--test_after_fit``) leaves the results, and ``test`` is then
    not called; ``test=None`` stops after the fit. ``fit_done`` goes into the state file
    (``state_path``, default ``<run>/run_state.json``) only after ``fit`` returned, so a killed fit
    is resumed rather than taken for finished. Returns :func:`next_step` as it was on entry.
    """
    state_path = state_path or run.root / STATE
    step = next_step(run, state_path)
    if step in ("fit", "resume"):
        # a checkpoint cut short (kill or full disk while it was written) is set aside, so the
        # fit resumes from the other one or starts afresh instead of failing on it at every rerun
        for p in run.set_aside_incomplete():
            print(f"{run.root}: {p.name[:-len(INCOMPLETE)]} is incomplete (a write cut short); kept as "
                  f"{p.name}, not used", flush=True)
        fit(run.resume_checkpoint() if step == "resume" else None)
        update_state(state_path, fit_done=True)
    if test is not None and not run.tested():
        test(run.require_checkpoint())
    return step


# --------------------------------------------------------------------------- one fit per folder


def check_checkpoint_file(p: Path) -> None:
    """Cheap completeness check of a torch.save zip (its directory is written last)."""
    from brainenc.lit.checkpoint import CheckpointError

    if not p.is_file():
        raise CheckpointError(p, "--ckpt_path", "a checkpoint file to resume from", "missing")
    if p.stat().st_size == 0 or not zipfile.is_zipfile(p):
        raise CheckpointError(p, "--ckpt_path", "a complete checkpoint written by torch.save",
                              "an empty or truncated file (a save interrupted by a crash? resume from "
                              "another checkpoint or start the fit in a new folder)")


def check_run_folder(trainer, ckpt_path: str | None) -> None:
    """A run folder holds one fit.  Refuse to start a fresh fit where checkpoints already exist
    (ModelCheckpoint would write ``best-v1.ckpt`` beside the old ``best.ckpt``, which ``test`` and
    the AFO recipe keep using), and check that a checkpoint to resume from is a complete file."""
    dirs = [Path(cb.dirpath) for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
    existing = sorted(p for d in dirs if d.is_dir() for p in d.glob("*.ckpt"))
    results = RunDir(trainer.default_root_dir).voxels
    if results.exists():
        # the new fit's checkpoints would sit beside a table that another model produced
        raise RunFolderError(
            f"{results.parent}: holds the results of an earlier run ({results.name}); a fit here would "
            f"leave that table beside checkpoints of another model. Move or delete {results.parent}, or "
            f"fit into another folder with --trainer.default_root_dir=<new folder>")
    if ckpt_path in (None, ""):
        broken = [p for p in existing if not checkpoint_complete(p)]
        if existing and len(broken) == len(existing):
            raise RunFolderError(
                f"{existing[0].parent}: holds only incomplete checkpoints ({', '.join(p.name for p in broken[:4])}: "
                f"writes cut short by a kill or a full disk); delete them to start the fit afresh, or fit "
                f"into another folder with --trainer.default_root_dir=<new folder>")
        if existing:
            names = ", ".join(p.name for p in existing[:4])
            last = RunDir(existing[0].parent.parent).resume_checkpoint() or existing[0]
            raise RunFolderError(
                f"{existing[0].parent}: holds the checkpoints of an earlier fit ({names}); a run folder "
                f"holds one fit. Resume it with --ckpt_path={last}, or start a new fit in another folder "
                f"with --trainer.default_root_dir=<new folder> (or delete this one)")
        return
    if str(ckpt_path) in LIGHTNING_SHORTCUTS:
        return
    p = Path(ckpt_path)
    if existing and not any(p.resolve().parent == d.resolve() for d in dirs):
        raise RunFolderError(f"{existing[0].parent}: holds the checkpoints of another fit; resuming {p} "
                             "here would mix two fits. Choose another --trainer.default_root_dir")
    check_checkpoint_file(p)


def follow_moved_folder(cb) -> None:
    """Let ModelCheckpoint ``cb`` resume the run folder it writes to after that folder was moved
    or copied.

    A checkpoint stores the absolute ``dirpath`` of each ModelCheckpoint.  When it differs from
    the current one, Lightning forgets the best and last paths and then writes ``best-v1.ckpt``
    and ``last-v1.ckpt`` beside the files it no longer recognises, while ``test`` and the AFO
    recipe keep reading ``best.ckpt``.  When only the location changed (same directory name),
    the stored paths are moved to the current directory before Lightning reads them.
    """
    if not getattr(cb, "dirpath", None) or not hasattr(cb, "load_state_dict"):
        return
    load = cb.load_state_dict
    here = Path(cb.dirpath)

    def load_moved(state: dict) -> None:
        old = state.get("dirpath")
        if old and Path(old) != here and Path(old).name == here.name:
            def move(p):
                return str(here / Path(p).name) if p and Path(p).parent == Path(old) else p

            state = {**state, "dirpath": str(here),
                     **{k: move(state.get(k)) for k in ("best_model_path", "kth_best_model_path",
                                                        "last_model_path") if k in state},
                     "best_k_models": {move(k): v for k, v in (state.get("best_k_models") or {}).items()}}
        load(state)

    cb.load_state_dict = load_moved


def checkpoint_to_test(trainer) -> str | None:
    """The checkpoint a test after fit should load: the monitored best, else :func:`find_checkpoint`
    in a checkpoint callback's directory (e.g. files written by the ridge module), else None (the
    weights in memory)."""
    cb = trainer.checkpoint_callback
    if cb is not None and getattr(cb, "best_model_path", ""):
        return cb.best_model_path
    found = (find_checkpoint(cb.dirpath) for cb in trainer.checkpoint_callbacks if cb.dirpath)
    return next((str(p) for p in found if p is not None), None)


# --------------------------------------------------------------------------- one command per folder


def _start_time(pid: int) -> Optional[str]:
    """The start time of process ``pid`` (clock ticks since boot, from /proc), or None when no
    such process runs (or /proc is unavailable: then only the pid is compared)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (FileNotFoundError, ProcessLookupError, IndexError, PermissionError):
        return None


def _alive(pid: int, started: Optional[str]) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    now = _start_time(pid)
    return started is None or now is None or now == started  # another process reusing the pid: stale


_held: dict[Path, str] = {}


def lock_run_folder(root: str | Path, command: str = "") -> Path:
    """Take the run folder's lock (``<root>/run.lock``) for this process until it exits
    (:func:`unlock_run_folders`): one command writes a run folder at a time.

    The lock file names the holder (pid, host, start time, command). A lock whose process no
    longer runs on this host (killed) is taken over, with a note; one held by a live process, or
    by another host, is a :class:`RunFolderError`. Re-entrant within one process."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK
    if path.resolve() in _held:
        return path
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": _start_time(os.getpid()),
          "command": command or " ".join(sys.argv), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
    for _ in range(5):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = read_state(path)
            pid = holder.get("pid")
            if not isinstance(pid, int):  # a lock file being written right now, or garbage
                time.sleep(0.2)
                if read_state(path).get("pid") is None:
                    _take_over(path, "an unreadable lock file")
                continue
            who = f"pid {pid} on {holder.get('host')}, since {holder.get('since')}: {holder.get('command', '')!r}"
            if holder.get("host") != me["host"]:
                raise RunFolderError(f"{root}: is being written by another brainenc command ({who}); one "
                                     f"command per run folder at a time. If that command no longer runs, "
                                     f"delete {path}")
            if _alive(pid, holder.get("started")):
                raise RunFolderError(f"{root}: is being written by another brainenc command ({who}); one "
                                     f"command per run folder at a time: wait for it to finish, or choose "
                                     f"another --trainer.default_root_dir")
            _take_over(path, f"the lock of {who}, which no longer runs")
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        _held[path.resolve()] = json.dumps(me)
        return path
    raise RunFolderError(f"{path}: could not take the run folder's lock (other commands keep taking it)")


def _take_over(path: Path, what: str) -> None:
    """Remove a stale lock; rename first, so two processes taking it over remove it once."""
    aside = path.with_name(f".{path.name}.{os.getpid()}.stale")
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return
    aside.unlink(missing_ok=True)
    print(f"brainenc: {path.parent}: taking over {what}", file=sys.stderr, flush=True)


def unlock_run_folders() -> None:
    """Release the run-folder locks this process holds (also called at exit)."""
    for path, mine in list(_held.items()):
        try:
            if path.read_text() == mine:
                path.unlink()
        except FileNotFoundError:
            pass
        _held.pop(path, None)


atexit.register(unlock_run_folders)

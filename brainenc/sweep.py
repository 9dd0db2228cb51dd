"""``brainenc sweep -c SWEEP.yaml``: a grid of ordinary runs (backbones x encoders x datasets x seeds).

A sweep adds nothing to what a run is. Every cell is the pair of commands a user would type,

    python -m brainenc.cli fit  -c <encoder config> -c <cell>/sweep_cell.yaml [overrides] \\
        --seed_everything=K --trainer.default_root_dir=<cell>
    python -m brainenc.cli test ...same... --ckpt_path=<cell>/checkpoints/best.ckpt

run in a subprocess, so a cell that crashes or leaks memory takes only itself down, and any
cell can be re-run by hand from the printed line. The backbone and the dataset go through a
small per-cell YAML (``sweep_cell.yaml``) rather than dotted flags: jsonargparse turns
``--model.init_args.backbone.init_args.weights=null`` into the *string* "None" and rejects
``null``/dict values for nested ``layers``/``model_kwargs``, whereas a second ``-c`` file merges
into the class_path init_args exactly.

Cell directory: ``<out>/<dataset>/<encoder>/<backbone>/seed<k>``; besides the run's own files it
holds ``sweep_cell.yaml``, ``sweep_cell.json`` (this cell's state: status, attempts, wall time,
median r), ``sweep_logs/{fit,test}.{out,err}`` and, after a failure, ``FAILED``.
Sweep directory: ``sweep_status.csv`` (one row per cell, rebuilt from the cells' state files so
concurrent array tasks cannot lose each other's rows), ``all_voxels.csv`` (every finished
cell's voxels.csv plus ``sweep_*`` columns) and ``report/`` (:func:`brainenc.reports.build_report`).

The sweep file and its grid are read by :mod:`brainenc.sweep_grid`; this module runs the cells
(each through :func:`brainenc.rundir.fit_then_test`), collects their tables and builds the report.
See docs/sweeps.md for the file format and the cluster recipe.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shlex
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Iterator, Optional

import yaml

from brainenc import rundir
from brainenc.ioutil import atomic_write
from brainenc.rundir import RunDir
from brainenc.sweep_grid import Cell, Sweep, SweepError, load_sweep

STDERR_TAIL = 40  # lines of a failed step's stderr kept in FAILED and the status table


# --------------------------------------------------------------------------- commands


def cell_overlay(cell: Cell) -> dict:
    """The second ``-c`` file of a cell: its backbone and its data."""
    overlay: dict = {"model": {"init_args": {"backbone": {"init_args": dict(cell.backbone["init_args"])}}}}
    if cell.dataset["data"]:
        overlay["data"] = dict(cell.dataset["data"])
    return overlay


def write_cell_yaml(cell: Cell) -> Path:
    text = (f"# brainenc sweep cell {cell.index}: {cell.id}\n"
            "# merged over the encoder config by a second -c (see brainenc/sweep.py)\n"
            + yaml.safe_dump(cell_overlay(cell), sort_keys=False))
    cell.run_dir.mkdir(parents=True, exist_ok=True)
    if not cell.cell_yaml.exists() or cell.cell_yaml.read_text() != text:
        atomic_write(cell.cell_yaml, text)
    return cell.cell_yaml


def cell_args(sweep: Sweep, cell: Cell) -> list[str]:
    """Arguments shared by the cell's fit and test. Later arguments win: the sweep's overrides
    beat the configs, and seed and run directory come last so no override can move a cell."""
    return ["-c", cell.encoder["config"], "-c", str(cell.cell_yaml), *sweep.overrides,
            *cell.dataset["overrides"], *cell.encoder["overrides"],
            f"--seed_everything={cell.seed}", f"--trainer.default_root_dir={cell.run_dir}"]


def commands(sweep: Sweep, cell: Cell, fit_ckpt: Optional[Path] = None,
             test_ckpt: Optional[Path] = None) -> tuple[list[str], list[str]]:
    """(fit argv, test argv) after ``python -m brainenc.cli``."""
    common = cell_args(sweep, cell)
    fit = ["fit", *common] + ([f"--ckpt_path={fit_ckpt}"] if fit_ckpt else [])
    # a printed command cannot know which checkpoint the fit will leave: the monitored best
    test = ["test", *common, f"--ckpt_path={test_ckpt or cell.ckpt_dir / rundir.BEST}"]
    return fit, test


def shell(argv: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in [sys.executable, "-m", "brainenc.cli", *argv])


# --------------------------------------------------------------------------- cell state


def read_state(cell: Cell) -> dict:
    return rundir.read_state(cell.state_path)


def write_state(cell: Cell, **changes) -> dict:
    return rundir.update_state(cell.state_path, **changes, cell=cell.index, id=cell.id)


def cell_status(cell: Cell) -> dict:
    """The cell's row of sweep_status.csv. Results on disk win over the state file: a cell
    finished by hand (or by a sweep killed after its test) counts as done."""
    st = read_state(cell)
    row = {"cell": cell.index, "id": cell.id, "dataset": cell.dataset["name"], "encoder": cell.encoder["name"],
           "backbone": cell.backbone["label"], "seed": cell.seed, "status": st.get("status", "pending"),
           "last_action": st.get("last_action", ""), "attempts": st.get("attempts", 0),
           "wall_time_s": st.get("wall_time_s", math.nan), "median_pearson": st.get("median_pearson", math.nan),
           "n_voxels": st.get("n_voxels", 0), "run_dir": str(cell.run_dir), "log": st.get("log", ""),
           "error": st.get("error", "")}
    if cell.voxels.exists():
        row["status"], row["error"] = "done", ""
        if not st.get("n_voxels"):
            from brainenc.results import pearson_summary

            row["median_pearson"], row["n_voxels"] = pearson_summary(cell.run_dir)
    return row


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise writers of the status table (array tasks finishing at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        try:
            import fcntl
        except ImportError:  # not POSIX: atomic rename alone still keeps the file whole
            yield
            return
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def write_status(sweep: Sweep) -> Path:
    import pandas as pd

    with _locked(sweep.out / ".sweep_status.lock"):
        table = pd.DataFrame([cell_status(c) for c in sweep.cells])
        atomic_write(sweep.status_path, table.to_csv(index=False, float_format="%.6g"))
    return sweep.status_path


# --------------------------------------------------------------------------- running


def _tail(path: Path, n: int = STDERR_TAIL) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-n:]
    except FileNotFoundError:
        return []


def _run_step(step: str, argv: list[str], cell: Cell) -> tuple[int, Path, Path]:
    logs = cell.run_dir / "sweep_logs"
    logs.mkdir(parents=True, exist_ok=True)
    out, err = logs / f"{step}.out", logs / f"{step}.err"
    with open(out, "w") as fo, open(err, "w") as fe:
        fe.write(f"$ {shell(argv)}\n")
        fe.flush()
        from brainenc.subprocs import die_with_parent

        rc = subprocess.run([sys.executable, "-m", "brainenc.cli", *argv], stdout=fo, stderr=fe,
                            stdin=subprocess.DEVNULL, preexec_fn=die_with_parent()).returncode
    return rc, out, err


def run_cell(sweep: Sweep, cell: Cell, on_start=None) -> dict:
    """Run one cell to results (fit, then test), resuming what an earlier attempt left.

    * results/voxels.csv exists -> skipped;
    * fit finished earlier (state says so, a checkpoint exists) -> test only;
    * checkpoints/last.ckpt exists -> fit resumes from it (``--ckpt_path``), then test;
    * otherwise fit from scratch, then test.
    A failure is written to the state file and to ``FAILED``; it is not raised. ``on_start()``
    is called once the cell is marked running (the sweep refreshes its status table there).
    """
    run = RunDir(cell.run_dir)
    if run.tested():
        return write_state(cell, status="done", last_action="skipped")
    failed_marker = cell.run_dir / "FAILED"
    write_cell_yaml(cell)
    st = read_state(cell)
    write_state(cell, status="running", attempts=int(st.get("attempts", 0)) + 1, error="")
    failed_marker.unlink(missing_ok=True)
    if on_start is not None:
        on_start()
    t0 = time.monotonic()
    action = "ran" if rundir.next_step(run, cell.state_path) == "fit" else "resumed"

    logs: dict[str, Path] = {}

    def step(name: str, argv: list[str]) -> None:
        rc, out, logs[name] = _run_step(name, argv, cell)
        if rc != 0 or (name == "test" and not run.tested()):
            raise _StepFailed(name, rc, argv, out, logs[name],
                              None if rc != 0 else f"exit 0 but {cell.voxels} was not written")

    try:
        rundir.fit_then_test(run, lambda resume: step("fit", commands(sweep, cell, fit_ckpt=resume)[0]),
                             lambda ckpt: step("test", commands(sweep, cell, test_ckpt=ckpt)[1]),
                             state_path=cell.state_path)
    except _StepFailed as f:
        return _failed(cell, f, time.monotonic() - t0, action)
    from brainenc.results import pearson_summary

    median, n = pearson_summary(cell.run_dir)
    return write_state(cell, status="done", last_action=action, wall_time_s=round(time.monotonic() - t0, 2),
                       median_pearson=median, n_voxels=n, log=str(logs.get("test", "")), error="")


class _StepFailed(Exception):
    """A cell's fit or test exited non-zero (or wrote no results); what :func:`_failed` records."""

    def __init__(self, step: str, rc: int, argv: list[str], out: Path, err: Path, reason: Optional[str]):
        super().__init__(step)
        self.step, self.rc, self.argv, self.out, self.err, self.reason = step, rc, argv, out, err, reason


def _failed(cell: Cell, f: _StepFailed, wall: float, action: str) -> dict:
    tail = _tail(f.err)
    last = next((ln.strip() for ln in reversed(tail) if ln.strip()), "")
    error = f.reason or f"{f.step} exited {f.rc}: {last}"
    atomic_write(cell.run_dir / "FAILED", "\n".join([
        f"cell {cell.index}: {cell.id}", f"step: {f.step}", f"exit code: {f.rc}",
        f"command: {shell(f.argv)}", f"stdout: {f.out}", f"stderr: {f.err}",
        f"--- last {len(tail)} lines of stderr ---", *tail, ""]))
    return write_state(cell, status="failed", last_action=action, wall_time_s=round(wall, 2),
                       log=str(f.err), error=error[:500])


# --------------------------------------------------------------------------- collecting


def report_run_names(cells: list[Cell]) -> dict[int, str]:
    """Per cell, the ``run`` name the report shows next to the encoder ("linear [test_vit]").

    Only the grid dimensions that vary among ``cells`` are named, so labels stay short; the
    encoder is the report's model name and is left out.
    """
    dims = [("dataset", lambda c: c.dataset["name"]), ("backbone", lambda c: c.backbone["label"]),
            ("seed", lambda c: f"seed{c.seed}")]
    varying = [f for _, f in dims if len({f(c) for c in cells}) > 1] or [dims[1][1]]
    return {c.index: "/".join(f(c) for f in varying) for c in cells}


def collect(sweep: Sweep) -> Optional[Path]:
    """Write ``all_voxels.csv``: every finished cell's table, ``run`` set to the cell id and the
    cell's coordinates in ``sweep_cell, sweep_dataset, sweep_encoder, sweep_backbone, sweep_seed``
    (voxels.csv's own ``dataset``/``backbone`` name the store and the timm model)."""
    import pandas as pd

    from brainenc.results import read_results

    frames = []
    for cell in sweep.cells:
        if not cell.voxels.exists():
            continue
        df = read_results(cell.run_dir)
        df["run"] = cell.id
        for i, (k, v) in enumerate([("sweep_cell", cell.index), ("sweep_dataset", cell.dataset["name"]),
                                    ("sweep_encoder", cell.encoder["name"]),
                                    ("sweep_backbone", cell.backbone["label"]), ("sweep_seed", cell.seed)]):
            df.insert(i, k, v)
        frames.append(df)
    if not frames:
        return None
    path = sweep.out / "all_voxels.csv"
    atomic_write(path, pd.concat(frames, ignore_index=True).to_csv(index=False, float_format="%.6g"))
    return path


def build_sweep_report(sweep: Sweep) -> Optional[Path]:
    """Report over every finished cell into ``<out>/report``.

    Each cell's run is read and given ``model`` = the sweep's encoder name and ``run`` =
    :func:`report_run_names` before the report sees it: every cell's own ``run`` is "seed<k>",
    so the report could not tell two backbones' "linear" runs apart otherwise.
    """
    from brainenc.reports import build_report
    from brainenc.results import read_run

    done = [c for c in sweep.cells if c.voxels.exists()]
    if not done:
        return None
    names = report_run_names(done)
    opts = {k: v for k, v in sweep.report.items() if k != "enabled"}
    runs = []
    for c in done:
        run = read_run(c.run_dir)
        run.voxels["run"], run.voxels["model"] = names[c.index], c.encoder["name"]
        run.summary.update(run=names[c.index], model=c.encoder["name"])
        runs.append(run)
    return Path(build_report(runs, sweep.out / "report", **opts))


def finish(sweep: Sweep, report: bool = True) -> int:
    """Collect the table, then the report; a broken report costs only the report."""
    table = collect(sweep)
    if table is None:
        print("brainenc sweep: no finished cells yet; nothing to collect")
        return 0
    print(f"collected: {table}")
    if not (report and sweep.report.get("enabled", True)):
        return 0
    try:
        html = build_sweep_report(sweep)
    except Exception:  # noqa: BLE001 - any report bug must leave the table and the exit code honest
        print(f"brainenc sweep: the report failed (the collected table {table} is intact):\n"
              f"{traceback.format_exc()}", file=sys.stderr)
        return 1
    print(f"report: {html}")
    return 0


# --------------------------------------------------------------------------- command line


def _plan(cell: Cell) -> str:
    step = rundir.next_step(RunDir(cell.run_dir), cell.state_path)
    if step == "fit":
        return "would run" + (" (failed before)" if read_state(cell).get("status") == "failed" else "")
    return {"done": "done, would skip", "test": "fit done, would test",
            "resume": "would resume fit from checkpoints/last.ckpt"}[step]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="brainenc sweep",
        description="Run a grid of runs (backbones x encoders x datasets x seeds), each as "
                    "`brainenc fit` then `brainenc test` in its own directory; collect the "
                    "per-voxel tables and build a report. Resumable: finished cells are skipped.")
    p.add_argument("-c", "--config", required=True, help="sweep file (YAML, OmegaConf interpolation)")
    p.add_argument("--out", help="sweep directory (overrides the file's 'out')")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="edit the sweep file, e.g. --set 'seeds=[0,1,2]' (repeatable)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the cells and their commands; run nothing")
    mode.add_argument("--print-commands", action="store_true",
                      help="print one shell line per cell (fit && test) for a job array; writes "
                           "each cell's sweep_cell.yaml so the lines run as printed")
    mode.add_argument("--collect-only", action="store_true",
                      help="run no cell; collect finished cells and build the report (after a job array)")
    p.add_argument("--cell", type=int, action="append", metavar="K",
                   help="run only cell K (repeatable; e.g. $SLURM_ARRAY_TASK_ID); skips collecting "
                        "unless --collect is given")
    p.add_argument("--collect", action="store_true", help="with --cell: also collect and report")
    p.add_argument("--no-report", action="store_true", help="collect all_voxels.csv but build no report")
    return p


def main_sweep(argv: list[str]) -> int:
    """``brainenc sweep``; exit code 0 when every selected cell finished (and the report was
    built), 1 when a cell or the report failed, 2 for a bad sweep file or arguments."""
    args = _parser().parse_args(argv)
    try:
        sweep = load_sweep(args.config, args.set, args.out)
    except SweepError as exc:
        print(f"brainenc sweep: {exc}", file=sys.stderr)
        return 2
    cells = sweep.cells
    if args.cell:
        bad = [k for k in args.cell if not 0 <= k < len(sweep.cells)]
        if bad:
            print(f"brainenc sweep: --cell {bad[0]} is out of range; {args.config} has "
                  f"{len(sweep.cells)} cells (0..{len(sweep.cells) - 1})", file=sys.stderr)
            return 2
        cells = [sweep.cells[k] for k in dict.fromkeys(args.cell)]

    if args.print_commands:
        for cell in cells:
            write_cell_yaml(cell)
            fit, test = commands(sweep, cell)
            print(f"{shell(fit)} && {shell(test)}")
        _warn_simulate_race(cells)
        return 0
    if args.dry_run:
        print(f"sweep {args.config}: {len(sweep.cells)} cells -> {sweep.out}")
        for cell in cells:
            fit, test = commands(sweep, cell)
            print(f"[{cell.index}] {cell.id}  ({_plan(cell)})\n"
                  f"    backbone: {json.dumps(cell.backbone['init_args'])}\n"
                  f"    fit:  {shell(fit)}\n    test: {shell(test)}")
        return 0
    if args.collect_only:
        write_status(sweep)
        return finish(sweep, report=not args.no_report)

    failed = 0
    for n, cell in enumerate(cells, 1):
        print(f"[{n}/{len(cells)}] cell {cell.index} {cell.id}: {_plan(cell).replace('would', 'will')}", flush=True)
        t0 = time.monotonic()
        state = run_cell(sweep, cell, on_start=lambda: write_status(sweep))
        if state["status"] == "failed":
            failed += 1
            print(f"    FAILED ({state['error']}); see {cell.run_dir / 'FAILED'}", flush=True)
        elif state.get("last_action") != "skipped":
            print(f"    done in {time.monotonic() - t0:.0f} s, median r = {state.get('median_pearson', math.nan):.3f}",
                  flush=True)
        write_status(sweep)
    print(f"status: {sweep.status_path}  ({len(cells) - failed} ok, {failed} failed)")
    rc = 1 if failed else 0
    if args.cell and not args.collect:
        return rc
    return max(rc, finish(sweep, report=not args.no_report))


def _warn_simulate_race(cells: list[Cell]) -> None:
    missing = sorted({s for c in cells if c.dataset["data"].get("simulate")
                      for s in c.dataset["data"]["stores"] if not (Path(s) / "manifest.yaml").exists()})
    if missing:
        print("# note: simulate the missing stores once before submitting (array tasks would race "
              f"to write them): {', '.join(missing)}", file=sys.stderr)

"""Where the quickstart's time goes: child start-up, the data set-up each stage repeats, and the
per-step and per-epoch times of a quickstart log.

    .venv/bin/python benchmarks/quickstart_breakdown.py [--store data/simbrain-quickstart/simbrain7t]
        [--log quickstart.log] [--repeats 3]

1. **Child start-up**: every ``brainenc`` step of the quickstart (and every AFO stage) is a new
   process. Timed: the bare interpreter, ``brainenc compare --help`` (the command table: what a
   non-training command pays before its own work) and ``brainenc fit --help`` (the LightningCLI
   parser with every model class). Median wall and CPU seconds of ``--repeats`` runs.
2. **Data set-up per stage** (needs ``--store``, e.g. a quickstart store already simulated): what
   each fit/test child does before its first batch, as the quickstart configs ask (subj01,
   224 px, features from the cache so no images are read): opening the store (validation), the
   pairs and splits, the scan of the validation and test trials for missing values, the first
   training and validation batches.
3. **Per step** (needs ``--log``: the output of ``make quickstart 2>&1 | tee quickstart.log``):
   the quickstart's own step times (its last line), each AFO stage's time, and for every fit
   child its start-up (``started in``), epochs (``s/epoch``) and test loop (``tested in``).

Wall times depend on the machine's load; CPU seconds (user + system) less so.
"""

from __future__ import annotations

import argparse
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def time_command(cmd: list[str], repeats: int) -> tuple[float, float]:
    """Median (wall s, CPU s) of ``repeats`` runs of ``cmd`` (output discarded)."""
    walls, cpus = [], []
    for _ in range(repeats):
        c0, t0 = _child_cpu(), time.perf_counter()
        subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        walls.append(time.perf_counter() - t0)
        cpus.append(_child_cpu() - c0)
    return statistics.median(walls), statistics.median(cpus)


def startup(repeats: int) -> None:
    py = [sys.executable]
    print("child start-up (median of %d)                      wall s   CPU s" % repeats)
    for name, cmd in (("python -c pass", [*py, "-c", "pass"]),
                      ("brainenc compare --help", [*py, "-m", "brainenc.cli", "compare", "--help"]),
                      ("brainenc fit --help", [*py, "-m", "brainenc.cli", "fit", "--help"])):
        wall, cpu = time_command(cmd, repeats)
        print(f"  {name:<48} {wall:6.1f}  {cpu:6.1f}")


def data_setup(store: str, subjects: list[str], image_size: int) -> None:
    """Time each part of a stage's data set-up, in this process (imports already paid)."""
    from brainenc.data.datamodule import BrainDataModule
    from brainenc.data.store import Store

    parts = []

    def timed(name, fn):
        t0 = time.perf_counter()
        out = fn()
        parts.append((name, time.perf_counter() - t0))
        return out

    timed("open the store (validation of every subject)", lambda: Store(store))
    dm = BrainDataModule([store], subjects=subjects, image_size=image_size, load_images=False,
                         batch_size=32, eval_batch_size=128)
    timed("setup: pairs and splits", dm.setup)
    timed("scan validation trials for missing values", lambda: dm.missing_data("val"))
    timed("scan test trials for missing values", lambda: dm.missing_data("test"))
    timed("first training batch", lambda: next(iter(dm.train_dataloader())))
    timed("first validation batch", lambda: next(iter(dm.val_dataloader())))
    print(f"data set-up of one stage ({store}, {subjects}, {image_size} px)   wall s")
    for name, sec in parts:
        print(f"  {name:<58} {sec:6.2f}")
    print(f"  {'total':<58} {sum(s for _, s in parts):6.2f}")


def from_log(path: Path) -> None:
    text = path.read_text(errors="replace")
    last = re.findall(r"^quickstart wall time: .*$", text, re.M)
    if last:
        print(last[-1])
    for stage, sec in re.findall(r"^\[afo\] stage (\w+): (\d+) s$", text, re.M):
        print(f"  afo stage {stage:<12} {sec:>5} s")
    runs: dict[str, dict] = {}
    for run, sec in re.findall(r"^\[([^\]]+)\] started in ([\d.]+)s\b", text, re.M):
        runs.setdefault(run, {})["start-up"] = float(sec)
    for run, sec in re.findall(r"^\[([^\]]+)\] epoch \d+/\d+ .*?([\d.]+)s/epoch", text, re.M):
        runs.setdefault(run, {})["s/epoch"] = float(sec)  # the last epoch's running mean
    for run, sec in re.findall(r"^\[([^\]]+)\] tested in ([\d.]+)s\b", text, re.M):
        runs.setdefault(run, {})["test"] = float(sec)
    if runs:
        print("fit children                start-up s   s/epoch   test s")
        for run, v in runs.items():
            print(f"  {run:<26} {v.get('start-up', float('nan')):9.1f} {v.get('s/epoch', float('nan')):9.1f}"
                  f" {v.get('test', float('nan')):8.1f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", help="a quickstart store, e.g. data/simbrain-quickstart/simbrain7t")
    ap.add_argument("--subjects", nargs="+", default=["subj01"])
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--log", type=Path, help="the output of make quickstart")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-startup", action="store_true")
    a = ap.parse_args()
    if not a.no_startup:
        startup(a.repeats)
    if a.store:
        data_setup(a.store, a.subjects, a.image_size)
    if a.log:
        from_log(a.log)
    return 0


if __name__ == "__main__":
    sys.exit(main())

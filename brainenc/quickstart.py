"""``make quickstart``: the flagship comparison on the quickstart simbrain.

Spatial ridge vs the All-for-One retinotopic encoder (its whole-brain model and its distilled student)
vs the universal encoder, all on the same frozen ImageNet EfficientNet-Lite0 (offline weights),
the same 224-px images (features from the on-disk cache), subject (subj01 of the 7T-like
dataset: 2,600 voxels) and splits.
Each step is the ``brainenc`` command a user would type, so the quickstart doubles as a tour of
the CLI: the fits and the AFO recipe in child processes (each a fresh start, as a user's), the
steps that train nothing (simulate, report, compare) in this process, which saves their start-ups
(each child imports torch and Lightning again). Finished runs are reused (delete
``runs/quickstart`` to start over). The last line gives each step's wall time.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from brainenc.rundir import RunDir, fit_then_test

# one line per epoch instead of progress bars; no table of module sizes per fit
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
RUNS = [  # (config, run directory) of the single-run encoders
    ("experiments/quickstart/ridge_spatial.yaml", "runs/quickstart/ridge_spatial"),  # 4 x 4 grid per level
    ("experiments/quickstart/universal.yaml", "runs/quickstart/universal"),
]
AFO_CONFIG = "experiments/afo/quickstart.yaml"
AFO_RUNS = ["runs/afo/quickstart/whole", "runs/afo/quickstart/student"]


#: Commands that train nothing, run in this process (see the module's docstring)
IN_PROCESS = ("simulate", "report", "compare")
#: (step, seconds) of every step so far, printed at the end: where the wall time went
STEPS: list[tuple[str, float]] = []


def brainenc(*args: str) -> None:
    print("\n$ brainenc " + " ".join(args), flush=True)
    t0 = time.perf_counter()
    if args[0] in IN_PROCESS:
        from brainenc.cli import console_main

        code = console_main(list(args))  # bad input: its one-line message is already printed
        if code:
            raise SystemExit(code)
    else:
        subprocess.run([sys.executable, "-m", "brainenc.cli", *args], check=True)
    STEPS.append((step_name(args), time.perf_counter() - t0))


def step_name(args) -> str:
    """``fit -c experiments/quickstart/universal.yaml ...`` -> ``fit universal``."""
    config = next((a for prev, a in zip(args, args[1:]) if prev == "-c"), None)
    return f"{args[0]} {Path(config).stem}" if config else args[0]


def main() -> int:
    t0 = time.time()
    brainenc("simulate", "--preset", "quickstart", "--out", "data/simbrain-quickstart")
    for config, run in RUNS:
        if RunDir(run).tested():
            print(f"\n{run}: finished earlier, reusing its results")
            continue
        # an interrupted earlier attempt resumes (a run folder holds one fit); the fit then tests
        # the best checkpoint in the same process
        fit_then_test(RunDir(run),
                      lambda resume: brainenc("fit", "-c", config, *QUIET, "--test_after_fit=true",
                                              *([f"--ckpt_path={resume}"] if resume else [])),
                      lambda ckpt: brainenc("test", "-c", config, *QUIET, f"--ckpt_path={ckpt}"))
    brainenc("afo", "-c", AFO_CONFIG)  # resumable: finished stages are skipped
    runs = [RUNS[0][1], *AFO_RUNS, RUNS[1][1]]
    brainenc("report", *runs, "--out", "runs/quickstart/report", "--n-boot", "300")
    print("\nPer-ROI comparison on the held-out test images (medians over voxels; oracle r is the "
          "best any model can do):")
    brainenc("compare", *runs, "--metric", "pearson,frac_oracle")
    print("\nreport: runs/quickstart/report/report.html")
    print(f"quickstart wall time: {time.time() - t0:.0f} s  ("
          + ", ".join(f"{name} {sec:.0f} s" for name, sec in STEPS) + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())

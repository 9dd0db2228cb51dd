"""``make quickstart``: the flagship comparison on the quickstart simbrain.

Spatial ridge vs the All-for-One retinotopic encoder (its whole-brain model and its distilled student)
vs the universal encoder, all on the same frozen ImageNet EfficientNet-Lite0 (offline weights),
the same 224-px images (features from the on-disk cache), subject (subj01 of the 7T-like
dataset: 2,600 voxels) and splits.
Each step is the ``brainenc`` command a user would type, run in a subprocess, so the quickstart
doubles as a tour of the CLI; finished runs are reused (delete ``runs/quickstart`` to start over).
"""

from __future__ import annotations

import subprocess
import sys
import time

from brainenc.rundir import RunDir, fit_then_test

QUIET = ["--trainer.enable_progress_bar=false"]
RUNS = [  # (config, run directory) of the single-run encoders
    ("experiments/quickstart/ridge_spatial.yaml", "runs/quickstart/ridge_spatial"),  # 4 x 4 grid per level
    ("experiments/quickstart/universal.yaml", "runs/quickstart/universal"),
]
AFO_CONFIG = "experiments/afo/quickstart.yaml"
AFO_RUNS = ["runs/afo/quickstart/whole", "runs/afo/quickstart/student"]


def brainenc(*args: str) -> None:
    print("\n$ brainenc " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "brainenc.cli", *args], check=True)


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
    print(f"quickstart wall time: {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

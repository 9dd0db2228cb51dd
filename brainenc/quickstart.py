"""``make quickstart``: simulate the quickstart brain, fit and test encoders, print a per-ROI table.

Each step is the same ``brainenc`` command a user would type, run in a subprocess, so the
quickstart doubles as a tour of the CLI.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

RUNS = [  # (config, run directory)
    ("experiments/quickstart/ridge.yaml", "runs/quickstart/ridge"),
    ("experiments/quickstart/linear.yaml", "runs/quickstart/linear"),
]


def brainenc(*args: str) -> None:
    cmd = [sys.executable, "-m", "brainenc.cli", *args]
    print("\n$ brainenc " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True)


def main() -> int:
    t0 = time.time()
    brainenc("simulate", "--preset", "quickstart", "--out", "data/simbrain-quickstart")
    for config, run in RUNS:
        brainenc("fit", "-c", config)
        brainenc("test", "-c", config, "--ckpt_path", f"{run}/checkpoints/best.ckpt")
    print("\nPer-ROI comparison on the held-out test images (medians over voxels; frac_oracle = r / oracle r):")
    brainenc("compare", *[run for _, run in RUNS])
    print(f"\nquickstart wall time: {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Peak memory of ``brainenc prepare nsd`` versus the number of sessions.

Builds one NSD-layout fixture with realistic sessions (750 trials each) and a reduced volume
whose nsdgeneral mask holds about 15,000 voxels (the real subject's count), then imports the
first N sessions for several N, each in a fresh subprocess so that its peak RSS is clean.
The importer streams session by session (and reads each session in trial blocks), so the peak
should stay flat as N grows; the output file grows by 750 x n_voxels x 4 bytes per session.

Usage:  python benchmarks/prepare_nsd_memory.py [--sessions 2 4] [--shape 34 40 34] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Peak RSS is read from /proc/self/status (VmHWM).  ru_maxrss is not used: Linux carries it over
# fork + exec from the parent, so a child would report the parent's peak.
CHILD = r"""
import json, sys, time
sys.path.insert(0, {root!r})

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

from brainenc.data.importers import prepare
import h5py, nibabel, numpy, scipy.io, PIL.Image  # imported before the baseline is taken
base = hwm()
t = time.perf_counter()
out = prepare("nsd", {src!r}, {out!r}, subjects=["subj01"], image_size=64, sessions={n},
              checksum="none", restart=True)
dt = time.perf_counter() - t
peak = hwm()
print(json.dumps({{"sessions": {n}, "baseline_mib": base / 1024, "peak_mib": peak / 1024, "seconds": dt,
                  "store_mib": sum(p.stat().st_size for p in out.glob("*.h5")) / 2**20}}))
"""

FIXTURE = r"""
import sys
sys.path.insert(0, {root!r})
from tests.fixtures.nsd import write_nsd
fx = write_nsd({src!r}, subjects=("subj01",), n_sessions={n}, shape={shape!r}, n_images=200, n_10k=120,
               n_shared=20, image_px=64, general_fraction={frac!r}, keep_truth=False)
print(int((fx.rois["subj01"]["nsdgeneral"] == 1).sum()))
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--shape", type=int, nargs=3, default=[34, 40, 34])
    ap.add_argument("--fraction", type=float, default=0.36, help="nsdgeneral fraction of brain voxels")
    ap.add_argument("--keep", default=None, help="directory to keep the fixture and stores in")
    args = ap.parse_args(argv)

    work = Path(args.keep or tempfile.mkdtemp(prefix="nsd_mem_"))
    src = work / "nsd"
    t = time.perf_counter()
    # The fixture is written in its own process too, so this parent stays small.
    res = subprocess.run([sys.executable, "-c", FIXTURE.format(
        root=str(ROOT), src=str(src), n=max(args.sessions), shape=tuple(args.shape), frac=args.fraction)],
        capture_output=True, text=True, check=True)
    n_vox = int(res.stdout.strip().splitlines()[-1])
    print(f"fixture: {max(args.sessions)} sessions x 750 trials, volume {tuple(args.shape)}, "
          f"{n_vox} nsdgeneral voxels, written in {time.perf_counter() - t:.1f} s to {src}")
    rows = []
    for n in args.sessions:
        code = CHILD.format(root=str(ROOT), src=str(src), out=str(work / f"store_{n}"), n=n)
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    print(f"{'sessions':>8} {'trials':>7} {'baseline MiB':>13} {'peak RSS MiB':>13} {'growth MiB':>11} "
          f"{'store MiB':>10} {'seconds':>8}")
    for r in rows:
        print(f"{r['sessions']:>8} {750 * r['sessions']:>7} {r['baseline_mib']:>13.1f} {r['peak_mib']:>13.1f} "
              f"{r['peak_mib'] - r['baseline_mib']:>11.1f} {r['store_mib']:>10.1f} {r['seconds']:>8.1f}")
    one_session = 750 * n_vox * 4 / 2**20
    print(f"one session of float32 responses = {one_session:.1f} MiB; holding all sessions would add about "
          f"that much per extra session.")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

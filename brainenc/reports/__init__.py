"""brainenc.reports: per-ROI comparison reports derived from runs' per-voxel tables.

Entry points
------------
main_report(argv) -> int
    ``brainenc report RUN_DIR... --out DIR [--threshold-p 0.05] [--n-boot 1000]
    [--seed 0] [--no-brainmaps] [--no-figures] [--max-pairs 6] [--max-brainmaps 12]``
build_report(run_dirs, out, ...) -> Path of report.html

See docs/reports.md for what the report contains.
"""

from __future__ import annotations

import argparse
import sys

from .build import build_report
from .tables import ReportInputError

__all__ = ["build_report", "main_report", "ReportInputError"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="brainenc report",
        description="Per-ROI comparison report from run directories (results/voxels.csv).")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories to compare")
    p.add_argument("--out", required=True, help="output directory for report.md/html, tables/, figures/")
    p.add_argument("--threshold-p", type=float, default=0.05,
                   help="one-sided p threshold for 'voxel r > 0' (and FDR q) [0.05]")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for CIs [1000]")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed [0]")
    p.add_argument("--no-brainmaps", action="store_true", help="skip brain-map figures")
    p.add_argument("--no-figures", action="store_true", help="tables and text only (fast)")
    p.add_argument("--max-pairs", type=int, default=6, help="model-pair scatter plots per dataset [6]")
    p.add_argument("--max-brainmaps", type=int, default=12, help="brain-map figures at most [12]")
    return p


def main_report(argv: list[str]) -> int:
    """Run ``brainenc report``; returns a process exit code (0 ok, 2 bad input)."""
    args = _parser().parse_args(argv)
    if not 0 < args.threshold_p < 1:
        print(f"brainenc report: --threshold-p must be in (0, 1), got {args.threshold_p}", file=sys.stderr)
        return 2
    if args.n_boot < 0:
        print(f"brainenc report: --n-boot must be >= 0, got {args.n_boot}", file=sys.stderr)
        return 2
    try:
        path = build_report(args.run_dirs, args.out, threshold_p=args.threshold_p, n_boot=args.n_boot,
                            seed=args.seed, brainmaps=not args.no_brainmaps, figures=not args.no_figures,
                            max_pairs=args.max_pairs, max_brainmaps=args.max_brainmaps)
    except ReportInputError as exc:
        print(f"brainenc report: {exc}", file=sys.stderr)
        return 2
    print(f"report written: {path}")
    return 0

"""Time-to-quality: validation median vs wall time of several runs, side by side.

    python benchmarks/time_to_quality.py before=runs/real/crowd_holdout_before \\
        after=runs/real/crowd_holdout --out docs/figures/universal_time_to_quality.png

Reads each run's CSVLogger ``logs/version_*/metrics.csv`` (``time/fit_s``, logged by
``EncoderModule`` after every validation, and ``val/pearson_median``; ``embed/ari``,
``embed/ari_position_controlled`` and ``embed/nn_same_roi`` when the run had the
``EmbeddingProbe``). Prints a markdown table (per epoch: wall seconds, validation median, ARI
as they are and position-controlled, NN same ROI) and the first time each run reached given fractions
of the best validation median over all runs; writes a figure with two panels (validation median and
ARI vs wall time).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd


def load(run: str | Path) -> pd.DataFrame:
    """Validation rows of a run's metrics: epoch, time/fit_s, val/pearson_median[, embed/*]."""
    files = sorted(Path(run).glob("logs/version_*/metrics.csv"))
    if not files:
        raise FileNotFoundError(f"{run}: no logs/version_*/metrics.csv")
    df = pd.read_csv(files[-1])
    keep = [c for c in ("epoch", "time/fit_s", "val/pearson_median", "embed/ari",
                        "embed/ari_position_controlled", "embed/nn_same_roi") if c in df]
    df = df[keep].dropna(subset=["val/pearson_median"])
    return df.groupby("epoch", as_index=False).first()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", help="label=run_dir")
    ap.add_argument("--out", default=None)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.9, 0.95, 0.99])
    a = ap.parse_args()
    runs = {r.split("=", 1)[0]: load(r.split("=", 1)[1]) for r in a.runs}
    best = max(float(d["val/pearson_median"].max()) for d in runs.values())
    for label, d in runs.items():
        print(f"\n{label}")
        print("| epoch | wall s | val median | ARI | ARI position-controlled | NN same ROI |\n"
              "|---|---|---|---|---|---|")
        nan = float("nan")
        for _, r in d.iterrows():
            print(f"| {int(r['epoch'])} | {r['time/fit_s']:.0f} | {r['val/pearson_median']:.3f} | "
                  f"{r.get('embed/ari', nan):.3f} | {r.get('embed/ari_position_controlled', nan):.3f} | "
                  f"{r.get('embed/nn_same_roi', nan):.3f} |")
    print(f"\nfirst wall time (s) at which the validation median reached a fraction of {best:.3f} "
          "(the best of all runs)")
    print("| run | " + " | ".join(f"{f:.0%}" for f in a.fractions) + " | best (epoch) |")
    print("|---|" + "---|" * (len(a.fractions) + 1))
    for label, d in runs.items():
        cells = []
        for f in a.fractions:
            hit = d[d["val/pearson_median"] >= f * best]
            cells.append(f"{hit['time/fit_s'].iloc[0]:.0f}" if len(hit) else "not reached")
        i = d["val/pearson_median"].idxmax()
        cells.append(f"{d.loc[i, 'val/pearson_median']:.3f} ({int(d.loc[i, 'epoch'])})")
        print(f"| {label} | " + " | ".join(cells) + " |")
    if a.out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for label, d in runs.items():
            axes[0].plot(d["time/fit_s"], d["val/pearson_median"], "o-", ms=3, label=label)
            if "embed/ari" in d:
                axes[1].plot(d["time/fit_s"], d["embed/ari"], "o-", ms=3, label=label)
            if "embed/ari_position_controlled" in d:
                axes[1].plot(d["time/fit_s"], d["embed/ari_position_controlled"], "s--", ms=3,
                             label=f"{label}, position-controlled")
        axes[0].set(xlabel="wall time since fit start (s)", ylabel="validation median r")
        axes[1].set(xlabel="wall time since fit start (s)", ylabel="k-means ARI vs true voxel types")
        for ax in axes:
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(a.out, dpi=110)
        print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()

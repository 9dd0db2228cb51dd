"""Receptive-field recovery: a retinotopic readout's learned positions against simbrain's truth.

simbrain stores every voxel's true population receptive-field centre (``truth/prf_x_deg``,
``truth/prf_y_deg``, degrees, x right, y up). A retinotopic readout learns one position per voxel
(:meth:`~brainenc.models.retinotopic.RetinotopicReadout.positions_deg`, same convention), so the
two can be compared voxel by voxel: Pearson r per axis and the median distance in degrees, over
the voxels of the early visual areas (V1-V3), where a position is well defined.

Centres off the screen.  A readout samples the image, so it cannot place a centre outside it,
and no image-computable model can tell a centre 1 deg beyond the edge from one 3 deg beyond it.
Recovery is therefore scored three ways: against the true centres of all voxels (``r_x``, ...);
over the voxels whose true centre lies on the screen only (``*_on_screen``); and for all voxels
against the *visible centre* (``*_visible``): the centre of mass of the part of the true pRF
Gaussian that falls on the screen (per axis the mean of a normal truncated to the image,
:func:`visible_centres`), which is the true centre for a small pRF well inside the image and
moves onto the screen as the pRF hangs off it.

Sizes.  A readout with Gaussian fields (``rf: gaussian``) also learns a size per voxel
(:meth:`~brainenc.models.retinotopic.RetinotopicReadout.rf_sizes`); ``size_r_on_screen`` is the
Spearman rank correlation of the learned with the true pRF sizes (``truth/prf_sigma_deg``) over
the on-screen voxels. Rank, not value: the learned field is an extra pooling of a map whose
pixels already integrate over the backbone's own receptive fields, so only the ordering is
comparable.

Command line (prints JSON; ``--out`` also writes it)::

    python -m brainenc.analysis.prf runs/quickstart/retinotopic [--rois V1,V2,V3] [--out prf.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional, Sequence

import h5py
import numpy as np

EARLY_VISUAL = ("V1", "V2", "V3")


def true_centres(path: Path, with_sigma: bool = False):
    """simbrain's true centres (n_voxels, 2) in degrees, voxel types (n_voxels,) and their labels;
    with ``with_sigma`` also the pRF sizes (n_voxels,) in degrees, last."""
    import yaml

    with h5py.File(path, "r") as f:
        if "truth/prf_x_deg" not in f:
            raise KeyError(f"{path}: field 'truth/prf_x_deg': expected simbrain ground truth (a simulated store)")
        xy = np.stack([f["truth/prf_x_deg"][()], f["truth/prf_y_deg"][()]], axis=1).astype(np.float64)
        vt = f["truth/voxel_type"][()].astype(np.int64)
        labels = {int(k): str(v) for k, v in (yaml.safe_load(f["truth/voxel_type"].attrs["labels"]) or {}).items()}
        sigma = f["truth/prf_sigma_deg"][()].astype(np.float64) if with_sigma else None
    return (xy, vt, labels, sigma) if with_sigma else (xy, vt, labels)


def visible_centres(xy: np.ndarray, sigma: np.ndarray, half: float) -> np.ndarray:
    """Centre of mass of the on-screen part of each Gaussian pRF, (n, 2) degrees.

    Parameters
    ----------
    xy : (n, 2) true centres in degrees; sigma : (n,) sizes in degrees
    half : half the image width in degrees (the screen is the square [-half, half]^2)

    The square is separable, so per axis this is the mean of a normal truncated to
    [-half, half]: ``mu + sigma (phi(a) - phi(b)) / (Phi(b) - Phi(a))``, a = (-half - mu) / sigma,
    b = (half - mu) / sigma.  A pRF entirely off the screen (mass below 1e-12) keeps its centre
    clipped to the edge.
    """
    from scipy.special import ndtr

    mu = np.asarray(xy, np.float64)
    sd = np.asarray(sigma, np.float64)[:, None]
    a, b = (-half - mu) / sd, (half - mu) / sd
    phi = lambda z: np.exp(-0.5 * z ** 2) / np.sqrt(2 * np.pi)  # noqa: E731
    mass = ndtr(b) - ndtr(a)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = mu + sd * (phi(a) - phi(b)) / mass
    return np.where(mass > 1e-12, out, np.clip(mu, -half, half))


def recovery_stats(est: np.ndarray, true: np.ndarray) -> dict:
    """Agreement of estimated and true centres, both (n, 2) in degrees.

    Returns ``{"n", "r_x", "r_y", "median_dist_deg"}``; r is NaN for fewer than 3 voxels or a
    constant axis.
    """
    from brainenc.metrics.correlation import pearson_np

    est, true = np.asarray(est, np.float64), np.asarray(true, np.float64)
    ok = np.isfinite(est).all(1) & np.isfinite(true).all(1)
    est, true = est[ok], true[ok]
    out = {"n": int(len(est))}
    for k, axis in (("r_x", 0), ("r_y", 1)):
        a, b = est[:, axis], true[:, axis]
        out[k] = float(pearson_np(a[:, None], b[:, None])[0]) if len(a) > 2 else float("nan")
    out["median_dist_deg"] = float(np.median(np.hypot(*(est - true).T))) if len(est) else float("nan")
    return out


def prf_recovery(readout, pairs: Sequence, rois: Sequence[str] = EARLY_VISUAL) -> dict[str, dict]:
    """Per (dataset, subject) pair with ground truth: :func:`recovery_stats` over voxels of ``rois``.

    Parameters
    ----------
    readout : a readout with ``positions_deg(pair, visual_angle_deg)`` (n_voxels, 2)
    pairs : :class:`~brainenc.data.datamodule.PairData` (store, subject, ...)
    rois : true voxel types to include, by name (simbrain's ``truth/voxel_type`` labels)

    Returns {pair: :func:`recovery_stats` of those voxels, plus the same keys suffixed
    ``_on_screen`` for the voxels whose true centre lies inside the image and ``_visible`` for all
    of them against their :func:`visible_centres` (module docstring), ``off_screen_fraction``, and
    for readouts with Gaussian fields ``size_r_on_screen`` (:func:`size_rank_r`)}
    """
    out = {}
    for p in pairs:
        if not p.info.has_truth or p.key not in readout.voxel_counts:
            continue
        true, vt, labels, sigma = true_centres(p.info.path, with_sigma=True)
        codes = [c for c, name in labels.items() if name in set(rois)]
        sel = np.isin(vt, codes)
        est = readout.positions_deg(p.key, p.store.visual_angle_deg).cpu().numpy()
        out[p.key] = recovery_stats(est[sel], true[sel])
        # a readout can only look inside the image: centres off the screen (simbrain places some
        # peripheral pRFs there) cap r, so the stats are also given for centres on the screen
        half = p.store.visual_angle_deg / 2
        on = sel & (np.abs(true) <= half).all(axis=1)
        out[p.key].update({f"{k}_on_screen": v for k, v in recovery_stats(est[on], true[on]).items()})
        vis = visible_centres(true[sel], sigma[sel], half)
        out[p.key].update({f"{k}_visible": v for k, v in recovery_stats(est[sel], vis).items()})
        out[p.key]["off_screen_fraction"] = float(1 - on.sum() / max(1, sel.sum()))
        sizes = readout.rf_sizes(p.key) if callable(getattr(readout, "rf_sizes", None)) else None
        if sizes is not None:
            out[p.key]["size_r_on_screen"] = size_rank_r(sizes.detach().cpu().numpy()[on], sigma[on])
    return out


def size_rank_r(est: np.ndarray, true: np.ndarray) -> float:
    """Spearman rank correlation of learned and true field sizes (n,); NaN for fewer than 3."""
    from scipy.stats import spearmanr

    ok = np.isfinite(est) & np.isfinite(true)
    if ok.sum() < 3:
        return float("nan")
    return float(spearmanr(est[ok], true[ok]).statistic)


def prf_figure(readout, pair, rois: Sequence[str] = EARLY_VISUAL):
    """Learned vs true receptive-field centres of one pair: a Figure with, for voxels of ``rois``,
    the true and learned polar angle on the flat cortical map (simbrain's ``truth/flat_xy``) and
    learned-vs-true scatters of x and y (degrees)."""
    import matplotlib

    from brainenc.reports.plots import new_figure

    true, vt, labels = true_centres(pair.info.path)
    with h5py.File(pair.info.path, "r") as f:
        flat = f["truth/flat_xy"][()] if "truth/flat_xy" in f else pair.info.coords[:, :2]
    sel = np.isin(vt, [c for c, n in labels.items() if n in set(rois)])
    est = readout.positions_deg(pair.key, pair.store.visual_angle_deg).cpu().numpy()
    fig, axes = new_figure(1, 4, figsize=(17, 4.2))
    axes = axes[0]
    cmap = matplotlib.colormaps["hsv"]
    for ax, xy, title in ((axes[0], true, "true polar angle"), (axes[1], est, "learned polar angle")):
        ang = np.arctan2(xy[sel, 1], xy[sel, 0])
        ax.scatter(flat[sel, 0], flat[sel, 1], c=ang, cmap=cmap, vmin=-np.pi, vmax=np.pi, s=9, linewidths=0)
        ax.set_title(f"{title} ({', '.join(rois)})")
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    stats = recovery_stats(est[sel], true[sel])
    half = pair.store.visual_angle_deg / 2
    for ax, axis, name in ((axes[2], 0, "x"), (axes[3], 1, "y")):
        ax.scatter(true[sel, axis], est[sel, axis], s=5, alpha=0.5, linewidths=0)
        ax.plot([-half, half], [-half, half], color="k", lw=0.8)
        ax.set_xlabel(f"true {name} (deg)")
        ax.set_ylabel(f"learned {name} (deg)")
        ax.set_title(f"{name}: r = {stats['r_' + name]:.3f}, median error {stats['median_dist_deg']:.2f} deg")
    fig.suptitle(f"{pair.key}: learned vs true receptive-field centres")
    return fig


def summarise(stats: dict[str, dict]) -> dict:
    """Mean over pairs of each statistic (for one line per run)."""
    keys = ("r_x", "r_y", "median_dist_deg", "r_x_on_screen", "r_y_on_screen", "median_dist_deg_on_screen",
            "r_x_visible", "r_y_visible", "median_dist_deg_visible", "off_screen_fraction")
    return {k: float(np.nanmean([s[k] for s in stats.values()])) if stats else float("nan") for k in keys}


def load_tested_run(run: Path):
    """(model with the weights of its checkpoint in eval mode, datamodule) of a tested run directory.

    The model is rebuilt from ``results/config.yaml`` (the resolved config ``brainenc test`` wrote)
    and the weights of :meth:`~brainenc.rundir.RunDir.checkpoint` (best, else last) are read
    without unpickling code (``weights_only=True``).
    """
    from brainenc.cli import load_trained

    config = run / "results" / "config.yaml"
    if not config.exists():
        raise FileNotFoundError(f"{config}: not found; test the run first (brainenc test or fit --test_after_fit=true)")
    return load_trained(run, config)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m brainenc.analysis.prf", description=(
        "Compare a retinotopic run's learned receptive-field centres with simbrain's true ones."))
    ap.add_argument("run", type=Path, help="run directory (with config.yaml and checkpoints/)")
    ap.add_argument("--rois", default=",".join(EARLY_VISUAL), help="true voxel types (comma-separated)")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    ap.add_argument("--figure", type=Path, default=None, help="also draw the first pair's maps into this PNG")
    a = ap.parse_args(argv)
    model, dm = load_tested_run(a.run)
    rois = a.rois.split(",")
    stats = prf_recovery(model.readout, dm.pairs, rois)
    if a.figure:
        pair = next(p for p in dm.pairs if p.key in stats)
        a.figure.parent.mkdir(parents=True, exist_ok=True)
        prf_figure(model.readout, pair, rois).savefig(a.figure, dpi=110)
    doc = {"pairs": stats, "mean": summarise(stats)}
    text = json.dumps(doc, indent=2)
    print(text)
    if a.out:
        from brainenc.ioutil import atomic_write

        atomic_write(a.out, text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Put per-voxel scores back onto a brain: volumes, fsaverage surfaces, simbrain flat sheets.

Three kinds of map, chosen by the ``space`` column of voxels.csv:

* volume spaces ("MNI152", "func1pt8mm", any other non-surface space):
  voxels go back into a 3-D grid.  For MNI152 the grid is nilearn's bundled
  2 mm template (glass brain); for native spaces the grid is built from the
  coordinates themselves (spacing inferred from the coordinates, 1.8 mm if it
  cannot be), shown as axial slices over the voxel coverage.
* surface spaces ("fsaverage*"): values go onto nilearn's bundled fsaverage5
  inflated mesh, by vertex index (optional ``vertex`` + ``hemi`` columns) or
  else by nearest fsaverage5 vertex to (x, y, z).
* simbrain ("simbrain*"): a scatter of (flat_x, flat_y) coloured by score,
  one panel per hemisphere.

Every function returns a matplotlib Figure or raises; the caller turns any
exception into a note so a map failure never kills the report.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

#: fsaverage5 has 10242 vertices per hemisphere; finer fsaverages (6, 7) are
#: nested icosahedra whose first 10242 vertices are exactly fsaverage5's.
FSAVERAGE5_N = 10242
DEFAULT_GRID_MM = 1.8


def map_kind(space: str) -> str:
    """"surface", "flat" or "volume" for a ``space`` value."""
    s = str(space).lower()
    if s.startswith("fsaverage"):
        return "surface"
    if s.startswith("simbrain"):
        return "flat"
    return "volume"


def _aggregate(index: np.ndarray, values: np.ndarray, size: int) -> np.ndarray:
    """Mean of ``values`` per target ``index`` (several voxels may land in one cell).

    Returns array (size,) with NaN where nothing landed.
    """
    ok = np.isfinite(values)
    s = np.bincount(index[ok], weights=values[ok], minlength=size)
    c = np.bincount(index[ok], minlength=size)
    out = np.full(size, np.nan)
    out[c > 0] = s[c > 0] / c[c > 0]
    return out


def infer_spacing(coords: np.ndarray, default: float = DEFAULT_GRID_MM) -> np.ndarray:
    """Per-axis grid spacing (3,) in mm: the most common gap between sorted unique coordinates.

    Why: native-space tables come from a voxel grid whose spacing is not in
    the table; using the data's own spacing puts one voxel in one cell.
    An axis falls back to ``default`` when it has fewer than two distinct
    values, when the gap is below 0.5 mm, or when fewer than 90% of the
    coordinates sit on the inferred grid (coordinates not from a grid, e.g.
    surface vertices: a tiny "spacing" there would make an enormous volume).
    """
    out = np.full(3, float(default))
    for k in range(3):
        c = coords[:, k][np.isfinite(coords[:, k])]
        u = np.unique(np.round(c, 3))
        if u.size < 2:
            continue
        gaps = np.round(np.diff(u), 2)
        gaps = gaps[gaps > 0.05]
        if not gaps.size:
            continue
        vals, counts = np.unique(gaps, return_counts=True)
        step = float(vals[np.argmax(counts)])
        off = (c - c.min()) / step
        if step >= 0.5 and np.mean(np.abs(off - np.rint(off)) < 0.1) >= 0.9:
            out[k] = step
    return out


def volume_image(coords: np.ndarray, values: np.ndarray, space: str):
    """Place voxel values into a Nifti image.

    Parameters
    ----------
    coords : array (n_voxels, 3) mm
    values : array (n_voxels,)
    space : "MNI152" uses the nilearn 2 mm MNI152 template grid; anything else
        builds a grid from the coordinates.

    Returns
    -------
    img : Nifti1Image, 0 outside the data (nilearn zero-fills NaN anyway), coverage : Nifti1Image (1 where data),
    n_outside : int, voxels that fell outside the template grid (MNI only).
    """
    import nibabel as nib

    coords = np.asarray(coords, dtype=np.float64)
    if str(space).upper().startswith("MNI"):
        from nilearn import datasets

        tpl = datasets.load_mni152_template(resolution=2)
        affine, shape = tpl.affine, tpl.shape[:3]
    else:
        spacing = infer_spacing(coords)
        origin = np.nanmin(coords, axis=0) - 2 * spacing  # 2-voxel margin for display
        affine = np.diag([*spacing, 1.0])
        affine[:3, 3] = origin
        extent = np.nanmax(coords, axis=0) - origin
        shape = tuple(int(v) for v in np.ceil(extent / spacing) + 3)
        if np.prod(shape) > 64_000_000:  # ~ 400^3: not a brain at >= 0.5 mm; refuse, don't swap
            raise ValueError(f"coordinates span {extent.round(0).tolist()} mm; a {spacing.tolist()} mm "
                             f"grid would need {shape} cells")
    inv = np.linalg.inv(affine)
    ijk = np.rint(coords @ inv[:3, :3].T + inv[:3, 3]).astype(np.int64)
    inside = np.all((ijk >= 0) & (ijk < np.array(shape)), axis=1) & np.all(np.isfinite(coords), axis=1)
    flat = np.ravel_multi_index(ijk[inside].T, shape)
    size = int(np.prod(shape))
    data = np.nan_to_num(_aggregate(flat, np.asarray(values, dtype=np.float64)[inside], size))
    data = data.reshape(shape)
    cov = np.zeros(size)
    cov[flat] = 1.0
    return (nib.Nifti1Image(data.astype(np.float32), affine),
            nib.Nifti1Image(cov.reshape(shape).astype(np.float32), affine),
            int((~inside).sum()))


def _hemi_of(df: pd.DataFrame) -> np.ndarray:
    """"left"/"right" per row, from a ``hemi`` column (lh/rh/left/right/L/R) or the sign of x."""
    if "hemi" in df.columns:
        h = df["hemi"].astype(str).str.lower().str[0].map({"l": "left", "r": "right"})
        if h.notna().all():
            return h.to_numpy()
    return np.where(df["x"].to_numpy() < 0, "left", "right")


def surface_values(df: pd.DataFrame, value: str = "pearson") -> tuple[dict[str, np.ndarray], str]:
    """Map one subject's per-voxel values onto fsaverage5 (10242 vertices per hemisphere).

    Parameters
    ----------
    df : rows of one (label, dataset, subject) with x, y, z and optionally vertex, hemi.

    Returns
    -------
    values : {"left": (10242,), "right": (10242,)} NaN where no data,
    how : a sentence saying how the mapping was done (goes into the report).
    """
    hemi = _hemi_of(df)
    vals = df[value].to_numpy(dtype=np.float64)
    out = {}
    if "vertex" in df.columns and df["vertex"].notna().all():
        v = df["vertex"].to_numpy().astype(np.int64)
        keep = v < FSAVERAGE5_N
        for h in ("left", "right"):
            m = keep & (hemi == h)
            out[h] = _aggregate(v[m], vals[m], FSAVERAGE5_N)
        if keep.all():
            how = "fsaverage5 vertices by index"
        else:
            how = (f"vertex index: {int(keep.sum())} of {len(v)} vertices are shared with fsaverage5 "
                   "(nested icosahedron) and shown; the finer vertices are not drawn")
        return out, how

    from nilearn import datasets
    from scipy.spatial import cKDTree

    fs = datasets.load_fsaverage("fsaverage5")
    xyz = df[["x", "y", "z"]].to_numpy(dtype=np.float64)
    best = None
    # The table's coordinates may be on any of the standard fsaverage meshes: use
    # the one they sit on (smallest median distance to its vertices).
    for mesh in ("pial", "white_matter", "inflated", "sphere"):
        dist = np.empty(len(df))
        idx = np.empty(len(df), dtype=np.int64)
        for h in ("left", "right"):
            m = hemi == h
            if m.any():
                tree = cKDTree(fs[mesh].parts[h].coordinates)
                dist[m], idx[m] = tree.query(xyz[m])
        med = float(np.median(dist))
        if best is None or med < best[0]:
            best = (med, mesh, dist, idx)
    med, mesh, dist, idx = best
    if med > 4.0:
        raise ValueError(f"coordinates are not on an fsaverage mesh (median distance to the "
                         f"nearest fsaverage5 vertex {med:.1f} mm on the closest mesh, '{mesh}')")
    near = dist <= 8.0
    for h in ("left", "right"):
        m = near & (hemi == h)
        out[h] = _aggregate(idx[m], vals[m], FSAVERAGE5_N)
    return out, (f"nearest fsaverage5 vertex on the {mesh} mesh (median distance {med:.1f} mm; "
                 f"{int((~near).sum())} points farther than 8 mm dropped)")


def _robust_vmax(values: np.ndarray) -> float:
    v = np.abs(values[np.isfinite(values)])
    return float(np.percentile(v, 99)) if v.size and np.percentile(v, 99) > 0 else 1.0


def flat_differences(df: pd.DataFrame, labels: list[str], value: str = "pearson",
                     max_pairs: int = 3) -> list[tuple[str, str, pd.DataFrame]]:
    """Per-voxel ``value`` of model a minus model b for each pair of labels (first ``max_pairs``).

    Returns [(a, b, frame)]: rows of ``a`` aligned with ``b`` on (dataset, subject, voxel), with
    ``value`` replaced by the difference (NaN where either is NaN).
    """
    key = [c for c in ("dataset", "subject", "voxel") if c in df.columns]
    out = []
    for i, a in enumerate(labels):
        for b in labels[i + 1:]:
            if len(out) >= max_pairs:
                return out
            da = df[df["label"] == a]
            db = df[df["label"] == b][key + [value]].rename(columns={value: "_b"})
            m = da.merge(db, on=key, how="inner")
            m[value] = m[value].to_numpy(dtype=np.float64) - m["_b"].to_numpy(dtype=np.float64)
            out.append((a, b, m.drop(columns="_b")))
    return out


def _flat_panel(ax, dh: pd.DataFrame, xcol: str, ycol: str, value: str, cmap: str, vmin: float,
                vmax: float, title: str):
    """One hemisphere sheet: voxels as large dots coloured by ``value``, ROI names on top."""
    xs, ys = dh[xcol], dh[ycol]
    v = dh[value].to_numpy(dtype=np.float64)
    nan = ~np.isfinite(v)
    # dots big enough to tile the sheet: the area per voxel shrinks with the voxel count
    size = float(np.clip(24000.0 / max(1, len(dh)), 6.0, 90.0))
    ax.set_facecolor("0.93")
    ax.scatter(xs[nan], ys[nan], s=size * 0.4, c="0.6", marker="x", linewidths=0.5)
    sc = ax.scatter(xs[~nan], ys[~nan], c=v[~nan], s=size, cmap=cmap, vmin=vmin, vmax=vmax,
                    linewidths=0, marker="s")
    # ROI names at a real voxel near the ROI's median orient the reader (split ROIs such as
    # dorsal/ventral V2 would otherwise all be labelled inside V1); without a hemi column both
    # hemispheres share the panel, so each side is labelled separately
    side = np.sign(xs) if "hemi" not in dh.columns else np.zeros(len(dh))
    for (roi, _), g in dh.groupby([dh["roi"], side]):
        if roi != "none":
            gx, gy = xs.loc[g.index].to_numpy(), ys.loc[g.index].to_numpy()
            j = np.argmin((gx - np.median(gx)) ** 2 + (gy - np.median(gy)) ** 2)
            ax.annotate(str(roi), (gx[j], gy[j]), fontsize=8, ha="center", va="center", color="k",
                        bbox={"boxstyle": "round,pad=0.15", "fc": "w", "alpha": 0.75, "lw": 0})
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("flat x (mm)", fontsize=8)
    ax.set_ylabel("flat y (mm)", fontsize=8)
    ax.tick_params(labelsize=7)
    return sc


def _flat_figure(df: pd.DataFrame, labels: list[str], value: str, vmax: float, notes: list[str]):
    """simbrain sheets: one row per model on a sequential scale (0 .. vmax), then one row per
    pair of models showing a - b on a diverging scale centred on 0."""
    from .plots import new_figure

    has_flat = {"flat_x", "flat_y"} <= set(df.columns) and df[["flat_x", "flat_y"]].notna().all().all()
    if not has_flat:
        notes.append("no flat_x/flat_y columns: drew the (x, y) coordinates instead")
    xcol, ycol = ("flat_x", "flat_y") if has_flat else ("x", "y")
    hemis = sorted(df["hemi"].dropna().astype(str).unique()) if "hemi" in df.columns else []
    hemis = hemis or [None]
    diffs = flat_differences(df, labels, value)
    dmax = _robust_vmax(np.concatenate([d[value].to_numpy(dtype=np.float64) for _, _, d in diffs])) \
        if diffs else 1.0
    rows = [(lab, df[df["label"] == lab], "viridis", 0.0, vmax) for lab in labels]
    rows += [(f"{a} − {b}", d, "RdBu_r", -dmax, dmax) for a, b, d in diffs]
    fig, axes = new_figure(len(rows), len(hemis), figsize=(5.2 * len(hemis) + 1.2, 4.4 * len(rows)))
    seq = div = None
    for i, (title, d, cmap, lo, hi) in enumerate(rows):
        for j, h in enumerate(hemis):
            dh = d if h is None else d[d["hemi"].astype(str) == h]
            sc = _flat_panel(axes[i, j], dh, xcol, ycol, value, cmap, lo, hi,
                             title + (f" — {h}" if h is not None else ""))
            if cmap == "viridis":
                seq = sc
            else:
                div = sc
    if seq is not None:
        fig.colorbar(seq, ax=axes[:len(labels)].ravel().tolist(), shrink=0.7,
                     label=f"{value} (negative shown as 0)")
    if div is not None:
        fig.colorbar(div, ax=axes[len(labels):].ravel().tolist(), shrink=0.7,
                     label=f"difference in {value} (red: first model better)")
    if diffs:
        notes.append("bottom rows: per-voxel difference for each pair of models")
    return fig, notes


def brainmap_figure(df: pd.DataFrame, labels: list[str], value: str = "pearson",
                    vmax: float | None = None):
    """One figure for one (dataset, subject): one row per model label.

    Parameters
    ----------
    df : rows of one (dataset, subject), all labels; needs space, x, y, z, ``value``
        and flat_x/flat_y for simbrain, vertex/hemi optionally for fsaverage.
    labels : model labels to draw, one row each (missing ones are skipped).
    vmax : shared colour limit; default the 99th percentile of |value|.

    Returns
    -------
    fig : matplotlib Figure, notes : list of str (how data were mapped).
    """
    from .plots import new_figure

    spaces = df["space"].dropna().unique()
    if len(spaces) != 1:
        raise ValueError(f"expected one coordinate space per subject, found {list(spaces)}")
    space = str(spaces[0])
    kind = map_kind(space)
    labels = [lab for lab in labels if (df["label"] == lab).any()]
    vmax = vmax or _robust_vmax(df[value].to_numpy(dtype=np.float64))
    notes: list[str] = []
    n = len(labels)
    cmap = "cold_hot"

    if kind == "flat":
        return _flat_figure(df, labels, value, vmax, notes)

    from nilearn import plotting

    if kind == "volume":
        mni = space.upper().startswith("MNI")
        fig, axes = new_figure(n, 1, figsize=(10, 2.8 * n), layout=None)
        for i, lab in enumerate(labels):
            d = df[df["label"] == lab]
            img, cov, n_out = volume_image(d[["x", "y", "z"]].to_numpy(), d[value].to_numpy(), space)
            if n_out:
                notes.append(f"{lab}: {n_out} voxels outside the MNI152 2 mm template grid were dropped")
            title = f"{lab} ({value})"
            if mni:
                plotting.plot_glass_brain(img, axes=axes[i, 0], figure=fig, colorbar=True,
                                          plot_abs=False, cmap=cmap, vmin=-vmax, vmax=vmax,
                                          symmetric_cbar=True, threshold=1e-6, title=title)
            else:
                plotting.plot_stat_map(img, bg_img=cov, axes=axes[i, 0], figure=fig, colorbar=True,
                                       display_mode="z", cut_coords=6, cmap=cmap, vmin=-vmax,
                                       vmax=vmax, symmetric_cbar=True, threshold=1e-6, title=title,
                                       draw_cross=False, black_bg=False, dim=0)
        if mni:
            notes.append("MNI152 voxels placed on nilearn's 2 mm template grid (glass brain)")
        else:
            sp = infer_spacing(df[["x", "y", "z"]].to_numpy(dtype=np.float64))
            notes.append(f"native space '{space}': grid built from the coordinates "
                         f"(spacing {', '.join(f'{s:g}' for s in sp)} mm); grey = voxels in the table")
        return fig, notes

    # surface
    from nilearn import datasets

    fs = datasets.load_fsaverage("fsaverage5")
    try:
        sulc = datasets.load_fsaverage_data("fsaverage5", data_type="sulcal")
        bg = {h: np.asarray(sulc.data.parts[h]) for h in ("left", "right")}
    except Exception:  # background shading is cosmetic; draw without it
        bg = {"left": None, "right": None}
    views = [("left", "lateral"), ("left", "medial"), ("right", "lateral"), ("right", "medial")]
    fig, axes = new_figure(n, 4, figsize=(12, 3.0 * n), layout=None, projection="3d")
    for i, lab in enumerate(labels):
        vals, how = surface_values(df[df["label"] == lab], value)
        if i == 0:
            notes.append(f"surface: {how}; drawn on fsaverage5 inflated")
        for j, (h, view) in enumerate(views):
            data = np.nan_to_num(vals[h], nan=0.0)
            plotting.plot_surf_stat_map(
                fs["inflated"].parts[h], data, hemi=h, view=view, bg_map=bg[h],
                axes=axes[i, j], figure=fig, colorbar=(j == 3), cmap=cmap, vmin=-vmax,
                vmax=vmax, symmetric_cbar=True, threshold=1e-6,
                title=f"{lab} {h} {view}" if j == 0 else f"{h} {view}")
    return fig, notes

"""Reading the files source datasets come in: images, MATLAB files, masked NIfTI volumes.

Every problem with a source file is a :class:`SourceError` naming the file, the field and what was
expected.  The importers (:mod:`brainenc.data.importers`) call these; the shared import machinery
is in :mod:`.base`.
"""

from __future__ import annotations

import zlib

from pathlib import Path
from typing import Iterator, Sequence

import h5py
import numpy as np

from brainenc.data.images import to_rgb_square
from brainenc.data.store import StoreError


class SourceError(StoreError):
    """A *source* dataset file is missing or malformed (a :class:`StoreError`, so callers that
    catch store problems catch these too).  The message names file, field and expectation."""


def load_image_file(path: Path, size: int) -> np.ndarray:
    """Read an image file (any PIL format) -> uint8 (size, size, 3)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return to_rgb_square(np.asarray(im.convert("RGB")), size)
    except (OSError, ValueError) as e:
        raise SourceError(path, "<image>", "a readable image file", str(e)) from None


def zscore_rows(x: np.ndarray, block: int = 128) -> np.ndarray:
    """Z-score each column of ``x`` float32 (n_trials, n_voxels) over its rows, **in place**.

    Statistics accumulate in float64 but over blocks of rows, so memory stays at one float32
    copy of ``x`` (a float64 copy of a 750 x 15,000 session would double the importer's peak).
    Constant columns become 0 (not NaN): a voxel with no variance in a session carries no signal.
    NaNs are ignored when computing mean and sd and stay NaN.  Returns ``x``.
    """
    if x.dtype != np.float32:
        x = x.astype(np.float32)
    n, v = x.shape
    s1 = np.zeros(v)
    cnt = np.zeros(v)
    for i in range(0, n, block):
        b = x[i:i + block].astype(np.float64)
        ok = np.isfinite(b)
        s1 += np.where(ok, b, 0).sum(0)
        cnt += ok.sum(0)
    mu = s1 / np.maximum(cnt, 1)
    s2 = np.zeros(v)
    for i in range(0, n, block):
        b = x[i:i + block].astype(np.float64) - mu
        s2 += np.where(np.isfinite(b), b * b, 0).sum(0)
    sd = np.sqrt(s2 / np.maximum(cnt, 1))
    good = sd > 0
    inv = np.where(good, 1.0 / np.where(good, sd, 1.0), 0.0)
    for i in range(0, n, block):
        b = (x[i:i + block].astype(np.float64) - mu) * inv
        x[i:i + block] = b  # NaN stays NaN; constant columns become 0
    return x


def nan_voxel_policy(finite: np.ndarray, n_rows: int, policy: str, path, field: str, report: dict,
                     roi=None) -> np.ndarray:
    """Which voxels to keep given their count of finite responses; bool (n_voxels,).

    finite : int (n_voxels,) finite values per voxel over all ``n_rows`` trials/images
    policy : 'drop' leaves out voxels with any NaN; 'keep' keeps them (NaN = missing value, which
             the store and the metrics accept) but still leaves out voxels with no finite value
             (the store requires one per column); 'error' refuses any NaN
    roi : optional RoiAtlas over the same voxels, to report the dropped voxels per ROI label
    Counts go to ``report`` (``nan_voxels``, ``nan_voxels_dropped``, per ROI).
    """
    finite = np.asarray(finite)
    some_nan = finite < n_rows
    if not some_nan.any():
        return np.ones(len(finite), bool)
    if policy == "error":
        raise SourceError(path, field, "finite responses for every voxel (or -o nan_voxels=drop|keep)",
                          f"NaN in {int(some_nan.sum())} voxels")
    drop = some_nan if policy == "drop" else finite == 0
    report["nan_voxels"] = int(some_nan.sum())
    report["nan_voxels_dropped"] = int(drop.sum())
    if roi is not None and drop.any():
        report["nan_voxels_dropped_per_roi"] = {
            name: int((drop & (roi.values == value)).sum()) for value, name in sorted(roi.labels.items())
            if (drop & (roi.values == value)).any()}
    return ~drop


def affine_coords(affine: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    """Voxel indices ``ijk`` int (n, 3) -> millimetres float32 (n, 3) through a 4x4 affine."""
    ijk = np.asarray(ijk, dtype=np.float64)
    return (ijk @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]).astype(np.float32)


def read_mat(path: Path, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Read variables from a MATLAB file, v5 (scipy) or v7.3 (HDF5, h5py).

    v7.3 files store arrays column-major, so h5py returns them transposed; they are transposed back
    here so both versions give MATLAB's shape.
    """
    out: dict[str, np.ndarray] = {}
    if h5py.is_hdf5(path):
        with h5py.File(path, "r") as f:
            for n in names:
                if n not in f:
                    raise SourceError(path, n, "a variable of this MATLAB file", "missing")
                out[n] = np.asarray(f[n][()]).T
        return out
    import scipy.io

    try:
        m = scipy.io.loadmat(path, variable_names=list(names))
    except Exception as e:  # scipy raises many types (ValueError, IndexError, ...) for a bad file
        raise SourceError(path, "<file>", "a MATLAB .mat file (v5, or v7.3 = HDF5)",
                          str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    for n in names:
        if n not in m:
            raise SourceError(path, n, "a variable of this MATLAB file", "missing")
        out[n] = np.asarray(m[n])
    return out


def load_nifti(path: Path):
    """``nibabel.load(path)``; a file nibabel cannot open (a truncated or damaged header, not a
    NIfTI/MGH file) is a SourceError naming it."""
    import nibabel as nib

    try:
        return nib.load(path)
    except Exception as e:  # nibabel raises several types for bad headers
        raise SourceError(path, "<file>", "a readable NIfTI file", f"{e} (truncated or damaged? copy or "
                          "download it again)") from None


def nifti_array(path: Path, dtype=None) -> np.ndarray:
    """All values of the NIfTI (or MGH) file ``path`` as an array; a file whose data ends early
    (truncated: gzip's EOFError, a short read) is a SourceError naming it."""
    img = load_nifti(path)
    try:
        return np.asarray(img.dataobj, dtype)
    except (EOFError, OSError, ValueError, zlib.error) as e:
        raise truncated_nifti(path, e) from None


def truncated_nifti(path: Path, e: Exception) -> "SourceError":
    return SourceError(path, "<data>", "a complete NIfTI file", f"unreadable data ({type(e).__name__}: {e}; "
                       "truncated or damaged? copy or download it again)")


def read_nifti_masked(path: Path, ijk: np.ndarray, shape3: tuple, n_volumes: int | None = None,
                      block_bytes: float = 64 * 2**20, int_scale: float = 1.0) -> np.ndarray:
    """Values of voxels ``ijk`` (n_voxels, 3) in every volume of a 4-D NIfTI, float32 (n_vol, n_voxels).

    Reads blocks of volumes (bounded memory).  Integer data without header scaling are divided by
    ``int_scale`` (GLMsingle's int16 betas are percent signal change x 300).
    """
    img = load_nifti(path)
    if len(img.shape) != 4 or tuple(img.shape[:3]) != tuple(shape3):
        raise SourceError(path, "<volume>", f"4-D shape {tuple(shape3)} x volumes", str(img.shape))
    n = img.shape[3]
    if n_volumes is not None and n != n_volumes:
        raise SourceError(path, "<volume>", f"{n_volumes} volumes (trials)", str(n))
    slope = getattr(img.dataobj, "slope", 1.0)
    inter = getattr(img.dataobj, "inter", 0.0)
    raw_int = np.issubdtype(img.get_data_dtype(), np.integer) and slope in (1.0, None) and inter in (0.0, None)
    i, j, k = np.asarray(ijk).T
    out = np.empty((n, len(i)), np.float32)
    block = max(1, int(block_bytes // (np.prod(shape3) * img.get_data_dtype().itemsize)))
    try:
        for sl in iter_blocks(n, block):
            out[sl] = np.asarray(img.dataobj[..., sl])[i, j, k, :].T
    except (EOFError, OSError, ValueError, zlib.error) as e:
        raise truncated_nifti(path, e) from None
    if raw_int and int_scale != 1.0:
        out /= np.float32(int_scale)
    return out


def iter_blocks(n: int, block: int) -> Iterator[slice]:
    for start in range(0, n, block):
        yield slice(start, min(n, start + block))

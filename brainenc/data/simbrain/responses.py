"""Responses of the simulated brain: oriented energy in pRFs, compressed, plus trial noise.

Retinotopic voxel (ROI r, pRF G, orientation weights w, exponent n < 1)::

    drive(img) = sum_o w_o  sum_p G_p  E_{r,o,p}(img) / ref_r        (pRF-weighted energy)
    raw(img)   = max(drive, 0) ** n                                (compressive summation)

With a suppressive surround (``Assumptions.surround_gain`` g > 0, ratio k) ``G`` is a difference
of Gaussians, ``G(sigma) - g G(k sigma)``, on the same centre.

``E_{r,o}`` is the local oriented energy (squared modulus of a quadrature, i.e. analytic, log-Gabor
filter) of the greyscale image at ROI r's spatial frequency and orientation o, computed with FFTs
and pooled onto a coarse grid.  ``G`` is the Gaussian pRF integrated over each grid cell (erf),
so a pRF that hangs off the screen sees only the grey surround.

Category voxels add a category term to hV4-like energy::

    raw(img) = gain * overlap(pRF, face box) ** 0.5 * face(img) + w_low * drive_hV4(img) ** n

(and the scene box for scene voxels): ``overlap`` is the fraction of the pRF's Gaussian mass
inside the box, in closed form.

Each voxel's ``raw`` is z-scored over all the store's stimuli and scaled to the voxel's signal sd;
a trial adds Gaussian noise with the voxel's noise sd, with ``signal_sd**2 + noise_sd**2 = 1`` and
``signal_sd / noise_sd = ncsnr``.
"""

from __future__ import annotations

import functools

import numpy as np
import scipy.fft
from scipy.special import ndtr

from .cortex import RETINOTOPIC, SF_FRACTION_OF_NYQUIST, VoxelTable

N_ORI = 4
ORIENTATIONS = np.arange(N_ORI) * np.pi / N_ORI
LOG_SF_SD = 0.45  # radial log-Gabor bandwidth: ~1.5 octaves full width at half maximum
ORI_SD = 0.40  # angular bandwidth (rad)
CATEGORY_GAIN = 3.0
CATEGORY_LOW_LEVEL = 0.5


# ----------------------------------------------------------------------------- energy


@functools.lru_cache(maxsize=8)
def filter_bank(size: int) -> tuple[np.ndarray, int]:
    """One-sided log-Gabor filters on the padded FFT grid.

    Returns
    -------
    bank : complex64 (n_bands, N_ORI, M, M) frequency responses (band b = RETINOTOPIC[b])
    m : padded side M (the image sits in the middle of a grey surround)
    """
    m = scipy.fft.next_fast_len(size + size // 4)  # a margin against wrap-around
    f = scipy.fft.fftfreq(m) * m / size  # cycles per *image* pixel (Nyquist 0.5)
    fy, fx = np.meshgrid(f, f, indexing="ij")
    rad = np.hypot(fx, fy)
    ang = np.arctan2(fy, fx)
    bank = np.zeros((len(RETINOTOPIC), N_ORI, m, m), np.complex64)
    with np.errstate(divide="ignore"):
        lr = np.log(rad)
    for b, r in enumerate(RETINOTOPIC):
        f0 = SF_FRACTION_OF_NYQUIST[r] * 0.5
        radial = np.where(rad > 0, np.exp(-((lr - np.log(f0)) ** 2) / (2 * LOG_SF_SD ** 2)), 0.0)
        for o, th in enumerate(ORIENTATIONS):
            # one-sided in angle: only frequencies near +th pass, so the output is analytic and
            # its squared modulus is phase-invariant (quadrature) energy
            dth = np.angle(np.exp(1j * (ang - th)))
            bank[b, o] = radial * np.exp(-(dth ** 2) / (2 * ORI_SD ** 2))
    return bank, m


def pool_size(size: int, band: int) -> int:
    """Side of the pooled energy grid: fine for high-SF bands, coarse for low-SF ones."""
    f0 = SF_FRACTION_OF_NYQUIST[RETINOTOPIC[band]] * 0.5
    return max(4, size // 2 if f0 > 0.15 else size // 4)


def energy_maps(images: np.ndarray) -> list[np.ndarray]:
    """Local oriented energy of a batch of images, per band.

    Parameters
    ----------
    images : uint8 (n, S, S, 3)

    Returns
    -------
    list over bands of float32 (n, N_ORI, P_b * P_b), P_b = :func:`pool_size`
    """
    n, s = images.shape[:2]
    bank, m = filter_bank(s)
    grey = images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32) / 255 - 0.5
    pad = np.zeros((n, m, m), np.float32)  # zeros = mid-grey screen around the image
    o0 = (m - s) // 2
    pad[:, o0:o0 + s, o0:o0 + s] = grey
    spec = scipy.fft.fft2(pad, workers=-1).astype(np.complex64)
    out = []
    for b in range(bank.shape[0]):
        resp = scipy.fft.ifft2(spec[:, None] * bank[b][None], workers=-1)[..., o0:o0 + s, o0:o0 + s]
        e = (resp.real ** 2 + resp.imag ** 2).astype(np.float32)
        e[e < 1e-20] = 0  # no subnormal floats downstream (they make matmuls crawl)
        p = pool_size(s, b)
        k = s // p
        e = e.reshape(n, N_ORI, p, k, p, k).mean(axis=(3, 5))
        out.append(e.reshape(n, N_ORI, p * p))
    return out


# ----------------------------------------------------------------------------- pRF weights


def _edges(p: int, visual_angle_deg: float) -> tuple[np.ndarray, np.ndarray]:
    h = visual_angle_deg / 2
    return np.linspace(-h, h, p + 1), np.linspace(h, -h, p + 1)  # x left->right, y top->bottom


def prf_weights(x, y, sig, p: int, visual_angle_deg: float) -> np.ndarray:
    """Gaussian pRFs integrated over each cell of a p x p grid covering the image.

    Parameters
    ----------
    x, y, sig : (n_vox,) pRF centre and size in degrees (y up)

    Returns
    -------
    float32 (p * p, n_vox): column sums are the pRF mass on the screen (<= 1)
    """
    ex, ey = _edges(p, visual_angle_deg)
    cx = ndtr((ex[None, :] - x[:, None]) / sig[:, None])
    cy = ndtr((ey[None, :] - y[:, None]) / sig[:, None])
    wx = np.diff(cx, axis=1)  # (n_vox, p)
    wy = -np.diff(cy, axis=1)
    g = (wy[:, :, None] * wx[:, None, :]).reshape(len(x), p * p).T
    # drop the far tails: as float32 they become subnormal numbers, which slow BLAS ~20x
    return np.ascontiguousarray(np.where(g < 1e-9, 0.0, g), dtype=np.float32)


def box_overlap(boxes: np.ndarray, x, y, sig, visual_angle_deg: float) -> np.ndarray:
    """Fraction of each pRF's Gaussian mass inside each image's box.

    Parameters
    ----------
    boxes : (n_img, 4) x0, y0, x1, y1 in [0, 1], y down (zero-area boxes give 0)
    x, y, sig : (n_vox,) degrees

    Returns
    -------
    float32 (n_img, n_vox)
    """
    a = visual_angle_deg
    bx0, bx1 = (boxes[:, 0] - 0.5) * a, (boxes[:, 2] - 0.5) * a
    by_top, by_bot = (0.5 - boxes[:, 1]) * a, (0.5 - boxes[:, 3]) * a
    fx = ndtr((bx1[:, None] - x) / sig) - ndtr((bx0[:, None] - x) / sig)
    fy = ndtr((by_top[:, None] - y) / sig) - ndtr((by_bot[:, None] - y) / sig)
    return (fx * fy).astype(np.float32)


class VoxelModel:
    """The noise-free forward model of one subject, prepared once (weights) and applied per batch.

    Parameters
    ----------
    vt : the subject's voxels
    image_size : S, image side in pixels
    visual_angle_deg : image width in degrees
    ref : (n_bands,) mean energy per band of a calibration batch, so drives are O(1)
    """

    def __init__(self, vt: VoxelTable, image_size: int, visual_angle_deg: float, ref: np.ndarray,
                 surround_ratio: float = 2.0, surround_gain: float = 0.0):
        self.vt, self.a, self.ref = vt, visual_angle_deg, ref
        self.n_voxels = vt.n
        self.groups = []  # per band: (voxel indices, G (P, n), orientation weights (N_ORI, n), n)
        for b in range(len(RETINOTOPIC)):
            idx = np.flatnonzero(vt.band == b)
            if len(idx) == 0:
                continue
            p = pool_size(image_size, b)
            g = prf_weights(vt.prf_x[idx], vt.prf_y[idx], vt.prf_sigma[idx], p, visual_angle_deg)
            if surround_gain > 0:
                # difference of Gaussians: a wider, weaker suppressive surround on the same centre;
                # the drive is rectified below, so a surround-dominated image gives 0, not < 0
                g = g - surround_gain * prf_weights(vt.prf_x[idx], vt.prf_y[idx],
                                                    surround_ratio * vt.prf_sigma[idx], p, visual_angle_deg)
            w = 1 + vt.ori_gain[idx][None, :] * np.cos(2 * (ORIENTATIONS[:, None] - vt.ori_pref[idx][None, :]))
            w = (w / w.sum(0, keepdims=True)).astype(np.float32)
            self.groups.append((b, idx, g, w, vt.css_exponent[idx].astype(np.float32)))
        self.cat = {code: np.flatnonzero(vt.roi == code) for code in (5, 6)}

    def raw(self, feats: list[np.ndarray], labels: dict[str, np.ndarray]) -> np.ndarray:
        """Noise-free, not yet normalised responses.

        Parameters
        ----------
        feats : :func:`energy_maps` of a batch of n images
        labels : the batch's stimulus labels (face, face_box, scene_box)

        Returns
        -------
        float32 (n, n_voxels); noise voxels are 0
        """
        n = feats[0].shape[0]
        out = np.zeros((n, self.n_voxels), np.float32)
        for b, idx, g, w, css in self.groups:
            f = feats[b]  # (n, N_ORI, P)
            per_ori = (f.reshape(n * N_ORI, -1) @ g).reshape(n, N_ORI, len(idx))
            drive = np.einsum("nov,ov->nv", per_ori, w) / self.ref[b]
            drive = np.maximum(drive, 0)
            is_cat = self.vt.roi[idx] >= 5
            ret = ~is_cat
            out[:, idx[ret]] = drive[:, ret] ** css[ret]
            # category voxels: low-level part from the coarse (hV4-like) channel
            out[:, idx[is_cat]] = CATEGORY_LOW_LEVEL * drive[:, is_cat] ** css[is_cat]
        vt = self.vt
        for code, box_key, present_key in ((5, "face_box", "face"), (6, "scene_box", "scene")):
            idx = self.cat[code]
            if len(idx) == 0:
                continue
            ov = box_overlap(labels[box_key], vt.prf_x[idx], vt.prf_y[idx], vt.prf_sigma[idx], self.a)
            present = (np.asarray(labels[present_key]) > 0).astype(np.float32)[:, None]
            out[:, idx] += CATEGORY_GAIN * present * np.sqrt(ov)
        return out


# ----------------------------------------------------------------------------- oracle ceiling


def oracle_ceiling(store, subject: str, stimulus_rows: np.ndarray,
                   rows_per_read: int | None = None) -> np.ndarray:
    """Correlation between true and repeat-averaged measured responses (the oracle ceiling).

    Parameters
    ----------
    store : :class:`brainenc.data.store.Store` written by simbrain (has ``truth/responses``)
    subject : e.g. ``"subj01"``
    stimulus_rows : int (n,) rows of ``stimuli.h5`` (e.g. the test split); each must have been
        shown to ``subject`` at least once

    Returns
    -------
    float64 (n_voxels,): Pearson r over the given stimuli between ``truth/responses`` and the
    mean of the measured trials of each stimulus; NaN where either is constant.
    """
    import h5py
    import scipy.sparse

    info = store.subject(subject)
    rows = np.unique(np.asarray(stimulus_rows, dtype=np.int64))
    if len(rows) < 2:
        raise ValueError("oracle_ceiling needs at least 2 distinct stimulus rows")
    pos = np.searchsorted(rows, info.trial_stimulus)
    pos = np.clip(pos, 0, len(rows) - 1)
    hit = rows[pos] == info.trial_stimulus
    counts = np.bincount(pos[hit], minlength=len(rows))
    if (counts == 0).any():
        raise ValueError(f"{info.path}: stimulus rows {rows[counts == 0][:5].tolist()} were never "
                         f"shown to {subject}; pass rows from its trial_stimulus")
    sums = np.zeros((len(rows), info.n_voxels))
    if rows_per_read is None:  # ~32 MB of float64 per block
        rows_per_read = max(1, (1 << 22) // max(1, info.n_voxels))
    with h5py.File(info.path, "r") as f:
        if "truth/responses" not in f:
            raise ValueError(f"{info.path}: field 'truth/responses' missing; expected a simbrain store")
        resp = f["responses"]
        for start in range(0, info.n_trials, rows_per_read):
            stop = min(start + rows_per_read, info.n_trials)
            sel = np.flatnonzero(hit[start:stop])
            if len(sel) == 0:
                continue
            block = resp[start:stop][sel].astype(np.float64)
            ind = scipy.sparse.csr_matrix((np.ones(len(sel)), (pos[start:stop][sel], np.arange(len(sel)))),
                                          shape=(len(rows), len(sel)))
            sums += ind @ block
        truth = f["truth/responses"][rows]  # float32; rows are sorted and unique
    sums /= counts[:, None]  # repeat-averaged measured responses
    from brainenc.metrics.correlation import pearson_columns

    return pearson_columns(truth, sums)

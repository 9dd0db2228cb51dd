"""Cortex of the simulated brain: a flat retinotopic sheet per hemisphere, embedded in 3-D.

Geometry (per hemisphere, in millimetres on the flattened sheet):

* ``u`` runs from the foveal confluence (u = 0) towards the periphery.  Eccentricity follows the
  log-polar (Schwartz 1977) map along the horizontal meridian, ``u = k log((E + a) / a)``, i.e.
  ``E = a (exp(u / k) - 1)``; cortical magnification ``dU/dE = k / (E + a)`` falls with
  eccentricity (Horton & Hoyt 1991: k ~ 17.3 mm, a ~ 0.75 deg).
* ``v`` runs across the polar-angle axis.  Magnification along it is kept locally isotropic with
  the one along ``u`` (as in the complex-log map), so a strip spanning polar angle range Δθ has
  width ``beta k Δθ E / (E + a)``; ``beta < 1`` compresses the polar axis (real V1 is longer than
  wide).  The strips, dorsal (v < 0) to ventral (v > 0): V3d | V2d | V1 | V2v | V3v | hV4, with
  polar-angle maps mirrored at every border (V1/V2 at the vertical meridians, V2/V3 at the
  horizontal meridian, V3v/hV4 at the upper vertical meridian).  All strips share ``u``, i.e.
  the areas share iso-eccentricity bands.
* Face- (FFA) and scene-selective (PPA) regions are disks beyond hV4: FFA near foveal ``u``,
  PPA near peripheral ``u`` (the eccentricity bias of Levy et al. 2001, Hasson et al. 2002); a
  disk of noise-only voxels lies dorsal to V3d.

Voxels are the points of a regular grid on the sheet, so foveal degrees get more voxels.  The
sheet is embedded in 3-D by a gentle fold plus a per-subject rotation and offset.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.special import ndtr

ROI_LABELS = {1: "V1", 2: "V2", 3: "V3", 4: "hV4", 5: "FFA", 6: "PPA"}
VOXEL_TYPE_LABELS = {0: "noise", 1: "V1", 2: "V2", 3: "V3", 4: "hV4", 5: "face", 6: "scene"}
RETINOTOPIC = ("V1", "V2", "V3", "hV4")

# Population means of the per-ROI parameters (subjects are perturbed around them).
# pRF size sigma = intercept + slope * eccentricity (deg); slopes rise along the hierarchy
# (Dumoulin & Wandell 2008; Kay et al. 2013).  Values are illustrative, ordering is the fact.
PRF_SLOPE = {"V1": 0.14, "V2": 0.20, "V3": 0.28, "hV4": 0.42}
PRF_INTERCEPT = {"V1": 0.20, "V2": 0.25, "V3": 0.30, "hV4": 0.45}
# Compressive spatial summation exponents, < 1 and smaller (more compressive) higher up (Kay 2013).
CSS_EXPONENT = {"V1": 0.55, "V2": 0.45, "V3": 0.38, "hV4": 0.30, "FFA": 0.5, "PPA": 0.5}
# Peak spatial frequency of each ROI's energy channel, as a fraction of the image Nyquist
# frequency: V1 prefers the finest scale, hV4 the coarsest.  With 64-px images over 8.4 deg:
# V1 1.9, V2 1.3, V3 0.84, hV4 0.46 cycles/deg.
SF_FRACTION_OF_NYQUIST = {"V1": 0.5, "V2": 0.33, "V3": 0.22, "hV4": 0.12}
# Polar-axis compression of each strip (see module docstring).
POLAR_BETA = {"V1": 0.45, "V2": 0.28, "V3": 0.22, "hV4": 0.25}
# ncsnr multipliers by ROI: category regions and hV4 are noisier than early visual cortex.
NCSNR_ROI_FACTOR = {"V1": 1.1, "V2": 1.1, "V3": 1.0, "hV4": 0.85, "FFA": 0.8, "PPA": 0.8}


@dataclass
class SubjectMap:
    """The individually perturbed map parameters of one subject (all plain floats)."""

    k_mm: float
    a_deg: float
    e_max_deg: float
    beta: dict
    prf_slope: dict
    prf_intercept: dict
    css_exponent: dict
    rotation_deg: list
    offset_mm: list
    spacing_mm: float = 0.0  # filled once the voxel grid has been fitted to the target count

    def as_dict(self) -> dict:
        return asdict(self)


def sample_map(rng: np.random.Generator, e_max_deg: float = 6.0) -> SubjectMap:
    """Draw one subject's map around the population means."""
    jit = lambda d, s: {k: float(v * np.exp(rng.normal(0, s))) for k, v in d.items()}  # noqa: E731
    slopes = jit(PRF_SLOPE, 0.06)
    # keep the hierarchy's ordering a fact of every subject, not a likely outcome
    slopes = dict(zip(RETINOTOPIC, sorted(slopes[r] for r in RETINOTOPIC)))
    return SubjectMap(
        k_mm=float(17.3 * np.exp(rng.normal(0, 0.08))), a_deg=float(rng.uniform(0.5, 1.0)),
        e_max_deg=float(e_max_deg), beta=jit(POLAR_BETA, 0.08), prf_slope=slopes,
        prf_intercept=jit(PRF_INTERCEPT, 0.10), css_exponent=dict(CSS_EXPONENT),
        rotation_deg=[float(x) for x in rng.normal(0, 6, 3)],
        offset_mm=[float(x) for x in rng.normal(0, 3, 3)])


# ----------------------------------------------------------------------------- sheet


def _strip_edges(m: SubjectMap) -> dict[str, tuple[float, float]]:
    """Strip limits in normalised polar units s = v / (k E/(E+a)); half-fields are pi/2 wide."""
    b1, b2, b3, b4 = (m.beta[r] for r in RETINOTOPIC)
    h = np.pi / 2
    return {"V3d": (-(b1 + b2 + b3) * h, -(b1 + b2) * h), "V2d": (-(b1 + b2) * h, -b1 * h),
            "V1": (-b1 * h, b1 * h), "V2v": (b1 * h, (b1 + b2) * h),
            "V3v": ((b1 + b2) * h, (b1 + b2 + b3) * h),
            "hV4": ((b1 + b2 + b3) * h, (b1 + b2 + b3) * h + b4 * np.pi)}


def _polar_angle(s: np.ndarray, m: SubjectMap) -> tuple[np.ndarray, np.ndarray]:
    """ROI code (1-4, 0 outside) and polar angle theta (rad, + = upper field) from s."""
    e = _strip_edges(m)
    b = {r: m.beta[r] for r in RETINOTOPIC}
    roi = np.zeros(s.shape, np.int16)
    th = np.full(s.shape, np.nan)
    inside = lambda n: (s >= e[n][0]) & (s < e[n][1])  # noqa: E731
    sel = inside("V1"); roi[sel] = 1; th[sel] = s[sel] / b["V1"]  # noqa: E702
    # V2d: lower vertical meridian at the V1 border -> horizontal meridian at the V3d border
    sel = inside("V2d"); roi[sel] = 2; th[sel] = -np.pi / 2 + (e["V2d"][1] - s[sel]) / b["V2"]  # noqa: E702
    sel = inside("V2v"); roi[sel] = 2; th[sel] = np.pi / 2 - (s[sel] - e["V2v"][0]) / b["V2"]  # noqa: E702
    # V3: horizontal meridian at the V2 border -> vertical meridian at the outer edge
    sel = inside("V3d"); roi[sel] = 3; th[sel] = -(e["V3d"][1] - s[sel]) / b["V3"]  # noqa: E702
    sel = inside("V3v"); roi[sel] = 3; th[sel] = (s[sel] - e["V3v"][0]) / b["V3"]  # noqa: E702
    # hV4: a hemifield, upper vertical meridian shared with V3v, sweeping to the lower one
    sel = inside("hV4"); roi[sel] = 4; th[sel] = np.pi / 2 - (s[sel] - e["hV4"][0]) / b["hV4"]  # noqa: E702
    return roi, th


def _retinotopic_grid(m: SubjectMap, d: float):
    """Grid points (u, v) of one hemisphere's retinotopic strips at spacing d (mm)."""
    u_max = m.k_mm * np.log((m.e_max_deg + m.a_deg) / m.a_deg)
    edges = _strip_edges(m)
    g_max = m.k_mm * m.e_max_deg / (m.e_max_deg + m.a_deg)
    v_lo, v_hi = edges["V3d"][0] * g_max, edges["hV4"][1] * g_max
    u = np.arange(d / 2, u_max, d)
    v = np.arange(np.floor(v_lo / d) * d, v_hi + d, d)
    uu, vv = (x.ravel() for x in np.meshgrid(u, v, indexing="ij"))
    ecc = m.a_deg * np.expm1(uu / m.k_mm)
    s = vv / (m.k_mm * ecc / (ecc + m.a_deg))
    roi, th = _polar_angle(s, m)
    keep = roi > 0
    return uu[keep], vv[keep], roi[keep], ecc[keep], th[keep], (v_lo, v_hi, u_max)


def _disk(centre, n, d):
    """The n grid points (spacing d, same lattice phase as the strips) nearest to centre."""
    r = d * (np.sqrt(n / np.pi) + 3)
    cu = np.round((centre[0] - d / 2) / d) * d + d / 2
    cv = np.round(centre[1] / d) * d
    off = np.arange(-np.ceil(r / d), np.ceil(r / d) + 1) * d
    uu, vv = (x.ravel() for x in np.meshgrid(cu + off, cv + off, indexing="ij"))
    dist = np.hypot(uu - centre[0], vv - centre[1]) + 1e-9 * np.arange(len(uu))  # stable ties
    idx = np.argsort(dist, kind="stable")[:n]
    return uu[idx], vv[idx]


@dataclass
class VoxelTable:
    """Every per-voxel quantity of one subject; all arrays have first axis n_voxels.

    roi : int16 ROI code (0 none, 1-6 as ROI_LABELS); hemi : int8 0 left, 1 right;
    flat_xy : float32 (n, 2) mm on the flat map (left hemisphere at x < 0);
    coords : float32 (n, 3) mm in 3-D; prf_x, prf_y, prf_sigma : deg (NaN for noise voxels);
    css_exponent : float; ori_pref : rad (frequency direction); ori_gain : [0, 1);
    band : int8 index of the energy channel (-1 none); ncsnr : float32.
    """

    roi: np.ndarray
    hemi: np.ndarray
    flat_xy: np.ndarray
    coords: np.ndarray
    prf_x: np.ndarray
    prf_y: np.ndarray
    prf_sigma: np.ndarray
    css_exponent: np.ndarray
    ori_pref: np.ndarray
    ori_gain: np.ndarray
    band: np.ndarray
    ncsnr: np.ndarray

    @property
    def n(self) -> int:
        return len(self.roi)


def _embed(u, v, hemi, m: SubjectMap):
    """Flat sheet (u, v) mm -> 3-D mm: a gentle fold, then a per-subject rigid motion.

    Each of Y and Z is monotonic in one sheet coordinate, so the map is injective: cortical
    neighbours stay 3-D neighbours and distant sheet points never touch.
    """
    sg = np.where(hemi == 0, -1.0, 1.0)
    x = sg * (7.0 + 2.5 * np.sin(v / 8.0) + 0.04 * u)
    y = -102.0 + 0.85 * u
    z = 4.0 - 0.8 * v + 1.5 * np.sin(u / 9.0)
    p = np.stack([x, y, z], 1)
    ax, ay, az = np.deg2rad(m.rotation_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    c = np.array([0.0, -85.0, 0.0])
    return ((p - c) @ (rz @ ry @ rx).T + c + np.asarray(m.offset_mm)).astype(np.float32)


def build_cortex(m: SubjectMap, n_voxels: int, fractions: dict, rng: np.random.Generator,
                 ncsnr_median: float, ncsnr_log_sd: float, visual_angle_deg: float,
                 css_scale: float = 1.0, category_ecc_shift_deg: float = 0.0,
                 category_sigma_scale: float = 1.0) -> VoxelTable:
    """Lay out exactly ``n_voxels`` voxels of one subject and give each its true parameters.

    The grid spacing is fitted so the retinotopic strips hold ``n_voxels * (1 - sum(fractions))``
    voxels; FFA and PPA take their exact fractions; noise voxels take the remainder.
    ``css_scale`` multiplies the compressive exponents; ``category_ecc_shift_deg`` and
    ``category_sigma_scale`` move face/place pRF centres outwards and enlarge them (the
    defaults change nothing, so the default model's draws and arrays are unchanged).
    """
    n_cat = {k: int(round(fractions[k] * n_voxels)) for k in ("FFA", "PPA")}
    n_ret_target = n_voxels - n_cat["FFA"] - n_cat["PPA"] - int(round(fractions["noise"] * n_voxels))
    # fit the spacing: point count scales as 1/d^2; a few fixed-point steps get close, then
    # shrink d until each hemisphere has enough points and trim the most peripheral extras
    # (a ragged edge at E_max), so every count is exact and known in advance
    per_hemi = (n_ret_target + 1) // 2
    d = 2.0
    for _ in range(6):
        cnt = len(_retinotopic_grid(m, d)[0])
        d *= np.sqrt(cnt / per_hemi)
    while len(_retinotopic_grid(m, d)[0]) < per_hemi:
        d *= 0.995
    m.spacing_mm = float(d)
    u, v, roi, ecc, th, (v_lo, v_hi, u_max) = _retinotopic_grid(m, d)
    keep = np.lexsort((v, u))[:per_hemi]  # ordered by u (then v): drop the largest-u points
    u, v, roi, ecc, th = u[keep], v[keep], roi[keep], ecc[keep], th[keep]
    n_ret = (per_hemi, n_ret_target - per_hemi)
    n_noise = n_voxels - n_ret_target - n_cat["FFA"] - n_cat["PPA"]

    parts = {k: [] for k in ("u", "v", "hemi", "roi", "x", "y", "sig", "lu", "lv")}

    def add(uu, vv, hemi, roi_, x, y, sig, lu=None, lv=None):
        for k, a in zip(("u", "v", "hemi", "roi", "x", "y", "sig"), (uu, vv, hemi, roi_, x, y, sig)):
            parts[k].append(np.broadcast_to(np.asarray(a, dtype=float), uu.shape).copy())

    # retinotopic: both hemispheres share the layout; the left sees the right visual field
    icpt = np.array([0.0] + [m.prf_intercept[r] for r in RETINOTOPIC])
    slope = np.array([0.0] + [m.prf_slope[r] for r in RETINOTOPIC])
    for hemi in (0, 1):
        sgx = 1.0 if hemi == 0 else -1.0
        k = slice(0, n_ret[hemi])  # the right hemisphere may be one point short
        x, y = sgx * ecc[k] * np.cos(th[k]), ecc[k] * np.sin(th[k])
        sig = icpt[roi[k]] + slope[roi[k]] * ecc[k]
        add(u[k], v[k], np.full(n_ret[hemi], hemi), roi[k], x, y, sig)

    # category regions: disks beyond hV4, FFA foveal-side (small u), PPA peripheral-side
    g_max = v_hi  # ventral edge of hV4 at u_max
    for name, code, u_frac, hemi_share in (("FFA", 5, 0.30, 0.4), ("PPA", 6, 0.72, 0.5)):
        n_left = int(round(n_cat[name] * hemi_share))
        for hemi, n in ((0, n_left), (1, n_cat[name] - n_left)):
            if n == 0:
                continue
            r = d * np.sqrt(n / np.pi)
            cu, cv = u_frac * u_max, g_max + 2 * d + r + (0 if name == "FFA" else 3 * d)
            uu, vv = _disk((cu, cv), n, d)
            # position inside the blob maps smoothly to the visual field (neighbours agree)
            ru, rv = np.clip((uu - cu) / (r + d), -1, 1), np.clip((vv - cv) / (r + d), -1, 1)
            sgx = 1.0 if hemi == 0 else -1.0
            if name == "FFA":  # foveal: 0.3-1.8 deg, large pRFs
                e = 0.3 + 0.75 * (ru + 1)
                t = rv * np.pi / 2 * 0.8
                sig = 1.8 + 0.4 * e
            else:  # peripheral: 2.5-5.5 deg, upper-field biased, larger pRFs
                e = 2.5 + 1.5 * (ru + 1)
                t = 0.3 + rv * np.pi / 2 * 0.7
                sig = 2.5 + 0.3 * e
            e = e + category_ecc_shift_deg
            sig = sig * category_sigma_scale
            add(uu, vv, np.full(n, hemi), np.full(n, code), sgx * e * np.cos(t), e * np.sin(t), sig)
    # noise-only voxels: a disk dorsal to V3d, split between hemispheres
    n_left = n_noise // 2
    for hemi, n in ((0, n_left), (1, n_noise - n_left)):
        if n == 0:
            continue
        r = d * np.sqrt(n / np.pi)
        uu, vv = _disk((0.5 * u_max, v_lo - 2 * d - r), n, d)
        add(uu, vv, np.full(n, hemi), np.zeros(n), np.full(n, np.nan), np.full(n, np.nan),
            np.full(n, np.nan))

    cat = {k: np.concatenate(parts[k]) for k in ("u", "v", "hemi", "roi", "x", "y", "sig")}
    n = len(cat["u"])
    assert n == n_voxels, (n, n_voxels)
    roi = cat["roi"].astype(np.int16)
    hemi = cat["hemi"].astype(np.int8)
    signal = roi > 0
    # measurement-like scatter: pRF sizes vary by ~8%, centres by 5% of the size
    sig = cat["sig"] * np.exp(rng.normal(0, 0.08, n))
    x = cat["x"] + rng.normal(0, 0.05, n) * sig
    y = cat["y"] + rng.normal(0, 0.05, n) * sig
    css = _by_code(CSS_EXPONENT, np.nan)[roi] * css_scale
    # orientation: weak voxel biases, preferring the radial direction (Sasaki et al. 2006)
    ori_pref = np.where(signal, np.arctan2(y, x) + rng.normal(0, 0.5, n), np.nan) % np.pi
    ori_gain = np.where(roi <= 4, rng.uniform(0.0, 0.6, n), 0.0) * signal
    band = np.where(roi <= 4, roi - 1, 3).astype(np.int8)
    band[~signal] = -1

    ncsnr = sample_ncsnr(rng, cat["u"], cat["v"], roi, x, y, sig, ncsnr_median, ncsnr_log_sd,
                         visual_angle_deg)
    flat = np.stack([np.where(hemi == 0, -1, 1) * (3.0 + cat["u"]), cat["v"]], 1).astype(np.float32)
    return VoxelTable(roi=roi, hemi=hemi, flat_xy=flat, coords=_embed(cat["u"], cat["v"], hemi, m),
                      prf_x=x, prf_y=y, prf_sigma=sig, css_exponent=css, ori_pref=ori_pref,
                      ori_gain=ori_gain, band=band, ncsnr=ncsnr.astype(np.float32))


def _by_code(per_roi: dict, missing: float) -> np.ndarray:
    """Lookup table indexed by ROI code (0 = none) from a {ROI name: value} dict."""
    return np.array([missing] + [per_roi.get(ROI_LABELS[c], missing) for c in sorted(ROI_LABELS)])


def mass_on_screen(x, y, sig, visual_angle_deg):
    """Fraction of each Gaussian pRF inside the square image (0 for NaN pRFs)."""
    h = visual_angle_deg / 2
    with np.errstate(invalid="ignore"):
        fx = ndtr((h - x) / sig) - ndtr((-h - x) / sig)
        fy = ndtr((h - y) / sig) - ndtr((-h - y) / sig)
    return np.nan_to_num(fx * fy)


def sample_ncsnr(rng, u, v, roi, x, y, sig, median, log_sd, visual_angle_deg):
    """True per-voxel ncsnr (signal sd / noise sd).

    lognormal(median, log_sd) split into a spatially smooth part (vascular and coil-distance
    effects vary slowly over cortex) and an independent part, times an ROI factor, times
    ``0.35 + 0.65 * (fraction of the pRF on the screen)`` (voxels that see mostly the grey
    surround respond weakly).  Noise-only voxels get 0.
    """
    n = len(u)
    kvec = rng.normal(0, 1 / 15.0, (8, 2))  # wavelengths of ~15-40 mm over the sheet
    phase = rng.uniform(0, 2 * np.pi, 8)
    smooth = np.cos(np.stack([u, v], 1) @ kvec.T + phase).sum(1) / np.sqrt(4)
    z = 0.6 * smooth * log_sd + np.sqrt(1 - 0.36) * log_sd * rng.normal(0, 1, n)
    roi_f = _by_code(NCSNR_ROI_FACTOR, 0.0)[roi]
    screen = 0.35 + 0.65 * mass_on_screen(x, y, sig, visual_angle_deg)
    return median * np.exp(z) * roi_f * screen

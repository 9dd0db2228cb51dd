"""Presets of the simulated brain: how many images, subjects, voxels and repeats, and what it assumes.

A preset fixes every *size* of the simulation and its modelling :class:`Assumptions` (the defaults
are simbrain's own model; the ``alt-*`` presets change them so that no encoder default is tuned to
one generator); the seed fixes every random draw.  Shapes are
exact and known before anything is simulated (:func:`planned_shapes`), so the large preset can be
checked without running it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

#: Bump when a change to the generator changes its output for the same preset and seed.
GENERATOR_VERSION = 2

# Visual angle of NSD images (Allen et al. 2022): 8.4 deg square.
NSD_VISUAL_ANGLE_DEG = 8.4


@dataclass(frozen=True)
class Assumptions:
    """What the generator assumes about receptive fields, noise and category regions.

    The defaults reproduce simbrain's own model bit for bit; each other value is one of the
    alternatives a lab might believe instead (docs/simbrain.md, "Other assumptions").

    Attributes
    ----------
    surround_ratio : size of a suppressive Gaussian surround as a multiple of the pRF size
        (difference-of-Gaussians pRF, Zuiderbaan et al. 2012); used when ``surround_gain > 0``
    surround_gain : the surround's weight relative to the centre's (both Gaussians integrate to 1
        before the screen cuts them, so 0.5 removes half the drive of a uniform field)
    css_scale : multiplies every ROI's compressive summation exponent (< 1: more compressive)
    e_max_deg : eccentricity of the outermost voxels; the image corners are at 5.9 deg for 8.4 deg
        images, its sides at 4.2 deg, so larger values put more pRF centres off the screen
    shared_noise : fraction of each voxel's noise variance that is shared across voxels (trial-wise
        common factors with positive-mean loadings, like global signal and physiological noise)
    drift_noise : fraction of each voxel's noise variance that is a slow drift within a session
        (smooth cosine components over the session's trials)
    category_ecc_shift_deg : added to the eccentricity of every face/place voxel's pRF centre
        (face areas whose receptive fields are not centred on the fovea)
    category_sigma_scale : multiplies the size of every face/place voxel's pRF
    """

    surround_ratio: float = 2.0
    surround_gain: float = 0.0
    css_scale: float = 1.0
    e_max_deg: float = 6.0
    shared_noise: float = 0.0
    drift_noise: float = 0.0
    category_ecc_shift_deg: float = 0.0
    category_sigma_scale: float = 1.0

    def __post_init__(self):
        checks = {"surround_ratio": self.surround_ratio > 1, "surround_gain": 0 <= self.surround_gain < 1,
                  "css_scale": 0 < self.css_scale <= 1 / 0.55, "e_max_deg": self.e_max_deg > 1,
                  "shared_noise": 0 <= self.shared_noise < 1, "drift_noise": 0 <= self.drift_noise < 1,
                  "category_ecc_shift_deg": self.category_ecc_shift_deg >= 0,
                  "category_sigma_scale": self.category_sigma_scale > 0}
        bad = [k for k, ok in checks.items() if not ok]
        if self.shared_noise + self.drift_noise >= 1:
            bad.append("shared_noise + drift_noise")
        if bad:
            raise ValueError(f"simbrain Assumptions: {bad[0]} out of range (surround_ratio > 1, "
                             f"0 <= surround_gain < 1, 0 < css_scale <= 1.8 so exponents stay <= 1, "
                             f"e_max_deg > 1, noise fractions >= 0 summing to < 1, "
                             f"category_ecc_shift_deg >= 0, category_sigma_scale > 0); got {self}")


@dataclass(frozen=True)
class DatasetSpec:
    """One simulated dataset (one canonical store).

    Attributes
    ----------
    name : store / dataset name, e.g. ``"simbrain7t"``
    field_strength_tesla : recorded in every subject file
    n_voxels : target voxel count of each subject (its length is the number of subjects)
    n_train : number of training images
    n_train_shared : how many of the training images are taken from the *first* dataset of the
        preset (same ``sim-XXXXX`` id, same split); the rest are new images
    train_repeats : every training image is shown this many times ...
    train_extra_fraction : ... and this fraction of them once more (exact count, rounded)
    test_repeats : repeats of every test image (NSD: 3)
    ncsnr_median, ncsnr_log_sd : lognormal prior of the per-voxel ncsnr before the ROI and
        on-screen factors (see ``cortex.sample_ncsnr``)
    trials_per_session : session length for ``trial_session`` (NSD: 750)
    dtype : dtype of ``responses``
    """

    name: str
    field_strength_tesla: float
    n_voxels: tuple[int, ...]
    n_train: int
    n_train_shared: int
    train_repeats: int
    train_extra_fraction: float
    test_repeats: int
    ncsnr_median: float
    ncsnr_log_sd: float
    trials_per_session: int
    dtype: str = "float32"

    @property
    def n_subjects(self) -> int:
        return len(self.n_voxels)

    @property
    def subjects(self) -> list[str]:
        return [f"subj{i + 1:02d}" for i in range(self.n_subjects)]

    def n_train_trials(self) -> int:
        return self.n_train * self.train_repeats + int(round(self.train_extra_fraction * self.n_train))


@dataclass(frozen=True)
class Preset:
    """A named simulation size.

    Attributes
    ----------
    name : preset name
    image_size : side of the square RGB images in pixels
    n_test : size of the shared test set (like NSD's shared1000), identical in every dataset
    datasets : the datasets to write; the first one owns the training images that the others
        may share
    image_chunk : images rendered and turned into responses at a time (bounds memory)
    """

    name: str
    image_size: int
    n_test: int
    datasets: tuple[DatasetSpec, ...]
    image_chunk: int = 128
    visual_angle_deg: float = NSD_VISUAL_ANGLE_DEG
    fractions: dict = field(default_factory=lambda: {"noise": 0.10, "FFA": 0.06, "PPA": 0.06})
    assumptions: Assumptions = field(default_factory=Assumptions)

    def dataset(self, name: str) -> DatasetSpec:
        for d in self.datasets:
            if d.name == name:
                return d
        raise KeyError(f"preset '{self.name}' has no dataset '{name}'; it has "
                       f"{[d.name for d in self.datasets]}")

    def as_dict(self) -> dict:
        return asdict(self)


def _seven(n_voxels, n_train, dtype="float32", train_repeats=1, extra=0.2, tps=750):
    return DatasetSpec("simbrain7t", 7.0, tuple(n_voxels), n_train, 0, train_repeats, extra, 3,
                       ncsnr_median=1.2, ncsnr_log_sd=0.45, trials_per_session=tps, dtype=dtype)


def _alt(n_voxels=(1500, 900, 2100), n_train=1100, ncsnr=1.2, tps=300):
    """The one dataset of an ``alt-*`` preset: 7T-like, subjects of different sizes."""
    return DatasetSpec("simbrain7t", 7.0, tuple(n_voxels), n_train, 0, 1, 0.2, 3,
                       ncsnr_median=ncsnr, ncsnr_log_sd=0.45, trials_per_session=tps)


def _three(n_voxels, n_train, n_shared, tps):
    return DatasetSpec("simbrain3t", 3.0, tuple(n_voxels), n_train, n_shared, 1, 0.0, 3,
                       ncsnr_median=0.42, ncsnr_log_sd=0.40, trials_per_session=tps)


PRESETS: dict[str, Preset] = {
    # seconds: for unit tests and smoke runs
    "tiny": Preset("tiny", image_size=32, n_test=30, datasets=(
        _seven((480, 400), 150, tps=60),
        _three((360, 300), 80, 40, tps=60),
    )),
    # under a minute: for tutorials and quick model comparisons
    "quickstart": Preset("quickstart", image_size=64, n_test=150, datasets=(
        _seven((2600, 2200, 2900), 1500, tps=300),
        _three((2000, 2300), 500, 250, tps=300),
    )),
    # one NSD-sized subject: 10,000 images x 3 repeats = 30,000 trials, 15,000 voxels, float16
    "nsd-scale": Preset("nsd-scale", image_size=64, n_test=1000, image_chunk=200, datasets=(
        _seven((15000,), 9000, dtype="float16", train_repeats=3, extra=0.0, tps=750),
    )),
    # other assumptions (docs/simbrain.md, "Other assumptions"): quickstart-like brains of one
    # 7T-like dataset, 3 subjects of different sizes, 150 test images; each changes one thing
    # from simbrain's defaults, except alt-independent which changes all of them at once
    "alt-dog": Preset("alt-dog", image_size=64, n_test=150, datasets=(_alt(),), assumptions=Assumptions(
        surround_ratio=2.5, surround_gain=0.45, css_scale=0.7)),
    "alt-offscreen": Preset("alt-offscreen", image_size=64, n_test=150, datasets=(_alt(),),
                            assumptions=Assumptions(e_max_deg=9.0)),
    "alt-noise": Preset("alt-noise", image_size=64, n_test=150, datasets=(_alt(ncsnr=0.9),),
                        assumptions=Assumptions(shared_noise=0.35, drift_noise=0.25)),
    "alt-few": Preset("alt-few", image_size=64, n_test=150, datasets=(_alt((700, 400, 550), 500),)),
    "alt-category": Preset("alt-category", image_size=64, n_test=150, datasets=(_alt(),),
                           assumptions=Assumptions(category_ecc_shift_deg=1.5, category_sigma_scale=1.6)),
    # every alternative at once at the size of tiny: for tests and smoke runs
    "alt-tiny": Preset("alt-tiny", image_size=32, n_test=30, datasets=(
        _alt((480, 300), 150, ncsnr=1.0, tps=60),), assumptions=Assumptions(
        surround_ratio=2.5, surround_gain=0.45, css_scale=0.7, e_max_deg=7.5, shared_noise=0.3,
        drift_noise=0.2, category_ecc_shift_deg=1.5, category_sigma_scale=1.6)),
    "alt-independent": Preset("alt-independent", image_size=64, n_test=150, datasets=(
        _alt((700, 400, 550), 1100, ncsnr=1.0),), assumptions=Assumptions(
        surround_ratio=2.5, surround_gain=0.45, css_scale=0.7, e_max_deg=7.5, shared_noise=0.3,
        drift_noise=0.2, category_ecc_shift_deg=1.5, category_sigma_scale=1.6)),
}


def get_preset(preset: str | Preset) -> Preset:
    if isinstance(preset, Preset):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"unknown simbrain preset '{preset}'; expected one of {sorted(PRESETS)}")
    return PRESETS[preset]


def stimulus_plan(preset: Preset) -> dict[str, dict[str, np.ndarray]]:
    """Which global image ids each dataset shows, and their split.

    Ids ``0 .. n_test-1`` are the shared test set; the first dataset's training images follow;
    later datasets take their first ``n_train_shared`` training images from the first dataset
    (same id, same split) and new ids after that.

    Returns
    -------
    {dataset: {"ids": int64 (N,) sorted global ids, "split": uint8 (N,) 0 train / 1 test}}
    """
    plan, next_id = {}, preset.n_test
    first_train = None
    for i, d in enumerate(preset.datasets):
        test = np.arange(preset.n_test)
        if i == 0:
            train = np.arange(next_id, next_id + d.n_train)
            first_train = train
            next_id += d.n_train
        else:
            n_sh = min(d.n_train_shared, len(first_train))
            new = np.arange(next_id, next_id + d.n_train - n_sh)
            next_id += len(new)
            train = np.concatenate([first_train[:n_sh], new])
        ids = np.concatenate([test, train]).astype(np.int64)
        split = np.concatenate([np.ones(len(test), np.uint8), np.zeros(len(train), np.uint8)])
        order = np.argsort(ids, kind="stable")
        plan[d.name] = {"ids": ids[order], "split": split[order]}
    return plan


def planned_shapes(preset: str | Preset) -> dict[str, dict]:
    """The exact sizes a preset will write, without simulating anything.

    Returns
    -------
    {dataset: {"n_stimuli": int, "n_test": int, "subjects": {subject: (n_trials, n_voxels)}}}
    """
    p = get_preset(preset)
    plan = stimulus_plan(p)
    out = {}
    for d in p.datasets:
        n_trials = d.n_train_trials() + p.n_test * d.test_repeats
        out[d.name] = {"n_stimuli": int(len(plan[d.name]["ids"])), "n_test": p.n_test,
                       "subjects": {s: (n_trials, int(v)) for s, v in zip(d.subjects, d.n_voxels)}}
    return out

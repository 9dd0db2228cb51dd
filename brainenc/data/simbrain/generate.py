"""Write simulated datasets as canonical stores, streaming images and trials in chunks.

Per dataset: (1) lay out every subject's cortex and trial order; (2) render the images chunk by
chunk, write them, compute their energy maps once and every subject's raw noise-free responses
into ``truth/responses`` while accumulating per-voxel sums; (3) normalise ``truth/responses`` in
place, block by block; (4) write trials session by session (truth rows of the session's stimuli
+ Gaussian noise); (5) write the manifest last.  Peak memory is set by the chunk sizes, never by
n_trials x n_voxels.
"""

from __future__ import annotations

import functools
import shutil
import zlib
from pathlib import Path

import numpy as np
import yaml

from ..store import MANIFEST, STIMULI, RoiAtlas, StimuliWriter, StoreError, SubjectWriter, write_manifest
from . import cortex
from .cortex import ROI_LABELS, VOXEL_TYPE_LABELS, build_cortex, sample_map
from .presets import GENERATOR_VERSION, Assumptions, DatasetSpec, Preset, get_preset, stimulus_plan
from .responses import VoxelModel, energy_maps
from .stimuli import label_attrs, render_images

CITATION = ("brainenc simbrain: a simulated image-to-fMRI experiment with known ground truth, "
            "modelled on the Natural Scenes Dataset (Allen et al. 2022, Nat Neurosci 25:116-126); "
            "retinotopy after Schwartz 1977, Horton & Hoyt 1991, Dumoulin & Wandell 2008; "
            "compressive spatial summation after Kay et al. 2013.")
SPLIT_RULE = ("split on stimuli: the first n_test image ids (sim-00000..) form the shared test set "
              "(like NSD shared1000), shown test_repeats times to every subject of every dataset; "
              "all other images are train. Images shared between datasets keep id and split.")
N_CALIBRATION = 32
CALIBRATION_ID0 = 50_000_000  # image ids of the calibration stream, far from any stimulus id


def _code(name: str) -> int:
    """A stable integer for a dataset name, used in seeds (Python's hash() is salted)."""
    return zlib.crc32(name.encode())


def stimulus_id(i: int) -> str:
    return f"sim-{int(i):05d}"


@functools.lru_cache(maxsize=4)
def calibration_ref(seed: int, size: int) -> np.ndarray:
    """Mean energy per band over a fixed calibration batch, so band drives are O(1).

    Returns float64 (n_bands,).
    """
    imgs, _ = render_images(seed, range(CALIBRATION_ID0, CALIBRATION_ID0 + N_CALIBRATION), size)
    return np.array([f.mean() for f in energy_maps(imgs)], dtype=np.float64)


def trial_plan(rng: np.random.Generator, split: np.ndarray, spec: DatasetSpec) -> np.ndarray:
    """Stimulus row of every trial, in presentation order.

    Returns int64 (n_trials,): test rows ``test_repeats`` times, train rows ``train_repeats``
    times plus one extra showing for a random ``train_extra_fraction`` of them, shuffled so that
    an image's repeats fall in different sessions.
    """
    reps = np.where(split == 1, spec.test_repeats, spec.train_repeats).astype(np.int64)
    train = np.flatnonzero(split == 0)
    n_extra = int(round(spec.train_extra_fraction * len(train)))
    reps[rng.choice(train, n_extra, replace=False)] += 1
    trials = np.repeat(np.arange(len(split)), reps)
    return trials[rng.permutation(len(trials))]


IN_PROGRESS = ".simbrain-in-progress"  # written first, removed once the manifest exists


def existing_status(root: Path, preset: str, seed: int) -> str:
    """What is at ``root`` as far as simbrain is concerned.

    'missing' (absent or empty directory), 'interrupted' (a simulation started here and did not
    finish: only simbrain's marker says so), 'complete' (manifest matches preset, seed and
    generator), 'different' (a simbrain manifest with other parameters) or 'foreign' (anything
    simbrain did not write: other files without a manifest, or a manifest of another source).
    """
    if not root.exists() or (root.is_dir() and not any(root.iterdir())):
        return "missing"
    if not root.is_dir():
        return "foreign"
    m = root / MANIFEST
    if not m.exists():
        return "interrupted" if (root / IN_PROGRESS).exists() else "foreign"
    try:
        man = yaml.safe_load(m.read_text()) or {}
    except yaml.YAMLError:
        return "foreign"
    if not isinstance(man, dict) or man.get("source") != "simbrain":
        return "foreign"
    same = (man.get("preset") == preset and man.get("seed") == seed
            and man.get("generator_version") == GENERATOR_VERSION)
    return "complete" if same else "different"


def _foreign_error(root: Path) -> StoreError:
    """The error for a directory simbrain must not write into (it never created it)."""
    m = root / MANIFEST
    if not root.is_dir():
        return StoreError(root, "<directory>", "a store directory (or nothing) for simbrain to write",
                          "a file")
    if m.exists():
        return StoreError(m, "source", "'simbrain' (simbrain only replaces stores it wrote itself)",
                          "another source or an unreadable manifest")
    found = sorted(p.name for p in root.iterdir())
    shown = ", ".join(found[:5]) + (", ..." if len(found) > 5 else "")
    return StoreError(m, "manifest.yaml",
                      "a store manifest, or an absent/empty directory for simbrain to simulate into "
                      "(a store without its manifest is incomplete or damaged: re-run the import "
                      "that wrote it, or point data.stores elsewhere; simbrain will not write over "
                      "files it did not create)",
                      f"no manifest but {len(found)} other entries ({shown})")


def _clear(root: Path) -> None:
    """Remove what an interrupted or replaced *simbrain* run left (manifest first, so a crash
    leaves it 'interrupted').  Callers have checked that simbrain wrote this directory."""
    (root / MANIFEST).unlink(missing_ok=True)
    for p in [root / STIMULI, *root.glob("subj*.h5")]:
        p.unlink(missing_ok=True)
    # leftover temporary files from interrupted writes
    for p in root.glob(".*.tmp"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def write_dataset(root: Path, preset: Preset, spec: DatasetSpec, ids: np.ndarray, split: np.ndarray,
                  seed: int) -> None:
    """Simulate one dataset into the store directory ``root`` (see module docstring)."""
    root.mkdir(parents=True, exist_ok=True)
    # the marker goes first: from here on the directory is simbrain's, and an interrupted run
    # can be resumed (cleared and rewritten) without mistaking it for a user's store
    (root / IN_PROGRESS).write_text("simbrain is writing this store; it is incomplete until "
                                    "manifest.yaml exists\n")
    _clear(root)
    code, n, size = _code(spec.name), len(ids), preset.image_size
    ref = calibration_ref(seed, size)

    subjects = []
    for si, (subj, nvox) in enumerate(zip(spec.subjects, spec.n_voxels)):
        rng = np.random.default_rng([seed, code, si, 1])
        asm = preset.assumptions
        m = sample_map(rng, e_max_deg=asm.e_max_deg)
        vt = build_cortex(m, nvox, preset.fractions, rng, spec.ncsnr_median, spec.ncsnr_log_sd,
                          preset.visual_angle_deg, css_scale=asm.css_scale,
                          category_ecc_shift_deg=asm.category_ecc_shift_deg,
                          category_sigma_scale=asm.category_sigma_scale)
        trials = trial_plan(np.random.default_rng([seed, code, si, 2]), split, spec)
        subjects.append({"name": subj, "map": m, "vt": vt, "trials": trials,
                         "model": VoxelModel(vt, size, preset.visual_angle_deg, ref,
                                            surround_ratio=asm.surround_ratio,
                                            surround_gain=asm.surround_gain),
                         "sum": np.zeros(nvox), "sumsq": np.zeros(nvox)})

    _check_free_space(root, spec, n * size * size * 3 + sum(
        len(s["trials"]) * s["vt"].n * np.dtype(spec.dtype).itemsize + 2 * n * s["vt"].n * 4 for s in subjects))
    stim = StimuliWriter(root / STIMULI, n, (size, size), preset.visual_angle_deg,
                         attrs={"source": "simbrain"})
    writers = []
    try:
        for s in subjects:
            vt = s["vt"]
            w = SubjectWriter(root / f"{s['name']}.h5", dataset=spec.name, subject=s["name"],
                              n_trials=len(s["trials"]), n_voxels=vt.n, coords=vt.coords,
                              space="simbrain", field_strength_tesla=spec.field_strength_tesla,
                              units="z", rois={"simbrain": RoiAtlas(vt.roi, ROI_LABELS)},
                              ncsnr=vt.ncsnr, dtype=spec.dtype, attrs={"source": "simbrain"})
            rows = max(1, min(n, (1 << 18) // (4 * vt.n)))  # ~256 KB chunks of whole rows
            s["truth"] = w.f.create_dataset("truth/responses", (n, vt.n), dtype="float32",
                                            chunks=(rows, vt.n))
            writers.append(w)

        # pass 1: images, labels and raw noise-free responses, chunk by chunk
        labels = []
        for a in range(0, n, preset.image_chunk):
            b = min(a + preset.image_chunk, n)
            imgs, lab = render_images(seed, ids[a:b], size)
            stim.write(imgs, [stimulus_id(i) for i in ids[a:b]])
            labels.append(lab)
            feats = energy_maps(imgs)
            for s in subjects:
                raw = s["model"].raw(feats, lab)
                s["truth"][a:b] = raw
                s["sum"] += raw.sum(0, dtype=np.float64)
                s["sumsq"] += np.square(raw, dtype=np.float64).sum(0)
        stim.write_array("split", split.astype(np.uint8),
                         attrs={"codes": "0 train, 1 test", "rule": SPLIT_RULE})
        attrs = label_attrs()
        for k in labels[0]:
            stim.write_array(f"labels/{k}", np.concatenate([lab[k] for lab in labels]),
                             attrs=attrs.get(k))
        stim.close()

        for s, w in zip(subjects, writers):
            _finish_subject(s, w, spec, seed, code, subjects.index(s), preset.assumptions)
            w.close()
    except BaseException:
        stim.abort()
        for w in writers:
            w.abort()
        raise

    write_manifest(root, {
        "dataset": spec.name, "subjects": spec.subjects, "source": "simbrain",
        "preset": preset.name, "seed": int(seed), "generator_version": GENERATOR_VERSION,
        "field_strength_tesla": spec.field_strength_tesla, "n_stimuli": n,
        "n_test": int(split.sum()), "split_rule": SPLIT_RULE, "citation": CITATION,
        "description": (f"Simulated {spec.field_strength_tesla:g}T-like dataset: "
                        f"{len(spec.subjects)} subjects viewing {n} recomposed photographs "
                        f"({preset.visual_angle_deg} deg); ground truth in each subject's truth/ group."),
        "stimulus_sources": "skimage.data photos and textures, skimage.data.lfw_subset faces, "
                            "sklearn sample images (china, flower), matplotlib grace_hopper.jpg",
        "generator": {
            "preset": preset.as_dict(), "dataset": spec.__dict__ | {"n_voxels": list(spec.n_voxels)},
            "population": {"prf_slope": cortex.PRF_SLOPE, "prf_intercept": cortex.PRF_INTERCEPT,
                           "css_exponent": cortex.CSS_EXPONENT,
                           "sf_fraction_of_nyquist": cortex.SF_FRACTION_OF_NYQUIST,
                           "polar_beta": cortex.POLAR_BETA, "ncsnr_roi_factor": cortex.NCSNR_ROI_FACTOR},
            "subjects": {s["name"]: s["map"].as_dict() for s in subjects},
        },
    })
    (root / IN_PROGRESS).unlink(missing_ok=True)


def _check_free_space(root: Path, spec: DatasetSpec, need: int) -> None:
    """StoreError before anything is written when the disk cannot hold the dataset (``need``
    bytes: images, trials and truth arrays, uncompressed).  A full disk in the middle of an HDF5
    write leaves the HDF5 library with a file it cannot close, which ends the process in a
    segmentation fault at exit; this check keeps that from happening."""
    import shutil

    free = shutil.disk_usage(root).free
    if free < need * 1.05 + (1 << 20):
        raise StoreError(root, "<disk>", f"about {need / 2**20:.1f} MB free to simulate {spec.name}",
                         f"{free / 2**20:.1f} MB free on {root}: free space or choose another --out")


N_SHARED_FACTORS = 4  # common noise factors per trial (global signal, physiology, motion, ...)
N_DRIFTS = 3  # slow cosine components per session (periods of 2, 1 and 2/3 sessions)


def noise_loadings(rng: np.random.Generator, n_voxels: int, k: int) -> np.ndarray:
    """Unit-norm rows (n_voxels, k): how much each voxel takes of k common noise components.

    The first component has a positive mean loading (a global signal); the rest are mixed signs.
    """
    lo = rng.normal(0, 1, (n_voxels, k))
    lo[:, 0] = np.abs(lo[:, 0]) + 1.0
    return lo / np.linalg.norm(lo, axis=1, keepdims=True)


def structured_noise(rng: np.random.Generator, n_trials: int, shared: np.ndarray | None,
                     drift: np.ndarray | None) -> np.ndarray:
    """Correlated noise of one session, unit variance per voxel in expectation.

    Parameters
    ----------
    shared : (n_voxels, N_SHARED_FACTORS) loadings scaled by sqrt(shared fraction), or None
    drift : (n_voxels, N_DRIFTS) loadings scaled by sqrt(drift fraction), or None

    Returns float32 (n_trials, n_voxels): trial-wise common factors plus slow within-session
    drifts (DCT-II components 1..N_DRIFTS of the session's trial order, random amplitude each
    session; each has variance 1 over trials and sessions).
    """
    n_vox = (shared if shared is not None else drift).shape[0]
    out = np.zeros((n_trials, n_vox), np.float32)
    if shared is not None:
        out += (rng.standard_normal((n_trials, shared.shape[1])) @ shared.T).astype(np.float32)
    if drift is not None:
        t = (np.arange(n_trials) + 0.5) / n_trials
        basis = np.sqrt(2) * np.cos(np.pi * np.outer(t, np.arange(1, drift.shape[1] + 1)))
        amp = rng.standard_normal(drift.shape[1])
        out += ((basis * amp) @ drift.T).astype(np.float32)
    return out


def _finish_subject(s: dict, w: SubjectWriter, spec: DatasetSpec, seed: int, code: int, si: int,
                    asm: Assumptions | None = None) -> None:
    """Normalise the subject's truth in place, write its trials and its truth arrays.

    Trial noise has the voxel's noise sd; ``asm.shared_noise`` and ``asm.drift_noise`` of its
    variance are common factors and slow drifts (:func:`structured_noise`), the rest independent.
    """
    asm = asm or Assumptions()
    vt, truth, n = s["vt"], s["truth"], s["truth"].shape[0]
    mean = s["sum"] / n
    sd = np.sqrt(np.maximum(s["sumsq"] / n - mean ** 2, 0))
    flat = sd <= 1e-6 * (1 + np.abs(mean))
    ncsnr = np.where(flat, 0.0, vt.ncsnr.astype(np.float64))
    if (flat & (vt.roi > 0)).any():  # a signal voxel that nothing on the screen drives
        w.f["voxels/ncsnr"][...] = ncsnr.astype(np.float32)
    signal_sd = ncsnr / np.sqrt(1 + ncsnr ** 2)
    noise_sd = 1 / np.sqrt(1 + ncsnr ** 2)
    scale = np.where(flat, 0.0, signal_sd / np.where(flat, 1, sd)).astype(np.float32)
    mean32 = mean.astype(np.float32)
    step = max(1, (1 << 25) // (4 * vt.n))  # ~32 MB blocks
    for a in range(0, n, step):
        b = min(a + step, n)
        truth[a:b] = (truth[a:b] - mean32) * scale

    trials, tps = s["trials"], spec.trials_per_session
    indep = np.sqrt(1 - asm.shared_noise - asm.drift_noise)
    noise32 = (noise_sd * indep).astype(np.float32)
    shared = drift = None
    if asm.shared_noise > 0 or asm.drift_noise > 0:
        lrng = np.random.default_rng([seed, code, si, 4])
        if asm.shared_noise > 0:
            shared = noise_loadings(lrng, vt.n, N_SHARED_FACTORS) * np.sqrt(asm.shared_noise)
        if asm.drift_noise > 0:
            drift = noise_loadings(lrng, vt.n, N_DRIFTS) * np.sqrt(asm.drift_noise)
        sd_col = noise_sd.astype(np.float32)
    for sess, a in enumerate(range(0, len(trials), tps)):
        rows = trials[a:a + tps]
        uniq, inv = np.unique(rows, return_inverse=True)
        # one plain row read per stimulus: ~6x faster than an h5py fancy selection here
        sig = np.empty((len(uniq), vt.n), np.float32)
        for j, i in enumerate(uniq):
            sig[j] = truth[i]
        sig = sig[inv]
        rng = np.random.default_rng([seed, code, si, 3, sess])
        noise = rng.standard_normal(sig.shape, dtype=np.float32)
        out = sig + noise * noise32
        if shared is not None or drift is not None:
            # its own random stream, so the independent noise is the default model's
            out += structured_noise(np.random.default_rng([seed, code, si, 5, sess]), len(rows),
                                    shared, drift) * sd_col
        w.write_trials(out, rows, np.full(len(rows), sess))

    w.write_group("truth", {
        "prf_x_deg": vt.prf_x.astype(np.float32), "prf_y_deg": vt.prf_y.astype(np.float32),
        "prf_sigma_deg": vt.prf_sigma.astype(np.float32), "voxel_type": vt.roi.astype(np.int16),
        "signal_sd": signal_sd.astype(np.float32), "noise_sd": noise_sd.astype(np.float32),
        "flat_xy": vt.flat_xy, "hemisphere": vt.hemi, "css_exponent": vt.css_exponent.astype(np.float32),
        "orientation_pref_rad": vt.ori_pref.astype(np.float32),
        "orientation_gain": vt.ori_gain.astype(np.float32),
    }, attrs={"map": yaml.safe_dump(s["map"].as_dict(), sort_keys=False),
              "units": "responses in z (total per-trial variance 1); degrees; flat_xy in mm",
              "description": "noise-free responses and true voxel parameters; see docs/simbrain.md"})
    g = w.f["truth"]
    g["voxel_type"].attrs["labels"] = yaml.safe_dump(VOXEL_TYPE_LABELS)
    g["hemisphere"].attrs["labels"] = yaml.safe_dump({0: "left", 1: "right"})
    g["responses"].attrs["description"] = "noise-free response to every row of stimuli.h5"
    g["orientation_pref_rad"].attrs["description"] = "preferred frequency direction (rad, 0 = horizontal)"


def simulate(preset: str = "tiny", out: str | Path = "data/simbrain", seed: int = 0,
             overwrite: bool = False, datasets: list[str] | None = None) -> dict[str, Path]:
    """Simulate the preset's datasets into ``out/<dataset>`` (canonical stores).

    Parameters
    ----------
    preset : a key of :data:`PRESETS` ("tiny", "quickstart", "nsd-scale")
    out : parent directory of the stores
    seed : every random draw derives from it; same seed, same arrays (bit for bit)
    overwrite : replace simbrain stores written with other parameters (else raise)
    datasets : write only these datasets of the preset (None = all of them)

    Returns
    -------
    {dataset name: store directory}, e.g. ``{"simbrain7t": out/"simbrain7t",
    "simbrain3t": out/"simbrain3t"}`` (nsd-scale has only simbrain7t).  A store that is already
    complete with the same preset and seed is left alone.

    Simulation writes only into a directory that is absent, empty, or was started by simbrain
    (an interrupted run is resumed); anything else, in particular a store whose manifest is
    missing or names another source, raises :class:`StoreError` and is left untouched, even
    with ``overwrite``.
    """
    p = get_preset(preset)
    seed = int(seed)
    if seed < 0:
        raise ValueError(f"simbrain seed must be a non-negative integer, got {seed}")
    out = Path(out)
    names = [d.name for d in p.datasets]
    if datasets is not None:
        unknown = [d for d in datasets if d not in names]
        if unknown:
            raise ValueError(f"simbrain preset {p.name!r} has datasets {names}, not {unknown}")
    specs = [d for d in p.datasets if datasets is None or d.name in datasets]
    # check every target before writing any, so a refusal leaves nothing half-done
    status = {}
    for spec in specs:
        root = out / spec.name
        status[spec.name] = existing_status(root, p.name, seed)
        if status[spec.name] == "foreign":
            raise _foreign_error(root)
        if status[spec.name] == "different" and not overwrite:
            raise FileExistsError(
                f"{root / MANIFEST}: field 'preset/seed': expected preset={p.name!r} seed={seed} "
                f"generator_version={GENERATOR_VERSION}; a store with other parameters exists "
                f"(pass overwrite=True to replace it)")
    plan = stimulus_plan(p)
    paths = {}
    for spec in specs:
        root = out / spec.name
        if status[spec.name] != "complete":
            write_dataset(root, p, spec, plan[spec.name]["ids"], plan[spec.name]["split"], seed)
        paths[spec.name] = root
    return paths

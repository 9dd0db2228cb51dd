"""BrainDataModule: one or many (dataset, subject) pairs from canonical stores.

Batches are dicts::

    images    float32 (B, 3, S, S) in [0, 1], resized to ``image_size`` (the backbone normalises)
    responses float32 (B, n_voxels) — single trials, or the mean over an image's repeats
    stimulus  int64 (B,) rows of the pair's stimuli.h5
    pair      str "dataset/subject"
    pair_index int

HDF5 files are opened lazily, once per worker process, and every batch is one sorted read.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import h5py
import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .images import read_images
from .sampling import PairBatchSampler
from .splits import StimulusSplit, limit_train, split_stimuli
from .store import Store, StoreError, SubjectInfo, check_scale, scan_responses


@dataclass
class PairData:
    """A (dataset, subject) pair with its split and the trial rows of each stimulus."""

    key: str
    store: Store
    info: SubjectInfo
    split: StimulusSplit
    # CSR map stimulus row -> trial rows: trials_sorted[offsets[i]:offsets[i+1]] for stimulus i
    trials_sorted: np.ndarray
    offsets: np.ndarray

    def trials_of(self, stimuli: np.ndarray) -> list[np.ndarray]:
        return [self.trials_sorted[self.offsets[s]:self.offsets[s + 1]] for s in stimuli]

    def n_repeats(self, stimuli: np.ndarray) -> np.ndarray:
        return self.offsets[stimuli + 1] - self.offsets[stimuli]

    @classmethod
    def build(cls, store: Store, subject: str, val_fraction: float, test_fraction: float) -> "PairData":
        info = store.subject(subject)
        ts = info.trial_stimulus
        order = np.argsort(ts, kind="stable")
        counts = np.bincount(ts, minlength=store.n_stimuli)
        offsets = np.concatenate([[0], np.cumsum(counts)])
        split = split_stimuli(np.unique(ts), store.stimulus_ids, store.split, val_fraction, test_fraction)
        return cls(info.key, store, info, split, order.astype(np.int64), offsets)


class _Files:
    """Per-process cache of open HDF5 files (reopened after a fork)."""

    def __init__(self):
        self.pid, self.files = None, {}

    def get(self, path: Path) -> h5py.File:
        if self.pid != os.getpid():
            self.pid, self.files = os.getpid(), {}
        if path not in self.files:
            self.files[path] = h5py.File(path, "r")
        return self.files[path]


class PairBatchDataset(Dataset):
    """Reads whole batches given ``(pair_index, rows)`` descriptors from :class:`PairBatchSampler`.

    ``unit="stimuli"``: rows are stimulus rows; responses are averaged over each stimulus' repeats.
    ``unit="trials"``: rows are trial rows; responses are single trials.
    """

    def __init__(self, pairs: list[PairData], image_size: int, unit: Literal["stimuli", "trials"],
                 load_images: bool = True):
        self.pairs, self.image_size, self.unit, self.load_images = pairs, image_size, unit, load_images
        self._files = _Files()

    def __len__(self) -> int:  # batches are addressed by descriptor, not position
        return sum(len(p.info.trial_stimulus) for p in self.pairs)

    def __getitem__(self, desc: tuple[int, np.ndarray]) -> dict:
        p_idx, rows = desc
        pair = self.pairs[p_idx]
        resp_ds = self._files.get(pair.info.path)["responses"]
        if self.unit == "trials":
            responses = resp_ds[np.asarray(rows)].astype(np.float32)
            check_scale(responses, pair.info.path, np.asarray(rows))
            stimuli = pair.info.trial_stimulus[rows]
        else:
            stimuli = np.asarray(rows)
            groups = pair.trials_of(stimuli)
            trial_rows = np.concatenate(groups)
            order = np.argsort(trial_rows)
            block = resp_ds[trial_rows[order]].astype(np.float32)
            check_scale(block, pair.info.path, trial_rows[order])
            unsorted = np.empty_like(block)
            unsorted[order] = block
            sizes = np.array([len(g) for g in groups])
            starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
            # each stimulus' repeats are contiguous in `unsorted`; average only the finite ones
            # (a NaN/Inf volume is a missing trial, not a reason to lose the image); a voxel
            # with no finite repeat stays NaN, which losses and metrics leave out
            ok = np.isfinite(unsorted)
            sums = np.add.reduceat(np.where(ok, unsorted, 0).astype(np.float64), starts, axis=0)
            counts = np.add.reduceat(ok.astype(np.int64), starts, axis=0)
            with np.errstate(invalid="ignore", divide="ignore"):
                responses = (sums / counts).astype(np.float32)
        # images are read in sorted order; stimuli may repeat within a trial batch
        images = None
        if self.load_images:
            uniq, inv = np.unique(stimuli, return_inverse=True)
            images = read_images(self._files.get(pair.store.stimuli_path), uniq, self.image_size)[inv]
        return {"images": images, "responses": torch.from_numpy(responses),
                "stimulus": torch.from_numpy(np.asarray(stimuli, dtype=np.int64)),
                "pair": pair.key, "pair_index": p_idx}


def capture_rng() -> dict:
    """The global torch, numpy and Python random states, as tensors and lists only (so that
    checkpoints holding them still load with ``weights_only=True``)."""
    import random

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
            "python": [version, list(internal), gauss_next]}


def restore_rng(state: dict) -> None:
    """Inverse of :func:`capture_rng`."""
    import random

    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


class ResumableLoader(DataLoader):
    """The training loader, with a position that checkpoints save (through
    :meth:`BrainDataModule.state_dict`), so a fit resumed from a checkpoint written mid-epoch
    continues with the next batch of the same epoch order and the same random state.

    ``state_dict`` is {"epoch": the sampler's epoch, "consumed": batches handed to the training
    loop this epoch, "rng": the global random states}; batches are counted here, on the loop's
    side, so batches that worker processes prefetched but the loop never saw are not skipped.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._consumed = 0
        self._rng_mid_epoch: dict | None = None

    def __iter__(self):
        # a generator: the underlying iterator (and any worker prefetch) starts on the first
        # next(), after Lightning's set_epoch
        self._consumed = 0
        pending = self.sampler.resume_point
        mid_epoch = pending is not None and pending[0] == self.sampler.epoch and pending[1] > 0
        if mid_epoch:
            self._consumed = pending[1]
        it = super().__iter__()
        if mid_epoch and self._rng_mid_epoch is not None:
            # creating the iterator drew a random seed; an uninterrupted fit, which is past that
            # point mid-epoch, did not: continue from the random state of the checkpoint
            restore_rng(self._rng_mid_epoch)
        self._rng_mid_epoch = None
        for batch in it:
            self._consumed += 1
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": int(self.sampler.epoch), "consumed": int(self._consumed), "rng": capture_rng()}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.resume(state["epoch"], state["consumed"])
        self._rng_mid_epoch = state.get("rng")


class BrainDataModule(L.LightningDataModule):
    """Subjects of one or more canonical stores, split on stimuli.

    Parameters
    ----------
    stores : store directories (one per dataset)
    subjects : keep only these ("dataset/subject" or "subject"); None = every subject
    image_size : side of the square images given to the backbone
    batch_size, eval_batch_size : images per batch
    train_unit : "stimuli" (repeat-averaged responses per image) or "trials" (single trials)
    val_fraction, test_fraction : hash-based fractions (test only when the store has no split)
    sampling_weights : {"dataset" or "dataset/subject": weight >= 0} for mixing pairs in training
        (a pair's own entry wins over its dataset's; pairs not named weigh 1; names that match no
        pair of the run are warned about)
    simulate : simbrain preset to generate missing stores with (e.g. "quickstart"), or None
    load_images : read and resize images for every batch; set False when the model reads
        features from a filled feature cache (the cache reads its own misses)
    train_limit : keep only this many training images per pair (a deterministic subset, the same
        for every seed; for learning curves and few-image transfer), None = all
    predict_images : what ``brainenc predict`` predicts: None = the test images of the stores;
        else images nobody scanned, given as a folder of image files (first-level subfolder =
        category), a .npy/.h5 array uint8 (N, H, W, 3) or a store's stimuli.h5 (see
        :mod:`brainenc.data.predict_images`), predicted for every pair of the run
    predict_skip_unreadable : with ``predict_images``, leave out image files that cannot be read
        (they are listed in ``predictions/skipped.txt``) instead of stopping at the first one
    """

    def __init__(self, stores: list[str] = ["data/simbrain-quickstart/simbrain7t"],  # noqa: B006
                 subjects: Optional[list[str]] = None, image_size: int = 64, batch_size: int = 32,
                 eval_batch_size: int = 64, train_unit: Literal["stimuli", "trials"] = "stimuli",
                 val_fraction: float = 0.1, test_fraction: float = 0.1,
                 sampling_weights: Optional[dict[str, float]] = None, num_workers: int = 0,
                 simulate: Optional[str] = None, seed: int = 0, train_limit: Optional[int] = None,
                 load_images: bool = True, predict_images: Optional[str] = None,
                 predict_skip_unreadable: bool = False):
        super().__init__()
        from brainenc.errors import ConfigError

        for name, value in (("image_size", image_size), ("batch_size", batch_size),
                            ("eval_batch_size", eval_batch_size)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ConfigError(f"data.{name}", "a positive integer", value)
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not isinstance(value, (int, float)) or not 0 < value < 1:
                raise ConfigError(f"data.{name}", "a fraction strictly between 0 and 1", value)
        if val_fraction + test_fraction >= 1:
            raise ConfigError("data.val_fraction + data.test_fraction", "less than 1 (some images must "
                              "be left for training)", val_fraction + test_fraction)
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ConfigError("data.num_workers", "an integer >= 0", num_workers)
        if train_limit is not None and (not isinstance(train_limit, int) or train_limit < 1):
            raise ConfigError("data.train_limit", "a positive integer or null", train_limit)
        if not stores:
            raise ConfigError("data.stores", "at least one store directory", stores)
        for key, value in (sampling_weights or {}).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
                raise ConfigError(f"data.sampling_weights[{key!r}]", "a finite number >= 0", value)
        self.save_hyperparameters()
        self.store_dirs = [Path(s) for s in stores]
        self.pairs: list[PairData] = []
        self._reported: set[str] = set()
        self._train_loader: Optional[ResumableLoader] = None
        self._pending_loader_state: Optional[dict] = None
        self._predict_source = None

    # ---------------------------------------------------------------- setup
    def prepare_data(self) -> None:
        """Simulate the stores that are missing, when ``simulate`` names a simbrain preset.

        Only a store whose directory is absent or empty (or an interrupted simulation) is
        simulated, and only when its name is a dataset of the preset; anything else is an error
        (simbrain never writes over or beside files it did not create).
        """
        missing = [d for d in self.store_dirs if not (d / "manifest.yaml").exists()]
        if not missing or not self.hparams.simulate:
            return
        from .simbrain import PRESETS, simulate
        from .simbrain.generate import _foreign_error, existing_status

        preset = self.hparams.simulate
        if preset not in PRESETS:
            raise StoreError(missing[0], "data.simulate", f"a simbrain preset among {sorted(PRESETS)}",
                             repr(preset))
        names = [spec.name for spec in PRESETS[preset].datasets]
        by_parent: dict[Path, list[str]] = {}
        for d in missing:
            if d.name not in names:
                raise StoreError(d / "manifest.yaml", "manifest.yaml",
                                 f"an existing store, or a directory named after a dataset of simbrain "
                                 f"preset {preset!r} ({', '.join(names)}) for data.simulate to create",
                                 f"no manifest and the name {d.name!r}")
            if existing_status(d, preset, int(self.hparams.seed)) == "foreign":
                raise _foreign_error(d)
            by_parent.setdefault(d.parent, []).append(d.name)
        for parent, datasets in sorted(by_parent.items()):
            simulate(preset=preset, out=parent, seed=self.hparams.seed, datasets=datasets)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.pairs:
            return
        wanted = self.hparams.subjects
        stores = []
        for d in self.store_dirs:
            if not (d / "manifest.yaml").exists() and self.hparams.simulate:
                self.prepare_data()  # e.g. called outside a Trainer
            stores.append(Store(d))
        if wanted is not None:
            # every requested subject must exist: a typo must not silently shrink the experiment
            known = {f"{st.name}/{s}" for st in stores for s in st.subjects} | {s for st in stores for s in st.subjects}
            unknown = [w for w in wanted if w not in known]
            if unknown:
                raise StoreError(", ".join(map(str, self.store_dirs)), "data.subjects",
                                 f"subjects among {sorted(k for k in known if '/' in k)} (or bare names)",
                                 f"unknown {unknown}")
        for d, store in zip(self.store_dirs, stores):
            for s in store.subjects:
                key = f"{store.name}/{s}"
                if wanted is None or key in wanted or s in wanted:
                    pair = PairData.build(store, s, self.hparams.val_fraction, self.hparams.test_fraction)
                    if self.hparams.train_limit is not None:
                        pair.split = limit_train(pair.split, store.stimulus_ids, self.hparams.train_limit)
                    self.pairs.append(pair)
        if not self.pairs:
            raise StoreError(", ".join(map(str, self.store_dirs)), "subjects",
                             f"at least one subject matching {wanted}", "none")
        for p in self.pairs:
            if len(p.split.train) == 0 or len(p.split.test) == 0:
                raise StoreError(p.info.path, "trial_stimulus",
                                 "stimuli in both the train and the test split",
                                 f"train={len(p.split.train)} test={len(p.split.test)}")

    # ---------------------------------------------------------------- checkpoint state
    def state_dict(self) -> dict:
        """Saved in every checkpoint: the global random states at save time, so that a resumed
        fit draws the same dropout masks (and any other random numbers) as an uninterrupted one,
        and the training loader's position (epoch, batches consumed) for mid-epoch checkpoints."""
        state = {"rng": capture_rng()}
        if self._train_loader is not None:
            state["train_loader"] = self._train_loader.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        # Lightning restores the datamodule before anything builds the train loader (the
        # optimizer's schedule builds it early to count steps, before Lightning would hand the
        # loader its own saved state), so the position is kept here and applied in _loader
        state = state or {}
        if state.get("rng"):  # absent in checkpoints written before random states were saved
            restore_rng(state["rng"])
        self._pending_loader_state = state.get("train_loader")

    # ---------------------------------------------------------------- what models need
    @property
    def voxel_counts(self) -> dict[str, int]:
        """{"dataset/subject": n_voxels}, linked into the model by the CLI."""
        self.setup()
        return {p.key: p.info.n_voxels for p in self.pairs}

    def pair(self, key: str) -> PairData:
        for p in self.pairs:
            if p.key == key:
                return p
        raise KeyError(f"unknown pair {key!r}; have {[p.key for p in self.pairs]}")

    def _weights(self) -> Optional[list[float]]:
        w = self.hparams.sampling_weights
        if not w:
            return None
        known = {p.key for p in self.pairs} | {p.info.dataset for p in self.pairs}
        unknown = sorted(set(w) - known)
        if unknown:
            # e.g. a crowd config's weights after --data.subjects dropped a dataset, or a typo
            warnings.warn(f"data.sampling_weights: {unknown} name no dataset or dataset/subject of this "
                          f"run (have {sorted(known)}); those weights are not used", stacklevel=2)
        return [float(w.get(p.key, w.get(p.info.dataset, 1.0))) for p in self.pairs]

    # ---------------------------------------------------------------- loaders
    def _units(self, split: str) -> list[np.ndarray]:
        if split == "train" and self.hparams.train_unit == "trials":
            return [np.concatenate(p.trials_of(p.split.train)) for p in self.pairs]
        return [p.split.of(split) for p in self.pairs]

    def missing_data(self, split: str) -> dict[str, tuple[int, int]]:
        """Scan the trials of ``split``'s stimuli (the check ``validate-store`` applies to all
        trials): absurd values and voxels with no finite value in the split raise StoreError.

        Returns {pair: (non-finite values, trials with no finite value)} for pairs with missing
        data; those values are left out of repeat averages, losses and metrics.
        """
        out = {}
        for p in self.pairs:
            rows = np.sort(np.concatenate([np.zeros(0, np.int64), *p.trials_of(p.split.of(split))]))
            values = trials = 0
            seen = np.zeros(p.info.n_voxels, bool)
            with h5py.File(p.info.path, "r") as f:
                for a in range(0, len(rows), 1024):
                    block = f["responses"][rows[a:a + 1024]]
                    check_scale(block, p.info.path, rows[a:a + 1024])
                    nv, nt = scan_responses(block)
                    values, trials = values + nv, trials + nt
                    seen |= np.isfinite(block).any(axis=0)
            if len(rows) and not seen.all():
                bad = np.flatnonzero(~seen)
                raise StoreError(p.info.path, "responses", f"a finite response of every voxel among the "
                                 f"{split} trials (drop empty voxels at import)",
                                 f"{len(bad)} voxels without one, first {bad[:5].tolist()}")
            if values:
                out[p.key] = (values, trials)
        return out

    def _report_missing(self, split: str) -> None:
        if split in self._reported:
            return
        self._reported.add(split)
        from lightning.pytorch.utilities import rank_zero_warn

        for key, (values, trials) in self.missing_data(split).items():
            rank_zero_warn(f"{key}: {values} NaN/Inf response values in the {split} trials are treated as "
                           f"missing ({trials} trials with no finite value dropped); repeat averages use "
                           f"the finite trials (see `brainenc validate-store`)")

    def _loader(self, split: str) -> DataLoader:
        train = split == "train"
        if not train:
            self._report_missing(split)
        unit = self.hparams.train_unit if train else "stimuli"
        sampler = PairBatchSampler(
            self._units(split), self.hparams.batch_size if train else self.hparams.eval_batch_size,
            shuffle=train, seed=self.hparams.seed, weights=self._weights() if train else None, pad=train)
        if train and self.trainer is not None:
            # start at the epoch the fit loop is in (restored from a checkpoint on resume), so
            # worker processes that prefetch before set_epoch still get the right order
            sampler.set_epoch(int(self.trainer.fit_loop.epoch_progress.current.processed))
        nw = self.hparams.num_workers
        loader = (ResumableLoader if train else DataLoader)(
            PairBatchDataset(self.pairs, self.hparams.image_size, unit, self.hparams.load_images),
            batch_size=None, sampler=sampler, num_workers=nw, persistent_workers=nw > 0)
        if train:
            if self._pending_loader_state:
                loader.load_state_dict(self._pending_loader_state)
                self._pending_loader_state = None
            self._train_loader = loader
        return loader

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    @property
    def predict_source(self):
        """The :class:`~brainenc.data.predict_images.ImageSource` of ``predict_images`` (opened
        once: a folder is listed once), or None when predicting the stores' test images."""
        if self.hparams.predict_images is None:
            return None
        if self._predict_source is None:
            from .predict_images import ImageSource

            self._predict_source = ImageSource.open(self.hparams.predict_images)
        return self._predict_source

    def predict_dataloader(self) -> DataLoader:
        source = self.predict_source
        if source is None:
            return self._loader("test")
        from .predict_images import PredictImagesDataset

        # one unit of positions: sorted batches, each rank its share, no padding (no image twice)
        sampler = PairBatchSampler([np.arange(len(source))], self.hparams.eval_batch_size, shuffle=False, pad=False)
        nw = self.hparams.num_workers
        return DataLoader(PredictImagesDataset(source, self.hparams.image_size, self.hparams.predict_skip_unreadable,
                                               self.hparams.load_images),
                          batch_size=None, sampler=sampler, num_workers=nw)

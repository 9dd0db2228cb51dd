"""Partitions of the voxels into ROIs, for the All-for-One experts (stage 2).

A partition assigns every voxel of every (dataset, subject) pair to exactly one of its ROIs, so
the experts of one partition together cover the whole brain and their predictions can be
stitched into one whole-brain prediction.  Three kinds:

* ``atlas:<name>`` — the store's ROI atlas; unlabelled voxels form their own ROI ``none``;
* ``kmeans<k>`` — model-defined ROIs: k-means (scikit-learn) on the whole-brain model's
  per-voxel readout weights, pooled over subjects (the bottleneck is shared, so weights of
  different subjects live in one space and cluster ``c`` means the same thing in every subject);
* ``random<i>`` — random spatially compact ROIs: per subject, ``k`` random voxels are drawn as
  centres and every voxel joins its nearest centre (a random Voronoi parcellation of the brain).

The partitions file (HDF5) is read and written by :mod:`brainenc.models.partition_file`, next to
the experts that read it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from brainenc.models.partition_file import Partition
from brainenc.models.readout import pair_slot

def atlas_partition(pairs, atlas: str) -> Partition:
    """ROIs of the store atlas ``atlas`` (names shared across subjects), plus ``none``.

    ``pairs`` : datamodule PairData list (uses ``info.rois[atlas]``).
    """
    per_pair = {}
    for p in pairs:
        if atlas not in p.info.rois:
            raise ValueError(f"{p.info.path}: field 'voxels/rois/{atlas}': expected the atlas for the "
                             f"partition 'atlas:{atlas}', found {sorted(p.info.rois)}")
        per_pair[p.key] = p.info.rois[atlas].names()
    names = sorted({n for v in per_pair.values() for n in v})
    index = {n: i for i, n in enumerate(names)}
    return names, {k: np.array([index[n] for n in v]) for k, v in per_pair.items()}


def kmeans_partition(weights: Mapping[str, np.ndarray], k: int, seed: int = 0) -> Partition:
    """k-means on per-voxel readout weights ``{pair: (n_voxels, D)}``, pooled over pairs.

    Rows are z-scored per feature so that no single weight dominates the distance.
    """
    from sklearn.cluster import KMeans

    keys = list(weights)
    x = np.concatenate([np.asarray(weights[k_], dtype=np.float64) for k_ in keys])
    x = (x - x.mean(0)) / (x.std(0) + 1e-8)
    km = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(x)
    lab, out, start = km.labels_, {}, 0
    for key in keys:
        n = len(weights[key])
        out[key] = lab[start:start + n]
        start += n
    return [f"c{i}" for i in range(k)], out


def random_partition(coords: Mapping[str, np.ndarray], k: int, seed: int) -> Partition:
    """Random Voronoi parcellation: per pair, ``k`` random voxels as centres, nearest-centre labels."""
    from scipy.spatial import cKDTree

    rng = np.random.default_rng(seed)
    out = {}
    for key, c in coords.items():
        c = np.asarray(c, dtype=np.float64)
        centres = c[rng.choice(len(c), size=min(k, len(c)), replace=False)]
        out[key] = cKDTree(centres).query(c)[1]
    return [f"r{i}" for i in range(k)], out


def readout_weights_from_checkpoint(ckpt: str | Path, pairs: list[str]) -> dict[str, np.ndarray]:
    """Per-voxel readout weights ``readout.weight.<pair slot>`` (n_voxels, D) from a Lightning checkpoint."""
    from brainenc.lit.checkpoint import load_state_dict

    sd = load_state_dict(ckpt, "the whole-brain model's checkpoint")
    out = {}
    for key in pairs:
        name = f"readout.weight.{pair_slot(key)}"
        if name not in sd:
            raise ValueError(f"{ckpt}: field 'state_dict/{name}': expected per-voxel readout weights "
                             f"(n_voxels, D) of the whole-brain model")
        out[key] = sd[name].float().numpy()
    return out


def build_partitions(pairs, weights: Mapping[str, np.ndarray] | None, atlases=("simbrain",),
                     kmeans=(8,), n_random: int = 2, random_k: int = 8, seed: int = 0) -> dict[str, Partition]:
    """All partitions of the recipe: ``atlas:<a>``, ``kmeans<k>`` and ``random<i>``."""
    parts: dict[str, Partition] = {}
    for a in atlases:
        parts[f"atlas_{a}"] = atlas_partition(pairs, a)
    for k in kmeans:
        if weights is None:
            raise ValueError("k-means partitions need the whole-brain model's readout weights")
        parts[f"kmeans{k}"] = kmeans_partition(weights, int(k), seed)
    coords = {p.key: p.info.coords for p in pairs}
    for i in range(n_random):
        parts[f"random{i}"] = random_partition(coords, random_k, seed + 1000 * (i + 1))
    return parts

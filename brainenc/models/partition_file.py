"""The partitions file the AFO experts are trained on: named partitions of every pair's voxels.

Written by the recipe's partitions stage (:mod:`brainenc.recipes.partitions` builds them), read by
:class:`~brainenc.models.experts.ExpertsReadout`.  Layout (HDF5, written atomically)::

    /<partition>            group, attr ``names`` (JSON list of ROI names)
    /<partition>/<pair>     int16 (n_voxels,) ROI index into ``names``; <pair> is the pair slot
                            name ("dataset__subject"), attr ``pair`` = "dataset/subject"
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import h5py
import numpy as np

from brainenc.ioutil import atomic_path
from brainenc.models.readout import pair_slot

__all__ = ["Partition", "read_partitions", "write_partitions"]

Partition = tuple[list[str], dict[str, np.ndarray]]  # (roi names, {pair: labels (n_voxels,)})


def write_partitions(path: str | Path, partitions: Mapping[str, Partition]) -> Path:
    """Write ``{name: (roi_names, {pair: labels int (n_voxels,)})}`` atomically to ``path``."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            for name, (names, labels) in partitions.items():
                g = f.create_group(name)
                g.attrs["names"] = json.dumps(list(names))
                for pair, lab in labels.items():
                    lab = np.asarray(lab)
                    if lab.min() < 0 or lab.max() >= len(names):
                        raise ValueError(f"partition {name!r}, {pair}: labels outside 0..{len(names) - 1}")
                    ds = g.create_dataset(pair_slot(pair), data=lab.astype(np.int16))
                    ds.attrs["pair"] = pair
    return path


def read_partitions(path: str | Path) -> dict[str, Partition]:
    """Inverse of :func:`write_partitions`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"partitions file not found: {path}")
    out = {}
    with h5py.File(path, "r") as f:
        for name, g in f.items():
            if "names" not in g.attrs:
                raise ValueError(f"{path}: field '{name}': expected attr 'names' (JSON list of ROI names)")
            names = json.loads(g.attrs["names"])
            out[name] = (names, {ds.attrs["pair"]: ds[()].astype(np.int64) for ds in g.values()})
    return out

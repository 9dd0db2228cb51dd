"""All-for-One experts: one small retinotopic readout per ROI of each partition of the voxels.

:class:`ExpertsReadout` holds the experts of every partition (AFO stage 2) and stitches their
predictions into whole-brain vectors; :class:`ExpertFeatures` carries one feature pyramid per
expert when each expert runs the backbone with its own LoRA adapter.  The prediction itself is
:meth:`brainenc.models.retinotopic.RetinotopicReadout.predict`, shared with the whole-brain readout.
"""

from __future__ import annotations

import pickle
from typing import Callable, Optional

import numpy as np

import torch
from torch import Tensor, nn

from .backbones import Features
from .readout import FeatureSpec, Readout, pair_slot
from .retinotopic import RetinotopicReadout, adapt_levels, grid_sizes, level_adapters, level_norms, normalise_levels


def _key(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "_-" else "_" for ch in str(name))


class ExpertFeatures:
    """Feature pyramids that differ per expert (each expert runs the backbone with its own LoRA adapter).

    ``of(e)`` returns expert ``e``'s :class:`Features` of the batch, computed on first use by
    ``compute(e)``; ``len()`` is the batch size B.
    """

    def __init__(self, compute: Callable[[int], Features], batch_size: int):
        self._compute, self._batch_size = compute, int(batch_size)
        self._memo: dict[int, Features] = {}

    def __len__(self) -> int:
        return self._batch_size

    def of(self, e: int) -> Features:
        if e not in self._memo:
            self._memo[e] = self._compute(e)
        return self._memo[e]


class ExpertsReadout(Readout):
    """One small :class:`RetinotopicReadout` per ROI of each partition of the voxels (AFO stage 2).

    A partition assigns every voxel of every subject to exactly one ROI (see
    :mod:`brainenc.recipes.partitions`); the expert of ROI ``r`` is a retinotopic readout over only
    that ROI's voxels (its own coordinate MLPs, bottleneck and per-voxel weights, with
    coordinates normalised over the ROI).  All experts share the level norms and, with an
    ``adapter`` in ``expert``, one nonlinear adapter (copied from the whole-brain model and trained
    by all experts together); they share the backbone -- or each runs it with
    its own LoRA adapter (``ExpertsModule(expert_adapters=True)``, which passes
    :class:`ExpertFeatures`) -- and train together.

    ``forward`` returns the ensemble: each voxel's prediction averaged over the partitions
    (B, V); :meth:`forward_partitions` returns every partition's stitched prediction (B, P, V).

    Parameters
    ----------
    voxel_counts, spec : as for every readout
    partitions : path of a partitions HDF5 file (:mod:`brainenc.models.partition_file`)
    only : train only these partitions (for running partitions as separate processes); None = all
    expert : keyword arguments of each expert's :class:`RetinotopicReadout` (e.g. ``{"width": 16}``)
    init_from : checkpoint of the whole-brain model (a :class:`RetinotopicReadout` built with the
        same ``expert`` arguments): every expert starts as a copy of it restricted to its ROI, with
        coordinates in the subject's frame, so at step 0 every partition predicts exactly what the
        whole-brain model does and training can only specialise it (AFO's warm start)
    """

    def __init__(self, voxel_counts: dict[str, int], spec: FeatureSpec, partitions: str,
                 only: Optional[list[str]] = None, expert: Optional[dict] = None,
                 init_from: Optional[str] = None):
        super().__init__(voxel_counts, spec)
        from brainenc.models.partition_file import read_partitions

        parts = read_partitions(partitions)
        if only:
            unknown = sorted(set(only) - set(parts))
            if unknown:
                raise ValueError(f"{partitions}: partitions {unknown} not found; have {sorted(parts)}")
            parts = {k: v for k, v in parts.items() if k in only}
        if not parts:
            raise ValueError(f"{partitions}: no partitions to train")
        self.partition_names = list(parts)
        self.roi_names: dict[str, list[str]] = {}
        self.experts = nn.ModuleDict()
        for p, (names, labels) in parts.items():
            self.roi_names[p] = list(names)
            for key, n in self.voxel_counts.items():
                lab = labels.get(key)
                if lab is None or len(lab) != n:
                    raise ValueError(f"{partitions}: partition {p!r} has no labels of length {n} for {key}")
                lab_t = torch.as_tensor(lab, dtype=torch.long)
                local = torch.zeros(n, dtype=torch.long)
                for r in range(len(names)):
                    sel = lab_t == r
                    local[sel] = torch.arange(int(sel.sum()))
                self.register_buffer(f"label_{_key(p)}_{pair_slot(key)}", lab_t)
                self.register_buffer(f"local_{_key(p)}_{pair_slot(key)}", local)
            for r, roi in enumerate(names):
                counts = {key: int((np.asarray(labels[key]) == r).sum()) for key in self.voxel_counts}
                counts = {k: c for k, c in counts.items() if c > 0}
                if counts:
                    self.experts[self.expert_name(p, r)] = RetinotopicReadout(
                        counts, spec, **{**(expert or {}), "normalise": False})
        # every expert standardises (and pools) the same features the same way: one shared set of
        # norms, and one shared nonlinear adapter when the experts read adapted maps
        self.norm = level_norms(spec)
        self.adapter = level_adapters(spec, int((expert or {}).get("adapter", 0)))
        self.grids = grid_sizes((expert or {}).get("grid"))
        self._index = {name: i for i, name in enumerate(self.experts)}
        self.subject_frame = init_from is not None
        if init_from is not None:
            self.warm_start(init_from, expert or {})

    @torch.no_grad()
    def warm_start(self, path: str, expert: dict) -> None:
        """Copy the whole-brain readout of checkpoint ``path`` into every expert (see ``init_from``)."""
        from pathlib import Path

        if not Path(path).is_file():
            raise FileNotFoundError(f"ExpertsReadout: init_from checkpoint not found: {path}")
        try:  # weights only: an object in the file is refused by torch, never called
            state = torch.load(path, map_location="cpu", weights_only=True).get("state_dict", {})
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
            first = (str(err).strip().splitlines() or [""])[0][:200]
            raise ValueError(f"{path}: field '<file>': expected a whole-brain checkpoint of tensors and "
                             f"plain values (brainenc never unpickles objects), found: {first}") from None
        sub = {k[len("readout."):]: v for k, v in state.items() if k.startswith("readout.")}
        whole = RetinotopicReadout(self.voxel_counts, self.spec, **expert)
        try:
            whole.load_state_dict(sub)
        except RuntimeError as err:
            raise ValueError(f"{path}: field 'state_dict': expected a whole-brain RetinotopicReadout over "
                             f"{sorted(self.voxel_counts)} built with expert={expert}: {err}") from err
        self.norm.load_state_dict(whole.norm.state_dict())
        self.adapter.load_state_dict(whole.adapter.state_dict())
        for p in self.partition_names:
            for r in range(len(self.roi_names[p])):
                name = self.expert_name(p, r)
                if name not in self.experts:
                    continue
                idx = {key: torch.nonzero(getattr(self, f"label_{_key(p)}_{pair_slot(key)}") == r).squeeze(1)
                       for key in self.experts[name].voxel_counts}
                self.experts[name].copy_from(whole, idx)

    def labels(self, partition: str, pair: str) -> np.ndarray:
        """ROI index (n_voxels,) of every voxel of ``pair`` in ``partition`` (names: ``roi_names[partition]``)."""
        return getattr(self, f"label_{_key(partition)}_{pair_slot(pair)}").cpu().numpy()

    def expert_name(self, partition: str, r: int) -> str:
        return f"{_key(partition)}__{r}_{_key(self.roi_names[partition][r])}"

    def set_voxel_info(self, pair: str, coords: np.ndarray) -> None:
        for p in self.partition_names:
            lab = getattr(self, f"label_{_key(p)}_{pair_slot(pair)}").cpu().numpy()
            for r in range(len(self.roi_names[p])):
                name = self.expert_name(p, r)
                if name in self.experts and pair in self.experts[name].voxel_counts:
                    # warm-started experts keep the subject's frame, the one their copied MLPs learned in
                    self.experts[name].set_voxel_info(pair, coords[lab == r],
                                                      frame=coords if self.subject_frame else None)

    def _points(self, pair: str, voxels: Optional[Tensor], device) -> tuple[list, Tensor]:
        """Every (partition, voxel) entry as a point of its ROI's expert.

        Returns a list of (expert index, expert, output columns (n,), the expert's local voxel
        indices (n,)) and the number of voxels V; output column ``i * V + j`` is voxel ``j`` of
        partition ``i``.
        """
        s = pair_slot(pair)
        vox = torch.arange(self.voxel_counts[pair], device=device) if voxels is None else voxels
        groups = []
        for i, p in enumerate(self.partition_names):
            lab = getattr(self, f"label_{_key(p)}_{s}")[vox]
            local = getattr(self, f"local_{_key(p)}_{s}")[vox]
            for r in range(len(self.roi_names[p])):
                cols = torch.nonzero(lab == r).squeeze(1)
                if len(cols):
                    name = self.expert_name(p, r)
                    groups.append((self._index[name], self.experts[name], i * len(vox) + cols, local[cols]))
        return groups, len(vox)

    def forward_partitions(self, features: Features | ExpertFeatures, pair: str,
                           voxels: Optional[Tensor] = None) -> Tensor:
        """Every partition's stitched prediction: (B, P, V) (V = n_voxels when ``voxels`` is None).

        With shared :class:`Features` the maps are normalised once for all experts; with
        :class:`ExpertFeatures` (per-expert LoRA adapters) each expert's own are.  An expert reads
        only its ROI's voxels.
        """
        per_expert = isinstance(features, ExpertFeatures)
        groups, n = self._points(pair, voxels, self.label_device())
        shared = None if per_expert else self.prepare_maps(features)
        preds = []
        for e, expert, _, local in groups:
            maps = self.prepare_maps(features.of(e)) if per_expert else shared
            preds.append(expert.predict(maps, pair, local))
        # each expert predicted only its ROI's voxels; scatter them into the whole-brain vectors
        out = preds[0].new_zeros(len(features), len(self.partition_names) * n)
        out[:, torch.cat([g[2] for g in groups])] = torch.cat(preds, dim=1)
        return out.view(len(features), len(self.partition_names), n)

    def prepare_maps(self, features: Features) -> list[Tensor]:
        """The maps every expert reads: normalised, pooled to the grids and adapted, once for all."""
        return adapt_levels(normalise_levels(features, self.norm, self.grids), self.adapter)

    def label_device(self) -> torch.device:
        return next(self.buffers()).device

    def forward(self, features: Features, pair: str, voxels: Optional[Tensor] = None) -> Tensor:
        return self.forward_partitions(features, pair, voxels).mean(dim=1)

    def regularization(self) -> Tensor:
        return sum((e.regularization() for e in self.experts.values()), torch.zeros(()))

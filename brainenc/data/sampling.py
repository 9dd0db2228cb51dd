"""Batch samplers that keep every batch within one (dataset, subject) pair and shard across ranks.

Subjects have different voxel counts, so a batch must come from a single pair.  The sampler
yields *batch descriptors* ``(pair_index, rows)``; the dataset reads the whole batch at once
(one sorted HDF5 read per batch instead of one per image).

The samplers subclass :class:`~torch.utils.data.DistributedSampler` so that Lightning leaves them
alone under DDP and calls :meth:`set_epoch` each epoch; they shard the batch list themselves:

* training shards the batch list and pads it so every rank takes the same number of steps
  (DDP's gradient all-reduce needs that);
* evaluation shards each pair's units and never pads, so every rank sees every pair (metric
  states stay aligned across ranks) and no image is counted twice.

For exact resumption, an epoch's batch list is built on the iterator's first ``next`` (after
``set_epoch``), and :meth:`PairBatchSampler.resume` skips the batches a mid-epoch checkpoint had
already consumed (see ``ResumableLoader`` in :mod:`brainenc.data.datamodule`).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
from torch.utils.data import DistributedSampler

from brainenc.ioutil import ddp_world


class PairBatchSampler(DistributedSampler):
    """Yield ``(pair_index, rows)`` batches drawn from several pairs.

    Parameters
    ----------
    units : per pair, int array of the units to batch (stimulus rows or trial rows)
    batch_size : units per batch
    shuffle : reshuffle units and batch order every epoch (training)
    weights : per pair sampling weight; with weights, the number of batches drawn from a pair
        per epoch is proportional to ``weight * n_units`` normalised so the epoch keeps the same
        total number of batches (None = every unit once per epoch)
    pad : pad the batch list so all ranks get the same count (training under DDP)
    """

    def __init__(self, units: Sequence[np.ndarray], batch_size: int, shuffle: bool, seed: int = 0,
                 weights: Sequence[float] | None = None, pad: bool = True, drop_last: bool = False):
        # DistributedSampler.__init__ needs a dataset and an initialised group; we only need its
        # epoch machinery, so set the fields directly.
        self.num_replicas, self.rank = ddp_world()
        self.units = [np.asarray(u, dtype=np.int64) for u in units]
        self.batch_size, self.shuffle, self.seed = int(batch_size), shuffle, int(seed)
        self.weights = None if weights is None else np.asarray(weights, dtype=np.float64)
        self.pad, self.drop_last = pad, drop_last
        self.epoch = 0
        self._resume: tuple[int, int] | None = None  # (epoch, batches already consumed)

    @property
    def resume_point(self) -> tuple[int, int] | None:
        """(epoch, batches to skip) set by :meth:`resume` and not yet used, else None."""
        return self._resume

    def resume(self, epoch: int, consumed: int) -> None:
        """Skip the first ``consumed`` batches the next time epoch ``epoch`` is iterated (a fit
        resumed from a checkpoint written in the middle of that epoch)."""
        self._resume = (int(epoch), int(consumed))

    def _batches(self, units: list[np.ndarray]) -> list[tuple[int, np.ndarray]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        per_pair = []
        for p, u in enumerate(units):
            u = rng.permutation(u) if self.shuffle else u
            chunks = [u[i:i + self.batch_size] for i in range(0, len(u), self.batch_size)]
            if self.drop_last and chunks and len(chunks[-1]) < self.batch_size and len(chunks) > 1:
                chunks = chunks[:-1]
            # sorted rows make the HDF5 read one forward pass
            per_pair.append([(p, np.sort(c)) for c in chunks])
        if self.weights is not None:
            sizes = np.array([len(u) for u in self.units], dtype=np.float64)
            total = sum(len(b) for b in per_pair)
            share = self.weights * sizes
            counts = np.maximum(1, np.round(total * share / share.sum())).astype(int)
            # cycle through a pair's batches when its weight asks for more than it has
            per_pair = [[b[i % len(b)] for i in range(c)] if b else [] for b, c in zip(per_pair, counts)]
        batches = [b for pair in per_pair for b in pair]
        if self.shuffle:
            order = rng.permutation(len(batches))
            batches = [batches[i] for i in order]
        return batches

    def _mine(self) -> list[tuple[int, np.ndarray]]:
        if not self.pad:
            # evaluation: shard each pair's units, so every rank sees every pair and no unit twice
            return self._batches([u[self.rank::self.num_replicas] for u in self.units])
        batches = self._batches(self.units)
        if self.num_replicas > 1:
            if self.pad and len(batches) % self.num_replicas:
                extra = self.num_replicas - len(batches) % self.num_replicas
                batches = batches + batches[:extra]
            batches = batches[self.rank::self.num_replicas]
        return batches

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        # A generator: the batch list is built on the first ``next``, not when the iterator is
        # created.  Lightning creates the train iterator once before it calls ``set_epoch`` (and,
        # on resume, never again for that epoch), so an eager list would replay epoch 0's order.
        batches = self._mine()
        if self._resume is not None:
            epoch, consumed = self._resume
            self._resume = None
            if epoch == self.epoch:
                batches = batches[consumed:]
        yield from batches

    def __len__(self) -> int:
        return len(self._mine())

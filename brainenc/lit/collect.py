"""Collect test predictions across batches and ranks (for retrieval and prediction files)."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


class PredictionCollector(Metric):
    """Concatenates ``pred``/``target`` rows with their stimulus rows; DDP-safe (gathers by cat).

    ``compute()`` returns rows sorted by stimulus and de-duplicated, so a sampler that repeated an
    image on some rank cannot count it twice.
    """

    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state("pred", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")
        self.add_state("stimulus", default=[], dist_reduce_fx="cat")

    def update(self, pred: Tensor, target: Tensor, stimulus: Tensor) -> None:
        """pred, target : (B, n_voxels); stimulus : int64 (B,)"""
        self.pred.append(pred.detach().float())
        self.target.append(target.detach().float())
        self.stimulus.append(stimulus.detach().long())

    def compute(self) -> tuple[Tensor, Tensor, Tensor]:
        def cat(x):
            return torch.cat(x) if isinstance(x, list) else x

        pred, target, stim = cat(self.pred), cat(self.target), cat(self.stimulus)
        uniq, first = _first_occurrence(stim)
        return pred[first], target[first], uniq


def _first_occurrence(values: Tensor) -> tuple[Tensor, Tensor]:
    order = torch.argsort(values, stable=True)
    sorted_vals = values[order]
    keep = torch.ones_like(sorted_vals, dtype=torch.bool)
    keep[1:] = sorted_vals[1:] != sorted_vals[:-1]
    return sorted_vals[keep], order[keep]

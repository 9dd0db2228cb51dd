"""Splits defined on stimuli, never on trials, so an image's repeats never straddle splits.

The test set comes from the store (``stimuli.h5/split``, e.g. NSD's shared1000) or, when a store
has none, from a hash of the stimulus id.  Validation is carved from the remaining stimuli by the
same hash, so a stimulus shared by several subjects or datasets (same ``stimulus_id``) lands in
the same split everywhere.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass

import numpy as np

from .store import SPLIT_TEST


def id_fraction(stimulus_id: str, salt: str = "") -> float:
    """Deterministic pseudo-uniform number in [0, 1) from a stimulus id."""
    digest = hashlib.blake2b(f"{salt}{stimulus_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


@dataclass
class StimulusSplit:
    """Stimulus rows (indices into stimuli.h5) per split; sorted, disjoint."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def of(self, name: str) -> np.ndarray:
        return getattr(self, name)


def split_stimuli(seen: np.ndarray, stimulus_ids: np.ndarray, store_split: np.ndarray | None,
                  val_fraction: float = 0.1, test_fraction: float = 0.1) -> StimulusSplit:
    """Split the stimuli a subject saw.

    Parameters
    ----------
    seen : int (n,) stimulus rows shown to the subject (unique)
    stimulus_ids : object (n_stimuli,) ids of all rows of stimuli.h5
    store_split : uint8 (n_stimuli,) or None; 1 marks test stimuli
    """
    seen = np.unique(seen)
    if store_split is not None and (store_split[seen] == SPLIT_TEST).any():
        is_test = store_split[seen] == SPLIT_TEST
    else:
        # no store split, or its test images come without responses (Algonauts 2023 keeps the
        # challenge's test responses hidden): hold out a hash-chosen fraction of what was seen
        if store_split is not None:
            warnings.warn("none of the stimuli with responses is marked test in stimuli.h5/split; "
                          f"holding out a hash-chosen test_fraction={test_fraction} instead", stacklevel=2)
        is_test = np.array([id_fraction(stimulus_ids[s], "test") < test_fraction for s in seen], dtype=bool)
    rest = seen[~is_test]
    is_val = np.array([id_fraction(stimulus_ids[s], "val") < val_fraction for s in rest], dtype=bool)
    return StimulusSplit(train=rest[~is_val], val=rest[is_val], test=seen[is_test])


def limit_train(split: StimulusSplit, stimulus_ids: np.ndarray, n: int) -> StimulusSplit:
    """Keep ``n`` training stimuli, chosen by id hash so that smaller subsets nest in larger ones."""
    keys = np.array([id_fraction(stimulus_ids[s], "subset") for s in split.train])
    keep = np.sort(split.train[np.argsort(keys, kind="stable")[:n]])
    return StimulusSplit(train=keep, val=split.val, test=split.test)

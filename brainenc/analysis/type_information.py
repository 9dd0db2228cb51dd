"""How much of the true voxel types a representation holds at all: the supervised reference for
the embedding clusters of :mod:`brainenc.analysis.embeddings`.

A classifier trained on the true types (simulated data only) reads them, out of fold, from the
voxel embeddings and from the voxels' measured responses. The embeddings scoring below the
responses would mean the encoder loses information; a clustering target above the responses'
score is beyond the data.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Mapping, Optional

import numpy as np

from brainenc.analysis.embedding_space import ari_table, embedding_features

if TYPE_CHECKING:
    from brainenc.data.store import Store


def decodable_types(x: np.ndarray, types: np.ndarray, folds: int = 5, seed: int = 0,
                    n_components: int = 50) -> np.ndarray:
    """Cross-validated predictions of a linear classifier that reads true voxel types from rows of x.

    A supervised reference for the unsupervised clustering: how much of the type information a
    representation holds at all. Rows (n_voxels, D) are z-scored per column, reduced to their
    first ``n_components`` principal components (fitted within each training fold) and read by
    an L2-regularised multinomial logistic regression; every voxel is predicted by the fold
    that did not see it. Applied alike to embeddings and to measured response profiles, the
    two scores say whether the embeddings or the data limit what clustering can recover.

    Returns int (n_voxels,) predicted types; score them with :func:`ari_table`.
    """
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.nan_to_num(np.asarray(x, dtype=np.float64))
    types = np.asarray(types)
    counts = np.bincount(types - types.min())
    folds = int(min(folds, counts.max()))
    if folds < 2 or (counts > 0).sum() < 2:
        raise ValueError(f"decodable_types: need at least two true types and one with 2 or more voxels "
                         f"(voxels per type: {counts[counts > 0].tolist()})")
    k = int(min(n_components, x.shape[1], len(x) * (folds - 1) // folds))
    model = make_pipeline(StandardScaler(), PCA(k, random_state=seed),
                          LogisticRegression(C=0.1, max_iter=3000))
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # a type with fewer voxels than folds is simply missing from some training folds (its
        # held-out voxels then count as misread), which sklearn would warn about every time
        warnings.filterwarnings("ignore", message="The least populated class")
        return cross_val_predict(model, x, types, cv=cv)


def training_responses(store, subject: str, val_fraction: float = 0.1,
                       test_fraction: float = 0.1) -> np.ndarray:
    """Repeat-averaged responses to a subject's training stimuli, (n_train, n_voxels) float32,
    read exactly as the datamodule reads them for training (the same split)."""
    from brainenc.data.datamodule import PairBatchDataset, PairData

    pair = PairData.build(store, subject, val_fraction, test_fraction)
    return PairBatchDataset([pair], 0, "stimuli", load_images=False)[(0, pair.split.train)]["responses"].numpy()


def type_information_of(emb: Mapping[str, np.ndarray], truth: Mapping[str, np.ndarray],
                        stores: Mapping[str, "Store"], data_config: Optional[Mapping] = None,
                        seed: int = 0) -> dict:
    """The supervised reference for the clustering ARI, per pair and pooled.

    For each pair a linear classifier (:func:`decodable_types`, 5-fold cross-validated over
    voxels) reads the true types from (a) the embedding directions and (b) each voxel's measured
    response profile over the training stimuli (repeat-averaged, z-scored per voxel: the data
    the embedding was fitted to). The ARI of its held-out predictions bounds, in practice, what
    unsupervised clustering of that representation can reach; (b) below the clustering target
    means the data, not the encoder, limit it.

    Parameters
    ----------
    emb : {pair: (n_voxels, E)}; truth : {pair: int (n_voxels,)} true types
    stores : {dataset: opened :class:`~brainenc.data.store.Store`}; data_config : the run's
        ``data`` section (split fractions)
    Returns
    -------
    {"embeddings": ari_table, "responses": ari_table} (per pair and "pooled", ``ari`` only), and
    ``skipped`` {pair: reason} for pairs without two true types (left out of the tables)
    """
    cfg = data_config or {}
    fractions = {"val_fraction": float(cfg.get("val_fraction", 0.1)),
                 "test_fraction": float(cfg.get("test_fraction", 0.1))}
    from_emb, from_resp, skipped = {}, {}, {}
    for key in emb:
        ds, subject = key.split("/")
        try:
            e = decodable_types(embedding_features(emb[key], standardise=False), truth[key], seed=seed)
        except ValueError as err:  # e.g. a subject whose voxels are all of one type
            skipped[key] = str(err)
            continue
        y = training_responses(stores[ds], subject, **fractions).T  # (V, n_train)
        y = (y - np.nanmean(y, 1, keepdims=True)) / np.maximum(np.nanstd(y, 1, keepdims=True), 1e-12)
        from_emb[key], from_resp[key] = e, decodable_types(y, truth[key], seed=seed)
    out = {"embeddings": ari_table(from_emb, truth), "responses": ari_table(from_resp, truth)} if from_emb else {}
    if skipped:
        out["skipped"] = skipped
    return out

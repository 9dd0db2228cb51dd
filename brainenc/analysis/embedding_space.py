"""The space voxel embeddings are compared in, and how well a partition of it matches the truth.

Pure functions of arrays (plus :func:`attention_centres`, which asks a universal readout where
each voxel looks): embedding directions with optional covariates regressed out, the position
basis those covariates come from, k-means/GMM clustering, nearest-neighbour label agreement and
adjusted Rand indices. :mod:`brainenc.analysis.embeddings` applies them to a run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional

import h5py
import numpy as np
import yaml


def embedding_features(emb: np.ndarray, directions: bool = True, standardise: bool = True,
                       control: Optional[np.ndarray] = None) -> np.ndarray:
    """The space voxels are compared in: rows of ``emb`` (n_voxels, E) -> float64 (n_voxels, E).

    ``directions`` divides each row by its norm first. The universal readout's weights are linear
    in the embedding (``W_v = e_v @ feat_embed``), so a row's norm acts as the voxel's response
    gain, which tracks its reliability (on the quickstart simbrain the norm correlates 0.64 with
    the true signal-to-noise ratio) rather than its tuning; the direction is what the voxel
    responds to. ``control`` (n_voxels, k) covariates, e.g. :func:`position_basis` of each voxel's
    receptive-field centre, are regressed out of the directions (least squares, pooled over
    voxels): what is left is what a voxel responds to *beyond where it looks*. ``standardise``
    then z-scores each dimension, so no single dimension with a large spread decides the
    partition (the embedding's scale carries no meaning of its own).
    """
    x = np.asarray(emb, dtype=np.float64)
    if directions:
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    if control is not None:
        c = np.asarray(control, dtype=np.float64)
        if c.shape[0] != x.shape[0]:
            raise ValueError(f"embedding_features: control has {c.shape[0]} rows for {x.shape[0]} embeddings")
        x = x - c @ np.linalg.lstsq(c, x, rcond=None)[0]
    if standardise:
        x = (x - x.mean(0)) / np.maximum(x.std(0), 1e-12)
    return x


def position_basis(centres: np.ndarray) -> np.ndarray:
    """Smooth functions of receptive-field centres (n_voxels, 2) in image units ([-1, 1], x right,
    y down) -> (n_voxels, 9): constant, x, y, x^2, xy, y^2, eccentricity r, r^2 and log(r + 0.05).

    A quadratic surface plus radial terms: enough to absorb the retinotopic layout, in which
    eccentricity (receptive-field size, foveal vs peripheral) is the dominant axis, while staying
    far too coarse to fit the ROIs themselves.
    """
    c = np.asarray(centres, dtype=np.float64)
    x, y = c[:, 0], c[:, 1]
    r = np.hypot(x, y)
    return np.stack([np.ones_like(x), x, y, x * x, x * y, y * y, r, r * r, np.log(r + 0.05)], axis=1)


def attention_centres(readout, pair: str, features, chunk: int = 1024) -> np.ndarray:
    """Each voxel's receptive-field centre as the universal readout itself sees it.

    Per level, the voxel's attention over the spatial tokens (the global token left out),
    averaged over the images of ``features``, gives a centroid on the level's token grid; the
    levels' centroids are averaged with weights equal to each level's share of the voxel's
    predicted response variance over those images (the level the voxel reads decides).

    Parameters
    ----------
    readout : :class:`~brainenc.models.universal.UniversalReadout`
    pair : "dataset/subject" known to the readout
    features : backbone features of a set of probe images (B of them; any natural images), or
        their keys and values from ``readout.prepare`` (shared by the pairs of one store)
    Returns
    -------
    float64 (n_voxels, 2): x right, y down, in [-1, 1] image units
    """
    import torch

    from brainenc.models.universal import token_grid

    kv = readout.prepare(features)
    out = []
    with torch.no_grad():
        for start in range(0, readout.n_voxels(pair), chunk):
            vox = torch.arange(start, min(start + chunk, readout.n_voxels(pair)))
            e = readout.embeddings(pair, vox)                                     # (V, E)
            w = (e @ readout.feat_embed).reshape(len(e), len(readout.levels), -1)  # (V, L, d)
            cents, shares = [], []
            for li, (mod, (k, v), level) in enumerate(zip(readout.attn, kv, readout.levels)):
                h, attn = mod(e, k, v, return_attention=True)                     # (B, V, d), (B, V, T)
                hh, ww = token_grid(*readout.spec.shapes[level][1:], readout.max_grid)
                a = attn.mean(0)[:, 1:]                                           # (V, H*W)
                a = a / a.sum(1, keepdim=True).clamp_min(1e-12)
                gy, gx = torch.meshgrid((torch.arange(hh) + 0.5) / hh * 2 - 1,
                                        (torch.arange(ww) + 0.5) / ww * 2 - 1, indexing="ij")
                grid = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1).to(a.device, a.dtype)  # (H*W, 2)
                cents.append(a @ grid)                                            # (V, 2)
                shares.append((h * w[:, li][None]).sum(-1).var(0))                # (V,)
            share = torch.stack(shares, 1)                                        # (V, L)
            total = share.sum(1, keepdim=True)
            # a voxel whose prediction does not vary (dead or constant) weighs its levels equally
            share = torch.where(total > 0, share / total.clamp_min(1e-30), torch.full_like(share, 1 / share.shape[1]))
            out.append((torch.stack(cents, 1) * share[..., None]).sum(1))
    return torch.cat(out).cpu().double().numpy()


def cluster_embeddings(emb: np.ndarray, n_clusters: int = 7, method: str = "kmeans", seed: int = 0,
                       standardise: bool = True, directions: bool = True,
                       control: Optional[np.ndarray] = None) -> np.ndarray:
    """Cluster rows of ``emb`` (n_voxels, E); returns int labels (n_voxels,).

    Rows are compared by :func:`embedding_features` (their directions, ``control`` regressed
    out, standardised).
    """
    from sklearn.cluster import KMeans
    from sklearn.mixture import GaussianMixture

    x = embedding_features(emb, directions, standardise, control)
    if method == "kmeans":
        return KMeans(n_clusters, n_init=4, random_state=seed).fit_predict(x)
    if method == "gmm":
        # a full covariance in 256-d is ill-posed for a few thousand voxels; diagonal is enough
        return GaussianMixture(n_clusters, covariance_type="diag", random_state=seed).fit_predict(x)
    raise ValueError(f"cluster_embeddings: method must be 'kmeans' or 'gmm', got {method!r}")


def nn_same_label(emb: np.ndarray, labels: np.ndarray, k: int = 10, directions: bool = True,
                  standardise: bool = True, control: Optional[np.ndarray] = None) -> float:
    """Fraction of the ``k`` nearest neighbours (Euclidean in :func:`embedding_features` space,
    self excluded) of each labelled row that carry the same label.

    Parameters
    ----------
    emb : (n_voxels, E) embeddings (pooled over subjects: a neighbour may be another subject's)
    labels : int (n_voxels,), e.g. ROI; rows labelled 0 (no ROI) are neighbours but not queries
    Returns
    -------
    float in [0, 1]; chance is about sum_r (n_r / n)^2 over the labels
    """
    from sklearn.neighbors import NearestNeighbors

    x = embedding_features(emb, directions, standardise, control)
    labels = np.asarray(labels)
    query = np.flatnonzero(labels != 0)
    if len(query) == 0 or len(x) <= k:
        return float("nan")
    _, idx = NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x[query])
    nb = idx[:, 1:]  # drop self (distance 0 is always the nearest)
    return float((labels[nb] == labels[query][:, None]).mean())


def embedding_structure(emb: Mapping[str, np.ndarray], types: Mapping[str, np.ndarray],
                        rois: Optional[Mapping[str, np.ndarray]] = None,
                        initial: Optional[Mapping[str, np.ndarray]] = None, n_clusters: int = 7,
                        k: int = 10, seed: int = 0, centres: Optional[Mapping[str, np.ndarray]] = None) -> dict:
    """How much function the embeddings encode, pooled over pairs.

    Parameters
    ----------
    emb : {pair: (n_voxels, E)} learned embeddings
    types : {pair: int (n_voxels,)} true voxel types (simbrain ``truth/voxel_type``; 0 = noise)
    rois : {pair: int (n_voxels,)} ROI labels for the nearest-neighbour score (default ``types``)
    initial : {pair: (n_voxels, E)} the embeddings at initialisation; adds the displacement
        diagnostics below
    centres : {pair: (n_voxels, 2)} receptive-field centres (:func:`attention_centres`); adds the
        position-controlled scores below (the default of :func:`~brainenc.analysis.embeddings.cluster_run`)
    Returns
    -------
    dict with ``ari`` (k-means of the embeddings vs ``types``, all voxels), ``ari_signal`` (type != 0
    only), ``nn_same_roi`` (see :func:`nn_same_label`), ``nn_chance``; with ``initial`` also
    ``rel_displacement`` = rms(e - e0) / rms(e0) and ``ari_learned``, the ARI of the
    displacement e - e0 alone: high ``ari_learned`` with low ``ari`` means that training found the
    structure but the random start hides it; with ``centres`` also ``ari_position_controlled`` and
    ``nn_same_roi_position_controlled`` (:func:`position_basis` of the centres regressed out)
    """
    from sklearn.metrics import adjusted_rand_score

    keys = [k_ for k_ in emb if k_ in types]
    x = np.concatenate([emb[k_] for k_ in keys])
    t = np.concatenate([types[k_] for k_ in keys])
    r = np.concatenate([(rois or types)[k_] for k_ in keys])
    lab = cluster_embeddings(x, n_clusters, seed=seed)
    sig = t != 0
    frac = np.bincount(r[r != 0]) / max(1, int((r != 0).sum()))
    out = {"ari": float(adjusted_rand_score(t, lab)),
           "ari_signal": float(adjusted_rand_score(t[sig], lab[sig])),
           "nn_same_roi": nn_same_label(x, r, k), "nn_chance": float((frac ** 2).sum())}
    if initial is not None:
        x0 = np.concatenate([initial[k_] for k_ in keys])
        d = x - x0
        out["rel_displacement"] = float(np.sqrt((d ** 2).mean() / max((x0 ** 2).mean(), 1e-30)))
        out["ari_learned"] = float(adjusted_rand_score(t, cluster_embeddings(d, n_clusters, seed=seed)))
    if centres is not None:
        basis = position_basis(np.concatenate([centres[k_] for k_ in keys]))
        out["ari_position_controlled"] = float(adjusted_rand_score(
            t, cluster_embeddings(x, n_clusters, seed=seed, control=basis)))
        out["nn_same_roi_position_controlled"] = nn_same_label(x, r, k, control=basis)
    return out


def true_voxel_types(subject_file: str | Path) -> tuple[np.ndarray, dict]:
    """simbrain's true voxel type per voxel (n_voxels,) and its {value: name} labels."""
    with h5py.File(subject_file, "r") as f:
        if "truth/voxel_type" not in f:
            raise ValueError(f"{subject_file}: field 'truth/voxel_type' missing; expected a simbrain store")
        ds = f["truth/voxel_type"]
        labels = yaml.safe_load(ds.attrs.get("labels", "{}")) or {}
        return ds[()].astype(np.int64), {int(k): v for k, v in labels.items()}


def ari_table(labels: Mapping[str, np.ndarray], truth: Mapping[str, np.ndarray],
              signal: Optional[Mapping[str, np.ndarray]] = None) -> dict:
    """ARI per pair and pooled over pairs; with ``signal`` masks also over signal voxels only."""
    from sklearn.metrics import adjusted_rand_score

    out = {}
    for key in labels:
        out[key] = {"ari": float(adjusted_rand_score(truth[key], labels[key]))}
        if signal is not None:
            m = signal[key]
            out[key]["ari_signal"] = float(adjusted_rand_score(truth[key][m], labels[key][m]))
    keys = list(labels)
    pooled = {"ari": float(adjusted_rand_score(np.concatenate([truth[k] for k in keys]),
                                                np.concatenate([labels[k] for k in keys])))}
    if signal is not None:
        pooled["ari_signal"] = float(adjusted_rand_score(
            np.concatenate([truth[k][signal[k]] for k in keys]),
            np.concatenate([labels[k][signal[k]] for k in keys])))
    out["pooled"] = pooled
    return out

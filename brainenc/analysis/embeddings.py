"""Functional maps from learned voxel embeddings.

The universal encoder gives every voxel of every subject a point in one embedding space, so
clustering the pooled embeddings yields labels that mean the same thing in every subject. On
simbrain the clusters can be scored against the true voxel types (``truth/voxel_type``) with the
adjusted Rand index (ARI: 0 = chance, 1 = identical partitions, invariant to label names).

Command line (writes a ``cluster`` column into the run's ``results/voxels.csv``, atomically, and
``results/clusters.json`` with the ARI per subject and pooled)::

    python -m brainenc.analysis.embeddings runs/universal/quickstart_crowd --n-clusters 7
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Mapping, Optional

import h5py
import numpy as np
import pandas as pd
import yaml
from lightning.pytorch import Callback


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
    features : backbone features of a set of probe images (B of them; any natural images)
    Returns
    -------
    float64 (n_voxels, 2): x right, y down, in [-1, 1] image units
    """
    import torch

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
                hh, ww = _token_grid(features.maps[level].shape[-2:], readout.max_grid)
                a = attn.mean(0)[:, 1:]                                           # (V, H*W)
                a = a / a.sum(1, keepdim=True).clamp_min(1e-12)
                gy, gx = torch.meshgrid((torch.arange(hh) + 0.5) / hh * 2 - 1,
                                        (torch.arange(ww) + 0.5) / ww * 2 - 1, indexing="ij")
                grid = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1).to(a.dtype)  # (H*W, 2)
                cents.append(a @ grid)                                            # (V, 2)
                shares.append((h * w[:, li][None]).sum(-1).var(0))                # (V,)
            share = torch.stack(shares, 1)                                        # (V, L)
            total = share.sum(1, keepdim=True)
            # a voxel whose prediction does not vary (dead or constant) weighs its levels equally
            share = torch.where(total > 0, share / total.clamp_min(1e-30), torch.full_like(share, 1 / share.shape[1]))
            out.append((torch.stack(cents, 1) * share[..., None]).sum(1))
    return torch.cat(out).double().numpy()


def _token_grid(hw, max_grid: Optional[int]) -> tuple[int, int]:
    """(H', W') of a level's token grid: the map's (H, W) after the pooling of
    :func:`~brainenc.models.universal.level_tokens`."""
    h, w = int(hw[0]), int(hw[1])
    if max_grid is not None and max(h, w) > max_grid:
        h, w = min(h, max_grid), min(w, max_grid)
    return h, w


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
                        k: int = 10, seed: int = 0) -> dict:
    """How much function the embeddings encode, pooled over pairs.

    Parameters
    ----------
    emb : {pair: (n_voxels, E)} learned embeddings
    types : {pair: int (n_voxels,)} true voxel types (simbrain ``truth/voxel_type``; 0 = noise)
    rois : {pair: int (n_voxels,)} ROI labels for the nearest-neighbour score (default ``types``)
    initial : {pair: (n_voxels, E)} the embeddings at initialisation; adds the displacement
        diagnostics below
    Returns
    -------
    dict with ``ari`` (k-means of the embeddings vs ``types``, all voxels), ``ari_signal`` (type != 0
    only), ``nn_same_roi`` (see :func:`nn_same_label`), ``nn_chance``; with ``initial`` also
    ``rel_displacement`` = rms(e - e0) / rms(e0) and ``ari_learned``, the ARI of the
    displacement e - e0 alone: high ``ari_learned`` with low ``ari`` means that training found the
    structure but the random start hides it
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


def cluster_run(run_dir: str | Path, ckpt: Optional[str | Path] = None, n_clusters: int = 7,
                method: str = "kmeans", seed: int = 0, extra_embeddings: Optional[str | Path] = None,
                merge_types: Optional[list[str]] = None, control: str = "position",
                n_probe_images: int = 256) -> dict:
    """Cluster a universal run's embeddings (all pairs pooled), write ``cluster`` and the ARI.

    Parameters
    ----------
    run_dir : run directory with ``results/voxels.csv`` (from ``brainenc test``)
    ckpt : checkpoint (default: the run's checkpoint, best else last, see :mod:`brainenc.rundir`)
    extra_embeddings : a transfer run's ``transfer/embeddings.pt`` ({pair: (n_voxels, E)}), clustered
        together with the base embeddings so its labels share their meaning
    merge_types : names of true voxel types to count as one type in an extra score, ``ari_merged``
        (e.g. V1, V2, V3: areas that on simbrain differ only subtly in tuning at equal
        eccentricity, so that clusters following eccentricity across them are not penalised twice)
    control : "position" clusters what is left of the embeddings after regressing out a smooth
        function of each voxel's receptive-field centre (:func:`attention_centres` on
        ``n_probe_images`` images of the pair's store, :func:`position_basis`); "none" clusters
        the embeddings as they are. Both scores are reported either way.
    Returns
    -------
    dict: ARI per pair and pooled (all voxels, and signal voxels only) of the written clusters,
    ``uncontrolled`` / ``position_controlled`` pooled scores of both clusterings, cluster sizes,
    the fraction of embedding-space nearest neighbours in the same ROI (first ROI atlas), and
    ``results/embeddings_2d.png`` (PCA and t-SNE coloured by ROI, as they are and with position
    regressed out)
    """
    from brainenc.data.store import Store
    from brainenc.ioutil import atomic_path
    from brainenc.recipes.transfer import load_base
    from brainenc.results import add_column, read_results

    if control not in ("position", "none"):
        raise ValueError(f"cluster_run: control must be 'position' or 'none', got {control!r}")
    run_dir = Path(run_dir)
    table = run_dir / "results" / "voxels.csv"
    if not table.exists():
        raise FileNotFoundError(f"{table}: no per-voxel results; run `brainenc test` first")
    base = load_base(ckpt or run_dir)
    emb = {p: base.readout.voxel_weights(p).numpy() for p in base.readout.pairs}
    if extra_embeddings is not None:
        for k, v in torch_load(extra_embeddings).items():
            emb[k] = v.numpy()
            if not base.readout.has_pair(k):  # so its receptive fields can be read like the base's
                base.readout.add_pair(k, len(v), init=v)
    keys = list(emb)
    stores = _stores_of(base, run_dir)
    missing = sorted({k.split("/")[0] for k in keys} - set(stores))
    if missing:
        raise ValueError(f"{run_dir / 'results' / 'config.yaml'}: no readable store for dataset(s) {missing} "
                         "(data.stores); the position control reads their images - pass control='none' "
                         "(--control none) to cluster without it")
    centres = {}
    for k in keys:
        store = Store(stores[k.split("/")[0]], validate=False)
        rows = np.unique(np.linspace(0, store.n_stimuli - 1, min(n_probe_images, store.n_stimuli)).astype(np.int64))
        feats = base.features_of_rows(store, rows)
        centres[k] = attention_centres(base.readout, k, feats)
    x_all = np.concatenate([emb[k] for k in keys])
    basis = position_basis(np.concatenate([centres[k] for k in keys]))
    bounds = np.cumsum([0] + [len(emb[k]) for k in keys])

    def split(v: np.ndarray) -> dict:
        return {k: v[bounds[i]:bounds[i + 1]] for i, k in enumerate(keys)}

    clusterings = {"uncontrolled": cluster_embeddings(x_all, n_clusters, method, seed),
                   "position_controlled": cluster_embeddings(x_all, n_clusters, method, seed, control=basis)}
    labels_all = clusterings["position_controlled" if control == "position" else "uncontrolled"]
    labels = split(labels_all)

    # truth from the stores named in the results table's pairs
    df = read_results(run_dir)[["dataset", "subject"]].drop_duplicates()
    in_table = {f"{d}/{s}" for d, s in zip(df["dataset"], df["subject"])}
    truth, signal, names, rois, roi_names = {}, {}, {}, {}, {}
    for k in keys:
        ds, s = k.split("/")
        info = Store(stores[ds]).subject(s)
        if info.rois:  # the first atlas: the neighbour score and the figure's colours
            atlas = next(iter(info.rois.values()))
            rois[k], roi_names = atlas.values.astype(np.int64), atlas.labels
        if info.has_truth:
            t, names = true_voxel_types(info.path)
            truth[k] = t
            signal[k] = t != 0  # 0 = "noise" voxels, no stimulus-driven signal
    scored = {k: labels[k] for k in keys if k in truth}
    result = {"method": method, "n_clusters": n_clusters, "control": control, "voxel_types": names,
              "ari": ari_table(scored, truth, signal) if scored else {},
              "sizes": np.bincount(labels_all, minlength=n_clusters).tolist()}
    if scored:
        for name, lab in clusterings.items():
            result[name] = {"ari": ari_table({k: v for k, v in split(lab).items() if k in truth},
                                             truth, signal)["pooled"]}
    if rois:
        rk = [k for k in keys if k in rois]
        sel = np.concatenate([np.arange(bounds[i], bounds[i + 1]) for i, k in enumerate(keys) if k in rois])
        r_all = np.concatenate([rois[k] for k in rk])
        result["nn_same_roi"] = {"k": 10, "fraction": nn_same_label(x_all[sel], r_all, k=10)}
        result["nn_same_roi"]["fraction_position_controlled"] = nn_same_label(x_all[sel], r_all, k=10,
                                                                              control=basis[sel])
        for name in ("uncontrolled", "position_controlled"):
            if name in result:
                result[name]["nn_same_roi"] = result["nn_same_roi"][
                    "fraction" if name == "uncontrolled" else "fraction_position_controlled"]
        plot_embeddings_2d({k: emb[k] for k in rk}, {k: rois[k] for k in rk}, roi_names,
                           run_dir / "results" / "embeddings_2d.png", seed=seed, control=basis[sel])
    if scored:
        # which true type dominates each cluster (for reading the map)
        t_all = np.concatenate([truth[k] for k in scored])
        l_all = np.concatenate([scored[k] for k in scored])
        ct = pd.crosstab(l_all, t_all)
        result["contingency"] = {int(c): {names.get(int(t), str(t)): int(n) for t, n in row.items()}
                                 for c, row in ct.iterrows()}
        if merge_types:
            ids = [v for v, name in names.items() if name in set(merge_types)]
            if len(ids) != len(set(merge_types)):
                raise ValueError(f"merge_types {merge_types}: unknown type names; have {list(names.values())}")
            merged = {k: np.where(np.isin(truth[k], ids), min(ids), truth[k]) for k in scored}
            result["ari_merged"] = {"types": list(merge_types),
                                    **ari_table(scored, merged, signal)["pooled"]}
    add_column(run_dir, "cluster", {k: v for k, v in labels.items() if k in in_table})
    with atomic_path(run_dir / "results" / "clusters.json") as tmp:
        tmp.write_text(json.dumps(result, indent=2))
    return result


def plot_embeddings_2d(emb: Mapping[str, np.ndarray], rois: Mapping[str, np.ndarray],
                       roi_names: Mapping[int, str], path: str | Path, max_points: int = 4000,
                       seed: int = 0, control: Optional[np.ndarray] = None) -> Path:
    """PCA and t-SNE of the pooled embeddings in 2-D, coloured by ROI; written atomically as PNG.

    Parameters
    ----------
    emb : {pair: (n_voxels, E)}; compared as in :func:`embedding_features`
    rois : {pair: int (n_voxels,)}, 0 = no ROI (grey)
    max_points : random subset for t-SNE and plotting (t-SNE is quadratic in the points)
    control : (n_voxels, k) covariates over the pooled rows, in ``emb``'s order; when given, a
        second row shows the embeddings with them regressed out (position-controlled)
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    from brainenc.ioutil import atomic_path

    keys = list(emb)
    raw = np.concatenate([emb[k] for k in keys])
    spaces = {"": embedding_features(raw)}
    if control is not None:
        spaces["position regressed out: "] = embedding_features(raw, control=control)
    r = np.concatenate([rois[k] for k in keys])
    rng = np.random.default_rng(seed)
    sel = rng.permutation(len(raw))[:max_points]
    r = r[sel]
    fig, axes = plt.subplots(len(spaces), 2, figsize=(11, 5 * len(spaces)), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for row, (prefix, x) in zip(axes, spaces.items()):
        pcs = PCA(n_components=min(50, x.shape[1]), random_state=seed).fit_transform(x[sel])
        views = {f"{prefix}PCA (first 2 components)": pcs[:, :2],
                 f"{prefix}t-SNE (of the first 50 PCs)": TSNE(2, init="pca", random_state=seed,
                                                               perplexity=30).fit_transform(pcs)}
        for ax, (title, xy) in zip(row, views.items()):
            for i, v in enumerate(sorted(set(r.tolist()))):
                m = r == v
                ax.scatter(xy[m, 0], xy[m, 1], s=3, alpha=0.6,
                           label=roi_names.get(v, "none" if v == 0 else str(v)),
                           color="0.6" if v == 0 else cmap(i % 10))
            ax.set_title(title, fontsize=10)
            ax.set_xticks([])
            ax.set_yticks([])
        row[1].legend(markerscale=4, fontsize=8, loc="best")
    fig.suptitle(f"voxel embeddings of {len(keys)} subjects ({len(sel)} of {len(raw)} voxels), coloured by ROI")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


class EmbeddingProbe(Callback):
    """Lightning callback: after each validation, score the universal readout's embeddings.

    Logs ``embed/ari``, ``embed/ari_signal``, ``embed/nn_same_roi``, ``embed/rel_displacement``
    and ``embed/ari_learned`` (see :func:`embedding_structure`) for the pairs whose store has
    simbrain's ``truth/voxel_type``; ROI labels for the neighbour score come from the first ROI
    atlas of each subject. Does nothing for other readouts or stores without truth.

    Parameters
    ----------
    n_clusters : k-means clusters (simbrain: 7 voxel types)
    k : neighbours for ``nn_same_roi``
    every_n_epochs : score after every n-th validation (k-means of a few thousand voxels takes
        seconds)
    """

    def __init__(self, n_clusters: int = 7, k: int = 10, every_n_epochs: int = 1):
        self.n_clusters, self.k, self.every_n_epochs = n_clusters, k, every_n_epochs
        self._initial: Optional[dict] = None
        self._truth: Optional[dict] = None
        self._seen = 0

    def _readout(self, pl_module):
        from brainenc.models.universal import UniversalReadout

        r = getattr(pl_module, "readout", None)
        return r if isinstance(r, UniversalReadout) else None

    def _load_truth(self, trainer, readout) -> dict:
        dm = getattr(trainer, "datamodule", None)
        types, rois = {}, {}
        for p in getattr(dm, "pairs", []):
            if p.key not in readout.offsets or not p.info.has_truth:
                continue
            with h5py.File(p.info.path, "r") as f:
                if "truth/voxel_type" not in f:
                    continue
                types[p.key] = f["truth/voxel_type"][()].astype(np.int64)
            atlas = next(iter(p.info.rois.values()), None)
            rois[p.key] = atlas.values.astype(np.int64) if atlas is not None else types[p.key]
        return {"types": types, "rois": rois}

    def on_fit_start(self, trainer, pl_module) -> None:
        r = self._readout(pl_module)
        if r is not None:
            self._initial = {p: r.voxel_weights(p).cpu().numpy().copy() for p in r.pairs}

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        r = self._readout(pl_module)
        if r is None or trainer.sanity_checking:
            return
        self._seen += 1
        if self._seen % self.every_n_epochs:
            return
        if self._truth is None:
            self._truth = self._load_truth(trainer, r)
        if not self._truth["types"]:
            return
        emb = {p: r.voxel_weights(p).cpu().numpy() for p in self._truth["types"]}
        res = embedding_structure(emb, self._truth["types"], self._truth["rois"], self._initial,
                                  self.n_clusters, self.k)
        for name, v in res.items():
            pl_module.log(f"embed/{name}", v, sync_dist=False)


def torch_load(path):
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def _stores_of(base, run_dir: Path) -> dict[str, str]:
    """{dataset name: store dir} from the run's datamodule hyperparameters."""
    from brainenc.data.store import Store

    cfg = run_dir / "results" / "config.yaml"
    dirs = []
    if cfg.exists():
        dirs = (yaml.safe_load(cfg.read_text()).get("data") or {}).get("stores") or []
    out = {}
    for d in dirs:
        try:
            out[Store(d, validate=False).name] = d
        except Exception:  # a moved store: clustering still works, only the ARI is skipped
            continue
    return out


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m brainenc.analysis.embeddings", description=(
        "Cluster a universal encoder's voxel embeddings into a functional map; writes a 'cluster' "
        "column into results/voxels.csv and the ARI against simbrain's true voxel types."))
    ap.add_argument("run_dir")
    ap.add_argument("--ckpt", default=None)
    ap.add_argument("--n-clusters", type=int, default=7)
    ap.add_argument("--method", choices=("kmeans", "gmm"), default="kmeans")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--control", choices=("position", "none"), default="position",
                    help="regress each voxel's receptive-field centre (from the model's attention) out of "
                         "the embeddings before clustering (default), or cluster them as they are")
    ap.add_argument("--merge-types", nargs="*", default=None,
                    help="true type names to count as one in the extra score ari_merged (e.g. V1 V2 V3)")
    a = ap.parse_args(argv)
    res = cluster_run(a.run_dir, a.ckpt, a.n_clusters, a.method, a.seed, merge_types=a.merge_types,
                      control=a.control)
    print(json.dumps({k: res[k] for k in ("ari", "uncontrolled", "position_controlled", "ari_merged",
                                          "nn_same_roi", "sizes") if k in res}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

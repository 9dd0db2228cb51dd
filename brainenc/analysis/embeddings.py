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


def embedding_features(emb: np.ndarray, directions: bool = True, standardise: bool = True) -> np.ndarray:
    """The space voxels are compared in: rows of ``emb`` (n_voxels, E) -> float64 (n_voxels, E).

    ``directions`` divides each row by its norm first. The universal readout's weights are linear
    in the embedding (``W_v = e_v @ feat_embed``), so a row's norm acts as the voxel's response
    gain, which tracks its reliability (on the quickstart simbrain the norm correlates 0.64 with
    the true signal-to-noise ratio) rather than its tuning; the direction is what the voxel
    responds to. ``standardise`` then z-scores each dimension, so no single dimension with a
    large spread decides the partition (the embedding's scale carries no meaning of its own).
    """
    x = np.asarray(emb, dtype=np.float64)
    if directions:
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    if standardise:
        x = (x - x.mean(0)) / np.maximum(x.std(0), 1e-12)
    return x


def cluster_embeddings(emb: np.ndarray, n_clusters: int = 7, method: str = "kmeans", seed: int = 0,
                       standardise: bool = True, directions: bool = True) -> np.ndarray:
    """Cluster rows of ``emb`` (n_voxels, E); returns int labels (n_voxels,).

    Rows are compared by :func:`embedding_features` (their directions, standardised).
    """
    from sklearn.cluster import KMeans
    from sklearn.mixture import GaussianMixture

    x = embedding_features(emb, directions, standardise)
    if method == "kmeans":
        return KMeans(n_clusters, n_init=4, random_state=seed).fit_predict(x)
    if method == "gmm":
        # a full covariance in 256-d is ill-posed for a few thousand voxels; diagonal is enough
        return GaussianMixture(n_clusters, covariance_type="diag", random_state=seed).fit_predict(x)
    raise ValueError(f"cluster_embeddings: method must be 'kmeans' or 'gmm', got {method!r}")


def nn_same_label(emb: np.ndarray, labels: np.ndarray, k: int = 10, directions: bool = True,
                  standardise: bool = True) -> float:
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

    x = embedding_features(emb, directions, standardise)
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


def add_column_atomic(csv_path: str | Path, column: str, values: Mapping[str, np.ndarray]) -> pd.DataFrame:
    """Set integer ``column`` (e.g. cluster labels) of a per-voxel results table from
    {"dataset/subject": (n_voxels,)}; atomic rewrite.

    Rows of pairs not in ``values`` get NaN.  Voxels are matched by (dataset, subject, voxel).
    """
    from brainenc.data.store import atomic_path

    csv_path = Path(csv_path)
    df = pd.read_csv(csv_path)
    col = np.full(len(df), np.nan)
    keys = (df["dataset"].astype(str) + "/" + df["subject"].astype(str)).to_numpy()
    for key, v in values.items():
        rows = np.flatnonzero(keys == key)
        vox = df["voxel"].to_numpy()[rows]
        v = np.asarray(v)
        if len(rows) and vox.max() >= len(v):
            raise ValueError(f"{csv_path}: {key} has voxel {vox.max()} but {len(v)} values for '{column}'")
        col[rows] = v[vox]
    # labels are integers; pairs without labels stay empty (nullable integer column)
    df[column] = pd.Series(col).round().astype("Int64")
    with atomic_path(csv_path) as tmp:
        df.to_csv(tmp, index=False, float_format="%.6g")
    return df


def cluster_run(run_dir: str | Path, ckpt: Optional[str | Path] = None, n_clusters: int = 7,
                method: str = "kmeans", seed: int = 0, extra_embeddings: Optional[str | Path] = None,
                merge_types: Optional[list[str]] = None) -> dict:
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
    Returns
    -------
    dict: ARI per pair and pooled (all voxels, and signal voxels only), cluster sizes, the
    fraction of embedding-space nearest neighbours in the same ROI (first ROI atlas; also
    written with ``results/embeddings_2d.png``, PCA and t-SNE coloured by ROI)
    """
    from brainenc.data.store import Store, atomic_path
    from brainenc.recipes.transfer import load_base

    run_dir = Path(run_dir)
    table = run_dir / "results" / "voxels.csv"
    if not table.exists():
        raise FileNotFoundError(f"{table}: no per-voxel results; run `brainenc test` first")
    base = load_base(ckpt or run_dir)
    emb = {p: base.readout.voxel_weights(p).numpy() for p in base.readout.pairs}
    if extra_embeddings is not None:
        emb.update({k: v.numpy() for k, v in torch_load(extra_embeddings).items()})
    keys = list(emb)
    labels_all = cluster_embeddings(np.concatenate([emb[k] for k in keys]), n_clusters, method, seed)
    bounds = np.cumsum([0] + [len(emb[k]) for k in keys])
    labels = {k: labels_all[bounds[i]:bounds[i + 1]] for i, k in enumerate(keys)}

    # truth from the stores named in the results table's pairs
    df = pd.read_csv(table, usecols=["dataset", "subject"]).drop_duplicates()
    in_table = {f"{d}/{s}" for d, s in zip(df["dataset"], df["subject"])}
    stores = _stores_of(base, run_dir)
    truth, signal, names, rois, roi_names = {}, {}, {}, {}, {}
    for k in keys:
        ds, s = k.split("/")
        if ds in stores:
            info = Store(stores[ds]).subject(s)
            if info.rois:  # the first atlas: the neighbour score and the figure's colours
                atlas = next(iter(info.rois.values()))
                rois[k], roi_names = atlas.values.astype(np.int64), atlas.labels
            if info.has_truth:
                t, names = true_voxel_types(info.path)
                truth[k] = t
                signal[k] = t != 0  # 0 = "noise" voxels, no stimulus-driven signal
    scored = {k: labels[k] for k in keys if k in truth}
    result = {"method": method, "n_clusters": n_clusters, "voxel_types": names,
              "ari": ari_table(scored, truth, signal) if scored else {},
              "sizes": np.bincount(labels_all, minlength=n_clusters).tolist()}
    if rois:
        rk = [k for k in keys if k in rois]
        result["nn_same_roi"] = {"k": 10, "fraction": nn_same_label(
            np.concatenate([emb[k] for k in rk]), np.concatenate([rois[k] for k in rk]), k=10)}
        plot_embeddings_2d({k: emb[k] for k in rk}, {k: rois[k] for k in rk}, roi_names,
                           run_dir / "results" / "embeddings_2d.png", seed=seed)
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
    add_column_atomic(table, "cluster", {k: v for k, v in labels.items() if k in in_table})
    with atomic_path(run_dir / "results" / "clusters.json") as tmp:
        tmp.write_text(json.dumps(result, indent=2))
    return result


def plot_embeddings_2d(emb: Mapping[str, np.ndarray], rois: Mapping[str, np.ndarray],
                       roi_names: Mapping[int, str], path: str | Path, max_points: int = 4000,
                       seed: int = 0) -> Path:
    """PCA and t-SNE of the pooled embeddings in 2-D, coloured by ROI; written atomically as PNG.

    Parameters
    ----------
    emb : {pair: (n_voxels, E)}; compared as in :func:`embedding_features`
    rois : {pair: int (n_voxels,)}, 0 = no ROI (grey)
    max_points : random subset for t-SNE and plotting (t-SNE is quadratic in the points)
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    from brainenc.data.store import atomic_path

    keys = list(emb)
    x = embedding_features(np.concatenate([emb[k] for k in keys]))
    r = np.concatenate([rois[k] for k in keys])
    rng = np.random.default_rng(seed)
    sel = rng.permutation(len(x))[:max_points]
    x, r = x[sel], r[sel]
    pcs = PCA(n_components=min(50, x.shape[1]), random_state=seed).fit_transform(x)
    views = {"PCA (first 2 components)": pcs[:, :2],
             "t-SNE (of the first 50 PCs)": TSNE(2, init="pca", random_state=seed,
                                                  perplexity=30).fit_transform(pcs)}
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    cmap = plt.get_cmap("tab10")
    for ax, (title, xy) in zip(axes, views.items()):
        for i, v in enumerate(sorted(set(r.tolist()))):
            m = r == v
            ax.scatter(xy[m, 0], xy[m, 1], s=3, alpha=0.6, label=roi_names.get(v, "none" if v == 0 else str(v)),
                       color="0.6" if v == 0 else cmap(i % 10))
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[1].legend(markerscale=4, fontsize=8, loc="best")
    fig.suptitle(f"voxel embeddings of {len(keys)} subjects ({len(x)} voxels), coloured by ROI")
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
    ap.add_argument("--merge-types", nargs="*", default=None,
                    help="true type names to count as one in the extra score ari_merged (e.g. V1 V2 V3)")
    a = ap.parse_args(argv)
    res = cluster_run(a.run_dir, a.ckpt, a.n_clusters, a.method, a.seed, merge_types=a.merge_types)
    print(json.dumps({k: res[k] for k in ("ari", "ari_merged", "nn_same_roi", "sizes") if k in res}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

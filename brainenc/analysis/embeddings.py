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

from brainenc.analysis.embedding_space import (attention_centres, ari_table, cluster_embeddings,
                                               embedding_features, embedding_structure, nn_same_label,
                                               position_basis, true_voxel_types)
from brainenc.analysis.type_information import type_information_of


def cluster_run(run_dir: str | Path, ckpt: Optional[str | Path] = None, n_clusters: int = 7,
                method: str = "kmeans", seed: int = 0, extra_embeddings: Optional[str | Path] = None,
                merge_types: Optional[list[str]] = None, control: str = "position",
                n_probe_images: int = 256, type_information: bool = True) -> dict:
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
    type_information : also score the supervised reference of :func:`type_information_of` (where
        the store has truth): how much of the true types the embeddings and the measured
        responses hold at all
    Returns
    -------
    dict: ARI per pair and pooled (all voxels, and signal voxels only) of the written clusters,
    ``uncontrolled`` / ``position_controlled`` pooled scores of both clusterings, cluster sizes,
    the fraction of embedding-space nearest neighbours in the same ROI (first ROI atlas), and
    ``results/embeddings_2d.png`` (PCA and t-SNE coloured by ROI, as they are and with position
    regressed out)
    """
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
    data_config = _data_config(run_dir)
    stores = _stores_of(data_config)
    missing = sorted({k.split("/")[0] for k in keys} - set(stores))
    if missing:
        raise ValueError(f"{run_dir / 'results' / 'config.yaml'}: no readable store for dataset(s) {missing} "
                         "(data.stores); the position control reads their images - pass control='none' "
                         "(--control none) to cluster without it")
    probe_features = {}  # per dataset: the subjects of one store share its probe images
    for ds in sorted({k.split("/")[0] for k in keys}):
        store = stores[ds]
        rows = np.unique(np.linspace(0, store.n_stimuli - 1, min(n_probe_images, store.n_stimuli)).astype(np.int64))
        probe_features[ds] = base.readout.prepare(base.features_of_rows(store, rows))
    centres = {k: attention_centres(base.readout, k, probe_features[k.split("/")[0]]) for k in keys}
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
        info = stores[ds].subject(s)
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
        nn = {"uncontrolled": nn_same_label(x_all[sel], r_all, k=10),
              "position_controlled": nn_same_label(x_all[sel], r_all, k=10, control=basis[sel])}
        result["nn_same_roi"] = {"k": 10, "fraction": nn["uncontrolled"],
                                 "fraction_position_controlled": nn["position_controlled"]}
        for name in nn.keys() & result.keys():
            result[name]["nn_same_roi"] = nn[name]
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
        if type_information:
            result["type_information"] = type_information_of(
                {k: emb[k] for k in scored}, truth, stores, data_config, seed=seed)
    add_column(run_dir, "cluster", {k: v for k, v in labels.items() if k in in_table})
    with atomic_path(run_dir / "results" / "clusters.json") as tmp:
        tmp.write_text(json.dumps(result, indent=2))
    return result


def _data_config(run_dir: Path) -> dict:
    cfg = run_dir / "results" / "config.yaml"
    return (yaml.safe_load(cfg.read_text()).get("data") or {}) if cfg.exists() else {}


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

    Logs ``embed/ari``, ``embed/ari_signal``, ``embed/nn_same_roi``, ``embed/rel_displacement``,
    ``embed/ari_learned`` and, with ``n_probe_images`` > 0, ``embed/ari_position_controlled`` and
    ``embed/nn_same_roi_position_controlled`` (see :func:`embedding_structure`) for the pairs
    whose store has simbrain's ``truth/voxel_type``; ROI labels for the neighbour score come from
    the first ROI atlas of each subject. Does nothing for other readouts or stores without truth.

    Parameters
    ----------
    n_clusters : k-means clusters (simbrain: 7 voxel types)
    k : neighbours for ``nn_same_roi``
    every_n_epochs : score after every n-th validation (k-means of a few thousand voxels takes
        seconds)
    n_probe_images : images per store from which the receptive-field centres of the position
        control are read (:func:`attention_centres`; fewer than the analysis' 256 to keep the
        probe cheap); 0 logs the uncontrolled scores only
    """

    def __init__(self, n_clusters: int = 7, k: int = 10, every_n_epochs: int = 1, n_probe_images: int = 64):
        self.n_clusters, self.k, self.every_n_epochs = n_clusters, k, every_n_epochs
        self.n_probe_images = int(n_probe_images)
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

    def _centres(self, trainer, pl_module, readout) -> dict:
        """{pair: (n_voxels, 2)} receptive-field centres on ``n_probe_images`` of each store."""
        import torch

        pairs = [p for p in trainer.datamodule.pairs if p.key in self._truth["types"]]
        prepared, out = {}, {}
        with torch.no_grad():
            for p in pairs:
                if p.store.root not in prepared:  # the subjects of one store share its probe images
                    n = min(self.n_probe_images, p.store.n_stimuli)
                    rows = np.unique(np.linspace(0, p.store.n_stimuli - 1, n).astype(np.int64))
                    prepared[p.store.root] = readout.prepare(pl_module.features_of_rows(p.store, rows))
                out[p.key] = attention_centres(readout, p.key, prepared[p.store.root])
        return out

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
        centres = self._centres(trainer, pl_module, r) if self.n_probe_images > 0 else None
        res = embedding_structure(emb, self._truth["types"], self._truth["rois"], self._initial,
                                  self.n_clusters, self.k, centres=centres)
        for name, v in res.items():
            pl_module.log(f"embed/{name}", v, sync_dist=False)


def torch_load(path):
    """{name: Tensor} of a torch.save file, read without unpickling (a clear error names a bad file)."""
    from brainenc.lit.checkpoint import load_state_dict

    return load_state_dict(path, "a torch.save file of {name: Tensor}")


def _stores_of(data_config: Mapping) -> dict:
    """{dataset name: opened :class:`~brainenc.data.store.Store`} of the run's ``data.stores``,
    opened once for the probe images, the truth and the supervised reference."""
    from brainenc.data.store import Store

    out = {}
    for d in data_config.get("stores") or []:
        try:
            store = Store(d, validate=False)
            out[store.name] = store
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
    ap.add_argument("--no-type-information", action="store_true",
                    help="skip the supervised reference (types read by a classifier from the embeddings "
                         "and from the measured responses)")
    a = ap.parse_args(argv)
    res = cluster_run(a.run_dir, a.ckpt, a.n_clusters, a.method, a.seed, merge_types=a.merge_types,
                      control=a.control, type_information=not a.no_type_information)
    print(json.dumps({k: res[k] for k in ("ari", "uncontrolled", "position_controlled", "ari_merged",
                                          "type_information", "nn_same_roi", "sizes") if k in res}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

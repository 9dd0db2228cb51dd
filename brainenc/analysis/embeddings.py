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


def cluster_embeddings(emb: np.ndarray, n_clusters: int = 7, method: str = "kmeans", seed: int = 0,
                       standardise: bool = True) -> np.ndarray:
    """Cluster rows of ``emb`` (n_voxels, E); returns int labels (n_voxels,).

    ``standardise`` z-scores each embedding dimension first, so no single dimension with a large
    spread decides the partition (the embedding's scale carries no meaning of its own).
    """
    from sklearn.cluster import KMeans
    from sklearn.mixture import GaussianMixture

    x = np.asarray(emb, dtype=np.float64)
    if standardise:
        x = (x - x.mean(0)) / np.maximum(x.std(0), 1e-12)
    if method == "kmeans":
        return KMeans(n_clusters, n_init=4, random_state=seed).fit_predict(x)
    if method == "gmm":
        # a full covariance in 256-d is ill-posed for a few thousand voxels; diagonal is enough
        return GaussianMixture(n_clusters, covariance_type="diag", random_state=seed).fit_predict(x)
    raise ValueError(f"cluster_embeddings: method must be 'kmeans' or 'gmm', got {method!r}")


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
                method: str = "kmeans", seed: int = 0, extra_embeddings: Optional[str | Path] = None) -> dict:
    """Cluster a universal run's embeddings (all pairs pooled), write ``cluster`` and the ARI.

    Parameters
    ----------
    run_dir : run directory with ``results/voxels.csv`` (from ``brainenc test``)
    ckpt : checkpoint (default ``<run_dir>/checkpoints/last.ckpt``)
    extra_embeddings : a transfer run's ``transfer/embeddings.pt`` ({pair: (n_voxels, E)}), clustered
        together with the base embeddings so its labels share their meaning
    Returns
    -------
    dict: ARI per pair and pooled (all voxels, and signal voxels only), cluster sizes
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
    truth, signal, names = {}, {}, {}
    for k in keys:
        ds, s = k.split("/")
        if ds in stores:
            t, names = true_voxel_types(Store(stores[ds]).subject(s).path)
            truth[k] = t
            signal[k] = t != 0  # 0 = "noise" voxels, no stimulus-driven signal
    scored = {k: labels[k] for k in keys if k in truth}
    result = {"method": method, "n_clusters": n_clusters, "voxel_types": names,
              "ari": ari_table(scored, truth, signal) if scored else {},
              "sizes": np.bincount(labels_all, minlength=n_clusters).tolist()}
    if scored:
        # which true type dominates each cluster (for reading the map)
        t_all = np.concatenate([truth[k] for k in scored])
        l_all = np.concatenate([scored[k] for k in scored])
        ct = pd.crosstab(l_all, t_all)
        result["contingency"] = {int(c): {names.get(int(t), str(t)): int(n) for t, n in row.items()}
                                 for c, row in ct.iterrows()}
    add_column_atomic(table, "cluster", {k: v for k, v in labels.items() if k in in_table})
    with atomic_path(run_dir / "results" / "clusters.json") as tmp:
        tmp.write_text(json.dumps(result, indent=2))
    return result


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
    a = ap.parse_args(argv)
    res = cluster_run(a.run_dir, a.ckpt, a.n_clusters, a.method, a.seed)
    print(json.dumps({"ari": res["ari"], "sizes": res["sizes"]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

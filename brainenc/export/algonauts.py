"""Algonauts 2023 submission files from a run trained on an Algonauts store.

``brainenc algonauts-submission RUN --out DIR`` writes, for every subject of the run whose store
was imported from the challenge data (``brainenc prepare algonauts2023``)::

    DIR/subjNN/lh_pred_test.npy   float32 (n_test_images, n_lh_challenge_vertices)
    DIR/subjNN/rh_pred_test.npy   float32 (n_test_images, n_rh_challenge_vertices)

rows in the challenge's test-image order (``test-0001`` first), columns in its vertex order, as
the challenge's submission expects.  Both orders come from what the importer recorded in the
subject file (``challenge/test_stimulus``, ``voxels/hemi``, ``voxels/vertex``; see
``brainenc.data.importers.algonauts``).  A store imported with an ROI subset is refused: a
submission needs every challenge vertex.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

import h5py
import numpy as np

from brainenc.data.store import StoreError
from brainenc.ioutil import atomic_path

HEMIS = ("lh", "rh")


def challenge_layout(path: Path) -> Optional[dict]:
    """What a subject file says about the challenge, or None for a non-Algonauts subject.

    Returns {"test_stimulus": int64 (n_test,), "columns": {"lh": int (n_lh,), "rh": int (n_rh,)}}:
    the voxel (column) indices of each hemisphere in challenge vertex order.
    Raises StoreError when the store cannot give a complete submission.
    """
    with h5py.File(path, "r") as f:
        if "challenge" not in f:
            return None
        g = f["challenge"]
        if str(g.attrs.get("roi", "")) != "all":
            raise StoreError(path, "challenge/attrs/roi", "a store imported with every challenge vertex "
                             "(brainenc prepare algonauts2023 without --roi): a submission needs them all",
                             repr(str(g.attrs.get("roi"))))
        n_expected = np.asarray(g.attrs["n_vertices"], np.int64)
        hemi, vertex = f["voxels/hemi"][()], f["voxels/vertex"][()]
        test = g["test_stimulus"][()].astype(np.int64)
    columns = {}
    for h_i, h in enumerate(HEMIS):
        cols = np.flatnonzero(hemi == h_i)
        if len(cols) != n_expected[h_i]:
            raise StoreError(path, "voxels/hemi", f"{n_expected[h_i]} {h} challenge vertices", str(len(cols)))
        if len(cols) > 1 and (np.diff(vertex[cols]) <= 0).any():
            raise StoreError(path, "voxels/vertex", f"{h} vertices in increasing fsaverage order (the "
                             "challenge's order)", "another order")
        columns[h] = cols
    if len(test) == 0:
        raise StoreError(path, "challenge/test_stimulus", "the challenge's test images", "none")
    return {"test_stimulus": test, "columns": columns}


def predict_challenge(model, store, pair: str, rows: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Predictions float32 (len(rows), n_voxels) of stimulus ``rows`` of ``store`` in the given
    order (read in sorted order, through the feature cache for a frozen backbone)."""
    import torch

    uniq, inv = np.unique(rows, return_inverse=True)
    out = []
    with torch.no_grad():
        for a in range(0, len(uniq), batch_size):
            feats = model.features_of_rows(store, torch.from_numpy(uniq[a:a + batch_size]))
            out.append(model.predict_all(feats, pair).float().cpu().numpy())
    return np.concatenate(out)[inv.ravel()]


def write_submission(model, dm, out: Path, batch_size: int = 64) -> list[Path]:
    """Write the submission files of every Algonauts subject of ``dm``'s pairs; returns the paths."""
    written = []
    for p in dm.pairs:
        layout = challenge_layout(p.info.path)
        if layout is None:
            continue
        pred = predict_challenge(model, p.store, p.key, layout["test_stimulus"], batch_size)
        for h in HEMIS:
            path = Path(out) / p.info.subject / f"{h}_pred_test.npy"
            with atomic_path(path) as tmp:
                with open(tmp, "wb") as fh:
                    np.save(fh, np.ascontiguousarray(pred[:, layout["columns"][h]], dtype=np.float32))
            written.append(path)
    if not written:
        raise StoreError(", ".join(str(p.store.root) for p in dm.pairs), "challenge",
                         "a subject imported from the Algonauts 2023 challenge data (brainenc prepare "
                         "algonauts2023, which records the test images' order)", "none among the run's subjects")
    return written


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="brainenc algonauts-submission", description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a tested run directory (results/config.yaml, checkpoints/)")
    ap.add_argument("--out", type=Path, required=True, help="folder to write subjNN/{lh,rh}_pred_test.npy into")
    ap.add_argument("--config", type=Path, default=None, help="the run's config (default RUN/results/config.yaml)")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args(argv)
    from brainenc.cli import load_trained

    config = args.config or args.run / "results" / "config.yaml"
    if not config.exists():
        raise StoreError(config, "<file>", "the run's resolved config (test the run first: brainenc test, "
                         "or fit --test_after_fit=true; or give --config)", "missing")
    model, dm = load_trained(args.run, config)
    for path in write_submission(model, dm, args.out, args.batch_size):
        print(path)
    return 0

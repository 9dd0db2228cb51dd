"""Transfer a trained universal (crowd-of-brains) encoder to a subject it never saw.

Everything the crowd learned is frozen: the backbone, the attention, the readout maps and every
base voxel embedding.  The new subject gets its own embedding table, the only trainable tensor,
so the base model is untouched by construction (and checked: ``base_fingerprint``).

New embeddings can start from

* ``random``: drawn like the base table;
* ``coords``: the mean embedding of the ``k`` nearest voxels (by 3-D coordinate) of reference
  subjects in the same space (default: the base subjects of the new subject's dataset);
* ``fit``: a short first fit from random, after which each voxel moves to the mean of its ``k``
  nearest base embeddings (cosine similarity) — it keeps what the few images said about it but
  lands on the manifold the crowd populated.

Command line::

    brainenc transfer --base runs/universal/holdout/checkpoints/last.ckpt \\
        --store data/simbrain-quickstart/simbrain7t --subject simbrain7t/subj03 \\
        --n-images 100 --init coords --out runs/universal/transfer/n100
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pickle
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from brainenc.ioutil import atomic_path, atomic_write
from brainenc.models.universal import UniversalReadout
from brainenc.rundir import RunDir

INIT_MODES = ("random", "coords", "fit")


class TransferError(ValueError):
    """A transfer that cannot run as asked (the subject is already in the base model, a wrong
    image size, a reference that is not there); the CLI prints it as one line."""

    input_error = True


def base_fingerprint(module) -> dict[str, str]:
    """sha256 of every base tensor (parameters and buffers) outside the new embedding tables."""
    out = {}
    for name, t in module.state_dict().items():
        if ".new_embedding." in f".{name}":
            continue
        out[name] = hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
    return out


def load_base(ckpt: str | Path):
    """The crowd EncoderModule from a checkpoint written by ``brainenc fit``, or from a run
    directory's :meth:`~brainenc.rundir.RunDir.checkpoint` (best, else last); on CPU, frozen, eval."""
    from brainenc.lit.encoder_module import EncoderModule

    ckpt = Path(ckpt)
    if ckpt.is_dir():  # a run directory: the checkpoint its test used
        ckpt = RunDir(ckpt).require_checkpoint()
    if not ckpt.exists():
        raise TransferError(f"--base {ckpt}: expected a checkpoint or run directory of a universal model, found no such file")
    try:
        base = EncoderModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # an object in the file: refused by torch, never run
        from brainenc.lit.checkpoint import CheckpointError

        raise CheckpointError(ckpt, "<pickle>", "a checkpoint written by brainenc fit (tensors and plain "
                              "values; brainenc never unpickles objects)",
                              (str(e).strip().splitlines() or [""])[0][:200]) from None
    if not isinstance(base.readout, UniversalReadout):
        raise TransferError(f"{ckpt}: readout is {type(base.readout).__name__}; transfer needs a UniversalReadout")
    base.requires_grad_(False)
    base.eval()
    return base


def coords_init(readout: UniversalReadout, coords: np.ndarray, reference: dict[str, np.ndarray],
                k: int = 8) -> Tensor:
    """Mean embedding of the ``k`` nearest reference voxels of each new voxel.

    Parameters
    ----------
    coords : float (n_new, 3) coordinates of the new subject's voxels (mm)
    reference : {pair: coords (n_voxels, 3)} base pairs in the same space
    Returns
    -------
    Tensor (n_new, E)
    """
    from scipy.spatial import cKDTree

    if not reference:
        raise TransferError("coords init: no reference subjects in the base model")
    ref_xyz = np.concatenate([reference[p] for p in reference])
    ref_emb = torch.cat([readout.embeddings(p).detach().cpu() for p in reference])
    _, idx = cKDTree(ref_xyz).query(np.asarray(coords, dtype=np.float64), k=min(k, len(ref_xyz)))
    idx = torch.as_tensor(np.asarray(idx).reshape(len(coords), -1))
    return ref_emb[idx].mean(dim=1)


def neighbour_init(readout: UniversalReadout, emb: Tensor, k: int = 8, chunk: int = 2048) -> Tensor:
    """Mean of the ``k`` most similar (cosine) base embeddings of each row of ``emb`` (n, E) -> (n, E)."""
    base = readout.embedding.detach().cpu()
    bn = torch.nn.functional.normalize(base, dim=1)
    out = []
    for a in range(0, len(emb), chunk):
        q = torch.nn.functional.normalize(emb[a:a + chunk].detach().cpu(), dim=1)
        top = (q @ bn.t()).topk(min(k, len(base)), dim=1).indices
        out.append(base[top].mean(dim=1))
    return torch.cat(out)


def _trainer(out: Path, epochs: int, limit_train_batches=None, limit_val_batches=None):
    import lightning as L

    return L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, default_root_dir=str(out),
                     logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0,
                     # nothing is selected on validation here, so validate once, at the end
                     check_val_every_n_epoch=max(1, epochs),
                     limit_train_batches=limit_train_batches, limit_val_batches=limit_val_batches)


def transfer(base_ckpt: str | Path, stores: Sequence[str], subject: str, out: str | Path,
             n_images: Optional[int] = None, init: str = "random", k: int = 8,
             reference: Optional[Sequence[str]] = None, epochs: int = 10, init_epochs: int = 2,
             lr: Optional[float] = None, batch_size: int = 32, voxels_per_step: Optional[int] = None,
             image_size: Optional[int] = None, seed: int = 0, limit_train_batches=None,
             limit_val_batches=None, return_model: bool = False):
    """Fit new embeddings for ``subject`` on a frozen crowd model and test them.

    Parameters
    ----------
    base_ckpt : checkpoint (or run directory) of a UniversalReadout EncoderModule
    stores : store directories holding ``subject`` (and, for ``coords``, the reference subjects)
    subject : "dataset/subject" of the new pair; must not be in the base model
    out : run directory; gets ``results/`` (voxels.csv, summary.json) and ``transfer/``
    n_images : training images of the new subject (datamodule ``train_limit``), None = all
    init : one of :data:`INIT_MODES`
    k : neighbours averaged for ``coords`` / ``fit`` initialisation
    reference : base pairs used by ``coords`` (default: base pairs of the subject's dataset)
    epochs, init_epochs : epochs of the main fit and of the short first fit (``fit``)
    lr : learning rate of the new embeddings (default: the base model's ``lr``, the rate its own
        table was trained at; the new rows live at the same scale, so a larger rate overshoots:
        measured 1e-2 vs the base's 3e-3 on the quickstart, r/oracle 0.817 vs 0.868 with 50 images)
    return_model : also return the trained EncoderModule (base parts frozen)
    Returns
    -------
    dict (also written to ``out/transfer/summary.json``): median r, retrieval, settings;
    with ``return_model``, ``(dict, module)``
    """
    import lightning as L

    from brainenc.data.datamodule import BrainDataModule
    from brainenc.lit.encoder_module import EncoderModule

    if init not in INIT_MODES:
        raise TransferError(f"transfer: init must be one of {INIT_MODES}, got {init!r}")
    out = Path(out)
    L.seed_everything(seed, workers=True, verbose=False)
    base = load_base(base_ckpt)
    readout: UniversalReadout = base.readout
    if readout.has_pair(subject):
        raise TransferError(f"transfer: --subject {subject!r} is already in the base model {base_ckpt} "
                            f"({', '.join(readout.pairs)}); transfer is to a subject the base never saw: "
                            "choose another subject, or fit a base run without it (--data.subjects)")
    before = base_fingerprint(base)
    hp = base.hparams
    if lr is None:
        lr = float(base.lr)
    size = base.backbone.image_size  # the base backbone was built for its image size
    if image_size not in (None, size):
        raise TransferError(f"transfer: --image-size {image_size}: the base model's backbone takes {size} px "
                         f"images ({base_ckpt}); leave --image-size out")
    dm = BrainDataModule(stores=list(stores), subjects=[subject], image_size=size, batch_size=batch_size,
                         eval_batch_size=128, train_limit=n_images, seed=seed)
    dm.setup()
    pair = dm.pair(subject)
    n_vox = pair.info.n_voxels

    start = None
    if init == "coords":
        ref_pairs = list(reference) if reference else [p for p in readout.pairs
                                                        if p.split("/")[0] == pair.info.dataset]
        ref = {}
        for key in ref_pairs:
            if key not in readout.offsets:
                raise TransferError(f"transfer: reference {key!r} is not in the base model {readout.pairs}")
            ds, s = key.split("/")
            info = _find_subject(stores, ds, s)
            if info.space != pair.info.space:
                raise TransferError(f"transfer: reference {key} is in space {info.space!r}, "
                                 f"{subject} in {pair.info.space!r}; coords init needs one space")
            ref[key] = info.coords
        start = coords_init(readout, pair.info.coords, ref, k)

    # reuse the base run's on-disk feature cache (frozen backbone: same features for the new subject)
    cache = {"feature_cache": base.feature_cache} if getattr(base, "feature_cache", None) is not None else {}

    def module(init_emb):
        readout.add_pair(subject, n_vox, init_emb)
        return EncoderModule(backbone=base.backbone, readout=lambda counts, spec: readout,
                             voxel_counts={subject: n_vox}, loss=base.loss_fn, lr=lr, weight_decay=0.0,
                             warmup_fraction=0.0, voxels_per_step=voxels_per_step or hp.get("voxels_per_step"),
                             eval_voxel_chunk=hp.get("eval_voxel_chunk"), model_name="universal_transfer",
                             **cache)

    from brainenc.lit.progress import quiet_lightning

    # the console as `brainenc fit` keeps it; the whole base model (backbone and readout) is
    # frozen in eval mode on purpose, only the new subject's embeddings train
    with quiet_lightning(eval_mode_intended=True):
        if init == "fit":
            first = module(None)
            _trainer(out / "transfer" / "first_fit", init_epochs, limit_train_batches, 0).fit(first, datamodule=dm)
            fitted = readout.new_embedding.pop(_slot(subject)).detach()
            start = neighbour_init(readout, fitted, k)

        model = module(start)
        trainer = _trainer(out, epochs, limit_train_batches, limit_val_batches)
        trainer.fit(model, datamodule=dm)
        trainer.test(model, datamodule=dm, verbose=False)

    after = base_fingerprint(base)
    changed = sorted(n for n in before if before[n] != after.get(n))
    if changed:  # cannot happen with requires_grad off; fail loudly if it ever does
        raise RuntimeError(f"transfer changed base weights: {changed[:5]}")
    tdir = out / "transfer"
    with atomic_path(tdir / "embeddings.pt") as tmp:
        torch.save({subject: readout.new_embedding[_slot(subject)].detach().cpu()}, tmp)
    r = model.test_results["pearson"][subject]
    summary = {"base": str(base_ckpt), "subject": subject, "n_images": n_images,
               "n_train_images": int(len(pair.split.train)), "init": init, "k": k, "epochs": epochs, "lr": lr,
               "pearson_median": float(np.nanmedian(r)), "base_unchanged": True,
               "retrieval": {kk: float(v) for kk, v in model.test_results["retrieval"][subject].items()}}
    atomic_write(tdir / "summary.json", json.dumps(summary, indent=2))
    return (summary, model) if return_model else summary


def _slot(pair: str) -> str:
    from brainenc.models.readout import pair_slot

    return pair_slot(pair)


def _find_subject(stores: Sequence[str], dataset: str, subject: str):
    from brainenc.data.store import Store

    for d in stores:
        st = Store(d)
        if st.name == dataset and subject in st.subjects:
            return st.subject(subject)
    raise TransferError(f"transfer: reference {dataset}/{subject} not found in stores {list(stores)}; "
                     "pass its store with --store")


def main_transfer(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="brainenc transfer", description=(
        "Transfer a trained universal (crowd-of-brains) encoder to a new subject: freeze the base "
        "model, fit only the new subject's voxel embeddings, write the per-voxel results table."))
    ap.add_argument("--base", required=True, help="base checkpoint (.ckpt) or run directory")
    ap.add_argument("--store", action="append", required=True,
                    help="store directory with the new subject (repeat for reference stores)")
    ap.add_argument("--subject", required=True, help='new pair, "dataset/subject"')
    ap.add_argument("--out", required=True, help="run directory for results/ and transfer/")
    ap.add_argument("--n-images", type=int, default=None, help="training images of the new subject (default all)")
    ap.add_argument("--init", choices=INIT_MODES, default="random")
    ap.add_argument("--k", type=int, default=8, help="neighbours averaged by coords/fit initialisation")
    ap.add_argument("--reference", nargs="*", default=None, help="reference base pairs for --init coords")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--init-epochs", type=int, default=2, help="epochs of the first fit (--init fit)")
    ap.add_argument("--lr", type=float, default=None,
                    help="learning rate of the new embeddings (default: the base model's lr)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--voxels-per-step", type=int, default=None)
    ap.add_argument("--image-size", type=int, default=None,
                    help="the base backbone's image size (the only one it takes; may be left out)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit-train-batches", type=float, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    ltb = a.limit_train_batches
    if ltb is not None and ltb >= 1:
        ltb = int(ltb)
    s = transfer(a.base, a.store, a.subject, a.out, n_images=a.n_images, init=a.init, k=a.k,
                 reference=a.reference, epochs=a.epochs, init_epochs=a.init_epochs, lr=a.lr,
                 batch_size=a.batch_size, voxels_per_step=a.voxels_per_step, image_size=a.image_size,
                 seed=a.seed, limit_train_batches=ltb)
    print(json.dumps(s, indent=2))
    return 0

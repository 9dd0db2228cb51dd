"""Ridge baseline: closed-form fit of a linear readout with himalaya (per-voxel alpha by CV).

It is an :class:`EncoderModule` whose "training" epoch only collects frozen-feature regressors
(globally pooled, or pooled to a k x k grid per level, optionally reduced); the solve happens
once, after the first epoch, and writes the weights into a
:class:`~brainenc.models.ridge.RidgeReadout`, so validation, testing and the results table are
shared code with the other encoders.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from brainenc.features.cache import FeatureCache
from brainenc.models.backbones import Backbone
from brainenc.models.readout import pair_slot
from brainenc.models.ridge import RidgeReadout
from .encoder_module import EncoderModule, _object_args

LIGHTNING_NO_OPTIMIZER_WARNING = r"`LightningModule.configure_optimizers` returned `None`"


class RidgeModule(EncoderModule):
    """Frozen features -> himalaya ``RidgeCV`` (or ``BandedRidgeCV``) per (dataset, subject).

    The regressors are built by :class:`~brainenc.models.ridge.RidgeReadout`: each backbone level
    average-pooled to a k x k grid (k = 1: the global mean, the classic pooled baseline), optionally
    reduced per level (PCA fitted on the training images only, or a seeded random projection),
    standardised with the training rows' statistics.

    Parameters
    ----------
    alphas : candidate regularisation strengths (one is chosen per voxel by cross-validation; with
        ``banded``, the alpha grid of himalaya's random search)
    cv : number of cross-validation folds (contiguous folds of the training rows, which the loader
        shuffles; with the default ``data.train_unit: stimuli`` each row is one image, so an image's
        repeats never straddle folds)
    grid : k, or one k per backbone level: pool level l to a k_l x k_l grid (``adaptive_avg_pool2d``,
        capped at the level's own size). 1 = today's globally pooled ridge, unchanged
    reduce : None, "pca" or "random": per-level dimensionality reduction to ``n_components``
        (levels already at most that wide are kept)
    n_components : width of each reduced level
    banded : one regularisation per backbone level (himalaya ``BandedRidgeCV``, random search over
        the level weights, ``banded_iter`` candidates per alpha), instead of one alpha per voxel
    banded_iter : number of level-weight combinations tried by the random search
    seed : seeds the random projection, the randomized PCA and the banded random search
    solve_dtype : "float64" (default; today's numbers) or "float32", the precision of the stored
        regressors and responses and of the solve (float32 halves the memory at NSD scale)
    n_targets_batch : voxels solved at once inside himalaya (None = all); bounds the solver's
        per-voxel intermediates at large voxel counts

    Notes
    -----
    Memory: a training step stores only the pooled (and randomly projected) regressors of its
    images, (n_rows, sum band width) in float32, and their responses (n_rows, n_voxels); full maps
    are never kept: they stream from the feature cache batch by batch. PCA needs the unreduced
    pooled rows of the training images until it is fitted. Figures in docs/performance.md, section 5.
    """

    def __init__(self, backbone: Backbone, voxel_counts: Optional[dict[str, int]] = None,
                 alphas: Sequence[float] = tuple(np.logspace(-1, 7, 17).tolist()), cv: int = 5,
                 model_name: str = "ridge", feature_cache: Optional[FeatureCache] = None,
                 grid: Union[int, list[int]] = 1, reduce: Optional[str] = None, n_components: int = 512,
                 banded: bool = False, banded_iter: int = 20, seed: int = 0, solve_dtype: str = "float64",
                 n_targets_batch: Optional[int] = None):
        if not backbone.frozen:
            raise ValueError("RidgeModule: backbone.trainable must be 'frozen' (ridge fits fixed features)")
        if solve_dtype not in ("float64", "float32"):
            raise ValueError(f"RidgeModule: solve_dtype must be 'float64' or 'float32', got {solve_dtype!r}")
        factory = functools.partial(RidgeReadout, grid=grid, reduce=reduce, n_components=n_components, seed=seed)
        # no whitening: ridge solves each voxel separately in closed form, with no parameter shared
        # between voxels through which shared noise could spread (and without the penalty, one design
        # for all voxels makes generalised and ordinary least squares coincide)
        super().__init__(backbone, factory, voxel_counts=voxel_counts, model_name=model_name,
                         feature_cache=feature_cache, noise_whitening=False)
        self.save_hyperparameters(ignore=[k for k in _object_args() if k == "backbone"])
        self.alphas, self.cv = list(alphas), cv
        self.banded, self.banded_iter, self.seed = bool(banded), int(banded_iter), int(seed)
        self.solve_dtype, self.n_targets_batch = solve_dtype, n_targets_batch
        self.automatic_optimization = False
        self._store: dict[str, tuple[list, list]] = {}
        self.fit_info: dict[str, dict] = {}
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and self.trainer.world_size > 1:
            raise RuntimeError("RidgeModule fits in closed form on one process; run it without DDP "
                               "(--trainer.devices=1); the gradient-trained encoders scale out instead")
        # no optimiser on purpose (closed form); Lightning would call that out as a possible mistake.
        # The brainenc CLI scopes warning filters to its command (no global state left behind)
        warnings.filterwarnings("ignore", message=LIGHTNING_NO_OPTIMIZER_WARNING)

    def training_step(self, batch: dict, batch_idx: int) -> None:
        if bool(self.fitted):
            return None
        with torch.no_grad():
            bands = self.readout.bands(self.features(batch), reduce_pca=False)
        self.collect(batch["pair"], torch.cat(bands, dim=1), batch["responses"])
        return None

    def collect(self, pair: str, regressors: Tensor, responses: Tensor) -> None:
        """Keep one batch of training rows for the solve.

        Parameters
        ----------
        pair : "dataset/subject"
        regressors : (B, D) the concatenated ``RidgeReadout.bands(..., reduce_pca=False)``
        responses : (B, n_voxels)
        """
        # float32 keeps the exact values (features and responses arrive in float32), at half the
        # memory of float64; the solve casts to ``solve_dtype``
        xs, ys = self._store.setdefault(pair, ([], []))
        xs.append(regressors.detach().float().cpu().numpy())
        ys.append(responses.detach().float().cpu().numpy())

    def configure_optimizers(self):
        return None

    def on_validation_epoch_start(self) -> None:
        self._solve()

    def on_train_epoch_end(self) -> None:
        self._solve()

    def on_fit_end(self) -> None:
        # a closed-form fit takes no optimiser step, and ModelCheckpoint saves only after steps:
        # write the configured checkpoint files ourselves so `brainenc test --ckpt_path` works
        for cb in self.trainer.checkpoint_callbacks:
            if cb.dirpath is None or cb.best_model_path:
                continue
            names = [f"{cb.filename or 'best'}{cb.FILE_EXTENSION}"]
            if cb.save_last:
                names.append(f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}")
            for name in names:
                self.trainer.save_checkpoint(os.path.join(cb.dirpath, name))

    # ---------------------------------------------------------------- the closed-form fit
    def _stacked(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Per pair: regressors float32 (n_rows, D) and responses float32 (n_rows, n_voxels), built
        by releasing the batch lists as they are copied (no second full copy)."""
        xs_out, ys_out = {}, {}
        for key, (xs, ys) in self._store.items():
            for lists, out in ((xs, xs_out), (ys, ys_out)):
                n = sum(len(a) for a in lists)
                full = np.empty((n, lists[0].shape[1]), dtype=np.float32)
                i = 0
                while lists:
                    a = lists.pop(0)
                    full[i:i + len(a)] = a
                    i += len(a)
                out[key] = full
        self._store.clear()
        return xs_out, ys_out

    def _fit_pca(self, xs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Fit each reduced level's PCA on the training rows of every pair, write the components
        into the readout and return the reduced regressors."""
        from sklearn.decomposition import PCA

        readout: RidgeReadout = self.readout
        in_dims = [d_in if r else d_out for r, d_in, d_out in
                   zip(readout.reduced, readout.level_dims, readout.band_dims)]
        edges = np.concatenate([[0], np.cumsum(in_dims)])
        for level, reduced in enumerate(readout.reduced):
            if not reduced:
                continue
            rows = np.concatenate([x[:, edges[level]:edges[level + 1]] for x in xs.values()])
            k = readout.band_dims[level]
            if len(rows) < k:
                raise ValueError(f"RidgeModule: n_components={k} needs at least {k} training images, "
                                 f"got {len(rows)}; lower model.init_args.n_components")
            pca = PCA(n_components=k, svd_solver="randomized", random_state=self.seed).fit(rows)
            del rows
            getattr(readout, f"proj_{level}").copy_(torch.as_tensor(pca.components_.T.astype(np.float32)))
            getattr(readout, f"center_{level}").copy_(torch.as_tensor(pca.mean_.astype(np.float32)))
        out = {}
        for key in list(xs):
            x = xs.pop(key)
            parts = []
            for level, reduced in enumerate(readout.reduced):
                z = x[:, edges[level]:edges[level + 1]]
                if reduced:  # the readout's own formula, so training and evaluation agree
                    z = (z - getattr(readout, f"center_{level}").numpy()) @ getattr(readout, f"proj_{level}").numpy()
                parts.append(z.astype(np.float32, copy=False))
            out[key] = np.concatenate(parts, axis=1)
        return out

    def _standardiser(self, xs: dict[str, np.ndarray]) -> tuple[Tensor, Tensor]:
        """Mean and (biased) variance (D,) float64 over every pair's training rows."""
        if self.solve_dtype == "float64":
            # the pooled baseline's original computation, kept op for op so its numbers do not move
            xs_all = torch.cat([torch.from_numpy(x).double() for x in xs.values()])
            return xs_all.mean(0), xs_all.var(0, unbiased=False)
        # float32 mode: accumulate in float64 chunk by chunk instead of a float64 copy of all rows
        n, s, ss = 0, 0.0, 0.0
        for x in xs.values():
            for i in range(0, len(x), 4096):
                c = torch.from_numpy(x[i:i + 4096]).double()
                n, s, ss = n + len(c), s + c.sum(0), ss + (c * c).sum(0)
        mean = s / n
        return mean, (ss / n - mean * mean).clamp_min(0)

    def _solve(self) -> None:
        if bool(self.fitted) or not self._store:
            return
        readout: RidgeReadout = self.readout
        xs, ys = self._stacked()
        if readout.reduce == "pca" and any(readout.reduced):
            xs = self._fit_pca(xs)
        mean, var = self._standardiser(xs)
        # the readout's parameter-free BatchNorm standardises with these statistics at eval time
        readout.norm.running_mean.copy_(mean.float())
        readout.norm.running_var.copy_(var.float())
        sd = (var + readout.norm.eps).sqrt()
        dt = np.float64 if self.solve_dtype == "float64" else np.float32
        groups = np.repeat(np.arange(len(readout.band_dims)), readout.band_dims)
        batch = {} if self.n_targets_batch is None else {"n_targets_batch": int(self.n_targets_batch)}
        for key in list(xs):
            x_raw, y = xs.pop(key), ys.pop(key)
            if self.solve_dtype == "float64":
                x = ((torch.from_numpy(x_raw).double() - mean) / sd).numpy()
            else:
                x = ((torch.from_numpy(x_raw) - mean.float()) / sd.float()).numpy()
            del x_raw
            y = y.astype(dt, copy=False)
            y = np.where(np.isfinite(y), y, np.nanmean(y, axis=0, keepdims=True))
            y = np.nan_to_num(y)  # voxels with no finite value at all
            coef, intercept, model = self._fit(x, y, groups, dt, batch)
            del x, y
            readout.weight[pair_slot(key)].data.copy_(torch.as_tensor(coef, dtype=torch.float32).t())
            readout.bias[pair_slot(key)].data.copy_(torch.as_tensor(intercept, dtype=torch.float32))
            self.fit_info[key] = self._describe(model)
        self.fitted.fill_(True)

    def _fit(self, x: np.ndarray, y: np.ndarray, groups: np.ndarray, dt, batch: dict):
        """One pair's cross-validated ridge: x (n_rows, D) standardised, y (n_rows, n_voxels).

        Returns coef (D, n_voxels), intercept (n_voxels,) and the fitted himalaya model. With more
        regressors than rows (spatial grids on small datasets) the same ridge is solved in its dual
        form on linear kernels (n_rows x n_rows, one per band): himalaya's primal solvers build a
        (n_alphas, D, n_rows) matrix per fold, which at D = 7,936 and 1,500 rows took minutes and
        gigabytes; the kernel form costs an n_rows^2 eigendecomposition. The coefficients are then
        mapped back to the primal (``get_primal_coef``), so the readout is the same either way.
        """
        from himalaya.kernel_ridge import KernelRidgeCV, MultipleKernelRidgeCV
        from himalaya.ridge import BandedRidgeCV, RidgeCV

        alphas = np.asarray(self.alphas, dtype=dt)
        dual = x.shape[1] > x.shape[0]
        search = dict(alphas=alphas, n_iter=self.banded_iter, progress_bar=False, **batch)
        if self.banded and dual:
            bands = [x[:, groups == g] for g in np.unique(groups)]
            kernels = np.stack([b @ b.T for b in bands])
            model = MultipleKernelRidgeCV(kernels="precomputed", solver_params=search, cv=self.cv,
                                          fit_intercept=True, random_state=self.seed).fit(kernels, y)
            del kernels
            coef = np.concatenate([np.asarray(c) for c in model.get_primal_coef(bands)])
        elif self.banded:
            model = BandedRidgeCV(groups=groups, cv=self.cv, fit_intercept=True, random_state=self.seed,
                                  solver_params=search).fit(x, y)
            coef = np.asarray(model.coef_)
        elif dual:
            model = KernelRidgeCV(alphas=alphas, kernel="linear", cv=self.cv, fit_intercept=True,
                                  solver_params=batch or None).fit(x, y)
            coef = np.asarray(model.get_primal_coef())
        else:
            # (the pooled baseline's original call, unchanged)
            model = RidgeCV(alphas=np.asarray(self.alphas), cv=self.cv, fit_intercept=True,
                            solver_params=batch or None).fit(x, y)
            coef = np.asarray(model.coef_)
        return coef, np.asarray(model.intercept_), model

    def _describe(self, model) -> dict:
        """Chosen regularisation per voxel: ``alpha`` (n_voxels,) and, banded, the effective alpha
        of each band ``band_alpha`` (n_bands, n_voxels) = exp(-deltas) (himalaya scales band i by
        exp(deltas_i / 2) under a unit penalty, i.e. penalises its weights by exp(-deltas_i))."""
        if self.banded:
            deltas = np.asarray(model.deltas_, dtype=np.float64)
            return {"alpha": np.asarray(model.best_alphas_, dtype=np.float64), "band_alpha": np.exp(-deltas)}
        return {"alpha": np.asarray(model.best_alphas_, dtype=np.float64)}

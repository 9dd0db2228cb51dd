"""Shared trial noise: its low-rank structure across voxels, estimated from repeated images.

fMRI noise is not independent across voxels: global signal, physiology, head motion and slow
drifts move many voxels together.  Fitted by ordinary least squares, such noise is a coherent
target that every voxel's gradient agrees on, so a model component shared by all voxels (a
feature adapter, the pooled features) learns to reproduce it from the training images -- and
loses accuracy on new images (docs/results.md, "Training budget and correlated noise").  Generalised least squares
is the remedy: weigh the prediction error by the inverse noise covariance, so that directions in
which the noise is large count less.

The noise covariance is estimated from the training images shown more than once: per image, each
trial minus the image's mean trial (scaled by ``sqrt(n / (n - 1))`` so that it has the noise's
variance) is pure noise.  Its eigen-decomposition gives the noise factors; eigenvalues above the
Marchenko-Pastur edge of an independent-noise matrix of the same shape are kept (none on a brain
whose noise is independent across voxels, so the loss is then unchanged), the rest of the
spectrum sets the independent part ``s2``.  Everything is done on the standardised noise (each
voxel divided by its noise sd, so that a noisier voxel does not pass for a factor); the whitening
of a standardised residual ``z`` (voxels last) is

    W z = z - U (f * (U^T z)),      f_i = 1 - sqrt(s2 / lambda_i)

which scales the residual along factor ``i`` (noise variance ``lambda_i``) by ``sqrt(s2 /
lambda_i)`` and leaves the orthogonal complement alone: ``Sigma^(-1/2)`` up to the constant
``1 / sqrt(s2)``.
"""

from __future__ import annotations

from dataclasses import dataclass
import numpy as np
import torch
from torch import Tensor


@dataclass
class NoiseFactors:
    """The shared noise of one (dataset, subject) pair.

    The factors are those of the *standardised* noise (each voxel's noise divided by its sd), so
    that voxels with more noise do not pass for a shared factor; :func:`whiten` standardises the
    residual, whitens it and scales it back, so each voxel keeps its weight in the loss.

    Attributes
    ----------
    vectors : float32 (n_voxels, k) orthonormal noise directions of the standardised noise (k may be 0)
    variances : float32 (k,) standardised noise variance along each direction
    s2 : the independent (isotropic) part of the standardised noise variance per voxel
    sd : float32 (n_voxels,) each voxel's noise sd, in response units
    n_residuals : number of noise residuals the estimate rests on
    """

    vectors: np.ndarray
    variances: np.ndarray
    s2: float
    sd: np.ndarray
    n_residuals: int

    @property
    def k(self) -> int:
        return int(self.vectors.shape[1])

    def shrink(self) -> np.ndarray:
        """``f`` (k,): the fraction of the residual along each direction that whitening removes."""
        return (1 - np.sqrt(self.s2 / np.maximum(self.variances, self.s2))).astype(np.float32)

    def shared_fraction(self) -> float:
        """Fraction of the (standardised) noise variance carried by the kept factors."""
        total = float(self.variances.sum()) + self.s2 * (self.vectors.shape[0] - self.k)
        return float(self.variances.sum()) / total if total > 0 else 0.0


def noise_residuals(trials: np.ndarray, groups: list[np.ndarray]) -> np.ndarray:
    """Trial minus its image's mean, for every image with >= 2 trials.

    Parameters
    ----------
    trials : float (n_trials, n_voxels) single-trial responses
    groups : per image the row indices of its trials in ``trials``

    Returns
    -------
    float32 (n_residuals, n_voxels), scaled by ``sqrt(n / (n - 1))`` per image of ``n`` trials so
    that every residual has the noise's covariance; one residual per image is dropped (the
    residuals of an image sum to zero, so the last adds nothing)
    """
    out = []
    for g in groups:
        n = len(g)
        if n < 2:
            continue
        block = np.asarray(trials[g], dtype=np.float64)
        res = (block - block.mean(0)) * np.sqrt(n / (n - 1))
        out.append(res[:-1].astype(np.float32))
    if not out:
        return np.zeros((0, trials.shape[1]), np.float32)
    return np.nan_to_num(np.concatenate(out))


def estimate_noise_factors(residuals: np.ndarray, max_factors: int = 16, margin: float = 1.05) -> NoiseFactors:
    """Noise factors from noise residuals (n, V) (:func:`noise_residuals`).

    Each voxel's residuals are divided by their sd; the factors are the eigenvectors of the
    standardised residuals' covariance whose eigenvalue exceeds ``margin * s2 * (1 + sqrt(V /
    n))^2`` -- the largest eigenvalue an ``n x V`` sample of independent noise of variance ``s2``
    gives (Marchenko-Pastur) -- at most ``max_factors``; ``s2`` is the mean variance left outside
    the factors (a few fixed-point steps).  Fewer than 2 residuals give no factors.
    """
    n, v = residuals.shape
    sd = np.sqrt(np.mean(residuals ** 2, axis=0)) if n else np.ones(v)
    sd = np.where(sd > 0, sd, 1.0).astype(np.float32)
    if n < 2:
        return NoiseFactors(np.zeros((v, 0), np.float32), np.zeros(0, np.float32), 1.0, sd, n)
    z = residuals / sd
    _, sing, vt = np.linalg.svd(z, full_matrices=False)
    eig = sing ** 2 / n  # (min(n, V),), descending
    total = float((z ** 2).sum() / n)  # = V
    edge = margin * (1 + np.sqrt(v / n)) ** 2
    k, s2 = 0, total / v
    for _ in range(5):
        k = int(min(max_factors, np.sum(eig > s2 * edge)))
        s2 = max((total - float(eig[:k].sum())) / max(v - k, 1), 1e-12)
    return NoiseFactors(vt[:k].T.astype(np.float32), eig[:k].astype(np.float32), float(s2), sd, n)


def pair_noise_factors(pair, stimuli: np.ndarray, max_factors: int = 16, max_images: int = 2000,
                       seed: int = 0) -> NoiseFactors:
    """:func:`estimate_noise_factors` of a (dataset, subject) pair from its repeated ``stimuli``.

    Parameters
    ----------
    pair : :class:`~brainenc.data.datamodule.PairData`
    stimuli : int (n,) stimulus rows to use (the training split: the test images' noise stays unseen)
    max_images : use at most this many repeated images (a seeded random subset): a few thousand
        residuals pin down a handful of factors, and an NSD subject's 9,000 images x 3 repeats x
        15,000 voxels would not fit the setup's memory
    """
    import h5py

    stimuli = np.asarray(stimuli, dtype=np.int64)
    stimuli = stimuli[pair.n_repeats(stimuli) >= 2]
    if len(stimuli) > max_images:
        stimuli = np.sort(np.random.default_rng(seed).choice(stimuli, max_images, replace=False))
    groups = pair.trials_of(stimuli)
    if not groups:
        return estimate_noise_factors(np.zeros((0, pair.info.n_voxels)), max_factors)
    rows = np.sort(np.concatenate(groups))  # one increasing read (h5py's fancy indexing needs it)
    with h5py.File(pair.info.path, "r") as f:
        trials = np.asarray(f["responses"][rows], dtype=np.float32)
    local = [np.searchsorted(rows, g) for g in groups]  # each image's trials as rows of `trials`
    return estimate_noise_factors(noise_residuals(trials, local), max_factors)


def whiten(residual: Tensor, vectors: Tensor, shrink: Tensor, sd: Tensor) -> Tensor:
    """Down-weight the shared noise in residuals, keeping each voxel's scale.

    ``sd * (z - U (f * c))`` with ``z = r / sd`` and ``c`` the least-squares factor scores of
    ``z`` on ``U`` (``U^T z`` when ``U`` holds every voxel, so that its columns are orthonormal).

    Parameters
    ----------
    residual : Tensor (..., V) prediction errors (or predictions and targets alike: it is linear)
    vectors : Tensor (V, k) noise directions of these V voxels (rows of :attr:`NoiseFactors.vectors`,
        all of them or a subset of voxels)
    shrink : Tensor (k,) :meth:`NoiseFactors.shrink`
    sd : Tensor (V,) the voxels' noise sds
    """
    if vectors.shape[1] == 0:
        return residual
    z = residual / sd
    scores = (z @ vectors) @ torch.linalg.inv(vectors.t() @ vectors)  # (..., k)
    return (z - (scores * shrink) @ vectors.t()) * sd


def whiten_torch(factors: NoiseFactors) -> tuple[Tensor, Tensor, Tensor]:
    """(U (V, k), f (k,), sd (V,)) of ``factors`` as float32 tensors for :func:`whiten`."""
    return (torch.from_numpy(factors.vectors), torch.from_numpy(factors.shrink()),
            torch.from_numpy(np.asarray(factors.sd, np.float32)))

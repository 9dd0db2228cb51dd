"""Where images change size: once when an image file enters a store, once when stored pixels
become a model's input.

* :func:`to_rgb_square` — an image of any shape and type -> uint8 (S, S, 3), centre-cropped and
  resized (bicubic) to the store's side ``S``; importers and the AFO recipe's extra image folders
  write stores with it.
* :func:`to_input` — stored pixels uint8 (B, H, W, 3) -> float32 (B, 3, S, S) in [0, 1] at the
  side the backbone was built for (``Backbone.image_size``, linked from ``data.image_size``):
  bilinear, antialiased; :func:`read_images` (rows of a store's ``stimuli.h5``) is this rule
  applied to stored rows, and the datamodule, the feature cache and
  ``EncoderModule.features_of_rows`` read images with it.
* :func:`square_input` — the same rule for images that never entered a store (``brainenc predict
  --data.predict_images``: files, arrays): centre-cropped to a square at their own resolution
  (no resampling), then :func:`to_input`.  An image file at the store's side therefore reaches
  the model exactly as a stored stimulus does.
"""

from __future__ import annotations

import h5py
import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["read_images", "square_input", "to_input", "to_rgb_square"]


def to_rgb_square(img: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop to a square, resize and return uint8 (size, size, 3).

    ``img`` is (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), uint8 or float in [0, 1] / [0, 255].
    Cropping (rather than stretching) keeps object proportions as seen by the subject for the
    datasets whose images were square on screen.
    """
    from PIL import Image

    a = np.asarray(img)
    if a.dtype != np.uint8:
        a = a.astype(np.float64)
        if np.nanmax(a) <= 1.0 + 1e-6:
            a = a * 255.0
        a = np.clip(np.nan_to_num(a), 0, 255).round().astype(np.uint8)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise ValueError(f"image of shape {a.shape}: expected (H, W[, 1|3|4])")
    a = a[..., :3]
    h, w = a.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    a = a[top:top + s, left:left + s]
    if s != size:
        a = np.asarray(Image.fromarray(a).resize((size, size), Image.Resampling.BICUBIC))
    return np.ascontiguousarray(a, dtype=np.uint8)


def read_images(f: h5py.File, rows: np.ndarray, image_size: int) -> torch.Tensor:
    """Read sorted ``rows`` of a ``stimuli.h5``'s ``images`` and resize them to
    ``image_size`` (:func:`to_input`). Returns float32 (B, 3, S, S) in [0, 1]."""
    return to_input(f["images"][np.asarray(rows)], image_size)


def to_input(pixels: np.ndarray, image_size: int) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, 3, S, S) in [0, 1], resized to ``S = image_size``
    (bilinear, antialiased) when ``(H, W) != (S, S)``."""
    a = np.ascontiguousarray(pixels)
    imgs = torch.from_numpy(a if a.flags.writeable else a.copy()).permute(0, 3, 1, 2).float().div_(255.0)
    if imgs.shape[-1] != image_size or imgs.shape[-2] != image_size:
        imgs = F.interpolate(imgs, size=(image_size, image_size), mode="bilinear", antialias=True,
                             align_corners=False).clamp_(0, 1)
    return imgs


def square_input(img: np.ndarray, image_size: int) -> torch.Tensor:
    """One image that is not in a store (any shape and type :func:`to_rgb_square` takes) ->
    float32 (1, 3, S, S) in [0, 1]: centre-cropped to a square at its own resolution, then
    :func:`to_input`, so only one resampling happens, by the rule stored stimuli follow."""
    a = np.asarray(img)
    side = min(a.shape[:2]) if a.ndim >= 2 else 0
    if side < 1:
        raise ValueError(f"image of shape {a.shape}: expected (H, W[, 1|3|4]) with H, W >= 1")
    return to_input(to_rgb_square(a, side)[None], image_size)

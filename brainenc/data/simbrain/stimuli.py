"""Stimuli of the simulated brain: real photographs, recomposed, with known contents.

Every image is a random crop of a photograph that ships inside an installed package
(scikit-image, scikit-learn, matplotlib), rescaled, flipped and colour-jittered; into some images
we paste a real face (LFW subset in scikit-image), a texture that stands in for a scene surface
(brick, grass, gravel) or, as a control, a non-face LFW patch under the same oval mask as the
faces.  Where each was pasted is kept as a label, so face- and scene-selective voxels can be
driven by ground truth and models can be checked against it.

An image depends only on ``(seed, image id, image size)``, so the same id is the same picture in
every dataset of a preset.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image

# Photographs (scikit-image names, plus files found inside sklearn and matplotlib).
SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "camera",
                  "motorcycle", "clock")
TEXTURES = ("brick", "grass", "gravel")
# Tints that make the grey textures look like the surfaces they are (RGB gains).
TEXTURE_TINTS = {"brick": (1.05, 0.72, 0.58), "grass": (0.70, 0.98, 0.55), "gravel": (0.95, 0.90, 0.82)}
SKIN_TONES = np.array([[1.0, 0.84, 0.72], [0.92, 0.72, 0.58], [0.75, 0.56, 0.43], [1.0, 0.9, 0.82]])

LABEL_NAMES = {"face", "face_box", "face_id", "scene", "scene_box", "scene_texture", "nonface",
               "nonface_box", "source_photo", "crop", "flip"}


def _package_dir(name: str) -> Path:
    """Directory of an installed package, found without importing it (sklearn imports slowly)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"simbrain needs the package '{name}' for its sample photographs")
    return Path(list(spec.submodule_search_locations)[0])


# File names of the scikit-image sample photographs used here (read with Pillow, which is
# much faster than skimage.data's reader on first use).
SKIMAGE_FILES = {"astronaut": "astronaut.png", "coffee": "coffee.png", "chelsea": "chelsea.png",
                 "rocket": "rocket.jpg", "hubble_deep_field": "hubble_deep_field.jpg",
                 "camera": "camera.png", "motorcycle": "motorcycle_left.png",
                 "clock": "clock_motion.png", "brick": "brick.png", "grass": "grass.png",
                 "gravel": "gravel.png"}


def _skimage(name: str, mode: str = "RGB") -> np.ndarray:
    """A scikit-image sample image as uint8 (H, W, 3) for mode RGB or (H, W) for mode L."""
    path = _package_dir("skimage") / "data" / SKIMAGE_FILES[name]
    if path.exists():
        with Image.open(path) as im:
            return np.asarray(im.convert(mode))
    import skimage.data  # fall back to the official loader if the file layout ever changes

    img = skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skimage.data, name)()
    return _rgb(img) if mode == "RGB" else np.asarray(img)


def _rgb(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.dtype != np.uint8:
        img = (np.clip(img, 0, 1) * 255).astype(np.uint8) if img.max() <= 1 else img.astype(np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return np.ascontiguousarray(img[..., :3])


@functools.lru_cache(maxsize=1)
def photo_sources() -> tuple[tuple[str, np.ndarray], ...]:
    """All source photographs as ``(name, uint8 (H, W, 3))``, loaded once per process."""
    out = [(n, _rgb(_skimage(n))) for n in SKIMAGE_PHOTOS]
    sk = _package_dir("sklearn") / "datasets" / "images"
    mpl = _package_dir("matplotlib") / "mpl-data" / "sample_data"
    for path in (sk / "china.jpg", sk / "flower.jpg", mpl / "grace_hopper.jpg"):
        with Image.open(path) as im:
            out.append((path.stem, _rgb(np.asarray(im.convert("RGB")))))
    return tuple(out)


@functools.lru_cache(maxsize=4)
def _photos_at(size: int) -> tuple[Image.Image, ...]:
    """Photos pre-shrunk so their short side is 4x the output size: crops then resize cheaply."""
    out = []
    for _, arr in photo_sources():
        h, w = arr.shape[:2]
        s = 4 * size / min(h, w)
        im = Image.fromarray(arr)
        if s < 1:
            im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.LANCZOS)
        out.append(im)
    return tuple(out)


@functools.lru_cache(maxsize=1)
def _textures() -> tuple[np.ndarray, ...]:
    """Grey textures as float32 (512, 512) in [0, 1]."""
    return tuple(_skimage(n, "L").astype(np.float32) / 255 for n in TEXTURES)


@functools.lru_cache(maxsize=1)
def _lfw() -> tuple[np.ndarray, np.ndarray]:
    """(faces, non-faces): float32 (100, 25, 25) each; scikit-image ships faces first."""
    path = _package_dir("skimage") / "data" / "lfw_subset.npy"
    if path.exists():
        f = np.load(path).astype(np.float32)
    else:
        import skimage.data

        f = skimage.data.lfw_subset().astype(np.float32)
    return f[:100], f[100:]


def _oval(h: int, w: int) -> np.ndarray:
    """Soft elliptical alpha mask (h, w): faces are oval, so paste only the oval."""
    yy, xx = np.mgrid[:h, :w]
    r = np.sqrt(((xx + 0.5 - w / 2) / (0.46 * w)) ** 2 + ((yy + 0.5 - h / 2) / (0.52 * h)) ** 2)
    return np.clip((1.0 - r) * 4.0, 0, 1).astype(np.float32)


def _resize_grey(a: np.ndarray, h: int, w: int) -> np.ndarray:
    return np.asarray(Image.fromarray(a).resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32)


def _paste_patch(img, patch, rng, size):
    """Paste a grey 25x25 patch, colourised with a skin tone, under an oval mask at a random spot.

    Returns the box (x0, y0, x1, y1) in [0, 1] image coordinates (y down).
    """
    side = int(rng.integers(max(3, round(0.22 * size)), max(4, round(0.5 * size)) + 1))
    x0 = int(rng.integers(0, size - side + 1))
    y0 = int(rng.integers(0, size - side + 1))
    grey = _resize_grey(patch, side, side) / 255
    tone = SKIN_TONES[rng.integers(len(SKIN_TONES))] * rng.uniform(0.85, 1.1)
    rgb = np.clip(grey[..., None] * tone[None, None, :], 0, 1)
    alpha = _oval(side, side)[..., None]
    sl = img[y0:y0 + side, x0:x0 + side]
    img[y0:y0 + side, x0:x0 + side] = alpha * rgb + (1 - alpha) * sl
    return np.array([x0, y0, x0 + side, y0 + side], np.float32) / size


def _paste_texture(img, rng, size):
    """Cover a rectangle with a tinted texture: a ground band at the bottom or a free rectangle.

    Returns (texture index, box (x0, y0, x1, y1) in [0, 1]).
    """
    t = int(rng.integers(len(TEXTURES)))
    tex = _textures()[t]
    if rng.random() < 0.5:  # ground plane: a full-width band from some height to the bottom
        y0 = int(rng.integers(round(0.3 * size), round(0.75 * size)))
        x0, x1, y1 = 0, size, size
    else:
        bw = int(rng.integers(round(0.4 * size), size + 1))
        bh = int(rng.integers(round(0.4 * size), size + 1))
        x0 = int(rng.integers(0, size - bw + 1))
        y0 = int(rng.integers(0, size - bh + 1))
        x1, y1 = x0 + bw, y0 + bh
    # texture scale: a crop of 96-384 source pixels across the image width
    c = int(rng.integers(96, 385))
    cx, cy = rng.integers(0, tex.shape[1] - c + 1), rng.integers(0, tex.shape[0] - c + 1)
    patch = (tex[cy:cy + c, cx:cx + c] * 255).astype(np.uint8)
    patch = _resize_grey(patch, size, size)[y0:y1, x0:x1] / 255
    tint = np.array(TEXTURE_TINTS[TEXTURES[t]]) * rng.uniform(0.8, 1.15)
    img[y0:y1, x0:x1] = np.clip(patch[..., None] * tint, 0, 1)
    return t, np.array([x0, y0, x1, y1], np.float32) / size


def render_image(seed: int, image_id: int, size: int, p_face: float = 0.3, p_scene: float = 0.3,
                 p_nonface: float = 0.15) -> tuple[np.ndarray, dict]:
    """Render one stimulus.

    Returns
    -------
    image : uint8 (size, size, 3)
    labels : dict of per-image label values (see :func:`render_images`)
    """
    rng = np.random.default_rng([int(seed), 0x5717, int(image_id)])
    photos = _photos_at(size)
    p = int(rng.integers(len(photos)))
    im = photos[p]
    w, h = im.size
    side = rng.uniform(0.35, 1.0) * min(w, h)  # crop scale: zoom in up to ~3x
    x0, y0 = rng.uniform(0, w - side), rng.uniform(0, h - side)
    crop = im.resize((size, size), Image.Resampling.BILINEAR, box=(x0, y0, x0 + side, y0 + side))
    img = np.asarray(crop, dtype=np.float32) / 255
    flip = bool(rng.random() < 0.5)
    if flip:
        img = img[:, ::-1]
    # colour jitter: brightness, contrast, saturation, small per-channel gains
    img = img * rng.uniform(0.75, 1.25)
    m = img.mean()
    img = (img - m) * rng.uniform(0.7, 1.3) + m
    grey = img.mean(axis=2, keepdims=True)
    img = grey + (img - grey) * rng.uniform(0.6, 1.4)
    img = np.clip(img * rng.uniform(0.92, 1.08, size=3), 0, 1).astype(np.float32)

    lab = {"face": 0, "face_box": np.zeros(4, np.float32), "face_id": -1, "scene": 0.0,
           "scene_box": np.zeros(4, np.float32), "scene_texture": -1, "nonface": 0,
           "nonface_box": np.zeros(4, np.float32), "source_photo": p,
           "crop": np.array([x0 / w, y0 / h, side / min(w, h)], np.float32), "flip": int(flip)}
    # draw every decision up front so adding one kind never shifts the others' random stream
    want_scene, want_face, want_nonface = rng.random(3) < (p_scene, p_face, p_nonface)
    if want_scene:
        t, box = _paste_texture(img, rng, size)
        lab.update(scene_texture=t, scene_box=box, scene=float((box[2] - box[0]) * (box[3] - box[1])))
    faces, nonfaces = _lfw()
    if want_face:
        k = int(rng.integers(len(faces)))
        lab.update(face=1, face_id=k, face_box=_paste_patch(img, (faces[k] * 255).astype(np.uint8), rng, size))
    elif want_nonface:
        k = int(rng.integers(len(nonfaces)))
        lab.update(nonface=1, nonface_box=_paste_patch(img, (nonfaces[k] * 255).astype(np.uint8), rng, size))
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), lab


def render_images(seed: int, image_ids, size: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Render several stimuli.

    Returns
    -------
    images : uint8 (n, size, size, 3)
    labels : {"face": uint8 (n,), "face_box": float32 (n, 4) x0,y0,x1,y1 in [0, 1] (zeros when
        absent), "face_id": int16 (n,) LFW index or -1, "scene": float32 (n,) fraction of the
        image covered by scene texture, "scene_box": float32 (n, 4), "scene_texture": int8 (n,)
        index into TEXTURES or -1, "nonface": uint8 (n,) control patch present, "nonface_box":
        float32 (n, 4), "source_photo": int16 (n,), "crop": float32 (n, 3) x0, y0, side as
        fractions of the photo, "flip": uint8 (n,)}
    """
    ids = list(image_ids)
    imgs = np.empty((len(ids), size, size, 3), np.uint8)
    labs = []
    for i, k in enumerate(ids):
        imgs[i], lab = render_image(seed, k, size)
        labs.append(lab)
    dtypes = {"face": np.uint8, "face_id": np.int16, "scene": np.float32, "scene_texture": np.int8,
              "nonface": np.uint8, "source_photo": np.int16, "flip": np.uint8}
    out = {}
    for key in labs[0] if labs else LABEL_NAMES:
        out[key] = np.array([lab[key] for lab in labs], dtype=dtypes.get(key, np.float32))
    return imgs, out


def label_attrs() -> dict[str, dict]:
    """Attributes stored with the label arrays (names of categorical codes)."""
    return {"source_photo": {"names": [n for n, _ in photo_sources()]},
            "scene_texture": {"names": list(TEXTURES)},
            "face_box": {"format": "x0,y0,x1,y1 in [0,1], y down; zeros when face == 0"},
            "scene_box": {"format": "x0,y0,x1,y1 in [0,1], y down; zeros when scene == 0"},
            "nonface_box": {"format": "x0,y0,x1,y1 in [0,1], y down; zeros when nonface == 0"},
            "face_id": {"source": "skimage.data.lfw_subset()[:100] index, -1 when absent"}}

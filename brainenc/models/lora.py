"""Low-rank adapters (LoRA, Hu et al. 2021) for the linear layers of a pretrained backbone.

A wrapped layer computes ``base(x) + (alpha / rank) * B(A(x))``. The base weights are frozen; only
``A`` (rank x in_features) and ``B`` (out_features x rank) are trained. ``B`` starts at zero, so a
freshly wrapped network computes exactly what the base network computes: fine-tuning starts from
the pretrained function rather than from a perturbed one.

A layer may hold several independent adapters (``n_adapters``), of which one is active at a time
(:func:`use_adapter`): the All-for-One experts each specialise the shared backbone with their own.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LoRALinear", "apply_lora", "lora_parameters", "lora_state_dict", "merge_lora", "set_adapter_count",
           "use_adapter"]

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
    n_adapters : int
        Independent adapters held by the layer; ``active`` selects the one used by ``forward``.

    Parameters (tensors)
    --------------------
    lora_A : (n_adapters, rank, in_features);  lora_B : (n_adapters, out_features, rank)

    Shapes
    ------
    x : Tensor (..., in_features) -> Tensor (..., out_features)
    """

    def __init__(self, base: nn.Linear, rank: int = 4, alpha: float = 8.0, dropout: float = 0.0,
                 n_adapters: int = 1):
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
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.active = 0
        self.set_adapter_count(n_adapters)

    @property
    def n_adapters(self) -> int:
        return self.lora_A.shape[0]

    def set_adapter_count(self, n: int) -> None:
        """Replace the adapters by ``n`` freshly initialised ones (before training)."""
        if n < 1:
            raise ValueError(f"LoRA needs at least one adapter, got n_adapters={n}")
        factory = dict(device=self.base.weight.device, dtype=self.base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(n, self.rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(n, self.out_features, self.rank, **factory))
        self.active = 0
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
        for a in self.lora_A.data:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.lora_A[self.active], self.lora_B[self.active]
        return self.base(x) + self.scaling * F.linear(F.linear(self.lora_dropout(x), a), b)

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` whose weight is ``W + (alpha/rank) * B @ A`` of the active adapter."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None,
                        device=self.base.weight.device, dtype=self.base.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.base.weight + self.scaling * (self.lora_B[self.active] @ self.lora_A[self.active]))
            if self.base.bias is not None:
                out.bias.copy_(self.base.bias)
        return out

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, n_adapters={self.n_adapters}"


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
    return [p for m in model.modules() if isinstance(m, LoRALinear) for p in (m.lora_A, m.lora_B)]


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Only the adapter tensors of ``model.state_dict()`` (keys containing ``lora_``): a small file that,
    with the base weights, reproduces the adapted model (load with ``strict=False``)."""
    return {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] in ("lora_A", "lora_B")}


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


def set_adapter_count(model: nn.Module, n: int) -> int:
    """Give every LoRALinear in ``model`` ``n`` fresh adapters; returns how many layers were changed."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in layers:
        m.set_adapter_count(n)
    return len(layers)


@contextlib.contextmanager
def use_adapter(model: nn.Module, k: int):
    """Within the block, every LoRALinear of ``model`` uses its adapter ``k``."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in layers:
        if not 0 <= k < m.n_adapters:
            raise IndexError(f"LoRA adapter {k} requested but the layer has {m.n_adapters}")
    before = [m.active for m in layers]
    try:
        for m in layers:
            m.active = k
        yield
    finally:
        for m, a in zip(layers, before):
            m.active = a

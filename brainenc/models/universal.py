"""Universal "crowd of brains" readout: one learned embedding per voxel of every subject.

Beliy, Wasserman, Zalcher & Irani (2024). Every voxel of every (dataset, subject) pair owns a
row of one embedding table. For each backbone level the voxel embedding, projected, queries the
level's tokens with a single-head cross-attention; the per-level outputs are concatenated and
read out with per-voxel weights that are themselves a linear function of the embedding. All
parameters except the embedding table are shared by the whole crowd, so a new subject needs only
new embeddings (see :mod:`brainenc.recipes.transfer`).

Shapes used throughout: ``B`` images, ``V`` voxels, ``T`` tokens of a level, ``d`` token width,
``E`` embedding width.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbones import Features
from .readout import FeatureSpec, Readout, pair_slot


class LevelKeysValues(list):
    """Keys and values (B, T, d) of every used level: the voxel-independent part of a forward.

    Returned by :meth:`UniversalReadout.prepare`; a distinct type so :meth:`UniversalReadout.forward`
    can tell it from raw :class:`~brainenc.models.backbones.Features`.
    """


class VoxelCrossAttention(nn.Module):
    """Single-head cross-attention with voxels as queries and one level's tokens as keys/values.

    Parameters
    ----------
    in_dim : channels C of the level's tokens
    n_tokens : T, number of tokens (fixes the learned positional embedding)
    width : d, the width tokens are projected to
    embed_dim : E, the voxel embedding width
    mlp_ratio : hidden width of the residual MLP is ``mlp_ratio * d`` (0 disables the MLP)
    dropout : dropout after the post-attention LayerNorm
    shared_mask : draw one dropout mask (V, d) per step, shared by the batch's images, instead of
        one per element (B, V, d). Drawing B x V x d Bernoulli numbers was a large share of a CPU
        training step (docs/performance.md); a per-voxel mask drops the same feature of a voxel
        for every image of the step, i.e. it thins that voxel's readout for the step.
    """

    def __init__(self, in_dim: int, n_tokens: int, width: int = 128, embed_dim: int = 256,
                 mlp_ratio: float = 2.0, dropout: float = 0.1, shared_mask: bool = False):
        super().__init__()
        self.width = width
        self.token_norm = nn.LayerNorm(in_dim)
        self.token_proj = nn.Linear(in_dim, width)
        # the position embedding is added to keys only: it lets a voxel choose *where* to look
        # (a receptive field) while the values carry *what* is there
        self.pos = nn.Parameter(torch.randn(n_tokens, width) * 0.02)
        self.q = nn.Linear(embed_dim, width)
        self.k = nn.Linear(width, width, bias=False)
        self.v = nn.Linear(width, width)
        self.out_norm = nn.LayerNorm(width)
        self.dropout = nn.Dropout(dropout)
        self.shared_mask = bool(shared_mask)
        hidden = int(round(mlp_ratio * width))
        self.mlp = (nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
                    if hidden > 0 else None)

    def tokens(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values from raw tokens (B, T, C): each (B, T, d). Independent of the voxels."""
        x = self.token_proj(self.token_norm(tokens))
        return self.k(x + self.pos), self.v(x)

    def forward(self, query: Tensor, keys: Tensor, values: Tensor,
                key_padding_mask: Optional[Tensor] = None, return_attention: bool = False):
        """Attend.

        Parameters
        ----------
        query : (V, E) voxel embeddings
        keys, values : (B, T, d) from :meth:`tokens`
        key_padding_mask : bool (B, T), True marks padding tokens that must get zero weight
        return_attention : also return the attention weights (B, V, T)

        Returns
        -------
        Tensor (B, V, d)
        """
        if key_padding_mask is not None and bool(key_padding_mask.all(dim=1).any()):
            raise ValueError("VoxelCrossAttention: an image has every token masked")
        if return_attention:
            q = self.q(query) / math.sqrt(self.width)                 # (V, d)
            logits = torch.einsum("vd,btd->bvt", q, keys)              # (B, V, T)
            if key_padding_mask is not None:
                logits = logits.masked_fill(key_padding_mask[:, None, :], float("-inf"))
            attn = logits.softmax(dim=-1)
            h = torch.bmm(attn, values)                                # (B, V, d)
        else:
            # the fused kernel (same scaling 1/sqrt(d)) never materialises the (B, V, T) weights:
            # about 30 % faster per training step on the CPU
            q = self.q(query)[None, None].expand(keys.shape[0], 1, -1, -1)  # (B, 1, V, d)
            mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
            h = F.scaled_dot_product_attention(q, keys[:, None], values[:, None], attn_mask=mask)[:, 0]
        h = self._dropout(self.out_norm(h))
        if self.mlp is not None:
            h = h + self.mlp(h)
        return (h, attn) if return_attention else h

    def _dropout(self, h: Tensor) -> Tensor:
        """Dropout of h (B, V, d): element-wise, or one (V, d) mask for every image (``shared_mask``)."""
        p = self.dropout.p
        if not (self.training and p > 0 and self.shared_mask):
            return self.dropout(h)
        keep = torch.empty(h.shape[1:], device=h.device, dtype=h.dtype).bernoulli_(1 - p)
        return h * (keep / (1 - p))


def token_grid(h: int, w: int, max_grid: Optional[int] = None) -> tuple[int, int]:
    """(H', W'): a level's (H, W) map as :func:`level_tokens` lays out its spatial tokens,
    each side capped at ``max_grid`` (None = no cap)."""
    h, w = int(h), int(w)
    return (h, w) if max_grid is None else (min(h, max_grid), min(w, max_grid))


def level_tokens(fmap: Tensor, cls: Optional[Tensor], max_grid: Optional[int] = None) -> Tensor:
    """Tokens of one level: (B, 1 + H'*W', C).

    The first token is the class token when the backbone has one, else the map's spatial mean (a
    "global" token, so CNNs also offer whole-image context); the rest are the map positions,
    average-pooled to at most ``max_grid`` per side (bounds the attention cost of fine levels).
    """
    grid = token_grid(*fmap.shape[-2:], max_grid)
    if grid != tuple(fmap.shape[-2:]):
        fmap = F.adaptive_avg_pool2d(fmap, grid)
    first = cls if cls is not None else fmap.mean(dim=(2, 3))
    return torch.cat([first[:, None, :], fmap.flatten(2).transpose(1, 2)], dim=1)


class UniversalReadout(Readout):
    """Voxel-embedding cross-attention readout shared by all subjects of all datasets.

    Global voxel index = offset of the pair + local index, pairs in sorted key order (so the
    layout does not depend on the order stores or subjects were listed in).

    Parameters
    ----------
    voxel_counts : {"dataset/subject": n_voxels}
    spec : backbone feature shapes
    embed_dim : E, voxel embedding width (256 in the paper)
    width : d, per-level token width (128 in the paper)
    mlp_ratio : residual MLP hidden width as a multiple of d
    dropout : dropout after each level's attention
    shared_dropout_mask : one dropout mask per step for all images of the batch (see
        :class:`VoxelCrossAttention`)
    max_grid : pool each level's map to at most this many positions per side (None = no pooling)
    levels : indices of the backbone levels to use (None = all)
    embed_init_std : standard deviation of the initial embeddings; None (default) = balanced,
        ``sqrt(0.1 / sqrt(E * L d))``, the value at which the embedding table and the readout map
        ``feat_embed`` start at the same scale (see the note in ``__init__``)
    """

    def __init__(self, voxel_counts: dict[str, int], spec: FeatureSpec, embed_dim: int = 256,
                 width: int = 128, mlp_ratio: float = 2.0, dropout: float = 0.1,
                 max_grid: Optional[int] = None, levels: Optional[list[int]] = None,
                 embed_init_std: Optional[float] = None, shared_dropout_mask: bool = False):
        super().__init__(voxel_counts, spec)
        self.embed_dim, self.width, self.max_grid = embed_dim, width, max_grid
        self.levels = list(range(len(spec.shapes))) if levels is None else [int(l) for l in levels]
        self.feat_dim = width * len(self.levels)
        # Per-voxel readout weights are bilinear, W_v = e_v @ feat_embed, and start at a fixed
        # output scale: std(e) * std(feat_embed) * sqrt(E * L d) = 0.1. Only the product is fixed,
        # but Adam moves every coordinate by about lr per step whatever its size, so each factor
        # learns at the relative rate lr / its scale. With N(0, 1) embeddings (the old default)
        # feat_embed started at ~5e-4 and moved ~5x its size per step while the embeddings moved
        # 0.3 %: the table stayed its random start (rms displacement 6 % after 6 epochs at 224 px)
        # and clustering it found nothing (ARI 0.000). Equal scales give both factors the same
        # relative rate; on the quickstart crowd (std 0.02 and 0.005 alike) this lifted the ARI
        # from 0.00 to 0.20 and the validation median from 0.34 to 0.46 after 6 epochs
        # (docs/universal.md).
        if embed_init_std is None:
            embed_init_std = math.sqrt(0.1 / math.sqrt(embed_dim * self.feat_dim))
        self.embed_init_std = float(embed_init_std)
        self.pairs = sorted(self.voxel_counts)
        starts = np.concatenate([[0], np.cumsum([self.voxel_counts[k] for k in self.pairs])])
        self.offsets = {k: int(s) for k, s in zip(self.pairs, starts[:-1])}
        self.n_total = int(starts[-1])
        self.embedding = nn.Parameter(torch.randn(self.n_total, embed_dim) * embed_init_std)
        # embeddings of pairs added after training (transfer); kept apart so the base table
        # and everything it was trained with stay untouched
        self.new_embedding = nn.ParameterDict()
        self.attn = nn.ModuleList()
        for l in self.levels:
            c, h, w = spec.shapes[l]
            h, w = token_grid(h, w, max_grid)
            self.attn.append(VoxelCrossAttention(c, 1 + h * w, width, embed_dim, mlp_ratio, dropout,
                                                 shared_dropout_mask))
        # initial predictions ~0.1 sd for LayerNormed features: a large random start would make the
        # first steps undo noise instead of learn
        self.feat_embed = nn.Parameter(torch.randn(embed_dim, self.feat_dim)
                                       * (0.1 / (embed_init_std * math.sqrt(embed_dim * self.feat_dim))))
        self.bias_embed = nn.Parameter(torch.zeros(embed_dim))
        self.bias = nn.Parameter(torch.zeros(()))

    # ---------------------------------------------------------------- voxel indexing
    def has_pair(self, pair: str) -> bool:
        return pair in self.offsets or pair_slot(pair) in self.new_embedding

    def n_voxels(self, pair: str) -> int:
        if pair in self.offsets:
            return self.voxel_counts[pair]
        if pair_slot(pair) in self.new_embedding:
            return self.new_embedding[pair_slot(pair)].shape[0]
        raise KeyError(f"UniversalReadout: unknown pair {pair!r}; have {self.pairs + list(self.new_embedding)}")

    def global_index(self, pair: str, voxels: Optional[Tensor] = None) -> Tensor:
        """Rows of the base embedding table for ``pair``'s voxels (int64 (V,), all when None)."""
        if pair not in self.offsets:
            raise KeyError(f"UniversalReadout: {pair!r} is not in the base table; have {self.pairs}")
        dev = self.embedding.device
        local = torch.arange(self.voxel_counts[pair], device=dev) if voxels is None else voxels.to(dev)
        return local + self.offsets[pair]

    def embeddings(self, pair: str, voxels: Optional[Tensor] = None) -> Tensor:
        """The voxel embeddings (V, E) of ``pair`` (a subset when ``voxels`` is given)."""
        if pair in self.offsets:
            return self.embedding[self.global_index(pair, voxels)]
        slot = pair_slot(pair)
        if slot not in self.new_embedding:
            raise KeyError(f"UniversalReadout: unknown pair {pair!r}; have {self.pairs + list(self.new_embedding)}")
        e = self.new_embedding[slot]
        return e if voxels is None else e[voxels.to(e.device)]

    def add_pair(self, pair: str, n_voxels: int, init: Optional[Tensor] = None) -> nn.Parameter:
        """Add a trainable embedding table (n_voxels, E) for a pair the base model never saw.

        ``init`` (n_voxels, E) sets its starting values (e.g. neighbours' embeddings); otherwise
        rows are drawn like the base table's.
        """
        if self.has_pair(pair):
            raise ValueError(f"UniversalReadout.add_pair: {pair!r} already has embeddings")
        if init is None:
            init = torch.randn(n_voxels, self.embed_dim) * self.embed_init_std
        if tuple(init.shape) != (n_voxels, self.embed_dim):
            raise ValueError(f"UniversalReadout.add_pair: init must be ({n_voxels}, {self.embed_dim}), "
                             f"got {tuple(init.shape)}")
        p = nn.Parameter(init.detach().clone().to(self.embedding.device, self.embedding.dtype))
        self.new_embedding[pair_slot(pair)] = p
        return p

    # ---------------------------------------------------------------- forward
    def level_features(self, features: Features) -> LevelKeysValues:
        """Per used level, keys and values (B, T, d). They do not depend on the voxels: evaluate
        them once per image batch (:meth:`prepare`) and pass the result to every voxel chunk."""
        out = LevelKeysValues()
        for l, mod in zip(self.levels, self.attn):
            cls = features.cls[l] if features.cls is not None else None
            out.append(mod.tokens(level_tokens(features.maps[l], cls, self.max_grid)))
        return out

    def prepare(self, features: Features) -> LevelKeysValues:
        """Keys and values of every level for a batch of images (see :meth:`Readout.prepare`)."""
        return features if isinstance(features, LevelKeysValues) else self.level_features(features)

    def forward(self, features: Features | LevelKeysValues, pair: str, voxels: Optional[Tensor] = None) -> Tensor:
        """Predict responses (B, V) of ``pair``'s ``voxels`` (int64 (V,) local indices; None = all).

        ``features`` is the backbone's pyramid, or the output of :meth:`prepare` for the same
        images (then the keys and values are not recomputed).
        """
        e = self.embeddings(pair, voxels)                               # (V, E)
        kv = self.prepare(features)
        h = torch.cat([mod(e, k, v) for mod, (k, v) in zip(self.attn, kv)], dim=-1)  # (B, V, L*d)
        w = e @ self.feat_embed                                         # (V, L*d)
        b = e @ self.bias_embed + self.bias                             # (V,)
        return (h * w).sum(-1) + b  # elementwise: an einsum here becomes V tiny matmuls on CPU

    def voxel_weights(self, pair: str) -> Tensor:
        """The pair's voxel embeddings (n_voxels, E), for clustering into functional maps."""
        return self.embeddings(pair).detach()

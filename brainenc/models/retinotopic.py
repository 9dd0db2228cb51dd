"""Retinotopic readout (the All-for-One / Memory Encoding Model family).

Every voxel ``v`` of a subject gets, from small MLPs of a Fourier encoding of its 3-D brain
coordinate,

* a receptive-field position ``p_v`` in ``[-1, 1]^2`` (tanh),
* softmax weights ``a_v`` over the backbone's feature levels,
* a local/global mixing weight ``m_v`` in ``(0, 1)`` (sigmoid).

Each level's map goes through a shared 1x1 bottleneck (``C_l -> width``); the bottlenecked maps
are sampled at ``p_v`` with ``F.grid_sample`` and mixed over levels with ``a_v``; the same mixture
of the spatially pooled maps is the global term.  A per-voxel linear map reads out
``[m_v * local_v, (1 - m_v) * global_v]`` (2 * width values).

Because the positions come from a smooth function of the coordinate, neighbouring voxels get
neighbouring positions and voxels with little signal borrow their position from their neighbours
("no voxel left behind"); ``positions="free"`` learns one position per voxel instead (to compare).

Position convention
-------------------
``p = (px, py)`` is in ``F.grid_sample`` units with ``align_corners=False``: ``px = -1`` is the
left edge of the image, ``+1`` the right edge; ``py = -1`` is the **top** edge and ``+1`` the
bottom edge (y points *down*, like image rows).  Pixel ``(row i, column j)`` of an ``H x W`` map
has its centre at ``px = (2j + 1) / W - 1``, ``py = (2i + 1) / H - 1``.  simbrain's truth uses
degrees of visual angle with x to the right and y **up** (``truth/prf_y_deg > 0`` is the upper
visual field, i.e. the top rows of the image; see ``simbrain.responses._edges``), so

    x_deg = px * visual_angle_deg / 2,     y_deg = -py * visual_angle_deg / 2

(:meth:`RetinotopicReadout.positions_deg`).
"""

from __future__ import annotations

import math
from typing import Literal, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbones import Features
from .fields import dot_channels, sample_points, sampled_dot
from .readout import FeatureSpec, Readout, pair_slot


def fourier_encode(coords: Tensor, n_freq: int) -> Tensor:
    """Sinusoidal encoding of normalised coordinates.

    Parameters
    ----------
    coords : Tensor (V, 3), roughly in [-1, 1]
    n_freq : number of octaves; frequencies ``pi * 2^k``, k = 0 .. n_freq - 1

    Returns
    -------
    Tensor (V, 3 + 6 * n_freq): the coordinates, then sin and cos of every frequency and axis
    """
    freqs = math.pi * (2.0 ** torch.arange(n_freq, device=coords.device, dtype=coords.dtype))
    ang = coords[:, :, None] * freqs  # (V, 3, n_freq)
    return torch.cat([coords, ang.sin().flatten(1), ang.cos().flatten(1)], dim=1)


def normalise_coords(coords: np.ndarray, frame: Optional[np.ndarray] = None) -> np.ndarray:
    """Centre coordinates on a bounding box and scale isotropically into [-1, 1].

    One scale for all three axes keeps distances (and so the smoothness the MLP imposes) the same
    in every direction.  ``frame`` (m, 3) gives the box (default: ``coords`` themselves), so a
    subset of a subject's voxels can keep the whole subject's frame.  Returns float32 (n_voxels, 3).
    """
    c = np.asarray(coords, dtype=np.float64)
    f = c if frame is None else np.asarray(frame, dtype=np.float64)
    lo, hi = f.min(0), f.max(0)
    half = max(float((hi - lo).max()) / 2, 1e-6)
    return ((c - (lo + hi) / 2) / half).astype(np.float32)


def _mlp(d_in: int, hidden: int, d_out: int, depth: int = 2) -> nn.Sequential:
    layers, d = [], d_in
    for _ in range(depth):
        layers += [nn.Linear(d, hidden), nn.GELU()]
        d = hidden
    layers.append(nn.Linear(d, d_out))
    return nn.Sequential(*layers)


# sample-first is chosen while voxels x channels <= this x width x pixels: sampling first needs
# no gradient with respect to the (frozen, normalised) map, which keeps it the cheaper order well
# beyond equal sizes (measured with benchmarks/retinotopic_readout.py)
SAMPLE_FIRST_ADVANTAGE = 16


def _active(dropout: nn.Module) -> bool:
    return dropout.training and getattr(dropout, "p", 0.0) > 0


def read_level(fmap: Tensor, weight: Tensor, bias: Tensor, pos: Tensor, readout: Tensor,
               dropout: nn.Module, sigma: Optional[Tensor] = None, memo: Optional[dict] = None) -> tuple[Tensor, Tensor]:
    """One level's local contribution to every voxel's prediction, and the level's pooled features.

    Parameters
    ----------
    fmap : Tensor (B, C, H, W), the normalised level
    weight, bias : Tensor (width, C) and (width,), the level's 1x1 bottleneck
    pos : Tensor (N, 2) positions in grid units
    readout : Tensor (N, width), each voxel's readout weights of its local features
    dropout : applied to the voxel's bottlenecked features while training
    sigma : Tensor (N,) Gaussian field sizes in grid units, or None for points
    memo : the pixel-weight matrices of the forward pass so far (see :func:`~brainenc.models.fields.point_matrix`)

    Returns
    -------
    local : Tensor (B, N), ``readout[n] . bottleneck(fmap at pos[n])``
    pooled : Tensor (B, width), the bottlenecked spatial mean of the level
    """
    width, c = weight.shape
    n, (h, w) = pos.shape[0], fmap.shape[-2:]
    pooled = fmap.mean(dim=(2, 3)) @ weight.t() + bias
    # Bilinear sampling is linear with weights summing to 1, so it commutes with the 1x1 bottleneck:
    # sample-then-project and project-then-sample give the same numbers.  Sampling first touches
    # voxels x input channels, projecting first width x pixels plus the gradient of grid_sample
    # with respect to the projected map; pick the cheaper order.
    if n * c <= SAMPLE_FIRST_ADVANTAGE * width * h * w:
        if _active(dropout):
            feat = torch.einsum("bcn,wc->bwn", sample_points(fmap, pos, sigma, memo), weight) + bias[:, None]
            return dot_channels(dropout(feat), readout), pooled
        # fold the readout into the bottleneck: no (B, width, N) features at all
        return sampled_dot(fmap, pos, readout @ weight, sigma, memo) + readout @ bias, pooled
    proj = F.conv2d(fmap, weight[:, :, None, None], bias)  # (B, width, H, W)
    if _active(dropout):
        return dot_channels(dropout(sample_points(proj, pos, sigma, memo)), readout), pooled
    return sampled_dot(proj, pos, readout, sigma, memo), pooled


def predict_points(maps: list[Tensor], bottleneck: list[tuple[Tensor, Tensor]], pos: Tensor, levels: Tensor,
                   mix: Optional[Tensor], weight: Tensor, bias: Tensor, sigma: Optional[Tensor] = None, *,
                   dropout: nn.Module) -> Tensor:
    """The retinotopic prediction of N voxels.

    ``pred[b, n] = sum_l levels[n, l] * (mix[n] * w_local[n] . local_l[b, n]
    + (1 - mix[n]) * w_global[n] . pooled_l[b]) + bias[n]`` with ``weight[n] = [w_local, w_global]``
    (D = 2 * width), or one vector ``w_local = w_global = weight[n]`` for both terms (D = width,
    FactorTopy's shared readout); without the global term ``mix`` is None and ``weight = w_local``.

    Parameters
    ----------
    maps : per level the normalised map (B, C_l, H_l, W_l)
    bottleneck : per level (weight (width, C_l), bias (width,))
    pos : (N, 2) positions; levels : (N, L) level weights; mix : (N,) local weight, or None for
        no global term
    weight : (N, D) per-voxel readout weights (D = 2 * width or width, see above)
    bias : (N,)
    sigma : (N,) Gaussian receptive-field sizes in grid units, or None for point fields
    dropout : applied to each level's local features, and the global features, while training

    Returns
    -------
    Tensor (B, N)
    """
    width = bottleneck[0][0].shape[0]
    shared = weight.shape[1] == width
    # the mix scales the (small) readout weights instead of the (B, width, N) features
    w_local = weight if mix is None else weight[:, :width] * mix[:, None]
    pred, pooled, memo = bias, [], {}
    for l, (m, (w_l, b_l)) in enumerate(zip(maps, bottleneck)):
        local, pl = read_level(m, w_l, b_l, pos, w_local, dropout, sigma, memo)
        pred = pred + local * levels[:, l]
        pooled.append(pl)
    if mix is None:
        return pred
    glob = torch.stack(pooled, dim=2) @ levels.t()  # (B, width, N)
    w_global = weight if shared else weight[:, width:]
    return pred + dot_channels(dropout(glob), w_global * (1 - mix)[:, None])


def level_norms(spec: FeatureSpec) -> nn.ModuleList:
    """Parameter-free standardisation of every level (levels differ in scale by orders of magnitude)."""
    return nn.ModuleList([nn.BatchNorm2d(c, affine=False) for c, _, _ in spec.shapes])


def grid_sizes(grid) -> tuple[Optional[int], ...]:
    """``grid`` option -> tuple of pooling sizes (None = the backbone's own maps).

    ``None`` -> ``(None,)``; ``8`` -> ``(8,)``; ``[8, 4]`` -> ``(8, 4)``; a tuple it returned -> itself.
    """
    listed = grid if isinstance(grid, (list, tuple)) else [grid]
    sizes = tuple(None if g is None else int(g) for g in listed)
    if not sizes or any(g is not None and g < 1 for g in sizes):
        raise ValueError(f"RetinotopicReadout: grid must be null, a positive integer or a list of them, got {grid!r}")
    return sizes


def normalise_levels(features: Features, norms: nn.ModuleList, grid=None) -> list[Tensor]:
    """The maps standardised by ``norms`` (from :func:`level_norms`), one (B, C_l, H_l, W_l) per level.

    With ``grid``, maps larger than ``grid x grid`` are average-pooled to it (area averaging, so
    no aliasing): a coarse map gives every position a gradient from a wide neighbourhood, where
    on a fine map a position only feels its 2 x 2 nearest cells (see docs/afo.md).  A list of
    sizes gives every level at every size, size-major (``[8, 4]``: all levels at 8 x 8, then all
    at 4 x 4), so the level weights choose a scale as well as a level.
    """
    maps = [norm(m) for m, norm in zip(features.maps, norms)]
    return [m if g is None else F.adaptive_avg_pool2d(m, (min(g, m.shape[-2]), min(g, m.shape[-1])))
            for g in grid_sizes(grid) for m in maps]


def level_adapters(spec: FeatureSpec, channels: int) -> nn.ModuleList:
    """Per level a residual per-pixel MLP ``C_l -> channels -> C_l`` (1x1 convolutions, GELU) whose
    output layer starts at zero; empty for ``channels == 0``."""
    if channels <= 0:
        return nn.ModuleList()
    out = nn.ModuleList()
    for c, _, _ in spec.shapes:
        mlp = nn.Sequential(nn.Conv2d(c, channels, 1), nn.GELU(), nn.Conv2d(channels, c, 1))
        nn.init.zeros_(mlp[-1].weight)
        nn.init.zeros_(mlp[-1].bias)
        out.append(mlp)
    return out


def adapt_levels(maps: list[Tensor], adapters: nn.ModuleList) -> list[Tensor]:
    """``m + adapter(m)`` for the maps of :func:`normalise_levels` (size-major order: map ``i`` is
    level ``i % n_levels``); unchanged without adapters."""
    if not len(adapters):
        return maps
    return [m + adapters[i % len(adapters)](m) for i, m in enumerate(maps)]


def selector_prior_term(levels: Tensor, mix: Optional[Tensor]) -> Tensor:
    """FactorTopy's selector prior: mean normalised negative entropy of the level weights plus the
    mean squared distance of the local/global mix from 0.5.

    Parameters
    ----------
    levels : Tensor (V, L), rows summing to 1
    mix : Tensor (V,) or None

    Returns
    -------
    scalar Tensor in [-1, 0.25]: -1 for uniform levels and an even mix
    """
    n_levels = levels.shape[1]
    neg_entropy = (levels * levels.clamp_min(1e-8).log()).sum(-1).mean()
    out = neg_entropy / math.log(n_levels) if n_levels > 1 else neg_entropy * 0
    if mix is not None:
        out = out + (mix - 0.5).pow(2).mean()
    return out


class RetinotopicReadout(Readout):
    """Coordinate MLPs -> receptive-field position, level weights and local/global mix per voxel.

    Parameters
    ----------
    voxel_counts : {"dataset/subject": n_voxels}
    spec : backbone feature shapes
    width : channels of the shared per-level 1x1 bottleneck
    hidden : hidden width of the coordinate MLPs
    n_freq : octaves of the Fourier coordinate encoding
    positions : "mlp" (from the coordinate) or "free" (one learned position per voxel)
    jitter : sd of Gaussian noise added to positions during training (grid units; 0.02 is
        about 2/3 of a pixel of a 64-px image), so the readout does not rely on one exact pixel
    layer_entropy : weight of the mean entropy of the level weights added by ``regularization()``
        (positive pushes each voxel towards one level)
    global_term : include the pooled (global) features
    dropout : dropout on the per-voxel features during training
    normalise : standardise (and adapt, see ``adapter``) each level itself; False when the caller
        passes already normalised and adapted maps (the experts of :class:`ExpertsReadout` share
        one norm and one adapter)
    grid : average-pool every level map larger than ``grid x grid`` down to it before sampling
        (None = sample the backbone's maps as they are); a list (e.g. ``[8, 4]``) offers every
        level at every size and the level weights choose among them; see :func:`normalise_levels`
    selector_init : "zero" starts the last layer of every selector MLP at zero, so every voxel
        starts at the image centre with uniform level weights and an even local/global mix and
        moves by gradient; "small" (earlier default) only shrinks the position layer
    shared_readout : one readout vector per voxel for the local and the global features
        (``w . (m * local + (1 - m) * global)``, width values) instead of one each (2 * width)
    rf : "point" samples each level bilinearly at the voxel's position; "gaussian" averages it
        under a Gaussian field whose size is learned per voxel like the position (a third
        coordinate MLP, or one free value per voxel with ``positions="free"``); see
        :func:`~brainenc.models.fields.gaussian_matrix`
    rf_size_init : the Gaussian fields' starting standard deviation in grid units (the image is 2
        wide, so 0.1 is 1/20 of the image)
    adapter : hidden channels of a residual per-pixel MLP (one per level, shared by all voxels)
        between the normalised level and the bottleneck, so that voxels can read features that
        are not linear in the backbone's; its output layer starts at zero, so training starts
        from the linear readout; 0 = none (the bottleneck reads the backbone's channels
        linearly, as FactorTopy does)
    selector_prior : weight of a prior that holds the selectors near their neutral start
        (normalised negative entropy of the level weights, minimal when uniform, plus
        ``(mix - 0.5)^2``) and fades linearly to 0 over ``selector_prior_steps`` training steps,
        so early noisy gradients cannot lock a voxel onto one level before its position is found
    """

    def __init__(self, voxel_counts: dict[str, int], spec: FeatureSpec, width: int = 32, hidden: int = 64,
                 n_freq: int = 6, positions: Literal["mlp", "free"] = "mlp", jitter: float = 0.0,
                 layer_entropy: float = 0.0, global_term: bool = True, dropout: float = 0.0,
                 normalise: bool = True, grid: Union[int, list[int], None] = None,
                 selector_init: Literal["zero", "small"] = "small", shared_readout: bool = False,
                 selector_prior: float = 0.0, selector_prior_steps: int = 2000,
                 rf: Literal["point", "gaussian"] = "point", rf_size_init: float = 0.1, adapter: int = 0):
        super().__init__(voxel_counts, spec)
        if rf not in ("point", "gaussian") or not rf_size_init > 0:
            raise ValueError(f"RetinotopicReadout: rf must be 'point' or 'gaussian' and rf_size_init > 0, got "
                             f"{rf!r} and {rf_size_init!r}")
        if positions not in ("mlp", "free"):
            raise ValueError(f"RetinotopicReadout: positions must be 'mlp' or 'free', got {positions!r}")
        if selector_init not in ("zero", "small"):
            raise ValueError(f"RetinotopicReadout: selector_init must be 'zero' or 'small', got {selector_init!r}")
        self.grids = grid_sizes(grid)
        if selector_prior < 0 or int(selector_prior_steps) < 1:
            raise ValueError("RetinotopicReadout: selector_prior must be >= 0 and selector_prior_steps >= 1, got "
                             f"{selector_prior!r} and {selector_prior_steps!r}")
        self.width, self.n_freq, self.positions_mode = int(width), int(n_freq), positions
        self.jitter, self.layer_entropy, self.global_term = float(jitter), float(layer_entropy), bool(global_term)
        self.shared_readout = bool(shared_readout)
        self.rf, self.rf_size_init = rf, float(rf_size_init)
        if int(adapter) < 0:
            raise ValueError(f"RetinotopicReadout: adapter must be >= 0 channels, got {adapter!r}")
        self.adapter_channels = int(adapter)
        self.selector_prior, self.selector_prior_steps = float(selector_prior), int(selector_prior_steps)
        # training steps seen by the prior's schedule; a buffer, so a resumed fit continues the ramp
        self.register_buffer("prior_step", torch.zeros((), dtype=torch.long))
        # one selector weight per (size, level); the bottleneck of a level is shared by its sizes
        self.n_levels = len(spec.shapes) * len(self.grids)
        self.norm = level_norms(spec) if normalise else nn.ModuleList([nn.Identity() for _ in spec.shapes])
        # the caller that normalises (experts: ExpertsReadout) also adapts; see level_adapters
        self.adapter = level_adapters(spec, self.adapter_channels) if normalise else nn.ModuleList()
        self.bottleneck = nn.ModuleList([nn.Conv2d(c, self.width, 1) for c, _, _ in spec.shapes])
        self.dropout = nn.Dropout(dropout)
        d_enc = 3 + 6 * self.n_freq
        d_feat = 2 * self.width if self.global_term and not self.shared_readout else self.width
        self.pos_mlp, self.layer_mlp, self.mix_mlp = nn.ModuleDict(), nn.ModuleDict(), nn.ModuleDict()
        self.free_pos = nn.ParameterDict()
        self.size_mlp, self.free_size = nn.ModuleDict(), nn.ParameterDict()
        # sigma = softplus(raw): the raw value that starts every field at rf_size_init
        size0 = self.rf_size_init + math.log(-math.expm1(-self.rf_size_init))
        self.weight, self.bias = nn.ParameterDict(), nn.ParameterDict()
        gen = torch.Generator().manual_seed(0)
        for key, n in self.voxel_counts.items():
            s = pair_slot(key)
            # coordinates live in the state dict, so a checkpoint carries everything it needs
            self.register_buffer(f"coords_{s}", torch.zeros(n, 3))
            self.register_buffer(f"has_coords_{s}", torch.zeros((), dtype=torch.bool))
            if positions == "mlp":
                self.pos_mlp[s] = _mlp(d_enc, hidden, 2)
                # small last layer: every voxel starts near the centre and moves out by gradient
                nn.init.normal_(self.pos_mlp[s][-1].weight, std=0.01)
                nn.init.zeros_(self.pos_mlp[s][-1].bias)
            else:
                self.free_pos[s] = nn.Parameter(
                    torch.zeros(n, 2) if selector_init == "zero" else 0.1 * torch.randn(n, 2, generator=gen))
            self.layer_mlp[s] = _mlp(d_enc, hidden, self.n_levels)
            self.mix_mlp[s] = _mlp(d_enc, hidden, 1)
            if rf == "gaussian" and positions == "mlp":
                self.size_mlp[s] = _mlp(d_enc, hidden, 1)
                nn.init.normal_(self.size_mlp[s][-1].weight, std=0.01)
                nn.init.constant_(self.size_mlp[s][-1].bias, size0)
            elif rf == "gaussian":
                self.free_size[s] = nn.Parameter(torch.full((n,), size0))
            if selector_init == "zero":
                # a neutral start: centre, uniform levels, even mix; the hidden layers keep their
                # random init, so the first gradient step already differs between voxels
                for mlp in (self.pos_mlp[s] if positions == "mlp" else None, self.layer_mlp[s], self.mix_mlp[s]):
                    if mlp is not None:
                        nn.init.zeros_(mlp[-1].weight)
                        nn.init.zeros_(mlp[-1].bias)
                if s in self.size_mlp:
                    nn.init.zeros_(self.size_mlp[s][-1].weight)
            self.weight[s] = nn.Parameter(torch.randn(n, d_feat, generator=gen) * (0.1 / math.sqrt(d_feat)))
            self.bias[s] = nn.Parameter(torch.zeros(n))
        self._entropy: Optional[Tensor] = None
        self._prior: Optional[Tensor] = None

    @torch.no_grad()
    def copy_from(self, other: "RetinotopicReadout", voxels: dict[str, Tensor]) -> None:
        """Start as ``other`` restricted to some voxels: copy its selector MLPs, bottleneck and the
        per-voxel weights of ``voxels[pair]`` (int64 (n,), this readout's voxels in ``other``'s order).

        Both readouts must have the same architecture; with coordinates in the same frame (see
        :meth:`set_voxel_info`), this readout then predicts exactly what ``other`` does for those voxels.
        """
        if (other.width, other.n_freq, other.positions_mode, other.global_term, other.shared_readout, other.rf,
                other.adapter_channels) != (self.width, self.n_freq, self.positions_mode, self.global_term,
                                            self.shared_readout, self.rf, self.adapter_channels):
            raise ValueError("RetinotopicReadout.copy_from: the two readouts differ in width, n_freq, positions, "
                             "global_term, shared_readout, rf or adapter")
        self.bottleneck.load_state_dict(other.bottleneck.state_dict())
        if len(self.adapter) and len(other.adapter):
            self.adapter.load_state_dict(other.adapter.state_dict())
        for key, idx in voxels.items():
            s = pair_slot(key)
            for mine, theirs in ((self.pos_mlp, other.pos_mlp), (self.layer_mlp, other.layer_mlp),
                                 (self.mix_mlp, other.mix_mlp), (self.size_mlp, other.size_mlp)):
                if s in theirs:
                    mine[s].load_state_dict(theirs[s].state_dict())
            for mine, theirs in ((self.free_pos, other.free_pos), (self.free_size, other.free_size)):
                if s in theirs:
                    mine[s].copy_(theirs[s][idx])
            self.weight[s].copy_(other.weight[s][idx])
            self.bias[s].copy_(other.bias[s][idx])

    # ------------------------------------------------------------------ voxel info
    def set_voxel_info(self, pair: str, coords: np.ndarray, frame: Optional[np.ndarray] = None) -> None:
        """Store the pair's coordinates float (n_voxels, 3) mm, normalised in the bounding box of
        ``frame`` (m, 3) mm (default: of ``coords``, i.e. per subject)."""
        s = pair_slot(pair)
        if s not in self.weight:
            return
        c = torch.from_numpy(normalise_coords(coords, frame))
        buf = getattr(self, f"coords_{s}")
        if c.shape != buf.shape:
            raise ValueError(f"RetinotopicReadout: {pair} has {buf.shape[0]} voxels but coords of shape "
                             f"{tuple(c.shape)} were given")
        buf.copy_(c.to(buf.device))
        getattr(self, f"has_coords_{s}").fill_(True)

    def _coords(self, s: str, voxels: Optional[Tensor]) -> Tensor:
        if self.positions_mode == "mlp" and not bool(getattr(self, f"has_coords_{s}")):
            raise RuntimeError(f"RetinotopicReadout: no voxel coordinates for {s}; set_voxel_info() must be "
                               "called first (EncoderModule.setup does it from the datamodule)")
        c = getattr(self, f"coords_{s}")
        return c if voxels is None else c[voxels]

    # ------------------------------------------------------------------ per-voxel parameters
    def voxel_params(self, pair: str, voxels: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
        """Positions (V, 2) in grid units, level weights (V, L * number of grid sizes) summing to 1, local weight (V,)."""
        return self._selectors(pair, voxels)[:3]

    def rf_sizes(self, pair: str, voxels: Optional[Tensor] = None) -> Optional[Tensor]:
        """Gaussian field sizes (V,) in grid units (standard deviations), or None for point fields."""
        return None if self.rf == "point" else self._selectors(pair, voxels)[3]

    def _selectors(self, pair: str, voxels: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
        """:meth:`voxel_params` and :meth:`rf_sizes` from one Fourier encoding of the coordinates."""
        s = pair_slot(pair)
        enc = fourier_encode(self._coords(s, voxels), self.n_freq)

        def free(prm: Tensor) -> Tensor:
            return prm if voxels is None else prm[voxels]

        pos = torch.tanh(self.pos_mlp[s](enc) if self.positions_mode == "mlp" else free(self.free_pos[s]))
        levels = torch.softmax(self.layer_mlp[s](enc), dim=-1)
        mix = torch.sigmoid(self.mix_mlp[s](enc)).squeeze(-1)
        sizes = None
        if self.rf == "gaussian":
            sizes = F.softplus(self.size_mlp[s](enc).squeeze(-1) if s in self.size_mlp else free(self.free_size[s]))
        return pos, levels, mix, sizes

    @torch.no_grad()
    def positions(self, pair: str) -> Tensor:
        """Learned receptive-field centres (n_voxels, 2) in grid units (x right, y down)."""
        return self.voxel_params(pair)[0].detach()

    @torch.no_grad()
    def positions_deg(self, pair: str, visual_angle_deg: float) -> Tensor:
        """Learned centres (n_voxels, 2) in degrees with x right and y **up** (simbrain's truth convention)."""
        p = self.positions(pair)
        half = visual_angle_deg / 2
        return torch.stack([p[:, 0] * half, -p[:, 1] * half], dim=1)

    # ------------------------------------------------------------------ forward
    def bottleneck_weights(self) -> list[tuple[Tensor, Tensor]]:
        """Per map of :func:`normalise_levels` the 1x1 bottleneck as (weight (width, C_l), bias (width,))."""
        return [(conv.weight.flatten(1), conv.bias) for _ in self.grids for conv in self.bottleneck]

    def point_params(self, pair: str, voxels: Optional[Tensor] = None) -> tuple[Tensor, ...]:
        """Everything :func:`predict_points` needs per voxel, as used for training or evaluation.

        Returns positions (V, 2) (jittered while training), level weights (V, L), local weight (V,)
        or None without the global term, readout weights (V, D), biases (V,) and the Gaussian
        field sizes (V,) or None for point fields (:meth:`rf_sizes`).  While training
        with ``layer_entropy > 0`` it also records the level weights' entropy for
        :meth:`regularization`.
        """
        s = pair_slot(pair)
        pos, levels, mix, sizes = self._selectors(pair, voxels)
        if self.training and self.jitter > 0:
            pos = pos + self.jitter * torch.randn_like(pos)
        if self.training and (self.layer_entropy > 0 or self.selector_prior > 0):
            entropy = -(levels * levels.clamp_min(1e-8).log()).sum(-1).mean()
            self._entropy = entropy if self.layer_entropy > 0 else None
            if self.selector_prior > 0:
                self._prior = selector_prior_term(levels, mix if self.global_term else None)
        w, b = self.weight[s], self.bias[s]
        if voxels is not None:
            w, b = w[voxels], b[voxels]
        return pos, levels, mix if self.global_term else None, w, b, sizes

    def forward(self, features: Features, pair: str, voxels: Optional[Tensor] = None) -> Tensor:
        """Predict (B, V) responses."""
        return self.predict(adapt_levels(normalise_levels(features, self.norm, self.grids), self.adapter), pair, voxels)

    def predict(self, maps: list[Tensor], pair: str, voxels: Optional[Tensor] = None) -> Tensor:
        """(B, V) responses from maps already normalised, pooled and adapted (:func:`normalise_levels`,
        :func:`adapt_levels`): by this readout's own norms in :meth:`forward`, by the shared ones of
        :class:`~brainenc.models.experts.ExpertsReadout` for an expert."""
        return predict_points(maps, self.bottleneck_weights(), *self.point_params(pair, voxels),
                              dropout=self.dropout)

    def prior_weight(self) -> float:
        """The selector prior's weight at the current step: ``selector_prior * max(0, 1 - step / steps)``."""
        return self.selector_prior * max(0.0, 1.0 - int(self.prior_step) / self.selector_prior_steps)

    def regularization(self) -> Tensor:
        """The regularisers of the last training forward (call once per training step).

        ``layer_entropy *`` mean entropy of the level weights, plus :meth:`prior_weight` ``*``
        :func:`selector_prior_term`; the prior's step counter advances by one per call.
        """
        out = torch.zeros(())
        if self._entropy is not None:
            out = out + self.layer_entropy * self._entropy
        if self._prior is not None:
            out = out + self.prior_weight() * self._prior
            self.prior_step += 1
        self._entropy = self._prior = None
        return out

    def voxel_weights(self, pair: str) -> Tensor:
        """Per-voxel readout weights (n_voxels, 2 * width) for clustering into model-defined ROIs."""
        return self.weight[pair_slot(pair)].detach()

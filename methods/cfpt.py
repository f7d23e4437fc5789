"""Neck ``cfpt``: the Cross-layer Feature Pyramid Transformer (Du et al., 2024), for RetinaNet.

CFPT replaces the FPN's top-down pathway by attention *across* the pyramid levels:

* C2 is not used. C3, C4, C5 are projected to ``width`` by 1x1 conv-BN-ReLU and a
  3x3 stride-2 conv-BN-ReLU of C5 gives a fourth level (strides 8, 16, 32, 64).
* ``num_blocks`` blocks (official: one), each cross-layer channel-wise attention (CCA) then
  cross-layer spatial-wise attention (CSA). Both run, per level, a depthwise 3x3 position
  encoding (x + GELU(dwconv x)), a 1x1 qkv to ``width // reduction`` channels, attention over
  tokens grouped across the four levels, a 1x1 projection + LayerNorm residual, a second
  position-encoding conv and a LayerNorm + MLP (ratio ``mlp_ratio``) residual.
* CSA groups, for each pixel of the coarsest level, an overlapping window of every level
  (sides 8+beta, 4+beta, 2+beta, beta = 9/5/3/1 at strides 8/4/2/1): 116 tokens of
  ``width // reduction / num_heads`` features per head.
* CCA pixel-unshuffles level i's qkv by 8/4/2/1 onto the coarsest grid and groups overlapping
  channel windows (64+alpha, 16+alpha, 4+alpha, alpha = 65/17/5/1 at channel strides
  64/16/4/1): 88 tokens per window, each token one unshuffled channel whose features are
  its values over the whole coarsest grid.
* Attention is cosine (L2-normalised q and k, no temperature) plus the cross-layer
  consistent relative position encoding (CCPE): a relative-position table read at
  positions rescaled to the first level's window (so fractional, linearly interpolated)
  plus a learned bias per query level.
* Output: level + attended level for strides 8..64, and a 3x3 stride-2 conv-BN-ReLU of the
  stride-64 output for stride 128.

Choices, where docs/methods.md and the official code (``duzw9311/CFPT``,
``mmdet/models/necks/cfpt.py``) leave room; the official structure is followed throughout:

* Padding (our decision): the official module needs levels of exactly 8k, 4k, 2k, k pixels
  (images a multiple of 64). Here the four projected levels are zero-padded at the bottom and
  right to those sizes, for the smallest k that holds them, and the attended maps are
  cropped back before the residual, so any image size works and the outputs have the
  shapes of torchvision's FPN + ``LastLevelP6P7`` on the same C3..C5. Padding after the
  projections keeps the BatchNorm statistics free of padded pixels. With 64-multiple
  images nothing is padded and the module computes what the official one computes.
* As in the official code, CCA unfolds the channel windows over the concatenated q|k|v
  channel axis (so a window's first token at a q/k or k/v boundary is the neighbouring
  section's last channel), overlapping outputs are summed, not averaged, and the
  interpolation of the relative table is linear in its *flattened* index (for CSA the
  fractional row and column are combined into one index, then floor/ceil of that).
* CCA's relative table has ``(2 * 65 - 1) ** 2`` rows per head like the official one,
  although only the first ``2 * 65 - 1`` can be indexed by a 1-D channel offset; the dead
  rows are kept for parameter parity with the official module (they get zero gradient).
* CCPE's per-level bias is added by *query* level, as in the official code (its
  ``absolute_position_bias``). A softmax over keys is blind to a constant per query row, so
  this bias changes no output and gets zero gradient; it is kept for parity, not "fixed".
* The coarsest level's window offsets are not rescaled (official); with alpha = beta = 1 it
  is a single token, so this matters only for larger alpha/beta.
* ``num_blocks`` > 1 stacks further CCA -> CSA blocks before the single outer residual
  (the official module has exactly one and no such argument).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor, nn

from harness.core import ConfigError
from harness.modeling import Neck, NeckConfig

#: Pyramid levels CFPT attends across: C3, C4, C5 projections and the stride-2 conv of C5.
NUM_LEVELS = 4


class CFPTConfig(NeckConfig):
    """CFPT's hyperparameters; defaults = the official module's, as in its RetinaNet-R18 config."""
    alpha: int = 1          # CCA channel-window margin: windows 64+a, 16+a, 4+a, a; odd
    beta: int = 1           # CSA spatial-window margin: windows 8+b, 4+b, 2+b, b; odd
    num_heads: int = Field(4, ge=1)
    mlp_ratio: float = Field(2.0, gt=0)
    reduction: int = Field(4, ge=1)   # qkv / attention width = width // reduction
    num_blocks: int = Field(1, ge=1)  # CCA -> CSA blocks (official: 1)

    @field_validator("alpha", "beta")
    @classmethod
    def _odd_positive(cls, v: int, info) -> int:
        if v < 1 or v % 2 == 0:
            raise ValueError(f"{info.field_name} must be an odd positive integer (it sets the side of "
                             f"every attention window, which must be odd to have a centre), got {v}")
        return v


# --------------------------------------------------------------------------- building blocks
def conv_bn_relu(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Sequential:
    """Conv (no bias, as it is followed by BN) + BatchNorm + ReLU, 'same' padding."""
    return nn.Sequential(OrderedDict([
        ("conv", nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False)),
        ("bn", nn.BatchNorm2d(cout)),
        ("relu", nn.ReLU(inplace=False)),
    ]))


class ConvPosEnc(nn.Module):
    """Convolutional position encoding: ``x + GELU(depthwise 3x3 conv(x))``."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)
        self.act = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        return x + self.act(self.dwconv(x))


class LevelUnit(nn.Module):
    """One level's share of a cross-layer attention: everything but the attention itself."""

    def __init__(self, dim: int, hidden: int, mlp_hidden: int):
        super().__init__()
        self.pos_in = ConvPosEnc(dim)
        self.qkv = nn.Conv2d(dim, 3 * hidden, 1)
        self.proj = nn.Conv2d(hidden, dim, 1)
        self.attn_norm = nn.LayerNorm(dim)
        self.pos_out = ConvPosEnc(dim)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_hidden), nn.GELU(), nn.Linear(mlp_hidden, dim))

    def begin(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(shortcut, qkv map) of a level map."""
        x = self.pos_in(x)
        return x, self.qkv(x)

    def finish(self, shortcut: Tensor, attended: Tensor) -> Tensor:
        y = self.proj(attended).permute(0, 2, 3, 1)                   # channels last
        x = shortcut + self.attn_norm(y).permute(0, 3, 1, 2)
        x = self.pos_out(x).permute(0, 2, 3, 1)
        x = x + self.mlp(self.mlp_norm(x))
        return x.permute(0, 3, 1, 2)


def window_geometry(margin: int, base: int, levels: int = NUM_LEVELS) -> list[tuple[int, int, int]]:
    """(window, stride, padding) per level, finest first: strides base^(L-1) .. 1, windows stride + margin
    (just ``margin`` at stride 1); padding centres every window on the coarsest level's pixel."""
    out = []
    for j in range(levels):
        stride = base ** (levels - 1 - j)
        window = stride + margin if stride > 1 else margin
        out.append((window, stride, math.ceil((window - stride) / 2)))
    return out


class CrossLayerPositionBias(nn.Module):
    """CCPE: an interpolated relative-position table per head plus a learned bias per query level.

    ``offsets[i]`` are level i's token offsets from its window centre, shape ``(tokens_i, dims)``,
    already rescaled by the caller to the first level's window (x window_0 / window_i, every level
    but the last), so scale-matched tokens of different levels share table entries; ``span`` is
    window_0. Fractional relative positions read the table linearly interpolated. ``forward()`` gives the
    ``(heads, N, N)`` bias of query token -> key token over the N tokens of all levels.
    """

    def __init__(self, offsets: list[Tensor], span: int, heads: int):
        super().__init__()
        coords = torch.cat(offsets).double()                         # (N, dims)
        dims = coords.shape[1]
        side = 2 * span - 1
        rel = coords[:, None, :] - coords[None, :, :] + (span - 1)    # (N, N, dims), in [0, side - 1]
        flat = sum(rel[..., d] * side ** (dims - 1 - d) for d in range(dims))
        rows = side * side                                            # the official table size, 1-D or 2-D
        lo = flat.floor().clamp(0, rows - 1)
        hi = flat.ceil().clamp(0, rows - 1)
        self.register_buffer("index_lo", lo.long(), persistent=False)
        self.register_buffer("index_hi", hi.long(), persistent=False)
        self.register_buffer("weight_hi", (flat - lo).float(), persistent=False)
        level = torch.cat([torch.full((len(o),), i) for i, o in enumerate(offsets)])
        self.register_buffer("query_level", level, persistent=False)
        self.table = nn.Parameter(torch.empty(rows, heads))
        self.level_bias = nn.Parameter(torch.zeros(len(offsets), heads))
        nn.init.trunc_normal_(self.table, std=0.02)

    def no_weight_decay(self) -> set[str]:
        """The official recipe decays neither the relative tables nor the position biases
        (honoured with ``schedule.norm_weight_decay``, see :func:`harness.engine.stage.parameter_groups`)."""
        return {"table", "level_bias"}

    def forward(self) -> Tensor:
        w = self.weight_hi.to(self.table.dtype)[..., None]
        bias = self.table[self.index_lo] * (1 - w) + self.table[self.index_hi] * w   # (N, N, heads)
        return bias.permute(2, 0, 1) + self.level_bias[self.query_level].t()[:, :, None]


def cosine_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
    """``softmax(q^ k^T + bias) v`` with q^, k^ the L2-normalised rows of q and k (no temperature)."""
    attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-1, -2)
    return (attn + bias).softmax(dim=-1).to(v.dtype) @ v


class _CrossLayerAttention(nn.Module):
    """Shared part of CCA and CSA: per-level units around one attention over all levels' tokens."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, reduction: int,
                 geometry: list[tuple[int, int, int]], offsets: list[Tensor]):
        super().__init__()
        self.heads, self.hidden = heads, dim // reduction
        self.geometry = geometry
        self.units = nn.ModuleList(LevelUnit(dim, self.hidden, int(dim * mlp_ratio)) for _ in geometry)
        self.pos_bias = CrossLayerPositionBias(offsets, geometry[0][0], heads)

    def _tokens(self, qkv: Tensor, level: int, grid: tuple[int, int]) -> Tensor:
        raise NotImplementedError

    def _untokens(self, out: Tensor, level: int, shape: tuple[int, ...]) -> Tensor:
        raise NotImplementedError

    def forward(self, levels: list[Tensor]) -> list[Tensor]:
        grid = tuple(levels[-1].shape[-2:])
        shortcuts, parts = [], []
        for i, (unit, x) in enumerate(zip(self.units, levels)):
            shortcut, qkv = unit.begin(x)
            shortcuts.append(shortcut)
            parts.append(self._tokens(qkv, i, grid))                  # (3, B, heads, ..., tokens_i, feat)
        axis = -2                                                     # the token axis of both layouts
        q, k, v = torch.cat(parts, dim=axis)
        out = cosine_attention(q, k, v, self.pos_bias().unsqueeze(1))
        sizes = [p.shape[axis] for p in parts]
        return [unit.finish(s, self._untokens(o, i, s.shape))
                for i, (unit, s, o) in enumerate(zip(self.units, shortcuts, out.split(sizes, dim=axis)))]


def window_offsets(geometry: list[tuple[int, int, int]], dims: int) -> list[Tensor]:
    """Per level, its window's token offsets from the centre, ``(tokens, dims)`` (2-D row-major),
    rescaled to the first level's window for every level but the coarsest (official CCPE)."""
    scale0 = geometry[0][0]
    offsets = []
    for j, (ws, _, _) in enumerate(geometry):
        r = torch.arange(ws, dtype=torch.float64) - ws // 2
        if j < len(geometry) - 1:
            r = r * scale0 / ws
        offsets.append(torch.stack(torch.meshgrid(r, r, indexing="ij")).flatten(1).t() if dims == 2 else r[:, None])
    return offsets


class CrossLayerSpatialAttention(_CrossLayerAttention):
    """CSA: for each pixel of the coarsest level, one window of every level, scale-matched."""

    def __init__(self, dim: int, heads: int = 4, mlp_ratio: float = 2.0, reduction: int = 4, beta: int = 1):
        geometry = window_geometry(beta, 2)
        super().__init__(dim, heads, mlp_ratio, reduction, geometry, window_offsets(geometry, dims=2))

    def _tokens(self, qkv: Tensor, level: int, grid: tuple[int, int]) -> Tensor:
        ws, stride, pad = self.geometry[level]
        b = qkv.shape[0]
        cols = F.unfold(qkv, ws, padding=pad, stride=stride)         # (B, 3*hidden*ws*ws, windows)
        cols = cols.reshape(b, 3, self.heads, self.hidden // self.heads, ws * ws, grid[0] * grid[1])
        return cols.permute(1, 0, 2, 5, 4, 3)                         # (3, B, heads, windows, ws*ws, hd)

    def _untokens(self, out: Tensor, level: int, shape: tuple[int, ...]) -> Tensor:
        ws, stride, pad = self.geometry[level]
        b, _, windows, n, hd = out.shape
        cols = out.permute(0, 1, 4, 3, 2).reshape(b, self.hidden * n, windows)
        return F.fold(cols, tuple(shape[-2:]), ws, padding=pad, stride=stride)


class CrossLayerChannelAttention(_CrossLayerAttention):
    """CCA: level i's qkv pixel-unshuffled by 2^(3-i) onto the coarsest grid; overlapping windows of
    unshuffled channels, scale-matched across levels; a token's features are its coarse-grid values."""

    def __init__(self, dim: int, heads: int = 4, mlp_ratio: float = 2.0, reduction: int = 4, alpha: int = 1):
        geometry = window_geometry(alpha, 4)
        super().__init__(dim, heads, mlp_ratio, reduction, geometry, window_offsets(geometry, dims=1))
        self.unshuffle = [2 ** (NUM_LEVELS - 1 - j) for j in range(NUM_LEVELS)]

    def _tokens(self, qkv: Tensor, level: int, grid: tuple[int, int]) -> Tensor:
        ws, stride, pad = self.geometry[level]
        b = qkv.shape[0]
        x = F.pixel_unshuffle(qkv, self.unshuffle[level]).flatten(2)  # (B, 3*hidden*stride, cells)
        x = F.pad(x, (0, 0, pad, pad)).unfold(1, ws, stride)          # (B, 3*hidden, cells, ws)
        x = x.reshape(b, 3, self.heads, self.hidden // self.heads, grid[0] * grid[1], ws)
        return x.permute(1, 0, 2, 3, 5, 4)                            # (3, B, heads, hd, ws, cells)

    def _untokens(self, out: Tensor, level: int, shape: tuple[int, ...]) -> Tensor:
        ws, stride, pad = self.geometry[level]
        b, _, _, _, cells = out.shape
        cols = out.reshape(b, self.hidden, ws, cells).permute(0, 3, 2, 1).reshape(b, cells * ws, self.hidden)
        summed = F.fold(cols, (self.hidden * stride, 1), (ws, 1), padding=(pad, 0), stride=(stride, 1))
        summed = summed.reshape(b, cells, self.hidden * stride).transpose(1, 2)
        u = self.unshuffle[level]
        return F.pixel_shuffle(summed.reshape(b, self.hidden * stride, shape[-2] // u, shape[-1] // u), u)


class CFPTBlock(nn.Module):
    """Cross-layer channel-wise then spatial-wise attention."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, reduction: int, alpha: int, beta: int):
        super().__init__()
        self.channel = CrossLayerChannelAttention(dim, heads, mlp_ratio, reduction, alpha)
        self.spatial = CrossLayerSpatialAttention(dim, heads, mlp_ratio, reduction, beta)

    def forward(self, levels: list[Tensor]) -> list[Tensor]:
        return self.spatial(self.channel(levels))


# --------------------------------------------------------------------------- the neck module
class CFPT(nn.Module):
    """CFPT for C3, C4, C5 (keys ``"0", "1", "2"``) -> five ``width``-channel levels of strides 8..128."""

    def __init__(self, in_channels: Sequence[int], width: int = 256, *, alpha: int = 1, beta: int = 1,
                 num_heads: int = 4, mlp_ratio: float = 2.0, reduction: int = 4, num_blocks: int = 1):
        super().__init__()
        if len(in_channels) != 3:
            raise ValueError(f"CFPT takes C3, C4, C5 (3 stages), got {len(in_channels)} channel counts")
        for name, v in (("alpha", alpha), ("beta", beta)):
            if v < 1 or v % 2 == 0:
                raise ValueError(f"{name} must be an odd positive integer, got {v}")
        hidden = width // reduction
        if hidden < num_heads or hidden % num_heads:
            raise ValueError(f"width // reduction = {width} // {reduction} = {hidden} must be a positive "
                             f"multiple of num_heads = {num_heads}")
        c3, c4, c5 = in_channels
        self.lateral = nn.ModuleList(conv_bn_relu(c, width, 1) for c in (c3, c4, c5))
        self.down = conv_bn_relu(c5, width, 3, stride=2)             # the stride-64 level, from C5
        self.blocks = nn.ModuleList(CFPTBlock(width, num_heads, mlp_ratio, reduction, alpha, beta)
                                    for _ in range(num_blocks))
        self.top = conv_bn_relu(width, width, 3, stride=2)           # the stride-128 level

    def forward(self, features: "OrderedDict[str, Tensor]") -> "OrderedDict[str, Tensor]":
        names = list(features)
        c3, c4, c5 = features.values()
        levels = [conv(x) for conv, x in zip(self.lateral, (c3, c4, c5))] + [self.down(c5)]
        sizes = [tuple(x.shape[-2:]) for x in levels]
        factors = [2 ** (NUM_LEVELS - 1 - j) for j in range(NUM_LEVELS)]
        gh = max(math.ceil(h / f) for (h, _), f in zip(sizes, factors))
        gw = max(math.ceil(w / f) for (_, w), f in zip(sizes, factors))
        x = [F.pad(t, (0, gw * f - w, 0, gh * f - h)) for t, f, (h, w) in zip(levels, factors, sizes)]
        for block in self.blocks:
            x = block(x)
        outs = [t + a[..., :h, :w].to(t.dtype) for t, a, (h, w) in zip(levels, x, sizes)]
        outs.append(self.top(outs[-1]))
        return OrderedDict(zip(names + ["p6", "p7"], outs))


class CFPTNeck(Neck):
    """``neck: cfpt``. RetinaNet only: CFPT does not use C2, and Faster R-CNN needs a stride-4 level."""
    name = "cfpt"
    Config = CFPTConfig
    archs = ("retinanet",)

    def build(self, in_channels: list[int], width: int, arch: str) -> nn.Module:
        try:
            return CFPT(in_channels, width, **self.config.model_dump())
        except ValueError as err:
            raise ConfigError(str(err), field="detector.neck_config") from None


__all__ = ["CFPTConfig", "CFPT", "CFPTNeck", "CFPTBlock", "CrossLayerChannelAttention",
           "CrossLayerSpatialAttention", "CrossLayerPositionBias", "cosine_attention", "window_geometry"]

"""A simple feature pyramid for plain (single-stride) encoders: ViTDet / BEiT style, as Vim uses it.

Vim's dense-prediction backbone (hustvl/Vim ``seg/backbone/vim.py``, ``fpn1..fpn4``) turns four
stride-16 block outputs into strides 4, 8, 16, 32 with
``[deconv 2x2/s2 -> BatchNorm -> GELU -> deconv 2x2/s2]``, ``[deconv 2x2/s2]``, identity and a
2x2/s2 max-pool. :class:`SimplePyramid` builds that for any patch size: a level that must go up by
2^k gets k transposed convs (BatchNorm + GELU between them), a level that must go down by 2^k a
2^k max-pool, and equal strides an identity; the official 16 -> (4, 8, 16, 32) layout is the
special case, with the same parameter names (``levels.0.{0,1,3}``, ``levels.1.0``).

Sizes: a stride-p input map of (gh, gw) = (ceil(H/p), ceil(W/p)) gives (ceil(H/s), ceil(W/s)) at
stride s: up-sampled maps are cropped at the bottom/right (the cropped cells only cover image
padding), max-pools use ``ceil_mode=True``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn

__all__ = ["SimplePyramid"]


def _level(dim: int, factor: float) -> nn.Module:
    if factor == 1:
        return nn.Identity()
    if factor > 1:
        k = int(math.log2(factor))
        layers: list[nn.Module] = []
        for i in range(k):
            if i:
                layers += [nn.BatchNorm2d(dim), nn.GELU()]
            layers.append(nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2))
        return nn.Sequential(*layers)
    k = int(round(1 / factor))
    return nn.MaxPool2d(kernel_size=k, stride=k, ceil_mode=True)


class SimplePyramid(nn.Module):
    """Maps of one stride -> maps at several strides (deconvs up, identity, max-pool down).

    Args:
        dim: channels C (kept at every level).
        in_stride: stride p of the input maps (Vim's patch size, 16).
        strides: output strides; each ratio p / s must be a power of two.

    Shapes: forward(list of L maps (B, C, gh, gw), image_size=(H, W)) -> list of L maps
    (B, C, ceil(H/s_i), ceil(W/s_i)); map i goes through level i.

    Example:
        >>> p = SimplePyramid(8)
        >>> [tuple(f.shape) for f in p([torch.randn(1, 8, 3, 4)] * 4, image_size=(40, 64))]
        [(1, 8, 10, 16), (1, 8, 5, 8), (1, 8, 3, 4), (1, 8, 2, 2)]
    """

    def __init__(self, dim: int, in_stride: int = 16, strides: Sequence[int] = (4, 8, 16, 32)) -> None:
        super().__init__()
        self.in_stride, self.strides = int(in_stride), tuple(int(s) for s in strides)
        for s in self.strides:
            r = max(s, self.in_stride) // min(s, self.in_stride)
            if max(s, self.in_stride) % min(s, self.in_stride) or r & (r - 1):
                raise ValueError(f"stride {s} is not the input stride {in_stride} times or over a power of two")
        self.levels = nn.ModuleList(_level(dim, self.in_stride / s) for s in self.strides)

    def forward(self, feats: Sequence[torch.Tensor], image_size: tuple[int, int] | None = None) -> list[torch.Tensor]:
        if len(feats) != len(self.levels):
            raise ValueError(f"expected {len(self.levels)} maps (one per level), got {len(feats)}")
        return [self.forward_level(i, f, image_size) for i, f in enumerate(feats)]

    def forward_level(self, i: int, f: torch.Tensor, image_size: tuple[int, int] | None = None) -> torch.Tensor:
        """Level ``i`` alone (for a subset of levels)."""
        y = self.levels[i](f)
        s = self.strides[i]
        if image_size is not None and s < self.in_stride:
            y = y[..., : -(-image_size[0] // s), : -(-image_size[1] // s)]
        return y

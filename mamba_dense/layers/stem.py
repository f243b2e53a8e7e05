"""Patch-embedding stems: image (B, 3, H, W) -> channels-last tokens (B, H/4, W/4, C).

Any input size is accepted; the output is ceil(H/4) x ceil(W/4):

- :class:`ConvStem` (VMamba v2 ``patchembed_version="v2"``): two 3x3 stride-2 convolutions,
  LayerNorm + GELU between them and LayerNorm after. Stride-2 3x3 convs with padding 1 give
  ceil(H/2) per step, so odd sizes need no padding.
- :class:`PatchEmbed` (VMamba v0 / LocalMamba): one 4x4 stride-4 convolution + LayerNorm; the image
  is zero-padded at the bottom/right to a multiple of 4 first.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ConvStem", "PatchEmbed"]


class ConvStem(nn.Module):
    """Two 3x3 stride-2 convs (C/2 then C) with LayerNorm/GELU: the released VMamba stem.

    Args:
        in_chans: image channels.
        embed_dim: output channels C (the first conv has C // 2).
        norm_eps: LayerNorm epsilon.

    Shapes: (B, in_chans, H, W) -> (B, ceil(H/4), ceil(W/4), C), channels-last.

    Example:
        >>> ConvStem(3, 16)(torch.randn(1, 3, 63, 45)).shape
        torch.Size([1, 16, 12, 16])
    """

    def __init__(self, in_chans: int = 3, embed_dim: int = 96, norm_eps: float = 1e-5) -> None:
        super().__init__()
        mid = embed_dim // 2
        self.conv1 = nn.Conv2d(in_chans, mid, kernel_size=3, stride=2, padding=1)
        self.norm1 = nn.LayerNorm(mid, eps=norm_eps)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(mid, embed_dim, kernel_size=3, stride=2, padding=1)
        self.norm2 = nn.LayerNorm(embed_dim, eps=norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x).permute(0, 2, 3, 1)  # (B, H/2, W/2, C/2)
        x = self.act(self.norm1(x)).permute(0, 3, 1, 2)
        x = self.conv2(x).permute(0, 2, 3, 1)  # (B, H/4, W/4, C)
        return self.norm2(x).contiguous()


class PatchEmbed(nn.Module):
    """Non-overlapping patch embedding (conv k = s = patch_size) + LayerNorm.

    Args:
        in_chans: image channels.
        embed_dim: output channels C.
        patch_size: patch side (4 in VMamba v0 / LocalMamba).
        norm_eps: LayerNorm epsilon.

    Shapes: (B, in_chans, H, W) -> (B, ceil(H/p), ceil(W/p), C); the image is zero-padded at the
    bottom/right to a multiple of p.

    Example:
        >>> PatchEmbed(3, 16)(torch.randn(1, 3, 63, 45)).shape
        torch.Size([1, 16, 12, 16])
    """

    def __init__(self, in_chans: int = 3, embed_dim: int = 96, patch_size: int = 4, norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        ph, pw = (-x.shape[-2]) % p, (-x.shape[-1]) % p
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        return self.norm(self.proj(x).permute(0, 2, 3, 1)).contiguous()

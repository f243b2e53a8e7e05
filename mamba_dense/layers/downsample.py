"""Stage transitions: halve H and W, change channels; channels-last in and out.

- :class:`ConvDownsample` (VMamba ``downsample_version="v3"``): 3x3 stride-2 conv + LayerNorm.
- :class:`PatchMerging` (Swin / VMamba v0 / LocalMamba): concatenate each 2x2 neighbourhood
  (order: (0,0), (1,0), (0,1), (1,1)), LayerNorm(4C), linear 4C -> C_out without bias.

Both give ceil(H/2) x ceil(W/2) for any H, W (PatchMerging zero-pads odd sizes).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ConvDownsample", "PatchMerging"]


class ConvDownsample(nn.Module):
    """3x3 stride-2 convolution + LayerNorm.

    Args:
        dim: input channels. out_dim: output channels. norm_eps: LayerNorm epsilon.

    Shapes: (B, H, W, dim) -> (B, ceil(H/2), ceil(W/2), out_dim).

    Example:
        >>> ConvDownsample(8, 16)(torch.randn(2, 7, 5, 8)).shape
        torch.Size([2, 4, 3, 16])
    """

    def __init__(self, dim: int, out_dim: int, norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, out_dim, kernel_size=3, stride=2, padding=1)
        self.norm = nn.LayerNorm(out_dim, eps=norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.norm(x).contiguous()


class PatchMerging(nn.Module):
    """2x2 patch merging: LayerNorm(4*dim) then a bias-free linear 4*dim -> out_dim.

    Shapes: (B, H, W, dim) -> (B, ceil(H/2), ceil(W/2), out_dim).

    Example:
        >>> PatchMerging(8, 16)(torch.randn(2, 7, 5, 8)).shape
        torch.Size([2, 4, 3, 16])
    """

    def __init__(self, dim: int, out_dim: int | None = None, norm_eps: float = 1e-5) -> None:
        super().__init__()
        out_dim = out_dim or 2 * dim
        self.norm = nn.LayerNorm(4 * dim, eps=norm_eps)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[1:3]
        if H % 2 or W % 2:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        # NOTE: (row, col) order (0,0), (1,0), (0,1), (1,1) as in Swin/VMamba, so released weights fit.
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))

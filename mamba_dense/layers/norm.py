"""Layer norms for channels-last and channels-first feature maps.

Inside the encoders feature maps are kept channels-last, (B, H, W, C), so a plain
:class:`torch.nn.LayerNorm` normalises over channels. :class:`LayerNorm2d` does the same for a
channels-first map (B, C, H, W) without a permuted copy escaping to the caller.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["LayerNorm2d", "LayerNormNHWC"]

LayerNormNHWC = nn.LayerNorm
"""LayerNorm over the last (channel) dimension of a (B, H, W, C) map: ``nn.LayerNorm`` itself."""


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a channels-first map.

    Args:
        num_channels: C.
        eps: added to the variance (1e-5 as in ``nn.LayerNorm`` and the VMamba releases).

    Shapes: (B, C, H, W) -> (B, C, H, W).

    Example:
        >>> LayerNorm2d(8)(torch.randn(2, 8, 5, 7)).shape
        torch.Size([2, 8, 5, 7])
    """

    def __init__(self, num_channels: int, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__(num_channels, eps=eps, elementwise_affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)

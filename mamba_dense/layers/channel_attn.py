"""Channel attention on per-route scan outputs (LocalMamba's SCAttn as released).

The released LocalMamba keeps only the channel branch of its SCAttn (the spatial branch is
commented out): LayerNorm -> mean over tokens -> Linear(C, C/8) -> GELU -> Linear(C/8, C) ->
sigmoid, and the input is multiplied by that channel gate. One module is shared by all routes of
a mixer and applied to each route's output separately (its own token mean).
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["ChannelAttention"]


class ChannelAttention(nn.Module):
    """Squeeze-excite style channel gate computed from the token mean.

    Args:
        dim: channels C.
        reduction_ratio: hidden width = int(C * reduction_ratio) (0.125 = reduction 8).
        norm_eps: LayerNorm epsilon (1e-5, ``nn.LayerNorm`` default as released).

    Shapes: (B, L, C) -> (B, L, C), or (B, L, K, C) -> (B, L, K, C) with one gate per route k
    (the mean runs over L only).

    Example:
        >>> ChannelAttention(16)(torch.randn(2, 10, 4, 16)).shape
        torch.Size([2, 10, 4, 16])
    """

    def __init__(self, dim: int, reduction_ratio: float = 0.125, norm_eps: float = 1e-5) -> None:
        super().__init__()
        hidden = int(dim * reduction_ratio)
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.global_reduce = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.channel_select = nn.Linear(hidden, dim)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.norm(x).mean(dim=1, keepdim=True)  # (B, 1, [K,] C)
        g = self.gate(self.channel_select(self.act(self.global_reduce(g))))
        return x * g

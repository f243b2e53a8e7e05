"""Token MLP (the FFN of VMamba / Swin blocks), channels-last."""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["Mlp"]


class Mlp(nn.Module):
    """Two linear layers with an activation between them, on the last dimension.

    Args:
        in_features: input channels C.
        hidden_features: hidden width (default C; VMamba uses 4C).
        out_features: output channels (default C).
        act_layer: activation class (GELU).
        drop: dropout after each linear layer.

    Shapes: (..., C) -> (..., out_features), e.g. (B, H, W, C) maps.

    Example:
        >>> Mlp(8, 32)(torch.randn(2, 4, 4, 8)).shape
        torch.Size([2, 4, 4, 8])
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: type[nn.Module] = nn.GELU,
        drop: float = 0.0,
    ) -> None:
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))

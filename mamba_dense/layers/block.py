"""The pre-norm residual block shared by the hierarchical encoders (VMamba's VSSBlock)."""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import DropPath

from .mlp import Mlp

__all__ = ["VSSBlock"]


class VSSBlock(nn.Module):
    """x + DropPath(mixer(LN x)), then (if mlp_ratio > 0) x + DropPath(MLP(LN x)); channels-last.

    Args:
        dim: width C.
        mixer: the token mixer (e.g. :class:`~mamba_dense.layers.SS2D`), (B, H, W, C) -> same.
        mlp_ratio: MLP hidden = int(C * mlp_ratio); 0 drops the MLP branch (VMamba v0, LocalMamba).
        drop_path: stochastic depth rate.
        norm_eps: LayerNorm epsilon.

    Shapes: (B, H, W, C) -> (B, H, W, C).

    Example:
        >>> from mamba_dense.layers import SS2D
        >>> VSSBlock(16, SS2D(16))(torch.randn(1, 4, 6, 16)).shape
        torch.Size([1, 4, 6, 16])
    """

    def __init__(
        self,
        dim: int,
        mixer: nn.Module,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        norm_eps: float = 1e-5,
        mlp_act_layer: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.op = mixer
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        if mlp_ratio > 0:
            self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
            self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=mlp_act_layer)
        else:
            self.norm2 = self.mlp = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.op(self.norm(x)))
        if self.mlp is not None:
            x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x

    def forward_with_registers(self, x: torch.Tensor, registers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The same block on a map (B, H, W, C) plus register tokens (B, R, C).

        The mixer must provide ``forward_with_registers``; norms, MLP and DropPath treat registers
        as tokens (one DropPath draw per sample covers map and registers alike).
        """
        B, H, W, C = x.shape
        dx, dr = self.op.forward_with_registers(self.norm(x), self.norm(registers))
        t = torch.cat([x.reshape(B, H * W, C), registers], 1)
        t = t + self.drop_path(torch.cat([dx.reshape(B, H * W, C), dr], 1))  # (B, H*W + R, C)
        if self.mlp is not None:
            t = t + self.drop_path(self.mlp(self.norm2(t)))
        return t[:, : H * W].reshape(B, H, W, C), t[:, H * W :]

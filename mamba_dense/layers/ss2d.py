"""SS2D: VMamba's 2D selective-scan token mixer, channels-last, on the shared scan operator.

``x (B, H, W, C)`` -> in_proj (1x1, no bias; doubled with a SiLU gate z when ``gate=True``)
-> 3x3 depthwise conv + SiLU -> :class:`~mamba_dense.layers.ssm.SSMCore` over K routes from
``route_fn(H, W)`` (VMamba: the 4-way cross scan, merged by the kernel) -> LayerNorm(d_inner)
-> (* SiLU(z)) -> out_proj (no bias).

The released VMamba v2 design (``forward_type="v05_noz"``) is ``gate=False, conv_bias=False``;
the vanilla v0 design is ``gate=True, conv_bias=True``. Subclasses change the routes
(``route_fn``) or override :meth:`SS2D.scan` (LocalMamba's per-route channel attention).

Register tokens (Mamba(R), optional): :meth:`SS2D.forward_with_registers` takes R extra tokens
(B, R, C) next to the map. They share in_proj / SiLU / out_norm / out_proj with the map tokens,
skip the (spatial) depthwise conv, and are appended after the H*W map tokens; every route visits
them at evenly spaced steps (``routes.with_registers``).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from mamba_dense.kernels import routes as _routes

from .ssm import SSMCore

__all__ = ["SS2D"]


class SS2D(nn.Module):
    """2D selective-scan mixer.

    Args:
        dim: block width C.
        d_state: SSM state size N (1 in released VMamba v2, 16 in v0).
        ssm_ratio: d_inner = int(ssm_ratio * C).
        dt_rank: "auto" = ceil(C / 16), or an int.
        d_conv: depthwise conv size (< 2 disables the conv).
        conv_bias: bias of the depthwise conv.
        gate: multiply by SiLU(z) from a second in_proj half (v0 / Mamba style).
        dropout: dropout after out_proj.
        norm_eps: epsilon of the output LayerNorm.
        num_routes: K; must match ``route_fn``.
        route_fn: (H, W) -> int64 (K, S) route tensor; default ``routes.cross2d``.

    Shapes: (B, H, W, C) -> (B, H, W, C).

    Example:
        >>> m = SS2D(16, d_state=1, ssm_ratio=1.0)
        >>> m(torch.randn(2, 5, 3, 16)).shape
        torch.Size([2, 5, 3, 16])
    """

    def __init__(
        self,
        dim: int,
        d_state: int = 1,
        ssm_ratio: float = 1.0,
        dt_rank: int | str = "auto",
        d_conv: int = 3,
        conv_bias: bool = False,
        gate: bool = False,
        dropout: float = 0.0,
        norm_eps: float = 1e-5,
        num_routes: int = 4,
        route_fn: Callable[[int, int], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.d_inner = d_inner = int(ssm_ratio * dim)
        self.gate = gate
        self.route_fn = route_fn or _routes.cross2d
        self.in_proj = nn.Linear(dim, d_inner * (2 if gate else 1), bias=False)
        self.act = nn.SiLU()
        self.conv2d = (
            nn.Conv2d(d_inner, d_inner, d_conv, padding=(d_conv - 1) // 2, groups=d_inner, bias=conv_bias)
            if d_conv > 1
            else None
        )
        self.ssm = SSMCore(d_inner, num_routes, d_state=d_state, dt_rank=dt_rank, d_model=dim)
        self.out_norm = nn.LayerNorm(d_inner, eps=norm_eps)
        self.out_proj = nn.Linear(d_inner, dim, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def route_fn(self) -> Callable[[int, int], torch.Tensor]:
        return self._route_fn

    @route_fn.setter
    def route_fn(self, fn: Callable[[int, int], torch.Tensor]) -> None:
        self._route_fn = fn
        self.route_key = _routes.source_key(fn)  # a plain string: a constant under torch.compile

    def routes_for(self, h: int, w: int, num_registers: int = 0) -> torch.Tensor:
        """The (K, S) route tensor for an h x w map (+ registers); CPU, cached."""
        return _routes.built_route(self.route_key, h, w, registers=num_registers)

    def scan(self, tokens: torch.Tensor, route: torch.Tensor) -> torch.Tensor:
        """Selective scan of tokens (B, L, D) along ``route``, merged: -> (B, L, D)."""
        return self.ssm(tokens, route, merge="sum")

    def _mix(self, x: torch.Tensor, registers: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, H, W, _ = x.shape
        R = 0 if registers is None else registers.shape[1]
        xz = self.in_proj(x if registers is None else torch.cat([x.reshape(B, H * W, -1), registers], 1))
        if self.gate:
            u, z = xz.chunk(2, dim=-1)
        else:
            u, z = xz, None
        u_map = u[:, : H * W].reshape(B, H, W, -1) if R else u
        if self.conv2d is not None:
            u_map = self.conv2d(u_map.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # depthwise conv, NCHW view
        tokens = u_map.reshape(B, H * W, -1)
        if R:
            tokens = torch.cat([tokens, u[:, H * W :]], dim=1)
        tokens = self.act(tokens).contiguous()  # (B, H*W + R, D)
        route = _routes.device_route(self.route_key, H, W, registers=R, device=tokens.device)
        y = self.out_norm(self.scan(tokens, route))
        if z is not None:
            y = y * self.act(z.reshape(B, H * W + R, -1))
        y = self.dropout(self.out_proj(y))
        return y[:, : H * W].reshape(B, H, W, -1), (y[:, H * W :] if R else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._mix(x, None)[0]

    def forward_with_registers(self, x: torch.Tensor, registers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mix a map (B, H, W, C) together with register tokens (B, R, C); returns both."""
        y, r = self._mix(x, registers)
        assert r is not None
        return y, r

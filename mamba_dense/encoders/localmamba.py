"""LocalMamba (Huang et al., "LocalMamba: Visual State Space Model with Windowed Selective Scan", 2024).

The released ``local_vssm_tiny`` / ``local_vssm_small`` (hunto/LocalMamba ``local_vmamba.py``):
the vanilla-VMamba skeleton (4x4 patch embed + LN, patch merging, no MLP, d_state 16, expand 2,
SiLU-gated SS2D with a biased depthwise conv) where every block scans 4 routes chosen per block
by the authors' direction search from {h, h_flip, v, v_flip, w2, w2_flip, w7, w7_flip}:

- ``h``/``v``: row-/column-major over the map; ``wK``: K x K windows in row-major order, tokens
  row-major inside a window, the map zero-padded at the bottom/right to multiples of K with the
  padding kept in the sequence (``-1`` steps of ``routes.localmamba``); ``_flip`` reverses.
- the scan runs with ``merge="none"``; each route's output (back on the tokens, padding dropped)
  goes through the shared channel attention (SCAttn as released: channel branch only, LN, token
  mean, reduction 8, sigmoid) and the routes are summed, then out LN, * SiLU(z), out_proj.

Parameters with a 1000-class head: T (15 blocks, depths 2-2-9-2) 25,527,160, S (33 blocks,
2-2-27-2) 49,748,536: exactly the released ``local_vssm_tiny`` / ``local_vssm_small`` (checked key
by key against their layout in ``tests/encoders``); the paper rounds them to 26M / 50M.

With ``num_registers`` the register tokens are appended to every route (``routes.with_registers``
on the padded LocalMamba routes) and take part in each route's channel-attention token mean.

The route inverse is exact for any H != W (the kernel scatters each step back to the token it
visited), unlike a reshape-based reverse that assumes square maps.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import torch
import torch.nn as nn

from mamba_dense.kernels import routes
from mamba_dense.layers import SS2D, ChannelAttention

from ._builder import build_encoder, encoder_cfg
from ._registry import register_encoder
from .vmamba import VMamba, checkpoint_filter_fn

__all__ = ["LocalSS2D", "LocalVMamba", "LOCALVMAMBA_TINY_DIRECTIONS", "LOCALVMAMBA_SMALL_DIRECTIONS"]

# Per-block directions selected by the authors' search (blocks of all stages, in order).
LOCALVMAMBA_TINY_DIRECTIONS: tuple[tuple[str, ...], ...] = (
    ("h", "h_flip", "w7", "w7_flip"),
    ("h_flip", "v_flip", "w2", "w2_flip"),
    ("h_flip", "v_flip", "w2_flip", "w7"),
    ("h_flip", "v", "v_flip", "w2"),
    ("h", "h_flip", "v_flip", "w2_flip"),
    ("h_flip", "v_flip", "w2", "w2_flip"),
    ("h", "w2_flip", "w7", "w7_flip"),
    ("h", "h_flip", "v", "v_flip"),
    ("h", "v_flip", "w7", "w7_flip"),
    ("h_flip", "v", "w2", "w7_flip"),
    ("v", "v_flip", "w2", "w7_flip"),
    ("h", "h_flip", "v_flip", "w2_flip"),
    ("v_flip", "w2_flip", "w7", "w7_flip"),
    ("h_flip", "v_flip", "w2_flip", "w7_flip"),
    ("h_flip", "v", "w7", "w7_flip"),
)

LOCALVMAMBA_SMALL_DIRECTIONS: tuple[tuple[str, ...], ...] = (
    ("h", "v", "v_flip", "w7_flip"),
    ("h", "h_flip", "v", "w7"),
    ("h_flip", "v", "v_flip", "w7"),
    ("h_flip", "v", "w2_flip", "w7"),
    ("h_flip", "v", "w2_flip", "w7"),
    ("h_flip", "v_flip", "w2", "w7_flip"),
    ("h_flip", "v", "v_flip", "w7"),
    ("h", "v", "v_flip", "w7"),
    ("h", "v", "v_flip", "w7"),
    ("h", "v", "v_flip", "w7_flip"),
    ("h", "h_flip", "v", "v_flip"),
    ("h", "v", "v_flip", "w2"),
    ("v", "v_flip", "w2_flip", "w7"),
    ("h", "h_flip", "v", "w2"),
    ("h_flip", "v", "v_flip", "w7_flip"),
    ("h", "h_flip", "v", "v_flip"),
    ("h", "v", "v_flip", "w7_flip"),
    ("h", "v", "v_flip", "w7_flip"),
    ("h", "h_flip", "v_flip", "w7"),
    ("h_flip", "v_flip", "w2_flip", "w7"),
    ("h_flip", "v", "v_flip", "w7_flip"),
    ("v", "v_flip", "w7", "w7_flip"),
    ("h", "v", "v_flip", "w7_flip"),
    ("h_flip", "v", "v_flip", "w2"),
    ("h", "v", "v_flip", "w2_flip"),
    ("h", "h_flip", "v", "w7"),
    ("h", "h_flip", "w7", "w7_flip"),
    ("h", "v_flip", "w2", "w2_flip"),
    ("h", "v_flip", "w2", "w7"),
    ("h", "v", "v_flip", "w7_flip"),
    ("h_flip", "v", "w2_flip", "w7"),
    ("h_flip", "v_flip", "w7", "w7_flip"),
    ("h", "v", "w7", "w7_flip"),
)


class LocalSS2D(SS2D):
    """SS2D over LocalMamba directions with per-route channel attention before the route sum.

    Args:
        dim: block width C.
        directions: the routes of this block, e.g. ``("h", "h_flip", "w7", "w7_flip")``.
        reduction_ratio: channel-attention hidden width factor (0.125 as released).
        **kwargs: :class:`~mamba_dense.layers.SS2D` settings (d_state, ssm_ratio, gate, ...).

    Shapes: (B, H, W, C) -> (B, H, W, C).

    Example:
        >>> m = LocalSS2D(16, ("h", "v_flip", "w2", "w7_flip"), d_state=4, ssm_ratio=2.0, gate=True)
        >>> m(torch.randn(2, 5, 3, 16)).shape
        torch.Size([2, 5, 3, 16])
    """

    def __init__(self, dim: int, directions: Sequence[str], reduction_ratio: float = 0.125, **kwargs: Any) -> None:
        directions = tuple(directions)
        bad = [d for d in directions if d not in routes.LOCALMAMBA_DIRECTIONS]
        if bad:
            raise ValueError(f"unknown LocalMamba directions {bad}; choose from {routes.LOCALMAMBA_DIRECTIONS}")
        super().__init__(dim, num_routes=len(directions), **kwargs)
        self.directions = directions
        self.attn = ChannelAttention(self.d_inner, reduction_ratio)

        self.route_fn = functools.partial(routes.localmamba, directions=directions)

    def scan(self, tokens: torch.Tensor, route: torch.Tensor) -> torch.Tensor:
        y = self.ssm(tokens, route, merge="none")  # (B, L, K, D): each route's output on the tokens
        return self.attn(y).sum(dim=2)

    def extra_repr(self) -> str:
        return f"directions={self.directions}"


class LocalVMamba(VMamba):
    """LocalMamba's hierarchical encoder (LocalVMamba).

    Args:
        directions: one 4-tuple of directions per block over all stages (length sum(depths)).
        reduction_ratio: channel-attention width factor.
        **kwargs: :class:`~mamba_dense.encoders.VMamba` arguments; the defaults below are the
            released ones (v0 skeleton: patch stem, patch merging, gated SS2D, no MLP).
    """

    def __init__(
        self,
        directions: Sequence[Sequence[str]] = LOCALVMAMBA_TINY_DIRECTIONS,
        depths: Sequence[int] = (2, 2, 9, 2),
        reduction_ratio: float = 0.125,
        **kwargs: Any,
    ) -> None:
        directions = tuple(tuple(d) for d in directions)
        if len(directions) != sum(depths):
            raise ValueError(
                f"directions lists {len(directions)} blocks but depths {tuple(depths)} make {sum(depths)}; "
                "give one tuple of directions per block"
            )
        self._directions = directions
        self._reduction_ratio = reduction_ratio
        defaults = dict(
            dims=96, d_state=16, ssm_ratio=2.0, conv_bias=True, gate=True, mlp_ratio=0.0,
            stem="patch", downsample="merge", drop_path_rate=0.2,
        )
        super().__init__(depths=depths, **dict(defaults, **kwargs))

    _mixer_cls = LocalSS2D
    _mixer_own = ("dim", "num_routes", "route_fn", "directions", "reduction_ratio")

    def _make_mixer(self, dim: int, block_idx: int) -> nn.Module:
        return LocalSS2D(dim, self._directions[block_idx], reduction_ratio=self._reduction_ratio, **self.ssm_cfg)


default_cfgs = {
    "localvmamba_tiny": encoder_cfg(first_conv="stem.proj", license="apache-2.0"),
    "localvmamba_small": encoder_cfg(first_conv="stem.proj", license="apache-2.0"),
}


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> LocalVMamba:
    return build_encoder(LocalVMamba, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


@register_encoder
def localvmamba_tiny(pretrained: bool = False, **kwargs: Any) -> LocalVMamba:
    """LocalVMamba-T (``local_vssm_tiny``): depths 2-2-9-2, 26M params."""
    args = dict(depths=(2, 2, 9, 2), directions=LOCALVMAMBA_TINY_DIRECTIONS, drop_path_rate=0.2)
    return _create("localvmamba_tiny", pretrained, **dict(args, **kwargs))


@register_encoder
def localvmamba_small(pretrained: bool = False, **kwargs: Any) -> LocalVMamba:
    """LocalVMamba-S (``local_vssm_small``): depths 2-2-27-2, 50M params."""
    args = dict(depths=(2, 2, 27, 2), directions=LOCALVMAMBA_SMALL_DIRECTIONS, drop_path_rate=0.2)
    return _create("localvmamba_small", pretrained, **dict(args, **kwargs))

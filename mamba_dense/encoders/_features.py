"""The feature contract shared by the 2D hierarchical encoders (timm's, see DESIGN.md).

:class:`HierarchicalEncoder` holds ``stem`` (image -> (B, H/4, W/4, C0) channels-last),
``stages`` (4 :class:`EncoderStage`: optional downsample, then blocks), the final ``norm`` and a
linear ``head``, and provides:

- ``feature_info``: ``[dict(num_chs=C_i, reduction=4 * 2**i, module="stages.i")]``;
- ``forward_intermediates(x, indices=None, norm=False, stop_early=False, output_fmt="NCHW",
  intermediates_only=False, return_registers=False)``;
- ``prune_intermediate_layers``, ``forward_features``, ``forward_head``, ``reset_classifier``,
  ``set_grad_checkpointing``, ``no_weight_decay``.

Input size rule: any H, W >= 1. Every stride-2 step rounds up (3x3/s2 convs with padding 1, or
zero-padding of odd maps), so the stage-i map is ceil(H / 2**(i+2)) x ceil(W / 2**(i+2)). Nothing
is cropped and no token outside the (implicitly padded) image is scanned.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn
from timm.models._features import feature_take_indices
from torch.utils.checkpoint import checkpoint

__all__ = ["EncoderStage", "HierarchicalEncoder", "check_image_batch", "feature_sizes"]


def check_image_batch(x: torch.Tensor, in_chans: int) -> None:
    """ValueError unless ``x`` is a non-empty (B, in_chans, H, W) batch with B, H, W >= 1."""
    if x.dim() != 4 or x.shape[1] != in_chans:
        raise ValueError(
            f"expected an image batch (B, {in_chans}, H, W), got {tuple(x.shape)}; "
            f"build the encoder with in_chans={x.shape[1] if x.dim() == 4 else '?'} for other channel counts"
        )
    if min(x.shape[0], x.shape[2], x.shape[3]) < 1:
        raise ValueError(
            f"expected at least one image of at least 1 x 1 pixels (any H, W >= 1 works), got (B, C, H, W) = "
            f"{tuple(x.shape)}; drop empty images and batches before the encoder"
        )


def feature_sizes(height: int, width: int, reductions: Sequence[int] = (4, 8, 16, 32)) -> list[tuple[int, int]]:
    """Spatial size of each feature map for an input of (height, width): ceil division per stage."""
    return [(-(-height // r), -(-width // r)) for r in reductions]


class EncoderStage(nn.Module):
    """One stage: ``downsample`` (identity for the first stage) then ``blocks``, channels-last.

    With ``num_registers`` R > 0 the stage owns R learnable register tokens (Mamba(R)) of its
    width: they enter after the downsample, pass through every block next to the map (each block's
    routes visit them at evenly spaced steps) and are dropped at the end of the stage, so features
    and the next stage see maps only.
    """

    def __init__(
        self, blocks: Sequence[nn.Module], downsample: nn.Module | None = None, dim: int = 0, num_registers: int = 0
    ) -> None:
        super().__init__()
        self.downsample = downsample if downsample is not None else nn.Identity()
        self.blocks = nn.Sequential(*blocks)
        self.grad_checkpointing = False
        if num_registers < 0:
            raise ValueError(f"num_registers must be >= 0, got {num_registers}")
        self.registers = nn.Parameter(torch.zeros(num_registers, dim)) if num_registers else None
        if self.registers is not None:
            nn.init.trunc_normal_(self.registers, std=0.02)

    def forward_with_registers(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, H, W, C_in) -> the stage's map (B, H', W', C) and its registers (B, R, C) (None if R = 0)."""
        x = self.downsample(x)
        if self.registers is None:
            if self.grad_checkpointing and torch.is_grad_enabled():
                for blk in self.blocks:
                    x = checkpoint(blk, x, use_reentrant=False)
                return x, None
            return self.blocks(x), None
        regs = self.registers.to(x.dtype).expand(x.shape[0], -1, -1)
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x, regs = checkpoint(blk.forward_with_registers, x, regs, use_reentrant=False)
            else:
                x, regs = blk.forward_with_registers(x, regs)
        return x, regs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_registers(x)[0]  # registers dropped before the map becomes a feature


def _check_pool(global_pool: str) -> str:
    if global_pool not in ("avg", ""):
        raise ValueError(f"global_pool={global_pool!r}: expected 'avg' or '' (no pooling)")
    return global_pool


class HierarchicalEncoder(nn.Module):
    """Base class: 4-stage channels-last encoder with the timm feature contract.

    Subclasses build ``self.stem``, ``self.stages`` (ModuleList of :class:`EncoderStage`) and call
    :meth:`_init_head` at the end of ``__init__``.

    Args (of :meth:`_init_head`):
        dims: channels per stage.
        num_classes: classifier outputs (0: no head, ``forward`` returns pooled features).
        feature_norms: add a LayerNorm per stage applied to every returned feature map (what
            the official dense-prediction backbones, ``Backbone_VSSM``, do with ``outnorm{i}``).
    """

    stem: nn.Module
    stages: nn.ModuleList

    def _init_head(self, dims: Sequence[int], num_classes: int, in_chans: int, feature_norms: bool, norm_eps: float,
                   drop_rate: float = 0.0, global_pool: str = "avg") -> None:
        self.dims = list(dims)
        self.global_pool = _check_pool(global_pool)
        self.drop_rate = float(drop_rate)
        self.head_drop = nn.Dropout(self.drop_rate)
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = self.dims[-1]
        self.feature_info = [
            dict(num_chs=c, reduction=4 * 2**i, module=f"stages.{i}") for i, c in enumerate(self.dims)
        ]
        self.feature_norms = (
            nn.ModuleList([nn.LayerNorm(c, eps=norm_eps) for c in self.dims]) if feature_norms else None
        )
        self.norm = nn.LayerNorm(self.num_features, eps=norm_eps)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    # ---------------------------------------------------------------- init helpers
    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """Official VMamba/LocalMamba init: trunc_normal(0.02) linears with zero bias, LN = (1, 0)."""
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # ---------------------------------------------------------------- timm API
    def _check_input(self, x: torch.Tensor) -> None:
        check_image_batch(x, self.in_chans)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for s in self.stages:
            s.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {n for n, p in self.named_parameters() if getattr(p, "_no_weight_decay", False)}

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            self.global_pool = _check_pool(global_pool)
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        return_registers: bool = False,
    ) -> list[Any] | tuple[torch.Tensor, list[Any]]:
        """Run the encoder and return the stage outputs.

        Args:
            x: (B, in_chans, H, W) images, any H, W.
            indices: stages to return: None = all 4, an int n = the last n, a list = those indices.
            norm: also apply the final ``norm`` to the last stage's map when it is returned.
            stop_early: stop after the last requested stage (ignored when the final output is needed).
            output_fmt: "NCHW" (default) or "NHWC".
            intermediates_only: return only the list of maps.
            return_registers: each feature becomes a tuple (map, registers (B, R, C_i)): the
                stage's register tokens after its last block (R = 0 gives (B, 0, C_i)); timm's
                ``return_prefix_tokens`` convention.

        Returns:
            list of maps, stage i of shape (B, C_i, ceil(H/r_i), ceil(W/r_i)) with r_i = 4 * 2**i
            (or NHWC); with ``intermediates_only=False`` a tuple (final normed NHWC map, list).
        """
        fmt = str(getattr(output_fmt, "value", output_fmt))
        if fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        self._check_input(x)
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        stages = self.stages[: max_index + 1] if (stop_early and intermediates_only) else self.stages
        last = len(self.stages) - 1
        x = self.stem(x)
        intermediates: list[Any] = []
        for i, stage in enumerate(stages):
            x, regs = stage.forward_with_registers(x)
            if i in take_indices:
                y = x
                if self.feature_norms is not None:
                    y = self.feature_norms[i](y)
                if norm and i == last:
                    y = self.norm(y)
                y = y.permute(0, 3, 1, 2) if fmt == "NCHW" else y
                if return_registers:
                    y = (y, regs if regs is not None else x.new_zeros(x.shape[0], 0, x.shape[-1]))
                intermediates.append(y)
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop stages after the last requested one (and the head / final norm); returns the indices."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0)
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> final normed map (B, H/32, W/32, C_3), channels-last."""
        self._check_input(x)
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, H, W, C) final map -> (B, num_classes); with ``global_pool=""`` no pooling:
        (B, H, W, num_classes), or the (B, H, W, C) map itself with ``pre_logits``."""
        if getattr(self, "global_pool", "avg") == "avg":
            x = x.mean(dim=(1, 2))
        x = self.head_drop(x) if hasattr(self, "head_drop") else x
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


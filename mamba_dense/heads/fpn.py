"""Semantic FPN head (Kirillov et al., Panoptic FPN) on smp's `FPNDecoder`.

smp's decoder is the right one here: top-down FPN (1x1 laterals, nearest upsampling),
per-level 3x3 conv + GroupNorm + ReLU + 2x upsampling to stride 4, summed. GroupNorm makes it
batch-size independent. Its 2x bilinear upsampling uses align_corners=True; ours uses
align_corners=False, as mmseg's and detectron2's semantic-FPN heads and every other resize here.
We only add the 1x1 classifier and a clear error for its size rule:
it upsamples by exactly 2 between levels, so the maps must halve exactly (the task pads inputs
to a multiple of 32 for that).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.decoders.fpn.decoder import Conv3x3GNReLU, FPNDecoder
from torch import nn

from ._checks import check_feature_maps, check_positive


class _Conv3x3GNReLU(Conv3x3GNReLU):
    """smp's block (same parameters) with a half-pixel (align_corners=False) 2x upsampling."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(x)
        if self.upsample:
            x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
        return x


class FPNHead(nn.Module):
    """Semantic FPN decoder + classifier.

    Args:
        in_channels: channels of the four encoder maps, finest first (strides 4, 8, 16, 32).
        num_classes: output classes.
        pyramid_channels: FPN width (256 in the paper).
        segmentation_channels: width of the per-level upsampling branch (128; multiple of 32,
            since smp uses GroupNorm(32)).
        dropout: Dropout2d on the merged map.
        merge_policy: "add" (paper) or "cat".

    Returns:
        logits (B, num_classes, H0, W0) at the resolution of the finest map.

    Example:
        >>> head = FPNHead([64, 128, 256, 512], num_classes=21)
        >>> feats = [torch.randn(1, c, 32 // s, 32 // s) for c, s in zip([64, 128, 256, 512], [1, 2, 4, 8])]
        >>> head(feats).shape
        torch.Size([1, 21, 32, 32])
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        pyramid_channels: int = 256,
        segmentation_channels: int = 128,
        dropout: float = 0.1,
        merge_policy: str = "add",
    ) -> None:
        super().__init__()
        check_positive("FPNHead", num_classes=num_classes, pyramid_channels=pyramid_channels,
                       segmentation_channels=segmentation_channels)
        if len(in_channels) != 4:
            raise ValueError(f"FPNHead expects 4 feature maps (strides 4/8/16/32), got in_channels={list(in_channels)}.")
        if segmentation_channels % 32:
            raise ValueError(
                f"segmentation_channels={segmentation_channels} must be a multiple of 32 (smp's FPN uses GroupNorm(32))."
            )
        self.decoder = FPNDecoder(
            encoder_channels=list(in_channels),
            encoder_depth=3,
            pyramid_channels=pyramid_channels,
            segmentation_channels=segmentation_channels,
            dropout=dropout,
            merge_policy=merge_policy,  # type: ignore[arg-type]
        )
        self.in_channels = [int(c) for c in in_channels]
        for m in self.decoder.modules():
            if type(m) is Conv3x3GNReLU:
                m.__class__ = _Conv3x3GNReLU
        self.classifier = nn.Conv2d(self.decoder.out_channels, num_classes, 1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        check_feature_maps("FPNHead", features, self.in_channels)
        sizes = [tuple(f.shape[-2:]) for f in features]
        for (h, w), (h2, w2) in zip(sizes[:-1], sizes[1:]):
            if (h, w) != (2 * h2, 2 * w2):
                raise ValueError(
                    f"FPNHead needs maps that halve exactly between levels, got sizes {sizes}; "
                    "pad the input to a multiple of 32 (SemanticSegmentationTask does this)."
                )
        return self.classifier(self.decoder(list(features)))

"""Mask R-CNN on an encoder: encoder maps (strides 4..32) -> torchvision FPN -> torchvision MaskRCNN.

The layout is torchvision's `BackboneWithFPN` (`torchvision/models/detection/backbone_utils.py`)
with our encoder as body: FPN with 256 channels on the four maps plus a max-pooled P6
(`LastLevelMaxPool`), anchors (32, 64, 128, 256, 512) x ratios (0.5, 1, 2), RoIAlign on P2-P5
(7x7 for boxes, 14x14 for masks), as in the mmdet Mask R-CNN recipe of the papers.

Sizes and normalization: images are resized at most once. `min_size=None` keeps them as the
datamodule made them; a `min_size` resizes inside the model (torchvision's
`GeneralizedRCNNTransform`), optionally only at evaluation (`skip_train_resize`). torchvision
normalizes with `image_mean`/`image_std`; give zeros/ones when the datamodule already normalizes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ANCHOR_SIZES = ((32,), (64,), (128,), (256,), (512,))
ASPECT_RATIOS = ((0.5, 1.0, 2.0),) * len(ANCHOR_SIZES)


class EncoderFPN(nn.Module):
    """Detection backbone: `encoder(x)` -> list of 4 maps -> FPN levels "0".."3" + "pool".

    Args:
        encoder: module returning a list of 4 NCHW maps at strides 4, 8, 16, 32.
        in_channels: their channels.
        out_channels: FPN width.
    """

    def __init__(self, encoder: nn.Module, in_channels: Sequence[int], out_channels: int = 256) -> None:
        super().__init__()
        self.body = encoder
        self.fpn = FeaturePyramidNetwork(list(in_channels), out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        feats = self.body(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))


class KeepSizeTransform(GeneralizedRCNNTransform):
    """torchvision's transform without the resize: normalize and batch (pad to 32) only."""

    def resize(self, image, target=None):  # type: ignore[override]
        return image, target


def make_transform(
    min_size: int | Sequence[int] | None = None,
    max_size: int | None = None,
    image_mean: Sequence[float] = IMAGENET_MEAN,
    image_std: Sequence[float] = IMAGENET_STD,
    skip_train_resize: bool = False,
) -> GeneralizedRCNNTransform:
    """Mask R-CNN input transform: normalize, optionally resize (min_size None: never), pad to 32.

    `min_size` may list several sizes (multi-scale training; evaluation uses the last).
    `skip_train_resize` leaves training images as they come (a datamodule resized them).
    """
    mean, std = list(image_mean), list(image_std)
    if min_size is None:
        return KeepSizeTransform(800, 1333, mean, std, size_divisible=32)
    sizes = (min_size,) if isinstance(min_size, int) else tuple(min_size)
    return GeneralizedRCNNTransform(sizes, max_size or 1333, mean, std, size_divisible=32, _skip_resize=skip_train_resize)


def build_mask_rcnn(
    backbone: EncoderFPN,
    num_classes: int,
    *,
    min_size: int | Sequence[int] | None = None,
    max_size: int | None = None,
    image_mean: Sequence[float] = IMAGENET_MEAN,
    image_std: Sequence[float] = IMAGENET_STD,
    **kwargs,
) -> MaskRCNN:
    """torchvision `MaskRCNN` with the recipe's anchors and RoI poolers.

    Args:
        backbone: an `EncoderFPN`.
        num_classes: object classes, background excluded (80 for COCO); labels are 1..num_classes.
        min_size, max_size: torchvision's resize (see `make_transform`); None keeps the input size.
        image_mean, image_std: normalization applied to [0, 1] images inside the model.
        **kwargs: further `MaskRCNN` arguments (e.g. box_score_thresh).

    Example:
        >>> import timm
        >>> enc = timm.create_model("resnet18", features_only=True, out_indices=(1, 2, 3, 4))
        >>> model = build_mask_rcnn(EncoderFPN(enc, enc.feature_info.channels()), num_classes=80)
    """
    levels = ["0", "1", "2", "3"]
    model = MaskRCNN(
        backbone,
        num_classes=num_classes + 1,
        rpn_anchor_generator=AnchorGenerator(ANCHOR_SIZES, ASPECT_RATIOS),
        box_roi_pool=MultiScaleRoIAlign(levels, output_size=7, sampling_ratio=2),
        mask_roi_pool=MultiScaleRoIAlign(levels, output_size=14, sampling_ratio=2),
        **kwargs,
    )
    model.transform = make_transform(min_size, max_size, image_mean, image_std)
    return model

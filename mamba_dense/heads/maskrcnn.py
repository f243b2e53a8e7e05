"""Mask R-CNN on an encoder: encoder maps (strides 4..32) -> torchvision FPN -> torchvision MaskRCNN.

The layout is torchvision's `BackboneWithFPN` (`torchvision/models/detection/backbone_utils.py`)
with our encoder as body: FPN with 256 channels on the four maps plus a max-pooled P6
(`LastLevelMaxPool`), anchors (32, 64, 128, 256, 512) x ratios (0.5, 1, 2), RoIAlign on P2-P5
(7x7 for boxes, 14x14 for masks), 1000 RPN proposals per image in training and testing, as in
the mmdet Mask R-CNN recipe of the papers. Not the same: torchvision's RoIAlign samples 2x2 points per
bin without the half-pixel offset (`aligned=False`); mmdet's samples adaptively with it.

Under autocast (bf16-mixed) boxes are decoded and scored in fp32, as mmdet's fp32 post-processing:
torchvision decodes in the regression output's dtype, which puts boxes past 1024 px on an 8 px grid.

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
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.roi_heads import RoIHeads
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
        if len(in_channels) != 4:
            raise ValueError(f"EncoderFPN needs the encoder's 4 maps at strides 4, 8, 16, 32, got channels "
                             f"{list(in_channels)}; use out_indices (0, 1, 2, 3) (task: encoder_out_indices).")
        self.body = encoder
        self.fpn = FeaturePyramidNetwork(list(in_channels), out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        feats = self.body(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))


class Fp32BoxCoder(BoxCoder):
    """torchvision's `BoxCoder` that decodes in fp32 whatever the regression's dtype (autocast)."""

    def decode(self, rel_codes: torch.Tensor, boxes: list[torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        return super().decode(rel_codes.float(), [b.float() for b in boxes])


class Fp32RoIHeads(RoIHeads):
    """torchvision's `RoIHeads` whose detections (boxes, scores) are computed in fp32 under autocast."""

    def postprocess_detections(self, class_logits, box_regression, proposals, image_shapes):  # type: ignore[override]
        return super().postprocess_detections(class_logits.float(), box_regression.float(), proposals, image_shapes)


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
        **kwargs: further `MaskRCNN` arguments (e.g. box_score_thresh; rpn_post_nms_top_n_train defaults
            to the recipe's 1000 instead of torchvision's 2000).

    Example:
        >>> import timm
        >>> enc = timm.create_model("resnet18", features_only=True, out_indices=(1, 2, 3, 4))
        >>> model = build_mask_rcnn(EncoderFPN(enc, enc.feature_info.channels()), num_classes=80)
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1 (object classes, background excluded), got {num_classes!r}.")
    kwargs.setdefault("rpn_post_nms_top_n_train", 1000)  # mmdet rpn_proposal.max_per_img
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
    for coder_owner in (model.rpn, model.roi_heads):  # same weights and clip; fp32 decoding
        old = coder_owner.box_coder
        coder_owner.box_coder = Fp32BoxCoder(old.weights, old.bbox_xform_clip)
    if type(model.roi_heads) is RoIHeads:
        model.roi_heads.__class__ = Fp32RoIHeads
    return model
